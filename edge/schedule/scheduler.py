"""The frame-budgeted scheduler: executors run camera tasks, earliest deadline first.

Each camera has a frame budget. A frame's deadline is its capture time plus that
budget. Executor threads, each owning its own interpreters, take the newest frame of
the camera whose frame has the earliest deadline, drop it if it is already past its
deadline, and otherwise run the camera's plan for it (see :mod:`edge.planner`).
Nothing queues: a camera holds at most one waiting frame (in its capture slot), and
a camera is worked on by one executor at a time, so its frames stay in order.

With ``overlap`` (``runtime.scheduler.overlap``) an executor's thread does little more than invoke:
each camera's capture thread makes its primary task's input while the model works
on the frame before, and a finisher thread decodes the outputs of a task no other
task waits for and hands every result to the sinks, in the order the executors
finished them, while the next invoke runs. The results are the same either way.

A crop's result names the detection it was cut from (``parent``), and once every
result of a frame has been through the sinks the scheduler says so (``on_frame_done``),
in the same order: a sink that joins crops to their objects knows when a frame is whole.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from edge.capture.motion import MotionDetector
from edge.capture.thread import CaptureThread, Frame
from edge.config import CameraConfig, TaskConfig
from edge.core.logs import fields
from edge.core.stats import LatencyWindow, RateMeter
from edge.inference.adapters import Prediction
from edge.inference.model import Invoked, Model, StageTimes

from .planner import CostModel, Planner, WorkItem

log = logging.getLogger("edge.scheduler")

SINK_LOG_EVERY_S = 60.0  # a sink failing on every frame: one traceback a minute, every error counted
DEFAULT_BUDGET_MS = 100.0  # when neither the config nor the source gives a frame rate


@dataclass(frozen=True, slots=True)
class Result:
    """One task's prediction on one frame (or a crop of it), with where the time went."""

    frame: Frame
    task: str
    model: str
    prediction: Prediction
    times: StageTimes
    finished_at: float  # time.monotonic(), when the result was handed to the sinks
    crop: tuple[float, float, float, float] | None = None
    started_at: float | None = None  # time.monotonic(), when the executor took this task up
    parent: tuple[str, int] | None = None  # a crop's (parent task, index of the detection it was cut from)

    @property
    def age_ms(self) -> float:
        """Capture-to-result age."""
        return (self.finished_at - self.frame.captured_mono) * 1e3

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "camera": self.frame.camera,
            "seq": self.frame.seq,
            "captured_at": round(self.frame.captured_at, 4),
            "task": self.task,
            "model": self.model,
            "age_ms": round(self.age_ms, 2),
        }
        if self.crop is not None:
            doc["crop"] = [round(v, 1) for v in self.crop]
        if self.parent is not None:
            doc["parent"] = {"task": self.parent[0], "detection": self.parent[1]}
        doc.update(self.prediction.to_dict())
        return doc


Sink = Callable[[Result], None]
FrameDone = Callable[[str, int], None]  # (camera, frame seq): every result of that frame is through the sinks


@dataclass
class Running:
    """What an executor is invoking right now, for the stuck-inference watchdog."""

    camera: str
    task: str
    model: str
    started: float  # time.monotonic()
    estimate_ms: float


class Executor:
    """One inference thread's interpreters: a Model per model slot it serves.

    ``models`` is read and replaced by the executor's own thread only: another thread
    asks for a model swap with :meth:`swap`, and the executor takes it between two
    frames (:meth:`apply_swaps`), so no frame ever runs half on one model.
    """

    def __init__(self, index: int, models: dict[str, Model]) -> None:
        self.index = index
        self.models = models
        self.running: Running | None = None  # written by its own thread only
        self.busy_s = 0.0
        self.overhead = LatencyWindow()
        self._swap_lock = threading.Lock()
        self._swaps: dict[str, tuple[Model, threading.Event]] = {}

    def swap(self, slot: str, model: Model) -> threading.Event:
        """Ask for ``model`` to serve ``slot`` from the next frame on; the event is set once it does."""
        taken = threading.Event()
        with self._swap_lock:
            self._swaps[slot] = (model, taken)
        return taken

    def apply_swaps(self) -> None:
        """Take the pending swaps (the executor's thread, between frames)."""
        if not self._swaps:  # the common case, without the lock
            return
        with self._swap_lock:
            swaps, self._swaps = self._swaps, {}
        for slot, (model, taken) in swaps.items():
            self.models[slot] = model
            taken.set()


class CameraRunner:
    """One camera as the scheduler sees it: capture, plan, motion gate and counters."""

    def __init__(self, cfg: CameraConfig, capture: CaptureThread, costs: CostModel,
                 outcome: Callable[[str, float], str] | None = None) -> None:
        """``outcome`` (label, score) -> accept / reject / unsure serves triggers with ``outcomes``."""
        self.cfg = cfg
        self.capture = capture
        self.tasks = {t.name: t for t in cfg.effective_tasks()}
        self.planner = Planner(self.tasks.values(), costs, cfg.motion.keepalive_ms, outcome)
        self.motion = MotionDetector(cfg.motion) if self.planner.gated else None
        self.busy = False  # guarded by the scheduler's condition
        self.finishing = 0  # runs handed to the finisher and not yet through the sinks (guarded likewise)
        self.frame_no = 0
        self.processed = 0
        self.prepared = 0  # runs whose input the capture thread had made
        self.dropped = {"too_old": 0}
        self.deadline_misses = 0
        self.age = LatencyWindow()
        self.budget_used = LatencyWindow()
        self.task_latency = {name: LatencyWindow() for name in self.tasks}
        self._captured_rate = RateMeter(time.monotonic())
        self._processed_rate = RateMeter(time.monotonic())

    @property
    def primary_task(self) -> TaskConfig | None:
        """The task that runs first on a frame's whole image whenever it is due."""
        whole = [t for t in self.tasks.values() if t.trigger is None]
        return max(whole, key=lambda t: t.priority) if whole else None  # max keeps the first of equals

    @property
    def budget_ms(self) -> float:
        if self.cfg.budget_ms is not None:
            return self.cfg.budget_ms
        fps = self.capture.source.fps
        return 1000.0 / fps if fps else DEFAULT_BUDGET_MS

    def snapshot(self, now: float) -> dict[str, Any]:
        cap = self.capture.stats()
        counters = self.planner.counters()
        doc: dict[str, Any] = {
            "camera": self.cfg.id,
            "state": cap.state.value,
            "budget_ms": round(self.budget_ms, 2),
            "capture_fps": round(self._captured_rate.rate(now, cap.captured), 2),
            "processed_fps": round(self._processed_rate.rate(now, self.processed), 2),
            "captured": cap.captured,
            "processed": self.processed,
            "prepared": self.prepared,
            "superseded": cap.superseded,
            "dropped": dict(self.dropped),
            "deadline_misses": self.deadline_misses,
            "reopens": cap.reopens,
            "read_errors": cap.read_errors,
            "age_ms": self.age.percentiles((50, 99)),
            "budget_used": self.budget_used.percentiles((50, 95)),
            "tasks": {
                name: {
                    "runs": c.runs, "forced": c.forced, "crops": c.crops, "skips": dict(c.skips),
                    "estimate_ms": round(self.planner.costs.estimate(name), 3),
                    "latency_ms": self.task_latency[name].percentiles((50, 95)),
                }
                for name, c in counters.items()
            },
        }
        if self.motion is not None:
            doc["motion"] = {"frames": self.motion.frames, "moving": self.motion.moving,
                             "runs_saved": sum(c.skips["motion"] for c in counters.values())}
        return doc


class Scheduler:
    """Runs every camera's tasks on a pool of executors; start, then stop and join."""

    def __init__(self, cameras: list[CameraRunner], executors: list[Executor], sink: Sink | None = None,
                 *, overlap: bool = True) -> None:
        self.cameras = cameras
        self.executors = executors
        self.sink = sink
        self.overlap = overlap
        self.on_error: Callable[[str, str, str], None] | None = None  # (camera, task, model) of a failed run
        self.on_frame_done: FrameDone | None = None  # set before start
        self.inference_errors = 0
        self.sink_errors = 0
        self.failures: list[str] = []  # executors that died, and why: the daemon exits non-zero
        self._sink_logged_at = -float("inf")
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(ex,), name=f"executor-{ex.index}", daemon=True)
            for ex in executors
        ]
        self._executors_left = len(executors)  # guarded by _cond; the last one out ends the finisher
        # (camera, task, model name, frame, crop, invoke or finished prediction, start, parent), or
        # (camera, frame) once a frame's runs are all queued; None: no more
        self._finishing: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._finisher = threading.Thread(target=self._finish_loop, name="finisher", daemon=True)
        if overlap:
            self._threads.append(self._finisher)
            for camera in cameras:
                self._set_preparer(camera, executors[0].models if executors else {})

    def _set_preparer(self, camera: CameraRunner, models: dict[str, Model]) -> None:
        task = camera.primary_task
        model = models.get(task.model) if task is not None else None
        preparer = model.preparer() if model is not None else None
        camera.capture.prepare = preparer
        # a camera that can scale (picamera2's lores stream) delivers the model's size from its next open on
        request = getattr(camera.capture.source, "request_lores", None)
        if preparer is not None and request is not None:
            request(preparer.scaled_size)

    def wake(self) -> None:
        """A camera has a new frame (called from capture threads)."""
        with self._cond:
            self._cond.notify()

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            if thread.ident is not None:  # started
                thread.join(max(0.0, deadline - time.monotonic()))

    @property
    def done(self) -> bool:
        """Every executor has exited: stopped, or every camera's source ended."""
        return not any(t.is_alive() for t in self._threads)

    def swap(self, slot: str, models: list[Model], timeout: float) -> None:
        """Give executor i ``models[i]`` for ``slot``, each between two of its frames.

        Raises TimeoutError if an executor did not take its model in ``timeout`` (e.g.
        stuck in an invoke); the swap then still happens when it can.
        """
        events = [ex.swap(slot, model) for ex, model in zip(self.executors, models, strict=True)]
        if self.overlap:  # inputs prepared for the old model still serve it, or are made again
            for camera in self.cameras:
                task = camera.primary_task
                if task is not None and task.model == slot:
                    self._set_preparer(camera, {slot: models[0]})
        if self.done:  # no executor thread left to take it
            for ex in self.executors:
                ex.apply_swaps()
        with self._cond:
            self._cond.notify_all()  # idle executors take it now
        deadline = time.monotonic() + timeout
        for event in events:
            if not event.wait(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"an executor did not take the new {slot} model within {timeout:g} s")

    def _run(self, executor: Executor) -> None:
        try:
            self._serve(executor)
        except BaseException as exc:  # noticed by the daemon, which exits so the service manager restarts it
            with self._cond:
                self.failures.append(f"executor-{executor.index}: {type(exc).__name__}: {exc}")
            log.critical("executor failed", exc_info=True, extra=fields(executor=executor.index))
        finally:
            with self._cond:
                self._executors_left -= 1
                last = self._executors_left == 0
            if last:
                self._finishing.put(None)

    def _serve(self, executor: Executor) -> None:
        while not self._stop.is_set():
            executor.apply_swaps()
            with self._cond:
                camera = self._earliest_deadline()
                if camera is None:
                    if all(c.capture.ended for c in self.cameras):
                        return
                    self._cond.wait(0.1)
                    continue
                camera.busy = True
            try:
                self._process(camera, executor)
            finally:
                with self._cond:
                    camera.busy = False
                    self._cond.notify()  # the camera may have a newer frame by now

    def _earliest_deadline(self) -> CameraRunner | None:
        # The deadline of a camera's oldest unserved frame, not of its newest: with
        # newest-frame deadlines the camera whose frames land a little earlier in each
        # period would win every time.
        best, best_deadline = None, float("inf")
        for camera in self.cameras:
            if camera.busy:
                continue
            waiting_since = camera.capture.peek()
            if waiting_since is None:
                continue
            deadline = waiting_since + camera.budget_ms / 1e3
            if deadline < best_deadline:
                best, best_deadline = camera, deadline
        return best

    def _process(self, camera: CameraRunner, executor: Executor) -> None:
        frame = camera.capture.get(0)
        if frame is None:
            return
        started = time.monotonic()
        budget_s = camera.budget_ms / 1e3
        deadline = frame.captured_mono + budget_s
        if started > deadline and not camera.capture.on_demand:
            camera.dropped["too_old"] += 1
            return
        motion = camera.motion(frame.image) if camera.motion is not None else None
        plan = camera.planner.start(camera.frame_no, started * 1e3, motion)
        overhead = time.monotonic() - started
        while True:
            t0 = time.monotonic()
            item = plan.next((deadline - t0) * 1e3)
            overhead += time.monotonic() - t0
            if item is None:
                break
            prediction = self._run_item(camera, executor, frame, item)
            t1 = time.monotonic()
            plan.done(item, (t1 - t0) * 1e3, prediction)
            overhead += time.monotonic() - t1
        plan.close()
        if self.on_frame_done is not None:
            if self.overlap:  # behind the frame's results in the finisher's queue
                self._finishing.put((camera, frame))
            else:
                self._frame_done(camera, frame)
        finished = time.monotonic()
        camera.frame_no += 1
        camera.processed += 1
        camera.deadline_misses += finished > deadline
        camera.age.add((finished - frame.captured_mono) * 1e3)
        camera.budget_used.add((finished - started) / budget_s)
        executor.busy_s += finished - started
        executor.overhead.add(overhead * 1e3)

    def _run_item(self, camera: CameraRunner, executor: Executor, frame: Frame, item: WorkItem) -> Prediction | None:
        task = camera.tasks[item.task]
        model = executor.models[task.model]
        image = frame.image if item.crop is None else crop(frame.image, item.crop)
        prepared = frame.prepared if self.overlap and item.crop is None else None
        t0 = time.monotonic()
        executor.running = Running(camera.cfg.id, task.name, model.name, t0,
                                   camera.planner.costs.estimate(task.name))
        try:
            invoked = model.invoke(image, prepared)
            # a task others wait for (triggers) is decoded here; any other, while the next invoke runs
            later = self.overlap and not camera.planner.has_children(task.name)
            outcome: Invoked | tuple[Prediction, StageTimes] = invoked if later else model.finish(invoked)
        except Exception:  # one bad run must not stop the camera
            self._failed(camera, task.name, model.name)
            return None
        finally:
            executor.running = None
        finished = time.monotonic()
        camera.task_latency[task.name].add((finished - t0) * 1e3)
        camera.prepared += invoked.was_prepared
        if self.overlap:
            with self._cond:
                camera.finishing += 1
            self._finishing.put((camera, task.name, model.name, frame, item.crop, outcome, t0, item.parent))
            return None if later else outcome[0]  # type: ignore[index]
        prediction, times = outcome  # type: ignore[misc]
        self._deliver(camera, task.name, model.name, frame, item.crop, prediction, times, t0, item.parent)
        return prediction

    def _deliver(self, camera: CameraRunner, task: str, model: str, frame: Frame, crop: Any,
                 prediction: Prediction, times: StageTimes, started: float,
                 parent: tuple[str, int] | None = None) -> None:
        if self.sink is None:
            return
        try:
            self.sink(Result(frame, task, model, prediction, times, time.monotonic(), crop, started, parent))
        except Exception:  # a sink's bug or full disk must not stop inference for every sink
            self._sink_failed(camera.cfg.id, task)

    def _frame_done(self, camera: CameraRunner, frame: Frame) -> None:
        try:
            self.on_frame_done(camera.cfg.id, frame.seq)  # type: ignore[misc]
        except Exception:  # as a sink's
            self._sink_failed(camera.cfg.id, "frame_done")

    def _sink_failed(self, camera: str, task: str) -> None:
        """Count every sink error; log one a minute at most, with its traceback."""
        self.sink_errors += 1
        now = time.monotonic()
        if now - self._sink_logged_at >= SINK_LOG_EVERY_S:
            self._sink_logged_at = now
            log.exception("result sink failed", extra=fields(camera=camera, task=task, sink_errors=self.sink_errors))

    def _failed(self, camera: CameraRunner, task: str, model: str) -> None:
        self.inference_errors += 1
        if self.on_error is not None:
            self.on_error(camera.cfg.id, task, model)
        log.exception("inference failed", extra=fields(camera=camera.cfg.id, task=task, model=model))

    def _finish_loop(self) -> None:
        try:
            self._finish()
        except BaseException as exc:  # as an executor's: the daemon exits and is restarted
            with self._cond:
                self.failures.append(f"finisher: {type(exc).__name__}: {exc}")
            log.critical("finisher failed", exc_info=True)

    def _finish(self) -> None:
        """The finisher: decode what is left to decode, then the sinks, in order."""
        while (work := self._finishing.get()) is not None:
            camera = work[0]
            if len(work) == 2:  # a frame's end, not a run: nothing to decode, not counted in finishing
                self._frame_done(*work)
                continue
            try:
                self._finish_one(*work)
            finally:
                with self._cond:
                    camera.finishing -= 1

    def _finish_one(self, camera: CameraRunner, task: str, model: str, frame: Frame, box: Any,
                    outcome: Any, started: float, parent: tuple[str, int] | None) -> None:
        if isinstance(outcome, Invoked):
            try:
                outcome = Model.finish(outcome)
            except Exception:
                self._failed(camera, task, model)
                return
        self._deliver(camera, task, model, frame, box, *outcome, started, parent)

    def snapshot(self) -> dict[str, Any]:
        """Counters and percentiles of every camera and executor."""
        now = time.monotonic()
        return {
            "cameras": [c.snapshot(now) for c in self.cameras],
            "executors": [
                {"index": ex.index, "busy_s": round(ex.busy_s, 3), "overhead_ms": ex.overhead.percentiles((50, 99))}
                for ex in self.executors
            ],
            "inference_errors": self.inference_errors,
            "sink_errors": self.sink_errors,
        }


def crop(image: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """The part of ``image`` inside ``box`` (frame pixels), clipped, at least 1x1."""
    h, w = image.shape[:2]
    x1 = min(max(int(box[0]), 0), w - 1)
    y1 = min(max(int(box[1]), 0), h - 1)
    x2 = min(max(int(np.ceil(box[2])), x1 + 1), w)
    y2 = min(max(int(np.ceil(box[3])), y1 + 1), h)
    return image[y1:y2, x1:x2]
