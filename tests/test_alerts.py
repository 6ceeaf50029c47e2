"""Alerts from `edge run` on real video and YOLOv8n to a line controller on a real Mosquitto."""

from __future__ import annotations

import functools
import http.server
import json
import random
import signal
import sqlite3
import threading
import time
from pathlib import Path

import cv2
import yaml
from broker import wait_until
from conftest import EdgeRun, edge_run, manifest_for, shared_path
from controller import Controller

from edge.config import DeviceInfo
from edge.core.contract import decode_alert
from edge.decide.engine import DecisionEngine, FrameInfo
from edge.decide.policy import parse_policy
from edge.inference.model import Model

YOLO = "models/yolov8n_full_integer_quant-b.tflite"
ALERTS = "edgecam/v1/alerts/plant-a/3/door"

# The crossing in the middle of the overhead clip; people walk in and out of it.
CROSSWALK = """
version: "cw-1"
classes:
  person: {accept_at: 0.3, reject_at: 0.5}
zones:
  crosswalk: {polygon: [[0.3, 0.45], [0.7, 0.45], [0.7, 1.0], [0.3, 1.0]]}
tracker: {min_hits: 3, lost_after_s: 1.0}
rules:
  - name: person-entered
    when: {event: entered, classes: [person], zone: crosswalk}
    debounce: {k: 3, n: 5}
    cooldown_s: 30         # per object: someone walking along the edge is one entry
  - name: crosswalk-occupied
    when: {event: present, classes: [person], zone: crosswalk}
    debounce: {k: 3, n: 5}
    state: true
camera_health: {enabled: false}
"""

# A person-on-every-frame rule with a cooldown: a steady stream of alerts.
EVERY = """
version: "{version}"
classes:
  person: {{accept_at: 0.3, reject_at: {reject_at}}}
rules:
  - name: person-seen
    when: {{event: every, classes: [person]}}
    cooldown_s: {cooldown}
camera_health: {{enabled: false}}
"""


def write_config(tmp_path: Path, broker, source: dict, policy: str) -> Path:
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(policy)
    cfg = {
        "device": {"id": "cam-alerts", "site": "plant-a", "line": "3"},
        "runtime": {"num_threads": 2, "stats_file": str(tmp_path / "stats.json")},
        "logging": {"format": "json", "stats_interval_s": 0.5},
        "models": {"det": {"path": str(shared_path(YOLO)), "manifest": str(manifest_for(YOLO))}},
        "cameras": [{"id": "door", "source": source, "model": "det"}],
        "mqtt": {"host": broker.host, "port": broker.port, "reconnect": {"initial_s": 0.2, "max_s": 1}},
        "outbox": {"path": str(tmp_path / "outbox.db")},
        "decisions": {"policy": str(policy_file)},
    }
    path = tmp_path / "cam.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def stop(run: EdgeRun) -> str:
    """Stop the daemon; it must exit 0. Returns its log."""
    code = run.stop()
    assert code == 0, run.text()[-3000:]
    return run.text()


def audited_alerts(outbox: Path) -> list[dict]:
    """The alert audit rows the device committed (nothing acks them here, so all stay)."""
    with sqlite3.connect(f"file:{outbox}?mode=ro", uri=True) as conn:
        return [json.loads(row[0])["payload"] for row in conn.execute("select body from events where kind = 'alert'")]


def stats(tmp_path: Path) -> dict:
    try:
        return json.loads((tmp_path / "stats.json").read_text())
    except (OSError, ValueError):
        return {}


def test_a_line_controller_gets_person_entered_zone_alerts_on_the_real_clip(tmp_path, broker):
    controller = Controller(broker, "edgecam/v1/alerts/#")
    try:
        video = str(shared_path("media/pedestrians-720p50.avi"))
        config = write_config(tmp_path, broker, {"kind": "video", "path": video, "pace": "native"}, CROSSWALK)
        run = edge_run(config)
        try:
            run.proc.wait(timeout=120)  # the clip ends, the daemon stops by itself
        finally:
            stop(run)
        wait_until(lambda: any(m.retained is False and "/state/" in m.topic for m in controller.received()),
                   5, "a state update")
    finally:
        controller.close()
    alerts = [decode_alert(m.payload) for m in controller.received() if m.topic == ALERTS]
    entered = [a for a in alerts if a.rule == "person-entered"]
    # people walk into the crossing several times in the clip; a flicker is not an entry
    assert 2 <= len(entered) <= 25, [(a.track, a.captured_at) for a in entered]
    assert len({a.track for a in entered}) == len(entered)  # each object once (its cooldown)
    assert [a.count for a in entered] == list(range(1, len(entered) + 1))  # the rule's running count
    for a in entered:
        x = (a.box[0] + a.box[2]) / 2
        assert a.label == "person" and a.confidence >= 0.5 and a.zone == "crosswalk"
        assert 0.25 <= x <= 0.75 and a.box[3] >= 0.4  # its feet are at the crossing
        assert a.model.startswith("yolov8n") and a.model_version == "8.1.42-b" and a.policy_version == "cw-1"
        assert a.device == "cam-alerts" and not a.delayed
        assert 0 <= a.published_at - a.captured_at < 2.0
    assert all(m.expiry == 60 for m in controller.received() if m.topic == ALERTS)
    # every alert is also an audit row in the outbox
    audit_ids = {row["id"] for row in audited_alerts(tmp_path / "outbox.db")}
    assert {a.id for a in alerts} <= audit_ids
    # a controller that connects later still learns whether the crossing is occupied now
    states = [json.loads(m.payload) for m in controller.received() if m.topic.endswith("/state/crosswalk-occupied")]
    assert states and states[0]["on"] is True
    late = Controller(broker, f"{ALERTS}/state/#", client_id="late-controller")
    try:
        wait_until(lambda: late.received(), 5, "the retained state")
        retained = late.received()[0]
        assert retained.retained and json.loads(retained.payload)["on"] == states[-1]["on"]
    finally:
        late.close()


def test_alerts_wait_for_the_broker_and_arrive_marked_delayed_none_lost(tmp_path, broker):
    controller = Controller(broker, f"{ALERTS}", client_id="plc", persistent=True)
    video = str(shared_path("media/pedestrians-360p10.avi"))
    config = write_config(tmp_path, broker, {"kind": "video", "path": video, "pace": "native", "loop": True},
                          EVERY.format(version="e-1", reject_at=0.5, cooldown=0.3))
    run = edge_run(config)
    try:
        wait_until(lambda: len(controller.received()) >= 3, 60, "alerts while the broker is up")
        broker.stop()
        down_at = time.time()
        # inference and decisions go on; alerts wait on the device
        wait_until(lambda: stats(tmp_path).get("decisions", {}).get("mqtt", {}).get("pending", 0) >= 5, 30,
                   "alerts queued while the broker is down")
        broker.start()
        up_at = time.time()
        wait_until(lambda: any(decode_alert(m.payload).delayed for m in controller.received()), 30,
                   "delayed alerts after the reconnect")
        time.sleep(1.0)
    finally:
        stop(run)
        time.sleep(0.5)  # the last alerts in flight
        controller.close()
    received = {}
    for m in controller.received():
        alert = decode_alert(m.payload)
        received.setdefault(alert.id, alert)  # QoS 1: a copy may come twice, by the same id
    audited = audited_alerts(tmp_path / "outbox.db")
    assert {row["id"] for row in audited} == set(received)  # every alert the device decided arrived
    delayed = [a for a in received.values() if a.delayed]
    # decided while the broker was away (or before the device was back on it), sent once
    # it was back, with the capture time kept
    assert sum(a.captured_at < up_at for a in delayed) >= 5
    for a in delayed:
        assert down_at - 1.0 <= a.captured_at < a.published_at and a.published_at >= up_at - 0.5
    assert all(not row["delivered"] for row in audited if row["id"] in {a.id for a in delayed})


def test_sighup_reloads_the_policy_mid_run_without_a_frame_lost_and_refuses_a_broken_one(tmp_path, broker):
    controller = Controller(broker, ALERTS)
    video = str(shared_path("media/pedestrians-360p10.avi"))
    # files are read frame by frame at "fast": a lost frame would be a gap in the results' seq
    config = write_config(tmp_path, broker, {"kind": "video", "path": video, "pace": "fast", "loop": True},
                          EVERY.format(version="v1", reject_at=0.5, cooldown=0))
    policy_file = tmp_path / "policy.yaml"
    results = tmp_path / "results.jsonl"
    run = edge_run(config, "--results", str(results))
    try:
        wait_until(lambda: len(controller.received()) >= 5, 60, "alerts under policy v1")
        # v2: no person is ever that sure, so the alerts stop
        policy_file.write_text(EVERY.format(version="v2", reject_at=0.99, cooldown=0))
        run.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: stats(tmp_path).get("decisions", {}).get("policy") == "v2", 30, "policy v2 in force")
        seen_at_v2 = len(controller.received())
        policy_file.write_text("version: v3\nrules: [{name: x, when: {event: entered}}]\n")  # no zone: invalid
        run.proc.send_signal(signal.SIGHUP)
        frames_before = len(results.read_text().splitlines())
        wait_until(lambda: len(results.read_text().splitlines()) > frames_before + 20, 60, "frames after the refusal")
        assert run.proc.poll() is None
        assert stats(tmp_path)["decisions"]["policy"] == "v2"
    finally:
        log_text = stop(run)
        controller.close()
    versions = [decode_alert(m.payload).policy_version for m in controller.received()]
    assert set(versions) <= {"v1", "v2"} and versions[0] == "v1"
    # after v2 took over, at most the frames already in flight alerted under v1
    assert len(versions) - seen_at_v2 <= 2 and "v2" not in versions
    assert "policy refused" in log_text and "rules[0].when.zone" in log_text
    seqs = [json.loads(line)["seq"] for line in results.read_text().splitlines()]
    assert seqs == list(range(len(seqs)))  # not one frame dropped across both reloads


def test_tracker_ids_on_the_real_clip_stay_with_the_people_walking(shared):
    model = Model.load(shared(YOLO), manifest=manifest_for(YOLO), num_threads=2)
    policy = parse_policy("version: t\ntracker: {min_hits: 3, lost_after_s: 1.0}\n"
                          "classes: {person: {accept_at: 0.3, reject_at: 0.5}}")
    engine = DecisionEngine("dev", lambda cam: "t", None, policy=policy)
    cap = cv2.VideoCapture(str(shared("media/pedestrians-720p50.avi")))
    first, last, n, most_at_once = {}, {}, 0, 0
    while True:
        ok, image = cap.read()
        if not ok:
            break
        if n % 2 == 0:  # 25 fps is plenty for walking people
            prediction, _ = model.predict(image)
            t = n / 50
            most_at_once = max(most_at_once, sum(d.label == "person" and d.score >= 0.5
                                                 for d in prediction.detections))
            engine.observe(FrameInfo("cam", t, image.shape[1], image.shape[0], "yolov8n", None), prediction)
            for track in engine.tracks("cam"):
                if track.seen_now and track.label == "person":
                    first.setdefault(track.id, t)
                    last[track.id] = t
        n += 1
    lasting = {tid: last[tid] - first[tid] for tid in first}
    steady = [tid for tid, span in lasting.items() if span >= 1.0]
    # an overhead crowd: about twenty people detected at once, others walking in and out
    # over the clip's 6.8 s; ids must neither merge people nor shatter each walk
    assert most_at_once <= len(steady) <= 3 * most_at_once, (most_at_once, lasting)
    # people in view from start to end keep one id throughout
    assert sum(span >= 5.0 for span in lasting.values()) >= 8, lasting


def test_a_blind_camera_raises_an_alert_and_clears_it_when_frames_return(tmp_path, broker):
    served = tmp_path / "www"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    controller = Controller(broker, f"{ALERTS}/#")
    # the stream's URL answers 404 for now: the camera cannot open and keeps retrying
    url = f"http://127.0.0.1:{server.server_address[1]}/clip.avi"
    config = write_config(tmp_path, broker, {"kind": "url", "url": url, "open_timeout_s": 2},
                          "version: h1\ncamera_health: {after_s: 1.0}\n")
    cfg = yaml.safe_load(config.read_text())
    cfg["cameras"][0]["reopen"] = {"initial_s": 0.2, "max_s": 0.5}
    config.write_text(yaml.safe_dump(cfg))
    run = edge_run(config)
    try:
        wait_until(lambda: any(m.topic == ALERTS for m in controller.received()), 60, "the blind-camera alert")
        (served / "clip.avi").symlink_to(shared_path("media/pedestrians-360p10.avi"))  # the feed comes back
        wait_until(lambda: sum(m.topic == ALERTS for m in controller.received()) >= 2, 30, "the restored alert")
    finally:
        stop(run)
        controller.close()
        server.shutdown()
    alerts = [decode_alert(m.payload) for m in controller.received() if m.topic == ALERTS]
    assert [(a.rule, a.event, a.state) for a in alerts[:2]] == [
        ("camera_health", "camera_blind", True), ("camera_health", "camera_restored", False)]
    assert alerts[0].detail in ("reopening", "failed") and alerts[0].camera == "door"
    states = [json.loads(m.payload)["on"] for m in controller.received() if m.topic.endswith("/state/camera_health")]
    assert states[:2] == [True, False]


def test_three_cameras_reconnecting_after_an_outage_spread_their_attempts(tmp_path, broker):
    from edge.config import Backoff as BackoffCfg
    from edge.config import MqttConfig
    from edge.decide.alerts import AlertPublisher

    mqtt_cfg = MqttConfig(host=broker.host, port=broker.port, keepalive_s=5,
                          reconnect=BackoffCfg(initial_s=1.0, max_s=4.0))
    links = [AlertPublisher.for_device(mqtt_cfg, DeviceInfo(id=f"cam-{i}", site="s", line="l"),
                                       rng=random.Random(seed).random)
             for i, seed in enumerate((4, 3, 8))]  # first reconnect after 1.1, 1.5 and 2.0 s
    try:
        for link in links:
            link.start()
        wait_until(lambda: all(link.connected for link in links), 10, "three alert links")
        broker.kill()
        wait_until(lambda: not any(link.connected for link in links), 10, "the outage seen by all")
        broker.start()
        back: dict[int, float] = {}

        def all_back() -> bool:
            for i, link in enumerate(links):
                if link.connected and i not in back:
                    back[i] = time.monotonic()
            return len(back) == 3
        wait_until(all_back, 20, "every link back", interval=0.01)
        times = sorted(back.values())
        # paho alone reconnects them in step (within milliseconds): here each waits its own delay
        assert min(b - a for a, b in zip(times, times[1:])) > 0.2, times
    finally:
        for link in links:
            link.stop(timeout=0.1)
