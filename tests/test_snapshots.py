"""Snapshots: JPEGs of alert and unsure frames on the device, capped; only id and hash leave."""

from __future__ import annotations

import hashlib
import os
import time

import cv2
import numpy as np
from broker import wait_until

from edge.decide.engine import DecisionEngine, FrameInfo
from edge.decide.policy import parse_policy
from edge.decide.snapshots import SnapshotLimits, SnapshotStore
from edge.inference.adapters import Detection, Prediction


def test_a_snapshot_is_a_real_jpeg_whose_hash_is_reported(tmp_path, shared):
    image = cv2.imread(str(shared("media/images/grace_hopper.bmp")))
    store = SnapshotStore(tmp_path / "snaps", SnapshotLimits(max_bytes=10_000_000, max_age_s=3600))
    store.start()
    done: list[str] = []
    try:
        assert store.request(image, "01ARZ3NDEKTSV4RRFFQ69G5FAV", done.append)
        wait_until(lambda: done, 10, "the snapshot to be written")
    finally:
        store.stop()
    data = store.path("01ARZ3NDEKTSV4RRFFQ69G5FAV").read_bytes()
    assert done == [hashlib.sha256(data).hexdigest()]
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == image.shape


def test_the_store_keeps_under_its_size_and_age_caps_oldest_first(tmp_path):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (240, 320, 3), np.uint8)  # noise: every JPEG is large
    store = SnapshotStore(tmp_path, SnapshotLimits(max_bytes=1, max_age_s=3600))
    one = len(cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 85])[1])
    store.limits = SnapshotLimits(max_bytes=int(one * 3.5), max_age_s=3600)
    old = tmp_path / "00000000000000000000000000.jpg"
    old.write_bytes(b"x")
    os.utime(old, (time.time() - 7200, time.time() - 7200))  # past the age cap
    store.start()
    written: list[str] = []
    try:
        for i in range(6):
            wait_until(lambda: store.request(image, f"01ARZ3NDEKTSV4RRFFQ69G5FA{i}", written.append), 10, "room")
        wait_until(lambda: len(written) == 6, 20, "six snapshots")
    finally:
        store.stop()
    kept = sorted(p.name for p in tmp_path.glob("*.jpg"))
    assert kept == [f"01ARZ3NDEKTSV4RRFFQ69G5FA{i}.jpg" for i in (3, 4, 5)]  # the newest three fit
    assert store.stats()["pruned"] == 4


def test_an_alert_names_its_snapshot_and_the_audit_row_carries_the_hash(tmp_path):
    store = SnapshotStore(tmp_path, SnapshotLimits(max_bytes=10_000_000, max_age_s=3600))
    store.start()
    audit: list = []
    policy = parse_policy("version: s\nrules: [{name: r, when: {event: every, classes: [person]}, snapshot: true}]")
    engine = DecisionEngine("dev-1", lambda cam: "t", None, policy=policy, audit=audit.append, snapshots=store)
    image = np.full((100, 200, 3), 90, np.uint8)
    try:
        alerts = engine.observe(FrameInfo("cam", 1.0, 200, 100, "m", "1", image),
                                Prediction("detect", detections=(Detection(0, "person", 0.9, (10, 10, 50, 90)),)))
        wait_until(lambda: audit, 10, "the audit row")
    finally:
        store.stop()
    (alert,) = alerts
    row = audit[0].payload
    assert row["snapshot"] == alert.snapshot
    assert row["snapshot_sha256"] == hashlib.sha256(store.path(alert.snapshot).read_bytes()).hexdigest()
    assert "image" not in audit[0].payload_json and len(audit[0].payload_json) < 2000


def test_a_snapshot_past_its_age_is_deleted_without_a_new_write(tmp_path):
    store = SnapshotStore(tmp_path, SnapshotLimits(max_bytes=10_000_000, max_age_s=3600), prune_every_s=0.1)
    old, fresh = tmp_path / "old.jpg", tmp_path / "fresh.jpg"
    for path in (old, fresh):
        path.write_bytes(b"\xff\xd8jpeg")
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    store.start()
    try:
        # the count, not the file: the timer unlinks first and counts after
        wait_until(lambda: store.stats()["pruned"] == 1, 5, "the old snapshot deleted by the timer")
        assert not old.exists() and fresh.exists() and store.stats()["written"] == 0
    finally:
        store.stop()
