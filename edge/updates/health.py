"""The health window: a swapped-in model is watched against the model it replaced.

A scheduler sink summarises every result per model slot (latency, detections, mean
confidence, unsure items) and the scheduler reports failed runs to :meth:`error`. When
a model is swapped in, the results of the old one on the same cameras just before the
swap are the baseline; after the window the new one is judged on errors, latency
against the frame budget, and output sanity against that baseline.

Unsure comes from an injectable ``outcome(label, score)`` (accept | reject | unsure):
the decisions engine's when the daemon wires it in, else a score band.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from edge.capture.thread import Frame
from edge.observe.baseline import scored
from edge.schedule.scheduler import Result

Outcome = Callable[[str, float], str]
BASELINE_SLOWER = 1.5  # p95 this much above the old model's counts as slower
HISTORY = 4000  # samples kept per slot: the baseline and the window come from these


def band_outcome(low: float, high: float) -> Outcome:
    """Below ``low`` reject, from ``high`` accept, in between unsure."""

    def outcome(label: str, score: float) -> str:
        return "reject" if score < low else "accept" if score >= high else "unsure"

    return outcome


@dataclass(frozen=True)
class HealthLimits:
    window_s: float = 60.0
    min_results: int = 20  # new-model results before a verdict
    max_error_rate: float = 0.02
    latency_factor: float = 1.0  # p95 of a run against the camera's budget x this
    max_unsure_rate: float = 0.3  # share of output items that are unsure ...
    max_unsure_increase: float = 0.15  # ... and more than the baseline's share plus this
    max_confidence_drop: float = 0.2  # mean score may fall by this much against the baseline
    detections_ratio: tuple[float, float] = (0.5, 2.0)  # new / baseline detections a frame
    min_baseline_detections: float = 0.5  # compare detections only above this many a frame


@dataclass(frozen=True, slots=True)
class Sample:
    at: float  # monotonic, when the result was ready
    camera: str
    model: str
    latency_ms: float
    detections: int
    items: int  # scored outputs judged: detections, or the top class
    score_sum: float
    unsure: int


@dataclass
class Verdict:
    healthy: bool
    reason: str | None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Window:
    """One model's trial on a slot, from the moment it was swapped in."""

    slot: str
    model: str
    started: float  # monotonic
    budget_ms: float
    baseline: list[Sample]
    last_before: dict[str, float]  # camera -> when its last old-model result was ready


class HealthWatch:
    """Sink for every result; ``slot_of`` maps (camera, task) to the model slot it runs."""

    def __init__(self, slot_of: dict[tuple[str, str], str], outcome: Outcome) -> None:
        self.slot_of = slot_of
        self.outcome = outcome
        self._lock = threading.Lock()
        self._samples: dict[str, deque[Sample]] = {}
        self._errors: dict[str, deque[tuple[float, str]]] = {}
        self._frames: dict[str, Frame] = {}

    # --- fed by the executors --------------------------------------------------------------

    def __call__(self, result: Result) -> None:
        slot = self.slot_of.get((result.frame.camera, result.task))
        if slot is None:
            return
        p = result.prediction
        items = scored(p)
        unsure = sum(self.outcome(label, score) == "unsure" for label, score in items)
        t = result.times
        sample = Sample(result.finished_at, result.frame.camera, result.model,
                        t.preprocess_ms + t.invoke_ms + t.postprocess_ms, len(p.detections), len(items),
                        float(sum(score for _, score in items)), unsure)
        with self._lock:
            self._samples.setdefault(slot, deque(maxlen=HISTORY)).append(sample)
            if result.crop is None:
                self._frames[result.frame.camera] = result.frame

    def error(self, camera: str, task: str, model: str) -> None:
        """A run that raised (called by the scheduler)."""
        slot = self.slot_of.get((camera, task))
        if slot is not None:
            with self._lock:
                self._errors.setdefault(slot, deque(maxlen=HISTORY)).append((time.monotonic(), model))

    # --- read by the agent -------------------------------------------------------------------

    def recent_frame(self, cameras: Iterable[str]) -> np.ndarray | None:
        """The newest whole frame of one of ``cameras``, else of any camera."""
        with self._lock:
            frames = [self._frames[c] for c in cameras if c in self._frames] or list(self._frames.values())
        return max(frames, key=lambda f: f.captured_mono).image if frames else None

    def begin(self, slot: str, model: str, previous: str | None, budget_ms: float, baseline_s: float) -> Window:
        """Start watching ``model`` on ``slot``; call right after the swap took effect."""
        now = time.monotonic()
        with self._lock:
            old = [s for s in self._samples.get(slot, ()) if s.model == previous and now - s.at <= baseline_s]
        last: dict[str, float] = {}
        for s in old:
            last[s.camera] = s.at
        return Window(slot, model, now, budget_ms, old, last)

    def evaluate(self, window: Window, limits: HealthLimits, *, final: bool = False) -> Verdict | None:
        """A verdict once the window is over (None: keep watching)."""
        if not final and time.monotonic() - window.started < limits.window_s:
            return None  # before scanning the history under the lock every result takes
        with self._lock:
            new = [s for s in self._samples.get(window.slot, ()) if s.at >= window.started and s.model == window.model]
            errors = sum(1 for t, m in self._errors.get(window.slot, ()) if t >= window.started and m == window.model)
        runs = len(new) + errors
        if not final and runs < limits.min_results:
            return None
        metrics = _metrics(new, window, errors)
        if runs == 0:
            return Verdict(True, None, metrics) if final else None
        reason = _judge(metrics, limits, window)
        return Verdict(reason is None, reason, metrics)


def _metrics(new: list[Sample], window: Window, errors: int) -> dict[str, float]:
    m: dict[str, float] = {"results": float(len(new)), "errors": float(errors),
                           "error_rate": errors / max(1, len(new) + errors)}
    if new:
        lat = sorted(s.latency_ms for s in new)
        m["latency_p50_ms"] = lat[len(lat) // 2]
        m["latency_p95_ms"] = lat[min(len(lat) - 1, int(0.95 * len(lat)))]
        m["budget_ms"] = window.budget_ms
        m.update(_outputs(new, ""))
    if window.baseline:
        m.update(_outputs(window.baseline, "baseline_"))
        lat = sorted(s.latency_ms for s in window.baseline)
        m["baseline_latency_p95_ms"] = lat[min(len(lat) - 1, int(0.95 * len(lat)))]
    gaps = _swap_gaps(new, window)
    if gaps:
        m.update(gaps)
    return {k: round(v, 4) for k, v in m.items()}


def _outputs(samples: list[Sample], prefix: str) -> dict[str, float]:
    items = sum(s.items for s in samples)
    return {
        f"{prefix}detections_per_frame": sum(s.detections for s in samples) / len(samples),
        f"{prefix}mean_confidence": sum(s.score_sum for s in samples) / items if items else 0.0,
        f"{prefix}unsure_rate": sum(s.unsure for s in samples) / items if items else 0.0,
    }


def _swap_gaps(new: list[Sample], window: Window) -> dict[str, float]:
    """The longest wait on a camera from its last old-model result to its first new one,
    and that camera's usual interval between results before the swap."""
    first: dict[str, float] = {}
    for s in new:
        first.setdefault(s.camera, s.at)
    gaps = {c: (first[c] - window.last_before[c]) * 1e3 for c in first if c in window.last_before}
    if not gaps:
        return {}
    camera = max(gaps, key=gaps.__getitem__)
    times = [s.at for s in window.baseline if s.camera == camera]
    intervals = [(b - a) * 1e3 for a, b in zip(times, times[1:])]
    doc = {"swap_gap_ms": gaps[camera]}
    if intervals:
        doc["frame_interval_ms"] = statistics.median(intervals)
    return doc


def _judge(m: dict[str, float], limits: HealthLimits, window: Window) -> str | None:
    if m["error_rate"] > limits.max_error_rate:
        return f"error_rate: {m['errors']:.0f} of {m['results'] + m['errors']:.0f} runs failed"
    if "latency_p95_ms" not in m:
        return None
    # over the budget, and clearly slower than the old model under the same load (a busy
    # device slows both alike: that is not the new model's fault)
    slower = m["latency_p95_ms"] > BASELINE_SLOWER * m.get("baseline_latency_p95_ms", 0.0)
    if m["latency_p95_ms"] > window.budget_ms * limits.latency_factor and slower:
        return (f"latency: p95 {m['latency_p95_ms']:.1f} ms over {window.budget_ms * limits.latency_factor:.1f} ms "
                f"({window.budget_ms:.1f} ms budget x {limits.latency_factor:g})")
    # never blame a model for being as unsure as the one it replaces
    unsure_limit = max(limits.max_unsure_rate, m.get("baseline_unsure_rate", 0.0) + limits.max_unsure_increase)
    if m["unsure_rate"] > unsure_limit:
        return f"unsure_rate: {m['unsure_rate']:.2f} of outputs unsure, limit {unsure_limit:.2f}"
    if "baseline_mean_confidence" in m:
        drop = m["baseline_mean_confidence"] - m["mean_confidence"]
        if drop > limits.max_confidence_drop and m["baseline_mean_confidence"] > 0:
            return (f"confidence_drop: mean score {m['mean_confidence']:.2f} against {m['baseline_mean_confidence']:.2f} "
                    f"before, limit -{limits.max_confidence_drop:g}")
        base = m["baseline_detections_per_frame"]
        if base >= limits.min_baseline_detections:
            ratio = m["detections_per_frame"] / base
            low, high = limits.detections_ratio
            if not low <= ratio <= high:
                return (f"detections_per_frame: {m['detections_per_frame']:.2f} a frame against {base:.2f} before "
                        f"(ratio {ratio:.2f}, allowed {low:g}..{high:g})")
    return None
