"""Loading a TFLite model into an interpreter: LiteRT first, tflite-runtime as a fallback.

Both runtimes expose the same ``Interpreter`` API, so everything above this module
uses one code path. Errors from the runtime are translated into one-line
:class:`ModelError` messages an operator can act on.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge.core.errors import ModelError


@dataclass(frozen=True)
class TensorInfo:
    """What a model declares about one input or output tensor."""

    name: str
    index: int
    shape: tuple[int, ...]
    dtype: np.dtype
    scale: float  # 0.0 when not quantized
    zero_point: int

    @property
    def quantized(self) -> bool:
        return self.scale != 0.0

    @classmethod
    def from_details(cls, d: dict[str, Any]) -> "TensorInfo":
        scale, zero_point = d["quantization"]
        return cls(
            name=d["name"],
            index=int(d["index"]),
            shape=tuple(int(x) for x in d["shape"]),
            dtype=np.dtype(d["dtype"]),
            scale=float(scale),
            zero_point=int(zero_point),
        )


@dataclass(frozen=True)
class Runtime:
    """The interpreter implementation that imported, and where it came from."""

    name: str
    interpreter_cls: Any
    load_delegate: Any


def import_runtime() -> Runtime:
    """Import LiteRT, or tflite-runtime, or fail naming both."""
    try:
        from ai_edge_litert.interpreter import Interpreter, load_delegate

        return Runtime("ai-edge-litert", Interpreter, load_delegate)
    except ImportError as litert_error:
        try:
            from tflite_runtime.interpreter import Interpreter, load_delegate  # type: ignore

            return Runtime("tflite-runtime", Interpreter, load_delegate)
        except ImportError as tflite_error:
            raise ModelError(
                "no TFLite runtime: install `ai-edge-litert` (pip install edgecam) or the "
                f"legacy `tflite-runtime` (pip install 'edgecam[tflite]'); "
                f"ai_edge_litert: {litert_error}; tflite_runtime: {tflite_error}"
            ) from None


@dataclass
class LoadedModel:
    """An allocated interpreter with its tensor descriptions."""

    path: Path
    interpreter: Any
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    runtime: str
    num_threads: int
    delegate: str | None


def load_interpreter(
    path: str | Path,
    *,
    num_threads: int | None = None,
    delegate: str | None = None,
    delegate_options: dict[str, str] | None = None,
) -> LoadedModel:
    """Create and allocate an interpreter for ``path``.

    ``num_threads`` defaults to the core count: LiteRT's Python interpreter would
    otherwise use a single thread.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    runtime = import_runtime()
    num_threads = num_threads or os.cpu_count() or 1
    delegates = []
    if delegate:
        try:
            delegates.append(runtime.load_delegate(delegate, delegate_options or {}))
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelError(f"cannot load delegate {delegate!r}: {_first_line(exc)}") from None
    try:
        interpreter = runtime.interpreter_cls(
            model_path=str(path),
            num_threads=num_threads,
            experimental_delegates=delegates or None,
        )
        interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise ModelError(f"{path}: {_explain(exc)}") from None
    return LoadedModel(
        path=path,
        interpreter=interpreter,
        inputs=tuple(TensorInfo.from_details(d) for d in interpreter.get_input_details()),
        outputs=tuple(TensorInfo.from_details(d) for d in interpreter.get_output_details()),
        runtime=runtime.name,
        num_threads=num_threads,
        delegate=delegate,
    )


def _explain(exc: Exception) -> str:
    text = str(exc)
    op = re.search(r"unresolved custom op: ([^\s.]+(?:\.[^\s.]+)*)\.?", text)
    if op:
        return f"cannot be prepared: unresolved custom op {op.group(1)!r} (not in this runtime)"
    if "not a valid Flatbuffer" in text or "null/empty" in text or "identifier" in text:
        return "not a valid TFLite model (truncated or not a .tflite file)"
    return f"cannot be loaded: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
