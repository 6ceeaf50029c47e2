"""The model agent: takes the models and policy the fleet wants, safely, and says how it went.

It follows ``{p}/dev/{id}/desired`` (retained, versioned, signed by the fleet: a
document that does not verify with a pinned key is refused before anything about it
is kept, its version included). For each slot whose artifact
differs from what runs, one job goes: downloading → verifying → testing → active →
committed, or ends in failed(reason) or rolled_back(reason); every step is published
on ``{p}/dev/{id}/job/{job}`` and what runs on ``{p}/dev/{id}/reported`` (retained).

Threads: the agent's MQTT link (its own client) only decodes, hands over and
publishes; one worker thread downloads, verifies, smoke-tests, swaps and watches, so
neither the link nor any frame ever waits on that work. The previous model stays
loaded until the new one is committed, so a rollback is one more swap.
"""

from __future__ import annotations

import errno
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.subscribeoptions import SubscribeOptions
from pydantic import ValidationError

from edge.config import AgentConfig, DeviceConfig
from edge.core.contract import (
    POLICY_SLOT,
    Artifact,
    Assignment,
    Change,
    ContractError,
    Desired,
    JobStatus,
    Reported,
    Topics,
    decode_chunk,
    decode_desired,
    encode,
)
from edge.core.errors import ConfigError
from edge.core.link import Link, publish
from edge.core.logs import fields
from edge.core.signing import KeyFileError, SignatureError, key_id, load_public_key, verify, verify_file
from edge.inference.manifest import Manifest
from edge.inference.model import Model
from edge.schedule.scheduler import CameraRunner, Scheduler
from edge.sync.client import link_settings
from edge.sync.events import model_event

from .download import Downloader, DownloadError, DownloadSettings
from .health import HealthLimits, HealthWatch, Verdict, Window
from .modelstore import CrashLoop, Entry, ModelStore, SlotState, StoreError
from .smoke import RuntimeOptions, SmokeError, SmokeResult, load_model, smoke_test

log = logging.getLogger("edge.agent")

ApplyPolicy = Callable[..., str]  # apply_policy(text, *, source) -> policy version; raises if invalid
ReleasePolicy = Callable[[], None]  # the fleet no longer assigns a policy: the device's own takes over


class Appender(Protocol):
    def append(self, event: Any) -> Any: ...


class Refused(Exception):
    """A job step said no; ``reason`` is what the fleet sees first."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def unexpected(exc: Exception) -> Refused:
    """A job's unexpected error as the reason the fleet sees: a full or read-only disk by
    name, anything else by its type."""
    errno_reason = {errno.ENOSPC: "disk_full", errno.EDQUOT: "disk_full", errno.EROFS: "read_only",
                    errno.EACCES: "permission_denied", errno.EPERM: "permission_denied"}
    if isinstance(exc, OSError):
        return Refused(errno_reason.get(exc.errno, "io_error"), f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "))
    log.error("model job failed unexpectedly", exc_info=exc)
    return Refused("internal", f"{type(exc).__name__}: {exc}")


@dataclass
class _Slot:
    """What the agent knows about one model slot of this device."""

    cameras: list[CameraRunner]
    factory: Entry  # the config's model for the slot

    @property
    def budget_ms(self) -> float:
        return min((c.budget_ms for c in self.cameras), default=100.0)


def health_limits(cfg: AgentConfig) -> HealthLimits:
    return HealthLimits(**cfg.health.model_dump(exclude={"unsure_band"}))


class Agent:
    """Start after the scheduler runs; stop before it stops."""

    def __init__(self, cfg: DeviceConfig, store: ModelStore, scheduler: Scheduler, health: HealthWatch,
                 factory: dict[str, Entry], rt: RuntimeOptions, *,
                 apply_policy: ApplyPolicy | None = None, outbox: Appender | None = None,
                 on_models: Callable[[dict[str, str]], None] | None = None,
                 crash_loops: list[CrashLoop] | None = None, release_policy: ReleasePolicy | None = None) -> None:
        assert cfg.agent is not None and cfg.mqtt is not None
        self.release_policy = release_policy
        self.cfg = cfg.agent
        self.device = cfg.device.id
        self.topics = Topics(cfg.mqtt.prefix)
        self.store = store
        self.scheduler = scheduler
        self.health = health
        self.rt = rt
        self.apply_policy = apply_policy
        self.outbox = outbox
        self.on_models = on_models
        self.limits = health_limits(self.cfg)
        self.public_keys = []
        for name, path in self.cfg.pinned():
            try:
                self.public_keys.append(load_public_key(path))
            except KeyFileError as exc:  # the operator's config names it: exit 2, naming the key
                raise ConfigError(f"agent.{name}: {exc}") from None
        self.key_ids = sorted({key_id(k) for k in self.public_keys})
        self.slots = {
            slot: _Slot([c for c in scheduler.cameras if any(t.model == slot for t in c.tasks.values())], entry)
            for slot, entry in factory.items()
        }
        self.counters: dict[str, Any] = {"desired": 0, "stale": 0, "rejected": {}, "jobs": {}}
        self._stop = threading.Event()
        self._out: queue.Queue[tuple[str, bytes, bool]] = queue.Queue()
        self._desired: Desired | None = None
        self._desired_lock = threading.Lock()
        self._wake = threading.Event()
        self._worker_busy = False  # written by the worker; the link polls faster meanwhile
        self._crash_loops = list(crash_loops or [])
        self._previous_models: dict[str, dict[int, Model]] = {}  # slot -> executor index -> model kept for rollback
        state = store.load()  # the daemon loaded what it names (else the config's model)
        self._serving = {slot: (state.slots[slot].active.sha256 if slot in state.slots and state.slots[slot].active
                                else entry.sha256) for slot, entry in factory.items()}
        dl = self.cfg.download
        self.downloader = Downloader(self.device, self.topics, self._send, DownloadSettings(
            retries=dl.retries, chunk_timeout_s=dl.chunk_timeout_s, backoff_initial_s=dl.backoff.initial_s,
            backoff_max_s=dl.backoff.max_s, min_free_bytes=int(dl.min_free_mb * 1024 * 1024)), self._stop)
        self._link = Link(link_settings(cfg.mqtt, self.device, "agent"), self, name="agent-mqtt")
        self._worker = threading.Thread(target=self._work_loop, name="agent", daemon=True)

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._link.start()
        self._worker.start()

    def stop(self, timeout: float = 1.0) -> None:
        """Stop the worker between steps (a download resumes next time) and the link."""
        self._stop.set()
        self._wake.set()
        deadline = time.monotonic() + timeout
        self._worker.join(max(0.05, deadline - time.monotonic() - 0.3))
        self._link.stop(max(0.1, deadline - time.monotonic()))

    @property
    def failed(self) -> bool:
        """The worker or the link ended without a stop (a bug the steps did not catch)."""
        worker_dead = self._worker.ident is not None and not self._worker.is_alive() and not self._stop.is_set()
        return worker_dead or self._link.failed

    def stats(self) -> dict[str, Any]:
        c = self.counters  # other threads add keys to the inner dicts: copy them
        return {**self._link.counters.as_dict(), **c, "rejected": dict(c["rejected"]), "jobs": dict(c["jobs"]),
                "download": dict(self.downloader.counters)}

    # --- link handler (the link's thread) --------------------------------------------------

    def on_connect(self, client: mqtt.Client, session_present: bool) -> None:
        client.subscribe(self.topics.desired(self.device), qos=1)
        # no_local: the chunk topics' wildcard also matches this link's own requests
        client.subscribe(self.topics.artifacts(self.device), options=SubscribeOptions(qos=1, noLocal=True))
        self._publish(client, self.topics.reported(self.device), self._reported(), retain=True)

    def on_message(self, client: mqtt.Client, message: mqtt.MQTTMessage) -> None:
        if message.topic == self.topics.desired(self.device):
            if not message.payload:  # the retained desired state was cleared
                return
            try:
                desired = decode_desired(message.payload, device=self.device)
                verify(self.public_keys, desired)  # before its version or anything else is kept
            except ContractError as exc:
                self._reject(exc.reason, exc.detail, message.topic)
                return
            except SignatureError as exc:
                self._reject(exc.reason, str(exc), message.topic)
                return
            self.counters["desired"] += 1
            with self._desired_lock:
                if self._desired is None or desired.version >= self._desired.version:
                    self._desired = desired
            self._wake.set()
            return
        if message.topic == self.topics.artifact_get(self.device):
            return  # a request of this device's own, not a chunk
        try:
            header, data = decode_chunk(message.payload)
        except ContractError as exc:
            self._reject(exc.reason, exc.detail, message.topic)
            return
        if message.topic != self.topics.artifact(self.device, header.sha256):
            self._reject("wrong_device", "chunk names another artifact than its topic", message.topic)
            return
        self.downloader.deliver(header, data)

    def work(self, client: mqtt.Client) -> float:
        while True:
            try:
                topic, body, retain = self._out.get_nowait()
            except queue.Empty:
                break
            self._publish(client, topic, body, retain=retain)
        return 0.01 if self._worker_busy else 0.2

    def on_stop(self, client: mqtt.Client) -> list[mqtt.MQTTMessageInfo]:
        infos = []
        while True:  # what the worker said last still goes out
            try:
                topic, body, retain = self._out.get_nowait()
            except queue.Empty:
                return infos
            info = self._publish(client, topic, body, retain=retain)
            if info is not None:
                infos.append(info)

    def _reject(self, reason: str, detail: str, topic: str) -> None:
        rejected = self.counters["rejected"]
        rejected[reason] = rejected.get(reason, 0) + 1
        log.warning("message rejected", extra=fields(reason=reason, detail=detail[:200], topic=topic))

    def _publish(self, client: mqtt.Client, topic: str, body: bytes, *, retain: bool = False
                 ) -> mqtt.MQTTMessageInfo | None:
        return publish(client, topic, body, retain=retain)

    def _send(self, topic: str, body: bytes, retain: bool = False) -> None:
        """Publish from the worker: the link thread sends it."""
        self._out.put((topic, body, retain))

    # --- the worker --------------------------------------------------------------------------

    def _work_loop(self) -> None:
        self._step("boot", self._after_boot)
        while not self._stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            with self._desired_lock:
                desired, self._desired = self._desired, None
            if desired is not None and not self._stop.is_set():
                self._worker_busy = True
                try:
                    self._step("desired state", lambda: self._act(desired))
                finally:
                    self._worker_busy = False
            self._step("state file", self._follow_state)

    def _step(self, what: str, step: Callable[[], None]) -> None:
        """Run one step of the worker; an error in it is logged and counted, and the worker
        stays ready for the next desired state (capture and inference go on regardless)."""
        try:
            step()
        except Exception:
            self.counters["worker_errors"] = self.counters.get("worker_errors", 0) + 1
            log.exception("model agent step failed", extra=fields(step=what))

    def _follow_state(self) -> None:
        """Serve what the state file names: a technician's ``edge models rollback`` on a
        running daemon takes effect here, within a second."""
        try:
            state = self.store.load()
        except StoreError as exc:
            log.error("state file unreadable; serving on as before", extra=fields(error=str(exc)))
            return
        for slot, s in state.slots.items():
            entry = s.active
            if slot not in self.slots or entry is None or entry.sha256 == self._serving.get(slot):
                continue
            self._serving[slot] = entry.sha256  # tried once, whatever happens: no retry every second
            try:
                models = self._load_all(self.store.path(entry.sha256), self.store.manifest(entry.sha256))
                self.scheduler.swap(slot, models, self.cfg.swap_timeout_s)
            except Exception as exc:  # the old model keeps serving
                log.exception("model named by the state file not loaded", extra=fields(slot=slot, error=str(exc)))
                continue
            self._previous_models.pop(slot, None)
            log.warning("model changed on the device", extra=fields(slot=slot, model=f"{entry.name}@{entry.version}",
                                                                    sha256=entry.sha256[:12]))
            self._audit("local_change", slot, entry.version, model=entry.name)
            self._models_changed()
            self._send_reported()

    def _after_boot(self) -> None:
        """Report crash-loop rollbacks decided at boot, re-apply the stored policy, and
        watch a model whose health window a restart interrupted."""
        for loop in self._crash_loops:
            reason = (f"crash_loop: {loop.restarts} starts within {self.cfg.crash_loop.minutes:g} min of activating "
                      f"{loop.failed.name} {loop.failed.version}; back on {loop.restored.name} {loop.restored.version}")
            log.error("crash loop: previous model restored", extra=fields(slot=loop.slot, reason=reason))
            self._job(loop.failed.job, loop.slot, loop.failed.sha256, "rolled_back", reason=reason)
            self._audit("rolled_back", loop.slot, loop.failed.version, reason=reason)
        self._send_reported()
        state = self.store.load()
        if self.apply_policy is not None and state.policy.active is not None:
            entry = state.policy.active
            try:
                text = self.store.path(entry.sha256, "policy").read_text()
                self.apply_policy(text, source=f"{entry.name}@{entry.version}")
            except Exception as exc:  # the daemon's own policy stays
                log.error("stored policy not applied", extra=fields(error=str(exc)))
        for slot, s in state.slots.items():
            if slot in self.slots and s.active is not None and not s.active.committed and not self._stop.is_set():
                self._worker_busy = True
                try:
                    running = self.scheduler.executors[0].models[slot].name
                    window = self.health.begin(slot, running, None, self.slots[slot].budget_ms, 0)
                    self._judge(slot, s.active, window, s.previous, {})
                finally:
                    self._worker_busy = False

    def _act(self, desired: Desired) -> None:
        state = self.store.load()
        if state.desired_version is not None and desired.version <= state.desired_version:
            self.counters["stale"] += 1
            log.info("desired state already acted on", extra=fields(version=desired.version,
                                                                    acted=state.desired_version))
            return
        log.info("desired state", extra=fields(version=desired.version, slots=sorted(desired.models),
                                               policy=desired.policy is not None))
        for slot, assignment in sorted(desired.models.items()):
            if self._stop.is_set():
                return  # not acted on: the retained desired state brings it back after a restart
            self._model_job(slot, assignment, desired.version)
        if desired.policy is not None and not self._stop.is_set():
            self._policy_job(desired.policy, desired.version)
        elif desired.policy is None and state.policy.active is not None and not self._stop.is_set():
            self._policy_withdrawn(desired.version)
        if self._stop.is_set():
            return
        with self.store.locked() as st:
            st.desired_version = max(st.desired_version or 0, desired.version)
        self._send_reported()

    # --- one model job ------------------------------------------------------------------------

    def _model_job(self, slot: str, assignment: Assignment, version: int) -> None:
        art = assignment.artifact
        job = assignment.job or f"v{version}-{slot}"
        if slot not in self.slots:
            self._fail(job, slot, art, Refused("unknown_slot", f"this device has no model slot {slot!r}"))
            return
        if self._running(slot).sha256 == art.sha256:
            return
        log.info("model job", extra=fields(job=job, slot=slot, model=art.name, version=art.version,
                                           sha256=art.sha256[:12]))
        try:
            path, manifest = self._fetch(job, slot, art)
            self._job(job, slot, art.sha256, "testing")
            smoke = self._smoke(slot, path, manifest)
            try:
                models = self._load_all(path, manifest)
            except Exception as exc:
                raise Refused("load_error", str(exc)) from None
        except (Refused, SignatureError, DownloadError, SmokeError) as exc:
            self._fail(job, slot, art, exc)
            return
        except Exception as exc:  # a full or read-only disk, a bug: the job fails, the agent goes on
            self._fail(job, slot, art, unexpected(exc))
            return
        self._activate(slot, job, art, version, models, {"smoke_latency_ms": smoke.latency_ms,
                                                          "smoke_limit_ms": smoke.limit_ms})

    def _load_all(self, path: Path, manifest: Manifest) -> list[Model]:
        """One fresh interpreter of the model per executor."""
        return [load_model(path, manifest, self.rt) for _ in self.scheduler.executors]

    def _fetch(self, job: str, slot: str, art: Artifact) -> tuple[Path, Manifest]:
        """The artifact's verified file in the store, downloading what is missing."""
        if art.kind != "model":
            raise Refused("wrong_kind", f"a {art.kind} artifact for model slot {slot}")
        verify(self.public_keys, art)  # before a byte is fetched: an unsigned artifact costs nothing
        try:
            manifest = Manifest.model_validate(art.manifest)
        except ValidationError as exc:
            raise Refused("bad_manifest", str(exc.errors()[0]["msg"])) from None
        return self._download_verified(job, slot, art), manifest

    def _download_verified(self, job: str, slot: str, art: Artifact) -> Path:
        if self.store.has(art):
            self._job(job, slot, art.sha256, "verifying")
            return self.store.path(art.sha256, art.kind)
        part = self.store.part(art.sha256)
        self._job(job, slot, art.sha256, "downloading", progress=0.0)
        steps = [0.25, 0.5, 0.75]

        def progress(done: float) -> None:
            while steps and done >= steps[0]:
                self._job(job, slot, art.sha256, "downloading", progress=steps.pop(0))

        self.downloader.fetch(art, part, progress)
        self._job(job, slot, art.sha256, "verifying")
        try:
            verify_file(art, part)
        except SignatureError:
            part.unlink(missing_ok=True)  # wrong bytes: the next attempt starts over
            raise
        return self.store.admit(art, part)

    def _smoke(self, slot: str, path: Path, manifest: Manifest) -> SmokeResult:
        info = self.slots[slot]
        frame = self.health.recent_frame(c.cfg.id for c in info.cameras)
        if frame is None:
            frame = np.zeros((480, 640, 3), np.uint8)  # no camera has delivered yet
        return smoke_test(path, manifest, frame, budget_ms=info.budget_ms, factor=self.cfg.smoke.latency_factor,
                          invokes=self.cfg.smoke.invokes, rt=self.rt)

    def _activate(self, slot: str, job: str, art: Artifact, version: int, models: list[Model],
                  metrics: dict[str, float]) -> None:
        entry = Entry(sha256=art.sha256, name=art.name, version=art.version, job=job, desired_version=version,
                      activated_at=time.time(), committed=False)
        # the state names the new model before it serves: a kill from here on restarts on it
        # (and watches it again); a kill before this line restarts on the old one
        with self.store.locked() as st:
            s = st.slots.setdefault(slot, SlotState())
            old = s.active or self._factory_in_store(slot)
            prior_previous = s.previous
            s.active, s.previous = entry, old
            st.last_change = Change(slot=slot, at=entry.activated_at, reason=f"activated {art.name} {art.version}",
                                    job=job).model_dump()
        # only this thread ever asks for a swap, so these stay the models being replaced
        replaced = {ex.index: ex.models[slot] for ex in self.scheduler.executors}
        t0 = time.monotonic()
        try:
            self.scheduler.swap(slot, models, self.cfg.swap_timeout_s)
        except TimeoutError as exc:
            # it still happens when the executor gets free: watch it like any other
            log.error("swap slow", extra=fields(slot=slot, error=str(exc)))
        swap_ms = (time.monotonic() - t0) * 1e3
        self._serving[slot] = entry.sha256
        self._previous_models[slot] = replaced
        new_name = models[0].name
        old_name = next(iter(replaced.values())).name if replaced else None
        window = self.health.begin(slot, new_name, old_name, self.slots[slot].budget_ms, self.limits.window_s)
        log.info("model swapped in", extra=fields(slot=slot, model=new_name, replaced=old_name,
                                                  swap_ms=round(swap_ms, 3), job=job))
        self._job(job, slot, art.sha256, "active", metrics={**metrics, "swap_ms": round(swap_ms, 3)})
        self._audit("activated", slot, art.version, model=art.name, job=job)
        self._models_changed()
        self._send_reported()
        self._judge(slot, entry, window, old, {"swap_ms": round(swap_ms, 3)}, prior_previous=prior_previous)

    def _judge(self, slot: str, entry: Entry, window: Window, previous: Entry | None, extra: dict[str, float], *,
               prior_previous: Entry | None = None) -> None:
        """Wait out the health window, then commit or roll back."""
        verdict: Verdict | None = None
        while not self._stop.is_set():
            verdict = self.health.evaluate(window, self.limits)
            if verdict is not None:
                break
            self._stop.wait(0.2)
        if verdict is None:
            return  # stopping: the next start watches it again
        metrics = {**verdict.metrics, **extra}
        if verdict.healthy:
            with self.store.locked() as st:
                st.slots[slot].active = entry.model_copy(update={"committed": True})
                deleted = self.store.gc(st)
            self._previous_models.pop(slot, None)  # the old interpreters may go now
            log.info("model committed", extra=fields(slot=slot, model=window.model, metrics=metrics, deleted=deleted))
            self._job(entry.job, slot, entry.sha256, "committed", metrics=metrics)
            self._audit("committed", slot, entry.version, model=entry.name, job=entry.job)
            self._send_reported()
            return
        self._rollback(slot, entry, previous, prior_previous, verdict.reason or "unhealthy", metrics)

    def _rollback(self, slot: str, entry: Entry, previous: Entry | None, prior_previous: Entry | None,
                  reason: str, metrics: dict[str, float]) -> None:
        if previous is None:
            log.error("unhealthy model has nothing to go back to", extra=fields(slot=slot, reason=reason))
            return
        models = self._previous_models.pop(slot, None)
        try:
            if models is None:  # after a restart the old model is not loaded yet
                loaded = self._load_all(self.store.path(previous.sha256), self.store.manifest(previous.sha256))
            else:
                loaded = [models[ex.index] for ex in self.scheduler.executors]
            self.scheduler.swap(slot, loaded, self.cfg.swap_timeout_s)
            self._serving[slot] = previous.sha256
        except Exception as exc:  # the store, the runtime, a stuck executor: say it loud, keep serving
            log.exception("rollback failed", extra=fields(slot=slot, error=str(exc)))
            return
        with self.store.locked() as st:
            s = st.slots[slot]
            s.active, s.previous = previous, prior_previous or entry.model_copy(update={"committed": False})
            st.last_change = Change(slot=slot, at=time.time(), reason=f"rolled back: {reason}",
                                    job=entry.job).model_dump()
            if entry.desired_version is not None:
                st.desired_version = max(st.desired_version or 0, entry.desired_version)
        log.warning("model rolled back", extra=fields(slot=slot, model=f"{entry.name}@{entry.version}",
                                                      reason=reason, metrics=metrics))
        self._job(entry.job, slot, entry.sha256, "rolled_back", reason=reason, metrics=metrics)
        self._audit("rolled_back", slot, entry.version, model=entry.name, job=entry.job, reason=reason)
        self._models_changed()
        self._send_reported()

    def _fail(self, job: str, slot: str, art: Artifact, exc: Exception) -> None:
        if self._stop.is_set() and getattr(exc, "reason", "") == "stopped":
            return  # the daemon is stopping: not a verdict on the model
        reason = str(exc)
        log.warning("model refused", extra=fields(job=job, slot=slot, model=art.name, version=art.version,
                                                  reason=reason))
        self._job(job, slot, art.sha256, "failed", reason=reason)
        self._audit("failed", slot, art.version, model=art.name, job=job, reason=reason)

    # --- one policy job -------------------------------------------------------------------------

    def _policy_job(self, assignment: Assignment, version: int) -> None:
        art = assignment.artifact
        job = assignment.job or f"v{version}-{POLICY_SLOT}"
        state = self.store.load()
        if state.policy.active is not None and state.policy.active.sha256 == art.sha256:
            return
        try:
            if self.apply_policy is None:
                raise Refused("unsupported", "policies not supported")
            if art.kind != "policy":
                raise Refused("wrong_kind", f"a {art.kind} artifact as the policy")
            verify(self.public_keys, art)
            path = self._download_verified(job, POLICY_SLOT, art)
            self._job(job, POLICY_SLOT, art.sha256, "testing")
            try:
                text = path.read_text(encoding="utf-8")
                applied = self.apply_policy(text, source=f"{art.name}@{art.version}")
            except Exception as exc:  # the hook raises PolicyError; the current policy stays
                raise Refused("invalid_policy", str(exc)) from None
        except (Refused, SignatureError, DownloadError) as exc:
            self._fail(job, POLICY_SLOT, art, exc)
            return
        except Exception as exc:
            self._fail(job, POLICY_SLOT, art, unexpected(exc))
            return
        entry = Entry(sha256=art.sha256, kind="policy", name=art.name, version=str(applied or art.version), job=job,
                      desired_version=version, activated_at=time.time())
        with self.store.locked() as st:
            st.policy.previous, st.policy.active = st.policy.active, entry
            st.last_change = Change(slot=POLICY_SLOT, at=entry.activated_at,
                                    reason=f"policy {art.name} {entry.version}", job=job).model_dump()
            self.store.gc(st)
        self._job(job, POLICY_SLOT, art.sha256, "active")
        self._job(job, POLICY_SLOT, art.sha256, "committed")
        self._audit("policy_applied", POLICY_SLOT, entry.version, job=job)
        self._send_reported()

    def _policy_withdrawn(self, version: int) -> None:
        """A newer desired state assigns no policy: the assignment is no longer in force,
        and the device's own policy (``decisions.policy``) takes over."""
        with self.store.locked() as st:
            withdrawn = st.policy.active
            if withdrawn is None:
                return
            st.policy.previous, st.policy.active = withdrawn, None
            st.last_change = Change(slot=POLICY_SLOT, at=time.time(),
                                    reason=f"policy {withdrawn.name} {withdrawn.version} withdrawn by desired "
                                           f"state {version}").model_dump()
        log.warning("policy assignment withdrawn", extra=fields(policy=f"{withdrawn.name}@{withdrawn.version}",
                                                                desired=version))
        self._audit("policy_withdrawn", POLICY_SLOT, withdrawn.version)
        if self.release_policy is not None:
            self.release_policy()

    # --- reporting ---------------------------------------------------------------------------

    def _running(self, slot: str) -> Entry:
        s = self.store.load().slots.get(slot)
        return s.active if s is not None and s.active is not None else self.slots[slot].factory

    def _factory_in_store(self, slot: str) -> Entry:
        """The config's model as a store entry, copied in so a rollback can load it."""
        model = self.scheduler.executors[0].models[slot]
        return self.store.import_file(model.loaded.path, model.manifest)

    def _reported(self) -> bytes:
        state = self.store.load()
        models, previous = {}, {}
        for slot, info in self.slots.items():
            s = state.slots.get(slot)
            models[slot] = (s.active if s and s.active else info.factory).running()
            if s and s.previous:
                previous[slot] = s.previous.running()
        policy = state.policy.active.running() if state.policy.active else None
        change = Change.model_validate(state.last_change) if state.last_change else None
        return encode(Reported(v=1, device=self.device, at=time.time(), desired_version=state.desired_version,
                               models=models, previous=previous, policy=policy, last_change=change,
                               keys=self.key_ids))

    def _send_reported(self) -> None:
        self._send(self.topics.reported(self.device), self._reported(), True)

    def _job(self, job: str | None, slot: str, sha256: str, state: str, *, reason: str | None = None,
             progress: float | None = None, metrics: dict[str, float] | None = None) -> None:
        jobs = self.counters["jobs"]
        jobs[state] = jobs.get(state, 0) + 1
        if job is None:
            return
        body = JobStatus(v=1, device=self.device, job=job, slot=slot, sha256=sha256, state=state, at=time.time(),
                         reason=reason[:1024] if reason else None, progress=progress,
                         metrics={k: float(v) for k, v in (metrics or {}).items() if math.isfinite(v)})
        self._send(self.topics.job(self.device, job), encode(body))

    def _audit(self, action: str, slot: str, version: str, **detail: Any) -> None:
        if self.outbox is not None:
            self.outbox.append(model_event(action, slot, version, **detail))

    def _models_changed(self) -> None:
        if self.on_models is not None:
            self.on_models({slot: m.name for slot, m in self.scheduler.executors[0].models.items()})

