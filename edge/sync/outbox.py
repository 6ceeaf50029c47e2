"""The outbox: metadata events kept in SQLite until the fleet acknowledges them.

Durability (see docs/outbox.md): WAL journal, ``synchronous=NORMAL`` by default. A
commit is in the WAL in the OS's page cache when it returns, so it survives the
process being killed (kill -9, OOM, a crash); a power cut can lose the commits since
the last WAL sync (a checkpoint), never the database itself. ``synchronous=FULL``
syncs the WAL on every commit and survives a power cut too, at one fsync per commit.

Threads. Producers (capture, inference, alerts) call :meth:`Outbox.append`, which only
puts the event in a bounded hand-off and never waits: when the hand-off is full the
event is dropped, counted by kind, and the drop is itself recorded as an event. One
writer thread owns every write: it commits the hand-off in batched transactions,
deletes acknowledged batches and evicts when a cap is passed. The sync thread reads
batches through its own connection (WAL readers do not block the writer).

Order. The writer numbers events (``seq``) in commit order, and the order of sending is
priority (highest first), then ``seq``. Eviction takes the opposite end: lowest
priority, oldest first, so alert audit rows go last.

Disk. ``max_bytes`` bounds the outbox's files together (:class:`DiskBudget`): the
database's pages in use, the WAL (checkpointed and cut back as it grows), its index and
a small reserve file. When a write fails for want of space anyway (something else filled
the disk), the writer gives the reserve back and, until the disk has room again, keeps
the outbox inside the space its files already hold: it evicts by the same order so that
the database file never has to grow, and retries at once. The reserve is the room its
checkpoints need meanwhile; it is taken back, and the full cap with it, once the disk
has room again.
"""

from __future__ import annotations

import functools
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import sqlite_utils

from edge.config import OutboxConfig
from edge.core.contract import BATCH_OVERHEAD, event_json
from edge.core.db import Migration, SchemaTooNew, connect, is_disk_full, migrate, rollback_quietly
from edge.core.errors import EdgeError
from edge.core.ids import ulid_time
from edge.core.logs import fields

from .events import Event, eviction

log = logging.getLogger("edge.outbox")

PRIORITIES = range(10)  # the contract allows 0..9
TXN_MAX_EVENTS = 5000  # events per transaction: big enough to amortise the commit
RETRY_MAX_S = 5.0
MIN_ROW_BYTES = 100  # no stored event is smaller (the envelope alone is bigger)
ROW_OVERHEAD = 300  # bytes a stored event takes beyond its payload (envelope, id, kind, key)
SHM_BYTES = 32 * 1024  # the WAL index beside the database: one region indexes a WAL under 16 MiB
WAL_MIN, WAL_MAX = 128 * 1024, 16 * 1024 * 1024
EVICT_ROUNDS = 4  # eviction re-measures the pages it freed, at most this often per commit
RESERVE_RETRY_S = 5.0  # how often a given-back reserve is tried again

# Python's sqlite3 releases the GIL around every step, and a thread that gives the GIL
# up while another thread computes may wait a whole switch interval (5 ms) to get it
# back. So the hot paths take few steps, not one per row: inserts bind many rows to one
# statement, and a batch is read, cut at its byte limit and joined in one SELECT.
_INSERT_ROWS = (4096, 512, 64, 8, 1)  # statement sizes, largest first
_COLUMNS = 7

# A row's key is priority << SEQ_BITS | seq, so the table itself is in sending order:
# a priority's rows are one range of keys, and deleting its oldest (eviction) or a sent
# batch (an ack) frees whole pages instead of leaving holes in pages shared with others.
SEQ_BITS = 48


def _key(priority: int, seq: int) -> int:
    return priority << SEQ_BITS | seq


_READ_BATCH = """
SELECT count(*), min(seq), max(seq), coalesce(sum(size), 0), group_concat(body, ',') FROM (
  SELECT seq, size, body,
         sum(size + 1) OVER w AS upto,
         row_number() OVER w AS k
  FROM (SELECT seq, size, body FROM events WHERE key > ? AND key < ? ORDER BY key LIMIT ?)
  WINDOW w AS (ORDER BY seq ROWS UNBOUNDED PRECEDING))
WHERE upto <= ? OR (k = 1 AND ?)
"""

# the oldest rows of one priority that, taken in order, cover what must go
_VICTIMS = """
SELECT count(*), coalesce(sum(size), 0), max(seq) FROM (
  SELECT seq, size,
         row_number() OVER w - 1 AS rows_before,
         sum(size) OVER w - size AS bytes_before
  FROM (SELECT seq, size FROM events WHERE key >= ? AND key < ? ORDER BY key LIMIT ?)
  WINDOW w AS (ORDER BY seq ROWS UNBOUNDED PRECEDING))
WHERE rows_before < ? OR bytes_before < ?
"""

_KEYED_TABLE = """CREATE TABLE IF NOT EXISTS events_keyed (
  key INTEGER PRIMARY KEY, seq INTEGER NOT NULL, id TEXT NOT NULL, kind TEXT NOT NULL,
  priority INTEGER NOT NULL, size INTEGER NOT NULL, body TEXT NOT NULL)"""
_MOVE_ROWS = (f"INSERT INTO events_keyed SELECT priority << {SEQ_BITS} | seq, seq, id, kind, priority, size, body "
              "FROM events WHERE seq <= ?")
UPGRADE_CHUNK = 10_000  # rows moved per transaction when an old file is re-keyed


class OutboxError(EdgeError):
    """The outbox database cannot be opened or is from a newer edgecam."""


@dataclass(frozen=True, slots=True)
class Batch:
    """Events read for one outbox message, and the rows to delete when it is acked."""

    events: str  # the events in contract.event_json form, joined by commas
    count: int
    ranges: tuple[tuple[int, int, int], ...]  # (priority, first seq, last seq), contiguous per priority
    nbytes: int  # size of the batch body, envelope included (an upper bound)


@dataclass(frozen=True)
class DiskBudget:
    """How ``outbox.max_bytes`` is shared between the outbox's files.

    The WAL is checkpointed when a quarter of ``wal`` is in it and cut back to half of
    it when it starts over; one transaction (at most ``txn_bytes`` of events) fits in the
    other half. The database file only grows when its pages in use outgrow it, by at most
    one transaction, so the writer keeps the pages in use under ``pages_bytes``. The
    reserve, as large as the WAL's bound, is what a full disk gives back for the
    checkpoints that follow."""

    max_bytes: int
    wal: int
    reserve: int
    txn_bytes: int
    pages_bytes: int
    headroom: int  # evicting this much below the cap spares the next commits an eviction each

    @classmethod
    def of(cls, max_bytes: int) -> "DiskBudget":
        wal = min(WAL_MAX, max(WAL_MIN, max_bytes // 16))
        reserve = wal
        pages = max_bytes - SHM_BYTES - wal - reserve - wal // 2
        return cls(max_bytes, wal, reserve, wal // 8, pages, max(pages // 100, wal // 2))


@dataclass
class _Evicted:
    """What one transaction evicted, for its ``outbox_eviction`` record."""

    rows: int = 0
    bytes: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    first_id: str | None = None
    last_id: str | None = None


# --- schema ----------------------------------------------------------------------------


def _schema_1(db: sqlite_utils.Database) -> None:
    db["events"].create(
        {"seq": int, "id": str, "kind": str, "priority": int, "size": int, "body": str},
        pk="seq",
        not_null={"id", "kind", "priority", "size", "body"},
    )
    db["events"].create_index(["priority", "seq"], index_name="events_by_priority")
    # totals kept in step with the rows, in the same transactions: no count(*) at open
    db["outbox_state"].create({"id": int, "last_seq": int, "rows": int, "bytes": int}, pk="id")
    db["outbox_state"].insert({"id": 1, "last_seq": 0, "rows": 0, "bytes": 0})


def _schema_2(db: sqlite_utils.Database) -> None:
    """Rows keyed by priority, then seq (see SEQ_BITS); the index is the table now."""
    c = db.conn
    c.execute(_KEYED_TABLE)
    c.execute(_MOVE_ROWS, (1 << SEQ_BITS,))  # what _move_in_chunks left, if anything
    c.execute("DROP TABLE events")
    c.execute("ALTER TABLE events_keyed RENAME TO events")


MIGRATIONS: tuple[Migration, ...] = (_schema_1, _schema_2)


def _move_in_chunks(conn: sqlite3.Connection) -> None:
    """Before step 2 on a file of schema 1: move its rows to the keyed table a chunk per
    transaction, so a big outbox is never held twice nor copied into one huge WAL."""
    if conn.execute("PRAGMA user_version").fetchone()[0] != 1:
        return
    conn.execute(_KEYED_TABLE)
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            upto = conn.execute("SELECT max(seq) FROM (SELECT seq FROM events ORDER BY seq LIMIT ?)",
                                (UPGRADE_CHUNK,)).fetchone()[0]
            if upto is not None:
                conn.execute(_MOVE_ROWS, (upto,))
                conn.execute("DELETE FROM events WHERE seq <= ?", (upto,))
            conn.execute("COMMIT")
        except BaseException:
            rollback_quietly(conn)
            raise
        if upto is None:
            return


# --- the outbox -----------------------------------------------------------------------------


class Outbox:
    """A device's outbox. Open with :meth:`open`; :meth:`close` commits what was handed off."""

    def __init__(self, cfg: OutboxConfig, device_id: str, write: sqlite3.Connection,
                 read: sqlite3.Connection) -> None:
        self.cfg = cfg
        self.device_id = device_id
        self.budget = DiskBudget.of(cfg.max_bytes)
        self._path = Path(cfg.path)
        self._reserve = self._path.with_name(self._path.name + "-reserve")
        self._reserve_at = 0.0  # time.monotonic() of the next try to take the reserve back
        self._short: int | None = None  # while the disk is full: the most its pages in use may take
        self._page_size = write.execute("PRAGMA page_size").fetchone()[0]
        self._write = write
        self._read = read
        self._read_lock = threading.Lock()
        self._last_seq, self._rows, self._bytes = write.execute(
            "SELECT last_seq, rows, bytes FROM outbox_state WHERE id = 1").fetchone()

        self._queue: deque[Event] = deque()  # the hand-off; bounded by the check in append
        self._deletes: deque[tuple[int, int, int]] = deque()
        self._drops: dict[str, list[int]] = {}  # kind -> [events, payload bytes] not yet reported
        self._drops_lock = threading.Lock()
        self._listeners: list[Callable[[Sequence[Event]], None]] = []
        self._cursor: dict[int, int] = {}  # priority -> last seq handed to sync
        self._read_at_commit = -1  # commit count when a read last found nothing new
        # priority -> highest seq committed, so a read skips priorities with nothing new
        self._tops: dict[int, int] = {}
        for prio in PRIORITIES:
            top = write.execute("SELECT max(seq) FROM events WHERE key >= ? AND key < ?",
                                (_key(prio, 0), _key(prio + 1, 0))).fetchone()[0]
            if top is not None:
                self._tops[prio] = top
        # never reuse a seq, even after every row was deleted
        self._last_seq = max(self._last_seq, *self._tops.values(), 0)
        limit = _variable_limit(write)
        self._insert_sizes = tuple(n for n in _INSERT_ROWS if n * _COLUMNS <= limit) or (1,)

        self._counters = dict(committed=0, dropped=0, evicted=0, evicted_bytes=0, deleted=0,
                              commits=0, write_errors=0, disk_full=0, disk_full_evicted=0)
        self._holding = False  # the writer holds events it took from the queue, not yet committed
        self._closing = False
        self._wake = threading.Event()
        self._writer = threading.Thread(target=self._run, name="outbox-writer", daemon=True)

    @classmethod
    def open(cls, cfg: OutboxConfig, device_id: str) -> "Outbox":
        """Open (creating or migrating) the outbox at ``cfg.path`` and start its writer."""
        path = Path(cfg.path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            wal = DiskBudget.of(cfg.max_bytes).wal
            write = connect(path, cfg.synchronous, wal_bytes=wal)
            _move_in_chunks(write)
            migrate(write, MIGRATIONS, name=str(path))
            read = connect(path, cfg.synchronous, wal_bytes=wal)
        except SchemaTooNew as exc:
            raise OutboxError(f"{path}: outbox {exc}") from None
        except sqlite3.Error as exc:
            raise OutboxError(f"{path}: cannot open the outbox: {exc}") from None
        except OSError as exc:
            raise OutboxError(f"{path}: cannot open the outbox: {exc.strerror or exc}") from None
        outbox = cls(cfg, device_id, write, read)
        outbox._take_reserve()
        outbox._writer.start()
        log.info("outbox open", extra=fields(path=str(path), rows=outbox._rows, bytes=outbox._bytes,
                                             synchronous=cfg.synchronous))
        return outbox

    # --- producers ---------------------------------------------------------------------

    def append(self, event: Event) -> bool:
        """Hand ``event`` to the writer without waiting. False (and counted) when the
        hand-off is full or the outbox is closed."""
        if self._closing or len(self._queue) >= self.cfg.handoff:
            self._count_drop(event)
            return False
        self._queue.append(event)
        return True

    def _count_drop(self, event: Event) -> None:
        with self._drops_lock:
            entry = self._drops.setdefault(event.kind.value, [0, 0])
            entry[0] += 1
            entry[1] += len(event.payload_json)
            self._counters["dropped"] += 1

    def add_listener(self, listener: Callable[[Sequence[Event]], None]) -> None:
        """Call ``listener(events)`` on the writer thread after each commit that added events."""
        self._listeners.append(listener)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything appended and deleted so far is committed; False on timeout."""
        deadline = time.monotonic() + timeout
        self._wake.set()
        # queues first, then holding: the writer sets holding before it takes from them
        while self._queue or self._deletes or self._holding:
            if time.monotonic() > deadline or not self._writer.is_alive():
                return False
            time.sleep(0.005)
        return True

    # --- the sync side -----------------------------------------------------------------

    def next_batch(self, max_events: int, max_bytes: int) -> Batch | None:
        """The next events not yet handed out (priority, then seq), at most ``max_events``
        and ``max_bytes`` (but at least one event), or None. Marks them in flight:
        they are not handed out again until :meth:`rewind`."""
        commits = self._counters["commits"]
        if commits == self._read_at_commit:
            return None  # nothing committed since the last empty read
        parts: list[str] = []
        ranges: list[tuple[int, int, int]] = []
        count, size = 0, BATCH_OVERHEAD
        with self._read_lock:
            for prio in reversed(PRIORITIES):  # not the dict itself: the writer may add a key
                after = self._cursor.get(prio, 0)
                if self._tops.get(prio, 0) <= after:
                    continue
                if count >= max_events or (count and size >= max_bytes):
                    break
                n, first, last, nbytes, joined = self._read.execute(
                    _READ_BATCH, (_key(prio, after), _key(prio + 1, 0), max_events - count, max_bytes - size,
                                  count == 0)).fetchone()
                if n:
                    parts.append(joined)
                    ranges.append((prio, first, last))
                    self._cursor[prio] = last
                    count, size = count + n, size + nbytes + n
        if not count:
            self._read_at_commit = commits
            return None
        return Batch(",".join(parts), count, tuple(ranges), size)

    def delete(self, batch: Batch) -> None:
        """Delete a batch's rows: the fleet acknowledged it. Committed by the writer shortly."""
        self._deletes.extend(batch.ranges)
        self._wake.set()

    def rewind(self) -> None:
        """Forget what was handed out: rows not yet deleted are read again from the start."""
        with self._read_lock:
            self._cursor.clear()
            self._read_at_commit = -1

    # --- state -----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters for the stats line (rows and bytes stored, committed, dropped, evicted, ...);
        ``file_bytes`` is what the outbox's files take on disk, within ``max_bytes``;
        ``disk_full_now`` says it lives within the space it holds until the disk has room."""
        return {"rows": self._rows, "bytes": self._bytes, "file_bytes": self.file_bytes(),
                "disk_full_now": self._short is not None, "queued": len(self._queue), **self._counters}

    def file_bytes(self) -> int:
        """The size of the database, its WAL, the WAL index and the reserve together."""
        total = 0
        for suffix in ("", "-wal", "-shm", "-reserve"):
            try:
                total += os.stat(f"{self._path}{suffix}").st_size
            except OSError:
                pass
        return total

    def oldest_recorded_at(self) -> float | None:
        """When the oldest event still waiting for the fleet's ack was made, or None when
        there is none (from its ULID: the first key of each priority's range)."""
        with self._read_lock:
            ids = [self._read.execute("SELECT id FROM events WHERE key >= ? AND key < ? ORDER BY key LIMIT 1",
                                      (_key(prio, 0), _key(prio + 1, 0))).fetchone() for prio in PRIORITIES]
        return min((ulid_time(row[0]) for row in ids if row is not None), default=None)

    @property
    def commits(self) -> int:
        """Transactions committed so far; grows whenever rows change."""
        return self._counters["commits"]

    def close(self, timeout: float = 5.0) -> None:
        """Commit what was handed off (within ``timeout``), stop the writer, close the files."""
        if self._closing and not self._writer.is_alive():
            return
        self._closing = True
        self._wake.set()
        if self._writer.is_alive():
            self._writer.join(timeout)
        if self._writer.is_alive():
            log.error("outbox writer did not stop; events still queued are lost",
                      extra=fields(queued=len(self._queue)))
            return  # its connection is still in use; the process is going away anyway
        with self._read_lock:
            self._read.close()
        self._write.close()
        log.info("outbox closed", extra=fields(rows=self._rows, bytes=self._bytes))

    # --- the writer ----------------------------------------------------------------------------

    def _run(self) -> None:
        events: list[Event] = []
        deletes: list[tuple[int, int, int]] = []
        retry_s = 0.1
        while True:
            closing = self._closing  # read before taking, so the last round sees every append
            self._holding = True
            self._take(events)
            while self._deletes:
                deletes.append(self._deletes.popleft())
            drops = self._take_drops()
            if events or deletes or drops:
                try:
                    self._commit(events, deletes, drops)
                    events, deletes, retry_s = [], [], 0.1
                    self._after_commit()
                except Exception as exc:  # disk full, I/O error, locked too long: keep the events, retry
                    self._counters["write_errors"] += 1
                    self._put_back_drops(drops)
                    full = isinstance(exc, sqlite3.Error) and is_disk_full(exc)
                    if full and not closing and self._make_room(deletes):
                        deletes = []  # committed with the room made
                        continue  # and the events at once
                    log.error("outbox commit failed; retrying", exc_info=not isinstance(exc, sqlite3.Error),
                              extra=fields(error=str(exc), events=len(events), retry_s=retry_s))
                    if closing:
                        log.error("outbox closing with uncommitted events", extra=fields(events=len(events)))
                        break
                    time.sleep(retry_s)
                    retry_s = min(RETRY_MAX_S, retry_s * 2)
                    continue
            if not self._queue:
                self._holding = False
                if closing:
                    break
                self._wake.wait(self.cfg.commit_interval_s)
                self._wake.clear()
        self._holding = False

    def _take(self, events: list[Event]) -> None:
        """Move events from the hand-off into ``events``, up to one transaction's worth."""
        room = self.budget.txn_bytes - sum(len(e.payload_json) + ROW_OVERHEAD for e in events)
        while len(events) < TXN_MAX_EVENTS and self._queue and (room > 0 or not events):
            event = self._queue.popleft()
            events.append(event)
            room -= len(event.payload_json) + ROW_OVERHEAD

    def _take_drops(self) -> dict[str, list[int]]:
        with self._drops_lock:
            drops, self._drops = self._drops, {}
        return drops

    def _put_back_drops(self, drops: dict[str, list[int]]) -> None:
        with self._drops_lock:
            for kind, (n, size) in drops.items():
                entry = self._drops.setdefault(kind, [0, 0])
                entry[0] += n
                entry[1] += size

    def _commit(self, events: list[Event], deletes: list[tuple[int, int, int]],
                drops: dict[str, list[int]]) -> None:
        """Insert, delete and evict in one transaction."""
        added = list(events)
        if drops:
            added.append(eviction("overflow", sum(n for n, _ in drops.values()),
                                  sum(b for _, b in drops.values()),
                                  {kind: n for kind, (n, _) in drops.items()}))
        seq, rows_n, bytes_n = self._last_seq, self._rows, self._bytes
        rows = []
        for event in added:
            seq += 1
            rows.append(self._row(seq, event))
        c = self._write
        evicted = _Evicted()
        c.execute("BEGIN IMMEDIATE")
        try:
            deleted = 0
            for prio, first, last in deletes:  # first, so acked rows free room before any eviction
                keys = (_key(prio, first), _key(prio, last))
                n, size = c.execute("SELECT count(*), coalesce(sum(size), 0) FROM events "
                                    "WHERE key BETWEEN ? AND ?", keys).fetchone()
                c.execute("DELETE FROM events WHERE key BETWEEN ? AND ?", keys)
                deleted, rows_n, bytes_n = deleted + n, rows_n - n, bytes_n - size
            self._insert(c, rows)
            rows_n += len(rows)
            bytes_n += sum(r[5] for r in rows)
            for _ in range(EVICT_ROUNDS):  # pages freed are measured, not assumed
                need_rows, need_bytes = self._excess(c, rows_n - evicted.rows, bytes_n - evicted.bytes)
                if (need_rows <= 0 and need_bytes <= 0) or not self._evict(c, need_rows, need_bytes, evicted):
                    break
            reason = "cap" if self._short is None else "disk_full"
            if evicted.rows:
                seq += 1
                record = eviction(reason, evicted.rows, evicted.bytes, evicted.by_kind,
                                  first_id=evicted.first_id, last_id=evicted.last_id,
                                  max_rows=self.cfg.max_rows, max_bytes=self.cfg.max_bytes)
                record_row = self._row(seq, record)
                self._insert(c, [record_row])
                rows_n += 1 - evicted.rows
                bytes_n += record_row[5] - evicted.bytes
                added.append(record)
                rows.append(record_row)
            c.execute("UPDATE outbox_state SET last_seq = ?, rows = ?, bytes = ? WHERE id = 1",
                      (seq, rows_n, bytes_n))
            c.execute("COMMIT")
        except BaseException:
            rollback_quietly(c)
            raise
        self._last_seq, self._rows, self._bytes = seq, rows_n, bytes_n
        for row in rows:
            if row[1] > self._tops.get(row[4], 0):
                self._tops[row[4]] = row[1]
        k = self._counters
        k["committed"] += len(added)
        k["deleted"] += deleted
        k["evicted"] += evicted.rows
        k["evicted_bytes"] += evicted.bytes
        k["disk_full_evicted"] += evicted.rows if reason == "disk_full" else 0
        k["commits"] += 1
        if evicted.rows:
            log.warning("outbox full: evicted", extra=fields(
                reason=reason, rows=evicted.rows, bytes=evicted.bytes,
                by_kind=evicted.by_kind))
        for listener in self._listeners:
            try:
                listener(added)
            except Exception:  # a listener's bug must not stop the writer
                log.exception("outbox listener failed")

    def _insert(self, c: sqlite3.Connection, rows: list[tuple]) -> None:
        done = 0
        for size in self._insert_sizes:
            while len(rows) - done >= size:
                params = [value for row in rows[done:done + size] for value in row]
                c.execute(_insert_sql(size), params)
                done += size

    def _row(self, seq: int, e: Event) -> tuple[int, int, str, str, int, int, str]:
        body = event_json(id=e.id, seq=seq, kind=e.kind.value, device=self.device_id, camera=e.camera,
                          captured_at=e.captured_at, recorded_at=e.recorded_at, priority=e.priority,
                          payload_json=e.payload_json)
        # ASCII: characters are bytes
        return (_key(e.priority, seq), seq, e.id, e.kind.value, e.priority, len(body), body)

    # --- caps and disk space ----------------------------------------------------------------

    def _excess(self, c: sqlite3.Connection, rows_n: int, bytes_n: int) -> tuple[int, int]:
        """(rows, event bytes) to evict to get back under both caps with some headroom
        (evicting one row per append when full would cost a transaction each)."""
        cfg, budget = self.cfg, self.budget
        rows = rows_n - (cfg.max_rows - max(1, cfg.max_rows // 100) - 1) if rows_n > cfg.max_rows else 0
        cap, headroom = budget.pages_bytes, budget.headroom
        if self._short is not None:  # the disk is full: small steps, each one's WAL must fit too
            cap, headroom = min(cap, self._short), 2 * budget.txn_bytes
        used = self._pages_in_use(c)
        if used <= cap or not bytes_n:
            return rows, 0
        over = used - (cap - headroom)
        return rows, max(MIN_ROW_BYTES, over * bytes_n // used)  # pages to event bytes at today's ratio

    def _pages_in_use(self, c: sqlite3.Connection) -> int:
        pages, free = (c.execute(f"PRAGMA {name}").fetchone()[0] for name in ("page_count", "freelist_count"))
        return (pages - free) * self._page_size

    def _evict(self, c: sqlite3.Connection, need_rows: int, need_bytes: int, out: _Evicted) -> bool:
        """Delete lowest-priority, oldest rows until ``need_rows`` and ``need_bytes`` are
        covered, adding them to ``out``; False if there was nothing left to delete."""
        n = size = 0
        for prio in PRIORITIES:  # lowest first
            still_rows, still_bytes = need_rows - n, need_bytes - size
            if still_rows <= 0 and still_bytes <= 0:
                break
            limit = max(still_rows, still_bytes // MIN_ROW_BYTES + 1)
            count, nbytes, upto = c.execute(_VICTIMS, (_key(prio, 0), _key(prio + 1, 0), limit, still_rows,
                                                       still_bytes)).fetchone()
            if not count:
                continue
            victims = (_key(prio, 0), _key(prio, upto))
            for kind, k in c.execute("SELECT kind, count(*) FROM events WHERE key BETWEEN ? AND ? GROUP BY kind",
                                     victims):
                out.by_kind[kind] = out.by_kind.get(kind, 0) + k
            if out.first_id is None:
                out.first_id = c.execute("SELECT id FROM events WHERE key >= ? ORDER BY key LIMIT 1",
                                         victims[:1]).fetchone()[0]
            out.last_id = c.execute("SELECT id FROM events WHERE key = ?", victims[1:]).fetchone()[0]
            c.execute("DELETE FROM events WHERE key BETWEEN ? AND ?", victims)
            n, size = n + count, size + nbytes
        out.rows += n
        out.bytes += size
        return n > 0

    def _make_room(self, deletes: list[tuple[int, int, int]]) -> bool:
        """After a write failed for want of space: give the reserve back, cap the pages in
        use below what the database file holds (two transactions' worth lower on each
        failure, never below that), evict down to it in a transaction with the acked rows'
        deletes, and checkpoint. True if that transaction went through: try again at once."""
        self._counters["disk_full"] += 1
        c, step = self._write, 2 * self.budget.txn_bytes
        if self._short is None:
            held = c.execute("PRAGMA page_count").fetchone()[0] * self._page_size
            self._short = max(step, min(self.budget.pages_bytes, held) - step)
            self._give_back_reserve()
            log.warning("outbox: the disk is full; living within the space the outbox holds until it has room",
                        extra=fields(path=str(self._path), pages_bytes=self._short))
        elif self._short > step:
            self._short = max(step, self._short - step)
        else:
            return False  # nothing more to give: wait for space
        try:
            self._commit([], deletes, {})
            c.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()
        except sqlite3.Error as exc:
            log.error("outbox: no room could be made", extra=fields(error=str(exc)))
            return False
        return True

    def _after_commit(self) -> None:
        """Keep the WAL inside its bound, and take the reserve back once the disk has room."""
        try:
            wal = os.stat(f"{self._path}-wal").st_size
        except OSError:
            wal = 0
        if wal > self.budget.wal // 2:  # a reader held the last checkpoint back: make the WAL start over
            try:
                self._write.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()
            except sqlite3.Error as exc:  # the next commit tries again
                log.warning("outbox checkpoint failed", extra=fields(error=str(exc), wal_bytes=wal))
        if not self._reserve.exists() and time.monotonic() >= self._reserve_at and self._take_reserve():
            if self._short is not None:
                self._short = None
                log.info("outbox: the disk has room again; full cap restored", extra=fields(path=str(self._path)))

    def _take_reserve(self) -> bool:
        """Allocate the reserve file if the disk has room for it (and as much again)."""
        self._reserve_at = time.monotonic() + RESERVE_RETRY_S
        size = self.budget.reserve
        try:
            disk = os.statvfs(self._path.parent)
            if disk.f_bavail * disk.f_frsize < 2 * size:
                return False
            fd = os.open(self._reserve, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, size)
                os.ftruncate(fd, size)  # a smaller budget than last time
            finally:
                os.close(fd)
        except OSError as exc:
            self._give_back_reserve()
            log.info("outbox reserve not taken", extra=fields(path=str(self._reserve), error=str(exc)))
            return False
        return True

    def _give_back_reserve(self) -> None:
        self._reserve.unlink(missing_ok=True)


@functools.lru_cache(maxsize=len(_INSERT_ROWS))
def _insert_sql(rows: int) -> str:
    values = ",".join(["(?, ?, ?, ?, ?, ?, ?)"] * rows)
    return f"INSERT INTO events (key, seq, id, kind, priority, size, body) VALUES {values}"


def _variable_limit(conn: sqlite3.Connection) -> int:
    """How many ``?`` one statement may have (999 before SQLite 3.32)."""
    getlimit = getattr(conn, "getlimit", None)  # Python 3.11+
    if getlimit is not None:
        return getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    return 32766 if sqlite3.sqlite_version_info >= (3, 32, 0) else 999
