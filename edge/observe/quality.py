"""Image quality and tamper measures on a small grey copy of a camera's frames.

Four numbers per measured frame, all cheap at 160 pixels wide (the copy is made by
sampling down to twice that width, then area averaging): mean brightness and
contrast (mean and standard deviation of the grey levels), sharpness (variance of the
Laplacian: a defocused, sprayed or fogged lens loses its edges) and the flat share (the
share of pixels in the most common of 32 grey levels: a lens covered by a hand, tape or
a wall fills the frame with one level). The decide engine judges them against the
policy's bounds (edge/decide/policy.py, ``image_quality``).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import cv2
import numpy as np

from edge.capture.motion import small_grey
from edge.core.logs import fields

log = logging.getLogger("edge.observe")

FLAT_LEVELS = 32  # grey levels the flat share is counted in (8 grey values each)


@dataclass(frozen=True, slots=True)
class QualityReading:
    """One camera's picture, measured on one frame."""

    at: float  # time.time() of the frame's capture
    brightness: float  # 0..255
    contrast: float
    sharpness: float
    flat: float  # 0..1

    def values(self) -> dict[str, float]:
        """The measures by name, rounded for events and alerts."""
        return {k: round(v, 3) for k, v in asdict(self).items() if k != "at"}


def measure(grey: np.ndarray, at: float) -> QualityReading:
    """The measures of one small grey image."""
    mean, std = cv2.meanStdDev(grey)
    _, lap_std = cv2.meanStdDev(cv2.Laplacian(grey, cv2.CV_16S))
    levels = np.bincount((grey >> 3).ravel(), minlength=FLAT_LEVELS)
    return QualityReading(at, float(mean[0, 0]), float(std[0, 0]), float(lap_std[0, 0]) ** 2,
                          float(levels.max()) / grey.size)


def measure_frame(image: np.ndarray, width: int, at: float) -> QualityReading:
    """The measures of a BGR frame, on its grey copy ``width`` pixels wide."""
    return measure(small_grey(image, width, presample=True), at)


class QualityMeter:
    """Measures a camera's frames at most every ``interval_s``; owned by one executor at a time."""

    def __init__(self, width: int, interval_s: float) -> None:
        self.width = width
        self.interval_s = interval_s
        self.latest: QualityReading | None = None  # replaced whole: readers need no lock
        self.measured = 0
        self.errors = 0
        self._due = float("-inf")  # time.monotonic() of the next measure

    def offer(self, image: np.ndarray, captured_at: float, captured_mono: float) -> QualityReading | None:
        """Measure ``image`` if one is due; the new reading, or None."""
        if captured_mono < self._due:
            return None
        self._due = captured_mono + self.interval_s
        try:
            reading = measure_frame(image, self.width, captured_at)
        except Exception:  # it runs on the capture thread: a bad frame must never stop the camera
            self.errors += 1
            if self.errors == 1:
                log.exception("quality measure failed", extra=fields(shape=list(getattr(image, "shape", ()))))
            return None
        self.latest = reading
        self.measured += 1
        return reading
