"""``edge run``: cameras, the scheduler and its executors, liveness, stats, a clean stop.

Start-up loads every model for every executor before any camera opens, so a bad
model fails the start at once; a warm-up run of each model seeds the scheduler's
cost estimates. Stop (SIGTERM/SIGINT) signals everything first and then joins it,
so the whole stop fits in two seconds.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import numpy as np

from .capture import CaptureThread
from .events import model_event
from .config import CameraConfig, DeviceConfig, SchedulerConfig
from .liveness import Liveness
from .logs import fields
from .model import Model
from .outbox import Outbox
from .planner import CostModel
from .recorder import Recorder, fan_out
from .scheduler import CameraRunner, Executor, Result, Scheduler, Sink
from .sources import Source, make_source
from .sync import Sync

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


def make_camera(cfg: CameraConfig, sched: SchedulerConfig, wake: Any, source: Source | None = None) -> CameraRunner:
    """A camera's capture thread and planner, ready for a scheduler."""
    capture = CaptureThread(
        cfg.id,
        source or make_source(cfg.source),
        stale_after_s=cfg.stale_after_s,
        frozen_after_s=cfg.frozen_after_s,
        backoff=cfg.reopen,
        on_frame=wake,
    )
    return CameraRunner(cfg, capture, CostModel(sched.estimate_window, sched.estimate_percentile))


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


class Daemon:
    """Everything ``edge run`` starts, in dependency order, and stops in reverse."""

    def __init__(self, cfg: DeviceConfig, sink: Sink | None = None) -> None:
        self.cfg = cfg
        sched = cfg.runtime.scheduler
        slots = sorted({t.model for cam in cfg.cameras for t in cam.effective_tasks()})
        self.executors = [Executor(i, {slot: self._load_model(slot) for slot in slots})
                          for i in range(sched.executors)]
        models = {slot: model.name for slot, model in self.executors[0].models.items()}
        # Metadata goes to the fleet only when a broker is configured.
        self.outbox: Outbox | None = None
        self.recorder: Recorder | None = None
        self.sync: Sync | None = None
        if cfg.mqtt is not None:
            self.outbox = Outbox.open(cfg.outbox, cfg.device.id)
            self.recorder = Recorder(self.outbox)
            self.sync = Sync(cfg.mqtt, cfg.device, self.outbox, models=models)
        self.cameras = [make_camera(cam, sched, lambda: self.scheduler.wake()) for cam in cfg.cameras]
        self.scheduler = Scheduler(self.cameras, self.executors, fan_out([sink, self.recorder]))
        warm_up(self.executors[0], self.cameras)
        self.liveness = Liveness(self.executors, sched, cfg.runtime.heartbeat_file)
        if self.outbox is not None:
            for slot, name in models.items():
                self.outbox.append(model_event("loaded", slot, self.executors[0].models[slot].manifest.version,
                                               model=name))

    def _load_model(self, slot: str) -> Model:
        spec = self.cfg.models[slot]
        rt = self.cfg.runtime
        model = Model.load(
            spec.path,
            manifest=spec.manifest,
            num_threads=rt.num_threads,
            delegate=rt.delegate.library if rt.delegate else None,
            delegate_options=rt.delegate.options if rt.delegate else None,
        )
        log.info(
            "model loaded",
            extra=fields(slot=slot, model=model.name, task=model.manifest.task,
                         runtime=model.loaded.runtime, threads=rt.num_threads),
        )
        return model

    def run(self, stop: threading.Event) -> int:
        """Run until ``stop`` is set or every source has ended; returns the exit code."""
        started: list[CameraRunner] = []
        try:
            if self.sync is not None:
                self.sync.start()
            for camera in self.cameras:
                camera.capture.start()
                started.append(camera)
            self.scheduler.start()
            self.liveness.ready()
            log.info("running", extra=fields(device=self.cfg.device.id, cameras=len(self.cameras),
                                             executors=len(self.executors)))
            interval = self.cfg.logging.stats_interval_s
            next_stats = time.monotonic() + interval
            while not stop.is_set() and not self.scheduler.done:
                stop.wait(0.2)
                self.liveness.poll()
                if time.monotonic() >= next_stats:
                    self.report()
                    next_stats += interval
        finally:
            stopping = time.monotonic()
            self.liveness.stopping()
            self.scheduler.stop()
            for camera in started:
                camera.capture.request_stop()  # all at once; joined below
            self.scheduler.join(1.0)
            for camera in started:
                camera.capture.stop(timeout=max(0.1, stopping + 1.2 - time.monotonic()))
            self.report()
            if self.sync is not None:
                self.sync.stop(timeout=0.3)
            if self.outbox is not None:
                self.outbox.close(timeout=max(0.2, stopping + 1.8 - time.monotonic()))
            reason = "signal" if stop.is_set() else "sources ended"
            log.info("stopped", extra=fields(reason=reason, stop_s=round(time.monotonic() - stopping, 3)))
        return 0

    def report(self) -> None:
        """The stats line (one record per camera) and, if configured, the stats file."""
        snap = self.scheduler.snapshot()
        snap["liveness"] = {"alive": self.liveness.alive, "stuck": self.liveness.stuck}
        if self.outbox is not None and self.sync is not None:  # both or neither
            snap["outbox"], snap["sync"] = self.outbox.stats(), self.sync.stats()
            log.info("sync stats", extra=fields(outbox=snap["outbox"], sync=snap["sync"]))
        for camera in snap["cameras"]:
            log.info("stats", extra=fields(**camera))
        if self.recorder is not None:
            self.recorder.health(snap["cameras"])
        if self.cfg.runtime.stats_file is not None:
            write_atomically(self.cfg.runtime.stats_file, json.dumps({"at": time.time(), **snap}, indent=1))


def write_atomically(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
