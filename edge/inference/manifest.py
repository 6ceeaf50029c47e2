"""The model manifest: what a ``.tflite`` file is and how to feed it.

A manifest lives beside its model (``model.tflite`` → ``model.yaml``) and names the
task, labels, input preprocessing and default thresholds. It is checked against the
model's real tensors at load, so a manifest written for another model is refused
with a message saying what differs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edge.config import format_validation_error
from edge.core.errors import ModelError

from .runtime import LoadedModel, TensorInfo

Task = Literal["classify", "yolov8", "ssd", "pose", "segment"]


class _Strict(BaseModel):
    # no NaN or Infinity: a manifest travels to devices inside the contract's bodies
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class InputSpec(_Strict):
    """How a BGR frame becomes the input tensor: value = (pixel - mean) / std."""

    resize: Literal["stretch", "letterbox"] = "stretch"
    colour: Literal["rgb", "bgr"] = "rgb"
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    pad_value: int = Field(default=114, ge=0, le=255)

    @field_validator("mean", "std", mode="before")
    @classmethod
    def _broadcast(cls, value: object) -> object:
        return (value,) * 3 if isinstance(value, (int, float)) else value

    @field_validator("std")
    @classmethod
    def _nonzero(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(v == 0 for v in value):
            raise ValueError("std must not be 0")
        return value


class Thresholds(_Strict):
    score: float = Field(default=0.25, ge=0, le=1)
    iou: float = Field(default=0.45, ge=0, le=1)
    top_k: int = Field(default=5, gt=0)
    max_detections: int = Field(default=100, gt=0)


class ClassBaseline(_Strict):
    """One class's share of a baseline: how often it was seen and its score histogram."""

    count: int = Field(ge=0)
    scores: list[int] = Field(min_length=2, description="counts per equal-width score bin over [0, 1]")


class Baseline(_Strict):
    """What the model's results looked like on known-good video (``edge baseline``).

    Drift windows on the device are compared with it from the first window on. Written
    by ``edge baseline --model M --source VIDEO --write``; see edge/observe/drift.py.
    """

    source: str = Field(default="", description="the video it was made from")
    frames: int = Field(gt=0)
    bins: int = Field(ge=2, le=100, description="equal-width score bins over [0, 1]")
    detections: int = Field(ge=0, description="scored outputs: detections, or top classes")
    unsure: int = Field(default=0, ge=0, description="of those, unsure under the band it was made with")
    classes: dict[str, ClassBaseline] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> "Baseline":
        for label, c in self.classes.items():
            if len(c.scores) != self.bins:
                raise ValueError(f"classes.{label}.scores: {len(c.scores)} bins, expected bins = {self.bins}")
            if sum(c.scores) != c.count:
                raise ValueError(f"classes.{label}.scores: sum {sum(c.scores)} differs from count {c.count}")
        if sum(c.count for c in self.classes.values()) != self.detections:
            raise ValueError("detections: differs from the sum of the classes' counts")
        return self


class Manifest(_Strict):
    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    task: Task
    labels: list[str] = []
    input: InputSpec = InputSpec()
    thresholds: Thresholds = Thresholds()
    baseline: Baseline | None = Field(default=None, description="results on known-good video, for drift")
    source: str = Field(default="file", exclude=True, description="file, or guessed from tensors")

    @model_validator(mode="after")
    def _baseline_labels(self) -> "Manifest":
        if self.baseline is not None and self.labels:
            unknown = sorted(set(self.baseline.classes) - set(self.labels))
            if unknown:
                raise ValueError(f"baseline.classes: {', '.join(map(repr, unknown[:5]))} "
                                 f"not among the model's {len(self.labels)} labels")
        return self

    def label(self, index: int) -> str:
        return self.labels[index] if 0 <= index < len(self.labels) else str(index)


class BaselineError(ModelError):
    """A manifest's drift baseline is malformed or names classes the model lacks: fix the
    manifest (exit 2), as for a bad config."""

    exit_code = 2


def manifest_path_for(model_path: Path) -> Path:
    return model_path.with_suffix(".yaml")


def load_manifest(path: Path, model_dir: Path | None = None) -> Manifest:
    """Read a manifest file; ``labels`` may name a text file beside it or beside the model."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ModelError(f"{path}: cannot read manifest: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ModelError(f"{path}: manifest is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: manifest must be a mapping")
    if isinstance(data.get("labels"), str):
        candidates = [path.parent / data["labels"]]
        if model_dir is not None:
            candidates.append(model_dir / data["labels"])
        data["labels"] = read_labels(next((c for c in candidates if c.is_file()), candidates[0]))
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        message = format_validation_error(exc)
        raise (BaselineError if message.startswith("baseline") else ModelError)(f"{path}: {message}") from None


def read_labels(path: Path) -> list[str]:
    """One label per line; a line's index is the model's output index."""
    try:
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise ModelError(f"cannot read labels {path}: {exc.strerror or exc}") from None


def check_manifest(manifest: Manifest, model: LoadedModel) -> None:
    """Refuse a manifest whose task, input or labels do not fit the model's tensors."""
    problem = _input_problem(model.inputs) or _output_problem(manifest, model.outputs)
    if problem:
        raise ModelError(
            f"manifest for {manifest.name} {manifest.version} does not match {model.path.name}: {problem}"
        )


def _input_problem(inputs: Sequence[TensorInfo]) -> str | None:
    if len(inputs) != 1:
        return f"expected one input tensor, model has {len(inputs)}"
    t = inputs[0]
    if len(t.shape) != 4 or t.shape[0] != 1 or t.shape[3] != 3:
        return f"expected an input of shape [1, H, W, 3], model has {list(t.shape)}"
    if t.dtype.name not in ("uint8", "int8", "float32"):
        return f"input dtype {t.dtype.name} is not supported (uint8, int8, float32)"
    return None


def _output_problem(m: Manifest, outputs: Sequence[TensorInfo]) -> str | None:
    shapes = [list(t.shape) for t in outputs]
    n_labels = len(m.labels)
    if m.task == "classify":
        if len(outputs) != 1 or len(shapes[0]) != 2:
            return f"task classify expects one output [1, classes], model has {shapes}"
        if n_labels and n_labels != shapes[0][1]:
            return f"{n_labels} labels for {shapes[0][1]} output classes"
    elif m.task == "yolov8":
        if len(outputs) != 1 or len(shapes[0]) != 3:
            return f"task yolov8 expects one output [1, 4+classes, anchors], model has {shapes}"
        classes = min(shapes[0][1:]) - 4
        if classes < 1:
            return f"output {shapes[0]} has no room for 4 box values and class scores"
        if n_labels and n_labels != classes:
            return f"{n_labels} labels for {classes} output classes"
    elif m.task == "ssd":
        if len(outputs) != 4:
            return f"task ssd expects the 4 outputs of TFLite_Detection_PostProcess, model has {shapes}"
    elif m.task == "pose":
        if len(outputs) != 1 or shapes[0][-2:] != [17, 3]:
            return f"task pose expects one output [1, 1, 17, 3], model has {shapes}"
    elif m.task == "segment":
        if len(outputs) != 1 or len(shapes[0]) not in (3, 4) or shapes[0][0] != 1:
            return f"task segment expects one output [1, H, W] (class ids) or [1, H, W, classes], model has {shapes}"
        if len(shapes[0]) == 3 and outputs[0].dtype.kind not in "iu":
            return f"task segment: a [1, H, W] output must hold class ids, model's is {outputs[0].dtype.name}"
        if len(shapes[0]) == 4 and n_labels and n_labels != shapes[0][3]:
            return f"{n_labels} labels for {shapes[0][3]} output classes"
        if n_labels > 255:
            return f"task segment: at most 255 classes, manifest has {n_labels} labels"
    return None


def _is_segmentation(model: LoadedModel) -> bool:
    """One output of class ids per pixel (an ArgMax, int32/int64), or of per-class scores as
    wide and high as a quarter of the input or more: DeepLab's two export styles."""
    if len(model.outputs) != 1:
        return False
    out, inp = model.outputs[0], model.inputs[0]
    if len(out.shape) == 3:
        return out.dtype.name in ("int32", "int64")
    return len(out.shape) == 4 and out.shape[1] * 4 >= inp.shape[1] and out.shape[2] * 4 >= inp.shape[2]


def guess_manifest(model: LoadedModel, labels: list[str] | None = None) -> Manifest:
    """A manifest inferred from the tensors, for a bare ``.tflite`` with no manifest."""
    problem = _input_problem(model.inputs)
    if problem:
        raise ModelError(f"{model.path.name}: {problem}")
    tensor = model.inputs[0]
    shapes = [list(t.shape) for t in model.outputs]
    if len(shapes) == 4:
        task: Task = "ssd"
    elif _is_segmentation(model):
        task = "segment"
    elif len(shapes) == 1 and shapes[0][-2:] == [17, 3]:
        task = "pose"
    elif len(shapes) == 1 and len(shapes[0]) == 3:
        task = "yolov8"
    elif len(shapes) == 1 and len(shapes[0]) == 2:
        task = "classify"
    else:
        raise ModelError(
            f"{model.path.name}: cannot tell the task from outputs {shapes}; write a manifest "
            f"({manifest_path_for(model.path).name}) naming it"
        )
    if task == "yolov8":
        # Ultralytics exports take RGB scaled to 0..1, letterboxed with grey.
        spec = InputSpec(resize="letterbox", mean=(0, 0, 0), std=(255, 255, 255))
    elif tensor.quantized:
        # Feed pixels straight through: the value the quantization expects is the pixel.
        spec = InputSpec(mean=(tensor.zero_point,) * 3, std=(1 / tensor.scale,) * 3)
    elif tensor.dtype.name == "float32":
        spec = InputSpec(mean=(127.5,) * 3, std=(127.5,) * 3)
    else:
        spec = InputSpec(resize="letterbox" if task == "pose" else "stretch", pad_value=0)
    manifest = Manifest(
        name=model.path.stem, version="unversioned", task=task, labels=labels or [],
        input=spec, source="guessed",
    )
    check_manifest(manifest, model)
    return manifest
