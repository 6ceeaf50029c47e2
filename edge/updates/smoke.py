"""The smoke test a new model passes before it may serve: load, check, invoke, time.

It runs in an interpreter of its own, off the frame path, on a recent real frame of
a camera the slot serves. A failure carries a short reason the fleet sees:
load_error (the runtime cannot prepare it), manifest_mismatch (tensors differ from
what the manifest says), invoke_error, bad_output, too_slow.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.core.errors import ModelError
from edge.inference.manifest import Manifest
from edge.inference.model import Model
from edge.inference.runtime import LoadedModel, load_interpreter


class SmokeError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class RuntimeOptions:
    """How the daemon loads its interpreters; a swapped-in model is loaded the same way."""

    num_threads: int | None = None
    delegate: str | None = None
    delegate_options: dict[str, str] | None = None


@dataclass(frozen=True)
class SmokeResult:
    latency_ms: float  # median of the timed runs, whole predict
    limit_ms: float
    invokes: int


def load_model(path: Path, manifest: Manifest, rt: RuntimeOptions) -> Model:
    """A Model from a stored file and the manifest its artifact carried; ModelError if not."""
    return Model(_interpreter(path, rt), manifest)


def _interpreter(path: Path, rt: RuntimeOptions) -> LoadedModel:
    return load_interpreter(path, num_threads=rt.num_threads, delegate=rt.delegate,
                            delegate_options=rt.delegate_options)


def smoke_test(path: Path, manifest: Manifest, frame: np.ndarray, *, budget_ms: float, factor: float,
               invokes: int, rt: RuntimeOptions) -> SmokeResult:
    """Raise SmokeError unless the model loads, fits its manifest and runs on ``frame`` in time."""
    try:
        loaded = _interpreter(path, rt)
    except ModelError as exc:
        raise SmokeError("load_error", str(exc)) from None
    try:
        model = Model(loaded, manifest)  # checks the manifest against the tensors
    except (ModelError, ValueError) as exc:
        raise SmokeError("manifest_mismatch", str(exc)) from None
    times = []
    for i in range(invokes + 1):  # the first run pays one-off costs: not timed
        t0 = time.perf_counter()
        try:
            prediction, _ = model.predict(frame)
        except Exception as exc:  # whatever the runtime raises, the model is not fit to serve
            raise SmokeError("invoke_error", f"{type(exc).__name__}: {exc}") from None
        if i:
            times.append((time.perf_counter() - t0) * 1e3)
        scores = [d.score for d in prediction.detections] + [c.score for c in prediction.classes]
        if any(not math.isfinite(s) for s in scores):
            raise SmokeError("bad_output", "non-finite scores")
    latency = statistics.median(times) if times else 0.0
    limit = budget_ms * factor
    if latency > limit:
        raise SmokeError("too_slow", f"{latency:.1f} ms a frame against a limit of {limit:.1f} ms "
                                     f"({budget_ms:.1f} ms budget x {factor:g})")
    return SmokeResult(round(latency, 3), round(limit, 3), invokes)
