"""The `edge` command end to end: real processes, real models, real video."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import manifest_for, shared_path

from edge.cli import main

YOLO_B = "models/yolov8n_full_integer_quant-b.tflite"


def write_config(tmp_path: Path, source: dict, model: str = YOLO_B, manifest: Path | None = None,
                 model_path: Path | None = None) -> Path:
    cfg = {
        "device": {"id": "test-cam"},
        "runtime": {"num_threads": 2},
        "logging": {"format": "json", "stats_interval_s": 1},
        "models": {"det": {"path": str(model_path or shared_path(model)),
                           "manifest": str(manifest or manifest_for(model))}},
        "cameras": [{"id": "c0", "source": source, "model": "det"}],
    }
    path = tmp_path / "cam.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def edge(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edge", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def json_logs(stderr: str) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_edge_run_finds_persons_in_the_pedestrian_clip_and_stops_at_its_end(tmp_path):
    video = shared_path("media/pedestrians-360p10.avi")
    config = write_config(tmp_path, {"kind": "video", "path": str(video), "pace": "fast"})
    results = tmp_path / "results.jsonl"
    proc = edge("run", "--config", str(config), "--results", str(results))
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr

    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["seq"] for r in rows] == list(range(len(rows)))
    assert len(rows) > 700  # the clip decodes to about 795 frames; fast pace drops none
    with_person = [r for r in rows if any(d["label"] == "person" for d in r.get("detections", []))]
    assert len(with_person) / len(rows) > 0.8
    assert all(r["model"] == "yolov8n@8.1.42-b" and "image" not in r for r in rows)

    assert all(r["task"] == "det" for r in rows)

    logs = json_logs(stderr)
    final = [e for e in logs if e["msg"] == "stats"][-1]
    assert final["processed"] == final["captured"] == len(rows)
    assert final["superseded"] == 0 and final["dropped"] == {"too_old": 0}
    assert final["tasks"]["det"]["runs"] == len(rows)
    assert {"p50", "p95"} <= set(final["tasks"]["det"]["latency_ms"])
    assert any(e["msg"] == "stopped" and e["reason"] == "sources ended" for e in logs)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_edge_run_stops_cleanly_on_a_signal(tmp_path, sig):
    video = shared_path("media/pedestrians-360p10.avi")
    config = write_config(tmp_path, {"kind": "video", "path": str(video), "pace": "native", "loop": True})
    results = tmp_path / "results.jsonl"
    proc = edge("run", "--config", str(config), "--results", str(results))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not results.exists() or len(results.read_text().splitlines()) < 5):
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.1)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    stopped = [e for e in json_logs(stderr) if e["msg"] == "stopped"]
    assert stopped and stopped[0]["reason"] == "signal"
    assert stopped[0]["stop_s"] <= 2.0
    assert "Traceback" not in stderr


def run_main(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def assert_one_line_error(err: str, expected: str) -> None:
    ours = [line for line in err.splitlines() if line.startswith("edge: ")]
    assert len(ours) == 1, err
    assert ours[0].startswith("edge: error: ") and expected in ours[0], err
    assert "Traceback" not in err


def video_source() -> dict:
    return {"kind": "video", "path": str(shared_path("media/pedestrians-360p10.avi"))}


def test_missing_model_file(tmp_path, capsys):
    config = write_config(tmp_path, video_source(), model_path=tmp_path / "gone.tflite")
    code, err = run_main(capsys, "run", "--config", str(config))
    assert code == 1
    assert_one_line_error(err, "model file not found")


@pytest.mark.runtime
def test_model_with_an_unresolved_custom_op(tmp_path, capsys):
    config = write_config(tmp_path, video_source(), model="models/broken/model_invoking_error.tflite",
                          manifest=manifest_for("mobilenet_v2_1.0_224_quant.tflite"))
    code, err = run_main(capsys, "run", "--config", str(config))
    assert code == 1
    assert_one_line_error(err, "unresolved custom op 'fake-op-double'")


@pytest.mark.runtime
def test_manifest_that_does_not_match_the_tensors(tmp_path, capsys):
    config = write_config(tmp_path, video_source(), manifest=manifest_for("mobilenet_v2_1.0_224_quant.tflite"))
    code, err = run_main(capsys, "run", "--config", str(config))
    assert code == 1
    assert_one_line_error(err, "does not match yolov8n_full_integer_quant-b.tflite")


def test_video_that_cannot_be_opened(tmp_path, capsys):
    bad = tmp_path / "clip.avi"
    bad.write_bytes(b"RIFF" + os.urandom(2048))
    config = write_config(tmp_path, {"kind": "video", "path": str(bad)})
    code, err = run_main(capsys, "run", "--config", str(config))
    assert code == 1
    assert_one_line_error(err, "cannot open video")


def test_corrupt_config(tmp_path, capsys):
    config = tmp_path / "cam.yaml"
    config.write_text("device: {id: x}\ncameras: [\n")
    code, err = run_main(capsys, "run", "--config", str(config))
    assert code == 2
    assert_one_line_error(err, "not valid YAML")


def test_debug_shows_the_traceback(tmp_path):
    config = write_config(tmp_path, video_source(), model_path=tmp_path / "gone.tflite")
    proc = edge("--debug", "run", "--config", str(config))
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "Traceback" in stderr and "model file not found" in stderr


@pytest.mark.runtime
def test_edge_infer_prints_the_top_class(capsys):
    model = "models/mobilenet_v2_1.0_224_quant.tflite"
    code = main(["infer", "--model", str(shared_path(model)), "--manifest", str(manifest_for(model)),
                 "--labels", str(shared_path("models/imagenet_labels.txt")),
                 str(shared_path("media/images/grace_hopper.bmp"))])
    out = capsys.readouterr().out
    assert code == 0
    assert out.splitlines()[1].split(maxsplit=1)[1] == "military uniform"


@pytest.mark.runtime
def test_edge_infer_json_for_several_images(capsys):
    images = [shared_path("media/images/pets.jpg"), shared_path("media/images/kite_and_cold.jpg")]
    code = main(["infer", "--json", "--model", str(shared_path(YOLO_B)), "--manifest", str(manifest_for(YOLO_B)),
                 "--labels", str(shared_path("models/coco80_labels.txt")), *map(str, images)])
    docs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0 and len(docs) == 2
    assert [d["label"] for d in docs[0]["detections"]].count("dog") == 2
    assert {"kite", "person"} <= {d["label"] for d in docs[1]["detections"]}


@pytest.mark.runtime
def test_edge_infer_on_an_unreadable_image_fails_but_reports_the_rest(tmp_path, capsys):
    model = "models/mobilenet_v2_1.0_224_quant.tflite"
    code = main(["infer", "--model", str(shared_path(model)), "--manifest", str(manifest_for(model)),
                 str(tmp_path / "missing.jpg"), str(shared_path("media/images/grace_hopper.bmp"))])
    captured = capsys.readouterr()
    assert code == 1
    assert "cannot read image" in captured.err and "military uniform" in captured.out
