"""Per-frame planning: which of a camera's tasks run on a frame, and in what order.

Pure logic: time and costs come in as arguments, so it is unit-tested
deterministically. For each frame the scheduler opens a :class:`FramePlan` and asks
it for one work item at a time with the budget actually left, reporting each run
back, so a run that took longer than estimated shrinks what follows it.

Rules, in order:
- A task not due by its cadence is skipped (``period``); a motion-gated task on a
  still scene is skipped until its keep-alive (``motion``).
- The highest-priority due task always runs, first, whatever the budget.
- The other due tasks run in priority order when their estimate fits the budget
  left, else they are skipped (``budget``); a smaller task may fill what a larger
  one could not use. A task skipped for budget ``starve_after`` frames in a row
  runs anyway (``forced``), so none starves, but only when no higher-priority task
  is still waiting in that frame: a budget overrun goes to the more important task.
- A trigger task runs on the crops of its parent's matching detections, best score
  first, at most ``max_crops``; when the parent found nothing, it is skipped
  (``trigger``). A trigger with ``outcomes`` fires only on detections whose outcome
  (accept / reject / unsure, from the ``outcome`` function the planner is given) is one
  of them: ``[unsure]`` runs a verifier on the uncertain cases alone. Each crop names
  the detection it was cut from, so its result can be joined back to that object.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from edge.config import TaskConfig
from edge.inference.adapters import Prediction

SKIP_REASONS = ("budget", "period", "trigger", "motion")

Box = tuple[float, float, float, float]
Outcome = Callable[[str, float], str]  # (label, score) -> accept, reject or unsure


class CostModel:
    """A latency estimate per task: a high percentile of its recent runs.

    The percentile is taken at the sample at or below it ("lower"), so the single
    slowest run never sets the estimate once there are two; yet a model that gets
    slower (a throttling CPU) is planned for within a few runs.
    """

    def __init__(self, window: int = 20, percentile: float = 90.0) -> None:
        self.window = window
        self.percentile = percentile
        self._runs: dict[str, deque[float]] = {}

    def observe(self, task: str, ms: float) -> None:
        self._runs.setdefault(task, deque(maxlen=self.window)).append(ms)

    def estimate(self, task: str) -> float:
        """Milliseconds the next run is planned to take; 0 before the first run."""
        runs = self._runs.get(task)
        if not runs:
            return 0.0
        return float(np.percentile(np.fromiter(runs, dtype=np.float64), self.percentile, method="lower"))


@dataclass
class TaskCounters:
    runs: int = 0
    forced: int = 0
    crops: int = 0
    skips: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))


@dataclass
class _TaskState:
    spec: TaskConfig
    order: int
    last_run_frame: int | None = None
    last_run_ms: float | None = None
    budget_skips: int = 0
    counters: TaskCounters = field(default_factory=TaskCounters)


@dataclass(frozen=True, slots=True)
class WorkItem:
    """Run ``task`` on the whole frame, or on ``crop`` (frame pixels) of it."""

    task: str
    crop: Box | None = None
    forced: bool = False
    parent: tuple[str, int] | None = None  # a crop's (parent task, index of the detection it was cut from)


class Planner:
    """Plans one camera's frames; owned by whichever executor holds the camera."""

    def __init__(self, tasks: Iterable[TaskConfig], costs: CostModel, keepalive_ms: float,
                 outcome: Outcome | None = None) -> None:
        self.costs = costs
        self.keepalive_ms = keepalive_ms
        self.outcome = outcome  # for triggers with ``outcomes``; None: such triggers never fire
        self._states = {t.name: _TaskState(t, i) for i, t in enumerate(tasks)}
        self._children: dict[str, list[str]] = {}
        for t in self._states.values():
            if t.spec.trigger:
                self._children.setdefault(t.spec.trigger.task, []).append(t.spec.name)

    def has_children(self, task: str) -> bool:
        """Whether other tasks run on this task's results (its triggers)."""
        return task in self._children

    @property
    def gated(self) -> bool:
        """Whether any task wants motion information."""
        return any(s.spec.motion_gated for s in self._states.values())

    def start(self, frame_no: int, now_ms: float, motion: bool | None = None) -> "FramePlan":
        """Open the plan of one frame. ``motion`` is None when nothing measured it."""
        due: list[_TaskState] = []
        for state in self._states.values():
            if state.spec.trigger is not None:
                continue
            reason = self._not_due(state, frame_no, now_ms, motion)
            if reason:
                state.counters.skips[reason] += 1
            else:
                due.append(state)
        due.sort(key=lambda s: (-s.spec.priority, s.order))
        return FramePlan(self, frame_no, now_ms, due)

    def _not_due(self, s: _TaskState, frame_no: int, now_ms: float, motion: bool | None) -> str | None:
        spec = s.spec
        if spec.every_n_frames and s.last_run_frame is not None:
            if frame_no - s.last_run_frame < spec.every_n_frames:
                return "period"
        if spec.min_interval_ms and s.last_run_ms is not None:
            if now_ms - s.last_run_ms < spec.min_interval_ms:
                return "period"
        if spec.motion_gated and motion is False and s.last_run_ms is not None:
            if now_ms - s.last_run_ms < self.keepalive_ms:
                return "motion"
        return None

    def counters(self) -> dict[str, TaskCounters]:
        return {name: s.counters for name, s in self._states.items()}


class FramePlan:
    """The work of one frame, handed out one item at a time."""

    def __init__(self, planner: Planner, frame_no: int, now_ms: float, due: list[_TaskState]) -> None:
        self._p = planner
        self._frame_no = frame_no
        self._now_ms = now_ms
        self._top = due[0] if due else None
        self._waiting: list[tuple[_TaskState, Box | None, tuple[str, int] | None]] = [
            (s, None, None) for s in due[1:]]
        self._ran: set[str] = set()
        self._fired: set[str] = set()

    def next(self, remaining_ms: float) -> WorkItem | None:
        """The next item to run with ``remaining_ms`` of budget left, or None: the frame is done."""
        if self._top is not None:
            top, self._top = self._top, None
            return WorkItem(top.spec.name)
        for i, (state, crop, parent) in enumerate(self._waiting):
            if self._p.costs.estimate(state.spec.name) <= remaining_ms:
                del self._waiting[i]
                return WorkItem(state.spec.name, crop, parent=parent)
            # Overrunning the budget for a starving task is allowed only when no
            # higher-priority item is still waiting: that one would deserve it more.
            if i == 0 and crop is None and state.budget_skips >= state.spec.starve_after:
                del self._waiting[i]
                return WorkItem(state.spec.name, forced=True)
        return None

    def done(self, item: WorkItem, elapsed_ms: float, prediction: Prediction | None) -> None:
        """Record a finished item; a detection result fires the tasks it triggers."""
        state = self._p._states[item.task]
        self._p.costs.observe(item.task, elapsed_ms)
        state.counters.runs += 1
        state.counters.forced += item.forced
        state.counters.crops += item.crop is not None
        state.last_run_frame, state.last_run_ms = self._frame_no, self._now_ms
        state.budget_skips = 0
        self._ran.add(item.task)
        if item.crop is None and prediction is not None:
            for child in self._p._children.get(item.task, ()):
                self._fire(self._p._states[child], item.task, prediction)

    def _fire(self, child: _TaskState, parent: str, prediction: Prediction) -> None:
        trig = child.spec.trigger
        assert trig is not None
        outcome = self._p.outcome
        if trig.outcomes and outcome is None:
            return
        hits = [(i, d) for i, d in enumerate(prediction.detections)
                if d.score >= trig.min_score and (not trig.classes or d.label in trig.classes)
                and (not trig.outcomes or outcome(d.label, d.score) in trig.outcomes)]  # type: ignore[misc]
        hits.sort(key=lambda h: -h[1].score)
        if not hits:
            return
        self._fired.add(child.spec.name)
        crops = [(child, _pad(d.box, trig.padding), (parent, i)) for i, d in hits[: trig.max_crops]]
        self._waiting.extend(crops)
        self._waiting.sort(key=lambda w: (-w[0].spec.priority, w[0].order))

    def close(self) -> None:
        """Count what was due but never ran, and triggers that did not fire."""
        skipped_for_budget = {s.spec.name: s for s, _, _ in self._waiting if s.spec.name not in self._ran}
        for state in skipped_for_budget.values():
            state.counters.skips["budget"] += 1
            state.budget_skips += 1
        for state in self._p._states.values():
            if state.spec.trigger is not None and state.spec.name not in self._fired:
                state.counters.skips["trigger"] += 1
        self._waiting.clear()


def _pad(box: Box, padding: float) -> Box:
    x1, y1, x2, y2 = box
    dx, dy = (x2 - x1) * padding / 2, (y2 - y1) * padding / 2
    return (x1 - dx, y1 - dy, x2 + dx, y2 + dy)
