"""``edge run``: cameras, the scheduler and its executors, liveness, stats, a clean stop.

Start-up loads every model for every executor before any camera opens, so a bad
model fails the start at once; a warm-up run of each model seeds the scheduler's
cost estimates. Stop (SIGTERM/SIGINT) signals everything first and then joins it,
so the whole stop fits in two seconds.

Policy precedence: the fleet's assignment wins while one is in force. A policy the fleet
assigns replaces the local file's (``decisions.policy``); a SIGHUP then checks the local
file but does not apply it, and says so. The local file takes over again only when the
fleet withdraws its assignment (a newer desired state with no policy). What is in force
and where it came from is :attr:`Daemon.policy_source`, in the stats file for ``edge
policy show``.
"""

from __future__ import annotations

import gc
import json
import logging
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

import numpy as np

from edge.capture.sources import Source, make_source
from edge.capture.thread import CaptureState, CaptureThread
from edge.config import CameraConfig, DeviceConfig, HealthConfig, SchedulerConfig
from edge.core.contract import Topics
from edge.core.errors import ConfigError, EdgeError
from edge.core.files import replace_file, sha256_file
from edge.core.logs import fields
from edge.core.stats import rss_mb
from edge.decide.cascade import check_device, device_view
from edge.decide.engine import DecisionEngine
from edge.decide.policy import Policy, PolicyError, check_classes, load_policy, parse_policy
from edge.decide.snapshots import SnapshotLimits, SnapshotStore
from edge.inference.manifest import BaselineError
from edge.inference.model import Model
from edge.observe.drift import ModelRef
from edge.observe.observer import Observer
from edge.schedule.liveness import Liveness
from edge.schedule.planner import CostModel
from edge.schedule.scheduler import CameraRunner, Executor, Result, Scheduler, Sink
from edge.sync.events import model_event
from edge.sync.recorder import Recorder, fan_out
from edge.updates.health import HealthWatch, band_outcome
from edge.updates.modelstore import CrashLoop, Entry, ModelStore
from edge.updates.smoke import RuntimeOptions
from edge.updates.smoke import load_model as load_stored

if TYPE_CHECKING:
    # Imported where they are used, only when the config asks for them: MQTT, the model
    # agent, the line protocols and the metrics server each cost megabytes a small board
    # may not have.
    from edge.comms.service import LineComms
    from edge.decide.alerts import AlertPublisher
    from edge.observe.metrics import MetricsServer, Sources
    from edge.sync.client import Sync
    from edge.sync.outbox import Outbox
    from edge.updates.agent import Agent

log = logging.getLogger("edge.run")


class ResultWriter:
    """Appends results as JSON lines; shared by all executors."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def __call__(self, result: Result) -> None:
        line = json.dumps(result.to_dict(), separators=(",", ":"))
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()


def open_results(path: Path | None) -> tuple[ResultWriter | None, IO[str] | None]:
    """A result sink for ``--results``: ``-`` is stdout, anything else a file appended to."""
    if path is None:
        return None, None
    if str(path) == "-":
        return ResultWriter(sys.stdout), None
    stream = open(path, "a", encoding="utf-8")
    return ResultWriter(stream), stream


@dataclass(frozen=True)
class PolicySource:
    """The policy in force and where it came from."""

    origin: Literal["local", "fleet"]
    version: str
    source: str  # the local file, or the fleet's artifact as name@version
    applied_at: float
    withdrawn: bool = False  # a fleet policy the fleet no longer assigns, kept for want of a local one

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_camera(cfg: CameraConfig, sched: SchedulerConfig, wake: Any, source: Source | None = None,
                on_image: Any = None, outcome: Any = None) -> CameraRunner:
    """A camera's capture thread and planner, ready for a scheduler."""
    capture = CaptureThread(
        cfg.id,
        source or make_source(cfg.source),
        stale_after_s=cfg.stale_after_s,
        frozen_after_s=cfg.frozen_after_s,
        backoff=cfg.reopen,
        on_frame=wake,
        on_image=on_image,
        remake=(lambda: make_source(cfg.source)) if source is None else None,
    )
    return CameraRunner(cfg, capture, CostModel(sched.estimate_window, sched.estimate_percentile), outcome)


def warm_up(executor: Executor, cameras: list[CameraRunner]) -> None:
    """Run each model twice on a blank frame; the second run seeds the cost estimates."""
    for slot, model in executor.models.items():
        _, h, w, _ = model.loaded.inputs[0].shape
        blank = np.zeros((h, w, 3), np.uint8)
        model.predict(blank)
        t0 = time.monotonic()
        model.predict(blank)
        ms = (time.monotonic() - t0) * 1e3
        for camera in cameras:
            for task in camera.tasks.values():
                if task.model == slot:
                    camera.planner.costs.observe(task.name, ms)


REFREEZE_EVERY_S = 600.0


def _refreeze() -> None:
    """Collect once, then put every object alive out of the collector's sight.

    What the daemon has built (imports, models, config) lives as long as it does; a full
    collection over it takes 30 ms or more, a pause of every executor inside some frame's
    budget. Frozen, a collection scans only what was made since. Cycles among frozen
    objects (a model or policy swapped out) are freed by the next refreeze, every
    REFREEZE_EVERY_S.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class Daemon:
    """Everything ``edge run`` starts, in dependency order, and stops in reverse."""

    def __init__(self, cfg: DeviceConfig, sink: Sink | None = None) -> None:
        # first: a port already taken must fail the start at once, not leave a daemon without metrics
        self.metrics: MetricsServer | None = None
        if cfg.metrics is not None:
            from edge.observe.metrics import MetricsServer
            self.metrics = MetricsServer(cfg.metrics.address)
        try:
            self._start_up(cfg, sink)
        except BaseException:
            if self.metrics is not None:
                self.metrics.stop()
            raise

    def _start_up(self, cfg: DeviceConfig, sink: Sink | None) -> None:
        self.cfg = cfg
        rt = cfg.runtime
        self.rt = RuntimeOptions(rt.num_threads, rt.delegate.library if rt.delegate else None,
                                 rt.delegate.options if rt.delegate else None)
        sched = cfg.runtime.scheduler
        slots = sorted({t.model for cam in cfg.cameras for t in cam.effective_tasks()})
        self._open_model_store()  # before loading: the store may name other models than the config
        self.executors = [Executor(i, {slot: self._load_model(slot) for slot in slots})
                          for i in range(sched.executors)]
        models = {slot: model.name for slot, model in self.executors[0].models.items()}
        # Metadata goes to the fleet only when a broker is configured.
        self.outbox: Outbox | None = None
        self.recorder: Recorder | None = None
        self.sync: Sync | None = None
        if cfg.mqtt is not None:
            from edge.sync.client import Sync
            from edge.sync.outbox import Outbox
            self.outbox = Outbox.open(cfg.outbox, cfg.device.id)
            self.recorder = Recorder(self.outbox)
            self.sync = Sync(cfg.mqtt, cfg.device, self.outbox, models=models)
        self.observer = self._observer()  # its callbacks read the decisions engine, made below, lazily
        self.cameras = [make_camera(cam, sched, lambda: self.scheduler.wake(), on_image=self.observer.picture(cam.id),
                                    outcome=self._outcome)
                        for cam in cfg.cameras]
        self.reload_requested = threading.Event()  # SIGHUP: read the policy file again
        self._decisions_setup()
        if self.sync is not None:  # before the link starts: it subscribes on connect
            self.sync.review = self._exporter(cfg)
        self.health = self._health_watch()
        # decisions first: an alert must not wait for the results file or the outbox
        self.scheduler = Scheduler(self.cameras, self.executors,
                                   fan_out([self.decisions, sink, self.recorder, self.health, self.observer]),
                                   overlap=sched.overlap)
        if self.health is not None:
            self.scheduler.on_error = self.health.error
        self.scheduler.on_frame_done = self.decisions.frame_done
        warm_up(self.executors[0], self.cameras)
        self.liveness = Liveness(self.executors, sched, cfg.runtime.heartbeat_file, self.cameras)
        self.agent = self._make_agent()
        self.comms = self._line_comms()
        self._closed: set[str] = set()  # cameras whose source ended and whose windows are closed
        if self.metrics is not None:
            self.metrics.attach(self._metric_sources())
        if self.outbox is not None:
            for slot, name in models.items():
                self.outbox.append(model_event("loaded", slot, self.executors[0].models[slot].manifest.version,
                                               model=name))

    def _decisions_setup(self) -> None:
        cfg = self.cfg
        d = cfg.decisions
        self._device = device_view(cfg, lambda slot: self.executors[0].models[slot].manifest.labels)
        policy = self._fits_device(load_policy(d.policy), str(d.policy)) if d.policy is not None else None
        self.policy_source: PolicySource | None = (
            PolicySource("local", policy.version, str(d.policy), time.time()) if policy is not None else None)
        self._policy_changed = threading.Event()  # the stats file is rewritten at once, for `edge policy show`
        self._policy_changed.set()  # and written first when the daemon runs
        self.alerts: AlertPublisher | None = None
        if cfg.mqtt is not None:
            from edge.decide.alerts import AlertPublisher
            self.alerts = AlertPublisher.for_device(cfg.mqtt, cfg.device, max_pending=d.max_pending_alerts)
        self.snapshots: SnapshotStore | None = None
        if d.snapshots is not None:
            s = d.snapshots
            self.snapshots = SnapshotStore(s.dir, SnapshotLimits(int(s.max_mb * 1e6), s.max_age_h * 3600, s.jpeg_quality))
        topics = Topics(cfg.mqtt.prefix if cfg.mqtt else Topics().prefix)
        self.decisions = DecisionEngine(
            cfg.device.id, lambda camera: topics.alert(cfg.device.site, cfg.device.line, camera), self.alerts,
            policy=policy, audit=self.outbox.append if self.outbox is not None else None,
            snapshots=self.snapshots, model_version=self._model_version, framed=True)
        if policy is not None:
            log.info("policy loaded", extra=fields(version=policy.version, rules=len(policy.rules),
                                                   source=str(d.policy)))

    def _line_comms(self) -> LineComms | None:
        """Sparkplug, Home Assistant and the line's commands, when any is configured."""
        cfg = self.cfg
        if cfg.sparkplug is None and cfg.homeassistant is None and cfg.commands is None:
            return None
        from edge.comms.service import LineComms
        return LineComms(cfg, self.decisions, self.cameras, self.observer.snapshot, self._model_version,
                         audit=self.outbox.append if self.outbox is not None else None)

    def _exporter(self, cfg: DeviceConfig) -> Any:
        """The answerer of operators' snapshot fetches: every device has one, so a fetch
        from a device with export off is refused with that reason rather than unanswered."""
        from edge.sync.review import Exporter

        assert cfg.mqtt is not None and self.outbox is not None
        return Exporter(cfg.device.id, Topics(cfg.mqtt.prefix), cfg.privacy, self.snapshots, self.outbox.append)

    # --- observe (edge/observe) ---------------------------------------------------------------------

    def _observer(self) -> Observer:
        self._slot_of = {(cam.id, t.name): t.model for cam in self.cfg.cameras for t in cam.effective_tasks()}
        self._refs: dict[str, tuple[Model, ModelRef]] = {}
        self._band = band_outcome(*(self.cfg.agent.health if self.cfg.agent else HealthConfig()).unsure_band)
        tasks = {cam.id: [t.name for t in cam.effective_tasks()] for cam in self.cfg.cameras}
        return Observer(self.cfg.observe, tasks, model_of=self._model_ref, outcome=self._outcome,
                        healthy=self._baseline_ok, record=self.outbox.append if self.outbox is not None else None)

    def _model_ref(self, camera: str, task: str) -> ModelRef | None:
        """The model serving the task now (executor 0's), as drift keys its windows."""
        slot = self._slot_of.get((camera, task))
        model = self.executors[0].models.get(slot) if slot is not None else None
        if model is None:
            return None
        ref = self._refs.get(slot)
        if ref is None or ref[0] is not model:
            m = model.manifest
            ref = self._refs[slot] = (model, ModelRef(m.name, m.version, m.baseline))
        return ref[1]

    def _baseline_ok(self, camera: str, task: str) -> bool:
        """A window may become the baseline: the picture is fine and the model is not on trial."""
        if not self.decisions.camera_ok(camera):
            return False
        if self.store is None:
            return True
        s = self.store.load().slots.get(self._slot_of[(camera, task)])
        return s is None or s.active is None or s.active.committed

    def _close_ended(self) -> None:
        """Close the drift windows of cameras whose source ended, once their last frame is done."""
        for camera in self.cameras:
            if (camera.cfg.id not in self._closed and camera.capture.ended and not camera.busy
                    and not camera.finishing):  # its last result through the sinks, the drift's included
                self._closed.add(camera.cfg.id)
                self.observer.close(camera.cfg.id)

    def _metric_sources(self) -> Sources:
        from edge.observe.metrics import Sources
        d = self.cfg.device
        return Sources(
            device={"id": d.id, "site": d.site, "line": d.line}, cameras=self.cameras, scheduler=self.scheduler,
            models=lambda: {slot: (m.manifest.name, m.manifest.version) for slot, m in self.executors[0].models.items()},
            decisions=self.decisions.stats, observer=self.observer,
            outbox=self.outbox.stats if self.outbox is not None else None,
            oldest_unsynced=self.outbox.oldest_recorded_at if self.outbox is not None else None,
            sync=self.sync.stats if self.sync is not None else None,
            alerts=self.alerts.stats if self.alerts is not None else None,
            agent=self.agent.stats if self.agent is not None else None,
            alert_states=self.decisions.device_alerts)

    def _model_version(self, camera: str, task: str) -> str | None:
        for runner in self.cameras:
            if runner.cfg.id == camera and task in runner.tasks:
                model = self.executors[0].models.get(runner.tasks[task].model)
                return model.manifest.version if model is not None else None
        return None

    def checked_policy(self, text: str, *, source: str) -> Policy:
        """The policy in ``text`` if it validates and fits this device's tasks, else PolicyError."""
        return self._fits_device(parse_policy(text, source=source), source)

    def apply_policy(self, text: str, *, source: str, origin: Literal["local", "fleet"] = "local") -> str:
        """Use the policy in ``text`` from the next frame on; returns its version.

        Raises PolicyError for a policy that does not parse or validate, or names tasks
        or classes this device's models do not have; the policy in force then stays."""
        policy = self.checked_policy(text, source=source)
        old = self.decisions.policy
        self.decisions.set_policy(policy)
        self.policy_source = PolicySource(origin, policy.version, source, time.time())
        self._policy_changed.set()
        log.info("policy applied", extra=fields(version=policy.version, previous=old.version if old else None,
                                                source=source, origin=origin, rules=len(policy.rules)))
        return policy.version

    def apply_fleet_policy(self, text: str, *, source: str) -> str:
        """The agent's hook: a policy the fleet assigned, in force until it is withdrawn."""
        return self.apply_policy(text, source=source, origin="fleet")

    def _fleet_in_force(self) -> bool:
        s = self.policy_source
        return s is not None and s.origin == "fleet" and not s.withdrawn

    def _fits_device(self, policy: Policy, source: str) -> Policy:
        """``policy``, or PolicyError if it names a task or class this device's models lack:
        a crop rule's or verifier's (its trigger tasks), a share rule's (its segmentation models)."""
        for slot, model in self.executors[0].models.items():
            if model.manifest.task == "segment":
                check_classes(policy, model.manifest.labels, model=f"{slot} ({model.name})", source=source)
        check_device(policy, self._device, source=source)
        return policy

    def reload_policy(self) -> None:
        """SIGHUP: read the configured policy file again; a broken one is refused and logged.
        While the fleet's assignment is in force the file is checked but not applied."""
        path = self.cfg.decisions.policy
        if path is None:
            log.warning("reload asked but decisions.policy is not set")
            return
        try:
            if self._fleet_in_force():
                local = self.checked_policy(path.read_text(), source=str(path))
                fleet = self.policy_source
                log.warning("local policy not applied: the fleet's assignment is in force", extra=fields(
                    local=local.version, source=str(path), current=fleet.version, assigned=fleet.source))
                return
            self.apply_policy(path.read_text(), source=str(path))
        except (OSError, EdgeError) as exc:
            log.error("policy refused; the current one stays", extra=fields(
                error=str(exc), current=self.decisions.policy.version if self.decisions.policy else None))

    def release_policy(self) -> None:
        """The agent's hook: the fleet withdrew its assignment; the local file takes over
        (or, without a usable one, the withdrawn policy stays in force, marked withdrawn)."""
        path = self.cfg.decisions.policy
        try:
            if path is None:
                raise PolicyError("decisions.policy is not set")
            self.apply_policy(path.read_text(), source=str(path))
        except (OSError, EdgeError) as exc:
            s = self.policy_source
            if s is not None:
                self.policy_source = PolicySource(s.origin, s.version, s.source, s.applied_at, withdrawn=True)
                self._policy_changed.set()
            log.error("fleet policy withdrawn but no local policy to take over: it stays in force",
                      extra=fields(error=str(exc), current=s.version if s else None))

    # --- model updates (edge/updates/agent.py) -------------------------------------------------------

    def _open_model_store(self) -> None:
        """The agent's model store, and the crash-loop check of this start."""
        self.store: ModelStore | None = None
        self.crash_loops: list[CrashLoop] = []
        a = self.cfg.agent
        if a is None:
            return
        self.store = ModelStore(a.state_dir, keep=a.keep)
        self.crash_loops = self.store.boot(time.time(), a.crash_loop.restarts, a.crash_loop.minutes)
        self._store_state = self.store.load()

    def _stored_model(self, slot: str) -> Model | None:
        """The model the store names active for ``slot`` (it overrides the config's), if any."""
        s = self._store_state.slots.get(slot) if self.store is not None else None
        if s is None or s.active is None:
            return None
        entry = s.active
        # a file that cannot load fails the start; restarts then trip the crash-loop check
        model = load_stored(self.store.path(entry.sha256), self.store.manifest(entry.sha256), self.rt)
        log.info("model loaded", extra=fields(slot=slot, model=model.name, sha256=entry.sha256[:12], source="store",
                                              committed=entry.committed))
        return model

    def _outcome(self, label: str, score: float) -> str:
        """Unsure is the decisions policy's outcome when one is in force, else the agent's score band."""
        policy = self.decisions.policy  # the policy in force now, if any
        return policy.outcome(label, score) if policy is not None else self._band(label, score)

    def _health_watch(self) -> HealthWatch | None:
        """Per-slot result statistics for the agent's health window."""
        if self.cfg.agent is None:
            return None
        return HealthWatch(self._slot_of, self._outcome)

    def _make_agent(self) -> Agent | None:
        if self.store is None or self.health is None:
            return None
        from edge.updates.agent import Agent
        factory = {}  # the config's model per slot: what runs while the state names none
        for slot, model in self.executors[0].models.items():
            path = self.cfg.models[slot].path
            factory[slot] = Entry(sha256=sha256_file(path), name=model.manifest.name, version=model.manifest.version)
        return Agent(self.cfg, self.store, self.scheduler, self.health, factory, self.rt,
                     apply_policy=self.apply_fleet_policy, release_policy=self.release_policy, outbox=self.outbox,
                     on_models=self.sync.set_models if self.sync is not None else None,
                     crash_loops=self.crash_loops)

    def _load_model(self, slot: str) -> Model:
        stored = self._stored_model(slot)
        if stored is not None:
            return stored
        spec = self.cfg.models[slot]
        try:
            model = Model.load(spec.path, manifest=spec.manifest, num_threads=self.rt.num_threads,
                               delegate=self.rt.delegate, delegate_options=self.rt.delegate_options)
        except BaselineError as exc:
            raise ConfigError(f"models.{slot}.manifest: {exc}") from None
        log.info(
            "model loaded",
            extra=fields(slot=slot, model=model.name, task=model.manifest.task,
                         runtime=model.loaded.runtime, threads=self.rt.num_threads),
        )
        return model

    def run(self, stop: threading.Event) -> int:
        """Run until ``stop`` is set or every source has ended; returns the exit code."""
        started: list[CameraRunner] = []
        failure: str | None = None
        _refreeze()
        next_refreeze = time.monotonic() + REFREEZE_EVERY_S
        try:
            if self.sync is not None:
                self.sync.start()
            if self.alerts is not None:
                self.alerts.start()
            if self.comms is not None:
                self.comms.start()
            if self.snapshots is not None:
                self.snapshots.start()
            for camera in self.cameras:
                camera.capture.start()
                started.append(camera)
            self.scheduler.start()
            if self.agent is not None:
                self.agent.start()
            self.liveness.ready()
            log.info("running", extra=fields(device=self.cfg.device.id, cameras=len(self.cameras),
                                             executors=len(self.executors)))
            interval = self.cfg.logging.stats_interval_s
            next_stats = time.monotonic() + interval
            while not stop.is_set() and not self.scheduler.done:
                stop.wait(0.2)
                failure = self._failure()
                if failure is not None:
                    log.critical("component failed: exiting so the service manager restarts the daemon",
                                 extra=fields(failure=failure))
                    break
                self.liveness.poll()
                if self.reload_requested.is_set():
                    self.reload_requested.clear()
                    self.reload_policy()
                if self._policy_changed.is_set():
                    self._policy_changed.clear()
                    self.report()
                self.decisions.poll_health({c.cfg.id: c.capture.stats().state.value for c in self.cameras})
                self._close_ended()
                self.decisions.poll_observe(self.observer.snapshot())
                if time.monotonic() >= next_stats:
                    self.report()
                    next_stats += interval
                if time.monotonic() >= next_refreeze:
                    _refreeze()
                    next_refreeze += REFREEZE_EVERY_S
        finally:
            gc.unfreeze()
            stopping = time.monotonic()
            self.liveness.stopping()
            if self.agent is not None:
                self.agent.stop(timeout=0.5)
            self.scheduler.stop()
            for camera in started:
                camera.capture.request_stop()  # all at once; joined below
            self.scheduler.join(1.0)
            for camera in started:
                camera.capture.stop(timeout=max(0.1, stopping + 1.2 - time.monotonic()))
            if self.scheduler.done:  # no executor is still inside a frame: close what they left open
                for camera in self.cameras:
                    self.observer.close(camera.cfg.id)
                self.decisions.poll_observe(self.observer.snapshot())
            self.report()
            if self.comms is not None:  # its NDEATH says the node is going
                self.comms.stop(timeout=0.5)
            if self.alerts is not None:
                self.alerts.stop(timeout=0.3)
            if self.snapshots is not None:
                self.snapshots.stop(timeout=0.3)
            if self.sync is not None:
                self.sync.stop(timeout=0.3)
            if self.outbox is not None:
                self.outbox.close(timeout=max(0.2, stopping + 1.8 - time.monotonic()))
            if self.metrics is not None:
                self.metrics.stop()
            failure = failure or self._failure()
            reason = "signal" if stop.is_set() else "failed" if failure else "sources ended"
            log.info("stopped", extra=fields(reason=reason, failure=failure,
                                             stop_s=round(time.monotonic() - stopping, 3)))
        return 1 if failure and not stop.is_set() else 0

    def _failure(self) -> str | None:
        """The first long-lived thread that died on an error nobody caught, if any: such a
        component cannot be restarted in place, so the daemon exits non-zero and the
        service manager starts it afresh (a stopped source ends; a failed one is this)."""
        failures = list(self.scheduler.failures)
        if failures:
            return failures[0]
        for camera in self.cameras:
            stats = camera.capture.stats()
            if stats.state is CaptureState.FAILED:
                return f"capture-{camera.cfg.id}: {stats.last_error}"
        for name, component in (("sync", self.sync), ("agent", self.agent), ("snapshots", self.snapshots),
                                ("comms", self.comms)):
            if component is not None and component.failed:
                return f"{name}: its thread ended on an error (see the log above)"
        return None

    def report(self) -> None:
        """The stats line (one record per camera) and, if configured, the stats file."""
        snap = self.scheduler.snapshot()
        observed = self.observer.snapshot().to_dict()
        for camera in snap["cameras"]:
            camera.update(observed.get(camera["camera"], {}))
        snap["models"] = {slot: model.name for slot, model in self.executors[0].models.items()}
        snap["liveness"] = {"alive": self.liveness.alive, "stuck": self.liveness.stuck}
        snap["process"] = {"rss_mb": rss_mb(), "peak_rss_mb": rss_mb(peak=True)}
        if self.outbox is not None and self.sync is not None:  # both or neither
            snap["outbox"], snap["sync"] = self.outbox.stats(), self.sync.stats()
            log.info("sync stats", extra=fields(outbox=snap["outbox"], sync=snap["sync"]))
        if self.agent is not None:
            snap["agent"] = self.agent.stats()
            log.info("agent stats", extra=fields(**snap["agent"]))
        snap["decisions"] = self.decisions.stats()
        snap["decisions"]["policy_source"] = self.policy_source.to_dict() if self.policy_source else None
        if self.alerts is not None:
            snap["decisions"]["mqtt"] = self.alerts.stats()
        if self.snapshots is not None:
            snap["decisions"]["snapshots"] = self.snapshots.stats()
        if self.comms is not None:
            snap["comms"] = self.comms.stats()
        if self.decisions.policy is not None:
            log.info("decision stats", extra=fields(**snap["decisions"]))
        log.info("process stats", extra=fields(**snap["process"]))
        for camera in snap["cameras"]:
            log.info("stats", extra=fields(**camera))
        if self.recorder is not None:
            self.recorder.health(snap["cameras"], snap.get("outbox"))
        if self.cfg.runtime.stats_file is not None:
            replace_file(self.cfg.runtime.stats_file, json.dumps({"at": time.time(), **snap}, indent=1).encode(),
                         durable=False)  # rewritten every interval: a power cut may keep the old one
