"""``edge bench``: the pipeline's throughput as a ratio of the bare ``invoke()`` loop.

Three loops run on the same model, threads and video in one process, one after
another: the bare invoke loop (the ceiling), the real pipeline (capture thread and
camera worker, as ``edge run`` uses them), and the naive loop a tutorial would
write (read, resize, normalise and quantize in float, invoke, dequantize
everything, NMS) on one thread. The bare loop runs first and last, and the
report keeps both, because this machine's speed drifts.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .config import CameraConfig, VideoSource
from .daemon import STAGES, CameraWorker
from .errors import SourceError
from .model import Model

WARMUP_S = 1.0


def run_bench(
    model_path: Path,
    source: Path,
    *,
    manifest: Path | None = None,
    labels: Path | None = None,
    threads: int | None = None,
    seconds: float = 20.0,
) -> dict[str, Any]:
    """Measure the three loops and return the report as a JSON-ready dict."""
    model = Model.load(model_path, manifest=manifest, labels=labels, num_threads=threads)
    frame = _first_frame(source)
    bare_before = bare_invoke_fps(model, frame, seconds)
    pipeline = pipeline_fps(model, source, seconds)
    naive = naive_loop_fps(model, source, seconds)
    bare_after = bare_invoke_fps(model, frame, seconds)
    bare = (bare_before + bare_after) / 2
    return {
        "model": model.name,
        "source": str(source),
        "threads": model.loaded.num_threads,
        "seconds_per_loop": seconds,
        "bare_invoke_fps": round(bare, 2),
        "bare_invoke_fps_first_last": [round(bare_before, 2), round(bare_after, 2)],
        "pipeline_fps": round(pipeline["fps"], 2),
        "naive_loop_fps": round(naive, 2),
        "pipeline_vs_bare": round(pipeline["fps"] / bare, 3),
        "naive_vs_bare": round(naive / bare, 3),
        "pipeline_vs_naive": round(pipeline["fps"] / naive, 3),
        "pipeline_stage_ms": pipeline["stages"],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def _first_frame(source: Path) -> np.ndarray:
    cap = cv2.VideoCapture(str(source))
    ok, frame = cap.read()
    cap.release()
    if not ok:
        raise SourceError(f"cannot read a frame from {str(source)!r}")
    return frame


def bare_invoke_fps(model: Model, frame: np.ndarray, seconds: float) -> float:
    """``invoke()`` alone, on a real preprocessed frame, as fast as it goes."""
    model.predict(frame)  # leaves a real input in the tensor
    return _timed(model.invoke_only, seconds)


def _timed(step, seconds: float) -> float:
    end = time.perf_counter() + WARMUP_S
    while time.perf_counter() < end:
        step()
    n, start = 0, time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        step()
        n += 1
    return n / (time.perf_counter() - start)


def pipeline_fps(model: Model, source: Path, seconds: float) -> dict[str, Any]:
    """The real capture thread and camera worker on the video, looped, back-pressured."""
    cam = CameraConfig(
        id="bench",
        source=VideoSource(kind="video", path=source, pace="fast", loop=True),
        model="bench",
    )
    worker = CameraWorker(cam, model, sink=None)
    worker.start()
    try:
        time.sleep(WARMUP_S)
        start_n, start = worker.processed, time.perf_counter()
        for w in worker.windows.values():
            w.clear()  # report the measured period only
        time.sleep(seconds)
        fps = (worker.processed - start_n) / (time.perf_counter() - start)
    finally:
        worker.stop()
        worker.join(2.0)
    stages = {name: worker.windows[name].percentiles((50, 95, 99)) for name in STAGES}
    return {"fps": fps, "stages": stages}


def naive_loop_fps(model: Model, source: Path, seconds: float) -> float:
    """The tutorial loop: every step in sequence on one thread, float all the way."""
    interpreter = model.loaded.interpreter
    inp, outs = model.loaded.inputs[0], model.loaded.outputs
    spec = model.manifest.input
    _, height, width, _ = inp.shape
    mean, std = np.array(spec.mean, np.float32), np.array(spec.std, np.float32)
    thresholds = model.manifest.thresholds
    cap = cv2.VideoCapture(str(source))

    def step() -> None:
        ok, frame = cap.read()
        if not ok:
            cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, frame = cap.read()
        x = cv2.resize(frame, (width, height))
        if spec.colour == "rgb":
            x = cv2.cvtColor(x, cv2.COLOR_BGR2RGB)
        x = (x.astype(np.float32) - mean) / std
        if inp.quantized:
            info = np.iinfo(inp.dtype)
            x = np.clip(np.round(x / inp.scale + inp.zero_point), info.min, info.max)
        interpreter.set_tensor(inp.index, x.astype(inp.dtype)[None])
        interpreter.invoke()
        out = [(interpreter.get_tensor(t.index).astype(np.float32) - t.zero_point) * (t.scale or 1.0)
               for t in outs]
        if model.manifest.task == "yolov8":
            pred = out[0][0]
            scores = pred[4:].max(axis=0)
            keep = scores > thresholds.score
            cx, cy, w, h = pred[:4, keep] * np.array([[width], [height], [width], [height]])
            boxes = np.stack([cx - w / 2, cy - h / 2, w, h], axis=1)
            cv2.dnn.NMSBoxes(boxes.tolist(), scores[keep].tolist(), thresholds.score, thresholds.iou)
        else:
            np.argsort(-out[0].reshape(-1))[: thresholds.top_k]

    try:
        return _timed(step, seconds)
    finally:
        cap.release()
