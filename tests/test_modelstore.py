"""The device's model store: content-addressed files, the atomic state file, GC, crash loops."""

from __future__ import annotations

import json
import os

import pytest
from conftest import manifest_for, shared_path

from edge.core.contract import Artifact
from edge.inference.manifest import load_manifest
from edge.updates.modelstore import Entry, ModelStore, SlotState, State, StoreError, describe, rollback_slot

TINY = "models/mobilenet_v1_0.25_128_quant.tflite"


def entry(sha: str, **over) -> Entry:
    return Entry(**{"sha256": sha, "name": "m", "version": sha[:4], **over})


def admit(store: ModelStore, data: bytes, name: str = "m") -> Artifact:
    import hashlib

    art = Artifact(kind="model", name=name, version="1", sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    part = store.part(art.sha256)
    part.write_bytes(data)
    store.admit(art, part)
    return art


def test_state_round_trips_and_a_missing_file_is_the_factory_state(tmp_path):
    store = ModelStore(tmp_path)
    assert store.load() == State()
    state = State(desired_version=4, slots={"det": SlotState(active=entry("aa" * 32), previous=entry("bb" * 32))})
    store.save(state)
    assert store.load() == state
    assert not list(tmp_path.glob(".*.tmp"))  # the temp file was renamed, not left behind


def test_a_damaged_state_file_is_an_error_naming_it_not_a_silent_reset(tmp_path):
    store = ModelStore(tmp_path)
    store.state_path.write_text('{"v": 1, "slots": {"det": {"active": 3}}}')
    with pytest.raises(StoreError, match="state.json"):
        store.load()


def test_a_crash_during_a_state_write_leaves_the_old_state(tmp_path, monkeypatch):
    store = ModelStore(tmp_path)
    old = State(slots={"det": SlotState(active=entry("aa" * 32))})
    store.save(old)

    def crash(*args):
        raise OSError("killed between write and rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        store.save(State(slots={"det": SlotState(active=entry("bb" * 32))}))
    monkeypatch.undo()
    assert store.load() == old


def test_objects_are_named_by_content_and_gc_keeps_the_named_and_n_spare(tmp_path):
    store = ModelStore(tmp_path, keep=1)
    arts = [admit(store, bytes([i]) * 1000) for i in range(4)]
    for i, art in enumerate(arts):  # oldest first
        os.utime(store.objects / f"{art.sha256}.json", (1000 + i, 1000 + i))
        assert store.has(art) and store.path(art.sha256).read_bytes() == bytes([i]) * 1000
    state = State(slots={"det": SlotState(active=entry(arts[0].sha256), previous=entry(arts[1].sha256))})
    deleted = store.gc(state)
    assert deleted == [arts[2].sha256]  # the newest spare stays
    assert [store.has(a) for a in arts] == [True, True, False, True]


def test_a_factory_model_is_copied_in_once(tmp_path):
    store = ModelStore(tmp_path)
    path = shared_path(TINY)
    manifest = load_manifest(manifest_for(TINY), model_dir=path.parent)
    first = store.import_file(path, manifest)
    second = store.import_file(path, manifest)
    assert first == second and store.path(first.sha256).read_bytes() == path.read_bytes()
    assert store.manifest(first.sha256).labels == manifest.labels


def test_n_starts_within_m_minutes_of_an_activation_go_back_to_the_previous_model(tmp_path):
    store = ModelStore(tmp_path)
    new = entry("bb" * 32, activated_at=1000.0, committed=False, job="j1", desired_version=7)
    store.save(State(desired_version=6, slots={"det": SlotState(active=new, previous=entry("aa" * 32))}))
    assert store.boot(1060, restarts=3, minutes=10) == []
    assert store.boot(1120, restarts=3, minutes=10) == []
    [loop] = store.boot(1180, restarts=3, minutes=10)
    assert (loop.slot, loop.failed.sha256, loop.restored.sha256, loop.restarts) == ("det", "bb" * 32, "aa" * 32, 3)
    state = store.load()
    assert state.slots["det"].active.sha256 == "aa" * 32
    assert state.desired_version == 7  # the desired state that asked for it is answered
    assert state.last_change["reason"].startswith("crash_loop")
    assert store.boot(1240, restarts=3, minutes=10) == []  # the restored model is not on trial


def test_starts_long_after_an_activation_do_not_count(tmp_path):
    store = ModelStore(tmp_path)
    new = entry("bb" * 32, activated_at=1000.0)
    store.save(State(slots={"det": SlotState(active=new, previous=entry("aa" * 32))}))
    for minute in (20, 21, 22, 23):
        assert store.boot(1000 + minute * 60, restarts=2, minutes=10) == []
    assert store.load().slots["det"].active.sha256 == "bb" * 32


def test_a_technician_rollback_swaps_active_and_previous(tmp_path):
    store = ModelStore(tmp_path)
    a, b = admit(store, b"a" * 100), admit(store, b"b" * 100)
    store.save(State(slots={"det": SlotState(active=entry(b.sha256, activated_at=5.0), previous=entry(a.sha256))}))
    restored = rollback_slot(store, "det")
    assert restored.sha256 == a.sha256 and restored.committed
    rows = describe(store.load())
    assert [(r["role"], r["sha256"]) for r in rows] == [("active", a.sha256), ("previous", b.sha256)]
    json.dumps(rows)
    with pytest.raises(StoreError, match="no previous model"):
        rollback_slot(store, "cls")
