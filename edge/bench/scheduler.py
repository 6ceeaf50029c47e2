"""``edge bench scheduler``: the scheduler under overload, against a plain FIFO queue.

Three measurements in one run, on one model and one video:
- ``bare``: the bare ``invoke()`` loop, the machine's capacity for this model;
- ``scheduler``: N cameras paced at F fps each through the real capture threads and
  scheduler, sized so that demand is about twice the capacity;
- ``fifo``: the same cameras pushing every frame into one unbounded queue that one
  worker drains in order, which is what the scheduler exists to avoid;
and, with no overload, one camera read on demand through the scheduler, in short
rounds alternating with the bare loop (this machine's speed drifts). Frame ages
are capture to result.
"""

from __future__ import annotations

import queue
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edge.config import CameraConfig, SchedulerConfig, VideoSource
from edge.core.stats import LatencyWindow
from edge.daemon import make_camera, warm_up
from edge.inference.model import Model
from edge.schedule.scheduler import CameraRunner, Executor, Scheduler

from .pipeline import JOIN_S, ROUND_S, StealMeter, _first_frame, bare_invoke_fps, pipeline_fps


def run_scheduler_bench(
    model_path: Path,
    source: Path,
    *,
    manifest: Path | None = None,
    threads: int | None = None,
    cameras: int | None = None,
    fps: float = 50.0,
    seconds: float = 10.0,
) -> dict[str, Any]:
    """Measure and return the JSON-ready report."""
    model = Model.load(model_path, manifest=manifest, num_threads=threads)
    steal = StealMeter()
    bare = bare_invoke_fps(model, _first_frame(source), 3.0)
    n = cameras or max(2, round(2 * bare / fps))
    budget_ms = 1000.0 / fps
    sched = _scheduler_run(model, source, n, fps, budget_ms, seconds)
    fifo = _fifo_run(model, source, n, fps, seconds)
    steady = _no_overload(model, source, seconds)
    invoke_p99 = sched.pop("invoke_p99_ms")
    ages_p99 = [c["age_ms"]["p99"] for c in sched["cameras"]]
    return {
        "model": model.name,
        "source": str(source),
        "threads": model.loaded.num_threads,
        "bare_invoke_fps": round(bare, 2),
        "cameras": n,
        "fps_per_camera": fps,
        "budget_ms": round(budget_ms, 2),
        "overload": round(n * fps / bare, 2),
        "scheduler": sched,
        "fifo": fifo,
        "no_overload": steady,
        "targets": {
            "age_p99_max_ms": round(max(ages_p99), 2),
            "age_p99_bound_ms (2 budgets + invoke p99)": round(2 * budget_ms + invoke_p99, 2),
            "overhead_p99_pct_of_budget": sched["overhead_ms"]["p99_pct_of_budget"],
        },
        "cpu_steal_pct": steal.percent(),
    }


def _scheduler_run(model: Model, source: Path, n: int, fps: float, budget_ms: float,
                   seconds: float) -> dict[str, Any]:
    video = VideoSource(kind="video", path=source, loop=True, pace="native", fps=fps)
    configs = [CameraConfig(id=f"cam{i}", source=video, model="m", budget_ms=budget_ms) for i in range(n)]
    executor = Executor(0, {"m": model})
    cameras = [make_camera(c, SchedulerConfig(), lambda: scheduler.wake()) for c in configs]
    scheduler = Scheduler(cameras, [executor])
    warm_up(executor, cameras)
    invoke = _InvokeTimer(model)
    for camera in cameras:
        camera.capture.start()
    scheduler.start()
    try:
        time.sleep(1.0)
        start = {c.cfg.id: _counts(c) for c in cameras}
        for c in cameras:
            c.age.clear()
            c.budget_used.clear()
        executor.overhead.clear()
        invoke.clear()
        t0 = time.monotonic()
        time.sleep(seconds)
        elapsed = time.monotonic() - t0
        end = {c.cfg.id: _counts(c) for c in cameras}
    finally:
        scheduler.stop()
        for camera in cameras:
            camera.capture.stop()
        scheduler.join(JOIN_S)  # the next run invokes the same interpreter
        invoke.restore()
    overhead = executor.overhead.percentiles((50, 99))
    return {
        "cameras": [
            {
                "camera": c.cfg.id,
                "processed_fps": round((end[c.cfg.id]["processed"] - start[c.cfg.id]["processed"]) / elapsed, 2),
                "dropped": {k: end[c.cfg.id][k] - start[c.cfg.id][k] for k in ("superseded", "too_old")},
                "age_ms": c.age.percentiles((50, 99)),
                "budget_used": c.budget_used.percentiles((50,)),
            }
            for c in cameras
        ],
        "overhead_ms": {**overhead, "p99_pct_of_budget": round(100 * overhead.get("p99", 0) / budget_ms, 3)},
        "invoke_p99_ms": invoke.window.percentiles((99,)).get("p99", 0.0),
    }


def _no_overload(model: Model, source: Path, seconds: float) -> dict[str, Any]:
    """One camera read on demand through the scheduler, in rounds against the bare loop."""
    frame = _first_frame(source)
    bare, piped = [], []
    for _ in range(max(1, round(seconds / ROUND_S))):
        bare.append(bare_invoke_fps(model, frame, ROUND_S))
        piped.append(pipeline_fps(model, source, ROUND_S, None))
    return {
        "bare_invoke_fps": round(statistics.median(bare), 2),
        "pipeline_fps": round(statistics.median(piped), 2),
        "vs_bare": round(statistics.median(p / b for p, b in zip(piped, bare)), 3),
    }


def _counts(camera: CameraRunner) -> dict[str, int]:
    stats = camera.capture.stats()
    return {"processed": camera.processed, "superseded": stats.superseded,
            "too_old": camera.dropped["too_old"]}


class _InvokeTimer:
    """Times every invoke of one model during a run, for the age bound."""

    def __init__(self, model: Model) -> None:
        self.window = LatencyWindow(size=100_000)
        self._interpreter = model.loaded.interpreter
        self._invoke = self._interpreter.invoke

        def timed() -> None:
            t0 = time.perf_counter()
            self._invoke()
            self.window.add((time.perf_counter() - t0) * 1e3)

        self._interpreter.invoke = timed

    def clear(self) -> None:
        self.window.clear()

    def restore(self) -> None:
        self._interpreter.invoke = self._invoke


def _fifo_run(model: Model, source: Path, n: int, fps: float, seconds: float) -> dict[str, Any]:
    """Every frame of every camera into one unbounded queue, drained in order by one worker."""
    frames: queue.Queue[tuple[int, float, np.ndarray]] = queue.Queue()
    stop = threading.Event()
    producers = [threading.Thread(target=_produce, args=(i, source, fps, frames, stop), daemon=True)
                 for i in range(n)]
    ages: list[list[tuple[float, float]]] = [[] for _ in range(n)]  # (finished, age ms)
    t0 = time.monotonic()

    def consume() -> None:
        while not stop.is_set():
            try:
                cam, captured, image = frames.get(timeout=0.1)
            except queue.Empty:
                continue
            model.predict(image)
            now = time.monotonic()
            ages[cam].append((now - t0, (now - captured) * 1e3))

    worker = threading.Thread(target=consume, daemon=True)
    for thread in (*producers, worker):
        thread.start()
    time.sleep(seconds + 1.0)
    stop.set()
    for thread in (*producers, worker):
        thread.join(2.0)
    half = (seconds + 1.0) / 2
    return {
        "cameras": [
            {
                "camera": f"cam{i}",
                "processed_fps": round(len(a) / (seconds + 1.0), 2),
                "age_ms_first_half_p50": _p50([age for t, age in a if t < half]),
                "age_ms_second_half_p50": _p50([age for t, age in a if t >= half]),
                "age_ms_p99": round(float(np.percentile([age for _, age in a], 99)), 2) if a else None,
            }
            for i, a in enumerate(ages)
        ],
        "queued_at_end": frames.qsize(),
    }


def _p50(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


def _produce(cam: int, source: Path, fps: float, out: queue.Queue, stop: threading.Event) -> None:
    cap = cv2.VideoCapture(str(source))
    period, due = 1.0 / fps, time.monotonic()
    while not stop.is_set():
        ok, image = cap.read()
        if not ok:
            cap.release()
            cap = cv2.VideoCapture(str(source))
            continue
        out.put((cam, time.monotonic(), image))
        due += period
        stop.wait(max(0.0, due - time.monotonic()))
    cap.release()
