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
"""

from __future__ import annotations

import functools
import logging
import sqlite3
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import sqlite_utils

from edge.config import OutboxConfig
from edge.core.contract import BATCH_OVERHEAD, MAX_EVENT_BYTES, event_json
from edge.core.db import Migration, SchemaTooNew, connect, migrate, rollback_quietly
from edge.core.errors import EdgeError
from edge.core.ids import ulid_time
from edge.core.logs import fields

from .events import Event, eviction

log = logging.getLogger("edge.outbox")

PRIORITIES = range(10)  # the contract allows 0..9
TXN_MAX_EVENTS = 5000  # events per transaction: big enough to amortise the commit
RETRY_MAX_S = 5.0
MIN_ROW_BYTES = 100  # no stored event is smaller (the envelope alone is bigger)

# Python's sqlite3 releases the GIL around every step, and a thread that gives the GIL
# up while another thread computes may wait a whole switch interval (5 ms) to get it
# back. So the hot paths take few steps, not one per row: inserts bind many rows to one
# statement, and a batch is read, cut at its byte limit and joined in one SELECT.
_INSERT_ROWS = (4096, 512, 64, 8, 1)  # statement sizes, largest first
_COLUMNS = 6

_READ_BATCH = """
SELECT count(*), min(seq), max(seq), coalesce(sum(size), 0), group_concat(body, ',') FROM (
  SELECT seq, size, body,
         sum(size + 1) OVER w AS upto,
         row_number() OVER w AS k
  FROM (SELECT seq, size, body FROM events WHERE priority = ? AND seq > ? ORDER BY seq LIMIT ?)
  WINDOW w AS (ORDER BY seq ROWS UNBOUNDED PRECEDING))
WHERE upto <= ? OR (k = 1 AND ?)
"""

# the oldest rows of one priority that, taken in order, cover what must go
_VICTIMS = """
SELECT count(*), coalesce(sum(size), 0), max(seq) FROM (
  SELECT seq, size,
         row_number() OVER w - 1 AS rows_before,
         sum(size) OVER w - size AS bytes_before
  FROM (SELECT seq, size FROM events WHERE priority = ? ORDER BY seq LIMIT ?)
  WINDOW w AS (ORDER BY seq ROWS UNBOUNDED PRECEDING))
WHERE rows_before < ? OR bytes_before < ?
"""


class OutboxError(EdgeError):
    """The outbox database cannot be opened or is from a newer edgecam."""


@dataclass(frozen=True, slots=True)
class Batch:
    """Events read for one outbox message, and the rows to delete when it is acked."""

    events: str  # the events in contract.event_json form, joined by commas
    count: int
    ranges: tuple[tuple[int, int, int], ...]  # (priority, first seq, last seq), contiguous per priority
    nbytes: int  # size of the batch body, envelope included (an upper bound)


# --- schema ----------------------------------------------------------------------------


def _schema_1(db: sqlite_utils.Database) -> None:
    db["events"].create(
        {"seq": int, "id": str, "kind": str, "priority": int, "size": int, "body": str},
        pk="seq",
        not_null={"id", "kind", "priority", "size", "body"},
    )
    # sending reads it from the top, eviction from the bottom
    db["events"].create_index(["priority", "seq"], index_name="events_by_priority")
    # totals kept in step with the rows, in the same transactions: no count(*) at open
    db["outbox_state"].create({"id": int, "last_seq": int, "rows": int, "bytes": int}, pk="id")
    db["outbox_state"].insert({"id": 1, "last_seq": 0, "rows": 0, "bytes": 0})


MIGRATIONS: tuple[Migration, ...] = (_schema_1,)


# --- the outbox -----------------------------------------------------------------------------


class Outbox:
    """A device's outbox. Open with :meth:`open`; :meth:`close` commits what was handed off."""

    def __init__(self, cfg: OutboxConfig, device_id: str, write: sqlite3.Connection,
                 read: sqlite3.Connection) -> None:
        self.cfg = cfg
        self.device_id = device_id
        self._write = write
        self._read = read
        self._read_lock = threading.Lock()
        self._last_seq, self._rows, self._bytes = write.execute(
            "SELECT last_seq, rows, bytes FROM outbox_state WHERE id = 1").fetchone()
        # never reuse a seq, even after every row was deleted
        self._last_seq = max(self._last_seq, write.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0])

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
            top = write.execute("SELECT max(seq) FROM events WHERE priority = ?", (prio,)).fetchone()[0]
            if top is not None:
                self._tops[prio] = top
        limit = _variable_limit(write)
        self._insert_sizes = tuple(n for n in _INSERT_ROWS if n * _COLUMNS <= limit) or (1,)

        self._counters = dict(committed=0, dropped=0, evicted=0, evicted_bytes=0, deleted=0,
                              commits=0, write_errors=0)
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
            write = connect(path, cfg.synchronous)
            migrate(write, MIGRATIONS, name=str(path))
            read = connect(path, cfg.synchronous)
        except SchemaTooNew as exc:
            raise OutboxError(f"{path}: outbox {exc}") from None
        except sqlite3.Error as exc:
            raise OutboxError(f"{path}: cannot open the outbox: {exc}") from None
        except OSError as exc:
            raise OutboxError(f"{path}: cannot open the outbox: {exc.strerror or exc}") from None
        outbox = cls(cfg, device_id, write, read)
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
                    _READ_BATCH, (prio, after, max_events - count, max_bytes - size, count == 0)).fetchone()
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
        """Counters for the stats line (rows and bytes stored, committed, dropped, evicted, ...)."""
        return {"rows": self._rows, "bytes": self._bytes, "queued": len(self._queue), **self._counters}

    def oldest_recorded_at(self) -> float | None:
        """When the oldest event still waiting for the fleet's ack was made, or None when
        there is none (from its ULID: one index lookup per priority)."""
        with self._read_lock:
            ids = [self._read.execute("SELECT id FROM events WHERE priority = ? ORDER BY seq LIMIT 1",
                                      (prio,)).fetchone() for prio in PRIORITIES]
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
            while len(events) < TXN_MAX_EVENTS and self._queue:
                events.append(self._queue.popleft())
            while self._deletes:
                deletes.append(self._deletes.popleft())
            drops = self._take_drops()
            if events or deletes or drops:
                try:
                    self._commit(events, deletes, drops)
                    events, deletes, retry_s = [], [], 0.1
                except Exception as exc:  # disk full, I/O error, locked too long: keep the events, retry
                    self._counters["write_errors"] += 1
                    self._put_back_drops(drops)
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
        c.execute("BEGIN IMMEDIATE")
        try:
            deleted = 0
            for prio, first, last in deletes:  # first, so acked rows free room before any eviction
                n, size = c.execute("SELECT count(*), coalesce(sum(size), 0) FROM events "
                                    "WHERE priority = ? AND seq BETWEEN ? AND ?", (prio, first, last)).fetchone()
                c.execute("DELETE FROM events WHERE priority = ? AND seq BETWEEN ? AND ?", (prio, first, last))
                deleted, rows_n, bytes_n = deleted + n, rows_n - n, bytes_n - size
            self._insert(c, rows)
            rows_n += len(rows)
            bytes_n += sum(r[4] for r in rows)
            evicted = (0, 0)
            if rows_n > self.cfg.max_rows or bytes_n > self.cfg.max_bytes:
                seq += 1
                record, record_row, evicted = self._evict(c, seq, rows_n, bytes_n)
                rows_n += 1 - evicted[0]
                bytes_n += record_row[4] - evicted[1]
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
            if row[0] > self._tops.get(row[3], 0):
                self._tops[row[3]] = row[0]
        k = self._counters
        k["committed"] += len(added)
        k["deleted"] += deleted
        k["evicted"] += evicted[0]
        k["evicted_bytes"] += evicted[1]
        k["commits"] += 1
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

    def _row(self, seq: int, e: Event) -> tuple[int, str, str, int, int, str]:
        body = event_json(id=e.id, seq=seq, kind=e.kind.value, device=self.device_id, camera=e.camera,
                          captured_at=e.captured_at, recorded_at=e.recorded_at, priority=e.priority,
                          payload_json=e.payload_json)
        return (seq, e.id, e.kind.value, e.priority, len(body), body)  # ASCII: characters are bytes

    def _evict(self, c: sqlite3.Connection, seq: int, rows_n: int, bytes_n: int
               ) -> tuple[Event, tuple, tuple[int, int]]:
        """Delete lowest-priority, oldest rows until under the caps with some headroom, and
        record what went as one ``outbox_eviction`` event (row ``seq``) in the same
        transaction. Returns the event, its row, and (rows, bytes) evicted."""
        cfg = self.cfg
        # headroom: evicting one row per append when full would cost a transaction each
        need_rows = rows_n - (cfg.max_rows - max(1, cfg.max_rows // 100) - 1)
        need_bytes = bytes_n - (cfg.max_bytes - cfg.max_bytes // 100 - MAX_EVENT_BYTES)
        by_kind: dict[str, int] = {}
        first_id = last_id = None
        n = size = 0
        for prio in PRIORITIES:  # lowest first
            still_rows, still_bytes = need_rows - n, need_bytes - size
            if still_rows <= 0 and still_bytes <= 0:
                break
            limit = max(still_rows, still_bytes // MIN_ROW_BYTES + 1)
            count, nbytes, upto = c.execute(_VICTIMS, (prio, limit, still_rows, still_bytes)).fetchone()
            if not count:
                continue
            for kind, k in c.execute("SELECT kind, count(*) FROM events WHERE priority = ? AND seq <= ? "
                                     "GROUP BY kind", (prio, upto)):
                by_kind[kind] = by_kind.get(kind, 0) + k
            if first_id is None:
                first_id = c.execute("SELECT id FROM events WHERE priority = ? ORDER BY seq LIMIT 1",
                                     (prio,)).fetchone()[0]
            last_id = c.execute("SELECT id FROM events WHERE seq = ?", (upto,)).fetchone()[0]
            c.execute("DELETE FROM events WHERE priority = ? AND seq <= ?", (prio, upto))
            n, size = n + count, size + nbytes
        record = eviction("cap", n, size, by_kind, first_id=first_id, last_id=last_id,
                          max_rows=cfg.max_rows, max_bytes=cfg.max_bytes)
        row = self._row(seq, record)
        self._insert(c, [row])
        log.warning("outbox full: evicted", extra=fields(rows=n, bytes=size, by_kind=by_kind))
        return record, row, (n, size)


@functools.lru_cache(maxsize=len(_INSERT_ROWS))
def _insert_sql(rows: int) -> str:
    values = ",".join(["(?, ?, ?, ?, ?, ?)"] * rows)
    return f"INSERT INTO events (seq, id, kind, priority, size, body) VALUES {values}"


def _variable_limit(conn: sqlite3.Connection) -> int:
    """How many ``?`` one statement may have (999 before SQLite 3.32)."""
    getlimit = getattr(conn, "getlimit", None)  # Python 3.11+
    if getlimit is not None:
        return getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    return 32766 if sqlite3.sqlite_version_info >= (3, 32, 0) else 999
