"""The outbox on a small real filesystem (a tmpfs the test mounts with a size limit):
its files stay inside ``max_bytes``, WAL included, and a disk filled by something else
costs the least important rows, never the process, and is forgotten once space returns."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from broker import wait_until

from edge.config import OutboxConfig
from edge.sync import events as E
from edge.sync import outbox as outbox_module
from edge.sync.outbox import Outbox


@pytest.fixture
def small_disk(tmp_path):
    """Mount a tmpfs of the size asked for; skip where mounting is not allowed."""
    mounted: list[Path] = []

    def make(size: str) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        if os.geteuid() != 0:
            pytest.skip("needs root to mount a size-limited tmpfs for the disk-full tests")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(where)
        return where

    yield make
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def event(i: int) -> E.Event:
    """Mostly detections, a health snapshot in ten, an alert audit row in fifty."""
    if i % 50 == 0:
        return E.alert_audit("c0", time.time(), "r1", "edgecam/v1/alerts/s/l/c0", True, n=i)
    if i % 10 == 0:
        return E.health_snapshot("c0", {"n": i})
    return E.detection_summary("c0", time.time(), "m", [{"label": "part", "score": 0.7, "box": [1, 2, 3, 4]}], frame=i)


class Load:
    """A producer appending at ``rate`` (as capture and inference would) and a sampler
    of what the outbox's files take on disk, both until :meth:`stop`."""

    def __init__(self, outbox: Outbox, directory: Path, rate: float) -> None:
        self.outbox, self.directory, self.rate = outbox, directory, rate
        self.made = self.refused = 0
        self.alerts: list[str] = []
        self.largest = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._produce, daemon=True),
                         threading.Thread(target=self._sample, daemon=True)]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)

    def _produce(self) -> None:
        start = time.monotonic()
        while not self._stop.wait(max(0.0, start + self.made / self.rate - time.monotonic())):
            e = event(self.made)
            if self.outbox.append(e):
                if e.kind.value == "alert":
                    self.alerts.append(e.id)
            else:
                self.refused += 1
            self.made += 1

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            total = 0
            for p in self.directory.iterdir():
                if p.name.startswith("outbox.db"):
                    try:
                        total += p.stat().st_size
                    except FileNotFoundError:  # the WAL index between two checkpoints
                        pass
            self.largest = max(self.largest, total)


def close(outbox: Outbox) -> tuple[dict, list[dict]]:
    """The outbox's counters and the events it holds, as it closes."""
    assert outbox.flush()
    stats = outbox.stats()
    with outbox._read_lock:
        kept = [json.loads(body) for (body,) in outbox._read.execute("SELECT body FROM events ORDER BY key")]
    outbox.close()
    return stats, kept


def test_on_a_5_mb_disk_a_1_mib_outbox_stays_inside_its_cap_wal_included(small_disk):
    disk = small_disk("5m")
    cap = 1 << 20
    outbox = Outbox.open(OutboxConfig(path=disk / "outbox.db", max_bytes=cap), "cam")
    load = Load(outbox, disk, rate=4000)
    try:
        wait_until(lambda: outbox.stats()["evicted"] > 5 * outbox.stats()["rows"], 60,
                   "the cap to be passed many times")
    finally:
        load.stop()
        stats, kept = close(outbox)
    assert stats["write_errors"] == 0 and load.refused == 0
    assert load.largest <= cap, f"the outbox's files took {load.largest} bytes against a cap of {cap}"
    assert set(load.alerts) <= {e["id"] for e in kept}, "an alert audit row went while others were left"


def test_a_disk_filled_by_something_else_costs_the_least_important_rows_and_then_is_forgotten(
        small_disk, monkeypatch):
    monkeypatch.setattr(outbox_module, "RESERVE_RETRY_S", 0.2)  # how soon space that returns is noticed
    disk = small_disk("3m")
    cap = 2 << 20
    outbox = Outbox.open(OutboxConfig(path=disk / "outbox.db", max_bytes=cap), "cam")
    load = Load(outbox, disk, rate=2000)
    filler = disk / "filler"
    try:
        wait_until(lambda: outbox.stats()["rows"] > 2000, 30, "a backlog")
        with open(filler, "wb") as f:  # another program fills what is left of the disk
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        wait_until(lambda: outbox.stats()["disk_full"] >= 1, 30, "a write that finds the disk full")
        committed = outbox.stats()["committed"]
        wait_until(lambda: outbox.stats()["committed"] > committed + 4000, 30,
                   "commits to go on while the disk stays full")
        full = outbox.stats()
        assert full["disk_full_evicted"] > 0

        filler.unlink()  # space returns
        assert full["disk_full_now"]
        wait_until(lambda: (disk / "outbox.db-reserve").exists() and not outbox.stats()["disk_full_now"], 30,
                   "the outbox to notice the space is back")
        rows_then = outbox.stats()["rows"]
        wait_until(lambda: outbox.stats()["rows"] > rows_then + 2000, 30, "the outbox to grow again")
    finally:
        load.stop()
        stats, kept = close(outbox)

    assert load.refused == 0, "the hand-off never overflowed: the writer kept committing"
    assert stats["disk_full"] == full["disk_full"], "no more failed writes once space returned"
    assert load.largest <= cap, f"the outbox's files took {load.largest} bytes against a cap of {cap}"
    reports = [e["payload"] for e in kept if e["kind"] == "outbox_eviction"]
    assert any(r["reason"] == "disk_full" for r in reports)
    assert all(set(r["by_kind"]) <= {"health", "detection_summary"} for r in reports), reports
    assert set(load.alerts) <= {e["id"] for e in kept}, "alerts are the last to go"
    for kind, key, is_kind in (("detection_summary", "frame", lambda i: i % 10 != 0),
                               ("health", "n", lambda i: i % 10 == 0 and i % 50 != 0)):
        left = sorted(e["payload"][key] for e in kept if e["kind"] == kind)
        if kind == "health" and not left:  # the least important kind may go whole before the cap is met
            continue
        assert left == [i for i in range(left[0], load.made) if is_kind(i)], f"{kind}: the oldest go first"
