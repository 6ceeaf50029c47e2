"""Histograms the frame path can afford: one bucket increment, no lock.

prometheus_client's own histogram takes a lock per observation that a scrape also
takes. Here each series has one writer at a time (the executor serving its camera) and
the scrape copies the bucket list, which the GIL makes atomic: the writer never waits,
and a scrape at worst sees the sum one observation ahead of the buckets.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Sequence

# seconds; a frame budget is 10-100 ms, a slow model on a Pi a few hundred
AGE_BUCKETS = (0.005, 0.01, 0.02, 0.033, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
STAGE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.033, 0.05, 0.1, 0.2, 0.5, 1.0)


class Histogram:
    """Bucket counts and a sum for one series; ``le`` bounds as Prometheus has them."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def read(self) -> tuple[list[int], float]:
        """Per-bucket counts (not cumulative) and the sum, as of now."""
        return self.counts.copy(), self.sum
