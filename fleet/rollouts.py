"""Staged rollouts: canary, growing waves, health gates, abort and rollback.

A rollout puts one artifact version (a model in a slot, or a policy) on a fixed list of
devices, resolved from ids or tags when it starts, in stages: a canary of N devices,
then waves that reach a cumulative share of the target (``10%,50%,100%``). Each device
has one *execution*, whose job id is the rollout id. The rules, after AWS IoT Jobs'
abort config and hawkBit's rollout groups:

- **success**: the device reported ``active`` or ``committed`` for the job, and has
  then been online, with no ``failed``/``rolled_back``, for the health window
  (the clock restarts when the device comes back online);
- **failure**: ``failed`` or ``rolled_back`` from the device, at any time, even after
  it had counted as a success;
- **timed out** (only with ``job_timeout_s``): not active within that long of its
  assignment; it counts as a failure;
- **flapping**: a device that comes back online ``FLAPS_TO_FAIL`` times while its health
  window runs fails (its window would restart for ever, holding its stage);
- a stage **advances** when every device in it has succeeded or failed (an offline
  device holds its stage until it returns, or until it times out; it finds its desired
  state retained either way);
- the rollout **aborts** when, after ``min_executed`` executions have finished,
  ``failed / finished >= abort_failure_pct``; devices not yet assigned are skipped and
  every assigned device is sent back to the version it ran before (job ``<id>-rb``).

The engine runs on the leading manager's control thread only; its state is in memory
and every change is written to the store (``flush``) before the desired states it made
are published. Job statuses reach it through the store, where every manager's control
link puts them (:meth:`Engine.judge`), so a status sent while the leader changes is not
lost. On a restart, or in the manager that takes the lease over, it loads the store and
carries on.

Stored times are wall time; every interval (health windows, job timeouts) is measured
on the monotonic clock (:class:`Elapsed`), so a step of the manager's clock neither
stalls a rollout nor passes every window at once.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Hashable, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from edge.core.contract import ID_PATTERN, JOB_STATES, POLICY_SLOT, Assignment, Desired, JobStatus, Reported, loads
from edge.core.logs import fields

from .desired import DesiredBook, desired_row, load_desired, load_reported, reported_row
from .errors import OpError
from .registry import Registry
from .store import Fence, JobRow, Loader, Store, load_job

log = logging.getLogger("fleet.rollouts")

ACTIVE = ("running", "paused")
TERMINAL = ("completed", "aborted", "rolled_back")
REVERT_SUFFIX = "-rb"
TAG_KEYS = ("site", "line")
FINISHED = ("succeeded", "failed")
FLAPS_TO_FAIL = 5  # reconnects during one health window that fail the execution
RolloutState = Literal["running", "paused", "completed", "aborted", "rolled_back"]
ExecutionState = Literal["pending", "skipped", "assigned", "in_progress", "active", "succeeded", "failed"]
RevertState = Literal["pending", "done", "failed", "superseded", "impossible"]
# a row of the store is read back into these dataclasses with their own field types checked
_ROW_CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False)


class Target(BaseModel):
    """Device ids, or tags every chosen device must match (``site=plant-a,line=3``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    ids: list[str] | None = Field(default=None, min_length=1, max_length=100_000)
    tags: dict[str, str] | None = None


class StartRequest(BaseModel):
    """What an operator asks for in ``rollouts.start``."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    kind: str = Field(default="model", pattern="^(model|policy)$")
    name: str = Field(min_length=1, max_length=128)
    version: str = Field(min_length=1, max_length=64)
    slot: str | None = Field(default=None, pattern=ID_PATTERN)
    target: Target
    canary: int = Field(default=1, ge=0)
    waves: list[float] = Field(default=[10.0, 50.0, 100.0], min_length=1, max_length=20)
    health_window_s: float = Field(default=300.0, ge=0, le=7 * 86400)
    abort_failure_pct: float = Field(default=20.0, gt=0, le=100)
    min_executed: int = Field(default=3, ge=1)
    job_timeout_s: float | None = Field(default=None, gt=0)


class Spec(BaseModel):
    """A rollout as started: the artifact, the resolved devices in order, the stage bounds."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    kind: str
    name: str
    version: str
    sha256: str
    slot: str
    target: Target
    devices: list[str]
    bounds: list[int] = Field(min_length=1)  # stage k holds devices[bounds[k-1]:bounds[k]]
    canary: int
    waves: list[float]
    health_window_s: float
    abort_failure_pct: float
    min_executed: int
    job_timeout_s: float | None = None  # None: a device may take as long as it needs


@dataclass
class Rollout:
    __pydantic_config__ = _ROW_CONFIG

    id: str
    seq: int
    spec: Spec
    state: RolloutState
    stage: int
    created_by: str
    created_at: float
    updated_at: float
    reason: str | None = None

    def row(self) -> dict[str, Any]:
        return {"id": self.id, "seq": self.seq, "kind": self.spec.kind, "slot": self.spec.slot,
                "state": self.state, "stage": self.stage, "spec": self.spec.model_dump_json(),
                "reason": self.reason, "created_by": self.created_by, "created_at": self.created_at,
                "updated_at": self.updated_at}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "Rollout":
        """A ``rollouts`` row, or ValueError."""
        doc = {k: v for k, v in row.items() if k not in ("kind", "slot")}  # the spec's, for queries
        doc["spec"] = loads(doc["spec"])
        r = _ROLLOUT_ROW.validate_python(doc)
        if not 0 <= r.stage < len(r.spec.bounds):
            raise ValueError(f"stage {r.stage} of a rollout with {len(r.spec.bounds)} stages")
        return r


class Elapsed:
    """Time since wall-time stamps, measured on the monotonic clock.

    A stamp is placed on the monotonic clock the first time it is seen under its key
    (how long ago it was by the wall clock then, never less than zero); from then on
    the time since it is monotonic time, whatever the wall clock does."""

    def __init__(self, mono: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self._mono = mono
        self._wall = wall
        self._marks: dict[Hashable, tuple[float, float]] = {}  # key -> (stamp, monotonic time of it)
        self._seen: set[Hashable] = set()

    def since(self, key: Hashable, stamp: float) -> float:
        self._seen.add(key)
        mark = self._marks.get(key)
        if mark is None or mark[0] != stamp:
            mark = self._marks[key] = (stamp, self._mono() - max(0.0, self._wall() - stamp))
        return self._mono() - mark[1]

    def changed(self, key: Hashable, stamp: float) -> bool:
        """Whether ``key`` was seen before with another stamp."""
        mark = self._marks.get(key)
        return mark is not None and mark[0] != stamp

    def prune(self) -> None:
        """Forget the keys not asked about since the last prune (finished executions)."""
        self._marks = {k: v for k, v in self._marks.items() if k in self._seen}
        self._seen = set()


@dataclass
class Execution:
    """One device in one rollout. ``state``: pending (stage not reached), skipped
    (never assigned), assigned, in_progress, active (health clock running), succeeded,
    failed. ``revert``: None, pending, done, failed, superseded, impossible."""

    __pydantic_config__ = _ROW_CONFIG

    rollout: str
    device: str
    stage: int
    state: ExecutionState = "pending"
    job_state: Literal[JOB_STATES] | None = None  # type: ignore[valid-type]
    reason: str | None = None
    previous: Assignment | None = None
    assigned_at: float | None = None
    assigned_version: int | None = None  # the desired version that carried the assignment
    active_at: float | None = None
    finished_at: float | None = None
    revert: RevertState | None = None
    revert_reason: str | None = None
    revert_version: int | None = None
    updated_at: float = 0.0

    def row(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["previous"] = self.previous.model_dump_json() if self.previous else None
        return doc

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "Execution":
        """An ``executions`` row, or ValueError."""
        doc = dict(row)
        doc["previous"] = loads(doc["previous"]) if doc["previous"] else None
        return _EXECUTION_ROW.validate_python(doc)

    @property
    def settled(self) -> bool:
        """Nothing more for its stage to wait on."""
        return self.state in FINISHED or self.revert is not None


@dataclass
class Counters:
    jobs: int = 0
    reported: int = 0
    stale_jobs: int = 0
    rejected: dict[str, int] = field(default_factory=dict)


class Engine:
    """Rollouts, their executions and the devices' desired state; one thread only."""

    def __init__(self, store: Store, registry: Registry, *, elapsed: Elapsed | None = None) -> None:
        self.store = store
        self.elapsed = elapsed or Elapsed()
        self._flaps: dict[tuple[str, str], int] = {}  # (rollout, device) -> reconnects in its health window
        self.registry = registry
        # a row that does not load is skipped (and counted by the store): never a failed start
        self.book = DesiredBook(store.load("desired", load_desired), store.load("reported", load_reported))
        self.rollouts: dict[str, Rollout] = {r.id: r for r in store.load("rollouts", Rollout.from_row)}
        self.executions: dict[str, dict[str, Execution]] = defaultdict(dict)
        for e in store.load("executions", self._load_execution):
            self.executions[e.rollout][e.device] = e
        self.counters = Counters()
        self._rows: dict[tuple[str, str], dict[str, Any]] = {}
        self._judged: set[int] = set()  # job rows judged here, marked so in the store at the next flush
        self._answers: list[dict[str, Any]] = []
        for doc in self.book.all():  # after a key switch: the artifacts as the registry signs them now
            fresh = self._current(doc)
            if fresh != doc:
                self.book.desired[doc.device] = fresh
                self._rows[("desired", doc.device)] = desired_row(fresh)

    def _current(self, doc: Desired) -> Desired:
        def again(a: Assignment | None) -> Assignment | None:
            return a if a is None else a.model_copy(update={"artifact": self.registry.current(a.artifact)})
        return doc.model_copy(update={"models": {s: again(a) for s, a in doc.models.items()},
                                      "policy": again(doc.policy)})

    # --- persistence ----------------------------------------------------------------------

    def _load_execution(self, row: Mapping[str, Any]) -> Execution:
        e = Execution.from_row(row)
        r = self.rollouts.get(e.rollout)
        if r is None or not 0 <= e.stage < len(r.spec.bounds):
            raise ValueError(f"no rollout {e.rollout!r} with a stage {e.stage}")
        return e

    def _save_rollout(self, r: Rollout, now: float) -> None:
        r.updated_at = now
        self._rows[("rollouts", r.id)] = r.row()

    def _save(self, e: Execution, now: float) -> None:
        e.updated_at = now
        self._rows[("executions", f"{e.rollout}/{e.device}")] = e.row()

    def _assign(self, device: str, slot: str, assignment: Assignment, now: float) -> Desired:
        assignment = assignment.model_copy(update={"artifact": self.registry.current(assignment.artifact)})
        doc = self.book.assign(device, slot, assignment, now)
        self._rows[("desired", device)] = desired_row(doc)
        return doc

    def flush(self, fence: Fence | None = None) -> list[Desired]:
        """Commit what changed (under ``fence``: LeaseLost once another manager leads);
        returns the desired states now safe to publish."""
        if self._rows or self._judged or self._answers:
            writes: dict[str, list[dict[str, Any]]] = defaultdict(list)
            for (table, _), row in self._rows.items():
                writes[table].append(row)
            self.store.commit(dict(writes), ROW_LOADERS, judged=self._judged, answers=self._answers, fence=fence)
            self._rows, self._judged, self._answers = {}, set(), []
        return self.book.take_unpublished()

    def answered(self, identity: str, request_id: str, response: str, now: float) -> None:
        """Keep an answer to a request that changed something, committed with the change."""
        self._answers.append({"identity": identity, "id": request_id, "response": response, "at": now})

    # --- what devices say --------------------------------------------------------------------

    def judge(self, pending: list[tuple[int, JobRow]], now: float) -> None:
        """Job statuses as the store holds them (any manager may have stored them), each once."""
        for rowid, status in pending:
            if rowid in self._judged:
                continue
            self._judged.add(rowid)
            if status.state not in JOB_STATES:  # a row no device could have sent
                self._reject("schema", f"{status.device} job {status.job}: state {status.state!r}")
                continue
            self.on_job(status, now)

    def on_job(self, status: JobStatus | JobRow, now: float) -> None:
        self.counters.jobs += 1
        revert = status.job.endswith(REVERT_SUFFIX)
        rid = status.job[:-len(REVERT_SUFFIX)] if revert else status.job
        r = self.rollouts.get(rid)
        e = self.executions.get(rid, {}).get(status.device)
        if r is None or e is None:
            self.counters.stale_jobs += 1  # a job of another manager's store, or from before a reset
            return
        if revert:
            return self._revert_status(e, status, now)
        if status.sha256 != r.spec.sha256 or status.slot != r.spec.slot:
            return self._reject("job_mismatch", f"{status.device} job {status.job} names another artifact or slot")
        e.job_state = status.state
        if e.revert is not None:  # sent back already: what the old job does now judges nothing
            self._save(e, now)
            return
        if status.state in ("downloading", "verifying", "testing"):
            if e.state == "assigned":
                e.state = "in_progress"
        elif status.state in ("active", "committed"):
            if e.state in ("assigned", "in_progress"):
                self._activate(e, rid, now)
        elif e.state in ("assigned", "in_progress", "active", "succeeded"):  # failed, rolled_back
            e.state, e.finished_at = "failed", now
            e.reason = f"{status.state}: {status.reason or 'no reason given'}"
            log.warning("execution failed", extra=fields(rollout=rid, device=e.device, reason=e.reason))
        self._save(e, now)

    def _revert_status(self, e: Execution, status: JobStatus, now: float) -> None:
        if e.revert != "pending":
            return
        if status.state in ("active", "committed"):
            e.revert = "done"
        elif status.state in ("failed", "rolled_back"):
            e.revert, e.revert_reason = "failed", f"{status.state}: {status.reason or 'no reason given'}"
        self._save(e, now)

    def on_reported(self, rep: Reported, now: float) -> None:
        self.counters.reported += 1
        self.book.reported[rep.device] = rep
        self._rows[("reported", rep.device)] = reported_row(rep, now)
        for rid, execs in self.executions.items():
            e = execs.get(rep.device)
            if e is None:
                continue
            r = self.rollouts[rid]
            running = self.book.running(rep.device, r.spec.slot)
            if (e.revert == "pending" and e.previous is not None and running == e.previous.artifact.sha256
                    and (rep.desired_version or 0) >= (e.revert_version or 0)):
                e.revert = "done"
                self._save(e, now)
            elif (e.state in ("assigned", "in_progress") and e.revert is None and running == r.spec.sha256
                  and (rep.desired_version or 0) >= (e.assigned_version or 0)):
                # it runs the artifact and has acted on the assignment: it already ran it (a
                # device sends no job for that), or the job's own statuses were lost
                self._activate(e, rid, now)
                e.job_state = "active"
                self._save(e, now)

    def _reject(self, reason: str, detail: str) -> None:
        self.counters.rejected[reason] = self.counters.rejected.get(reason, 0) + 1
        log.warning("rejected", extra=fields(reason=reason, detail=detail[:200]))

    # --- the clock -------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Judge health windows, abort, advance stages."""
        live = [r for r in self.rollouts.values() if r.state in ACTIVE]
        if not live:
            return
        # the states of the devices in a health window only: the registry may hold thousands more
        watched = [e.device for r in live for e in self.executions[r.id].values()
                   if e.state == "active" and e.revert is None]
        devices = self.store.device_states(watched) if watched else {}
        for r in live:
            execs = self.executions[r.id]
            timeout = r.spec.job_timeout_s
            for e in execs.values():
                if e.state == "active" and e.revert is None:
                    health = self._health(e, r, devices.get(e.device))
                    if health == "healthy":
                        e.state, e.finished_at = "succeeded", now
                        self._save(e, now)
                    elif health == "flapping":
                        e.state, e.finished_at = "failed", now
                        e.reason = (f"flapping: back online {FLAPS_TO_FAIL} times within its "
                                    f"{r.spec.health_window_s:g}s health window")
                        log.warning("execution failed: device flapping", extra=fields(rollout=r.id, device=e.device))
                        self._save(e, now)
                elif (timeout and e.state in ("assigned", "in_progress") and e.revert is None
                      and e.assigned_at is not None
                      and self.elapsed.since(("assigned", r.id, e.device), e.assigned_at) > timeout):
                    e.state, e.finished_at = "failed", now
                    e.reason = f"timed_out: not active within {timeout:g}s of its assignment"
                    log.warning("execution timed out", extra=fields(rollout=r.id, device=e.device))
                    self._save(e, now)
            done = [e for e in execs.values() if e.state in FINISHED]
            failed = sum(1 for e in done if e.state == "failed")
            if len(done) >= r.spec.min_executed and failed * 100 >= r.spec.abort_failure_pct * len(done):
                first = next((e for e in done if e.state == "failed"), None)
                reason = (f"failure threshold: {failed} of {len(done)} finished executions failed "
                          f"({100 * failed / len(done):.0f}% >= {r.spec.abort_failure_pct:g}%)")
                if first:
                    reason += f"; first: {first.device}: {first.reason}"
                self._end(r, "aborted", reason, now)
                continue
            if r.state != "running":
                continue
            if all(e.settled for e in execs.values() if e.stage == r.stage):
                if r.stage + 1 < len(r.spec.bounds):
                    r.stage += 1
                    self._assign_stage(r, now)
                else:
                    r.state, r.reason = "completed", None
                    log.info("rollout completed", extra=fields(rollout=r.id))
                self._save_rollout(r, now)
        self.elapsed.prune()

    def _activate(self, e: Execution, rollout: str, now: float) -> None:
        e.state, e.active_at = "active", now
        # its health clock starts on the monotonic clock now: a wall clock stepped before the
        # next tick must not pass (or stretch) the window
        self.elapsed.since(("active", rollout, e.device), now)

    def _health(self, e: Execution, r: Rollout, device: dict[str, Any] | None) -> str:
        """healthy, flapping, or waiting: online for the health window since it became
        active and since it last came back online, both timed on the monotonic clock."""
        if device is None or e.active_at is None:
            return "waiting"
        active_for = self.elapsed.since(("active", r.id, e.device), e.active_at)
        online = ("online", r.id, e.device)
        if device["state"] != "online":
            self.elapsed.since(online, -1.0)  # the next online stamp is a reconnect
            return "waiting"
        since = device["since"] or 0.0
        if self.elapsed.changed(online, since):
            flaps = self._flaps[(r.id, e.device)] = self._flaps.get((r.id, e.device), 0) + 1
            if flaps >= FLAPS_TO_FAIL:
                self._flaps.pop((r.id, e.device), None)
                return "flapping"
        online_for = self.elapsed.since(online, since)
        if min(active_for, online_for) >= r.spec.health_window_s:
            self._flaps.pop((r.id, e.device), None)
            return "healthy"
        return "waiting"

    def _assign_stage(self, r: Rollout, now: float) -> None:
        artifact = self.store.find_artifact(r.spec.kind, r.spec.name, r.spec.version)
        assert artifact is not None  # checked at start; versions are never deleted
        for e in self.executions[r.id].values():
            if e.stage != r.stage or e.state != "pending":
                continue
            e.previous = self._previous(e.device, r.spec.slot, r.spec.kind)
            doc = self._assign(e.device, r.spec.slot, Assignment(artifact=artifact, job=r.id), now)
            e.state, e.assigned_at, e.assigned_version = "assigned", now, doc.version
            self._save(e, now)
        log.info("stage assigned", extra=fields(rollout=r.id, stage=r.stage,
                                                devices=r.spec.bounds[r.stage] - _lower(r, r.stage)))

    def _previous(self, device: str, slot: str, kind: str) -> Assignment | None:
        """What to send the device back to: the artifact it reports running, if the
        registry knows it, else what it was last assigned."""
        running = self.book.running(device, slot)
        if running:
            artifact = self.store.artifact_by_sha(running, kind)
            if artifact is not None:
                return Assignment(artifact=artifact, job=None)
        return self.book.slot(device, slot)

    def _end(self, r: Rollout, state: str, reason: str, now: float) -> None:
        r.state, r.reason = state, reason
        self._save_rollout(r, now)
        for e in self.executions[r.id].values():
            if e.state == "pending":
                e.state = "skipped"
                self._save(e, now)
            elif e.state != "skipped" and e.revert is None:
                self._revert(r, e, now)
        log.warning(f"rollout {state}", extra=fields(rollout=r.id, reason=reason))

    def _revert(self, r: Rollout, e: Execution, now: float) -> None:
        current = self.book.slot(e.device, r.spec.slot)
        if current is None or current.job != r.id:
            e.revert, e.revert_reason = "superseded", "the device has been assigned something else since"
        elif e.previous is None:
            e.revert, e.revert_reason = "impossible", "no previous version of this slot is known"
        else:
            doc = self._assign(e.device, r.spec.slot,
                               Assignment(artifact=e.previous.artifact, job=r.id + REVERT_SUFFIX), now)
            e.revert, e.revert_version = "pending", doc.version
        self._save(e, now)

    # --- operations ------------------------------------------------------------------------------

    def start(self, req: StartRequest, *, by: str, now: float) -> Rollout:
        slot = POLICY_SLOT if req.kind == "policy" else req.slot
        if slot is None:
            raise OpError("bad_request", "a model rollout needs --slot")
        if req.kind == "model" and slot == POLICY_SLOT:
            raise OpError("bad_request", f"slot {POLICY_SLOT!r} is the policy's")
        artifact = self.store.find_artifact(req.kind, req.name, req.version)
        if artifact is None:
            known = [a["version"] for a in self.store.artifacts(req.kind, req.name)]
            hint = f" (known versions: {', '.join(known)})" if known else f" (no {req.kind} of that name)"
            raise OpError("not_found", f"unknown {req.kind} {req.name}@{req.version}{hint}")
        self.registry.check(artifact)
        busy = [r for r in self.rollouts.values() if r.state in ACTIVE and r.spec.slot == slot]
        if busy:
            raise OpError("conflict", f"rollout {busy[0].id} is {busy[0].state} on slot {slot!r}; "
                                      "wait for it, or abort it first")
        devices = self._resolve(req.target)
        bounds = _bounds(len(devices), req.canary, req.waves)
        seq = max((r.seq for r in self.rollouts.values()), default=0) + 1
        spec = Spec(kind=req.kind, name=req.name, version=req.version, sha256=artifact.sha256, slot=slot,
                    target=req.target, devices=devices, bounds=bounds, canary=min(req.canary, len(devices)),
                    waves=req.waves, health_window_s=req.health_window_s,
                    abort_failure_pct=req.abort_failure_pct, min_executed=req.min_executed,
                    job_timeout_s=req.job_timeout_s)
        r = Rollout(id=f"r{seq:04d}", seq=seq, spec=spec, state="running", stage=0, created_by=by,
                    created_at=now, updated_at=now)
        self.rollouts[r.id] = r
        for i, device in enumerate(devices):
            stage = next(k for k, b in enumerate(bounds) if i < b)
            e = self.executions[r.id][device] = Execution(rollout=r.id, device=device, stage=stage)
            self._save(e, now)
        self._assign_stage(r, now)
        self._save_rollout(r, now)
        log.info("rollout started", extra=fields(rollout=r.id, artifact=f"{req.name}@{req.version}", slot=slot,
                                                 devices=len(devices), stages=bounds, by=by))
        return r

    def _resolve(self, target: Target) -> list[str]:
        if (target.ids is None) == (target.tags is None):
            raise OpError("bad_request", "the target is either device ids or tags, not both or neither")
        known = self.store.device_states()
        revoked = {i.name for i in self.store.identities("device") if i.state == "revoked"}
        if target.ids is not None:
            ids = list(dict.fromkeys(target.ids))
            bad = [d for d in ids if not re.fullmatch(ID_PATTERN, d)]
            unknown = [d for d in ids if d not in known]
            if bad or unknown:
                raise OpError("not_found" if not bad else "bad_request",
                              f"unknown devices: {', '.join((bad or unknown)[:10])}")
            if revoked & set(ids):
                raise OpError("bad_request", f"revoked devices cannot take a rollout: "
                                             f"{', '.join(sorted(revoked & set(ids))[:10])}")
            chosen = ids
        else:
            tags = target.tags or {}
            extra = set(tags) - set(TAG_KEYS)
            if extra or not tags:
                raise OpError("bad_request", f"tags are {' and '.join(TAG_KEYS)}; got {sorted(tags) or 'none'}")
            chosen = sorted(d for d, s in known.items()
                            if d not in revoked and all(s.get(k) == v for k, v in tags.items()))
        if not chosen:
            raise OpError("empty_target", f"the target matches no known device: {target.model_dump(exclude_none=True)}")
        # online devices first, so the canary is a device that can answer now
        online = {d for d in chosen if known[d]["state"] == "online"}
        return [d for d in chosen if d in online] + [d for d in chosen if d not in online]

    def get(self, rollout_id: Any) -> Rollout:
        if not isinstance(rollout_id, str) or rollout_id not in self.rollouts:
            raise OpError("not_found", f"no rollout {rollout_id!r}")
        return self.rollouts[rollout_id]

    def pause(self, rollout_id: str, now: float) -> Rollout:
        r = self.get(rollout_id)
        if r.state != "running":
            raise OpError("bad_state", f"rollout {r.id} is {r.state}, not running")
        r.state = "paused"
        self._save_rollout(r, now)
        return r

    def resume(self, rollout_id: str, now: float) -> Rollout:
        r = self.get(rollout_id)
        if r.state != "paused":
            raise OpError("bad_state", f"rollout {r.id} is {r.state}, not paused")
        r.state = "running"
        self._save_rollout(r, now)
        return r

    def abort(self, rollout_id: str, *, by: str, reason: str | None, now: float) -> Rollout:
        r = self.get(rollout_id)
        if r.state not in ACTIVE:
            raise OpError("bad_state", f"rollout {r.id} is already {r.state}")
        self._end(r, "aborted", f"aborted by {by}" + (f": {reason}" if reason else ""), now)
        return r

    def rollback(self, rollout_id: str, *, device: str | None, by: str, now: float) -> Rollout:
        r = self.get(rollout_id)
        if device is None:
            if r.state in ("aborted", "rolled_back"):
                raise OpError("bad_state", f"rollout {r.id} is {r.state}: its devices are already sent back")
            self._end(r, "rolled_back", f"rolled back by {by}", now)
            return r
        e = self.executions[r.id].get(device)
        if e is None:
            raise OpError("not_found", f"device {device!r} is not in rollout {r.id}")
        if e.state in ("pending", "skipped"):
            raise OpError("bad_state", f"device {device} was never assigned by rollout {r.id}")
        if e.revert is not None:
            raise OpError("bad_state", f"device {device} is already sent back ({e.revert})")
        self._revert(r, e, now)
        log.info("device rolled back", extra=fields(rollout=r.id, device=device, by=by, revert=e.revert))
        return r

    # --- views ---------------------------------------------------------------------------------

    def status(self, r: Rollout) -> dict[str, Any]:
        execs = list(self.executions[r.id].values())
        stages = []
        for k in range(len(r.spec.bounds)):
            mine = [e for e in execs if e.stage == k]
            stages.append({"stage": k, "name": "canary" if k == 0 and r.spec.canary else f"wave {k + (0 if r.spec.canary else 1)}",
                           "devices": len(mine), **_count(e.state for e in mine)})
        done = [e for e in execs if e.state in FINISHED]
        failures = [{"device": e.device, "reason": e.reason} for e in execs if e.state == "failed"]
        return {
            "id": r.id, "state": r.state, "reason": r.reason, "stage": r.stage, "kind": r.spec.kind,
            "name": r.spec.name, "version": r.spec.version, "sha256": r.spec.sha256, "slot": r.spec.slot,
            "target": r.spec.target.model_dump(exclude_none=True), "devices": len(execs),
            "health_window_s": r.spec.health_window_s, "abort_failure_pct": r.spec.abort_failure_pct,
            "min_executed": r.spec.min_executed, "job_timeout_s": r.spec.job_timeout_s, "created_by": r.created_by, "created_at": r.created_at,
            "updated_at": r.updated_at, "stages": stages, "counts": _count(e.state for e in execs),
            "finished": len(done), "failed": len(failures), "failures": failures[:20],
            "reverts": _count(e.revert for e in execs if e.revert is not None),
            "settled": r.state in TERMINAL and all(e.revert != "pending" for e in execs),
        }

    def device_view(self, device: str) -> dict[str, Any]:
        desired = self.book.desired.get(device)
        reported = self.book.reported.get(device)
        executions = [{**{k: v for k, v in e.row().items() if k != "previous"},
                       "previous": e.previous.artifact.version if e.previous else None}
                      for rid in sorted(self.executions) for e in [self.executions[rid].get(device)] if e]
        if desired is None and reported is None and not executions:
            raise OpError("not_found", f"no desired or reported state for device {device!r}")
        return {"device": device, "desired": desired.model_dump(mode="json") if desired else None,
                "reported": reported.model_dump(mode="json") if reported else None,
                "executions": executions, "jobs": self.store.jobs(device=device, limit=50),
                "clock_skew_s": self.store.clock_skew(device)}



_ROLLOUT_ROW = TypeAdapter(Rollout)
_EXECUTION_ROW = TypeAdapter(Execution)
# how each table the engine writes is read back: checked before every commit, used at start
ROW_LOADERS: dict[str, Loader[Any]] = {"desired": load_desired, "reported": load_reported, "rollouts": Rollout.from_row,
                                       "executions": Execution.from_row, "jobs": load_job}


def _bounds(total: int, canary: int, waves: list[float]) -> list[int]:
    """Cumulative device counts at the end of each stage, strictly growing."""
    if any(not 0 < w <= 100 for w in waves) or any(b <= a for a, b in zip(waves, waves[1:])):
        raise OpError("bad_request", "waves are growing percentages in (0, 100], e.g. 10%,50%,100%")
    if waves[-1] != 100:
        raise OpError("bad_request", "the last wave must reach 100% of the target")
    bounds: list[int] = []
    for n in [min(canary, total)] + [math.ceil(w * total / 100 - 1e-9) for w in waves]:
        if n > (bounds[-1] if bounds else 0):
            bounds.append(n)
    return bounds


def _lower(r: Rollout, stage: int) -> int:
    return r.spec.bounds[stage - 1] if stage else 0


def _count(values: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out
