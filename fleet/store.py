"""The fleet's SQLite store: events keyed by event id, and the device registry.

Events are inserted with ``INSERT OR IGNORE`` on their id, so a batch that arrives
twice (a re-send, a device restarted mid-batch) stores nothing the second time. The
store runs with ``synchronous=FULL``: an ack tells the device to delete its rows, so
what the fleet acked must survive even a power cut of the fleet's machine.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils
from pydantic_core import to_json

from edge.contract import MAX_PAYLOAD_BYTES, ContractError, OutboxBatch, Status
from edge.db import Migration, SchemaTooNew, connect, migrate, rollback_quietly
from edge.errors import EdgeError


class StoreError(EdgeError):
    """The fleet store cannot be opened or read."""


def _schema_1(db: sqlite_utils.Database) -> None:
    db["events"].create(
        {"id": str, "device": str, "seq": int, "kind": str, "camera": str, "captured_at": float,
         "recorded_at": float, "priority": int, "payload": str, "batch": str, "received_at": float},
        not_null={"id", "device", "seq", "kind", "captured_at", "recorded_at", "priority", "payload",
                  "batch", "received_at"},
    )
    db["events"].create_index(["id"], index_name="events_by_id", unique=True)
    db["events"].create_index(["device", "id"], index_name="events_by_device")
    db["events"].create_index(["kind", "id"], index_name="events_by_kind")
    db["devices"].create(
        {"id": str, "state": str, "site": str, "line": str, "runtime": str, "models": str,
         "status_at": float, "first_seen": float, "last_seen": float, "events": int},
        pk="id", not_null={"first_seen", "last_seen", "events"}, defaults={"events": 0},
    )


MIGRATIONS: tuple[Migration, ...] = (_schema_1,)

EVENT_COLUMNS = ("id", "device", "seq", "kind", "camera", "captured_at", "recorded_at", "priority",
                 "payload", "received_at")
DEVICE_COLUMNS = ("id", "state", "site", "line", "runtime", "models", "status_at", "first_seen",
                  "last_seen", "events")


@dataclass(frozen=True)
class Stored:
    """What one batch did to the store."""

    inserted: int
    duplicates: int


class Store:
    """The fleet store. One writer (the ingest); readers open it read-only."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self.path = path
        self._conn = conn
        self._lock = threading.Lock()  # the connection is used by the ingest thread and readers

    @classmethod
    def open(cls, path: str | Path) -> "Store":
        """Open (creating or migrating) the store for writing."""
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = connect(path, "full")
            migrate(conn, MIGRATIONS, name=str(path))
        except SchemaTooNew as exc:
            raise StoreError(f"{path}: fleet store {exc}") from None
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"{path}: cannot open the fleet store: {exc}") from None
        return cls(conn, path)

    @classmethod
    def open_readonly(cls, path: str | Path) -> "Store":
        """Open an existing store for reading (``fleet events``, ``fleet devices``)."""
        path = Path(path)
        if not path.is_file():
            raise StoreError(f"{path}: no fleet store here (`fleet serve --db {path}` creates it)")
        try:
            conn = connect(path, readonly=True)
            conn.execute("SELECT 1 FROM events LIMIT 1").fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"{path}: not a fleet store: {exc}") from None
        return cls(conn, path)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # --- writes (the ingest) -------------------------------------------------------------

    def add_batch(self, batch: OutboxBatch, received_at: float) -> Stored:
        """Store a batch's events in one transaction; events already stored are skipped.
        Raises ContractError("oversized") for a payload over the limit (nothing stored)."""
        rows = []
        for i, e in enumerate(batch.events):
            payload = to_json(e.payload)  # compact; pydantic's encoder is several times faster than json's
            if len(payload) > MAX_PAYLOAD_BYTES:
                raise ContractError("oversized", f"events[{i}].payload: {len(payload)} bytes > {MAX_PAYLOAD_BYTES}")
            rows.append((e.id, batch.device, e.seq, e.kind, e.camera, e.captured_at, e.recorded_at,
                         e.priority, payload.decode(), batch.batch, received_at))
        with self._lock:
            c = self._conn
            c.execute("BEGIN IMMEDIATE")
            try:
                cur = c.executemany(
                    "INSERT OR IGNORE INTO events (id, device, seq, kind, camera, captured_at, recorded_at,"
                    " priority, payload, batch, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
                inserted = cur.rowcount
                c.execute(
                    "INSERT INTO devices (id, first_seen, last_seen, events) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (id) DO UPDATE SET last_seen = excluded.last_seen, "
                    "events = devices.events + excluded.events",
                    (batch.device, received_at, received_at, inserted))
                c.execute("COMMIT")
            except BaseException:
                rollback_quietly(c)
                raise
        return Stored(inserted, len(rows) - inserted)

    def set_status(self, status: Status, received_at: float) -> None:
        """Record a device's status (online, or offline by its will or its goodbye)."""
        with self._lock:
            c = self._conn
            c.execute("BEGIN IMMEDIATE")
            try:
                c.execute(
                    "INSERT INTO devices (id, state, site, line, runtime, models, status_at, first_seen,"
                    " last_seen, events) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0) "
                    "ON CONFLICT (id) DO UPDATE SET state = excluded.state, site = excluded.site,"
                    " line = excluded.line, runtime = excluded.runtime, models = excluded.models,"
                    " status_at = excluded.status_at, last_seen = excluded.last_seen",
                    (status.device, status.state, status.site, status.line, status.runtime,
                     json.dumps(status.models), status.at, received_at, received_at))
                c.execute("COMMIT")
            except BaseException:
                rollback_quietly(c)
                raise

    # --- reads -----------------------------------------------------------------------------

    def events(self, *, device: str | None = None, kind: str | None = None, limit: int = 20,
               after_rowid: int | None = None) -> list[dict[str, Any]]:
        """The newest ``limit`` events (by id), oldest first; or, with ``after_rowid``, the
        events stored after that row, in the order they arrived."""
        where, args = [], []
        if device:
            where.append("device = ?")
            args.append(device)
        if kind:
            where.append("kind = ?")
            args.append(kind)
        if after_rowid is not None:
            where.append("rowid > ?")
            args.append(after_rowid)
        sql = f"SELECT rowid, {', '.join(EVENT_COLUMNS)} FROM events"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY rowid LIMIT ?" if after_rowid is not None else " ORDER BY id DESC LIMIT ?"
        with self._lock:
            rows = self._conn.execute(sql, (*args, limit)).fetchall()
        if after_rowid is None:
            rows.reverse()
        return [_event_row(r) for r in rows]

    def last_rowid(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT coalesce(max(rowid), 0) FROM events").fetchone()[0]

    def count_events(self, device: str | None = None) -> int:
        sql, args = "SELECT count(*) FROM events", ()
        if device:
            sql, args = sql + " WHERE device = ?", (device,)
        with self._lock:
            return self._conn.execute(sql, args).fetchone()[0]

    def event_ids(self, device: str | None = None) -> list[str]:
        """Every stored event id (for checks and tests)."""
        sql, args = "SELECT id FROM events", ()
        if device:
            sql, args = sql + " WHERE device = ?", (device,)
        with self._lock:
            return [r[0] for r in self._conn.execute(sql, args)]

    def devices(self) -> list[dict[str, Any]]:
        """The device registry, by id."""
        with self._lock:
            rows = self._conn.execute(f"SELECT {', '.join(DEVICE_COLUMNS)} FROM devices ORDER BY id").fetchall()
        out = []
        for row in rows:
            doc = dict(zip(DEVICE_COLUMNS, row))
            doc["models"] = json.loads(doc["models"]) if doc["models"] else {}
            out.append(doc)
        return out


def _event_row(row: tuple) -> dict[str, Any]:
    doc = dict(zip(("rowid", *EVENT_COLUMNS), row))
    doc["payload"] = json.loads(doc["payload"])
    return doc
