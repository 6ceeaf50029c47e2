"""The scheduler on real models and real video, through the daemon that `edge run` uses.

The one fault injected is a delay around a model's predict (the issue's "slowed
down on purpose"); everything else is the real capture, models and executors.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import pytest
from conftest import manifest_for, shared_path

from edge.config import parse_config
from edge.daemon import Daemon
from edge.inference.adapters import Prediction
from edge.schedule.scheduler import Result

# rates, budgets and fairness on what two cores give a real model: nothing may run beside them
pytestmark = pytest.mark.alone

MODELS = {
    "yolo": "models/yolov8n_full_integer_quant-b.tflite",
    "movenet": "models/movenet_single_pose_lightning_ptq.tflite",
    "mobilenet": "models/mobilenet_v2_1.0_224_quant.tflite",
}


def config(cameras: list[dict], **runtime) -> dict:
    return {
        "device": {"id": "sched-test"},
        "runtime": {"num_threads": 2, **runtime},
        "logging": {"stats_interval_s": 60},
        "models": {name: {"path": str(shared_path(path)), "manifest": str(manifest_for(path))}
                   for name, path in MODELS.items()},
        "cameras": cameras,
    }


@dataclass(frozen=True)
class Seen:
    """A result without its frame's pixels, which the test must not keep alive."""

    task: str
    seq: int
    crop: tuple | None
    prediction: Prediction
    camera: str
    waited_ms: float  # capture to the start of this run


class Collector:
    def __init__(self) -> None:
        self.results: list[Seen] = []
        self._lock = threading.Lock()

    def __call__(self, result: Result) -> None:
        with self._lock:
            waited = (result.started_at - result.frame.captured_mono) * 1e3
            self.results.append(Seen(result.task, result.frame.seq, result.crop, result.prediction,
                                     result.frame.camera, waited))

    def of(self, task: str) -> list[Seen]:
        with self._lock:
            return [r for r in self.results if r.task == task]


class SlowModel:
    """A real model with an adjustable delay added to every invoke."""

    def __init__(self, model, delay_s: float = 0.0) -> None:
        self.model, self.delay_s = model, delay_s
        self.name, self.loaded, self.manifest = model.name, model.loaded, model.manifest
        self.finish, self.preparer = model.finish, model.preparer

    def invoke(self, image, prepared=None):
        time.sleep(self.delay_s)
        return self.model.invoke(image, prepared)

    def predict(self, image):
        return self.finish(self.invoke(image))


class Running:
    """A daemon on a background thread, stopped on exit."""

    def __init__(self, cfg: dict, slow: dict[str, float] | None = None) -> None:
        self.sink = Collector()
        self.daemon = Daemon(parse_config(cfg), self.sink)
        self.slow = {}
        for slot, delay in (slow or {}).items():
            for ex in self.daemon.executors:
                ex.models[slot] = self.slow[slot] = SlowModel(ex.models[slot], delay)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.daemon.run, args=(self.stop,))

    def __enter__(self) -> "Running":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive()

    def camera(self, camera_id: str) -> dict:
        return next(c for c in self.daemon.scheduler.snapshot()["cameras"] if c["camera"] == camera_id)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def test_two_cameras_share_one_executor_fairly_with_bounded_age():
    video = str(shared_path("media/pedestrians-720p50.avi"))
    cams = [{"id": f"cam{i}", "source": {"kind": "video", "path": video, "loop": True}, "model": "yolo"}
            for i in range(2)]
    with Running(config(cams)) as run:
        time.sleep(3)
        rss_start, counts_start = rss_mb(), [run.camera(c)["processed"] for c in ("cam0", "cam1")]
        time.sleep(10)
        rss_end, counts_end = rss_mb(), [run.camera(c)["processed"] for c in ("cam0", "cam1")]
        snaps = [run.camera(c) for c in ("cam0", "cam1")]
    processed = [b - a for a, b in zip(counts_start, counts_end)]
    assert min(processed) > 20, processed
    assert abs(processed[0] - processed[1]) / max(processed) <= 0.15, processed
    for snap in snaps:
        # 50 fps on each camera with one shared executor: overloaded, so frames are dropped, never queued
        assert snap["superseded"] + snap["dropped"]["too_old"] > 0
    # a frame starts within its budget or is dropped: waiting never builds up, however slow a run
    waited = sorted(r.waited_ms for r in run.sink.results)
    assert waited[int(len(waited) * 0.99)] <= snaps[0]["budget_ms"] + 10, waited[-10:]
    assert rss_end - rss_start < 25, (rss_start, rss_end)


def test_high_priority_task_is_never_skipped_while_a_low_one_absorbs_the_overload():
    video = str(shared_path("media/pedestrians-720p50.avi"))
    # pose and detect take about 40 ms together: 200 ms leaves them room through a VM stall,
    # and the 250 ms classifier still never fits
    cams = [{"id": "line", "source": {"kind": "video", "path": video, "loop": True}, "budget_ms": 200,
             "tasks": [{"name": "pose", "model": "movenet", "priority": 10},
                       {"name": "detect", "model": "yolo", "priority": 5},
                       {"name": "classify", "model": "mobilenet", "priority": 1, "starve_after": 5}]}]
    # the classifier made too slow to ever fit the budget after pose and detect
    with Running(config(cams), slow={"mobilenet": 0.25}) as run:
        time.sleep(8)
    snap = run.camera("line")  # stopped: the counters are settled
    tasks = snap["tasks"]
    assert tasks["pose"]["runs"] == snap["processed"] > 20
    # on no frame did the low-priority task run while the higher one was skipped
    detected = {r.seq for r in run.sink.of("detect")}
    classified = {r.seq for r in run.sink.of("classify")}
    assert classified and classified <= detected
    # the low-priority task absorbs the overload (a VM stall may squeeze out a rare detect)
    assert tasks["detect"]["skips"]["budget"] <= 0.05 * snap["processed"]
    assert tasks["classify"]["skips"]["budget"] >= 0.5 * snap["processed"]
    assert tasks["classify"]["forced"] >= 1  # the starvation guard still runs it now and then


def test_cascade_classifies_at_most_k_person_crops_a_frame():
    video = str(shared_path("media/pedestrians-360p10.avi"))
    # a file read on demand waits for the executor: a budget this long is never the limit,
    # even through a hypervisor stall of a second or two, so every frame gets its crops
    cams = [{"id": "cam", "source": {"kind": "video", "path": video, "pace": "fast"}, "budget_ms": 10_000,
             "tasks": [{"name": "detect", "model": "yolo", "priority": 10},
                       {"name": "classify", "model": "mobilenet", "priority": 5,
                        "trigger": {"task": "detect", "classes": ["person"], "min_score": 0.4, "max_crops": 3}}]}]
    with Running(config(cams)) as run:
        time.sleep(6)
    detections = {r.seq: r for r in run.sink.of("detect")}
    crops_by_frame: dict[int, list[Seen]] = {}
    for r in run.sink.of("classify"):
        crops_by_frame.setdefault(r.seq, []).append(r)
    assert len(crops_by_frame) > 10
    assert max(len(v) for v in crops_by_frame.values()) == 3  # the clip has more than 3 people at once
    for seq, crops in crops_by_frame.items():
        persons = [d for d in detections[seq].prediction.detections if d.label == "person" and d.score >= 0.4]
        assert len(crops) == min(3, len(persons))
        for r in crops:
            assert r.crop is not None and r.prediction.classes  # a classification of the crop
            cx, cy = (r.crop[0] + r.crop[2]) / 2, (r.crop[1] + r.crop[3]) / 2
            assert any(d.box[0] <= cx <= d.box[2] and d.box[1] <= cy <= d.box[3] for d in persons)


def write_still_stretch(tmp_path: Path) -> Path:
    """40 real frames, the next one repeated 40 times, then 40 more real frames."""
    cap = cv2.VideoCapture(str(shared_path("media/pedestrians-360p10.avi")))
    frames = [cap.read()[1] for _ in range(81)]
    sequence = frames[:40] + [frames[40]] * 40 + frames[41:81]
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(sequence):
        cv2.imwrite(str(folder / f"{i:04d}.png"), frame)
    return folder


def test_motion_gating_saves_runs_on_a_still_stretch_and_recovers(tmp_path):
    folder = write_still_stretch(tmp_path)
    cams = [{"id": "cam", "source": {"kind": "images", "path": str(folder), "fps": 20}, "budget_ms": 100,
             "motion": {"keepalive_ms": 1000},
             "tasks": [{"name": "detect", "model": "yolo", "motion_gated": True}]}]
    with Running(config(cams)) as run:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and run.daemon.cameras[0].capture.stats().captured < 120:
            time.sleep(0.2)
        time.sleep(0.5)
        snap = run.camera("cam")
    seqs = [r.seq for r in run.sink.of("detect")]
    moving_before = [s for s in seqs if s < 40]
    still = [s for s in seqs if 41 <= s < 80]
    moving_after = [s for s in seqs if s >= 81]
    # moving: runs on most frames (a VM stall may cost a few); still for 2 s at a 1 s keep-alive: <= 3
    assert len(moving_before) >= 10 and len(moving_after) >= 10, seqs
    assert len(still) <= 3, still
    assert snap["motion"]["runs_saved"] >= 30


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_plan_adapts_to_a_task_that_slows_down_mid_run():
    video = str(shared_path("media/pedestrians-360p10.avi"))
    cams = [{"id": "cam", "source": {"kind": "video", "path": video, "loop": True}, "budget_ms": 150,
             "tasks": [{"name": "pose", "model": "movenet", "priority": 10},
                       {"name": "detect", "model": "yolo", "priority": 1}]}]
    detect = lambda snap: snap["tasks"]["detect"]  # noqa: E731
    with Running(config(cams), slow={"yolo": 0.0}) as run:
        wait_for(lambda: detect(run.camera("cam"))["runs"] >= 15)
        before = run.camera("cam")
        run.slow["yolo"].delay_s = 0.4  # far past the 150 ms budget from now on
        wait_for(lambda: detect(run.camera("cam"))["skips"]["budget"] >= detect(before)["skips"]["budget"] + 10)
        adapted = run.camera("cam")
        time.sleep(3)
        after = run.camera("cam")
    assert detect(before)["skips"]["budget"] <= 3  # it fitted while fast
    new_misses = adapted["deadline_misses"] - before["deadline_misses"]
    assert 1 <= new_misses <= 6, new_misses  # a few frames to learn the new cost
    # then the count stops growing, but for the starvation guard's own forced runs
    forced = detect(after)["forced"] - detect(adapted)["forced"]
    # (plus one or two for a stall of the shared machine; unadapted, it would be ~30)
    assert after["deadline_misses"] - adapted["deadline_misses"] <= forced + 2
    assert after["tasks"]["pose"]["runs"] > adapted["tasks"]["pose"]["runs"]


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_stuck_invoke_is_reported_and_withdraws_the_watchdog(tmp_path, monkeypatch):
    records = Records()
    logging.getLogger("edge.liveness").addHandler(records)
    sock_path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(sock_path))
    listener.settimeout(0.1)
    monkeypatch.setenv("NOTIFY_SOCKET", str(sock_path))
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # ping every 0.2 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)

    def drain() -> list[str]:
        got = []
        while True:
            try:
                got.append(listener.recv(64).decode())
            except TimeoutError:
                return got

    video = str(shared_path("media/pedestrians-360p10.avi"))
    cams = [{"id": "cam", "source": {"kind": "video", "path": video, "loop": True}, "model": "mobilenet"}]
    cfg = config(cams, scheduler={"stuck_factor": 5, "stuck_min_ms": 500})
    with Running(cfg, slow={"mobilenet": 0.0}) as run:
        time.sleep(1.5)
        healthy = drain()
        run.slow["mobilenet"].delay_s = 3.0  # the next invoke hangs
        time.sleep(2.0)
        drain()  # pings sent before the hang was noticed
        time.sleep(1.0)
        after = drain()
        assert not run.daemon.liveness.alive and run.daemon.liveness.stuck == 1
    listener.close()
    assert "READY=1" in healthy and healthy.count("WATCHDOG=1") >= 3
    assert "WATCHDOG=1" not in after
    logging.getLogger("edge.liveness").removeHandler(records)
    stuck = [r for r in records.records if r.getMessage().startswith("inference stuck")]
    assert len(stuck) == 1 and stuck[0].fields["camera"] == "cam" and stuck[0].fields["model"].startswith("mobilenet")
