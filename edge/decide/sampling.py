"""Sampling for retraining: frames worth a second look, kept as snapshots on the device.

Three samplers, each named in the policy's ``sampling`` section and off unless it is
there: ``near_threshold`` (a score within ±epsilon of its class's ``accept_at`` or
``reject_at``: where the model and the policy disagree most easily), ``rare_classes``
(classes listed as rare, or seen in under ``max_share`` of a camera's observations so
far) and ``random`` (a small share of all frames, the unbiased reference). Each has a
cap per hour and per day, per camera, on the monotonic clock, so a stuck scene near a
threshold cannot fill the disk and a wall-clock step cannot open the gates. The
snapshots share the store's size and age caps with the alert snapshots; what leaves
the device is a ``decision`` event naming the snapshot's id, its sha256 and why it was
kept, never its pixels.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field

from .tracker import Observation

HOUR_S = 3600.0
DAY_S = 86400.0
REASONS = ("near_threshold", "rare_class", "random")
MAX_COUNTED = 1_000_000  # observations a camera's class counts hold before they are halved


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Capped(_Strict):
    per_hour: int = Field(default=10, ge=0, description="snapshots a camera keeps for this sampler in any hour")
    per_day: int = Field(default=100, ge=0, le=100_000, description="and in any 24 hours")


class NearThreshold(_Capped):
    epsilon: float = Field(default=0.05, gt=0, le=0.5, description="a score within ±epsilon of accept_at or reject_at")
    classes: list[str] = Field(default=[], description="empty: any class")


class RareClasses(_Capped):
    classes: list[str] = Field(default=[], description="always rare")
    max_share: float = Field(default=0.0, ge=0, lt=1, description=(
        "also rare: a class in under this share of the camera's observations so far (0: only the listed ones)"))
    min_seen: int = Field(default=1000, ge=1, description="observations a camera must have made before max_share judges")
    outcomes: list[Literal["accept", "reject", "unsure"]] = Field(default=["unsure", "reject"], min_length=1)


class RandomShare(_Capped):
    share: float = Field(default=0.001, gt=0, le=0.1, description="the chance each frame is kept")
    per_hour: int = Field(default=5, ge=0)
    per_day: int = Field(default=50, ge=0, le=100_000)


class Sampling(_Strict):
    near_threshold: NearThreshold | None = None
    rare_classes: RareClasses | None = None
    random: RandomShare | None = None

    @property
    def active(self) -> bool:
        return any(s is not None for s in (self.near_threshold, self.rare_classes, self.random))


class Window:
    """The monotonic times of the snapshots a sampler took, over the last day."""

    __slots__ = ("times",)

    def __init__(self) -> None:
        self.times: deque[float] = deque()

    def allows(self, now: float, cap: _Capped) -> bool:
        while self.times and now - self.times[0] >= DAY_S:
            self.times.popleft()
        if len(self.times) >= cap.per_day:
            return False
        hour = 0
        for t in reversed(self.times):  # at most per_hour steps
            if now - t >= HOUR_S or hour >= cap.per_hour:
                break
            hour += 1
        return hour < cap.per_hour


@dataclass
class CameraSamples:
    """One camera's cap windows and class counts; touched by the executor that has the camera."""

    windows: dict[str, Window] = field(default_factory=lambda: {r: Window() for r in REASONS})
    counts: dict[str, int] = field(default_factory=dict)
    seen: int = 0
    drawn: float | None = None  # the frame (its monotonic capture time) the random sampler last drew for

    def count(self, observations: Sequence[Observation], outcomes: Sequence[str]) -> None:
        for o in observations:
            if o.outcome in outcomes:
                self.counts[o.label] = self.counts.get(o.label, 0) + 1
                self.seen += 1
        if self.seen > MAX_COUNTED:  # halve: the recent past weighs as much as the distant
            self.counts = {k: v // 2 for k, v in self.counts.items() if v > 1}
            self.seen = sum(self.counts.values())


@dataclass(frozen=True)
class Pick:
    """Why a frame is kept: the reasons whose caps had room, the ones whose caps had none,
    and the observation that decided it (None for a random frame)."""

    reasons: tuple[str, ...]
    capped: tuple[str, ...]
    obs: Observation | None = None
    threshold: str | None = None  # accept_at or reject_at, for near_threshold


Thresholds = Callable[[str], tuple[float, float]]  # label -> (accept_at, reject_at)


def wanted(spec: Sampling, cam: CameraSamples, observations: Sequence[Observation], thresholds: Thresholds,
           rng: random.Random, frame: float) -> dict[str, tuple[Observation | None, str | None]]:
    """The samplers that want this result, each with the observation that made it want it.
    ``frame`` tells frames apart (their monotonic capture time): the random sampler draws
    once a frame, however many tasks' results it has."""
    out: dict[str, tuple[Observation | None, str | None]] = {}
    near = spec.near_threshold
    if near is not None:
        best: tuple[float, Observation, str] | None = None
        for o in observations:
            if near.classes and o.label not in near.classes:
                continue
            for name, at in zip(("accept_at", "reject_at"), thresholds(o.label)):
                gap = abs(o.score - at)
                if gap <= near.epsilon and (best is None or gap < best[0]):
                    best = (gap, o, name)
        if best is not None:
            out["near_threshold"] = (best[1], best[2])
    rare = spec.rare_classes
    if rare is not None:
        judged = rare.max_share > 0 and cam.seen >= rare.min_seen
        for o in observations:
            if o.outcome not in rare.outcomes:
                continue
            if o.label in rare.classes or (judged and cam.counts.get(o.label, 0) < rare.max_share * cam.seen):
                if "rare_class" not in out or o.score > out["rare_class"][0].score:  # type: ignore[union-attr]
                    out["rare_class"] = (o, None)
        cam.count(observations, rare.outcomes)  # after judging: a class is not common by its own frame
    if spec.random is not None and cam.drawn != frame:
        cam.drawn = frame
        if rng.random() < spec.random.share:
            out["random"] = (None, None)
    return out


def pick(spec: Sampling, cam: CameraSamples, observations: Sequence[Observation], thresholds: Thresholds,
         rng: random.Random, now: float) -> Pick | None:
    """Whether to keep this frame, and why; None when no sampler wants it. Takes nothing
    from the caps: :func:`take` does, once the store has accepted the snapshot."""
    want = wanted(spec, cam, observations, thresholds, rng, now)
    if not want:
        return None
    caps = {"near_threshold": spec.near_threshold, "rare_class": spec.rare_classes, "random": spec.random}
    room = tuple(r for r in REASONS if r in want and cam.windows[r].allows(now, caps[r]))  # type: ignore[arg-type]
    capped = tuple(r for r in REASONS if r in want and r not in room)
    first = next((want[r] for r in room if want[r][0] is not None), (None, None))
    return Pick(room, capped, *first)


def take(cam: CameraSamples, reasons: Sequence[str], now: float) -> None:
    for r in reasons:
        cam.windows[r].times.append(now)
