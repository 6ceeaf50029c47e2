"""Drift baselines: made from known-good video, shipped in a manifest, or learned.

``edge baseline --model M --source VIDEO`` runs the model over every frame of a clip
the site trusts and writes the result as the manifest's ``baseline:`` block, so a
device compares its very first window with it (a camera that is wrong from day one is
noticed). Without one, a device learns the first healthy window of each model version
on each camera and keeps it in the ``observe.drift.baselines`` file, so a restart does
not learn again from a picture that may have drifted since.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from pathlib import Path
from typing import Callable, Iterable, Iterator

import cv2
import numpy as np
import yaml
from pydantic import ValidationError

from edge.core.errors import SourceError
from edge.core.files import replace_file
from edge.core.logs import fields
from edge.inference.adapters import Prediction
from edge.inference.manifest import Baseline
from edge.inference.model import Model

from .drift import DEFAULT_BINS, DriftWindow, ModelRef

log = logging.getLogger("edge.observe")

Outcome = Callable[[str, float], str]


def scored(prediction: Prediction) -> list[tuple[str, float]]:
    """The scored outputs drift looks at: detections, else the top class, else keypoints."""
    if prediction.detections:
        return [(d.label, d.score) for d in prediction.detections]
    if prediction.classes:
        top = max(prediction.classes, key=lambda c: c.score)
        return [(top.label, top.score)]
    return [(k.name, k.score) for k in prediction.keypoints]


def read_frames(path: Path, *, every: int = 1, limit: int | None = None) -> Iterator[np.ndarray]:
    """Every ``every``-th frame of a video file, at most ``limit`` of them; SourceError if it cannot be opened."""
    cap = cv2.VideoCapture(str(path))
    if not path.is_file() or not cap.isOpened():
        raise SourceError(f"cannot open video {str(path)!r}")
    try:
        n = taken = 0
        while limit is None or taken < limit:
            ok, image = cap.read()
            if not ok:
                return
            if n % every == 0:
                taken += 1
                yield image
            n += 1
    finally:
        cap.release()


def record_baseline(model: Model, frames: Iterable[np.ndarray], outcome: Outcome, *, source: str,
                    bins: int = DEFAULT_BINS) -> Baseline:
    """Run ``model`` on every frame and summarise its results as a baseline."""
    window = DriftWindow(bins, 0.0, 0.0)
    for image in frames:
        prediction, _ = model.predict(image)
        items = scored(prediction)
        window.add(items, sum(outcome(label, score) == "unsure" for label, score in items), 0.0)
    if not window.frames:
        raise ValueError(f"{source}: no frame could be read")
    if not window.detections:
        raise ValueError(f"{source}: the model saw nothing in {window.frames} frames; a baseline needs results")
    return window.as_baseline(source)


def baseline_yaml(baseline: Baseline) -> str:
    """The manifest's ``baseline:`` block: one line a class."""
    doc = baseline.model_dump()
    lines = ["baseline:  # written by edge baseline: results on known-good video, for drift"]
    for key in ("source", "frames", "bins", "detections", "unsure"):
        lines.append(f"  {key}: {json.dumps(doc[key])}")
    lines.append("  classes:")
    for label, c in sorted(doc["classes"].items(), key=lambda kv: -kv[1]["count"]):
        lines.append(f"    {json.dumps(label)}: {{count: {c['count']}, scores: {json.dumps(c['scores'])}}}")
    return "\n".join(lines) + "\n"


_TOP_LEVEL = re.compile(r"^[^\s#]")


def write_into_manifest(path: Path, baseline: Baseline) -> None:
    """Replace (or add) the ``baseline:`` block of the manifest at ``path``, keeping the
    rest of the file as written, comments included."""
    kept, skipping = [], False
    for line in path.read_text().splitlines():
        if line.startswith("baseline:"):
            skipping = True
            continue
        if skipping and _TOP_LEVEL.match(line):
            skipping = False
        if not skipping:
            kept.append(line)
    while kept and not kept[-1].strip():
        kept.pop()
    text = "\n".join(kept) + "\n" + baseline_yaml(baseline)
    yaml.safe_load(text)  # never leave a manifest that does not parse
    replace_file(path, text.encode())


class BaselineStore:
    """Learned baselines by camera, task and model version, in one JSON file (or memory)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()  # windows of several cameras close at once
        self._baselines: dict[str, Baseline] = {}
        if path is not None and path.exists():
            self._baselines = self._read(path)

    @staticmethod
    def key(camera: str, task: str, model: ModelRef) -> str:
        return f"{camera}/{task}/{model.name}@{model.version}"

    @staticmethod
    def _read(path: Path) -> dict[str, Baseline]:
        try:
            doc = json.loads(path.read_text())
            return {k: Baseline.model_validate(v) for k, v in doc["baselines"].items()}
        except (OSError, ValueError, KeyError, TypeError, ValidationError) as exc:
            # a broken file must not stop the cameras: learn again, and say so
            log.warning("learned baselines unreadable; learning them again",
                        extra=fields(path=str(path), error=str(exc)[:300]))
            return {}

    def get(self, camera: str, task: str, model: ModelRef) -> Baseline | None:
        with self._lock:
            return self._baselines.get(self.key(camera, task, model))

    def put(self, camera: str, task: str, model: ModelRef, baseline: Baseline) -> None:
        with self._lock:
            self._baselines[self.key(camera, task, model)] = baseline
            doc = {"v": 1, "baselines": {k: b.model_dump() for k, b in self._baselines.items()}}
        log.info("drift baseline learned", extra=fields(camera=camera, task=task, model=model.name,
                                                         version=model.version, frames=baseline.frames,
                                                         detections=baseline.detections))
        if self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                replace_file(self.path, json.dumps(doc).encode())
            except OSError as exc:
                log.error("cannot keep the learned baseline; it lasts until a restart",
                          extra=fields(path=str(self.path), error=str(exc)))
