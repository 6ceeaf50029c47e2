"""Sampling for retraining: near-threshold, rare-class and random frames kept on the device,
capped per hour and per day on the monotonic clock, recorded as metadata only."""

from __future__ import annotations

import hashlib
import random

import cv2
import numpy as np
import pytest
from broker import wait_until

from edge.decide.engine import DecisionEngine, FrameInfo
from edge.decide.policy import PolicyError, parse_policy
from edge.decide.snapshots import SnapshotLimits, SnapshotStore
from edge.inference.adapters import Classification, Detection, Prediction

W, H = 200, 100
IMAGE = np.full((H, W, 3), 90, np.uint8)


class Store:
    """A pure-logic stand-in for the snapshot store: takes every request, hashes the id."""

    def __init__(self, room: bool = True) -> None:
        self.room = room
        self.taken: list[str] = []

    def request(self, image, sid, done) -> bool:
        if not self.room:
            return False
        self.taken.append(sid)
        done(hashlib.sha256(sid.encode()).hexdigest())
        return True


def engine(sampling: str, store=None, rng: random.Random | None = None, classes: str = "") -> tuple:
    audit: list = []
    store = Store() if store is None else store
    policy = parse_policy(f"version: s1\ndefault: {{accept_at: 0.3, reject_at: 0.5}}\n{classes}sampling: {sampling}\n")
    eng = DecisionEngine("dev-1", lambda cam: "t", None, policy=policy, audit=audit.append, snapshots=store,
                         rng=rng or random.Random(0))
    return eng, store, audit


def frame(t: float, *, mono: float | None = None, camera: str = "cam-1") -> FrameInfo:
    return FrameInfo(camera, t, W, H, "yolov8n", "8.1.42-b", IMAGE, mono)


def dets(*pairs: tuple[str, float]) -> Prediction:
    return Prediction("yolov8", detections=tuple(Detection(0, label, score, (10, 10, 60, 90)) for label, score in pairs))


def samples(audit: list) -> list[dict]:
    return [e.payload for e in audit if "sampled" in e.payload]


def test_a_score_near_a_threshold_is_kept_and_one_far_from_both_is_not():
    eng, store, audit = engine("{near_threshold: {epsilon: 0.05}}")
    eng.observe(frame(1.0), dets(("person", 0.9)))  # far from 0.3 and 0.5
    eng.observe(frame(2.0), dets(("person", 0.2)))  # 0.1 below accept_at
    eng.observe(frame(3.0), dets(("person", 0.9), ("car", 0.53)))  # 0.03 above reject_at
    eng.observe(frame(4.0), dets(("person", 0.27)))  # 0.03 below accept_at
    got = samples(audit)
    assert [(s["label"], s["score"], s["threshold"], s["outcome"]) for s in got] == [
        ("car", 0.53, "reject_at", "reject"), ("person", 0.27, "accept_at", "accept")]
    assert all(s["sampled"] == ["near_threshold"] and s["policy_version"] == "s1" for s in got)
    assert [s["snapshot"] for s in got] == store.taken
    assert eng.stats()["samples"] == {"near_threshold": 2}


def test_per_class_thresholds_and_the_class_filter_apply():
    eng, _, audit = engine("{near_threshold: {epsilon: 0.02, classes: [person]}}",
                           classes="classes: {person: {accept_at: 0.6, reject_at: 0.8}}\n")
    eng.observe(frame(1.0), dets(("person", 0.51)))  # near the default's reject_at, not person's
    eng.observe(frame(2.0), dets(("car", 0.51)))  # near the default's, but not a person
    eng.observe(frame(3.0), dets(("person", 0.79)))
    assert [s["score"] for s in samples(audit)] == [0.79]


def test_the_hourly_cap_holds_on_the_monotonic_clock_and_opens_an_hour_later():
    eng, store, audit = engine("{near_threshold: {epsilon: 0.05, per_hour: 3, per_day: 5}}")
    near = dets(("person", 0.5))
    # the wall clock jumps a day ahead midway (an NTP step): the caps do not care
    for i in range(10):
        eng.observe(frame(1000.0 + i + (86400 if i > 4 else 0), mono=50.0 + i), near)
    assert len(store.taken) == 3
    assert eng.stats()["samples_capped"] == {"near_threshold": 7}
    eng.observe(frame(5000.0, mono=50.0 + 3600.0), near)  # an hour after the first
    eng.observe(frame(5001.0, mono=50.0 + 3601.0), near)
    eng.observe(frame(5002.0, mono=50.0 + 3602.0), near)
    assert len(store.taken) == 5  # the day's cap of 5 now
    eng.observe(frame(9000.0, mono=50.0 + 2 * 3600.0 + 10), near)
    assert len(store.taken) == 5
    eng.observe(frame(99000.0, mono=50.0 + 86400.0), near)  # a day after the first: it has left the window
    assert len(store.taken) == 6
    assert eng.stats()["samples"] == {"near_threshold": 6}


def test_caps_are_per_camera():
    eng, store, _ = engine("{near_threshold: {per_hour: 1}}")
    for camera in ("cam-1", "cam-2", "cam-1"):
        eng.observe(frame(1.0, camera=camera), dets(("person", 0.5)))
    assert len(store.taken) == 2


def test_listed_rare_classes_are_kept_and_so_are_classes_the_camera_seldom_sees():
    eng, store, audit = engine("{rare_classes: {classes: [forklift], max_share: 0.05, min_seen: 40, per_hour: 100}}")
    eng.observe(frame(0.0), dets(("forklift", 0.9)))
    eng.observe(frame(0.5), dets(("forklift", 0.1)))  # accept: below the sampler's outcomes
    for i in range(40):
        eng.observe(frame(1.0 + i), dets(("person", 0.9)))
    assert len(store.taken) == 1  # person is common, and dog not yet judged rare before min_seen
    eng.observe(frame(50.0), dets(("person", 0.9), ("dog", 0.7)))
    eng.observe(frame(51.0), dets(("person", 0.9), ("dog", 0.7)))
    got = samples(audit)
    assert [(s["label"], s["sampled"]) for s in got] == [("forklift", ["rare_class"]), ("dog", ["rare_class"]),
                                                         ("dog", ["rare_class"])]
    for _ in range(3):  # the third dog is rare (2 of 45 is under 5%), the fourth not (3 of 46)
        eng.observe(frame(52.0), dets(("dog", 0.7)))
    assert len(samples(audit)) == 4


def test_a_random_share_of_frames_is_kept_with_the_seeded_draws():
    eng, store, audit = engine("{random: {share: 0.1, per_hour: 1000, per_day: 1000}}", rng=random.Random(7))
    for i in range(300):
        eng.observe(frame(float(i)), Prediction("yolov8"))  # nothing seen: random still samples
    draws = random.Random(7)
    assert len(store.taken) == sum(draws.random() < 0.1 for _ in range(300))
    assert 15 <= len(store.taken) <= 50
    got = samples(audit)
    assert all(s["sampled"] == ["random"] and "label" not in s for s in got)


def test_the_random_sampler_draws_once_a_frame_whatever_the_tasks_on_it():
    eng, store, _ = engine("{random: {share: 0.1, per_hour: 1000, per_day: 1000}}", rng=random.Random(7))
    for i in range(300):
        f = frame(float(i), mono=float(i))
        eng.observe(f, Prediction("segment"))  # two tasks' results on each frame
        eng.observe(f, Prediction("yolov8"))
    draws = random.Random(7)
    assert len(store.taken) == sum(draws.random() < 0.1 for _ in range(300))


def test_one_frame_wanted_by_several_samplers_is_one_snapshot_with_every_reason():
    eng, store, audit = engine("{near_threshold: {}, rare_classes: {classes: [dog]}, random: {share: 0.1}}",
                               rng=random.Random(1))
    rng = random.Random(1)
    first = next(i for i in range(50) if rng.random() < 0.1)  # the first frame the random sampler draws
    assert first < 10  # within the other two samplers' hourly caps
    for i in range(first + 1):
        eng.observe(frame(float(i)), dets(("dog", 0.52)))
    assert len(store.taken) == first + 1  # one snapshot a frame
    assert [s["sampled"] for s in samples(audit)] == [["near_threshold", "rare_class"]] * first + [
        ["near_threshold", "rare_class", "random"]]
    assert eng.stats()["samples"] == {"near_threshold": first + 1, "rare_class": first + 1, "random": 1}


def test_a_busy_store_takes_nothing_from_the_caps():
    store = Store(room=False)
    eng, _, audit = engine("{near_threshold: {per_hour: 1}}", store=store)
    eng.observe(frame(1.0), dets(("person", 0.5)))
    assert eng.stats()["samples_skipped"] == {"near_threshold": 1} and not audit
    store.room = True
    eng.observe(frame(2.0), dets(("person", 0.5)))
    assert len(store.taken) == 1 and eng.stats()["samples"] == {"near_threshold": 1}


def test_without_a_store_nothing_is_sampled_or_counted_and_a_warning_says_so(caplog):
    policy = parse_policy("version: 1\nsampling: {random: {share: 0.1}}")
    eng = DecisionEngine("dev-1", lambda cam: "t", None, policy=policy, rng=random.Random(0))
    for i in range(50):
        eng.observe(frame(float(i)), Prediction("yolov8"))
    assert eng.stats()["samples"] == {} and eng.stats()["samples_capped"] == {}
    assert any("no snapshot store" in r.getMessage() for r in caplog.records)


def test_a_classifiers_top_class_is_sampled_near_its_threshold():
    eng, store, audit = engine("{near_threshold: {epsilon: 0.01}}")
    eng.observe(frame(1.0), Prediction("classify", classes=(Classification(3, "scratch", 0.305),)))
    (got,) = samples(audit)
    assert got["label"] == "scratch" and got["box"] == [0.0, 0.0, 1.0, 1.0]


def test_a_sample_is_a_real_jpeg_on_the_device_and_only_its_id_and_hash_are_recorded(tmp_path, shared):
    picture = cv2.imread(str(shared("media/images/grace_hopper.bmp")))
    store = SnapshotStore(tmp_path, SnapshotLimits(max_bytes=10_000_000, max_age_s=3600))
    store.start()
    audit: list = []
    policy = parse_policy("version: s\nsampling: {near_threshold: {epsilon: 0.05}}")
    eng = DecisionEngine("dev-1", lambda cam: "t", None, policy=policy, audit=audit.append, snapshots=store)
    h, w = picture.shape[:2]
    try:
        eng.observe(FrameInfo("cam", 1.0, w, h, "m", "1", picture),
                    Prediction("detect", detections=(Detection(0, "person", 0.48, (10, 10, 300, 500)),)))
        wait_until(lambda: samples(audit), 10, "the sample's decision event")
    finally:
        store.stop()
    (event,) = [e for e in audit if "sampled" in e.payload]  # beside it, the unsure frame's own decision
    assert event.kind.value == "decision"
    row = event.payload
    data = store.path(row["snapshot"]).read_bytes()
    assert row["snapshot_sha256"] == hashlib.sha256(data).hexdigest()
    assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).shape == picture.shape
    assert row["sampled"] == ["near_threshold"] and len(event.payload_json) < 600


@pytest.mark.parametrize("sampling, key", [
    ("{near_threshold: {epsilon: 0}}", "sampling.near_threshold.epsilon: must be > 0"),
    ("{near_threshold: {per_hour: -1}}", "sampling.near_threshold.per_hour: must be >= 0"),
    ("{random: {share: 0.5}}", "sampling.random.share: must be <= 0.1"),
    ("{rare_classes: {max_share: 1}}", "sampling.rare_classes.max_share: must be < 1"),
    ("{rare_classes: {outcomes: [maybe]}}", "sampling.rare_classes.outcomes[0]"),
    ("{often: {}}", "sampling.often: unknown key"),
    ("{random: {per_day: 1000000}}", "sampling.random.per_day: must be <= 100000"),
    ("{near_threshold: {epsilon: .nan}}", "sampling.near_threshold.epsilon: must be <= 0.5"),
    ("{near_threshold: {per_hour: 1.5}}", "sampling.near_threshold.per_hour: input should be a valid integer"),
    ("{rare_classes: {classes: forklift}}", "sampling.rare_classes.classes: input should be a valid list"),
    ("[random]", "sampling: input should be a valid dictionary"),
])
def test_a_malformed_sampler_is_refused_naming_the_key(sampling, key):
    with pytest.raises(PolicyError, match=key.replace("[", r"\[").replace("]", r"\]")):
        parse_policy(f"version: 1\nsampling: {sampling}")
