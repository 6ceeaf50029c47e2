"""A light multi-object tracker: boxes on consecutive frames become objects with ids.

Association is greedy, per class: first by IoU (best pairs first), then the boxes
left over by the distance between centres, which keeps a small or fast object whose
boxes no longer overlap. A track is confirmed after ``min_hits`` frames (one-frame
flickers never become objects) and is lost when it has not been seen for
``lost_after_s``. Ids grow per tracker and are never reused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from .zones import Box, iou

NO_CROPS: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Observation:
    """One detection (or a whole-frame classification) in normalised coordinates."""

    label: str
    score: float
    box: Box
    outcome: str  # accept, reject or unsure
    # trigger task -> its answer on this detection's crop (edge.decide.cascade)
    crops: Mapping[str, Any] = field(default_factory=lambda: NO_CROPS)


@dataclass(slots=True)
class Track:
    id: int
    label: str
    box: Box
    score: float
    outcome: str
    first_seen: float  # capture times, seconds
    last_seen: float
    hits: int = 1
    confirmed: bool = False
    seen_now: bool = field(default=True)
    crops: dict[str, Any] = field(default_factory=dict)  # each trigger task's latest answer on this object

    @property
    def age_s(self) -> float:
        return self.last_seen - self.first_seen


@dataclass(frozen=True)
class TrackerSettings:
    iou: float = 0.3
    max_distance: float = 0.1  # between box centres, in normalised frame units
    lost_after_s: float = 1.0
    min_hits: int = 2


class Tracker:
    """Tracks for one camera. Not thread-safe: one caller per camera."""

    def __init__(self, settings: TrackerSettings) -> None:
        self.settings = settings
        self.tracks: dict[int, Track] = {}
        self._next_id = 1

    def update(self, observations: list[Observation], t: float) -> tuple[list[Track], list[Track]]:
        """Feed one frame taken at ``t``; returns (confirmed tracks alive, tracks just lost)."""
        for track in self.tracks.values():
            track.seen_now = False
        unmatched = self._associate(observations, t)
        for obs in unmatched:
            self.tracks[self._next_id] = Track(self._next_id, obs.label, obs.box, obs.score, obs.outcome, t, t,
                                               confirmed=self.settings.min_hits <= 1, crops=dict(obs.crops))
            self._next_id += 1
        lost = [tr for tr in self.tracks.values() if t - tr.last_seen > self.settings.lost_after_s]
        for track in lost:
            del self.tracks[track.id]
        alive = [tr for tr in self.tracks.values() if tr.confirmed]
        return alive, [tr for tr in lost if tr.confirmed]

    def _associate(self, observations: list[Observation], t: float) -> list[Observation]:
        s = self.settings
        free = set(self.tracks)
        left = list(range(len(observations)))
        pairs = sorted(
            ((iou(tr.box, observations[i].box), tid, i) for tid, tr in self.tracks.items()
             for i in left if tr.label == observations[i].label),
            reverse=True,
        )
        used: set[int] = set()
        for score, tid, i in pairs:
            if score < s.iou:
                break
            if tid in free and i not in used:
                self._hit(self.tracks[tid], observations[i], t)
                free.discard(tid)
                used.add(i)
        left = [i for i in left if i not in used]
        near = sorted(
            ((_distance(self.tracks[tid].box, observations[i].box), tid, i) for tid in free
             for i in left if self.tracks[tid].label == observations[i].label),
        )
        for dist, tid, i in near:
            if dist > s.max_distance:
                break
            if tid in free and i not in used:
                self._hit(self.tracks[tid], observations[i], t)
                free.discard(tid)
                used.add(i)
        return [observations[i] for i in range(len(observations)) if i not in used]

    def _hit(self, track: Track, obs: Observation, t: float) -> None:
        track.box, track.score, track.outcome = obs.box, obs.score, obs.outcome
        track.last_seen = t
        track.crops.update(obs.crops)  # a task that did not run on this frame keeps its last answer
        track.hits += 1
        track.seen_now = True
        if track.hits >= self.settings.min_hits:
            track.confirmed = True


def _distance(a: Box, b: Box) -> float:
    return math.hypot((a[0] + a[2] - b[0] - b[2]) / 2, (a[1] + a[3] - b[1] - b[3]) / 2)
