"""The overlapped pipeline gives the results of the serial one, frame for frame, on the real clip.

With ``overlap`` the capture thread makes the primary model's input and a finisher thread
decodes outputs and runs the sinks while the next invoke runs; without it the executor does
everything in turn. Both run here on the same frames of the 360p clip, one camera with
YOLOv8n alone and one with YOLOv8n and a classifier on its persons' crops (whose parent
is decoded on the executor, because the crops wait for it).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from conftest import manifest_for, shared_path

from edge.capture.sources import VideoFileSource
from edge.config import CameraConfig, SchedulerConfig, VideoSource
from edge.daemon import make_camera
from edge.inference.model import Model
from edge.schedule.scheduler import Executor, Result, Scheduler

YOLO = "models/yolov8n_full_integer_quant-b.tflite"
CLASSIFIER = "models/mobilenet_v1_0.25_128_quant.tflite"
FRAMES = 40


class FirstFrames(VideoFileSource):
    """The clip's first ``count`` frames, read on demand."""

    def __init__(self, path, count: int) -> None:
        super().__init__(path, pace="fast")
        self.left = count

    def read(self):
        self.left -= 1
        return super().read() if self.left >= 0 else None


@pytest.fixture(scope="module")
def models() -> dict[str, Model]:
    return {name: Model.load(shared_path(path), manifest=manifest_for(path), num_threads=2)
            for name, path in (("yolo", YOLO), ("classifier", CLASSIFIER))}


def run(models: dict[str, Model], overlap: bool) -> tuple[dict[str, list], Scheduler]:
    clip = shared_path("media/pedestrians-360p10.avi")
    configs = [
        CameraConfig(id="alone", source=VideoSource(kind="video", path=clip, pace="fast"), model="yolo"),
        CameraConfig(id="crops", source=VideoSource(kind="video", path=clip, pace="fast"), tasks=[
            {"name": "detect", "model": "yolo", "priority": 10},
            {"name": "what", "model": "classifier",
             "trigger": {"task": "detect", "classes": ["person"], "max_crops": 2}},
        ], budget_ms=60_000),
    ]
    results: dict[str, list] = {c.id: [] for c in configs}
    threads: set[str] = set()

    def sink(result: Result) -> None:
        threads.add(threading.current_thread().name)
        results[result.frame.camera].append(
            (result.frame.seq, result.task, result.crop, result.prediction.to_dict()))

    cameras = [make_camera(c, SchedulerConfig(), lambda: scheduler.wake(), source=FirstFrames(clip, FRAMES))
               for c in configs]
    scheduler = Scheduler(cameras, [Executor(0, dict(models))], sink, overlap=overlap)
    for camera in cameras:
        camera.capture.start()
    scheduler.start()
    scheduler.join(300)
    assert scheduler.done
    for camera in cameras:
        camera.capture.stop()
    assert threads == {"finisher" if overlap else "executor-0"}
    return results, scheduler


def test_overlap_gives_the_serial_results_frame_for_frame(models):
    serial, plain = run(models, overlap=False)
    overlapped, scheduler = run(models, overlap=True)
    for camera in ("alone", "crops"):
        assert [r[0] for r in serial[camera] if r[1] != "what"] == list(range(FRAMES))
        assert overlapped[camera] == serial[camera], camera
    # the crops really ran, and the overlapped run really took its inputs from the capture threads
    assert sum(r[1] == "what" for r in serial["crops"]) > FRAMES
    assert sum(len(r[3].get("detections", ())) for r in serial["alone"]) > 5 * FRAMES
    snaps = {c["camera"]: c for c in scheduler.snapshot()["cameras"]}
    assert snaps["alone"]["prepared"] == FRAMES
    assert snaps["crops"]["prepared"] == FRAMES  # the detector's; crops are made on the executor
    assert all(c["prepared"] == 0 for c in plain.snapshot()["cameras"])


def test_an_input_made_for_another_preprocessing_is_not_used(models):
    yolo, classifier = models["yolo"], models["classifier"]
    frame = np.random.default_rng(1).integers(0, 255, (360, 480, 3), dtype=np.uint8)
    wrong = classifier.preparer()(frame)
    invoked = yolo.invoke(frame, wrong)
    assert not invoked.was_prepared
    assert yolo.finish(invoked)[0] == yolo.predict(frame)[0] == yolo.predict(frame, yolo.preparer()(frame))[0]
