"""`edge run` syncing its metadata to a real `fleet serve` through a real Mosquitto."""

from __future__ import annotations

import json
import random
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest
import yaml
from broker import FleetProcess, wait_until
from conftest import REPO, EdgeRun, edge_run, manifest_for, shared_path

YOLO = "models/yolov8n_full_integer_quant-b.tflite"


def write_config(tmp_path: Path, broker, source: dict, device: str = "cam-e2e") -> Path:
    cfg = {
        "device": {"id": device, "site": "plant-a", "line": "3"},
        "runtime": {"num_threads": 2},
        "logging": {"format": "json", "stats_interval_s": 1},
        "models": {"det": {"path": str(shared_path(YOLO)), "manifest": str(manifest_for(YOLO))}},
        "cameras": [{"id": "door", "source": source, "model": "det"}],
        "mqtt": {"host": broker.host, "port": broker.port, "reconnect": {"initial_s": 0.2, "max_s": 1}},
        "outbox": {"path": str(tmp_path / "outbox.db"), "ack_timeout_s": 2},
    }
    path = tmp_path / "cam.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def store_ids(db: Path, kind: str | None = None) -> list[str]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        query = "select id from events" + (" where kind = ?" if kind else "")
        return [row[0] for row in conn.execute(query, (kind,) if kind else ())]


def outbox_ids(db: Path) -> set[str]:
    """Event ids in an outbox its daemon has reported open (so its schema exists)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return {row[0] for row in conn.execute("select id from events")}


def fleet_json(*args: str) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "fleet", *args, "--json"], capture_output=True, text=True,
                         cwd=REPO, timeout=30, check=True).stdout
    if out.lstrip().startswith("["):
        return json.loads(out)  # a list
    return [json.loads(line) for line in out.splitlines() if line.strip()]  # a stream


def test_edge_run_detections_reach_the_fleet_and_are_queryable(tmp_path, broker):
    frames = tmp_path / "frames"
    frames.mkdir()
    cap = cv2.VideoCapture(str(shared_path("media/pedestrians-360p10.avi")))
    for i in range(30):
        cv2.imwrite(str(frames / f"{i:03d}.png"), cap.read()[1])
    fleet = FleetProcess(tmp_path / "fleet.db", broker)
    try:
        fleet.wait_for("serving")
        config = write_config(tmp_path, broker, {"kind": "images", "path": str(frames), "fps": 5})
        results = tmp_path / "results.jsonl"
        run = edge_run(config, "--results", str(results))
        # every frame of the clip has people: 30 detection summaries, each once
        wait_until(lambda: len(store_ids(fleet.db, "detection_summary")) >= 30, 60, "30 detection summaries")
        assert run.stop() == 0, run.text()[-3000:]

        summaries = fleet_json("events", "tail", "--db", str(fleet.db), "--device", "cam-e2e",
                               "--kind", "detection_summary", "--limit", "100")
        assert len(summaries) == 30 == len({e["id"] for e in summaries})
        frames_seen = sorted(e["payload"]["frame"] for e in summaries)
        assert frames_seen == list(range(30))
        rows = {json.loads(line)["seq"]: json.loads(line) for line in results.read_text().splitlines()}
        for event in summaries:  # what the fleet holds is what the model said, boxes and all
            local = rows[event["payload"]["frame"]]
            persons = sum(d["label"] == "person" for d in local["detections"])
            assert event["payload"]["counts"].get("person", 0) == persons
            assert event["camera"] == "door" and "image" not in json.dumps(event)
        kinds = {e["kind"] for e in fleet_json("events", "tail", "--db", str(fleet.db), "--limit", "1000")}
        assert {"detection_summary", "health", "model"} <= kinds
        devices = fleet_json("devices", "list", "--db", str(fleet.db))
        assert [(d["id"], d["state"], d["models"]) for d in devices] == [("cam-e2e", "offline", {"det": "yolov8n@8.1.42-b"})]
    finally:
        fleet.stop()


@pytest.mark.alone  # twenty starts, each to its first committed events, within one window
def test_kill_9_edge_run_twenty_times_loses_and_duplicates_nothing(tmp_path, broker):
    fleet = FleetProcess(tmp_path / "fleet.db", broker)
    outbox = tmp_path / "outbox.db"
    video = str(shared_path("media/pedestrians-360p10.avi"))
    config = write_config(tmp_path, broker, {"kind": "video", "path": video, "pace": "fast", "loop": True})
    committed: set[str] = set()
    rng = random.Random(7)
    runs: list[EdgeRun] = []
    try:
        fleet.wait_for("serving")
        for _ in range(20):
            run = edge_run(config)
            runs.append(run)
            # wait for work to be under way (the outbox reports itself open, then holds
            # events of this life), then kill at a random moment of it
            run.wait_for("outbox open")
            wait_until(lambda: len(outbox_ids(outbox) - committed) > 0 or run.proc.poll() is not None, 60,
                       "the outbox to fill")
            time.sleep(rng.uniform(0.0, 1.5))
            run.kill()
            # what survived the kill is committed; it must reach the fleet exactly once
            committed |= outbox_ids(outbox)
        assert committed  # some kills caught events committed but not yet acked
        final = edge_run(config)
        runs.append(final)
        wait_until(lambda: committed <= set(store_ids(fleet.db)), 120, "every committed event in the store")
        final.stop()
    finally:
        for run in runs:  # a failed wait must not leave a daemon behind
            run.kill()
        fleet.stop()
    stored = store_ids(fleet.db)
    # twenty lives' worth of detections went through (about 25 a life on a quiet machine;
    # a loaded one makes fewer before each kill)
    assert len(stored) > 100
    assert len(stored) == len(set(stored))  # exactly once
    stats = fleet.last_stats()
    assert not stats.get("rejected") and not stats.get("store_errors")


def test_broker_down_30s_inference_keeps_going_and_the_backlog_drains(tmp_path, broker):
    fleet = FleetProcess(tmp_path / "fleet.db", broker)
    outbox = tmp_path / "outbox.db"
    video = str(shared_path("media/pedestrians-360p10.avi"))
    config = write_config(tmp_path, broker, {"kind": "video", "path": video, "loop": True})
    results = tmp_path / "results.jsonl"
    count = lambda: len(results.read_text().splitlines()) if results.exists() else 0  # noqa: E731
    try:
        fleet.wait_for("serving")
        run = edge_run(config, "--results", str(results))
        wait_until(lambda: len(store_ids(fleet.db, "detection_summary")) >= 10, 60, "sync to start")
        broker.stop()
        down_at, before = time.monotonic(), count()
        time.sleep(30)
        during = count() - before
        backlog = outbox_ids(outbox)
        broker.start()
        # 30 s of a 10 fps clip: inference went on at the source's pace the whole time
        assert during >= 150, during
        assert len(backlog) >= 100  # and its metadata waited in the outbox
        wait_until(lambda: backlog <= set(store_ids(fleet.db)), 90, "the backlog to drain")
        assert time.monotonic() - down_at < 150
        assert run.stop() == 0, run.text()[-3000:]
    finally:
        run.kill()
        fleet.stop()
    stored = store_ids(fleet.db)
    assert len(stored) == len(set(stored))
