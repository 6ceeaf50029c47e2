"""Cascades on the real clip: YOLOv8n finds people, ImageNet classifiers run on their crops,
and the decisions join each crop's answer to the person it was cut from.

The ImageNet classes stand in for a site's own crop models: on the pedestrian clip
MobileNet v2 calls some people "bearskin, busby, shako" (a tall hat), which serves as
the helmet model's class; MobileNet v1 0.25, run only on people the detector is unsure
of, is the verifier. What to expect is worked out from the results themselves.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

import cv2
import pytest
import yaml
from broker import wait_until
from conftest import manifest_for, shared_path
from controller import Controller

from edge.config import parse_config
from edge.core.contract import decode_alert
from edge.daemon import Daemon
from edge.inference.adapters import Prediction
from edge.schedule.planner import _pad
from edge.schedule.scheduler import Result

MODELS = {
    "det": "models/yolov8n_full_integer_quant-b.tflite",
    "hat": "models/mobilenet_v2_1.0_224_quant.tflite",
    "check": "models/mobilenet_v1_0.25_128_quant.tflite",
}
FRAMES = 40
HAT = "bearskin, busby, shako"
CONFIRM = ["moving van", "espresso maker"]  # what the tiny model says of some unsure crops on this clip

POLICY = {
    "version": "cascade-1",
    "classes": {"person": {"accept_at": 0.3, "reject_at": 0.6}},
    "tracker": {"min_hits": 1, "lost_after_s": 1.0},
    "verifiers": {"person": {"task": "verify", "confirm": CONFIRM, "min_score": 0.1}},
    "rules": [
        {"name": "hat", "when": {"event": "every", "class": "person", "outcomes": ["reject", "unsure"],
                                 "crop": {"task": "helmet", "class": HAT, "min_score": 0.5}}},
        {"name": "hat-tracked", "when": {"event": "every", "class": "person", "outcomes": ["reject", "unsure"],
                                         "min_present_s": 0.001,
                                         "crop": {"task": "helmet", "class": HAT, "min_score": 0.5}}},
        {"name": "person", "when": {"event": "every", "class": "person"}},  # reject: sure, or confirmed
    ],
    "camera_health": {"enabled": False},
    "image_quality": {"enabled": False},
    "drift": {"enabled": False},
}


@dataclass(frozen=True)
class Seen:
    seq: int
    captured_at: float
    task: str
    prediction: Prediction
    crop: tuple | None
    parent: tuple[str, int] | None


class Collector:
    def __init__(self) -> None:
        self.results: list[Seen] = []
        self.lock = threading.Lock()

    def __call__(self, r: Result) -> None:
        with self.lock:
            self.results.append(Seen(r.frame.seq, r.frame.captured_at, r.task, r.prediction, r.crop, r.parent))


def first_frames(tmp_path: Path) -> tuple[Path, tuple[int, int]]:
    cap = cv2.VideoCapture(str(shared_path("media/pedestrians-360p10.avi")))
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(FRAMES):
        ok, frame = cap.read()
        assert ok
        cv2.imwrite(str(folder / f"{i:04d}.png"), frame)
    return folder, (frame.shape[1], frame.shape[0])


def config(tmp_path: Path, broker, frames: Path, overlap: bool) -> dict:
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(POLICY))
    person = {"task": "detect", "classes": ["person"], "min_score": 0.3, "max_crops": 3}
    return {
        "device": {"id": "cam-cascade", "site": "s", "line": "l"},
        "runtime": {"num_threads": 2, "scheduler": {"overlap": overlap}},
        "logging": {"stats_interval_s": 60},
        "models": {slot: {"path": str(shared_path(p)), "manifest": str(manifest_for(p))} for slot, p in MODELS.items()},
        "cameras": [{"id": "gate", "source": {"kind": "images", "path": str(frames)}, "budget_ms": 60000,
                     "tasks": [{"name": "detect", "model": "det"},
                               {"name": "helmet", "model": "hat", "trigger": person},
                               {"name": "verify", "model": "check", "trigger": {**person, "outcomes": ["unsure"]}}]}],
        "mqtt": {"host": broker.host, "port": broker.port, "reconnect": {"initial_s": 0.2, "max_s": 1}},
        "outbox": {"path": str(tmp_path / "outbox.db")},
        "decisions": {"policy": str(policy)},
    }


def audited(outbox: Path) -> list[dict]:
    with sqlite3.connect(f"file:{outbox}?mode=ro", uri=True) as conn:
        return [json.loads(row[0])["payload"] for row in conn.execute("select body from events where kind = 'alert'")]


def outcome(score: float) -> str:
    return "reject" if score >= 0.6 else "accept" if score < 0.3 else "unsure"


def expected(results: list[Seen], size: tuple[int, int]) -> tuple[dict, dict, dict]:
    """Per frame: the hat rule's (count, best box, crop score, every matching box), the person
    rule's count, and the verifier's verdicts, from the raw results alone."""
    w, h = size
    hats, persons, verdicts = {}, {}, {}
    for parent in (r for r in results if r.task == "detect"):
        crops = {(r.task, r.parent[1]): r for r in results if r.seq == parent.seq and r.parent is not None}
        matching, sure = [], 0
        for i, d in enumerate(parent.prediction.detections):
            if d.label != "person":
                continue
            final = outcome(d.score)
            check = crops.get(("verify", i))
            if final == "unsure" and check is not None:
                top = check.prediction.classes[0]
                final = "reject" if top.label in CONFIRM and top.score >= 0.1 else "accept"
                verdicts[(parent.seq, i)] = final
            sure += final == "reject"
            hat = crops.get(("helmet", i))
            top = hat.prediction.classes[0] if hat is not None else None
            if final in ("reject", "unsure") and top is not None and top.label == HAT and top.score >= 0.5:
                box = (d.box[0] / w, d.box[1] / h, d.box[2] / w, d.box[3] / h)
                matching.append((d.score, box, top.score))
        if matching:
            best = max(matching)
            hats[parent.captured_at] = (len(matching), best[1], best[2], [m[1] for m in matching])
        if sure:
            persons[parent.captured_at] = sure
    return hats, persons, verdicts


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
def test_crop_answers_join_their_person_and_settle_the_unsure_ones_on_the_real_clip(tmp_path, broker, overlap):
    frames, size = first_frames(tmp_path)
    controller = Controller(broker, "edgecam/v1/alerts/s/l/gate")
    sink = Collector()
    try:
        daemon = Daemon(parse_config(config(tmp_path, broker, frames, overlap)), sink)
        assert daemon.run(threading.Event()) == 0  # returns when the frames are all done
        results = sink.results
        assert sorted({r.seq for r in results if r.task == "detect"}) == list(range(FRAMES))
        # every crop names the person it was cut from
        detections = {r.seq: r.prediction.detections for r in results if r.task == "detect"}
        crops = [r for r in results if r.crop is not None]
        for r in crops:
            task, i = r.parent
            parent = detections[r.seq][i]
            assert task == "detect" and parent.label == "person" and r.crop == _pad(parent.box, 0.1)
            if r.task == "verify":  # the verifier ran on unsure people only
                assert 0.3 <= parent.score < 0.6, parent
        hats, persons, verdicts = expected(results, size)
        # the clip must exercise every branch, or this test proves nothing
        assert len(hats) >= 3 and "reject" in verdicts.values() and "accept" in verdicts.values(), (hats, verdicts)
        rows = audited(tmp_path / "outbox.db")
        stats = daemon.decisions.stats()
        assert stats["verified"] == {"confirmed": list(verdicts.values()).count("reject"),
                                     "dismissed": list(verdicts.values()).count("accept")}
        wait_until(lambda: len(controller.received()) >= len(rows), 10, "every alert over MQTT")
    finally:
        controller.close()
    alerts = [decode_alert(m.payload) for m in controller.received()]
    assert sorted(a.id for a in alerts) == sorted(r["id"] for r in rows)
    # the hat rule: on exactly the frames where a person's crop said "tall hat", the best one's box
    hat = {a.captured_at: a for a in alerts if a.rule == "hat"}
    assert sorted(hat) == sorted(hats)
    for at, (count, box, score, _) in hats.items():
        a = hat[at]
        assert a.count == count and a.box == pytest.approx(box, abs=1e-3)
        assert (a.crop.task, a.crop.label) == ("helmet", HAT) and a.crop.score == pytest.approx(score, abs=1e-4)
    # joined to the tracked person: its id, and its box on that frame
    tracked = [a for a in alerts if a.rule == "hat-tracked"]
    assert tracked and all(a.track is not None and a.captured_at in hats for a in tracked)
    for a in tracked:  # a person seen before this frame, with a hat on this one
        assert any(a.box == pytest.approx(b, abs=1e-3) for b in hats[a.captured_at][3]), a
    # the person rule counts the sure people and those the verifier confirmed, not the dismissed
    person = {a.captured_at: a.count for a in alerts if a.rule == "person"}
    assert person == persons
