"""Frame → input tensor: resize (stretch or letterbox), colour order, normalisation.

For integer inputs the normalisation and the input quantization are folded into one
256-entry lookup table per channel, so a uint8 pixel becomes the quantized value the
model wants without ever passing through float. Geometry is computed once per frame
size and reused, and :class:`Transform` maps model coordinates back to the frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .manifest import InputSpec
from .runtime import TensorInfo


@dataclass(frozen=True)
class Transform:
    """Maps input-tensor pixel coordinates back to frame pixel coordinates."""

    scale_x: float
    scale_y: float
    pad_x: int
    pad_y: int
    frame_w: int
    frame_h: int

    def for_frame(self, frame_w: int, frame_h: int) -> "Transform":
        """This transform, made on a scaled copy of a frame (the same view, another size),
        mapping to the pixels of the ``frame_w`` x ``frame_h`` original instead."""
        return Transform(self.scale_x * self.frame_w / frame_w, self.scale_y * self.frame_h / frame_h,
                         self.pad_x, self.pad_y, frame_w, frame_h)

    def boxes_to_frame(self, boxes: np.ndarray) -> np.ndarray:
        """``[N, 4]`` x1,y1,x2,y2 in input pixels → frame pixels, clipped to the frame."""
        out = np.empty_like(boxes, dtype=np.float32)
        out[:, 0::2] = (boxes[:, 0::2] - self.pad_x) / self.scale_x
        out[:, 1::2] = (boxes[:, 1::2] - self.pad_y) / self.scale_y
        np.clip(out[:, 0::2], 0, self.frame_w, out=out[:, 0::2])
        np.clip(out[:, 1::2], 0, self.frame_h, out=out[:, 1::2])
        return out

    def points_to_frame(self, xy: np.ndarray) -> np.ndarray:
        """``[N, 2]`` x,y in input pixels → frame pixels."""
        return np.stack(
            [(xy[:, 0] - self.pad_x) / self.scale_x, (xy[:, 1] - self.pad_y) / self.scale_y], axis=1
        )


def quantize_lut(spec: InputSpec, tensor: TensorInfo) -> np.ndarray | None:
    """A ``(1, 256, 3)`` uint8 table of the input's raw bytes per pixel value, or None for identity."""
    info = np.iinfo(tensor.dtype)
    pixels = np.arange(256, dtype=np.float64)[:, None]
    values = (pixels - np.array(spec.mean)) / np.array(spec.std)
    if tensor.quantized:
        values = values / tensor.scale + tensor.zero_point
    q = np.clip(np.rint(values), info.min, info.max).astype(tensor.dtype)
    table = q.view(np.uint8).reshape(1, 256, 3)
    if tensor.dtype == np.uint8 and np.array_equal(table[0], np.repeat(pixels.astype(np.uint8), 3, 1)):
        return None
    return np.ascontiguousarray(table)


class Preprocessor:
    """Turns BGR uint8 frames into the model's input tensor.

    ``key`` names the preprocessing exactly (input geometry, type, quantization and the
    manifest's input spec): a tensor made by one Preprocessor fits any model whose
    Preprocessor has the same key. Instances hold no buffers between calls, so one may
    serve one thread while another prepares frames for the same model.
    """

    def __init__(self, spec: InputSpec, tensor: TensorInfo) -> None:
        _, self.height, self.width, _ = tensor.shape
        self.spec = spec
        self.dtype = tensor.dtype
        self.key = (tuple(tensor.shape), self.dtype.str, tensor.scale, tensor.zero_point, spec.model_dump_json())
        self._lut = quantize_lut(spec, tensor) if tensor.dtype != np.float32 else None
        # The usual full-integer export (scale 1/255, zero point -128 on 0..1 input) makes
        # the table a flip of the top bit, which a vector XOR does far faster than a gather.
        self._flip_top_bit = self._lut is not None and np.array_equal(
            self._lut[0], np.repeat((np.arange(256) ^ 0x80).astype(np.uint8)[:, None], 3, 1)
        )
        self._mean = np.array(spec.mean, dtype=np.float32)
        self._inv_std = 1.0 / np.array(spec.std, dtype=np.float32)
        # letterbox: a whole input of padding to copy borders from (a row copy is far faster than a fill)
        self._pad = None if spec.resize == "stretch" else np.ascontiguousarray(np.broadcast_to(
            self._convert_new(np.full((1, 1, 3), spec.pad_value, dtype=np.uint8))[0, 0],
            (self.height, self.width, 3)))
        self._geometry: tuple[tuple[int, int], Transform] | None = None

    def __call__(self, frame: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray, Transform]:
        """The ``[1, H, W, 3]`` input for ``frame`` and the transform back to it.

        With ``out`` (e.g. a view of the interpreter's input tensor) the input is written
        there, without an intermediate image; otherwise into a new array.
        """
        transform = self._prepare(frame.shape[1], frame.shape[0])
        if out is None:
            out = np.empty((1, self.height, self.width, 3), dtype=self.dtype)
        image = out[0]
        if self.spec.resize == "stretch":
            self._resize_into(frame, image)
            return out, transform
        w = round(transform.frame_w * transform.scale_x)
        h = round(transform.frame_h * transform.scale_y)
        x, y = transform.pad_x, transform.pad_y
        # The borders are written on every call: a runtime may reuse the input's memory.
        pad = self._pad
        assert pad is not None
        image[:y] = pad[:y]
        image[y + h:] = pad[y + h:]
        image[y:y + h, :x] = pad[y:y + h, :x]
        image[y:y + h, x + w:] = pad[y:y + h, x + w:]
        self._resize_into(frame, image[y:y + h, x:x + w])
        return out, transform

    def scaled_size(self, frame_w: int, frame_h: int) -> tuple[int, int]:
        """The size a ``frame_w`` x ``frame_h`` frame is resized to inside the input: what a
        camera that can scale should deliver for this model."""
        t = self._prepare(frame_w, frame_h)
        return round(frame_w * t.scale_x), round(frame_h * t.scale_y)

    def _resize_into(self, frame: np.ndarray, region: np.ndarray) -> None:
        """Resize ``frame`` into ``region`` of the input and convert it there, in place."""
        if self.dtype == np.float32:
            region[:] = self._convert_new(cv2.resize(frame, (region.shape[1], region.shape[0])))
            return
        target = region.view(np.uint8)
        _into(cv2.resize(frame, (target.shape[1], target.shape[0]), dst=target,
                         interpolation=cv2.INTER_LINEAR), target)
        if self.spec.colour == "rgb":
            _into(cv2.cvtColor(target, cv2.COLOR_BGR2RGB, dst=target), target)
        if self._flip_top_bit:
            np.bitwise_xor(target, 0x80, out=target)
        elif self._lut is not None:
            _into(cv2.LUT(target, self._lut, dst=target), target)

    def _convert_new(self, image: np.ndarray) -> np.ndarray:
        if self.spec.colour == "rgb":
            image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        if self.dtype == np.float32:
            return (image.astype(np.float32) - self._mean) * self._inv_std
        if self._flip_top_bit:
            image = np.bitwise_xor(image, 0x80)
        elif self._lut is not None:
            image = cv2.LUT(image, self._lut)
        return image.view(self.dtype)

    def _prepare(self, frame_w: int, frame_h: int) -> Transform:
        geometry = self._geometry  # one read: another thread may replace it meanwhile
        if geometry and geometry[0] == (frame_w, frame_h):
            return geometry[1]
        if self.spec.resize == "stretch":
            transform = Transform(self.width / frame_w, self.height / frame_h, 0, 0, frame_w, frame_h)
        else:
            r = min(self.width / frame_w, self.height / frame_h)
            w, h = round(frame_w * r), round(frame_h * r)
            pad_x, pad_y = (self.width - w) // 2, (self.height - h) // 2
            transform = Transform(w / frame_w, h / frame_h, pad_x, pad_y, frame_w, frame_h)
        self._geometry = ((frame_w, frame_h), transform)
        return transform


def _into(result: np.ndarray, target: np.ndarray) -> None:
    # OpenCV writes into a ``dst`` it can use; should a build ever return a new array, copy it
    if result is not target and not np.shares_memory(result, target):
        target[...] = result
