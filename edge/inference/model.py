"""A model ready to serve: interpreter, manifest, preprocessing and decoder in one object.

One :class:`Model` owns one interpreter, which is not thread-safe: give each thread
that runs inference its own instance.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from edge.core.errors import ModelError
from edge.core.logs import fields

from .adapters import Prediction, make_decoder
from .manifest import Manifest, check_manifest, guess_manifest, load_manifest, manifest_path_for, read_labels
from .preprocess import Preprocessor, Transform
from .runtime import LoadedModel, load_interpreter

log = logging.getLogger("edge.model")


@dataclass(frozen=True, slots=True)
class StageTimes:
    """Milliseconds spent in each stage of one prediction."""

    preprocess_ms: float
    invoke_ms: float
    postprocess_ms: float


@dataclass(frozen=True, slots=True)
class Prepared:
    """A frame already turned into a model input (off the inference thread), and by whom."""

    tensor: np.ndarray
    transform: Transform
    key: tuple  # the Preprocessor.key it was made with


@dataclass(frozen=True, slots=True)
class Invoked:
    """One invoke's outputs, copied out of the interpreter, not yet decoded."""

    raw: list[np.ndarray]
    transform: Transform
    preprocess_ms: float
    invoke_ms: float
    copy_ms: float  # taking the outputs out of the interpreter
    was_prepared: bool  # the input came ready-made (Prepared), not preprocessed here
    decode: Callable[[Sequence[np.ndarray], Transform], Prediction]


class Preparer:
    """A model's preprocessing for another thread (a camera's capture thread)."""

    def __init__(self, pre: Preprocessor) -> None:
        self._pre = pre

    def __call__(self, frame: np.ndarray, lores: np.ndarray | None = None) -> Prepared:
        """The input for ``frame``; made from ``lores``, the same view at a lower resolution
        (a camera's second stream), when given, with boxes still mapped to ``frame``."""
        if lores is None:
            tensor, transform = self._pre(frame)
        else:
            tensor, transform = self._pre(lores)
            transform = transform.for_frame(frame.shape[1], frame.shape[0])
        return Prepared(tensor, transform, self._pre.key)

    def scaled_size(self, frame_w: int, frame_h: int) -> tuple[int, int]:
        """The size a camera should scale its ``frame_w`` x ``frame_h`` frames to for this model."""
        return self._pre.scaled_size(frame_w, frame_h)


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

    def predict(self, frame: np.ndarray, prepared: Prepared | None = None) -> tuple[Prediction, StageTimes]:
        """Run the model on one BGR frame (``prepared``: its input, made in advance)."""
        return self.finish(self.invoke(frame, prepared))

    def invoke(self, frame: np.ndarray, prepared: Prepared | None = None) -> Invoked:
        """Preprocess (unless ``prepared`` fits this model) and invoke; the outputs are copies,
        so :meth:`finish` may decode them on another thread while the next invoke runs."""
        t0 = time.perf_counter()
        was_prepared = prepared is not None and prepared.key == self.preprocess.key
        if was_prepared:
            self._interpreter.set_tensor(self._input_index, prepared.tensor)
            transform = prepared.transform
        else:
            # straight into the interpreter's input buffer; the view must be gone before invoke
            view = self._interpreter.tensor(self._input_index)()
            transform = self.preprocess(frame, out=view)[1]
            del view
        t1 = time.perf_counter()
        self._interpreter.invoke()
        t2 = time.perf_counter()
        raw = [self._interpreter.get_tensor(i) for i in self._output_indices]  # copies
        t3 = time.perf_counter()
        return Invoked(raw, transform, (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3,
                       was_prepared, self._decode)

    @staticmethod
    def finish(invoked: Invoked) -> tuple[Prediction, StageTimes]:
        """Decode an invoke's outputs (any thread)."""
        t0 = time.perf_counter()
        prediction = invoked.decode(invoked.raw, invoked.transform)
        ms = (time.perf_counter() - t0) * 1e3 + invoked.copy_ms
        return prediction, StageTimes(invoked.preprocess_ms, invoked.invoke_ms, ms)

    def preparer(self) -> "Preparer":
        """Makes this model's input from a frame on another thread."""
        return Preparer(Preprocessor(self.manifest.input, self.loaded.inputs[0]))

    def invoke_only(self) -> None:
        """Invoke on whatever is in the input tensor: the bare baseline for benchmarks."""
        self._interpreter.invoke()
