"""``edge bench``: the pipeline's throughput as a ratio of the bare ``invoke()`` loop.

Four loops run on the same model, threads and video in one process: the bare
invoke loop (the ceiling); the real pipeline (capture thread and camera worker, as
``edge run`` uses them) on the video; the same pipeline fed frames decoded up front,
which separates the pipeline's own cost from the cost of decoding the video on the
same cores; and the naive loop a tutorial would write (read, resize, normalise and
quantize in float, invoke, dequantize everything, NMS) on one thread.
A shared machine's speed drifts by more than the differences being measured, so
the loops take turns in short rounds and the report gives the median of the
per-round ratios next to the median rates.
"""

from __future__ import annotations

import resource
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

from edge.config import CameraConfig, SchedulerConfig, VideoSource
from edge.core.errors import SourceError
from edge.core.stats import LatencyWindow
from edge.daemon import make_camera
from edge.inference.model import Model
from edge.schedule.scheduler import Executor, Result, Scheduler

STAGES = ("capture_wait", "preprocess", "invoke", "postprocess")
WARMUP_S = 0.5
ROUND_S = 2.0
PREDECODED_FRAMES = 50


def run_bench(
    model_path: Path,
    source: Path,
    *,
    manifest: Path | None = None,
    labels: Path | None = None,
    threads: int | None = None,
    seconds: float = 20.0,
) -> dict[str, Any]:
    """Measure the three loops for about ``seconds`` each and return a JSON-ready report."""
    model = Model.load(model_path, manifest=manifest, labels=labels, num_threads=threads)
    frame = _first_frame(source)
    stages = {name: LatencyWindow(size=100_000) for name in STAGES}
    rates: dict[str, list[float]] = {"bare": [], "pipeline": [], "predecoded": [], "naive": []}
    decoded = _decode_frames(source, PREDECODED_FRAMES)
    naive = NaiveLoop(model, source)
    steal = StealMeter()
    try:
        for _ in range(max(1, round(seconds / ROUND_S))):
            rates["bare"].append(bare_invoke_fps(model, frame, ROUND_S))
            rates["pipeline"].append(pipeline_fps(model, source, ROUND_S, stages))
            rates["predecoded"].append(pipeline_fps(model, source, ROUND_S, None, MemorySource(decoded)))
            rates["naive"].append(_timed(naive.step, ROUND_S))
    finally:
        naive.close()

    def median_ratio(name: str) -> float:
        return round(statistics.median(x / b for x, b in zip(rates[name], rates["bare"])), 3)

    return {
        "model": model.name,
        "source": str(source),
        "threads": model.loaded.num_threads,
        "rounds": len(rates["bare"]),
        "seconds_per_round": ROUND_S,
        "bare_invoke_fps": round(statistics.median(rates["bare"]), 2),
        "pipeline_fps": round(statistics.median(rates["pipeline"]), 2),
        "pipeline_predecoded_fps": round(statistics.median(rates["predecoded"]), 2),
        "naive_loop_fps": round(statistics.median(rates["naive"]), 2),
        "pipeline_vs_bare": median_ratio("pipeline"),
        "pipeline_predecoded_vs_bare": median_ratio("predecoded"),
        "naive_vs_bare": median_ratio("naive"),
        "pipeline_vs_naive": round(statistics.median(
            p / n for p, n in zip(rates["pipeline"], rates["naive"])), 3),
        "bare_fps_range": [round(min(rates["bare"]), 2), round(max(rates["bare"]), 2)],
        "pipeline_stage_ms": {name: w.percentiles((50, 95, 99)) for name, w in stages.items()},
        "cpu_steal_pct": steal.percent(),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "of_which_predecoded_frames_mb": round(sum(f.nbytes for f in decoded) / 2**20, 1),
    }


def _first_frame(source: Path) -> np.ndarray:
    return _decode_frames(source, 1)[0]


def _decode_frames(source: Path, count: int) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(source))
    frames = []
    while len(frames) < count:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    if not frames:
        raise SourceError(f"cannot read a frame from {str(source)!r}")
    return frames


class StealMeter:
    """Share of CPU time the hypervisor took from this VM (``/proc/stat``), or None off Linux."""

    def __init__(self) -> None:
        self._start = self._read()

    @staticmethod
    def _read() -> list[int] | None:
        try:
            with open("/proc/stat") as f:
                return [int(x) for x in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None

    def percent(self) -> float | None:
        now = self._read()
        if self._start is None or now is None:
            return None
        delta = [b - a for a, b in zip(self._start, now)]
        return round(100 * delta[7] / sum(delta), 1) if sum(delta) else 0.0


class MemorySource:
    """Frames decoded up front, looped: the pipeline without the decoder's CPU cost."""

    live = False
    paced = False
    fps = None
    description = "decoded frames in memory"

    def __init__(self, frames: list[np.ndarray]) -> None:
        self._frames = frames
        self._next = 0

    def open(self) -> None:
        pass

    def read(self) -> np.ndarray:
        frame = self._frames[self._next % len(self._frames)]
        self._next += 1
        return frame

    def close(self) -> None:
        pass


def bare_invoke_fps(model: Model, frame: np.ndarray, seconds: float) -> float:
    """``invoke()`` alone, on a real preprocessed frame, as fast as it goes."""
    model.predict(frame)  # leaves a real input in the tensor
    return _timed(model.invoke_only, seconds)


def _timed(step: Callable[[], None], seconds: float) -> float:
    end = time.perf_counter() + WARMUP_S
    while time.perf_counter() < end:
        step()
    n, start = 0, time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        step()
        n += 1
    return n / (time.perf_counter() - start)


def pipeline_fps(
    model: Model,
    source: Path,
    seconds: float,
    stages: dict[str, LatencyWindow] | None,
    frames: MemorySource | None = None,
) -> float:
    """The real capture thread and scheduler on the looped video, back-pressured.

    ``frames`` replaces the video decoder; stage latencies of the measured period
    are added to ``stages`` when given.
    """
    cam = CameraConfig(
        id="bench",
        source=VideoSource(kind="video", path=source, pace="fast", loop=True),
        model="bench",
        budget_ms=10_000,  # a throughput run: no frame may be dropped as late
    )
    executor = Executor(0, {"bench": model})
    sink = StageRecorder()
    camera = make_camera(cam, SchedulerConfig(), lambda: scheduler.wake(), source=frames)
    scheduler = Scheduler([camera], [executor], sink)
    camera.capture.start()
    scheduler.start()
    try:
        time.sleep(WARMUP_S)
        sink.clear()  # keep the measured period only
        start_n, start = camera.processed, time.perf_counter()
        time.sleep(seconds)
        fps = (camera.processed - start_n) / (time.perf_counter() - start)
    finally:
        scheduler.stop()
        camera.capture.stop()
        scheduler.join(2.0)
    if stages is not None:
        for name in STAGES:
            for value in sink.windows[name].samples():
                stages[name].add(value)
    return fps


class StageRecorder:
    """A result sink that keeps per-stage latencies, including the wait for a frame."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.windows = {name: LatencyWindow(size=100_000) for name in STAGES}
        self._last_finished: float | None = None

    def __call__(self, result: Result) -> None:
        t = result.times
        started = result.finished_at - (t.preprocess_ms + t.invoke_ms + t.postprocess_ms) / 1e3
        if self._last_finished is not None:
            self.windows["capture_wait"].add(max(0.0, started - self._last_finished) * 1e3)
        self._last_finished = result.finished_at
        for name, value in (("preprocess", t.preprocess_ms), ("invoke", t.invoke_ms),
                            ("postprocess", t.postprocess_ms)):
            self.windows[name].add(value)


class NaiveLoop:
    """The tutorial loop: every step in sequence on one thread, float all the way."""

    def __init__(self, model: Model, source: Path) -> None:
        self.model = model
        self.cap = cv2.VideoCapture(str(source))
        spec = model.manifest.input
        self.rgb = spec.colour == "rgb"
        self.mean, self.std = np.array(spec.mean, np.float32), np.array(spec.std, np.float32)
        self.input = model.loaded.inputs[0]
        _, self.height, self.width, _ = self.input.shape

    def step(self) -> None:
        ok, frame = self.cap.read()
        if not ok:
            self.cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, frame = self.cap.read()
        x = cv2.resize(frame, (self.width, self.height))
        if self.rgb:
            x = cv2.cvtColor(x, cv2.COLOR_BGR2RGB)
        x = (x.astype(np.float32) - self.mean) / self.std
        inp = self.input
        if inp.quantized:
            info = np.iinfo(inp.dtype)
            x = np.clip(np.round(x / inp.scale + inp.zero_point), info.min, info.max)
        interpreter = self.model.loaded.interpreter
        interpreter.set_tensor(inp.index, x.astype(inp.dtype)[None])
        interpreter.invoke()
        out = [(interpreter.get_tensor(t.index).astype(np.float32) - t.zero_point) * (t.scale or 1.0)
               for t in self.model.loaded.outputs]
        thresholds = self.model.manifest.thresholds
        if self.model.manifest.task == "yolov8":
            pred = out[0][0]
            scores = pred[4:].max(axis=0)
            keep = scores > thresholds.score
            size = np.array([[self.width], [self.height], [self.width], [self.height]])
            cx, cy, w, h = pred[:4, keep] * size
            boxes = np.stack([cx - w / 2, cy - h / 2, w, h], axis=1)
            cv2.dnn.NMSBoxes(boxes.tolist(), scores[keep].tolist(), thresholds.score, thresholds.iou)
        else:
            np.argsort(-out[0].reshape(-1))[: thresholds.top_k]

    def close(self) -> None:
        self.cap.release()
