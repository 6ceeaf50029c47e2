"""The fleet store: events keyed by event id, the device registry, and the rollouts'
tables, on SQLite or PostgreSQL through one set of SQLAlchemy Core queries.

Events are inserted with ``ON CONFLICT DO NOTHING`` on their id, so a batch that
arrives twice (a re-send, a device restarted mid-batch, two managers that each got a
copy) stores nothing the second time: the database, not a manager, keeps an event once.

On the way in, rows are made from contract bodies whose types are the row models' own
(times, counts, JSON that parses strictly), and :meth:`Store.commit` reads every rollout
row back through its loader before writing it; on the way out every row goes through a
loader (:mod:`.rows`), and one that does not load is skipped and counted.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import sqlalchemy as sa
from pydantic_core import to_json
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from edge.core.contract import MAX_PAYLOAD_BYTES, Artifact, ContractError, JobStatus, OutboxBatch, Status
from edge.core.ids import encode_ulid, ulid_time

from . import engine as db
from . import schema as S
from .rows import (
    DEVICE_COLUMNS,
    EVENT_COLUMNS,
    DeviceRow,
    IdentityRow,
    JobRow,
    Loader,
    Skips,
    T,
    artifact_listing,
    load_artifact,
    load_event,
)

log = logging.getLogger("fleet.store")

StoreError = db.StoreError
# what a failing database raises: the caller keeps the batch unacked, the device sends it again
DatabaseError = sa.exc.SQLAlchemyError


SNAPSHOT_EVENT_WINDOW_S = 3600.0  # a snapshot's event is made within this of the snapshot (in ms, in practice)


class Conflict(StoreError):
    """A write that would change something immutable (an artifact version's bytes)."""


class LeaseLost(StoreError):
    """A write fenced by a lease this manager no longer holds."""


@dataclass(frozen=True)
class Fence:
    """Writes made under a lease: refused once another manager holds it."""

    name: str
    holder: str
    epoch: int


@dataclass(frozen=True)
class Stored:
    """What one batch did to the store."""

    inserted: int
    duplicates: int


class Store:
    """The fleet store; safe to share between threads (each call takes a pooled connection)."""

    def __init__(self, engine: Engine, name: str) -> None:
        self.engine = engine
        self.name = name  # for messages: a path, or a URL without its password
        self.path = Path(name) if engine.dialect.name == "sqlite" else None
        self._insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
        self.skipped = Skips("unreadable rows skipped")  # left out of reads: written elsewhere, or by hand
        self.refused = Skips("rows refused: they would not read back")  # not written

    @classmethod
    def open(cls, where: str | Path, *, pool_size: int = 4) -> "Store":
        """Open the store for writing, creating it or bringing its schema up to date."""
        url = db.parse_url(where)
        name = db.describe(url)
        if db.is_sqlite(url):
            _make_parent(Path(url.database or ""), name)
        engine = db.create(url, pool_size=pool_size)
        try:
            db.upgrade(engine, name)
        except db.StoreError:
            engine.dispose()
            raise
        except (DatabaseError, OSError) as exc:
            engine.dispose()
            raise StoreError(f"{name}: cannot open the fleet store: {_first_line(exc)}") from None
        return cls(engine, name)

    @classmethod
    def open_readonly(cls, where: str | Path, *, pool_size: int = 1,
                      busy_timeout_s: float = db.BUSY_TIMEOUT_S) -> "Store":
        """Open an existing store for reading (``fleet events``, ``fleet devices``, the console)."""
        url = db.parse_url(where)
        name = db.describe(url)
        if db.is_sqlite(url) and not Path(url.database or "").is_file():
            raise StoreError(f"{name}: no fleet store here (`fleet serve --db {name}` creates it)")
        engine = db.create(url, readonly=True, pool_size=pool_size, busy_timeout_s=busy_timeout_s)
        try:
            with engine.connect() as conn:
                revision = db.check(conn, name)
                if revision is None:
                    raise StoreError(f"{name}: not a fleet store: no schema (`fleet db upgrade --db {name}`)")
                conn.execute(sa.select(S.events.c.id).limit(1)).all()
        except db.StoreError:
            engine.dispose()
            raise
        except DatabaseError as exc:
            engine.dispose()
            raise StoreError(f"{name}: not a fleet store: {_first_line(exc)}") from None
        return cls(engine, name)

    def close(self) -> None:
        self.engine.dispose()

    def revision(self) -> str | None:
        with self.engine.connect() as conn:
            return db.current(conn)

    # --- writes (the ingest) -------------------------------------------------------------

    def add_batch(self, batch: OutboxBatch, received_at: float) -> Stored:
        """Store a batch's events in one transaction; events already stored are skipped.
        Raises ContractError("oversized") for a payload over the limit (nothing stored)."""
        rows = []
        for i, e in enumerate(batch.events):
            payload = to_json(e.payload)  # compact; pydantic's encoder is several times faster than json's
            if len(payload) > MAX_PAYLOAD_BYTES:
                raise ContractError("oversized", f"events[{i}].payload: {len(payload)} bytes > {MAX_PAYLOAD_BYTES}")
            rows.append({"id": e.id, "device": batch.device, "seq": e.seq, "kind": e.kind, "camera": e.camera,
                         "captured_at": e.captured_at, "recorded_at": e.recorded_at, "priority": e.priority,
                         "payload": payload.decode(), "batch": batch.batch, "received_at": received_at})
        events = self._insert(S.events).on_conflict_do_nothing(index_elements=["id"]).returning(S.events.c.id)
        d = S.devices
        # the device's clock against this one: the batch was stamped as it went out, and the
        # broker adds milliseconds (a re-sent batch is stamped again, so it measures the same)
        skew = batch.sent_at - received_at
        device = self._insert(d).values(id=batch.device, first_seen=received_at, last_seen=received_at,
                                         events=sa.bindparam("inserted"), clock_skew_s=skew)
        device = device.on_conflict_do_update(index_elements=["id"], set_={
            "last_seen": device.excluded.last_seen, "events": d.c.events + device.excluded.events,
            "clock_skew_s": device.excluded.clock_skew_s})
        with self.engine.begin() as c:
            inserted = len(c.execute(events, rows).all())
            c.execute(device, {"inserted": inserted})
        return Stored(inserted, len(rows) - inserted)

    def purge_events(self, before: float, *, kind: str | None = None, keep_kinds: Sequence[str] = (),
                     limit: int = 1000) -> int:
        """Delete up to ``limit`` events captured before ``before`` (of ``kind``, or of any
        kind but ``keep_kinds``) in one short transaction; returns how many."""
        e = S.events
        chosen = sa.select(e.c.rowid).where(e.c.captured_at < before)
        if kind is not None:
            chosen = chosen.where(e.c.kind == kind)
        if keep_kinds:
            chosen = chosen.where(e.c.kind.not_in(list(keep_kinds)))
        with self.engine.begin() as c:
            return c.execute(sa.delete(e).where(e.c.rowid.in_(chosen.limit(limit)))).rowcount

    def set_status(self, status: Status, received_at: float) -> None:
        """Record a device's status (online, or offline by its will or its goodbye)."""
        d = S.devices
        stmt = self._insert(d).values(
            id=status.device, state=status.state, site=status.site, line=status.line, runtime=status.runtime,
            models=json.dumps(status.models), status_at=status.at, first_seen=received_at, last_seen=received_at,
            events=0, state_since=received_at)
        x = stmt.excluded
        stmt = stmt.on_conflict_do_update(index_elements=["id"], set_={
            "state": x.state, "site": x.site, "line": x.line, "runtime": x.runtime, "models": x.models,
            "status_at": x.status_at, "last_seen": x.last_seen,
            "state_since": sa.case((d.c.state.is_not_distinct_from(x.state) & d.c.state_since.is_not(None),
                                    d.c.state_since), else_=x.last_seen)})
        with self.engine.begin() as c:
            c.execute(stmt)

    def add_jobs(self, statuses: Sequence[tuple[JobStatus, float]]) -> int:
        """Store job statuses as devices sent them, each once however many managers heard
        it, for the manager running rollouts to judge; returns how many were new."""
        if not statuses:
            return 0
        rows = [{"device": s.device, "job": s.job, "slot": s.slot, "sha256": s.sha256, "state": s.state,
                 "reason": s.reason, "at": s.at, "received_at": now, "pending": True} for s, now in statuses]
        stmt = self._insert(S.jobs).on_conflict_do_nothing(
            index_elements=["device", "job", "state", "at"]).returning(S.jobs.c.rowid)
        with self.engine.begin() as c:
            return len(c.execute(stmt, rows).all())

    # --- reads -----------------------------------------------------------------------------

    def events(self, *, device: str | None = None, kind: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
        """The newest ``limit`` events (by id), oldest first."""
        e = S.events
        q = _event_filter(sa.select(*_columns(e, ("rowid", *EVENT_COLUMNS))), device, kind)
        rows = self._rows(q.order_by(e.c.id.desc()).limit(limit))
        rows.reverse()
        return self.skipped.load("events", rows, load_event)

    def events_after(self, rowid: int, *, device: str | None = None, kind: str | None = None,
                     limit: int = 1000) -> tuple[list[dict[str, Any]], int]:
        """Events stored after row ``rowid``, in the order they arrived, and the last row
        read (skipped rows included, so the next call does not read them again)."""
        e = S.events
        q = _event_filter(sa.select(*_columns(e, ("rowid", *EVENT_COLUMNS))), device, kind).where(e.c.rowid > rowid)
        rows = self._rows(q.order_by(e.c.rowid).limit(limit))
        return self.skipped.load("events", rows, load_event), (rows[-1]["rowid"] if rows else rowid)

    def snapshot_events(self, *, snapshot: str | None = None, device: str | None = None,
                        kinds: Sequence[str] = ("decision", "alert"), limit: int = 50) -> list[dict[str, Any]]:
        """The newest ``limit`` events of ``kinds`` that name a kept snapshot (its id and
        hash), or the one naming ``snapshot``; oldest first.

        Payloads are compact JSON, so a LIKE finds the key; each kind is read newest first
        down its (kind, id) index and stops at ``limit``. A snapshot's event is made on the
        device right after the snapshot is written, by the same id generator, so its id
        lies within :data:`SNAPSHOT_EVENT_WINDOW_S` after the snapshot's: that range of the
        index is all a lookup reads."""
        e = S.events
        found: list[dict[str, Any]] = []
        for kind in kinds:
            q = _event_filter(sa.select(*_columns(e, ("rowid", *EVENT_COLUMNS))), device, kind)
            q = q.where(e.c.payload.like('%"snapshot_sha256":"%'))
            if snapshot is not None:
                until = encode_ulid(int((ulid_time(snapshot) + SNAPSHOT_EVENT_WINDOW_S) * 1000), 0)
                q = q.where(e.c.id >= snapshot, e.c.id < until, e.c.payload.like(f'%"snapshot":"{snapshot}"%'))
            found += self._rows(q.order_by(e.c.id.desc()).limit(limit))
        rows = sorted(found, key=lambda r: r["id"])[-limit:]
        return self.skipped.load("events", rows, load_event)

    def add_event(self, *, id: str, device: str, kind: str, camera: str | None, captured_at: float,
                  payload: Mapping[str, Any], now: float) -> bool:
        """Store one event the fleet itself makes (an operator's review label); False when
        an event with that id is stored already."""
        text = to_json(dict(payload)).decode()
        if len(text) > MAX_PAYLOAD_BYTES:
            raise ContractError("oversized", f"payload: {len(text)} bytes > {MAX_PAYLOAD_BYTES}")
        row = {"id": id, "device": device, "seq": 0, "kind": kind, "camera": camera, "captured_at": captured_at,
               "recorded_at": now, "priority": 4, "payload": text, "batch": id, "received_at": now}
        stmt = self._insert(S.events).on_conflict_do_nothing(index_elements=["id"]).returning(S.events.c.id)
        with self.engine.begin() as c:
            return bool(c.execute(stmt, [row]).all())

    def last_rowid(self) -> int:
        return self._scalar(sa.select(sa.func.coalesce(sa.func.max(S.events.c.rowid), 0)))

    def count_events(self, device: str | None = None) -> int:
        return self._scalar(_event_filter(sa.select(sa.func.count()).select_from(S.events), device, None))

    def event_ids(self, device: str | None = None) -> list[str]:
        """Every stored event id (for checks and tests)."""
        with self.engine.connect() as c:
            return list(c.execute(_event_filter(sa.select(S.events.c.id), device, None)).scalars())

    def devices(self) -> list[dict[str, Any]]:
        """The device registry, by id: every device seen or enrolled, with its enrolment
        (``enrolled``, ``revoked``, or None for a device seen but never enrolled)."""
        devices = {d.id: {**d.model_dump(exclude={"state_since"}), "enrolment": None} for d in self._devices()}
        for i in self.identities("device"):
            devices.setdefault(i.name, {"id": i.name, "state": None, "site": i.site, "line": i.line, "runtime": None,
                                        "models": {}, "status_at": None, "first_seen": None, "last_seen": None,
                                        "events": 0, "clock_skew_s": None})["enrolment"] = i.state
        return [devices[k] for k in sorted(devices)]

    def _devices(self, ids: list[str] | None = None) -> list[DeviceRow]:
        d = S.devices
        q = sa.select(*_columns(d, (*DEVICE_COLUMNS, "state_since")))
        rows = self._rows((q if ids is None else q.where(d.c.id.in_(ids))).order_by(d.c.id))
        return self.skipped.load("devices", rows, DeviceRow.model_validate)

    def clock_skew(self, device: str) -> float | None:
        """The device's clock minus the manager's at its last batch, if known (and a number)."""
        rows = self._rows(sa.select(S.devices.c.clock_skew_s).where(S.devices.c.id == device))
        skew = rows[0]["clock_skew_s"] if rows else None
        return skew if isinstance(skew, (int, float)) and math.isfinite(skew) else None

    def _rows(self, query: sa.Select, conn: Connection | None = None) -> list[dict[str, Any]]:
        """Rows as column → value."""
        if conn is not None:
            return [dict(r) for r in conn.execute(query).mappings()]
        with self.engine.connect() as c:
            return [dict(r) for r in c.execute(query).mappings()]

    def _scalar(self, query: sa.Select) -> Any:
        with self.engine.connect() as c:
            return c.execute(query).scalar_one()

    def stats(self) -> dict[str, dict[str, int]]:
        """Rows skipped on reads and refused on writes, by table."""
        return {"skipped": dict(self.skipped.counts), "refused": dict(self.refused.counts)}

    # --- rollouts: artifacts, desired and reported state, rollouts, executions, jobs -----------

    def put_artifact(self, artifact: Artifact, *, by: str, now: float) -> None:
        """Record a signed artifact version; Conflict if the version exists with other bytes."""
        a = S.artifacts
        key = (a.c.kind == artifact.kind) & (a.c.name == artifact.name) & (a.c.version == artifact.version)
        with self.engine.begin() as c:
            c.execute(self._insert(a).values(
                kind=artifact.kind, name=artifact.name, version=artifact.version, sha256=artifact.sha256,
                size=artifact.size, doc=artifact.model_dump_json(), pushed_at=now, pushed_by=by,
            ).on_conflict_do_nothing())
            stored = c.execute(sa.select(a.c.sha256).where(key)).scalar_one()
            if stored != artifact.sha256:
                raise Conflict(f"{artifact.kind} {artifact.name} {artifact.version} exists with other bytes")

    def resign_artifact(self, artifact: Artifact) -> None:
        """Replace a stored version's description by the same one signed again (the
        signature is the only thing that may change)."""
        a = S.artifacts
        with self.engine.begin() as c:
            c.execute(sa.update(a).where(a.c.kind == artifact.kind, a.c.name == artifact.name,
                                         a.c.version == artifact.version, a.c.sha256 == artifact.sha256)
                      .values(doc=artifact.model_dump_json()))

    def all_artifacts(self) -> list[Artifact]:
        a = S.artifacts
        rows = self._rows(sa.select(a.c.kind, a.c.name, a.c.version, a.c.doc).order_by(a.c.kind, a.c.name, a.c.version))
        return self.skipped.load("artifacts", rows, load_artifact)

    def find_artifact(self, kind: str, name: str, version: str) -> Artifact | None:
        a = S.artifacts
        rows = self._rows(sa.select(a.c.kind, a.c.name, a.c.version, a.c.doc)
                          .where(a.c.kind == kind, a.c.name == name, a.c.version == version))
        found = self.skipped.load("artifacts", rows, load_artifact)
        return found[0] if found else None

    def artifact_by_sha(self, sha256: str, kind: str | None = None) -> Artifact | None:
        a = S.artifacts
        q = sa.select(a.c.kind, a.c.name, a.c.version, a.c.doc).where(a.c.sha256 == sha256)
        if kind:
            q = q.where(a.c.kind == kind)
        found = self.skipped.load("artifacts", self._rows(q.order_by(a.c.pushed_at)), load_artifact)
        return found[0] if found else None

    def artifacts(self, kind: str | None = None, name: str | None = None) -> list[dict[str, Any]]:
        """Artifact versions with who pushed them and when, oldest first."""
        a = S.artifacts
        q = sa.select(a.c.kind, a.c.name, a.c.version, a.c.doc, a.c.pushed_at, a.c.pushed_by)
        if kind:
            q = q.where(a.c.kind == kind)
        if name:
            q = q.where(a.c.name == name)
        rows = self._rows(q.order_by(a.c.pushed_at, a.c.kind, a.c.name, a.c.version))
        return self.skipped.load("artifacts", rows, artifact_listing)

    def device_states(self, ids: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
        """Every device's state (or only ``ids``'), when it entered it, and its tags."""
        if ids is None:
            found = self._devices()
        else:
            wanted = sorted(set(ids))  # in slices: SQLite caps the parameters of one statement
            found = [d for i in range(0, len(wanted), 1000) for d in self._devices(wanted[i:i + 1000])]
        return {d.id: {"state": d.state, "since": d.state_since, "site": d.site, "line": d.line} for d in found}

    def load(self, table: str, loader: Loader[T]) -> list[T]:
        """Every row of a rollout table (desired, reported, rollouts, executions) through
        ``loader``, for the engine's start; rows it refuses are skipped and counted."""
        t = S.ROLLOUT_TABLES[table]
        return self.skipped.load(table, self._rows(sa.select(t).order_by(*t.primary_key.columns)), loader)

    def commit(self, writes: Mapping[str, list[dict[str, Any]]], loaders: Mapping[str, Loader[Any]], *,
               judged: Iterable[int] = (), answers: Iterable[dict[str, Any]] = (), fence: Fence | None = None) -> None:
        """Upsert rows into the rollout tables (``jobs`` rows are appended), mark the job
        statuses ``judged`` as done and keep ``answers``, in one transaction, refused with
        LeaseLost unless ``fence``'s lease is still held. Each row is first read back
        through its table's loader: one that would not load is not written, but counted in
        :attr:`refused` and logged."""
        writes = {table: self._readable(table, rows, loaders[table]) for table, rows in writes.items()}
        judged, answers = list(judged), list(answers)
        if not any(writes.values()) and not judged and not answers:
            return
        with self.engine.begin() as c:
            if fence is not None:
                _check_fence(c, fence)
            for table, rows in writes.items():
                if not rows:
                    continue
                if table == "jobs":
                    c.execute(self._insert(S.jobs).on_conflict_do_nothing(), rows)
                    continue
                c.execute(self._upsert(S.ROLLOUT_TABLES[table]), rows)
            if judged:
                c.execute(sa.update(S.jobs).where(S.jobs.c.rowid.in_(judged)).values(pending=False))
            if answers:
                c.execute(self._insert(S.answers).on_conflict_do_nothing(), answers)

    def _upsert(self, table: sa.Table) -> Any:
        stmt = self._insert(table)
        keys = [c.name for c in table.primary_key.columns]
        return stmt.on_conflict_do_update(index_elements=keys, set_={
            c.name: stmt.excluded[c.name] for c in table.columns if c.name not in keys})

    def _readable(self, table: str, rows: list[dict[str, Any]], loader: Loader[Any]) -> list[dict[str, Any]]:
        def check(row: Mapping[str, Any]) -> Mapping[str, Any]:
            loader(row)
            return row
        return self.refused.load(table, rows, check)

    def pending_jobs(self, limit: int = 1000) -> list[tuple[int, JobRow]]:
        """Job statuses stored but not yet judged, in arrival order, with their row ids;
        a row that does not load is marked judged and skipped."""
        j = S.jobs
        rows = self._rows(sa.select(j.c.rowid, *_columns(j, JOB_COLUMNS)).where(j.c.pending)
                          .order_by(j.c.rowid).limit(limit))
        loaded = self.skipped.load("jobs", rows, lambda r: (r["rowid"], JobRow.model_validate(
            {k: v for k, v in r.items() if k != "rowid"})))
        bad = {r["rowid"] for r in rows} - {rowid for rowid, _ in loaded}
        if bad:
            with self.engine.begin() as c:
                c.execute(sa.update(j).where(j.c.rowid.in_(bad)).values(pending=False))
        return loaded

    def jobs(self, *, device: str | None = None, job: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
        """Job statuses as devices sent them, oldest first."""
        j = S.jobs
        q = sa.select(*_columns(j, JOB_COLUMNS))
        if device:
            q = q.where(j.c.device == device)
        if job:
            q = q.where(j.c.job == job)
        rows = self._rows(q.order_by(j.c.rowid.desc()).limit(limit))
        rows.reverse()
        return self.skipped.load("jobs", rows, lambda r: JobRow.model_validate(r).model_dump())

    def put_blob(self, sha256: str, data: bytes) -> None:
        """Keep an artifact's bytes (once: they are content-addressed)."""
        with self.engine.begin() as c:
            c.execute(self._insert(S.blobs).values(sha256=sha256, size=len(data), data=data).on_conflict_do_nothing())

    def blob_shas(self) -> set[str]:
        with self.engine.connect() as c:
            return set(c.execute(sa.select(S.blobs.c.sha256)).scalars())

    def blob(self, sha256: str) -> bytes | None:
        with self.engine.connect() as c:
            return c.execute(sa.select(S.blobs.c.data).where(S.blobs.c.sha256 == sha256)).scalar()

    # --- identities ----------------------------------------------------------------------------

    def put_identities(self, identities: Sequence[IdentityRow]) -> None:
        """Insert or replace identities (an enrolment, a revocation) in one transaction."""
        rows = [i.row() for i in identities]
        if rows:
            with self.engine.begin() as c:
                c.execute(self._upsert(S.identities), rows)

    def identities(self, role: str | None = None) -> list[IdentityRow]:
        """Every identity (of ``role``), by name; revoked ones included."""
        i = S.identities
        q = sa.select(i).order_by(i.c.name)
        return self._identities(q.where(i.c.role == role) if role else q)

    def identity(self, name: str) -> IdentityRow | None:
        found = self._identities(sa.select(S.identities).where(S.identities.c.name == name))
        return found[0] if found else None

    def _identities(self, query: sa.Select) -> list[IdentityRow]:
        try:
            rows = self._rows(query)
        except DatabaseError:
            if sa.inspect(self.engine).has_table("identities"):
                raise
            return []  # a store opened read-only, at a schema from before identities
        return self.skipped.load("identities", rows, IdentityRow.model_validate)

    def answer(self, identity: str, request_id: str) -> str | None:
        """The answer already given to an operator's request that changed something."""
        a = S.answers
        with self.engine.connect() as c:
            return c.execute(sa.select(a.c.response).where(a.c.identity == identity, a.c.id == request_id)).scalar()


JOB_COLUMNS = ("device", "job", "slot", "sha256", "state", "reason", "at", "received_at")


def _columns(table: sa.Table, names: Iterable[str]) -> list[sa.Column]:
    return [table.c[n] for n in names]


def _event_filter(q: sa.Select, device: str | None, kind: str | None) -> sa.Select:
    if device:
        q = q.where(S.events.c.device == device)
    if kind:
        q = q.where(S.events.c.kind == kind)
    return q


def _check_fence(c: Connection, fence: Fence) -> None:
    lease = S.leases
    held = c.execute(sa.select(lease.c.epoch).where(
        lease.c.name == fence.name, lease.c.holder == fence.holder, lease.c.epoch == fence.epoch,
        lease.c.expires_at > S.db_now()).with_for_update()).scalar()
    if held is None:
        raise LeaseLost(f"lease {fence.name!r} (epoch {fence.epoch}) is no longer held by {fence.holder}")


def _make_parent(path: Path, name: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"{name}: cannot open the fleet store: {exc}") from None


def _first_line(exc: BaseException) -> str:
    """A driver's error without SQLAlchemy's statement dump and background link."""
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip().splitlines()
    return text[0] if text else type(orig).__name__
