"""Output adapters: raw output tensors → typed predictions in frame coordinates.

Each adapter works on the tensors as the model produced them and dequantizes only
what survives its threshold: a YOLOv8 head has 8400 anchors × 80 classes, of which
a handful matter. A segmentation model's per-pixel classes stay on the device as a
:class:`SegmentMap` beside the prediction; only the share of each class leaves.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import cv2
import numpy as np

from .manifest import Manifest
from .preprocess import Transform
from .runtime import TensorInfo

MOVENET_KEYPOINTS = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder",
    "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip",
    "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle",
)


@dataclass(frozen=True, slots=True)
class Classification:
    class_id: int
    label: str
    score: float


@dataclass(frozen=True, slots=True)
class Detection:
    class_id: int
    label: str
    score: float
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in frame pixels


@dataclass(frozen=True, slots=True)
class Keypoint:
    name: str
    x: float
    y: float
    score: float


@dataclass(frozen=True, slots=True)
class ClassShare:
    """The share of the frame (0..1) a segmentation model gave one class."""

    class_id: int
    label: str
    share: float


class SegmentMap:
    """A segmentation model's class per pixel, cropped to the frame (letterbox padding
    removed), at the model's output resolution. Never serialised: it stays on the device;
    what leaves is :meth:`shares`, of the frame or of a zone."""

    __slots__ = ("classes", "labels")

    def __init__(self, classes: np.ndarray, labels: Sequence[str]) -> None:
        self.classes = classes  # [h, w] uint8 class ids
        self.labels = tuple(labels)

    def region(self, polygon: Sequence[tuple[float, float]]) -> np.ndarray:
        """A boolean mask of the map's pixels whose centre is inside ``polygon`` (normalised
        frame coordinates)."""
        h, w = self.classes.shape
        mask = np.zeros((h, w), np.uint8)
        # 8 fractional bits: a zone edge falls between pixels as it does in the frame
        points = np.array([[(x * w - 0.5) * 256, (y * h - 0.5) * 256] for x, y in polygon], np.int32)
        cv2.fillPoly(mask, [points], 1, lineType=cv2.LINE_8, shift=8)
        return mask.astype(bool)

    def counts(self, region: np.ndarray | None = None) -> np.ndarray:
        """Pixels per class id (of ``region`` only, when given)."""
        ids = self.classes if region is None else self.classes[region]
        return np.bincount(ids.ravel(), minlength=max(len(self.labels), 1))

    def class_shares(self, region: np.ndarray | None = None) -> list[ClassShare]:
        """Each class present with its share of the frame (or of ``region``), largest first."""
        counts = self.counts(region)
        total = int(counts.sum())
        if total == 0:
            return []
        order = np.flatnonzero(counts)
        order = order[np.argsort(-counts[order], kind="stable")]
        return [ClassShare(int(i), self.label(int(i)), float(counts[i]) / total) for i in order]

    def shares(self, region: np.ndarray | None = None) -> dict[str, float]:
        """Label → share of the frame (or of ``region``), for the classes present."""
        return {c.label: c.share for c in self.class_shares(region)}

    def label(self, index: int) -> str:
        return self.labels[index] if 0 <= index < len(self.labels) else str(index)


@dataclass(frozen=True)
class Prediction:
    """What one model said about one frame. Metadata only: no pixels (a segmentation's
    ``segmap`` is kept beside it for the decisions and never serialised)."""

    task: str
    classes: tuple[Classification, ...] = field(default=())
    detections: tuple[Detection, ...] = field(default=())
    keypoints: tuple[Keypoint, ...] = field(default=())
    segments: tuple[ClassShare, ...] = field(default=())
    segmap: SegmentMap | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"kind": self.task}
        for name in ("classes", "detections", "keypoints", "segments"):
            items = getattr(self, name)
            if items:
                doc[name] = [_rounded(asdict(i)) for i in items]
        return doc


def _rounded(d: dict[str, Any]) -> dict[str, Any]:
    return {
        k: round(v, 4) if isinstance(v, float) else [round(x, 1) for x in v] if isinstance(v, tuple) else v
        for k, v in d.items()
    }


Decoder = Callable[[Sequence[np.ndarray], Transform], Prediction]


def dequantize(values: np.ndarray, tensor: TensorInfo) -> np.ndarray:
    if not tensor.quantized:
        return values.astype(np.float32, copy=False)
    return (values.astype(np.float32) - tensor.zero_point) * tensor.scale


def quantize_threshold(threshold: float, tensor: TensorInfo) -> float:
    """The smallest raw value whose dequantized score is ≥ ``threshold``."""
    if not tensor.quantized:
        return threshold
    return float(np.ceil(threshold / tensor.scale + tensor.zero_point - 1e-6))


def make_decoder(
    manifest: Manifest, outputs: Sequence[TensorInfo], input_size: tuple[int, int]
) -> Decoder:
    """The decoder for the manifest's task, bound to the model's output tensors."""
    builders = {"classify": _classifier, "yolov8": _yolov8, "ssd": _ssd, "pose": _movenet, "segment": _segment}
    return builders[manifest.task](manifest, outputs, input_size)


def _classifier(m: Manifest, outputs: Sequence[TensorInfo], _size: tuple[int, int]) -> Decoder:
    tensor = outputs[0]
    k = m.thresholds.top_k

    def decode(raw: Sequence[np.ndarray], _t: Transform) -> Prediction:
        scores = dequantize(raw[0].reshape(-1), tensor)
        top = np.argpartition(-scores, min(k, scores.size - 1))[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return Prediction(
            "classify",
            classes=tuple(Classification(int(i), m.label(int(i)), float(scores[i])) for i in top),
        )

    return decode


def nms_by_class(xywh: np.ndarray, scores: np.ndarray, class_ids: np.ndarray, score: float, iou: float,
                 top_k: int) -> np.ndarray:
    """Indices of the boxes (x, y, w, h) that survive class-aware NMS.

    OpenCV has a batched NMS from 4.7 on; older builds (Debian 12's and Raspberry Pi OS's
    4.6) get the same result from the plain one, each class's boxes shifted far enough
    apart that boxes of two classes never overlap."""
    batched = getattr(cv2.dnn, "NMSBoxesBatched", None)
    if batched is not None:
        picked = batched(xywh.tolist(), scores.tolist(), class_ids.tolist(), score, iou, top_k=top_k)
    else:
        shifted = xywh.copy()
        shifted[:, :2] += (class_ids * (xywh[:, :2].max() + xywh[:, 2:].max() + 1))[:, None]
        picked = cv2.dnn.NMSBoxes(shifted.tolist(), scores.tolist(), score, iou, top_k=top_k)
    return np.asarray(picked, dtype=np.int64).reshape(-1)


def _yolov8(m: Manifest, outputs: Sequence[TensorInfo], size: tuple[int, int]) -> Decoder:
    tensor = outputs[0]
    width, height = size
    t = m.thresholds
    raw_threshold = quantize_threshold(t.score, tensor)

    def decode(raw: Sequence[np.ndarray], transform: Transform) -> Prediction:
        out = raw[0][0]
        if out.shape[0] > out.shape[1]:  # some exports put anchors first
            out = out.T
        class_scores = out[4:]
        best = class_scores.max(axis=0)
        keep = np.flatnonzero(best >= raw_threshold)
        if keep.size == 0:
            return Prediction("yolov8")
        scores = dequantize(best[keep], tensor)
        class_ids = class_scores[:, keep].argmax(axis=0)
        cx, cy, w, h = dequantize(out[:4, keep], tensor) * np.array([[width], [height], [width], [height]])
        xywh = np.stack([cx - w / 2, cy - h / 2, w, h], axis=1)
        picked = nms_by_class(xywh, scores, class_ids, t.score, t.iou, t.max_detections)
        if picked.size == 0:
            return Prediction("yolov8")
        picked = picked[np.argsort(-scores[picked], kind="stable")][: t.max_detections]
        corners = np.concatenate([xywh[picked, :2], xywh[picked, :2] + xywh[picked, 2:]], axis=1)
        return _detections("yolov8", m, class_ids, scores, picked, transform.boxes_to_frame(corners))

    return decode


def _detections(task: str, m: Manifest, class_ids: np.ndarray, scores: np.ndarray,
                indices: np.ndarray, frame_boxes: np.ndarray) -> Prediction:
    """The prediction holding ``indices`` of the candidates, with their frame boxes in order."""
    return Prediction(task, detections=tuple(
        Detection(int(class_ids[i]), m.label(int(class_ids[i])), float(scores[i]), tuple(map(float, b)))
        for i, b in zip(indices, frame_boxes)
    ))


def ssd_output_order(outputs: Sequence[TensorInfo]) -> tuple[int, int, int, int]:
    """Indices of (boxes, classes, scores, count) among TFLite_Detection_PostProcess outputs.

    TF1 exports list boxes, classes, scores, count; TF2 exports list scores, boxes,
    count, classes. Boxes are the one 3-D tensor either way.
    """
    boxes = next(i for i, t in enumerate(outputs) if len(t.shape) == 3)
    if boxes == 0:
        return 0, 1, 2, 3
    return 1, 3, 0, 2


def _ssd(m: Manifest, outputs: Sequence[TensorInfo], size: tuple[int, int]) -> Decoder:
    boxes_i, classes_i, scores_i, count_i = ssd_output_order(outputs)
    width, height = size
    t = m.thresholds

    def decode(raw: Sequence[np.ndarray], transform: Transform) -> Prediction:
        count = int(np.asarray(raw[count_i]).reshape(-1)[0])
        scores = np.asarray(raw[scores_i], dtype=np.float32).reshape(-1)[:count]
        classes = np.asarray(raw[classes_i]).reshape(-1)[:count].astype(np.int64)
        boxes = np.asarray(raw[boxes_i], dtype=np.float32).reshape(-1, 4)[:count]
        keep = np.flatnonzero(scores >= t.score)[: t.max_detections]
        # ymin, xmin, ymax, xmax normalised → x1, y1, x2, y2 input pixels
        corners = boxes[keep][:, [1, 0, 3, 2]] * np.array([width, height, width, height], np.float32)
        return _detections("ssd", m, classes, scores, keep, transform.boxes_to_frame(corners))

    return decode


def _movenet(m: Manifest, outputs: Sequence[TensorInfo], size: tuple[int, int]) -> Decoder:
    names = m.labels if len(m.labels) == 17 else MOVENET_KEYPOINTS
    width, height = size
    tensor = outputs[0]

    def decode(raw: Sequence[np.ndarray], transform: Transform) -> Prediction:
        kp = dequantize(raw[0].reshape(17, 3), tensor)  # y, x, score; normalised to the input
        xy = transform.points_to_frame(np.stack([kp[:, 1] * width, kp[:, 0] * height], axis=1))
        return Prediction(
            "pose",
            keypoints=tuple(
                Keypoint(names[i], float(xy[i, 0]), float(xy[i, 1]), float(kp[i, 2])) for i in range(17)
            ),
        )

    return decode


def _segment(m: Manifest, outputs: Sequence[TensorInfo], size: tuple[int, int]) -> Decoder:
    """DeepLab-style output: ``[1, h, w]`` class ids (an ArgMax in the model) or
    ``[1, h, w, C]`` per-class scores, whose argmax needs no dequantizing (one scale
    for all classes keeps the order)."""
    in_w, in_h = size
    labels = m.labels

    def decode(raw: Sequence[np.ndarray], transform: Transform) -> Prediction:
        out = raw[0][0]
        ids = out.argmax(axis=-1) if out.ndim == 3 else out
        h, w = ids.shape
        # the part of the input the frame fills (all of it when stretched), in map pixels
        x0 = transform.pad_x * w / in_w
        y0 = transform.pad_y * h / in_h
        x1 = x0 + transform.frame_w * transform.scale_x * w / in_w
        y1 = y0 + transform.frame_h * transform.scale_y * h / in_h
        ids = ids[int(round(y0)):max(int(round(y1)), int(round(y0)) + 1),
                  int(round(x0)):max(int(round(x1)), int(round(x0)) + 1)]
        # ids past 255 (or below 0) are no class the labels know: the last uint8 value
        classes = np.where((ids >= 0) & (ids < 255), ids, 255).astype(np.uint8)
        segmap = SegmentMap(classes, labels)
        return Prediction("segment", segments=tuple(segmap.class_shares()), segmap=segmap)

    return decode
