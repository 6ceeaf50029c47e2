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
    """Turns BGR uint8 frames into the model's input tensor."""

    def __init__(self, spec: InputSpec, tensor: TensorInfo) -> None:
        _, self.height, self.width, _ = tensor.shape
        self.spec = spec
        self.dtype = tensor.dtype
        self._lut = quantize_lut(spec, tensor) if tensor.dtype != np.float32 else None
        # The usual full-integer export (scale 1/255, zero point -128 on 0..1 input) makes
        # the table a flip of the top bit, which a vector XOR does far faster than a gather.
        self._flip_top_bit = self._lut is not None and np.array_equal(
            self._lut[0], np.repeat((np.arange(256) ^ 0x80).astype(np.uint8)[:, None], 3, 1)
        )
        self._mean = np.array(spec.mean, dtype=np.float32)
        self._inv_std = 1.0 / np.array(spec.std, dtype=np.float32)
        self._geometry: tuple[tuple[int, int], Transform, np.ndarray | None] | None = None

    def __call__(self, frame: np.ndarray) -> tuple[np.ndarray, Transform]:
        """The ``[1, H, W, 3]`` input for ``frame`` and the transform back to it."""
        transform, canvas = self._prepare(frame.shape[1], frame.shape[0])
        if self.spec.resize == "stretch":
            return self._convert(cv2.resize(frame, (self.width, self.height)))[None], transform
        # Letterbox: the borders of the cached canvas already hold the padding value.
        assert canvas is not None
        w = round(transform.frame_w * transform.scale_x)
        h = round(transform.frame_h * transform.scale_y)
        resized = cv2.resize(frame, (w, h), interpolation=cv2.INTER_LINEAR)
        canvas[transform.pad_y : transform.pad_y + h, transform.pad_x : transform.pad_x + w] = (
            self._convert(resized)
        )
        return canvas[None], transform

    def _convert(self, image: np.ndarray) -> np.ndarray:
        if self.spec.colour == "rgb":
            image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        if self.dtype == np.float32:
            return (image.astype(np.float32) - self._mean) * self._inv_std
        if self._flip_top_bit:
            image = np.bitwise_xor(image, 0x80)
        elif self._lut is not None:
            image = cv2.LUT(image, self._lut)
        return image.view(self.dtype)

    def _prepare(self, frame_w: int, frame_h: int) -> tuple[Transform, np.ndarray | None]:
        if self._geometry and self._geometry[0] == (frame_w, frame_h):
            return self._geometry[1], self._geometry[2]
        if self.spec.resize == "stretch":
            transform = Transform(self.width / frame_w, self.height / frame_h, 0, 0, frame_w, frame_h)
            canvas = None
        else:
            r = min(self.width / frame_w, self.height / frame_h)
            w, h = round(frame_w * r), round(frame_h * r)
            pad_x, pad_y = (self.width - w) // 2, (self.height - h) // 2
            transform = Transform(w / frame_w, h / frame_h, pad_x, pad_y, frame_w, frame_h)
            pad = np.full((1, 1, 3), self.spec.pad_value, dtype=np.uint8)
            canvas = np.empty((self.height, self.width, 3), dtype=self.dtype)
            canvas[:] = self._convert(pad)[0, 0]
        self._geometry = ((frame_w, frame_h), transform, canvas)
        return transform, canvas
