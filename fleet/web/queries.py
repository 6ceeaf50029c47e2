"""The console's reads: paged and aggregated queries on the fleet store, read-only.

Every list is paged by a key the database has an index on (a device's id, an event's
ULID, a rollout's sequence number), so a page costs the same at 10 devices or 10,000
and at a thousand events or a million; counts and groupings are ``GROUP BY`` queries,
never Python loops over every row. Every row goes through a row model or a loader
(``fleet.store.rows``, the rollout engine's own loaders), and one that does not load is
skipped and counted by the store (``Store.skipped``), never a failed page.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
from dataclasses import dataclass
from typing import Any, Mapping

import sqlalchemy as sa

from edge.core.contract import ULID_PATTERN
from fleet.desired import load_desired, load_reported
from fleet.rollouts import FINISHED, Execution, Rollout
from fleet.store import DeviceRow, Store
from fleet.store import schema as S
from fleet.store.rows import DEVICE_COLUMNS, EVENT_COLUMNS, load_event

STALE_S = 300.0  # an online device silent this long is shown as stale: its will may not have reached us
MAX_PAGE = 500
LATEST_READ = 8  # a device's newest health events looked at for its latest figures: one per camera and its own


class BadParameter(ValueError):
    """A filter or cursor the API refuses (400), naming the parameter."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(f"{parameter}: {message}")
        self.parameter = parameter


@dataclass(frozen=True)
class Page:
    items: list[dict[str, Any]]
    next: str | None  # the cursor of the next page, None on the last


@dataclass(frozen=True)
class EventFilter:
    device: str | None = None
    camera: str | None = None
    kind: str | None = None
    since: float | None = None  # captured_at bounds, seconds since the epoch
    until: float | None = None


def encode_cursor(key: str | int) -> str:
    return base64.urlsafe_b64encode(str(key).encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None, pattern: str) -> str | None:
    """A cursor made by :func:`encode_cursor` whose key matches ``pattern``; BadParameter otherwise."""
    if cursor is None or cursor == "":
        return None
    try:
        key = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise BadParameter("cursor", "not a cursor this API made") from None
    if not re.fullmatch(pattern, key):
        raise BadParameter("cursor", "not a cursor this API made")
    return key


def _limit(limit: int) -> int:
    if not 1 <= limit <= MAX_PAGE:
        raise BadParameter("limit", f"must be between 1 and {MAX_PAGE}")
    return limit


class Queries:
    """The console's reads on one store (a read-only one: nothing here writes)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._json = _json_text(store.engine.dialect.name)

    def _rows(self, q: sa.Select) -> list[dict[str, Any]]:
        with self.store.engine.connect() as c:
            return [dict(r) for r in c.execute(q).mappings()]

    # --- devices ------------------------------------------------------------------------------

    def fleet_counts(self, now: float, stale_s: float = STALE_S) -> list[dict[str, Any]]:
        """Devices by site, line and condition (online, stale, offline, unknown), counted in the database."""
        d = S.devices
        condition = sa.case((d.c.state == "online", sa.case((d.c.last_seen < now - stale_s, "stale"), else_="online")),
                            (d.c.state == "offline", "offline"), else_="unknown").label("condition")
        q = (sa.select(d.c.site, d.c.line, condition, sa.func.count().label("devices"))
             .group_by(d.c.site, d.c.line, condition).order_by(d.c.site, d.c.line))
        return self._rows(q)

    def devices(self, *, cursor: str | None = None, limit: int = 100, site: str | None = None,
                line: str | None = None, state: str | None = None) -> Page:
        """Devices by id, with their latest health figures per camera."""
        d = S.devices
        after = decode_cursor(cursor, r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
        q = sa.select(*[d.c[n] for n in (*DEVICE_COLUMNS, "state_since")]).order_by(d.c.id).limit(_limit(limit) + 1)
        if after is not None:
            q = q.where(d.c.id > after)
        for column, value in (("site", site), ("line", line), ("state", state)):
            if value is not None:
                q = q.where(d.c[column] == value)
        rows = self._rows(q)
        more = len(rows) > limit
        devices = [r.model_dump() for r in self.store.skipped.load("devices", rows[:limit], DeviceRow.model_validate)]
        health = self.latest_health([x["id"] for x in devices])
        for x in devices:
            x["health"] = health.get(x["id"], {})
        return Page(devices, encode_cursor(rows[limit - 1]["id"]) if more else None)

    def device(self, device: str) -> dict[str, Any] | None:
        d = S.devices
        rows = self._rows(sa.select(*[d.c[n] for n in (*DEVICE_COLUMNS, "state_since")]).where(d.c.id == device))
        found = self.store.skipped.load("devices", rows, DeviceRow.model_validate)
        return found[0].model_dump() if found else None

    def latest_health(self, devices: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
        """device -> camera -> the payload of its newest health event. Each device's newest
        :data:`LATEST_READ` health events are looked at (one short range of
        ``events_by_device_kind`` a device, in one query), and only the newest per camera is read whole."""
        if not devices:
            return {}
        e = S.events
        newest: dict[tuple[str, str | None], int] = {}
        with self.store.engine.connect() as c:
            rows = c.execute(_newest_health(len(devices)), {f"d{i}": d for i, d in enumerate(devices)}).mappings().all()
        for row in rows:
            newest.setdefault((row["device"], row["camera"]), row["rowid"])  # each range is newest first
        q = sa.select(*[e.c[n] for n in ("rowid", *EVENT_COLUMNS)]).where(e.c.rowid.in_(list(newest.values())))
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for event in self.store.skipped.load("events", self._rows(q), load_event):
            out.setdefault(event["device"], {})[event["camera"] or "-"] = event["payload"]
        return out

    def health_series(self, device: str, *, since: float | None = None, limit: int = 500) -> list[dict[str, Any]]:
        """A device's newest health and drift events, oldest first."""
        e = S.events
        q = (sa.select(*[e.c[n] for n in ("rowid", *EVENT_COLUMNS)])
             .where(e.c.device == device, e.c.kind.in_(("health", "drift"))).order_by(e.c.id.desc()).limit(limit))
        if since is not None:
            q = q.where(e.c.captured_at >= since)
        rows = self._rows(q)
        rows.reverse()
        return self.store.skipped.load("events", rows, load_event)

    def desired_reported(self, device: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        docs = []
        for table, loader in ((S.desired, load_desired), (S.reported, load_reported)):
            found = self.store.skipped.load(table.name, self._rows(sa.select(table).where(table.c.device == device)),
                                            loader)
            docs.append(found[0].model_dump(mode="json") if found else None)
        return docs[0], docs[1]

    def device_executions(self, device: str, limit: int = 50) -> list[dict[str, Any]]:
        """The device's part in each rollout, newest rollout first, with the rollout's artifact."""
        x, r = S.executions, S.rollouts
        q = (sa.select(x, r.c.seq).join(r, r.c.id == x.c.rollout).where(x.c.device == device)
             .order_by(r.c.seq.desc()).limit(limit))
        rows = [{k: v for k, v in row.items() if k != "seq"} for row in self._rows(q)]
        return [_execution(e) for e in self.store.skipped.load("executions", rows, Execution.from_row)]

    # --- events -------------------------------------------------------------------------------

    def events(self, f: EventFilter, *, cursor: str | None = None, limit: int = 100) -> Page:
        """Events newest first (by id: the device's clock at their making), filtered, a page at a time."""
        e = S.events
        after = decode_cursor(cursor, ULID_PATTERN[1:-1])
        q = sa.select(*[e.c[n] for n in ("rowid", *EVENT_COLUMNS)]).order_by(e.c.id.desc()).limit(_limit(limit) + 1)
        if after is not None:
            q = q.where(e.c.id < after)
        for column, value in (("device", f.device), ("camera", f.camera), ("kind", f.kind)):
            if value is not None:
                q = q.where(e.c[column] == value)
        if f.since is not None:
            q = q.where(e.c.captured_at >= f.since)
        if f.until is not None:
            q = q.where(e.c.captured_at < f.until)
        rows = self._rows(q)
        more = len(rows) > limit
        events = self.store.skipped.load("events", rows[:limit], load_event)
        for event in events:
            event.pop("rowid", None)
        return Page(events, encode_cursor(rows[limit - 1]["id"]) if more else None)

    def alerts_by_rule(self, since: float) -> list[dict[str, Any]]:
        """Alert events captured since ``since``, counted by rule in the database."""
        e = S.events
        rule = self._json(e.c.payload, "rule").label("rule")
        q = (sa.select(rule, sa.func.count().label("alerts"))
             .where(e.c.kind == "alert", e.c.captured_at >= since).group_by(rule).order_by(sa.desc("alerts")))
        return self._rows(q)

    def oldest_event(self) -> float | None:
        """When the oldest stored event was captured: how far back the data goes (an index's first entry)."""
        with self.store.engine.connect() as c:
            return c.execute(sa.select(sa.func.min(S.events.c.captured_at))).scalar()

    # --- rollouts -----------------------------------------------------------------------------

    def rollouts(self, *, cursor: str | None = None, limit: int = 50, state: str | None = None) -> Page:
        """Rollouts newest first, each with its stage counts."""
        r = S.rollouts
        before = decode_cursor(cursor, r"[0-9]{1,19}")
        q = sa.select(r).order_by(r.c.seq.desc()).limit(_limit(limit) + 1)
        if before is not None:
            q = q.where(r.c.seq < int(before))
        if state is not None:
            q = q.where(r.c.state == state)
        rows = self._rows(q)
        more = len(rows) > limit
        loaded = self.store.skipped.load("rollouts", rows[:limit], Rollout.from_row)
        counts = self._stage_counts([x.id for x in loaded])
        items = [_rollout(x, counts.get(x.id, {})) for x in loaded]
        return Page(items, encode_cursor(rows[limit - 1]["seq"]) if more else None)

    def rollout(self, rollout_id: str, *, executions: int = 500) -> dict[str, Any] | None:
        """One rollout: spec, stages, failures with their reasons, and its executions (stage order)."""
        r, x = S.rollouts, S.executions
        found = self.store.skipped.load("rollouts", self._rows(sa.select(r).where(r.c.id == rollout_id)),
                                        Rollout.from_row)
        if not found:
            return None
        doc = _rollout(found[0], self._stage_counts([rollout_id]).get(rollout_id, {}))
        rows = self._rows(sa.select(x).where(x.c.rollout == rollout_id).order_by(x.c.stage, x.c.device)
                          .limit(executions))
        doc["executions"] = [_execution(e) for e in self.store.skipped.load("executions", rows, Execution.from_row)]
        failed = self._rows(sa.select(x.c.device, x.c.reason).where(x.c.rollout == rollout_id, x.c.state == "failed")
                            .order_by(x.c.finished_at).limit(100))
        doc["failures"] = failed
        return doc

    def _stage_counts(self, rollouts: list[str]) -> dict[str, dict[int, dict[str, int]]]:
        """rollout -> stage -> execution state -> devices, in one GROUP BY."""
        if not rollouts:
            return {}
        x = S.executions
        q = (sa.select(x.c.rollout, x.c.stage, x.c.state, sa.func.count().label("n"))
             .where(x.c.rollout.in_(rollouts)).group_by(x.c.rollout, x.c.stage, x.c.state))
        out: dict[str, dict[int, dict[str, int]]] = {}
        for row in self._rows(q):
            out.setdefault(row["rollout"], {}).setdefault(row["stage"], {})[row["state"]] = row["n"]
        return out

    def rollouts_by_state(self) -> dict[str, int]:
        r = S.rollouts
        return {row["state"]: row["n"] for row in
                self._rows(sa.select(r.c.state, sa.func.count().label("n")).group_by(r.c.state))}

    def devices_by_state(self) -> dict[str, int]:
        d = S.devices
        state = sa.func.coalesce(d.c.state, "unknown").label("state")
        return {row["state"]: row["n"] for row in self._rows(sa.select(state, sa.func.count().label("n"))
                                                                .group_by(state))}

    # --- registry -----------------------------------------------------------------------------

    def artifacts(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Models and policies in the registry (their manifests' labels left out)."""
        out = []
        for doc in self.store.artifacts(kind):
            manifest = doc.get("manifest") or {}
            out.append({k: v for k, v in doc.items() if k not in ("manifest", "signature")} | {
                "task": manifest.get("task"), "signed": bool(doc.get("signature"))})
        return out

    def store_bytes(self) -> int | None:
        """The store's size on disk (SQLite: the file and its WAL; PostgreSQL: the database)."""
        if self.store.path is not None:
            total = 0
            for suffix in ("", "-wal"):
                try:
                    total += (self.store.path.parent / (self.store.path.name + suffix)).stat().st_size
                except OSError:
                    pass
            return total
        with self.store.engine.connect() as c:
            return c.execute(sa.text("SELECT pg_database_size(current_database())")).scalar()


@functools.lru_cache(maxsize=8)
def _newest_health(devices: int) -> sa.CompoundSelect:
    """Each of ``devices`` devices' newest health events (bound as d0, d1, ...): built once
    per page size, since building a statement of a hundred parts costs more than running it."""
    e = S.events
    ranges = [sa.select(e.c.rowid, e.c.device, e.c.camera).where(e.c.device == sa.bindparam(f"d{i}"),
                                                                   e.c.kind == "health")
              .order_by(e.c.id.desc()).limit(LATEST_READ).subquery() for i in range(devices)]
    return sa.union_all(*[sa.select(r) for r in ranges])


def _rollout(r: Rollout, counts: Mapping[int, Mapping[str, int]]) -> dict[str, Any]:
    stages = []
    lower = 0
    for k, upper in enumerate(r.spec.bounds):
        mine = dict(counts.get(k, {}))
        stages.append({"stage": k, "name": "canary" if k == 0 and r.spec.canary else f"wave {k + (0 if r.spec.canary else 1)}",
                       "devices": upper - lower, "counts": mine,
                       "finished": sum(n for s, n in mine.items() if s in FINISHED),
                       "failed": mine.get("failed", 0)})
        lower = upper
    return {"id": r.id, "seq": r.seq, "state": r.state, "reason": r.reason, "stage": r.stage, "kind": r.spec.kind,
            "name": r.spec.name, "version": r.spec.version, "slot": r.spec.slot,
            "target": r.spec.target.model_dump(exclude_none=True), "devices": len(r.spec.devices),
            "canary": r.spec.canary, "waves": r.spec.waves, "health_window_s": r.spec.health_window_s,
            "abort_failure_pct": r.spec.abort_failure_pct, "created_by": r.created_by, "created_at": r.created_at,
            "updated_at": r.updated_at, "stages": stages}


def _execution(e: Execution) -> dict[str, Any]:
    return {"rollout": e.rollout, "device": e.device, "stage": e.stage, "state": e.state, "job_state": e.job_state,
            "reason": e.reason, "previous": e.previous.artifact.version if e.previous else None,
            "assigned_at": e.assigned_at, "active_at": e.active_at, "finished_at": e.finished_at,
            "revert": e.revert, "revert_reason": e.revert_reason, "updated_at": e.updated_at}


def _json_text(dialect: str):
    """A JSON text column's string member, in the store's dialect; NULL (never an error
    that fails the whole query) for a row whose text is not JSON."""
    if dialect == "postgresql":  # a cast to json raises on bad text, and PostgreSQL 15 has no IS JSON
        return lambda column, key: sa.func.substring(column, sa.literal(f'"{key}": ?"([^"\\\\]*)"'))
    return lambda column, key: sa.case((sa.func.json_valid(column) == 1, sa.func.json_extract(column, f"$.{key}")))
