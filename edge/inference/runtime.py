"""Loading a TFLite model into an interpreter: LiteRT first, tflite-runtime as a fallback.

Both runtimes expose the same ``Interpreter`` API, so everything above this module
uses one code path. Errors from the runtime are translated into one-line
:class:`ModelError` messages an operator can act on.

No file reaches the interpreter in this process unchecked (:func:`check_model_file`):
its identifier and layout must be a TFLite flatbuffer's, and its first load runs in a
short-lived child process (``edge.inference.trial``), because some runtimes crash on a
bad file instead of refusing it (ai-edge-litert 1.4.0 dies with a segmentation fault
on a truncated model). A crash then takes only the child.
"""

from __future__ import annotations

import functools
import mmap
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge.core.errors import ModelError
from edge.core.memory import release_file_pages

TFLITE_IDENTIFIER = b"TFL3"  # the flatbuffer file identifier, bytes 4..8 of every .tflite
TRIAL_TIMEOUT_S = 120.0  # a first load that takes longer than this is refused


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
    check_model_file(path, allocate=delegate is None)
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
        raise ModelError(f"{path}: {describe_load_error(exc)}") from None
    # the runtime has copied the weights into its own layout: the file's pages are not read again
    release_file_pages(path)
    return LoadedModel(
        path=path,
        interpreter=interpreter,
        inputs=tuple(TensorInfo.from_details(d) for d in interpreter.get_input_details()),
        outputs=tuple(TensorInfo.from_details(d) for d in interpreter.get_output_details()),
        runtime=runtime.name,
        num_threads=num_threads,
        delegate=delegate,
    )


def check_model_file(path: Path, *, allocate: bool = True) -> None:
    """Raise ModelError unless ``path`` is a TFLite file that a child process could load.

    Checked here: the size, the ``TFL3`` identifier, and that the root table, the
    subgraphs and the buffers lie inside the file. Then the file is loaded once in a
    child (and, with ``allocate``, its tensors allocated on the CPU; a delegate's model is
    only built there: the delegate's device may be in use by this process). A file that
    passed is not tried again while its size, times and inode stay the same.
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ModelError(f"model file not found: {path}") from None
    except OSError as exc:
        raise ModelError(f"{path}: cannot read the model: {exc.strerror or exc}") from None
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    _check_layout(path, st.st_size)
    _trial(str(path), (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns), allocate)


def _check_layout(path: Path, size: int) -> None:
    if size < 8:
        raise ModelError(f"{path}: not a valid TFLite model ({'an empty file' if size == 0 else f'{size} bytes'})")
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data[4:8] != TFLITE_IDENTIFIER:
                raise ModelError(f"{path}: not a valid TFLite model (file identifier {data[4:8]!r}, "
                                 f"expected {TFLITE_IDENTIFIER!r})")
            _ModelLayout(data).check()
    except _Corrupt as exc:
        raise ModelError(f"{path}: not a valid TFLite model (truncated or corrupt: {exc})") from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot read the model: {getattr(exc, 'strerror', None) or exc}") from None


class _Corrupt(Exception):
    """A model file whose flatbuffer points outside itself."""


class _ModelLayout:
    """Just enough of a flatbuffer reader to check that what a runtime reads first (the
    root table, the subgraphs, the buffers and their data) lies inside the file. The
    runtimes that verify a model do much more; those that do not read past the end of
    a truncated file, which is where they crash. The trial load catches the rest."""

    SUBGRAPHS, BUFFERS = 2, 4  # fields of the schema's Model table
    DATA, OFFSET, SIZE = 0, 1, 2  # fields of its Buffer table

    def __init__(self, data: mmap.mmap) -> None:
        self.data = data
        self.size = len(data)

    def check(self) -> None:
        model = self._table(self._uint(0, 4, "the root offset"), "the model table")
        if not model.get(self.SUBGRAPHS):
            raise _Corrupt("the model has no subgraphs")
        self._tables(model[self.SUBGRAPHS], "the subgraphs")
        buffers = self._tables(model[self.BUFFERS], "the buffers") if model.get(self.BUFFERS) else []
        for i, buffer in enumerate(buffers):
            if buffer.get(self.DATA):
                self._vector(buffer[self.DATA], 1, f"buffer {i}'s data")
            if buffer.get(self.OFFSET) and buffer.get(self.SIZE):  # data kept apart (models over 2 GB)
                offset = self._uint(buffer[self.OFFSET], 8, f"buffer {i}")
                length = self._uint(buffer[self.SIZE], 8, f"buffer {i}")
                if offset > 1 and offset + length > self.size:
                    raise self._past_end(f"buffer {i}'s {length} bytes from byte {offset}")

    def _past_end(self, what: str) -> _Corrupt:
        return _Corrupt(f"{what} is past the end of the file ({self.size} bytes)")

    def _uint(self, at: int, width: int, what: str) -> int:
        if at < 0 or at + width > self.size:
            raise self._past_end(f"{what} at byte {at}")
        return int.from_bytes(self.data[at:at + width], "little")

    def _table(self, at: int, what: str) -> dict[int, int]:
        """The absolute position of each field present in the table at ``at``."""
        soffset = self._uint(at, 4, what)
        vtable = at - (soffset - (1 << 32) if soffset >= 1 << 31 else soffset)
        vt_bytes = self._uint(vtable, 2, f"{what}'s vtable")
        if at + self._uint(vtable + 2, 2, f"{what}'s vtable") > self.size:
            raise self._past_end(f"{what} at byte {at}")
        fields = {}
        for i in range((vt_bytes - 4) // 2):
            offset = self._uint(vtable + 4 + 2 * i, 2, f"{what}'s vtable")
            if offset:
                fields[i] = at + offset
        return fields

    def _vector(self, at: int, item_bytes: int, what: str) -> tuple[int, int]:
        """(first element, length) of the vector whose offset is at ``at``."""
        start = at + self._uint(at, 4, what)
        length = self._uint(start, 4, what)
        if start + 4 + length * item_bytes > self.size:
            raise self._past_end(f"{what} ({length} x {item_bytes} bytes from byte {start + 4})")
        return start + 4, length

    def _tables(self, at: int, what: str) -> list[dict[int, int]]:
        first, length = self._vector(at, 4, what)
        return [self._table(first + 4 * i + self._uint(first + 4 * i, 4, what), f"{what}[{i}]")
                for i in range(length)]


@functools.lru_cache(maxsize=64)  # by file identity: a replaced or rewritten file is tried again
def _trial(path: str, identity: tuple[int, ...], allocate: bool) -> None:
    env = dict(os.environ)  # the child must import this very package, installed or not
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "edge.inference.trial", path] + (["--allocate"] if allocate else [])
    try:
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env,
                              timeout=TRIAL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ModelError(f"{path}: a first load took over {TRIAL_TIMEOUT_S:g} s; refused") from None
    except OSError as exc:
        raise ModelError(f"{path}: cannot start the trial load: {exc.strerror or exc}") from None
    if done.returncode == 0:
        return
    if done.returncode < 0:
        signum = -done.returncode
        name = signal.Signals(signum).name if signum in signal.valid_signals() else str(signum)
        raise ModelError(f"{path}: not a valid TFLite model (the runtime crashed loading it: {name}; "
                         "truncated or corrupt?)")
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    raise ModelError(f"{path}: {lines[-1] if lines else f'the trial load failed (exit {done.returncode})'}")


def describe_load_error(exc: Exception) -> str:
    """The runtime's complaint about a model as a short phrase an operator can act on."""
    text = str(exc)
    if isinstance(exc, UnicodeDecodeError):  # 1.x decodes strings in a corrupt file before checking it
        return "not a valid TFLite model (corrupt: text that is not UTF-8)"
    op = re.search(r"unresolved custom op: ([^\s.]+(?:\.[^\s.]+)*)\.?", text)
    if op:
        return f"cannot be prepared: unresolved custom op {op.group(1)!r} (not in this runtime)"
    if "not a valid Flatbuffer" in text or "null/empty" in text or "identifier" in text:
        return "not a valid TFLite model (truncated or not a .tflite file)"
    return f"cannot be loaded: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
