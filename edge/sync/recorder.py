"""Turns scheduler results into outbox events: metadata only, never pixels."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

from edge.schedule.scheduler import Result, Sink

from .events import detection_summary, health_snapshot
from .outbox import Outbox


class Recorder:
    """A result sink that appends a detection summary for each frame with detections."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox

    def __call__(self, result: Result) -> None:
        if result.crop is not None or not result.prediction.detections:
            return  # crops feed their parent's frame; empty frames are in the health counts
        doc = result.prediction.to_dict()
        self.outbox.append(detection_summary(
            result.frame.camera, result.frame.captured_at, result.model, doc["detections"], frame=result.frame.seq))

    def health(self, cameras: Iterable[Mapping[str, Any]]) -> None:
        """One health snapshot per camera, from the scheduler's stats."""
        for camera in cameras:
            self.outbox.append(health_snapshot(camera["camera"], camera))


def fan_out(sinks: Iterable[Sink | None]) -> Sink | None:
    """One sink that calls each of ``sinks`` (None entries skipped); one that raises does not
    keep the result from the others, and the first error is raised once all have run."""
    chosen = [s for s in sinks if s is not None]
    if not chosen:
        return None
    if len(chosen) == 1:
        return chosen[0]

    def call_all(result: Result, _sinks: list[Callable[[Result], None]] = chosen) -> None:
        failed: Exception | None = None
        for sink in _sinks:
            try:
                sink(result)
            except Exception as exc:  # the others still get the result; the caller hears of the first
                failed = failed or exc
        if failed is not None:
            raise failed

    return call_all
