"""Result drift: a camera's results over a window against a baseline of the same model.

Each window (default ten minutes) keeps, per class, a histogram of the scores in equal
bins over [0, 1], the class counts, the frames, and the unsure items. When it closes it
is compared with the baseline, a :class:`~edge.inference.manifest.Baseline`: the one in
the model's manifest, or else the first healthy window of that model version on that
camera (learned, see edge/observe/baseline.py). The comparison:

* ``psi``: the population stability index of the score histogram over every class,
  sum((a - e) * ln(a / e)) over the bins' shares (empty bins count as 0.1%); 0.1 is
  the usual "look at it", 0.25 "it has moved";
* ``class_shift``: Cohen's w of the class mix, sqrt(chi2 / n), with the chi-square of
  the window's class counts against the baseline's shares (0.1 small, 0.3 medium, 0.5
  large), and ``chi2`` itself with its degrees of freedom;
* ``detections_ratio``: detections per frame against the baseline's.

Nothing here judges: the policy's ``drift`` limits do (edge/decide/policy.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

from edge.inference.manifest import Baseline, ClassBaseline

DEFAULT_BINS = 10
PSI_FLOOR = 1e-3  # an empty bin's share, so that ln() stays finite
CLASS_PSI_MIN = 30  # a class gets its own PSI with this many scores in window and baseline
TOP_CLASSES = 10  # classes listed in a report


def psi(actual: Sequence[int], expected: Sequence[int]) -> float:
    """Population stability index of two histograms over the same bins."""
    a_total, e_total = sum(actual), sum(expected)
    if not a_total or not e_total:
        return 0.0
    out = 0.0
    for a, e in zip(actual, expected, strict=True):
        pa, pe = max(a / a_total, PSI_FLOOR), max(e / e_total, PSI_FLOOR)
        out += (pa - pe) * math.log(pa / pe)
    return out


def class_shift(counts: Mapping[str, int], expected: Mapping[str, int]) -> tuple[float, int, float]:
    """(chi2, degrees of freedom, Cohen's w) of ``counts`` against the shares of ``expected``.

    Shares are smoothed by half a count per class, so a class the baseline never saw
    counts as rare rather than impossible."""
    n = sum(counts.values())
    labels = set(counts) | set(expected)
    if n == 0 or len(labels) < 2:
        return 0.0, 0, 0.0
    total = sum(expected.values()) + 0.5 * len(labels)
    chi2 = 0.0
    for label in labels:
        e = n * (expected.get(label, 0) + 0.5) / total
        chi2 += (counts.get(label, 0) - e) ** 2 / e
    return chi2, len(labels) - 1, math.sqrt(chi2 / n)


class DriftWindow:
    """What one window saw; filled by the executor serving the camera."""

    def __init__(self, bins: int, since: float, started: float) -> None:
        self.bins = bins
        self.since = since  # time.time() of its first frame
        self.started = started  # time.monotonic() of its first frame
        self.until = since
        self.frames = 0
        self.detections = 0
        self.unsure = 0
        self.scores: dict[str, list[int]] = {}

    def add(self, scored: Sequence[tuple[str, float]], unsure: int, captured_at: float) -> None:
        self.frames += 1
        self.until = captured_at
        self.detections += len(scored)
        self.unsure += unsure
        top = self.bins - 1
        for label, score in scored:
            hist = self.scores.get(label)
            if hist is None:
                hist = self.scores[label] = [0] * self.bins
            hist[min(top, max(0, int(score * self.bins)))] += 1

    def as_baseline(self, source: str) -> Baseline:
        return Baseline(source=source, frames=self.frames, bins=self.bins, detections=self.detections,
                        unsure=self.unsure,
                        classes={k: ClassBaseline(count=sum(v), scores=list(v)) for k, v in self.scores.items()})


@dataclass(frozen=True)
class DriftReport:
    """One closed window of a camera's task, compared with its baseline (None: no baseline yet)."""

    camera: str
    task: str
    model: str
    model_version: str
    window: int  # its number on this camera, task and model version since the start
    since: float
    until: float
    frames: int
    detections: int
    detections_per_frame: float
    unsure_share: float
    baseline: str  # manifest, learned, or none
    learned: bool = False  # this window became the baseline
    psi: float | None = None
    class_shift: float | None = None
    chi2: float | None = None
    dof: int | None = None
    detections_ratio: float | None = None
    class_psi: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The report as a drift event's payload: numbers and names only."""
        return {k: v for k, v in asdict(self).items() if v is not None and k != "camera"}

    def judged(self) -> dict[str, float]:
        """What the policy's drift limits look at."""
        doc: dict[str, float] = {"detections": float(self.detections)}
        for key in ("psi", "class_shift", "detections_ratio"):
            value = getattr(self, key)
            if value is not None:
                doc[key] = value
        return doc


def compare(window: DriftWindow, reference: Baseline | None) -> dict[str, Any]:
    """The comparison fields of a report (empty without a reference)."""
    if reference is None or reference.bins != window.bins:
        return {}
    pooled = [0] * window.bins
    for hist in window.scores.values():
        pooled = [a + b for a, b in zip(pooled, hist)]
    expected = [0] * reference.bins
    for c in reference.classes.values():
        expected = [a + b for a, b in zip(expected, c.scores)]
    chi2, dof, w = class_shift({k: sum(v) for k, v in window.scores.items()},
                               {k: c.count for k, c in reference.classes.items()})
    per_class = {}
    for label, hist in window.scores.items():
        ref = reference.classes.get(label)
        if ref is not None and sum(hist) >= CLASS_PSI_MIN and ref.count >= CLASS_PSI_MIN:
            per_class[label] = round(psi(hist, ref.scores), 4)
    doc: dict[str, Any] = {"psi": round(psi(pooled, expected), 4), "class_shift": round(w, 4),
                           "chi2": round(chi2, 2), "dof": dof, "class_psi": per_class}
    base_rate = reference.detections / reference.frames
    if base_rate > 0 and window.frames:
        doc["detections_ratio"] = round(window.detections / window.frames / base_rate, 4)
    return doc


@dataclass(frozen=True)
class ModelRef:
    """The model serving a camera's task now, and the baseline its manifest ships."""

    name: str
    version: str
    baseline: Baseline | None = None


class DriftTracker:
    """Windows of one camera's task, one model version at a time.

    ``learned(camera, task, model)`` is the stored baseline for a version, if any;
    ``healthy(camera, task)`` says whether a finished window may become the baseline; ``learn``
    keeps a new one."""

    def __init__(self, camera: str, task: str, window_s: float, min_frames: int, *,
                 learned: Callable[[str, str, ModelRef], Baseline | None],
                 learn: Callable[[str, str, ModelRef, Baseline], None],
                 healthy: Callable[[str, str], bool]) -> None:
        self.camera = camera
        self.task = task
        self.window_s = window_s
        self.min_frames = min_frames
        self._learned = learned
        self._learn = learn
        self._healthy = healthy
        self.model: ModelRef | None = None
        self.reference: Baseline | None = None
        self.reference_kind = "none"
        self.window: DriftWindow | None = None
        self.windows = 0

    def add(self, model: ModelRef, scored: Sequence[tuple[str, float]], unsure: int, captured_at: float,
            captured_mono: float) -> DriftReport | None:
        """One frame's scored outputs; the report of the window this frame closed, if any."""
        report = None
        if model != self.model:  # a new version starts afresh; its partial window says nothing
            self._switch(model)
        elif self.window is not None and captured_mono - self.window.started >= self.window_s:
            report = self.close(full=True)
        if self.window is None:
            bins = self.reference.bins if self.reference is not None else DEFAULT_BINS
            self.window = DriftWindow(bins, captured_at, captured_mono)
        self.window.add(scored, unsure, captured_at)
        return report

    def close(self, *, full: bool = False) -> DriftReport | None:
        """End the current window (a stop or the end of the source: ``full`` False); its
        report, or None when it is too short to say anything."""
        window, self.window = self.window, None
        if window is None or window.frames < self.min_frames or self.model is None:
            return None
        self.windows += 1
        learned = False
        if self.reference is None and full and window.detections and self._healthy(self.camera, self.task):
            self.reference, self.reference_kind, learned = window.as_baseline(f"window {self.windows}"), "learned", True
            self._learn(self.camera, self.task, self.model, self.reference)
        counts = sorted(((k, sum(v)) for k, v in window.scores.items()), key=lambda kv: -kv[1])[:TOP_CLASSES]
        return DriftReport(
            camera=self.camera, task=self.task, model=self.model.name, model_version=self.model.version,
            window=self.windows, since=window.since, until=window.until, frames=window.frames,
            detections=window.detections, detections_per_frame=round(window.detections / window.frames, 4),
            unsure_share=round(window.unsure / window.detections, 4) if window.detections else 0.0,
            baseline=self.reference_kind, learned=learned, counts=dict(counts),
            **(compare(window, self.reference) if not learned else {}))

    def _switch(self, model: ModelRef) -> None:
        self.model, self.window, self.windows = model, None, 0
        self.reference = model.baseline or self._learned(self.camera, self.task, model)
        self.reference_kind = "manifest" if model.baseline is not None else "learned" if self.reference else "none"
