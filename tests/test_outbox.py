"""The SQLite outbox on real files: order, batches, acks, hand-off overflow, caps, reopening."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from edge.config import OutboxConfig
from edge.core import contract
from edge.core.ids import new_id
from edge.sync import events as E
from edge.sync.outbox import Outbox, OutboxError


def open_outbox(tmp_path: Path, **cfg) -> Outbox:
    return Outbox.open(OutboxConfig(path=tmp_path / "outbox.db", **cfg), "dev-1")


def health(i: int) -> E.Event:
    return E.health_snapshot("c0", {"i": i})


def detection(i: int) -> E.Event:
    return E.detection_summary("c0", time.time(), "m", [{"label": "person", "score": 0.9, "box": [0, 0, 1, 1]}], frame=i)


def alert(i: int) -> E.Event:
    return E.alert_audit("c0", time.time(), "rule", "edgecam/v1/alerts/s/l/c0", True, n=i)


def append_all(outbox: Outbox, events) -> list[E.Event]:
    events = list(events)
    assert all(outbox.append(e) for e in events)
    assert outbox.flush()
    return events


def drain(outbox: Outbox, max_events: int = 500, max_bytes: int = 256 * 1024) -> list[dict]:
    """Every event handed out, in order, as decoded wire events."""
    out = []
    while (batch := outbox.next_batch(max_events, max_bytes)) is not None:
        events = json.loads(f"[{batch.events}]")
        assert len(events) == batch.count
        out.extend(events)
    return out


def rows(tmp_path: Path) -> list[tuple[int, str, int]]:
    with sqlite3.connect(tmp_path / "outbox.db") as c:
        return c.execute("SELECT seq, kind, priority FROM events ORDER BY seq").fetchall()


def test_the_file_is_wal_with_the_documented_synchronous_level(tmp_path):
    outbox = open_outbox(tmp_path)
    try:
        assert outbox._write.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert outbox._write.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
        assert outbox._write.execute("PRAGMA user_version").fetchone()[0] == 2
    finally:
        outbox.close()
    full = open_outbox(tmp_path, synchronous="full")
    try:
        assert full._write.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        full.close()


def test_events_are_handed_out_by_priority_then_commit_order_with_their_device_id(tmp_path):
    outbox = open_outbox(tmp_path)
    try:
        made = append_all(outbox, [health(0), detection(1), alert(2), health(3), alert(4), detection(5)])
        sent = drain(outbox)
        assert [e["id"] for e in sent] == [made[i].id for i in (2, 4, 1, 5, 0, 3)]
        assert all(e["device"] == "dev-1" for e in sent)
        assert [e["seq"] for e in sent if e["kind"] == "alert"] == sorted(e["seq"] for e in sent if e["kind"] == "alert")
    finally:
        outbox.close()


def test_batches_are_bounded_in_count_and_bytes_and_never_empty(tmp_path):
    outbox = open_outbox(tmp_path)
    try:
        append_all(outbox, (detection(i) for i in range(50)))
        first = outbox.next_batch(20, 1 << 20)
        assert first.count == 20
        small = outbox.next_batch(500, 1200)  # room for a few events only
        assert 1 <= small.count < 30
        assert small.nbytes <= 1200
        body = contract.batch_body("dev-1", new_id(), time.time(), small.events)
        assert len(body) <= small.nbytes
        tiny = outbox.next_batch(500, 10)  # smaller than one event: still one
        assert tiny.count == 1
    finally:
        outbox.close()


def test_rows_leave_only_when_their_batch_is_acked(tmp_path):
    outbox = open_outbox(tmp_path)
    try:
        append_all(outbox, (detection(i) for i in range(10)))
        batch = outbox.next_batch(4, 1 << 20)
        assert outbox.next_batch(4, 1 << 20) is not None  # in flight: not handed out twice
        assert outbox.flush() and outbox.stats()["rows"] == 10, "reading is not deleting"
        append_all(outbox, [detection(99)])  # same priority, after the batch: must survive its ack
        outbox.delete(batch)
        assert outbox.flush()
        assert outbox.stats()["rows"] == 7 and outbox.stats()["deleted"] == 4
        outbox.rewind()  # a restarted sync starts from what is left
        assert [e["payload"]["frame"] for e in drain(outbox)] == [4, 5, 6, 7, 8, 9, 99]
    finally:
        outbox.close()


def test_append_never_waits_for_the_disk_and_counts_what_overflows(tmp_path):
    outbox = open_outbox(tmp_path, handoff=100)
    blocker = sqlite3.connect(tmp_path / "outbox.db", isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # another writer holds the file: the writer thread stalls
        results: list[bool] = []
        appending = threading.Thread(target=lambda: results.extend(outbox.append(detection(i)) for i in range(250)))
        appending.start()
        appending.join(timeout=5)
        assert not appending.is_alive(), "append blocked while the database was locked"
        accepted = sum(results)
        assert 100 <= accepted < 250 and not all(results[100:])
        assert outbox.stats()["dropped"] == 250 - accepted
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    try:
        assert outbox.flush()
        kept = drain(outbox)
        report = [e for e in kept if e["kind"] == "outbox_eviction"]
        assert len(kept) == accepted + len(report)
        assert sum(r["payload"]["rows"] for r in report) == 250 - accepted
        assert {r["payload"]["reason"] for r in report} == {"overflow"}
        assert report[0]["payload"]["by_kind"] == {"detection_summary": 250 - accepted} or len(report) > 1
    finally:
        outbox.close()


def test_a_full_outbox_evicts_lowest_priority_oldest_first_and_reports_it(tmp_path):
    outbox = open_outbox(tmp_path, max_rows=100)
    try:
        made = [health(i) for i in range(30)] + [detection(i) for i in range(80)] + [alert(i) for i in range(30)]
        append_all(outbox, made)
        stats = outbox.stats()
        assert stats["rows"] <= 100
        kept = drain(outbox)
        by_kind = {}
        for e in kept:
            by_kind.setdefault(e["kind"], []).append(e)
        assert "health" not in by_kind, "the lowest priority goes first"
        frames = [e["payload"]["frame"] for e in by_kind["detection_summary"]]
        assert frames == list(range(80 - len(frames), 80)), "then the oldest of the next priority"
        assert len(by_kind["alert"]) == 30, "alerts go last"
        (report,) = by_kind["outbox_eviction"]
        evicted = report["payload"]
        assert evicted["reason"] == "cap" and evicted["rows"] == stats["evicted"] == 30 + (80 - len(frames))
        assert evicted["by_kind"] == {"health": 30, "detection_summary": 80 - len(frames)}
        assert evicted["first_id"] == made[0].id
    finally:
        outbox.close()


def test_when_only_alerts_are_left_the_oldest_alerts_go(tmp_path):
    outbox = open_outbox(tmp_path, max_rows=10)
    try:
        for start in range(0, 40, 5):  # several commits, several evictions
            append_all(outbox, (alert(i) for i in range(start, start + 5)))
        assert outbox.stats()["rows"] <= 10
        kept = drain(outbox)
        alerts = [e["payload"]["n"] for e in kept if e["kind"] == "alert"]
        assert alerts == list(range(40 - len(alerts), 40)) and len(alerts) >= 5
        assert any(e["kind"] == "outbox_eviction" for e in kept), "the last eviction is reported"
    finally:
        outbox.close()


def test_the_byte_cap_counts_every_file_the_outbox_keeps(tmp_path):
    cap = 1 << 20
    outbox = open_outbox(tmp_path, max_bytes=cap)
    largest = 0
    try:
        for start in range(0, 12_000, 1000):
            append_all(outbox, (detection(i) for i in range(start, start + 1000)))
            files = {p.name: p.stat().st_size for p in tmp_path.iterdir() if p.name.startswith("outbox.db")}
            largest = max(largest, sum(files.values()))
        stats = outbox.stats()
        assert stats["evicted"] > 0 and stats["write_errors"] == 0
        assert largest <= cap, f"{largest} bytes on disk against a cap of {cap}: {files}"
        assert set(files) == {"outbox.db", "outbox.db-wal", "outbox.db-shm", "outbox.db-reserve"}
        assert stats["file_bytes"] == sum(files.values())
        with sqlite3.connect(tmp_path / "outbox.db") as c:
            assert c.execute("SELECT sum(size), count(*) FROM events").fetchone() == (stats["bytes"], stats["rows"])
        kept = [e["payload"]["frame"] for e in drain(outbox) if e["kind"] == "detection_summary"]
        assert kept == list(range(12_000 - len(kept), 12_000)), "the oldest went"
    finally:
        outbox.close()


def test_close_commits_what_was_handed_off_and_reopening_keeps_rows_and_order(tmp_path):
    outbox = open_outbox(tmp_path)
    made = [detection(i) for i in range(1000)]
    assert all(outbox.append(e) for e in made)
    outbox.close()  # no flush: close must commit the hand-off
    assert not outbox.append(detection(0)), "a closed outbox accepts nothing"

    again = open_outbox(tmp_path)
    try:
        assert again.stats()["rows"] == 1000
        batch = again.next_batch(1000, 1 << 22)
        again.delete(batch)
        assert again.flush() and again.stats()["rows"] == 0
    finally:
        again.close()

    third = open_outbox(tmp_path)
    try:
        append_all(third, [detection(5000)])
        (seq,) = [r[0] for r in rows(tmp_path)]
        assert seq > 1000, "seq never goes back, even after every row was deleted"
        assert [e["id"] for e in drain(third)] != [made[0].id]
    finally:
        third.close()


def test_listeners_hear_of_each_commit_after_it_happened(tmp_path):
    outbox = open_outbox(tmp_path)
    seen: list[tuple[str, int]] = []

    def listener(events):
        with sqlite3.connect(tmp_path / "outbox.db") as c:  # another connection sees them: committed
            for e in events:
                seen.append((e.id, c.execute("SELECT count(*) FROM events WHERE id = ?", (e.id,)).fetchone()[0]))

    outbox.add_listener(listener)
    try:
        made = append_all(outbox, (detection(i) for i in range(20)))
        assert seen == [(e.id, 1) for e in made]
    finally:
        outbox.close()


def test_an_outbox_from_a_newer_edgecam_is_refused_clearly(tmp_path):
    outbox = open_outbox(tmp_path)
    outbox.close()
    with sqlite3.connect(tmp_path / "outbox.db") as c:
        c.execute("PRAGMA user_version = 99")
    with pytest.raises(OutboxError, match="schema version 99 is newer"):
        open_outbox(tmp_path)


def test_an_unusable_path_is_one_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutboxError, match="cannot open the outbox"):
        Outbox.open(OutboxConfig(path=tmp_path / "file" / "outbox.db"), "dev-1")


def test_the_outbox_config_resolves_its_path_like_other_paths_and_checks_its_limits():
    from edge.config import parse_config
    from edge.core.errors import ConfigError

    base = {"device": {"id": "cam"}, "models": {"m": {"path": "m.tflite"}},
            "cameras": [{"id": "c0", "source": {"kind": "pattern"}, "model": "m"}]}
    cfg = parse_config({**base, "outbox": {"path": "data/outbox.db"}}, base_dir=Path("/etc/edgecam"))
    assert cfg.outbox.path == Path("/etc/edgecam/data/outbox.db") and cfg.mqtt is None
    assert parse_config(base).outbox.path == Path("/var/lib/edgecam/outbox.db")
    with pytest.raises(ConfigError, match=r"outbox.batch_bytes: must be >= \d+"):
        parse_config({**base, "outbox": {"batch_bytes": 100}})
    with pytest.raises(ConfigError, match="outbox.synchronous"):
        parse_config({**base, "outbox": {"synchronous": "off"}})


def test_a_failed_commit_keeps_its_events_and_succeeds_later(tmp_path):
    from edge.core.db import BUSY_TIMEOUT_S

    outbox = open_outbox(tmp_path)
    blocker = sqlite3.connect(tmp_path / "outbox.db", isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # held past the writer's busy timeout: its commit fails
        made = [detection(i) for i in range(100)]
        assert all(outbox.append(e) for e in made)
        wait = time.monotonic() + BUSY_TIMEOUT_S + 5
        while outbox.stats()["write_errors"] == 0 and time.monotonic() < wait:
            time.sleep(0.05)
        assert outbox.stats()["write_errors"] >= 1 and outbox.stats()["rows"] == 0
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    try:
        assert outbox.flush(timeout=15)
        assert [e["id"] for e in drain(outbox)] == [e.id for e in made]
    finally:
        outbox.close()


def test_an_outbox_of_schema_1_is_rekeyed_in_chunks_keeping_rows_and_order(tmp_path, monkeypatch):
    import sqlite_utils

    from edge.core.db import connect, migrate
    from edge.sync import outbox as module

    conn = connect(tmp_path / "outbox.db")
    migrate(conn, module.MIGRATIONS[:1], name="v1")  # a file written by the previous release
    made = [health(0), detection(1), alert(2), detection(3), health(4)]
    db = sqlite_utils.Database(conn)
    for seq, e in enumerate(made, start=1):
        body = contract.event_json(id=e.id, seq=seq, kind=e.kind.value, device="dev-1", camera=e.camera,
                                   captured_at=e.captured_at, recorded_at=e.recorded_at, priority=e.priority,
                                   payload_json=e.payload_json)
        db["events"].insert({"seq": seq, "id": e.id, "kind": e.kind.value, "priority": e.priority,
                             "size": len(body), "body": body})
    db["outbox_state"].update(1, {"last_seq": 5, "rows": 5, "bytes": sum(r["size"] for r in db["events"].rows)})
    conn.close()

    monkeypatch.setattr(module, "UPGRADE_CHUNK", 2)  # several chunks, as for a big file
    outbox = open_outbox(tmp_path)
    try:
        assert outbox._write.execute("PRAGMA user_version").fetchone()[0] == 2
        assert outbox.stats()["rows"] == 5
        assert [e["id"] for e in drain(outbox)] == [made[i].id for i in (2, 1, 3, 0, 4)]
        append_all(outbox, [detection(9)])
        assert max(r[0] for r in rows(tmp_path)) == 6, "seq goes on from the old file's"
    finally:
        outbox.close()
