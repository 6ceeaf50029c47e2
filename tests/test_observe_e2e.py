"""The observe stage on a running `edge run`: /metrics scraped by a client, `promtool` and a
real Prometheus; drift on the real clip darkened, blurred and colour-swapped; tamper on
clips turned black, covered and defocused. One daemon serves every check of the module."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import cv2
import pytest
import yaml
from broker import Broker, free_port, wait_until
from conftest import REPO, edge_run, manifest_for, shared_path
from controller import Controller
from prometheus_client.parser import text_string_to_metric_families

from edge.cli import main
from edge.core.contract import decode_alert
from edge.observe.baseline import read_frames

YOLO = "models/yolov8n_full_integer_quant-b.tflite"
DRIFT_CAMERAS = ("plain", "dark", "blur", "swap")
TAMPER_CAMERAS = ("t-black", "t-flat", "t-blur")
EVERY = 12  # the drift clips take every 12th frame of the 80 s clip: all of it, in 67 frames
HOLD_S = 1.0

POLICY = f"""
version: obs-1
camera_health: {{enabled: false}}
drift: {{max_psi: 0.1, max_class_shift: 10, detections_ratio: [0, 100], min_detections: 100}}
image_quality:
  hold_s: {HOLD_S}
  clear_s: 1.0
  tamper: {{min_brightness: 15, max_flat: 0.8, min_sharpness: 300}}
  quality: {{min_brightness: 0}}    # only the tamper bounds here
"""


def _write(path: Path, frames, fps: float = 10.0) -> Path:
    h, w = frames[0].shape[:2]
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    for f in frames:
        out.write(f)
    out.release()
    return path


def _clips(dirpath: Path) -> dict[str, Path]:
    frames = list(read_frames(shared_path("media/pedestrians-360p10.avi")))
    drift = frames[::EVERY]
    altered = {
        "plain": drift,
        "dark": [cv2.convertScaleAbs(f, alpha=0.1) for f in drift],
        "blur": [cv2.GaussianBlur(f, (0, 0), 2) for f in drift],
        "swap": [f[:, :, ::-1].copy() for f in drift],
        "base": frames[EVERY // 2::EVERY],  # the baseline: the frames in between
    }
    # 2 s of the scene, 3 s tampered with, 3 s of the scene again, at 10 fps
    def tampered(fn):
        return frames[:20] + [fn(f) for f in frames[20:50]] + frames[50:80]

    h, w = frames[0].shape[:2]
    altered["t-black"] = tampered(lambda f: cv2.convertScaleAbs(f, alpha=0.03))
    altered["t-flat"] = tampered(lambda f: cv2.rectangle(f.copy(), (0, 0), (int(w * 0.92), h), (60, 110, 90), -1))
    altered["t-blur"] = tampered(lambda f: cv2.GaussianBlur(f, (0, 0), 4))
    altered["t-normal"] = frames[:80]
    return {name: _write(dirpath / f"{name}.avi", fs) for name, fs in altered.items()}


class Daemon:
    def __init__(self, workdir: Path, broker: Broker) -> None:
        self.workdir = workdir
        clips = _clips(workdir)
        manifest = workdir / "yolov8n.yaml"
        shutil.copy(manifest_for(YOLO), manifest)
        model = str(shared_path(YOLO))
        assert main(["baseline", "--model", model, "--manifest", str(manifest), "--source", str(clips["base"]),
                     "--threads", "2", "--write"]) == 0
        (workdir / "policy.yaml").write_text(POLICY)
        self.port = free_port()
        cameras = [{"id": name, "source": {"kind": "video", "path": str(clips[name]), "pace": "fast"},
                    "model": "det"} for name in DRIFT_CAMERAS]
        for name in (*TAMPER_CAMERAS, "t-normal"):
            cameras.append({"id": name, "source": {"kind": "video", "path": str(clips[name]), "pace": "native",
                                                   "loop": name == "t-normal"},  # keeps the daemon up
                            "tasks": [{"name": "det", "model": "det", "min_interval_ms": 2000}]})
        cfg = {
            "device": {"id": "cam-observe", "site": "plant-a", "line": "3"},
            "runtime": {"num_threads": 2, "stats_file": str(workdir / "stats.json")},
            "logging": {"format": "json", "stats_interval_s": 0.5},
            "models": {"det": {"path": model, "manifest": str(manifest)}},
            "cameras": cameras,
            "mqtt": {"host": broker.host, "port": broker.port, "reconnect": {"initial_s": 0.2, "max_s": 1}},
            "outbox": {"path": str(workdir / "outbox.db")},
            "decisions": {"policy": str(workdir / "policy.yaml")},
            "metrics": {"listen": f"127.0.0.1:{self.port}"},
            # one window per drift clip: it closes when the clip ends
            "observe": {"drift": {"window_s": 3600}, "quality": {"interval_s": 0.2}},
        }
        self.config = workdir / "cam.yaml"
        self.config.write_text(yaml.safe_dump(cfg))
        self.controller = Controller(broker, "edgecam/v1/alerts/#")
        self.run = edge_run(self.config)
        self.run.wait_for("metrics listening")

    def scrape(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
            return r.read().decode()

    def stats(self) -> dict:
        try:
            return json.loads((self.workdir / "stats.json").read_text())
        except (OSError, ValueError):
            return {}

    def alerts(self) -> list:
        return [decode_alert(m.payload) for m in self.controller.received() if "/state/" not in m.topic]

    def drift_events(self) -> dict[str, dict]:
        with sqlite3.connect(f"file:{self.workdir / 'outbox.db'}?mode=ro", uri=True) as conn:
            rows = [json.loads(body) for (body,) in conn.execute("select body from events where kind = 'drift'")]
        return {row["camera"]: row["payload"] for row in rows}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("observe")
    broker = Broker(workdir / "mosquitto").start()
    d = None
    try:
        d = Daemon(workdir, broker)
        yield d
    finally:
        if d is not None:
            code = d.run.stop()
            d.controller.close()
            assert code == 0, d.run.text()[-3000:]
        broker.stop()


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        out[(family.name, ("family",))] = 0.0
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _processed(snapshot: dict) -> dict[str, int]:
    return {c["camera"]: c["processed"] for c in snapshot.get("cameras", [])}


def test_metrics_move_in_step_with_edge_stats_and_pass_promtool(daemon):
    wait_until(lambda: _processed(daemon.stats()).get("t-normal", 0) > 5, 60, "frames in the stats file")
    before = daemon.stats()
    scraped_at = time.time()
    text = daemon.scrape()
    wait_until(lambda: daemon.stats().get("at", 0) > scraped_at, 10, "a stats snapshot after the scrape")
    after = daemon.stats()
    samples = _samples(text)
    for camera in ("t-normal", "plain"):
        got = samples[("edgecam_frames_processed_total", (("camera", camera),))]
        assert _processed(before)[camera] <= got <= _processed(after)[camera], (camera, got)
    # the histograms agree with their own counts, and the names follow the conventions
    labels = (("camera", "t-normal"), ("task", "det"))
    assert samples[("edgecam_result_age_seconds_count", labels)] == \
        samples[("edgecam_result_age_seconds_bucket", (("camera", "t-normal"), ("le", "+Inf"), ("task", "det")))] > 0
    assert samples[("edgecam_camera_state", (("camera", "t-normal"), ("state", "live")))] == 1.0
    assert samples[("edgecam_model_info", (("name", "yolov8n"), ("slot", "det"), ("version", "8.1.42-b")))] == 1.0
    assert samples[("process_resident_memory_bytes", ())] > 10e6
    assert ("edgecam_image_brightness", (("camera", "t-normal"),)) in samples
    assert samples[("edgecam_sync_connected", ())] == 1.0
    names = {name for name, _ in samples}
    assert {"edgecam_frames_dropped_total", "edgecam_task_skips_total", "edgecam_outbox_rows",
            "edgecam_outbox_oldest_unsynced_age_seconds", "edgecam_stage_seconds_bucket"} <= names
    assert not any("id" in dict(lbl) or "track" in dict(lbl) for _, lbl in samples if lbl != ("family",))
    # every series the example Grafana dashboard charts exists
    dashboard = (REPO / "configs/grafana/edgecam-dashboard.json").read_text()
    charted = set(re.findall(r"\b(edgecam_[a-z_]+|process_[a-z_]+)", dashboard))
    known = names | {re.sub(r"_(bucket|total|info)$", "", n) for n in names}
    assert charted and charted <= known, charted - known
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus): exposition lint not run")
    lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_a_real_prometheus_scrapes_the_daemon(daemon, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("needs Debian's prometheus package (apt-get install prometheus)")
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "edgecam", "static_configs": [{"targets": [f"127.0.0.1:{daemon.port}"]}]}]}))
    log = open(tmp_path / "prometheus.log", "w")
    proc = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)

    def query(expr: str) -> list:
        url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return json.loads(r.read())["data"]["result"]
        except (OSError, ValueError):
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
            return []

    try:
        up = wait_until(lambda: query('up{job="edgecam"}'), 30, "the edgecam target scraped")
        assert up[0]["value"][1] == "1"
        rate = wait_until(lambda: query('rate(edgecam_frames_captured_total{camera="t-normal"}[5s]) > 0'), 30,
                          "a frame rate answered by Prometheus")
        assert 2 < float(rate[0]["value"][1]) < 20  # the clip plays at 10 fps
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def test_drift_alerts_on_the_altered_clips_and_none_on_the_unchanged_one(daemon):
    wait_until(lambda: set(DRIFT_CAMERAS) <= set(daemon.drift_events()), 180, "a drift window of each clip")
    events = daemon.drift_events()
    for camera in DRIFT_CAMERAS:
        e = events[camera]
        assert e["baseline"] == "manifest" and e["frames"] == 67 and e["model_version"] == "8.1.42-b", e
    assert events["plain"]["psi"] < 0.05, events["plain"]
    for camera in ("dark", "blur", "swap"):
        assert events[camera]["psi"] > 0.1, (camera, events[camera])
    wait_until(lambda: {a.camera for a in daemon.alerts() if a.rule == "model_drift"} >= {"dark", "blur", "swap"},
               10, "model_drift alerts at the subscriber")
    drifted = [a for a in daemon.alerts() if a.rule == "model_drift"]
    assert "plain" not in {a.camera for a in drifted}
    for a in drifted:
        assert a.event == "model_drift" and a.state is True and a.task == "det" and "psi" in a.detail.split(",")
        assert a.values["psi"] == events[a.camera]["psi"] and a.model_version == "8.1.42-b"


def test_tamper_raises_within_its_hold_and_clears_after_on_each_clip_and_never_on_the_normal_one(daemon):
    def tamper():
        return [a for a in daemon.alerts() if a.rule == "camera_tamper"]

    wait_until(lambda: sum(a.event == "cleared" for a in tamper()) >= len(TAMPER_CAMERAS), 120,
               "each tampered camera cleared")
    expected = {"t-black": "brightness", "t-flat": "flat", "t-blur": "sharpness"}
    for camera, measure in expected.items():
        mine = [a for a in tamper() if a.camera == camera]
        assert [(a.event, a.state) for a in mine] == [("camera_tamper", True), ("cleared", False)], mine
        raised, cleared = mine
        assert measure in raised.detail.split(","), raised
        # the picture was tampered with for 3 s: raised one hold after it began, cleared one
        # clear time after it ended
        assert 2.0 <= cleared.captured_at - raised.captured_at <= 4.5, (raised, cleared)
    states = [json.loads(m.payload) for m in daemon.controller.received() if m.topic.endswith("/state/camera_tamper")]
    # (the darkened and blurred drift clips are tampered pictures too)
    assert set(TAMPER_CAMERAS) <= {s["camera"] for s in states if s["on"]}
    assert not [a for a in daemon.alerts() if a.camera in ("t-normal", "plain")
                and a.rule in ("camera_tamper", "image_quality")]


def test_edge_stats_shows_drift_and_quality(daemon, capsys):
    wait_until(lambda: "drift" in next((c for c in daemon.stats().get("cameras", []) if c["camera"] == "dark"), {}),
               120, "drift in the stats file")
    assert main(["stats", "--config", str(daemon.config)]) == 0
    out = capsys.readouterr().out
    assert "picture: brightness" in out
    dark = next(line for line in out.splitlines() if line.startswith("  drift det") and "psi" in line)
    assert "against the manifest baseline" in dark
