"""``edge bench observe``: what watching the pipeline costs a 720p frame budget.

Three costs, each as a share of the frame budget and against work measured in the same
run (decoding the frame, the model's ``invoke()``):

* the quality measures: a 160-pixel grey copy and its four numbers, timed on real
  frames; the device takes them at most every ``observe.quality.interval_s``, so the
  cost per frame is the measure divided by the frames in that interval;
* the observer sink on each result (histograms, drift window), on the model's own
  predictions of the clip;
* a scrape every second: a real daemon on the clip with ``/metrics``, scraped over HTTP
  once a second; the collector's work (``generate_latest``, CPU time of the scraping
  thread) is timed on the daemon's own registry: c ms of it a second is c / 1000 of
  every frame's budget.
"""

from __future__ import annotations

import statistics
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import cv2
from prometheus_client import generate_latest

from edge.capture.thread import Frame
from edge.config import ObserveConfig, QualityConfig, parse_config
from edge.inference.model import Model
from edge.observe.drift import ModelRef
from edge.observe.observer import Observer
from edge.observe.quality import measure_frame
from edge.schedule.scheduler import Result

from .kit import free_port


def _frames(source: Path, count: int) -> tuple[list, float, float]:
    cap = cv2.VideoCapture(str(source))
    fps = cap.get(cv2.CAP_PROP_FPS) or 30.0
    frames, decode = [], []
    while len(frames) < count:
        t0 = time.perf_counter()
        ok, image = cap.read()
        decode.append((time.perf_counter() - t0) * 1e3)
        if not ok:
            break
        frames.append(image)
    cap.release()
    return frames, statistics.median(decode), fps


def _p(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def run_observe_bench(model_path: Path, source: Path, *, manifest: Path | None = None, threads: int | None = None,
                      seconds: float = 10.0) -> dict[str, Any]:
    frames, decode_ms, fps = _frames(source, 100)
    if not frames:
        raise ValueError(f"{source}: no frame could be read")
    h, w = frames[0].shape[:2]
    budget_ms = 1000.0 / fps
    width = QualityConfig().width
    model = Model.load(model_path, manifest=manifest, num_threads=threads)
    predictions = [model.predict(f) for f in frames[:30]]
    invoke = [times.invoke_ms for _, times in predictions]
    sink_us = _sink_us(frames[0], predictions)
    quality = []
    for _ in range(5):
        for f in frames:
            t0 = time.perf_counter()
            measure_frame(f, width, 0.0)
            quality.append((time.perf_counter() - t0) * 1e3)
    interval = QualityConfig().interval_s
    q50 = statistics.median(quality)
    scrape = _scrape(model_path, manifest, source, threads, seconds)
    collect_ms = scrape["collect_ms_p50"]
    return {
        "source": source.name, "frame": f"{w}x{h}", "fps": fps, "budget_ms": round(budget_ms, 3),
        "baselines": {"decode_ms_p50": round(decode_ms, 3), "invoke_ms_p50": round(statistics.median(invoke), 3)},
        "quality": {
            "width": width, "interval_s": interval, "measure_ms_p50": round(q50, 4),
            "measure_ms_p99": round(_p(quality, 0.99), 4),
            "every_frame_share_of_budget": round(q50 / budget_ms, 5),
            "per_frame_share_of_budget": round(q50 / (fps * interval) / budget_ms, 6),
            "measure_over_decode": round(q50 / decode_ms, 4),
            "measure_over_invoke": round(q50 / statistics.median(invoke), 4),
        },
        # one scrape a second costing c ms of CPU takes c / 1000 of each second, so of each frame budget
        # histograms and the drift window, on the executor's thread, per result
        "sink": {"per_result_us_p50": round(sink_us, 2), "share_of_budget": round(sink_us / 1e3 / budget_ms, 6),
                 "detections_per_result": round(statistics.mean(len(p.detections) for p, _ in predictions), 1)},
        "scrape": {**scrape, "per_frame_share_of_budget": round(collect_ms / 1000.0, 6),
                   "collect_over_invoke": round(collect_ms / statistics.median(invoke), 4)},
    }


def _sink_us(image, predictions: list) -> float:
    """Microseconds the observer sink takes per result (median of 20 rounds over the predictions)."""
    model_name = "bench"
    ref = ModelRef(model_name, "1")
    observer = Observer(ObserveConfig(), {"cam": ["det"]}, model_of=lambda camera, task: ref,
                        outcome=lambda label, score: "unsure" if 0.25 <= score < 0.5 else "accept")
    now, rounds, seq = time.monotonic(), [], 0
    for _ in range(20):
        t0 = time.perf_counter()
        for prediction, times in predictions:
            seq += 1
            at = now + seq * 0.02
            observer(Result(Frame("cam", seq, image, time.time(), at), "det", model_name, prediction, times, at + 0.01))
        rounds.append((time.perf_counter() - t0) / len(predictions) * 1e6)
    return statistics.median(rounds)


def _scrape(model_path: Path, manifest: Path | None, source: Path, threads: int | None,
            seconds: float) -> dict[str, Any]:
    """A daemon on the clip at its own pace, scraped once a second for ``seconds``."""
    from edge.daemon import Daemon  # the bench sits above the daemon

    port = free_port()
    model = {"path": str(model_path), **({"manifest": str(manifest)} if manifest else {})}
    cfg = parse_config({
        "device": {"id": "bench-observe"}, "runtime": {"num_threads": threads or 2},
        "logging": {"stats_interval_s": 3600}, "models": {"det": model},
        "cameras": [{"id": "cam", "source": {"kind": "video", "path": str(source), "loop": True}, "model": "det"}],
        "metrics": {"listen": f"127.0.0.1:{port}"}})
    daemon = Daemon(cfg)
    stop = threading.Event()
    runner = threading.Thread(target=daemon.run, args=(stop,), name="bench-daemon", daemon=True)
    runner.start()
    http, collect, size = [], [], 0
    try:
        time.sleep(1.0)
        start, processed0 = time.monotonic(), daemon.cameras[0].processed
        while time.monotonic() - start < seconds:
            round_start = time.perf_counter()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                size = len(r.read())
            http.append((time.perf_counter() - round_start) * 1e3)
            cpu = time.thread_time()
            generate_latest(daemon.metrics.registry)
            collect.append((time.thread_time() - cpu) * 1e3)
            time.sleep(max(0.0, 1.0 - (time.perf_counter() - round_start)))
        elapsed = time.monotonic() - start
        fps = (daemon.cameras[0].processed - processed0) / elapsed
    finally:
        stop.set()
        runner.join(5)
    return {"scrapes": len(http), "exposition_bytes": size, "http_ms_p50": round(statistics.median(http), 3),
            "collect_ms_p50": round(statistics.median(collect), 3), "collect_ms_max": round(max(collect), 3),
            "processed_fps": round(fps, 2)}
