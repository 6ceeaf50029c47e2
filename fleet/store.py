"""The fleet's SQLite store: events keyed by event id, and the device registry.

Events are inserted with ``INSERT OR IGNORE`` on their id, so a batch that arrives
twice (a re-send, a device restarted mid-batch) stores nothing the second time. The
store runs with ``synchronous=FULL``: an ack tells the device to delete its rows, so
what the fleet acked must survive even a power cut of the fleet's machine.

No row may poison its reader. Every read goes through a row model or loader
(:class:`Skips`): a row that does not load (written by an older version, edited by
hand) is skipped, counted by table in :attr:`Store.skipped` and logged, and the read
goes on. On the way in, rows are made from contract bodies whose types are the row
models' own (times, counts, JSON that parses strictly), and :meth:`Store.commit` reads
every rollout row back through its loader before writing it. Row models and loaders
take a row as a mapping of column to value, whatever database it came from.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Literal, Mapping, TypeVar

import sqlite_utils
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError
from pydantic_core import to_json

from edge.core.contract import (
    MAX_PAYLOAD_BYTES,
    Artifact,
    ContractError,
    Count,
    OutboxBatch,
    Status,
    Time,
    loads,
)
from edge.core.db import Migration, SchemaTooNew, connect, migrate, rollback_quietly
from edge.core.errors import EdgeError
from edge.core.logs import fields

log = logging.getLogger("fleet.store")
T = TypeVar("T")
Loader = Callable[[Mapping[str, Any]], T]


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


def _schema_3(db: sqlite_utils.Database) -> None:
    """Broker identities: who may connect (devices, managers, operators, controllers),
    with what credential, and whether it is revoked. A password is kept only as the
    hash the broker's password file holds; a certificate by its serial numbers (one per
    connection of the identity), for the revocation list."""
    db["identities"].create(
        {"name": str, "role": str, "site": str, "line": str, "tags": str, "credential": str, "serials": str,
         "retired_serials": str, "password_hash": str, "not_after": float, "state": str, "created_at": float,
         "revoked_at": float},
        pk="name", not_null={"role", "tags", "credential", "serials", "retired_serials", "state", "created_at"},
    )


MIGRATIONS: tuple[Migration, ...] = (_schema_1, _schema_2, _schema_3)

EVENT_COLUMNS = ("id", "device", "seq", "kind", "camera", "captured_at", "recorded_at", "priority",
                 "payload", "received_at")
DEVICE_COLUMNS = ("id", "state", "site", "line", "runtime", "models", "status_at", "first_seen",
                  "last_seen", "events")
ROLLOUT_TABLES = ("desired", "reported", "rollouts", "executions")


# --- what a row must hold to be read ------------------------------------------------------


class Skips:
    """Rows that do not load, by table: each left out, counted once and logged once (a
    row read again, as the device registry is on every tick of a rollout, is not news)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.counts: dict[str, int] = {}
        self._seen: set[int] = set()

    def load(self, table: str, rows: Iterable[Mapping[str, Any]], loader: Loader[T]) -> list[T]:
        """Each row through ``loader``, in order, without the rows it refuses."""
        loaded: list[T] = []
        new, first = 0, ""
        for row in rows:
            try:
                loaded.append(loader(row))
            except Exception as exc:  # whatever a row holds, the read goes on
                key = hash((table, repr(row)))
                if key not in self._seen:
                    self._seen.add(key)
                    new += 1
                    first = first or f"{_row_key(row)}: {_why(exc)}"
        if new:
            self.counts[table] = self.counts.get(table, 0) + new
            log.warning(self.what, extra=fields(table=table, rows=new, first=first[:300]))
        return loaded


def _row_key(row: Mapping[str, Any]) -> str:
    keys = [f"{k}={row[k]!r}" for k in ("rowid", "id", "rollout", "device", "job") if k in row]
    return " ".join(keys) or "row"


def _why(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        err = exc.errors(include_url=False)[0]
        return f"{'.'.join(str(p) for p in err['loc']) or 'row'}: {err['msg']}"
    return f"{type(exc).__name__}: {exc}"


def _json_column(value: Any) -> Any:
    return loads(value) if isinstance(value, str) else value


class _Row(BaseModel):
    # strict: a text in a REAL column (SQLite keeps what it is given) is no time
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


JsonColumn = BeforeValidator(_json_column)


class EventRow(_Row):
    """A stored event, as ``fleet events tail`` shows it."""

    rowid: int
    id: str
    device: str
    seq: int
    kind: str  # not only today's kinds: a newer device may know more
    camera: str | None
    captured_at: Time
    recorded_at: Time
    priority: int
    payload: Annotated[dict[str, Any], JsonColumn]
    received_at: Time


class DeviceRow(_Row):
    """A device in the registry."""

    id: str
    state: str | None
    site: str | None
    line: str | None
    runtime: str | None
    models: Annotated[dict[str, str], BeforeValidator(lambda v: {} if v is None else _json_column(v))]
    status_at: Time | None
    first_seen: Time
    last_seen: Time
    events: Count
    state_since: Time | None


class JobRow(_Row):
    """A job status as a device sent it."""

    device: str
    job: str
    slot: str | None
    sha256: str | None
    state: str
    reason: str | None
    at: Time | None
    received_at: Time


class IdentityRow(_Row):
    """A broker identity in the registry (see ``fleet.identities``)."""

    name: str
    role: Literal["device", "manager", "operator", "controller", "admin"]
    site: str | None
    line: str | None
    tags: Annotated[dict[str, str], JsonColumn]
    credential: Literal["certificate", "password"]
    serials: Annotated[list[str], JsonColumn]  # hex, one per connection
    retired_serials: Annotated[list[str], JsonColumn] = []  # of the name's earlier credentials: always revoked
    password_hash: str | None
    not_after: Time | None
    state: Literal["enrolled", "revoked"]
    created_at: Time
    revoked_at: Time | None

    def row(self) -> dict[str, Any]:
        return {**self.model_dump(), "tags": json.dumps(self.tags), "serials": json.dumps(self.serials),
                "retired_serials": json.dumps(self.retired_serials)}


def load_job(row: Mapping[str, Any]) -> dict[str, Any]:
    return JobRow.model_validate(row).model_dump()


def load_artifact(row: Mapping[str, Any]) -> Artifact:
    return Artifact.model_validate(loads(row["doc"]))


def _load_event(row: Mapping[str, Any]) -> dict[str, Any]:
    return EventRow.model_validate(row).model_dump()


def _artifact_listing(row: Mapping[str, Any]) -> dict[str, Any]:
    return {**load_artifact(row).model_dump(), "pushed_at": row["pushed_at"], "pushed_by": row["pushed_by"]}


def _event_filter(device: str | None, kind: str | None, after: int | None = None) -> tuple[str, list[Any]]:
    where, args = [], []
    for sql, value in (("device = ?", device), ("kind = ?", kind), ("rowid > ?", after)):
        if value not in (None, ""):
            where.append(sql)
            args.append(value)
    return (" WHERE " + " AND ".join(where) if where else ""), args


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
        self.skipped = Skips("unreadable rows skipped")  # left out of reads: written elsewhere, or by hand
        self.refused = Skips("rows refused: they would not read back")  # not written

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

    def events(self, *, device: str | None = None, kind: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
        """The newest ``limit`` events (by id), oldest first."""
        where, args = _event_filter(device, kind)
        with self._lock:
            rows = self._rows(f"SELECT rowid, {', '.join(EVENT_COLUMNS)} FROM events{where} ORDER BY id DESC LIMIT ?",
                              (*args, limit))
            rows.reverse()
            return self.skipped.load("events", rows, _load_event)

    def events_after(self, rowid: int, *, device: str | None = None, kind: str | None = None,
                     limit: int = 1000) -> tuple[list[dict[str, Any]], int]:
        """Events stored after row ``rowid``, in the order they arrived, and the last row
        read (skipped rows included, so the next call does not read them again)."""
        where, args = _event_filter(device, kind, rowid)
        with self._lock:
            rows = self._rows(f"SELECT rowid, {', '.join(EVENT_COLUMNS)} FROM events{where} ORDER BY rowid LIMIT ?",
                              (*args, limit))
            return self.skipped.load("events", rows, _load_event), (rows[-1]["rowid"] if rows else rowid)

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
        """The device registry, by id: every device seen or enrolled, with its enrolment
        (``enrolled``, ``revoked``, or None for a device seen but never enrolled)."""
        enrolled = {i.name: i for i in self.identities("device")}
        devices = {d.id: {**d.model_dump(exclude={"state_since"}), "enrolment": None} for d in self._devices()}
        for name, i in enrolled.items():
            devices.setdefault(name, {"id": name, "state": None, "site": i.site, "line": i.line, "runtime": None,
                                      "models": {}, "status_at": None, "first_seen": None, "last_seen": None,
                                      "events": 0})["enrolment"] = i.state
        return [devices[k] for k in sorted(devices)]

    def _devices(self) -> list[DeviceRow]:
        with self._lock:
            rows = self._rows(f"SELECT {', '.join(DEVICE_COLUMNS)}, state_since FROM devices ORDER BY id")
            return self.skipped.load("devices", rows, DeviceRow.model_validate)

    def _rows(self, sql: str, args: Iterable[Any] = ()) -> list[dict[str, Any]]:
        """Rows as column → value (the caller holds the lock)."""
        cur = self._conn.execute(sql, tuple(args))
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]

    def stats(self) -> dict[str, dict[str, int]]:
        """Rows skipped on reads and refused on writes, by table."""
        with self._lock:
            return {"skipped": dict(self.skipped.counts), "refused": dict(self.refused.counts)}

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

    def resign_artifact(self, artifact: Artifact) -> None:
        """Replace a stored version's description by the same one signed again (the
        signature is the only thing that may change)."""
        with self._lock:
            c = self._conn
            c.execute("BEGIN IMMEDIATE")
            try:
                c.execute("UPDATE artifacts SET doc = ? WHERE kind = ? AND name = ? AND version = ? AND sha256 = ?",
                          (artifact.model_dump_json(), artifact.kind, artifact.name, artifact.version,
                           artifact.sha256))
                c.execute("COMMIT")
            except BaseException:
                rollback_quietly(c)
                raise

    def all_artifacts(self) -> list[Artifact]:
        with self._lock:
            return self.skipped.load("artifacts", self._rows("SELECT rowid, doc FROM artifacts ORDER BY rowid"),
                                     load_artifact)

    def find_artifact(self, kind: str, name: str, version: str) -> Artifact | None:
        with self._lock:
            rows = self._rows("SELECT rowid, doc FROM artifacts WHERE kind = ? AND name = ? AND version = ?",
                              (kind, name, version))
            found = self.skipped.load("artifacts", rows, load_artifact)
        return found[0] if found else None

    def artifact_by_sha(self, sha256: str, kind: str | None = None) -> Artifact | None:
        sql, args = "SELECT rowid, doc FROM artifacts WHERE sha256 = ?", [sha256]
        if kind:
            sql, args = sql + " AND kind = ?", [sha256, kind]
        with self._lock:
            found = self.skipped.load("artifacts", self._rows(sql + " ORDER BY pushed_at", args), load_artifact)
        return found[0] if found else None

    def artifacts(self, kind: str | None = None, name: str | None = None) -> list[dict[str, Any]]:
        """Artifact versions with who pushed them and when, oldest first."""
        where, args = [], []
        if kind:
            where.append("kind = ?")
            args.append(kind)
        if name:
            where.append("name = ?")
            args.append(name)
        sql = "SELECT rowid, doc, pushed_at, pushed_by FROM artifacts"
        if where:
            sql += " WHERE " + " AND ".join(where)
        with self._lock:
            rows = self._rows(sql + " ORDER BY pushed_at, rowid", args)
            return self.skipped.load("artifacts", rows, _artifact_listing)

    def device_states(self) -> dict[str, dict[str, Any]]:
        """Every device's state, when it entered it, and its tags."""
        return {d.id: {"state": d.state, "since": d.state_since, "site": d.site, "line": d.line}
                for d in self._devices()}

    def load(self, table: str, loader: Loader[T]) -> list[T]:
        """Every row of a rollout table (desired, reported, rollouts, executions) through
        ``loader``, for the engine's start; rows it refuses are skipped and counted."""
        if table not in ROLLOUT_TABLES:
            raise ValueError(table)
        with self._lock:
            return self.skipped.load(table, self._rows(f"SELECT * FROM {table} ORDER BY rowid"), loader)

    def commit(self, writes: dict[str, list[dict[str, Any]]], loaders: Mapping[str, Loader[Any]]) -> None:
        """Upsert rows into the rollout tables (``jobs`` rows are appended) in one
        transaction. Each row is first read back through its table's loader: one that
        would not load is not written, but counted in :attr:`refused` and logged."""
        if not any(writes.values()):
            return
        with self._lock:
            writes = {table: self._readable(table, rows, loaders[table]) for table, rows in writes.items()}
            c = self._conn
            c.execute("BEGIN IMMEDIATE")
            try:
                for table, rows in writes.items():
                    if table not in (*ROLLOUT_TABLES, "jobs"):
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

    def _readable(self, table: str, rows: list[dict[str, Any]], loader: Loader[Any]) -> list[dict[str, Any]]:
        def check(row: Mapping[str, Any]) -> Mapping[str, Any]:
            loader(row)
            return row
        return self.refused.load(table, rows, check)

    # --- identities ----------------------------------------------------------------------------

    def put_identities(self, identities: list[IdentityRow]) -> None:
        """Insert or replace identities (an enrolment, a revocation) in one transaction."""
        rows = [i.row() for i in identities]
        if not rows:
            return
        with self._lock:
            c = self._conn
            c.execute("BEGIN IMMEDIATE")
            try:
                c.executemany(f"INSERT OR REPLACE INTO identities ({', '.join(rows[0])}) "
                              f"VALUES ({', '.join('?' * len(rows[0]))})", [tuple(r.values()) for r in rows])
                c.execute("COMMIT")
            except BaseException:
                rollback_quietly(c)
                raise

    def identities(self, role: str | None = None) -> list[IdentityRow]:
        """Every identity (of ``role``), by name; revoked ones included."""
        sql, args = "SELECT * FROM identities", []
        if role:
            sql, args = sql + " WHERE role = ?", [role]
        return self._identities(sql + " ORDER BY name", args)

    def identity(self, name: str) -> IdentityRow | None:
        found = self._identities("SELECT * FROM identities WHERE name = ?", [name])
        return found[0] if found else None

    def _identities(self, sql: str, args: list[Any]) -> list[IdentityRow]:
        with self._lock:
            try:
                rows = self._rows(sql, args)
            except sqlite3.OperationalError:  # a store opened read-only before its first migration to 3
                return []
            return self.skipped.load("identities", rows, IdentityRow.model_validate)

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
            rows = self._rows(sql + " ORDER BY rowid DESC LIMIT ?", (*args, limit))
            rows.reverse()
            return self.skipped.load("jobs", rows, load_job)

