"""``edge bench``: the pipeline's throughput as a ratio of the bare ``invoke()`` loop.

These loops run on the same model, threads and video in one process:

* ``bare``: ``invoke()`` alone, as fast as it goes, both cores inside the runtime;
* ``bare_decoding``: the same loop while another thread decodes the clip, one frame per
  invoke: the best any pipeline with a software decoder can do on this machine, and so
  the limit the real pipeline is measured against;
* ``pipeline``: the real capture thread and scheduler (as ``edge run`` uses them) on the
  video, overlapped (inputs made on the capture thread, outputs decoded on the finisher);
* ``pipeline_serial``: the same with the overlap off, every stage on the executor;
* ``predecoded`` and ``predecoded_serial``: both fed frames decoded up front, which
  separates the pipeline's own cost from the decoder's, against ``bare``;
* ``naive``: the loop a tutorial would write (read, resize, normalise and quantize in
  float, invoke, dequantize everything, NMS) on one thread.

A shared machine's speed drifts by more than the differences being measured, so the
loops take turns in short rounds and the report gives the median of the per-round
ratios, with their quartiles, next to the median rates.
"""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

from edge.capture.sources import VideoFileSource
from edge.config import CameraConfig, SchedulerConfig, VideoSource
from edge.core.errors import EdgeError, SourceError
from edge.core.stats import LatencyWindow
from edge.daemon import make_camera
from edge.inference.model import Model
from edge.schedule.scheduler import Executor, Result, Scheduler

from .kit import load_average, rss_mb

STAGES = ("preprocess", "invoke", "postprocess")
WARMUP_S = 0.5
ROUND_S = 2.0
DEFAULT_ROUNDS = 20  # the CLI spells its default too, to stay light to import
PREDECODED_FRAMES = 50
JOIN_S = 120.0
# (loop, its limit): each ratio is taken per round against the limit measured in the same round
RATIOS = {
    "pipeline": "bare_decoding",
    "pipeline_serial": "bare_decoding",
    "predecoded": "bare",
    "predecoded_serial": "bare",
    "bare_decoding": "bare",
    "pipeline_vs_bare": "bare",
    "naive": "bare",
}


def run_bench(
    model_path: Path,
    source: Path,
    *,
    manifest: Path | None = None,
    labels: Path | None = None,
    threads: int | None = None,
    rounds: int = DEFAULT_ROUNDS,
    round_s: float = ROUND_S,
    naive: bool = True,
) -> dict[str, Any]:
    """Measure the loops in ``rounds`` interleaved rounds and return a JSON-ready report."""
    model = Model.load(model_path, manifest=manifest, labels=labels, num_threads=threads)
    frame = _first_frame(source)
    model.predict(frame)
    rss_loaded = rss_mb(None)
    stages = {name: LatencyWindow(size=100_000) for name in STAGES}
    share: list[float] = []
    kept_up: list[float] = []
    decoded = _decode_frames(source, PREDECODED_FRAMES)
    loops: dict[str, Callable[[], float]] = {
        "bare": lambda: bare_invoke_fps(model, frame, round_s),
        "bare_decoding": lambda: bare_decoding_fps(model, frame, source, round_s, kept_up),
        "pipeline": lambda: pipeline_fps(model, source, round_s, stages, invoke_share=share),
        "pipeline_serial": lambda: pipeline_fps(model, source, round_s, None, overlap=False),
        "predecoded": lambda: pipeline_fps(model, source, round_s, None, MemorySource(decoded)),
        "predecoded_serial": lambda: pipeline_fps(model, source, round_s, None, MemorySource(decoded),
                                                  overlap=False),
    }
    naive_loop = NaiveLoop(model, source) if naive else None
    if naive_loop is not None:
        loops["naive"] = lambda: _timed(naive_loop.step, round_s)
    rates: dict[str, list[float]] = {name: [] for name in loops}
    steal, load_before = StealMeter(), load_average()
    try:
        for _ in range(max(1, rounds)):
            for name, loop in loops.items():
                rates[name].append(loop())
    finally:
        if naive_loop is not None:
            naive_loop.close()
    rates["pipeline_vs_bare"] = rates["pipeline"]

    ratios = {}
    for name, limit in RATIOS.items():
        if name in rates:
            per_round = [x / b for x, b in zip(rates[name], rates[limit])]
            q = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else per_round * 3
            ratios[f"{name}_vs_{limit}" if name != "pipeline_vs_bare" else name] = {
                "median": round(statistics.median(per_round), 3), "q1": round(q[0], 3), "q3": round(q[2], 3)}
    return {
        "model": model.name,
        "source": str(source),
        "threads": model.loaded.num_threads,
        "rounds": len(rates["bare"]),
        "seconds_per_round": round_s,
        "fps": {name: round(statistics.median(r), 2) for name, r in rates.items() if name != "pipeline_vs_bare"},
        "fps_range": {name: [round(min(r), 2), round(max(r), 2)] for name, r in rates.items()
                      if name in ("bare", "bare_decoding", "pipeline")},
        "ratios": ratios,
        "pipeline_stage_ms": {name: w.percentiles((50, 95, 99)) for name, w in stages.items()},
        "pipeline_invoke_share": round(statistics.median(share), 3) if share else None,
        "decoder_frames_per_invoke": round(statistics.median(kept_up), 3),
        "cpu_steal_pct": steal.percent(),
        "load_average": {"before": load_before, "after": load_average()},
        "rss_mb": {"model_loaded": rss_loaded, "end": rss_mb(None), "peak": rss_mb(None, peak=True)},
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


def bare_decoding_fps(model: Model, frame: np.ndarray, source: Path, seconds: float,
                      kept_up: list[float] | None = None) -> float:
    """``invoke()`` alone while another thread decodes the clip, one frame per invoke.

    ``kept_up`` gets the frames decoded per invoke (1.0: the decoder kept pace)."""
    model.predict(frame)
    wanted, stop = threading.Semaphore(0), threading.Event()
    video = VideoFileSource(source, pace="fast", loop=True)
    video.open()
    counts = {"decoded": 0, "invoked": 0}

    def decode() -> None:
        while not stop.is_set():
            if wanted.acquire(timeout=0.1):
                video.read()
                counts["decoded"] += 1

    decoder = threading.Thread(target=decode, name="bench-decoder", daemon=True)
    decoder.start()

    def step() -> None:
        model.invoke_only()
        counts["invoked"] += 1
        wanted.release()

    try:
        return _timed(step, seconds)
    finally:
        stop.set()
        decoder.join()
        video.close()
        if kept_up is not None:
            kept_up.append(counts["decoded"] / max(1, counts["invoked"]))


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
    *,
    overlap: bool = True,
    invoke_share: list[float] | None = None,
) -> float:
    """The real capture thread and scheduler on the looped video, back-pressured.

    ``frames`` replaces the video decoder; stage latencies of the measured period
    are added to ``stages`` when given, and the share of the period spent inside
    ``invoke()`` to ``invoke_share``.
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
    scheduler = Scheduler([camera], [executor], sink, overlap=overlap)
    camera.capture.start()
    scheduler.start()
    try:
        time.sleep(WARMUP_S)
        sink.clear()  # keep the measured period only
        start_n, start = camera.processed, time.perf_counter()
        time.sleep(seconds)
        elapsed = time.perf_counter() - start
        fps = (camera.processed - start_n) / elapsed
        invoked_ms = sink.invoke_ms
    finally:
        scheduler.stop()
        camera.capture.stop()
        # the next loop uses the same interpreter: the executor must be out of its invoke
        # first, however long a busy machine makes that invoke
        scheduler.join(JOIN_S)
        if not scheduler.done:
            raise EdgeError(f"the pipeline's executor did not stop within {JOIN_S:g} s")
    if stages is not None:
        for name in STAGES:
            for value in sink.windows[name].samples():
                stages[name].add(value)
    if invoke_share is not None:
        invoke_share.append(invoked_ms / 1e3 / elapsed)
    return fps


class StageRecorder:
    """A result sink that keeps per-stage latencies and the time spent invoking."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.windows = {name: LatencyWindow(size=100_000) for name in STAGES}
        self.invoke_ms = 0.0

    def __call__(self, result: Result) -> None:
        t = result.times
        self.invoke_ms += t.invoke_ms
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
