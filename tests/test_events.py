"""Events: ids, the payload guard, the helpers, and their wire form."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from edge.core import contract
from edge.core import ids as I
from edge.sync import events as E


def test_ids_are_ulids_that_sort_by_time_and_never_repeat():
    before = time.time()
    ids = [I.new_id() for _ in range(20_000)]
    assert all(len(i) == 26 and set(i) <= set(I._CROCKFORD) for i in ids)
    assert ids == sorted(ids), "monotonic within a process, even within one millisecond"
    assert len(set(ids)) == len(ids)
    assert before - 0.01 <= I.ulid_time(ids[0]) <= time.time() + 0.01


def test_ids_stay_unique_and_increasing_across_threads():
    per_thread: list[list[str]] = [[] for _ in range(4)]

    def make(out: list[str]) -> None:
        out.extend(I.new_id() for _ in range(5000))

    threads = [threading.Thread(target=make, args=(out,)) for out in per_thread]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [i for out in per_thread for i in out]
    assert len(set(every)) == len(every)
    assert all(out == sorted(out) for out in per_thread)


def test_ulid_encoding_round_trips_its_time():
    assert I.encode_ulid(0, 0) == "0" * 26
    assert I.encode_ulid((1 << 48) - 1, (1 << 80) - 1) == "7" + "Z" * 25
    assert I.ulid_time(I.encode_ulid(1_700_000_000_123, 5)) == 1_700_000_000.123


@pytest.mark.parametrize("payload, complaint", [
    ({"jpeg": b"\xff\xd8\xff\xe0" * 10}, "payload.jpeg: bytes of 40 bytes refused"),
    ({"frame": bytearray(16)}, "payload.frame: bytearray"),
    ({"view": memoryview(b"abc")}, "payload.view: memoryview"),
    ({"dets": [{"mask": np.zeros((8, 8), np.uint8)}]}, "payload.dets[0].mask: array of shape (8, 8) refused"),
    ({"score": np.float32(0.5)}, "numpy scalar float32 refused"),
    ({"tags": {"a", "b"}}, "payload.tags: set refused"),
    ({"x": float("nan")}, "payload.x: nan is not a finite number"),
    ({"x": object()}, "payload.x: object is not JSON metadata"),
    ({"thumb": "iVBORw0KGgo" * 200}, "looks like encoded binary"),
    ({"n": list(range(3000))}, "over the 8192-byte limit"),
])
def test_payload_guard_refuses_anything_but_small_metadata(payload, complaint):
    with pytest.raises(E.PayloadError) as err:
        E.new_event(E.Kind.HEALTH, payload)
    assert complaint in str(err.value)


def test_a_frame_cannot_leak_into_an_event_by_any_helper():
    frame = np.zeros((480, 640, 3), np.uint8)
    with pytest.raises(E.PayloadError, match="array"):
        E.health_snapshot("c0", {"last_frame": frame})
    with pytest.raises(E.PayloadError, match="array"):
        E.decision("c0", time.time(), "m", "reject", "scratch", 0.9, crop=frame[:10, :10])
    with pytest.raises(E.PayloadError, match="bytes"):
        E.alert_audit("c0", time.time(), "r1", "t", True, snapshot=frame.tobytes())


def test_the_payload_is_a_snapshot_taken_when_the_event_is_made():
    payload = {"counts": {"person": 1}}
    event = E.new_event(E.Kind.HEALTH, payload)
    payload["counts"]["person"] = 99
    assert event.payload == {"counts": {"person": 1}}
    with pytest.raises(AttributeError):
        event.priority = 0  # type: ignore[misc]


def test_bad_camera_ids_and_priorities_are_refused_at_the_source():
    with pytest.raises(E.PayloadError, match="camera"):
        E.new_event(E.Kind.HEALTH, {}, camera="cam 1")
    with pytest.raises(E.PayloadError, match="camera"):
        E.new_event(E.Kind.HEALTH, {}, camera="cam1\n")
    with pytest.raises(E.PayloadError, match="priority"):
        E.new_event(E.Kind.HEALTH, {}, priority=10)


def test_detection_summary_counts_labels_and_keeps_the_top_boxes():
    dets = [{"class_id": 0, "label": "person", "score": 0.3 + i / 100, "box": [i, 2.04, 3, 4]} for i in range(30)]
    dets.append({"label": "car", "score": np.float32(0.99), "box": (1, 2, 3, 4)})
    event = E.detection_summary("line3", 1_700_000_000.5, "yolov8n", dets, frame=42)
    p = event.payload
    assert event.kind is E.Kind.DETECTION_SUMMARY and event.camera == "line3"
    assert event.captured_at == 1_700_000_000.5 and event.recorded_at >= event.captured_at
    assert p["count"] == 31 and p["counts"] == {"car": 1, "person": 30} and p["frame"] == 42
    assert len(p["detections"]) == E.TOP_DETECTIONS
    assert p["detections"][0] == {"label": "car", "score": 0.99, "box": [1.0, 2.0, 3.0, 4.0]}


def test_helpers_give_each_kind_its_priority():
    made = [
        E.detection_interval("c0", 1.0, 61.0, "m", 1800, {"person": 12}),
        E.decision("c0", 1.0, "m", "unsure", "scratch", 0.55, zone="left"),
        E.alert_audit("c0", 1.0, "scratch-k3", "edgecam/v1/alerts/s/l/c0", True),
        E.health_snapshot("c0", {"fps": np.float64(29.9), "latency_ms": {"p95": np.float32(12.5)}}),
        E.model_event("activated", "detector", "8.1.42-b", sha256="ab" * 32),
        E.eviction("cap", 10, 3000, {"health": 10}),
    ]
    assert [e.kind.value for e in made] == [
        "detection_summary", "decision", "alert", "health", "model", "outbox_eviction"]
    assert [e.priority for e in made] == [1, 2, 4, 0, 3, 3]
    assert made[3].payload == {"fps": 29.9, "latency_ms": {"p95": 12.5}}
    with pytest.raises(E.PayloadError, match="outcome"):
        E.decision("c0", 1.0, "m", "maybe", "x", 0.5)


def test_kinds_are_the_contracts_kinds():
    assert tuple(k.value for k in E.Kind) == contract.EVENT_KINDS
    assert set(E.PRIORITY) == set(E.Kind)


def test_an_event_in_wire_form_decodes_under_the_contract():
    event = E.detection_summary("c0", 1_700_000_000.25, "m", [{"label": "ünïcode", "score": 0.5, "box": [0, 0, 1, 1]}])
    wire = contract.event_json(id=event.id, seq=7, kind=event.kind.value, device="dev-1", camera=event.camera,
                               captured_at=event.captured_at, recorded_at=event.recorded_at,
                               priority=event.priority, payload_json=event.payload_json)
    assert wire.isascii()
    batch = contract.decode_batch(contract.batch_body("dev-1", I.new_id(), time.time(), wire), device="dev-1")
    decoded = batch.events[0]
    assert (decoded.id, decoded.seq, decoded.camera, decoded.captured_at) == (event.id, 7, "c0", 1_700_000_000.25)
    assert decoded.payload == json.loads(event.payload_json)
