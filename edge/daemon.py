"""``edge run``: cameras, their capture threads and models, stats, and a clean stop.

Each camera has a :class:`CameraWorker`: a thread that takes the newest frame from
the camera's capture thread, runs the camera's model on it and hands the prediction
to the result sink. Nothing queues: a frame the worker was too busy for is replaced
by a newer one in the capture slot and counted as superseded there.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .adapters import Prediction
from .capture import CaptureThread, Frame
from .config import CameraConfig, DeviceConfig
from .logs import fields
from .model import Model, StageTimes
from .sources import Source, make_source
from .stats import LatencyWindow, RateMeter

log = logging.getLogger("edge.run")

STAGES = ("capture_wait", "preprocess", "invoke", "postprocess")


@dataclass(frozen=True, slots=True)
class Result:
    """One model's prediction on one frame, with where the time went."""

    frame: Frame
    model: str
    prediction: Prediction
    times: StageTimes
    finished_at: float  # time.monotonic()

    @property
    def age_ms(self) -> float:
        """Capture-to-result age."""
        return (self.finished_at - self.frame.captured_mono) * 1e3

    def to_dict(self) -> dict[str, Any]:
        return {
            "camera": self.frame.camera,
            "seq": self.frame.seq,
            "captured_at": round(self.frame.captured_at, 4),
            "model": self.model,
            "age_ms": round(self.age_ms, 2),
            **self.prediction.to_dict(),
        }


class ResultWriter:
    """Appends results as JSON lines; shared by all camera workers."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def __call__(self, result: Result) -> None:
        line = json.dumps(result.to_dict(), separators=(",", ":"))
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()


class CameraWorker:
    """Owns one camera's capture thread, model and inference thread."""

    def __init__(
        self, cfg: CameraConfig, model: Model, sink: ResultWriter | None, source: Source | None = None
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.sink = sink
        self.capture = CaptureThread(
            cfg.id,
            source or make_source(cfg.source),
            stale_after_s=cfg.stale_after_s,
            frozen_after_s=cfg.frozen_after_s,
            backoff=cfg.reopen,
        )
        self.processed = 0
        self.errors = 0
        self.windows = {name: LatencyWindow() for name in (*STAGES, "age")}
        now = time.monotonic()
        self._captured_rate, self._processed_rate = RateMeter(now), RateMeter(now)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"infer-{cfg.id}", daemon=True)

    def start(self) -> None:
        self.capture.start()
        now = time.monotonic()
        self._captured_rate, self._processed_rate = RateMeter(now), RateMeter(now)
        self._thread.start()

    def stop(self) -> None:
        """Ask the worker to stop after its current frame; ``join`` waits for it."""
        self._stop.set()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        self.capture.stop(timeout)

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            waited = time.perf_counter()
            frame = self.capture.get(timeout=0.1)
            if frame is None:
                if self.capture.ended:
                    return
                continue
            wait_ms = (time.perf_counter() - waited) * 1e3
            try:
                prediction, times = self.model.predict(frame.image)
            except Exception:  # one bad frame must not stop the camera
                self.errors += 1
                log.exception("inference failed", extra=fields(camera=self.cfg.id, model=self.model.name))
                continue
            result = Result(frame, self.model.name, prediction, times, time.monotonic())
            self._record(wait_ms, result)
            if self.sink is not None:
                self.sink(result)

    def _record(self, wait_ms: float, result: Result) -> None:
        self.processed += 1
        t = result.times
        for name, value in zip(
            (*STAGES, "age"), (wait_ms, t.preprocess_ms, t.invoke_ms, t.postprocess_ms, result.age_ms)
        ):
            self.windows[name].add(value)

    def snapshot(self, now: float) -> dict[str, Any]:
        """Counters, rates since the previous snapshot, and latency percentiles (ms)."""
        cap = self.capture.stats()
        return {
            "camera": self.cfg.id,
            "model": self.model.name,
            "state": cap.state.value,
            "capture_fps": round(self._captured_rate.rate(now, cap.captured), 2),
            "processed_fps": round(self._processed_rate.rate(now, self.processed), 2),
            "captured": cap.captured,
            "processed": self.processed,
            "superseded": cap.superseded,
            "reopens": cap.reopens,
            "read_errors": cap.read_errors,
            "inference_errors": self.errors,
            "latency_ms": {name: w.percentiles((50, 95)) for name, w in self.windows.items()},
        }


class Daemon:
    """Everything ``edge run`` starts, in dependency order, and stops in reverse."""

    def __init__(self, cfg: DeviceConfig, sink: ResultWriter | None = None) -> None:
        self.cfg = cfg
        # Load every model before opening any camera: a bad model fails the start, fast.
        self.workers = [CameraWorker(cam, self._load_model(cam.model), sink) for cam in cfg.cameras]

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
        started: list[CameraWorker] = []
        try:
            for worker in self.workers:
                worker.start()
                started.append(worker)
            log.info("running", extra=fields(device=self.cfg.device.id, cameras=len(self.workers)))
            interval = self.cfg.logging.stats_interval_s
            next_stats = time.monotonic() + interval
            while not stop.is_set() and not all(w.done for w in started):
                stop.wait(min(0.2, max(0.0, next_stats - time.monotonic())))
                if time.monotonic() >= next_stats:
                    self.log_stats()
                    next_stats += interval
        finally:
            stopping = time.monotonic()
            self._stop_all(started)
            self.log_stats()
            reason = "signal" if stop.is_set() else "sources ended"
            log.info("stopped", extra=fields(reason=reason, stop_s=round(time.monotonic() - stopping, 3)))
        return 0

    def _stop_all(self, workers: list[CameraWorker]) -> None:
        for worker in workers:  # signal all first so they wind down in parallel
            worker.stop()
        deadline = time.monotonic() + 1.5
        for worker in workers:
            worker.join(max(0.1, deadline - time.monotonic()))

    def log_stats(self) -> None:
        now = time.monotonic()
        for worker in self.workers:
            log.info("stats", extra=fields(**worker.snapshot(now)))


def open_results(path: Path | None) -> tuple[ResultWriter | None, IO[str] | None]:
    """A result sink for ``--results``: ``-`` is stdout, anything else a file appended to."""
    if path is None:
        return None, None
    if str(path) == "-":
        import sys

        return ResultWriter(sys.stdout), None
    stream = open(path, "a", encoding="utf-8")
    return ResultWriter(stream), stream
