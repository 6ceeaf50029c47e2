"""Cascades: what trigger tasks said about an object's crop, joined back to the object.

A trigger task runs on the crops of its parent task's detections (edge/schedule/planner.py);
each crop's result names the detection it was cut from. Here those results become
:class:`CropResult` answers attached to that detection's observation (and so to its track),
for rules with ``when.crop`` and for ``verifiers`` that settle unsure outcomes.

A policy names trigger tasks and their models' classes, which only the device config
knows, so :func:`check_device` checks a policy against a device: by ``edge policy check
--config``, ``edge config check`` and the daemon before it applies any policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from edge.config import DeviceConfig
from edge.inference.adapters import Prediction

from .policy import CropCondition, Policy, PolicyError, Verifier


@dataclass(frozen=True, slots=True)
class CropResult:
    """One trigger task's answer on one object's crop: a classifier's top class, or every
    detection a detector found in the crop, as (label, score) pairs, best first."""

    task: str
    answers: tuple[tuple[str, float], ...]

    @classmethod
    def of(cls, task: str, prediction: Prediction) -> "CropResult":
        """A crop's prediction as answers; a score that is not a number in 0..1 (a broken
        model) is no answer, so no alert can carry it."""
        if prediction.detections:
            pairs = [(d.label, d.score) for d in prediction.detections]
        else:
            pairs = [(c.label, c.score) for c in prediction.classes[:1]]
        return cls(task, tuple(sorted(((label, float(score)) for label, score in pairs if 0.0 <= score <= 1.0),
                                      key=lambda p: -p[1])))

    def best(self, classes: Iterable[str], min_score: float) -> tuple[str, float] | None:
        """The best answer that is one of ``classes`` at ``min_score`` or more."""
        wanted = set(classes)
        return next(((label, score) for label, score in self.answers if label in wanted and score >= min_score), None)


def crop_match(condition: CropCondition, crops: Mapping[str, CropResult]) -> tuple[str, float] | None:
    """The answer of the condition's task that satisfies it, if any."""
    result = crops.get(condition.task)
    return result.best(condition.classes, condition.min_score) if result is not None else None


def settle(verifier: Verifier, crops: Mapping[str, CropResult]) -> str | None:
    """The verifier's verdict on an unsure object: reject (confirmed), accept (dismissed),
    or None when it gave no answer."""
    result = crops.get(verifier.task)
    if result is None or not result.answers:
        return None
    return "reject" if result.best(verifier.confirm, verifier.min_score) is not None else "accept"


def needs_crops(policy: Policy, camera: str) -> bool:
    """Whether decisions on ``camera`` wait for its crops' results."""
    return bool(policy.verifiers) or any(r.when.crop is not None and (not r.cameras or camera in r.cameras)
                                         for r in policy.rules)


# --- a policy against a device ----------------------------------------------------------


@dataclass(frozen=True)
class TaskView:
    """What a policy may name of one camera task."""

    model: str  # the model slot
    labels: tuple[str, ...]  # the model's classes; empty: unknown, not checked
    trigger_of: str | None = None  # the parent task, for a trigger task
    outcomes: tuple[str, ...] = ()  # the trigger's ``outcomes``


DeviceView = Mapping[str, Mapping[str, TaskView]]  # camera id -> task name -> view


def device_view(cfg: DeviceConfig, labels: Callable[[str], Iterable[str]]) -> dict[str, dict[str, TaskView]]:
    """Every camera's tasks; ``labels(slot)`` gives the classes of a model slot."""
    known: dict[str, tuple[str, ...]] = {}
    view: dict[str, dict[str, TaskView]] = {}
    for cam in cfg.cameras:
        tasks = {}
        for t in cam.effective_tasks():
            if t.model not in known:
                known[t.model] = tuple(labels(t.model))
            trig = t.trigger
            tasks[t.name] = TaskView(t.model, known[t.model], trig.task if trig else None,
                                     tuple(trig.outcomes) if trig else ())
        view[cam.id] = tasks
    return view


def check_device(policy: Policy, device: DeviceView, *, source: str = "policy") -> None:
    """PolicyError naming the key when a crop rule or a verifier names a task that is not
    a trigger of the cameras it applies to, or a class that task's model does not have."""
    for i, rule in enumerate(policy.rules):
        crop = rule.when.crop
        if crop is None:
            continue
        cameras = [c for c in (rule.cameras or device) if c in device]
        for camera in cameras:
            task = _trigger(device[camera], crop.task)
            if task is None:
                raise PolicyError(f"{source}: rules[{i}].when.crop.task: {crop.task!r} is not a trigger task of "
                                  f"camera {camera!r} ({_triggers(device[camera])})")
            _classes(f"rules[{i}].when.crop.classes", crop.classes, task, crop.task, camera, source)
    for label, verifier in policy.verifiers.items():
        key = f"verifiers.{label}"
        found = [(c, t) for c in device if (t := _trigger(device[c], verifier.task)) is not None]
        if not found:
            raise PolicyError(f"{source}: {key}.task: {verifier.task!r} is not a trigger task of any camera "
                              f"({'; '.join(f'{c}: {_triggers(device[c])}' for c in device)})")
        for camera, task in found:
            _classes(f"{key}.confirm", verifier.confirm, task, verifier.task, camera, source)


def _trigger(tasks: Mapping[str, TaskView], name: str) -> TaskView | None:
    task = tasks.get(name)
    return task if task is not None and task.trigger_of is not None else None


def _triggers(tasks: Mapping[str, TaskView]) -> str:
    names = sorted(n for n, t in tasks.items() if t.trigger_of is not None)
    return f"its trigger tasks: {', '.join(names)}" if names else "it has no trigger tasks"


def _classes(key: str, classes: Iterable[str], task: TaskView, name: str, camera: str, source: str) -> None:
    if not task.labels:
        return
    for label in classes:
        if label not in task.labels:
            raise PolicyError(f"{source}: {key}: {label!r} is not a class of model {task.model!r} "
                              f"(task {name!r} on camera {camera!r})")
