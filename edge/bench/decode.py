"""``edge bench decode``: the contract's strict decoder against pydantic's own JSON
validation of the same outbox batch, in interleaved rounds (the machine's speed drifts;
the ratio of each round does not).

Two batches of the daemon's detection summaries: a usual one, and one whose payloads
carry a number with a three-digit exponent, the only case in which the decoder walks
the parsed document to look for a number beyond a float's range.
"""

from __future__ import annotations

import os
import platform
import random
import statistics
import time
from typing import Any, Callable

from edge import __version__
from edge.core.contract import OutboxBatch, batch_body, decode_batch, event_json
from edge.core.ids import new_id
from edge.sync.events import detection_summary

from .pipeline import StealMeter

DEVICE = "plant-a-line3-cam"


def run_decode_bench(*, events: int = 500, rounds: int = 15, calls: int = 20) -> dict[str, Any]:
    """Microseconds per event for each decoder, and the median per-round ratios."""
    usual, exponent = _batch(events, extra=None), _batch(events, extra=1.5e100)
    steal = StealMeter()
    timings: dict[str, list[float]] = {"plain": [], "strict": [], "strict_walked": []}
    for _ in range(rounds):
        timings["plain"].append(_time(lambda: OutboxBatch.model_validate_json(usual), calls))
        timings["strict"].append(_time(lambda: decode_batch(usual, device=DEVICE), calls))
        timings["strict_walked"].append(_time(lambda: decode_batch(exponent, device=DEVICE), calls))

    def per_event(name: str) -> float:
        return round(statistics.median(timings[name]) / events * 1e6, 2)

    def vs_plain(name: str) -> float:
        return round(statistics.median(t / p for t, p in zip(timings[name], timings["plain"])), 2)

    return {
        "scenario": "decode",
        "events": events,
        "batch_bytes": len(usual),
        "rounds": rounds,
        "plain_model_validate_json_us_per_event": per_event("plain"),
        "strict_us_per_event": per_event("strict"),
        "strict_walked_us_per_event": per_event("strict_walked"),
        "strict_vs_plain": vs_plain("strict"),
        "strict_walked_vs_plain": vs_plain("strict_walked"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "edgecam": __version__,
                    "steal_percent": steal.percent()},
    }


def _batch(events: int, *, extra: float | None) -> bytes:
    rng = random.Random(1)
    wire = []
    for i in range(events):
        detections = [{"label": "person", "score": rng.random(), "box": [rng.uniform(0, 1280) for _ in range(4)]}
                      for _ in range(3)]
        e = detection_summary("infeed", time.time(), "yolov8n", detections, frame=i)
        payload = e.payload_json if extra is None else e.payload_json[:-1] + f',"gain":{extra!r}}}'
        wire.append(event_json(id=e.id, seq=i + 1, kind=e.kind.value, device=DEVICE, camera=e.camera,
                               captured_at=e.captured_at, recorded_at=e.recorded_at, priority=e.priority,
                               payload_json=payload))
    return batch_body(DEVICE, new_id(), time.time(), ",".join(wire))


def _time(call: Callable[[], Any], n: int) -> float:
    started = time.perf_counter()
    for _ in range(n):
        call()
    return (time.perf_counter() - started) / n
