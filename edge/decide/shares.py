"""How much of a zone a segmentation gives some classes: the measure of ``min_share`` rules.

Exclude zones are taken out of every share, the frame's included (a screen showing
people is not a person in the cell). Zone masks are drawn once per map size and zone,
then reused: a frame costs one count of the zone's pixels per rule.
"""

from __future__ import annotations

import threading
from typing import Sequence

import numpy as np

from edge.inference.adapters import SegmentMap

from .zones import Box, Point

MAX_REGIONS = 64  # zone masks kept; a policy has a few zones, map sizes change with a model


class ShareMeter:
    """Shares of classes in zones; one per engine, used from every executor."""

    def __init__(self) -> None:
        self._regions: dict[tuple, np.ndarray | None] = {}
        self._lock = threading.Lock()

    def share(self, segmap: SegmentMap, classes: Sequence[str], zone: Sequence[Point] | None,
              excludes: Sequence[Sequence[Point]] = ()) -> tuple[float, str]:
        """The share of ``zone`` (or the frame) the ``classes`` cover together, and the one
        of them that covers most (the first when none is there)."""
        region = self._region(segmap, zone, excludes)
        counts = segmap.counts(region)
        total = int(counts.sum())
        ids = [segmap.labels.index(c) if c in segmap.labels else -1 for c in classes]
        covered = [int(counts[i]) if 0 <= i < counts.size else 0 for i in ids]
        if total == 0:
            return 0.0, classes[0]
        best = max(range(len(classes)), key=lambda k: covered[k])
        return sum(covered) / total, classes[best]

    def _region(self, segmap: SegmentMap, zone: Sequence[Point] | None,
                excludes: Sequence[Sequence[Point]]) -> np.ndarray | None:
        if zone is None and not excludes:
            return None
        key = (segmap.classes.shape, tuple(map(tuple, zone)) if zone else None,
               tuple(tuple(map(tuple, z)) for z in excludes))
        region = self._regions.get(key)
        if region is None:
            region = segmap.region(zone) if zone else np.ones(segmap.classes.shape, bool)
            for polygon in excludes:
                region &= ~segmap.region(polygon)
            with self._lock:
                if len(self._regions) >= MAX_REGIONS:
                    self._regions.clear()
                self._regions[key] = region
        return region


def bounds(polygon: Sequence[Point] | None) -> Box:
    """The box around a zone (the frame without one): where a share alert points."""
    if not polygon:
        return (0.0, 0.0, 1.0, 1.0)
    xs, ys = [p[0] for p in polygon], [p[1] for p in polygon]
    return (min(xs), min(ys), max(xs), max(ys))
