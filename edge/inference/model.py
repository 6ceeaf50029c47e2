"""A model ready to serve: interpreter, manifest, preprocessing and decoder in one object.

One :class:`Model` owns one interpreter, which is not thread-safe: give each thread
that runs inference its own instance.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.core.errors import ModelError
from edge.core.logs import fields

from .adapters import Prediction, make_decoder
from .manifest import Manifest, check_manifest, guess_manifest, load_manifest, manifest_path_for, read_labels
from .preprocess import Preprocessor
from .runtime import LoadedModel, load_interpreter

log = logging.getLogger("edge.model")


@dataclass(frozen=True, slots=True)
class StageTimes:
    """Milliseconds spent in each stage of one prediction."""

    preprocess_ms: float
    invoke_ms: float
    postprocess_ms: float


class Model:
    """Load once, then ``predict(frame)`` any number of times from one thread."""

    def __init__(self, loaded: LoadedModel, manifest: Manifest) -> None:
        check_manifest(manifest, loaded)
        self.loaded = loaded
        self.manifest = manifest
        self._interpreter = loaded.interpreter
        tensor = loaded.inputs[0]
        self._input_index = tensor.index
        self._output_indices = [t.index for t in loaded.outputs]
        self.preprocess = Preprocessor(manifest.input, tensor)
        size = (self.preprocess.width, self.preprocess.height)
        self._decode = make_decoder(manifest, loaded.outputs, size)

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        manifest: str | Path | None = None,
        labels: str | Path | None = None,
        num_threads: int | None = None,
        delegate: str | None = None,
        delegate_options: dict[str, str] | None = None,
    ) -> "Model":
        """Load ``path`` with its manifest (default: beside it, else guessed from the tensors)."""
        path = Path(path)
        loaded = load_interpreter(
            path, num_threads=num_threads, delegate=delegate, delegate_options=delegate_options
        )
        manifest_file = Path(manifest) if manifest else manifest_path_for(path)
        if manifest_file.is_file():
            spec = load_manifest(manifest_file, model_dir=path.parent)
            if labels:
                spec = spec.model_copy(update={"labels": read_labels(Path(labels))})
        elif manifest:
            raise ModelError(f"manifest not found: {manifest_file}")
        else:
            spec = guess_manifest(loaded, read_labels(Path(labels)) if labels else None)
            log.warning(
                "no manifest beside the model: task and preprocessing guessed from its tensors",
                extra=fields(model=str(path), task=spec.task, manifest=str(manifest_file)),
            )
        return cls(loaded, spec)

    @property
    def name(self) -> str:
        return f"{self.manifest.name}@{self.manifest.version}"

    def predict(self, frame: np.ndarray) -> tuple[Prediction, StageTimes]:
        """Run the model on one BGR frame."""
        t0 = time.perf_counter()
        tensor, transform = self.preprocess(frame)
        self._interpreter.set_tensor(self._input_index, tensor)
        t1 = time.perf_counter()
        self._interpreter.invoke()
        t2 = time.perf_counter()
        raw = [self._interpreter.get_tensor(i) for i in self._output_indices]
        prediction = self._decode(raw, transform)
        t3 = time.perf_counter()
        return prediction, StageTimes((t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3)

    def invoke_only(self) -> None:
        """Invoke on whatever is in the input tensor: the bare baseline for benchmarks."""
        self._interpreter.invoke()
