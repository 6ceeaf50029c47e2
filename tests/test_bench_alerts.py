"""`edge bench alerts` measures what it says: every alert published is received and timed."""

from __future__ import annotations

from conftest import manifest_for, shared_path

from edge.bench.alerts import run_alerts_bench

YOLO = "models/yolov8n_full_integer_quant-b.tflite"


def test_alert_bench_times_every_alert_against_invoke(tmp_path):
    report = run_alerts_bench(shared_path(YOLO), shared_path("media/pedestrians-360p10.avi"),
                              manifest=manifest_for(YOLO), seconds=4, workdir=tmp_path)
    assert report["alerts_received"] == report["alerts_published"] >= 10  # the clip always shows people
    assert report["rejected_by_subscriber"] == 0
    lat, inv = report["alert_latency_ms"], report["invoke_ms"]
    # an alert cannot arrive before the model that raised it has run
    assert 0 < inv["p50"] < lat["p50"] and lat["p50"] <= lat["p95"] <= lat["p99"]
    assert report["target_met"] == (lat["p99"] <= inv["p99"] + 15)
    # where the time went, for every alert: the stages (each at least 0) account for the whole latency
    where = report["where_the_time_goes_ms"]
    assert where["alerts"] == report["alerts_received"]
    stages = ("wait", "preprocess", "invoke", "postprocess", "handoff", "decisions", "publish", "broker")
    assert all(where[s]["p50"] >= 0 for s in stages)
    assert where["invoke"]["p50"] > 0 and where["publish"]["p50"] > 0 and where["broker"]["p50"] > 0
    assert abs(sum(where[s]["slowest_1pct_mean"] for s in stages) - where["slowest_1pct_total_mean"]) < 2.0
    assert where["slowest_1pct_excess_mostly_in"] in stages
    # the device's share of a publish and the broker's together are the publish-to-receipt leg
    assert where["publish"]["p50"] <= report["publish_to_receipt_ms"]["p99"]
    # latency figures are load-sensitive: the load they were taken under is beside them
    assert len(report["load_average_before"]) == len(report["load_average_after"]) == 3
