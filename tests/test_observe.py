"""The observe stage in pieces: drift arithmetic, windows and learned baselines, quality
measures on real frames, the engine's hold and clear logic, and bad input at start."""

from __future__ import annotations

import json
import shutil
import socket
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from conftest import AlertRecorder, manifest_for, shared_path

from edge.cli import main
from edge.config import ObserveConfig, parse_config
from edge.core.errors import ConfigError
from edge.decide.engine import DecisionEngine
from edge.decide.policy import parse_policy
from edge.inference.manifest import BaselineError, load_manifest
from edge.observe.baseline import BaselineStore
from edge.observe.drift import DriftReport, DriftTracker, ModelRef, class_shift, psi
from edge.observe.histogram import Histogram
from edge.observe.observer import CameraObservation, ObserveSnapshot
from edge.observe.quality import QualityMeter, QualityReading, measure_frame

YOLO = "models/yolov8n_full_integer_quant-b.tflite"
MODEL = ModelRef("yolov8n", "8.1.42-b")


def test_psi_and_class_shift_are_zero_for_the_same_mix_and_grow_with_the_change():
    base = [0, 0, 10, 20, 40, 80, 40, 10, 0, 0]
    assert psi(base, base) == 0 and psi([2 * v for v in base], base) == pytest.approx(0)
    shifted = [0, 0, 40, 80, 40, 20, 10, 10, 0, 0]
    assert psi(shifted, base) > 0.5 > psi([0, 0, 11, 20, 39, 80, 41, 9, 0, 0], base)
    assert class_shift({"person": 90, "car": 10}, {"person": 900, "car": 100})[2] < 0.02
    chi2, dof, w = class_shift({"person": 10, "car": 90}, {"person": 900, "car": 100})
    assert dof == 1 and chi2 > 100 and w > 0.5
    assert class_shift({"giraffe": 5, "person": 5}, {"person": 100})[2] > 0.5  # a class never seen before


def test_histogram_counts_each_value_in_its_le_bucket():
    h = Histogram((0.01, 0.1, 1.0))
    for v in (0.005, 0.01, 0.05, 2.0):
        h.observe(v)
    counts, total = h.read()
    assert counts == [2, 1, 0, 1] and total == pytest.approx(2.065)


def _tracker(store: BaselineStore, healthy=lambda c, t: True) -> DriftTracker:
    return DriftTracker("cam", "det", 1.0, 3, learned=store.get, learn=store.put, healthy=healthy)


def _feed(tracker: DriftTracker, model: ModelRef, t0: float, seconds: float, scores, fps: float = 10) -> list:
    reports = []
    for i in range(int(seconds * fps)):
        t = t0 + i / fps
        r = tracker.add(model, [("person", s) for s in scores], 0, t, t)
        if r is not None:
            reports.append(r)
    return reports


def test_the_first_healthy_window_becomes_the_baseline_kept_across_a_restart(tmp_path):
    path = tmp_path / "baselines.json"
    sick = {"ok": False}
    store = BaselineStore(path)
    tracker = _tracker(store, healthy=lambda c, t: sick["ok"])
    first = _feed(tracker, MODEL, 0.0, 1.15, [0.8, 0.7])  # an unhealthy window is not learnt from
    assert [r.baseline for r in first] == ["none"] and first[0].psi is None and not path.exists()
    sick["ok"] = True
    learned = _feed(tracker, MODEL, 2.1, 1.15, [0.8, 0.7])
    assert learned[0].learned and learned[0].baseline == "learned"
    # a restart finds it, and compares at once: the same scores do not drift, lower ones do
    tracker = _tracker(BaselineStore(path))
    same = _feed(tracker, MODEL, 10.0, 1.15, [0.8, 0.7])[0]
    assert same.baseline == "learned" and same.psi == 0.0 and same.detections_ratio == 1.0
    low = _feed(tracker, MODEL, 20.0, 1.15, [0.3, 0.4])[0]
    assert low.psi > 1.0
    # another model version learns its own
    other = _feed(tracker, ModelRef("yolov8n", "9"), 30.0, 1.15, [0.3])[0]
    assert other.learned and other.window == 1
    assert set(json.loads(path.read_text())["baselines"]) == {"cam/det/yolov8n@8.1.42-b", "cam/det/yolov8n@9"}


def test_a_corrupt_baselines_file_is_relearnt_not_fatal(tmp_path, caplog):
    path = tmp_path / "baselines.json"
    path.write_text('{"v": 1, "baselines": {"cam/det/yolov8n@8.1.42-b": {"frames": -1}}}')
    store = BaselineStore(path)
    assert store.get("cam", "det", MODEL) is None and "learning them again" in caplog.text


def test_quality_measures_tell_black_covered_and_defocused_frames_from_the_real_scene(shared):
    cap = cv2.VideoCapture(str(shared("media/pedestrians-720p50.avi")))
    ok, frame = cap.read()
    assert ok
    limits = parse_policy("version: q").image_quality  # the default bounds
    h, w = frame.shape[:2]
    cases = {
        "scene": frame,
        "black": cv2.convertScaleAbs(frame, alpha=0.02),
        "covered": cv2.rectangle(frame.copy(), (0, 0), (int(w * 0.95), h), (40, 40, 40), -1),
        "defocused": cv2.GaussianBlur(frame, (0, 0), 12),  # sharpness about 40
        "blinded": cv2.convertScaleAbs(frame, alpha=3, beta=200),
    }
    failing = {name: limits.tamper.failing(measure_frame(img, 160, 0.0).values()) for name, img in cases.items()}
    assert failing["scene"] == [] and limits.quality.failing(measure_frame(frame, 160, 0.0).values()) == []
    assert "brightness" in failing["black"] and "flat" in failing["covered"]
    assert failing["defocused"] == ["sharpness"] and "brightness" in failing["blinded"]




def _reading(at: float, brightness: float = 120.0, sharpness: float = 2000.0) -> ObserveSnapshot:
    q = QualityReading(at, brightness, 50.0, sharpness, 0.1)
    return ObserveSnapshot({"cam": CameraObservation("cam", q)})


def test_tamper_and_quality_alerts_hold_clear_and_follow_the_time_of_day():
    policy = parse_policy("""
version: q
image_quality:
  hold_s: 2
  clear_s: 1
  tamper: {min_brightness: 10}
  quality: {min_brightness: 40, min_sharpness: 500}
  profiles: [{name: night, start: "22:00", end: "05:00", quality: {min_brightness: 5}}]
""")
    sink = AlertRecorder()
    engine = DecisionEngine("dev", lambda c: "t", sink, policy=policy)
    noon = time.mktime((2030, 6, 1, 12, 0, 0, 0, 0, -1))
    for i in range(4):  # dark at noon for 1.5 s: not yet
        engine.poll_observe(_reading(noon + i * 0.5, brightness=5))
    assert sink.alerts == []
    engine.poll_observe(_reading(noon + 2.0, brightness=5))
    assert [(a.rule, a.event, a.detail) for a in sink.alerts] == [("camera_tamper", "camera_tamper", "brightness")]
    assert sink.alerts[0].values["brightness"] == 5.0 and not engine.camera_ok("cam")
    # the same reading again changes nothing; recovery clears after clear_s
    engine.poll_observe(ObserveSnapshot({"cam": CameraObservation("cam", None)}))
    for i in range(3):
        engine.poll_observe(_reading(noon + 3 + i * 0.5))
    assert [(a.rule, a.event, a.state) for a in sink.alerts[1:]] == [("camera_tamper", "cleared", False)]
    assert [s.on for s in sink.states] == [True, False] and engine.camera_ok("cam")
    # a soft picture is a quality problem, not tamper
    for i in range(5):
        engine.poll_observe(_reading(noon + 10 + i, sharpness=100))
    assert [(a.rule, a.detail) for a in sink.alerts[2:]] == [("image_quality", "sharpness")]
    # at night a dim picture is fine: the night profile's bound is 5
    sink.alerts.clear()
    night = time.mktime((2030, 6, 1, 23, 0, 0, 0, 0, -1))
    for i in range(5):
        engine.poll_observe(_reading(night + i, brightness=20))
    assert [(a.rule, a.event) for a in sink.alerts] == [("image_quality", "cleared")]
    assert engine.device_alerts()[("cam", "image_quality")] is False


def _report(window: int, psi_value: float, detections: int = 500) -> ObserveSnapshot:
    r = DriftReport(camera="cam", task="det", model="yolov8n", model_version="1", window=window, since=window * 600.0,
                    until=window * 600.0 + 599, frames=100, detections=detections, detections_per_frame=5.0,
                    unsure_share=0.1, baseline="manifest", psi=psi_value, class_shift=0.05, detections_ratio=1.0)
    return ObserveSnapshot({"cam": CameraObservation("cam", None, {"det": r})})


def test_model_drift_needs_its_windows_in_a_row_and_clears_on_a_good_one():
    sink = AlertRecorder()
    engine = DecisionEngine("dev", lambda c: "t", sink,
                            policy=parse_policy("version: d\ndrift: {max_psi: 0.2, windows: 2, min_detections: 100}"))
    engine.poll_observe(_report(1, 0.5))
    engine.poll_observe(_report(2, 0.1))  # the streak breaks
    engine.poll_observe(_report(3, 0.5))
    engine.poll_observe(_report(4, 0.9, detections=50))  # too few to judge the scores
    assert sink.alerts == []
    engine.poll_observe(_report(5, 0.5))
    snap = _report(6, 0.6)
    engine.poll_observe(snap)
    engine.poll_observe(snap)  # polled again: judged once
    engine.poll_observe(_report(7, 0.05))
    assert [(a.rule, a.event, a.task, a.values.get("psi")) for a in sink.alerts] == [
        ("model_drift", "model_drift", "det", 0.6), ("model_drift", "cleared", "det", 0.05)]


def test_bad_metrics_listen_names_the_key():
    base = {"device": {"id": "d"}, "models": {"m": {"path": "m.tflite"}},
            "cameras": [{"id": "c", "source": {"kind": "pattern"}, "model": "m"}]}
    for bad in ("9108", "localhost", "127.0.0.1:0", "127.0.0.1:70000", "[::1:9108"):
        with pytest.raises(ConfigError, match=r"metrics\.listen"):
            parse_config({**base, "metrics": {"listen": bad}})
    assert parse_config({**base, "metrics": {"listen": "[::1]:9108"}}).metrics.address == ("::1", 9108)
    with pytest.raises(ConfigError, match=r"observe\.drift\.window_s"):
        parse_config({**base, "observe": {"drift": {"window_s": 0}}})
    assert ObserveConfig().drift.window_s == 600


def _config(tmp_path: Path, manifest: Path, port: int) -> Path:
    cfg = {"device": {"id": "d"}, "runtime": {"num_threads": 1},
           "models": {"det": {"path": str(shared_path(YOLO)), "manifest": str(manifest)}},
           "cameras": [{"id": "c", "source": {"kind": "pattern"}, "model": "det"}],
           "metrics": {"listen": f"127.0.0.1:{port}"}}
    path = tmp_path / "cam.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_taken_port_and_a_baseline_of_other_classes_stop_the_start_with_exit_2(tmp_path, capsys):
    manifest = tmp_path / "yolov8n.yaml"
    shutil.copy(manifest_for(YOLO), manifest)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["run", "--config", str(_config(tmp_path, manifest, port))]) == 2
    err = capsys.readouterr().err
    assert "metrics.listen" in err and "in use" in err
    baseline = {"frames": 10, "bins": 2, "detections": 3, "classes": {"unicorn": {"count": 3, "scores": [1, 2]}}}
    manifest.write_text(manifest.read_text() + yaml.safe_dump({"baseline": baseline}))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    assert main(["run", "--config", str(_config(tmp_path, manifest, free))]) == 2
    err = capsys.readouterr().err
    assert "models.det.manifest" in err and "baseline.classes" in err and "'unicorn'" in err
    # the port is free again: the failed start did not keep its metrics server
    with socket.socket() as again:
        again.bind(("127.0.0.1", free))


def test_a_malformed_baseline_is_refused_naming_its_key(tmp_path):
    manifest = tmp_path / "m.yaml"
    manifest.write_text("name: m\nversion: '1'\ntask: classify\nlabels: [a, b]\n"
                        "baseline: {frames: 5, bins: 3, detections: 2, classes: {a: {count: 2, scores: [1, 1]}}}\n")
    with pytest.raises(BaselineError, match=r"baseline\.classes\.a\.scores: 2 bins, expected bins = 3") as e:
        load_manifest(manifest)
    assert e.value.exit_code == 2


def test_a_frame_the_measures_cannot_take_is_counted_and_the_capture_goes_on():
    meter = QualityMeter(160, 0.0)
    assert meter.offer(np.zeros((4, 4, 4, 4), np.uint8), 0.0, 0.0) is None and meter.errors == 1
    assert meter.offer(np.full((90, 160, 3), 100, np.uint8), 1.0, 1.0).brightness == 100
