"""The observe stage on the frame path: a scheduler sink and a capture hook.

:class:`Observer` is called on the executor threads with each result (age and stage
histograms, drift windows), and on each camera's capture thread with each frame
(quality, at most every ``quality.interval_s``): the picture is watched even when the
executors are too busy to take every frame. Everything about a camera is touched by
one executor at a time (the scheduler guarantees it) and by its one capture thread,
so nothing here takes a lock on the frame path; what others read
(:meth:`Observer.snapshot`) is made of objects replaced whole.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

from edge.config import ObserveConfig
from edge.core.logs import fields
from edge.schedule.scheduler import Result
from edge.sync.events import Event, drift

from .baseline import BaselineStore, Outcome, scored
from .drift import DriftReport, DriftTracker, ModelRef
from .histogram import AGE_BUCKETS, STAGE_BUCKETS, Histogram
from .quality import QualityMeter, QualityReading

log = logging.getLogger("edge.observe")

STAGES = ("preprocess", "invoke", "postprocess")


@dataclass(frozen=True)
class CameraObservation:
    """What the device knows of one camera's picture and results now."""

    camera: str
    quality: QualityReading | None = None
    drift: dict[str, DriftReport] = field(default_factory=dict)  # task -> its last closed window

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {}
        if self.quality is not None:
            doc["quality"] = self.quality.values()
        if self.drift:
            doc["drift"] = {task: r.to_dict() for task, r in self.drift.items()}
        return doc


@dataclass(frozen=True)
class ObserveSnapshot:
    """Every camera's observation: the one typed view of drift and quality for readers
    (the stats line, the metrics, the decide engine, other exporters)."""

    cameras: dict[str, CameraObservation]

    def to_dict(self) -> dict[str, Any]:
        return {c: o.to_dict() for c, o in self.cameras.items()}


class TaskSeries:
    """A camera task's histograms: capture-to-result age and the time in each stage."""

    def __init__(self) -> None:
        self.age = Histogram(AGE_BUCKETS)
        self.stages = {stage: Histogram(STAGE_BUCKETS) for stage in STAGES}


class Observer:
    """Sink and capture hook for every camera of the config (``tasks``: camera -> task names)."""

    def __init__(self, cfg: ObserveConfig, tasks: dict[str, Iterable[str]], *,
                 model_of: Callable[[str, str], ModelRef | None], outcome: Outcome,
                 healthy: Callable[[str, str], bool] = lambda camera, task: True,
                 record: Callable[[Event], Any] | None = None) -> None:
        self.cfg = cfg
        self._model_of = model_of
        self._outcome = outcome
        self._record = record
        self.baselines = BaselineStore(cfg.drift.baselines)
        d = cfg.drift
        self.series = {(camera, task): TaskSeries() for camera, names in tasks.items() for task in names}
        self.drift = {key: DriftTracker(key[0], key[1], d.window_s, d.min_frames, learned=self.baselines.get,
                                        learn=self.baselines.put, healthy=healthy)
                      for key in self.series} if d.enabled else {}
        q = cfg.quality
        self.quality = {camera: QualityMeter(q.width, q.interval_s) for camera in tasks} if q.enabled else {}
        self.cameras = list(tasks)
        self._reports: dict[tuple[str, str], DriftReport] = {}  # the last closed window of each task

    # --- the frame path (capture and executor threads) ------------------------------------------

    def picture(self, camera: str) -> Callable[[np.ndarray, float, float], Any] | None:
        """The capture hook of ``camera``: ``(image, captured_at, captured_mono)``, or None."""
        meter = self.quality.get(camera)
        return meter.offer if meter is not None else None

    def __call__(self, result: Result) -> None:
        key = (result.frame.camera, result.task)
        series = self.series.get(key)
        if series is None:
            return
        t = result.times
        series.age.observe(result.age_ms / 1e3)
        stages = series.stages
        stages["preprocess"].observe(t.preprocess_ms / 1e3)
        stages["invoke"].observe(t.invoke_ms / 1e3)
        stages["postprocess"].observe(t.postprocess_ms / 1e3)
        tracker = self.drift.get(key)
        if tracker is None or result.crop is not None:  # a crop is part of its parent's frame
            return
        model = self._model_of(*key)
        if model is None:
            return
        items = scored(result.prediction)
        outcome = self._outcome
        unsure = sum(outcome(label, score) == "unsure" for label, score in items)
        report = tracker.add(model, items, unsure, result.frame.captured_at, result.frame.captured_mono)
        if report is not None:
            self._publish(report)

    # --- the daemon's thread ---------------------------------------------------------------------

    def close(self, camera: str) -> None:
        """End the camera's windows early: its source ended (call once it is idle) or the daemon stops."""
        for (cam, _), tracker in self.drift.items():
            if cam == camera:
                report = tracker.close()
                if report is not None:
                    self._publish(report)

    def snapshot(self) -> ObserveSnapshot:
        reports = dict(self._reports)
        cameras = {}
        for camera in self.cameras:
            meter = self.quality.get(camera)
            cameras[camera] = CameraObservation(
                camera, meter.latest if meter is not None else None,
                {task: r for (c, task), r in reports.items() if c == camera})
        return ObserveSnapshot(cameras)

    def _publish(self, report: DriftReport) -> None:
        self._reports[(report.camera, report.task)] = report
        doc = report.to_dict()
        log.info("drift", extra=fields(camera=report.camera, **{k: v for k, v in doc.items() if k != "counts"}))
        if self._record is not None:
            self._record(drift(report.camera, report.since, doc))
