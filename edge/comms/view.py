"""The device as the line sees it: one typed snapshot both exports are made from.

Built on the comms thread from what the other stages already keep (the cameras'
counters, the decide engine's rule states and controls, the observe snapshot), so
nothing on the frame path does any work for it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

from edge.core.contract import Alert
from edge.decide.engine import DecisionEngine, RuleStatus
from edge.observe.drift import DriftReport
from edge.observe.observer import ObserveSnapshot
from edge.observe.quality import QualityReading
from edge.schedule.scheduler import CameraRunner

FPS_WINDOW_S = 2.0  # processed fps is measured over at least this long


@dataclass(frozen=True)
class CameraView:
    camera: str
    state: str  # the capture state
    fps: float | None  # processed frames a second; None until measured
    ok: bool  # neither blind nor tampered
    rules: tuple[RuleStatus, ...]
    last_alert: Alert | None
    models: Mapping[str, str | None]  # task -> the version of the model serving it
    quality: QualityReading | None = None
    drift: Mapping[str, DriftReport] = field(default_factory=dict)


@dataclass(frozen=True)
class LineView:
    at: float
    policy_version: str | None
    cameras: Mapping[str, CameraView]


class ViewBuilder:
    """Makes a :class:`LineView` on demand; owned by the comms thread (its fps meters
    are its own)."""

    def __init__(self, cameras: Iterable[CameraRunner], engine: DecisionEngine,
                 observe: Callable[[], ObserveSnapshot],
                 model_version: Callable[[str, str], str | None]) -> None:
        self._cameras = list(cameras)
        self._engine = engine
        self._observe = observe
        self._model_version = model_version
        self._fps: dict[str, float | None] = {c.cfg.id: None for c in self._cameras}
        self._marks: dict[str, tuple[float, int]] = {}

    def build(self, now: float | None = None) -> LineView:
        now = time.time() if now is None else now
        mono = time.monotonic()
        observed = self._observe().cameras
        policy = self._engine.policy
        cameras = {}
        for runner in self._cameras:
            cid = runner.cfg.id
            obs = observed.get(cid)
            cameras[cid] = CameraView(
                camera=cid, state=runner.capture.stats().state.value, fps=self._rate(cid, mono, runner.processed),
                ok=self._engine.camera_ok(cid), rules=tuple(self._engine.status(cid)),
                last_alert=self._engine.last_alert(cid),
                models={task: self._model_version(cid, task) for task in runner.tasks},
                quality=obs.quality if obs is not None else None,
                drift=dict(obs.drift) if obs is not None else {})
        return LineView(now, policy.version if policy is not None else None, cameras)

    def _rate(self, camera: str, now: float, processed: int) -> float | None:
        mark = self._marks.get(camera)
        if mark is None:
            self._marks[camera] = (now, processed)
        elif now - mark[0] >= FPS_WINDOW_S:
            self._fps[camera] = round((processed - mark[1]) / (now - mark[0]), 2)
            self._marks[camera] = (now, processed)
        return self._fps[camera]
