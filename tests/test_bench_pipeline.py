"""`edge bench` measures its loops against the limits it names, on the real model and clip."""

from __future__ import annotations

from conftest import manifest_for, shared_path

from edge.bench.pipeline import run_bench

YOLO = "models/yolov8n_full_integer_quant-b.tflite"


def test_the_pipeline_bench_reports_every_loop_against_its_limit_and_the_memory():
    report = run_bench(shared_path(YOLO), shared_path("media/pedestrians-360p10.avi"),
                       manifest=manifest_for(YOLO), threads=2, rounds=1, naive=False)
    loops = ("bare", "bare_decoding", "pipeline", "pipeline_serial", "predecoded", "predecoded_serial")
    assert set(report["fps"]) == set(loops) and all(report["fps"][name] > 0 for name in loops)
    ratios = report["ratios"]
    for name in ("pipeline_vs_bare_decoding", "pipeline_serial_vs_bare_decoding", "predecoded_vs_bare",
                 "bare_decoding_vs_bare", "pipeline_vs_bare"):
        r = ratios[name]
        assert 0 < r["q1"] <= r["median"] <= r["q3"]
    # the concurrent decoder really decoded along: one frame per invoke, give or take the last
    assert 0.9 <= report["decoder_frames_per_invoke"] <= 1.0
    assert report["pipeline_stage_ms"]["invoke"]["p50"] > 0
    memory = report["rss_mb"]
    assert 50 < memory["model_loaded"] <= memory["peak"] and memory["end"] <= memory["peak"]
