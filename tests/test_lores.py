"""A camera that scales for the model: picamera2's lores stream, fed to YOLOv8n.

picamera2 needs a Raspberry Pi, so its module is replaced here by a stand-in that plays
the real 720p clip as the main stream and, like the ISP, a YUV420 copy scaled to the
requested lores size (rows padded to a 64-byte stride, as the ISP pads them). Everything
else is real: the source adapter, the capture thread, the preprocessing and the model.
"""

from __future__ import annotations

import sys
import types

import cv2
import numpy as np
import pytest
from conftest import manifest_for, shared_path

from edge.capture.sources import make_source
from edge.capture.thread import CaptureThread
from edge.config import Backoff, Picamera2Source
from edge.inference.model import Model

YOLO = "models/yolov8n_full_integer_quant-b.tflite"


class StandInCamera:
    """picamera2.Picamera2 as far as the adapter uses it."""

    configured: list[dict] = []

    def __init__(self, index: int) -> None:
        self.clip = cv2.VideoCapture(str(shared_path("media/pedestrians-720p50.avi")))

    def create_video_configuration(self, main: dict, lores: dict | None = None, controls: dict | None = None) -> dict:
        return {"main": main, "lores": lores, "controls": controls}

    def configure(self, config: dict) -> None:
        self.configured.append(config)
        self.camera_config = config

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def close(self) -> None:
        self.clip.release()

    def capture_array(self, name: str) -> np.ndarray:
        return self.clip.read()[1]

    def capture_arrays(self, names: list[str]) -> tuple[list[np.ndarray], dict]:
        assert names == ["main", "lores"]
        frame = self.clip.read()[1]
        w, h = self.camera_config["lores"]["size"]
        small = cv2.cvtColor(cv2.resize(frame, (w, h), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2YUV_I420)
        stride = (w + 63) // 64 * 64
        y, u, v = small[:h], small[h:h + h // 4].reshape(h // 2, w // 2), small[h + h // 4:].reshape(h // 2, w // 2)
        planes = [np.pad(y, ((0, 0), (0, stride - w)))] + [
            np.pad(p, ((0, 0), (0, (stride - w) // 2))).reshape(h // 4, stride) for p in (u, v)]
        return [frame, np.concatenate(planes)], {}


@pytest.fixture
def picamera2(monkeypatch):
    StandInCamera.configured = []
    monkeypatch.setitem(sys.modules, "picamera2", types.SimpleNamespace(Picamera2=StandInCamera))
    return StandInCamera


@pytest.fixture(scope="module")
def yolo() -> Model:
    return Model.load(shared_path(YOLO), manifest=manifest_for(YOLO), num_threads=2)


def iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_the_model_is_fed_from_a_lores_stream_at_its_size_and_boxes_land_on_the_full_frame(picamera2, yolo):
    source = make_source(Picamera2Source(kind="picamera2", width=1280, height=720, fps=50))
    preparer = yolo.preparer()
    source.request_lores(preparer.scaled_size)
    source.open()
    try:
        # YOLOv8n letterboxes into 640x640: a 16:9 camera is asked for 640x360, not 640x640
        assert picamera2.configured[-1]["lores"] == {"size": (640, 360), "format": "YUV420"}
        matched = total = 0
        for _ in range(8):
            frame = source.read()
            assert frame.shape == (720, 1280, 3) and source.lores.shape == (360, 640, 3)
            prepared = preparer(frame, source.lores)
            from_lores, _ = yolo.predict(frame, prepared)
            assert yolo.invoke(frame, prepared).was_prepared
            # exactly the model's view of the lores image, its boxes scaled to the full frame
            small, _ = yolo.predict(source.lores)
            assert [d.label for d in from_lores.detections] == [d.label for d in small.detections]
            assert np.allclose([d.box for d in from_lores.detections],
                               [np.array(d.box) * 2 for d in small.detections], atol=0.01)
            full, _ = yolo.predict(frame)
            sure = [d for d in full.detections if d.score > 0.5]
            total += len(sure)
            matched += sum(any(d.label == o.label and iou(d.box, o.box) > 0.6 for o in from_lores.detections)
                           for d in sure)
    finally:
        source.close()
    # about the same people as from the full frame (the ISP's scaling is not OpenCV's), from a quarter of the pixels
    assert total > 20 and matched >= 0.85 * total, (matched, total)


def test_the_capture_thread_hands_the_lores_copy_to_the_preparation(picamera2):
    source = make_source(Picamera2Source(kind="picamera2", width=1280, height=720, fps=50))
    source.request_lores(lambda w, h: (320, 180))
    capture = CaptureThread("pi", source, stale_after_s=5, frozen_after_s=10, backoff=Backoff())
    capture.prepare = lambda image, lores: (image.shape, None if lores is None else lores.shape)
    capture.start()
    try:
        # a live camera's frame is prepared when the one before was taken: taking each at once, most are
        prepared = [capture.get(10).prepared for _ in range(10)]
    finally:
        capture.stop()
    assert prepared.count(((720, 1280, 3), (180, 320, 3))) >= 5 and set(prepared) <= {
        ((720, 1280, 3), (180, 320, 3)), None}, prepared
    # without lores asked for, the camera is configured with the main stream alone
    plain = make_source(Picamera2Source(kind="picamera2", lores=False))
    plain.request_lores(lambda w, h: (320, 180))
    plain.open()
    plain.close()
    assert picamera2.configured[-1]["lores"] is None
