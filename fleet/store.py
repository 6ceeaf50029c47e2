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

from edge.core.contract import MAX_PAYLOAD_BYTES, Artifact, ContractError, OutboxBatch, Status
from edge.core.db import Migration, SchemaTooNew, connect, migrate, rollback_quietly
from edge.core.errors import EdgeError


class StoreError(EdgeError):
    """The fleet store cannot be opened or read."""


class Conflict(StoreError):
    """A write that would change something immutable (an artifact version's bytes)."""


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


def _schema_2(db: sqlite_utils.Database) -> None:
    """Rollouts: signed artifacts, per-device desired and reported state, rollouts and
    their executions, and every job status a device sent (the store shows why)."""
    db["devices"].add_column("state_since", float)  # when the device last went online or offline
    db["artifacts"].create(
        {"kind": str, "name": str, "version": str, "sha256": str, "size": int, "doc": str,
         "pushed_at": float, "pushed_by": str},
        pk=("kind", "name", "version"), not_null={"sha256", "size", "doc", "pushed_at"},
    )
    db["artifacts"].create_index(["sha256"], index_name="artifacts_by_sha")
    db["desired"].create({"device": str, "version": int, "doc": str, "updated_at": float},
                         pk="device", not_null={"version", "doc", "updated_at"})
    db["reported"].create({"device": str, "doc": str, "at": float, "received_at": float},
                          pk="device", not_null={"doc", "received_at"})
    db["rollouts"].create(
        {"id": str, "seq": int, "kind": str, "slot": str, "state": str, "stage": int, "spec": str,
         "reason": str, "created_by": str, "created_at": float, "updated_at": float},
        pk="id", not_null={"seq", "kind", "slot", "state", "stage", "spec", "created_at", "updated_at"},
    )
    db["executions"].create(
        {"rollout": str, "device": str, "stage": int, "state": str, "job_state": str, "reason": str,
         "previous": str, "assigned_at": float, "assigned_version": int, "active_at": float, "finished_at": float,
         "revert": str, "revert_reason": str, "revert_version": int, "updated_at": float},
        pk=("rollout", "device"), not_null={"stage", "state", "updated_at"},
    )
    db["jobs"].create(
        {"device": str, "job": str, "slot": str, "sha256": str, "state": str, "reason": str,
         "at": float, "received_at": float},
        not_null={"device", "job", "state", "received_at"},
    )
    db["jobs"].create_index(["device", "job"], index_name="jobs_by_device")


MIGRATIONS: tuple[Migration, ...] = (_schema_1, _schema_2)

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
                    " status_at = excluded.status_at, last_seen = excluded.last_seen,"
                    " state_since = CASE WHEN devices.state IS excluded.state THEN devices.state_since"
                    " ELSE excluded.last_seen END",
                    (status.device, status.state, status.site, status.line, status.runtime,
                     json.dumps(status.models), status.at, received_at, received_at))
                c.execute("UPDATE devices SET state_since = ? WHERE id = ? AND state_since IS NULL",
                          (received_at, status.device))
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


    # --- rollouts: artifacts, desired and reported state, rollouts, executions, jobs -----------

    def put_artifact(self, artifact: Artifact, *, by: str, now: float) -> None:
        """Record a signed artifact version; Conflict if the version exists with other bytes."""
        with self._lock:
            c = self._conn
            c.execute("BEGIN IMMEDIATE")
            try:
                row = c.execute("SELECT sha256 FROM artifacts WHERE kind = ? AND name = ? AND version = ?",
                                (artifact.kind, artifact.name, artifact.version)).fetchone()
                if row is not None and row[0] != artifact.sha256:
                    raise Conflict(f"{artifact.kind} {artifact.name} {artifact.version} exists with other bytes")
                if row is None:
                    c.execute("INSERT INTO artifacts (kind, name, version, sha256, size, doc, pushed_at, pushed_by)"
                              " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                              (artifact.kind, artifact.name, artifact.version, artifact.sha256, artifact.size,
                               artifact.model_dump_json(), now, by))
                c.execute("COMMIT")
            except BaseException:
                rollback_quietly(c)
                raise

    def find_artifact(self, kind: str, name: str, version: str) -> Artifact | None:
        with self._lock:
            row = self._conn.execute("SELECT doc FROM artifacts WHERE kind = ? AND name = ? AND version = ?",
                                     (kind, name, version)).fetchone()
        return Artifact.model_validate_json(row[0]) if row else None

    def artifact_by_sha(self, sha256: str, kind: str | None = None) -> Artifact | None:
        sql, args = "SELECT doc FROM artifacts WHERE sha256 = ?", [sha256]
        if kind:
            sql, args = sql + " AND kind = ?", [sha256, kind]
        with self._lock:
            row = self._conn.execute(sql + " ORDER BY pushed_at LIMIT 1", args).fetchone()
        return Artifact.model_validate_json(row[0]) if row else None

    def artifacts(self, kind: str | None = None, name: str | None = None) -> list[dict[str, Any]]:
        """Artifact versions with who pushed them and when, oldest first."""
        where, args = [], []
        if kind:
            where.append("kind = ?")
            args.append(kind)
        if name:
            where.append("name = ?")
            args.append(name)
        sql = "SELECT doc, pushed_at, pushed_by FROM artifacts"
        if where:
            sql += " WHERE " + " AND ".join(where)
        with self._lock:
            rows = self._conn.execute(sql + " ORDER BY pushed_at, rowid", args).fetchall()
        return [{**json.loads(doc), "pushed_at": at, "pushed_by": by} for doc, at, by in rows]

    def device_states(self) -> dict[str, dict[str, Any]]:
        """Every device's state, when it entered it, and its tags."""
        with self._lock:
            rows = self._conn.execute("SELECT id, state, state_since, site, line FROM devices").fetchall()
        return {r[0]: {"state": r[1], "since": r[2], "site": r[3], "line": r[4]} for r in rows}

    def load(self, table: str) -> list[dict[str, Any]]:
        """Every row of a rollout table (desired, reported, rollouts, executions), for the engine's start."""
        if table not in ("desired", "reported", "rollouts", "executions"):
            raise ValueError(table)
        with self._lock:
            cur = self._conn.execute(f"SELECT * FROM {table} ORDER BY rowid")
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row)) for row in cur.fetchall()]

    def commit(self, writes: dict[str, list[dict[str, Any]]]) -> None:
        """Upsert rows into the rollout tables (``jobs`` rows are appended) in one transaction."""
        if not any(writes.values()):
            return
        with self._lock:
            c = self._conn
            c.execute("BEGIN IMMEDIATE")
            try:
                for table, rows in writes.items():
                    if table not in ("desired", "reported", "rollouts", "executions", "jobs"):
                        raise ValueError(table)
                    if not rows:
                        continue
                    cols = list(rows[0])
                    verb = "INSERT" if table == "jobs" else "INSERT OR REPLACE"
                    c.executemany(f"{verb} INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                                  [tuple(r[k] for k in cols) for r in rows])
                c.execute("COMMIT")
            except BaseException:
                rollback_quietly(c)
                raise

    def jobs(self, *, device: str | None = None, job: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
        """Job statuses as devices sent them, oldest first."""
        where, args = [], []
        if device:
            where.append("device = ?")
            args.append(device)
        if job:
            where.append("job = ?")
            args.append(job)
        sql = "SELECT device, job, slot, sha256, state, reason, at, received_at FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        with self._lock:
            cur = self._conn.execute(sql + " ORDER BY rowid DESC LIMIT ?", (*args, limit))
            names = [d[0] for d in cur.description]
            rows = [dict(zip(names, r)) for r in cur.fetchall()]
        rows.reverse()
        return rows


def _event_row(row: tuple) -> dict[str, Any]:
    doc = dict(zip(("rowid", *EVENT_COLUMNS), row))
    doc["payload"] = json.loads(doc["payload"])
    return doc
