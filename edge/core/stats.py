"""Bounded latency windows, rate counters and process memory for the stats line and benchmarks."""

from __future__ import annotations

import threading
from collections import deque
from typing import Iterable

import numpy as np


class LatencyWindow:
    """The last ``size`` samples, with percentiles. Thread-safe; memory is bounded."""

    def __init__(self, size: int = 512) -> None:
        self._values: deque[float] = deque(maxlen=size)
        self._lock = threading.Lock()
        self.count = 0

    def add(self, value: float) -> None:
        with self._lock:
            self._values.append(value)
            self.count += 1

    def samples(self) -> list[float]:
        with self._lock:
            return list(self._values)

    def clear(self) -> None:
        with self._lock:
            self._values.clear()

    def percentiles(self, qs: Iterable[float] = (50, 95, 99)) -> dict[str, float]:
        """``{"p50": ..., "p95": ...}`` in the samples' unit; empty when there are none."""
        with self._lock:
            values = np.fromiter(self._values, dtype=np.float64)
        if values.size == 0:
            return {}
        qs = list(qs)
        return {f"p{q:g}": round(float(v), 3) for q, v in zip(qs, np.percentile(values, qs))}


class RateMeter:
    """Events per second between two reads of a monotonically growing counter."""

    def __init__(self, now: float, total: int = 0) -> None:
        self._last = (now, total)

    def rate(self, now: float, total: int) -> float:
        (then, before), self._last = self._last, (now, total)
        return (total - before) / (now - then) if now > then else 0.0


def rss_mb(pid: int | None = None, *, peak: bool = False) -> float:
    """Resident memory of a process (this one by default); ``peak``: its high-water mark.
    0.0 where ``/proc`` does not tell."""
    key = "VmHWM:" if peak else "VmRSS:"
    try:
        with open(f"/proc/{pid or 'self'}/status") as f:
            for line in f:
                if line.startswith(key):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0
