"""Capture sources and capture threads on real files through real OpenCV.

Behaviour is asserted (order, counts, states, recovery), never wall-clock speed:
every wait below is a generous upper bound that a healthy run finishes far inside.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np
import pytest

from edge.capture.sources import (
    ImageDirSource,
    Source,
    SourceUnsupported,
    TestPatternSource,
    UsbCameraSource,
    VideoFileSource,
    make_source,
    redact,
)
from edge.capture.thread import CaptureState, CaptureThread, Frame
from edge.config import (
    Backoff,
    GStreamerSource,
    ImagesSource,
    PatternSource,
    Picamera2Source,
    UrlSource,
    UsbSource,
    VideoSource,
)
from edge.core.errors import SourceError

FAST_BACKOFF = Backoff(initial_s=0.02, max_s=0.1)
SLOW_BACKOFF = Backoff(initial_s=30.0, max_s=30.0)  # a thread in backoff stays there for the test


# --- helpers -----------------------------------------------------------------------------------


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll until ``condition`` holds; the timeout only bounds a broken run."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return condition()


def drain(capture: CaptureThread, timeout: float = 10.0) -> list[Frame]:
    """Take frames until the capture ends."""
    frames = []
    deadline = time.monotonic() + timeout
    while not capture.ended and time.monotonic() < deadline:
        frame = capture.get(timeout=1.0)
        if frame is not None:
            frames.append(frame)
    assert capture.ended, "the capture did not end"
    return frames


def decode_all(path: Path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, image = cap.read()
        if not ok:
            break
        frames.append(image)
    cap.release()
    return frames


def copy_atomically(src: Path, dst: Path) -> None:
    """Copy so that the capture thread never lists a half-written image."""
    tmp = dst.with_name(dst.name + ".part")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def write_video(path: Path, base: np.ndarray, count: int, fps: float = 10.0) -> None:
    """A short MJPG video whose frames differ: the base image with the frame number on it."""
    h, w = base.shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    assert writer.isOpened()
    for i in range(count):
        image = base.copy()
        cv2.putText(image, str(i), (4, h - 8), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (0, 0, 255), 2)
        writer.write(image)
    writer.release()


def small_image(
    shared: Callable[[str], Path], name: str = "owl.jpg", size: tuple[int, int] = (160, 120)
) -> np.ndarray:
    """A real image, shrunk so tests stay fast."""
    image = cv2.imread(str(shared(f"media/images/{name}")), cv2.IMREAD_COLOR)
    assert image is not None
    return cv2.resize(image, size)


def free_port() -> int:
    """A TCP port nothing listens on (so a connection is refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Scripted:
    """Wraps a real source to misbehave on cue: hang in read while ``flowing`` is clear,
    or return None on chosen reads (an RTSP stream that drops)."""

    def __init__(self, inner: Source, *, live: bool | None = None, none_on: set[int] = frozenset()):
        self.inner = inner
        self.description = f"scripted {inner.description}"
        self.live = inner.live if live is None else live
        self.paced = inner.paced
        self.flowing = threading.Event()
        self.flowing.set()
        self.opens = 0
        self.reads = 0
        self.reads_started = 0
        self.closed = False
        self._none_on = none_on

    @property
    def fps(self) -> float | None:
        return self.inner.fps

    def open(self) -> None:
        self.opens += 1
        self.inner.open()

    def read(self) -> np.ndarray | None:
        self.reads_started += 1
        self.flowing.wait(timeout=20)
        self.reads += 1
        if self.reads in self._none_on:
            return None
        return self.inner.read()

    def close(self) -> None:
        self.closed = self.opens > 0
        self.inner.close()


class Broken(TestPatternSource):
    """A source with a bug: read raises something that is not a SourceError."""

    def read(self) -> np.ndarray | None:
        raise RuntimeError("boom")


@pytest.fixture
def captures() -> Iterator[Callable[..., CaptureThread]]:
    """Make capture threads that are always stopped, even when a test fails."""
    made: list[CaptureThread] = []

    def make(source: Source | object, *, stale_after_s: float = 10.0, frozen_after_s: float = 30.0,
             backoff: Backoff = FAST_BACKOFF, start: bool = True, remake=None) -> CaptureThread:
        src = source if hasattr(source, "read") else make_source(source)
        capture = CaptureThread("cam0", src, stale_after_s=stale_after_s,
                                frozen_after_s=frozen_after_s, backoff=backoff, remake=remake)
        made.append(capture)
        if start:
            capture.start()
        return capture

    yield make
    for capture in made:
        capture.stop()


@pytest.fixture
def capture_log() -> Iterator[list[logging.LogRecord]]:
    """Records logged by edge.capture, whatever the logging setup of other tests."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect(level=logging.INFO)
    logger = logging.getLogger("edge.capture")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def messages(records: list[logging.LogRecord], msg: str) -> list[logging.LogRecord]:
    return [r for r in records if r.getMessage() == msg]


# --- video files --------------------------------------------------------------------------------


def test_video_fast_is_frame_by_frame(shared, captures):
    path = shared("media/pedestrians-360p10.avi")
    expected = decode_all(path)
    capture = captures(VideoSource(kind="video", path=path, pace="fast"))

    frames = drain(capture)

    assert len(frames) == len(expected)
    assert [f.seq for f in frames] == list(range(len(expected)))
    assert frames[0].image.shape == (360, 480, 3) and frames[0].image.dtype == np.uint8
    assert np.array_equal(frames[0].image, expected[0])
    assert np.array_equal(frames[-1].image, expected[-1])
    stats = capture.stats()
    assert stats.state is CaptureState.ENDED
    assert stats.superseded == 0
    assert stats.captured == stats.taken == len(expected)
    assert capture.get(timeout=0.05) is None


def test_video_native_with_slow_consumer_gets_newest(shared, captures):
    path = shared("media/pedestrians-720p50.avi")
    capture = captures(VideoSource(kind="video", path=path, pace="native"))
    assert capture.source.fps == 50

    frames = []
    for _ in range(25):
        before = capture.stats().captured
        frame = capture.get(timeout=5.0)
        assert frame is not None
        assert frame.seq >= before - 1  # never older than the newest frame at the time of asking
        frames.append(frame)
        time.sleep(0.06)  # a consumer slower than 50 fps
    capture.stop()

    seqs = [f.seq for f in frames]
    assert all(b > a for a, b in zip(seqs, seqs[1:]))
    assert any(b - a > 1 for a, b in zip(seqs, seqs[1:])), "no frame was skipped"
    stats = capture.stats()
    assert stats.superseded > 0
    assert stats.taken == len(frames)
    assert stats.captured - (stats.superseded + stats.taken) in (0, 1)  # at most one left in the slot


def test_video_loop_rewinds(shared, captures, tmp_path):
    path = tmp_path / "ten.avi"
    write_video(path, small_image(shared), 10)
    originals = decode_all(path)
    assert len(originals) == 10
    capture = captures(VideoSource(kind="video", path=path, pace="fast", loop=True))

    frames = [capture.get(timeout=5.0) for _ in range(25)]

    assert all(f is not None for f in frames)
    assert [f.seq for f in frames] == list(range(25))
    for i, frame in enumerate(frames):
        assert np.array_equal(frame.image, originals[i % 10]), f"frame {i}"
    assert not capture.ended


def test_video_reopen_resumes_where_it_left_off(shared, tmp_path):
    path = tmp_path / "ten.avi"
    write_video(path, small_image(shared), 10)
    originals = decode_all(path)
    source = VideoFileSource(path, pace="fast")
    source.open()
    for i in range(3):
        assert np.array_equal(source.read(), originals[i])
    source.close()
    source.close()  # idempotent
    source.open()
    assert np.array_equal(source.read(), originals[3])
    source.close()


@pytest.mark.parametrize("kind", ["missing", "garbage"])
def test_unopenable_video_fails_at_start(tmp_path, captures, kind):
    path = tmp_path / f"{kind}.avi"
    if kind == "garbage":
        path.write_bytes(os.urandom(4096))
    capture = captures(VideoSource(kind="video", path=path), start=False)

    with pytest.raises(SourceError, match="cannot open video") as info:
        capture.start()

    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)
    assert not capture.is_alive()


# --- image directories -------------------------------------------------------------------------


def test_images_come_in_name_order_as_bgr(shared, captures, tmp_path):
    copy_atomically(shared("media/images/cat.bmp"), tmp_path / "a_cat.bmp")
    copy_atomically(shared("media/images/owl.jpg"), tmp_path / "b_owl.jpg")
    hot_dog = cv2.imread(str(shared("media/images/hot_dog.jpg")))
    cv2.imwrite(str(tmp_path / "c_hotdog.png"), hot_dog)
    cv2.imwrite(str(tmp_path / "d_grey.png"), cv2.cvtColor(hot_dog, cv2.COLOR_BGR2GRAY))
    cv2.imwrite(str(tmp_path / "e_alpha.PNG"), cv2.cvtColor(hot_dog, cv2.COLOR_BGR2BGRA))
    (tmp_path / "notes.txt").write_text("not an image")
    names = ["a_cat.bmp", "b_owl.jpg", "c_hotdog.png", "d_grey.png", "e_alpha.PNG"]
    capture = captures(ImagesSource(kind="images", path=tmp_path))

    frames = drain(capture)

    assert len(frames) == len(names)
    for frame, name in zip(frames, names):
        assert frame.image.ndim == 3 and frame.image.shape[2] == 3 and frame.image.dtype == np.uint8
        assert np.array_equal(frame.image, cv2.imread(str(tmp_path / name), cv2.IMREAD_COLOR)), name
    assert capture.stats().state is CaptureState.ENDED


def test_unreadable_image_is_counted_and_skipped(shared, captures, tmp_path, capture_log):
    copy_atomically(shared("media/traffic_frames/0001.bmp"), tmp_path / "a.bmp")
    (tmp_path / "b.jpg").write_bytes(b"this is not a jpeg")
    copy_atomically(shared("media/traffic_frames/0003.bmp"), tmp_path / "c.bmp")
    capture = captures(ImagesSource(kind="images", path=tmp_path))

    frames = drain(capture)

    assert len(frames) == 2
    assert np.array_equal(frames[0].image, cv2.imread(str(tmp_path / "a.bmp")))
    assert np.array_equal(frames[1].image, cv2.imread(str(tmp_path / "c.bmp")))
    stats = capture.stats()
    assert stats.read_errors == 1
    assert stats.reopens == 1
    assert "b.jpg" in (stats.last_error or "")
    assert stats.state is CaptureState.ENDED
    failure = messages(capture_log, "camera reopening")
    assert failure and "b.jpg" in failure[0].fields["error"] and failure[0].fields["next_delay_s"] > 0


@pytest.mark.parametrize("kind", ["empty", "missing"])
def test_image_dir_without_images_fails_at_start(tmp_path, captures, kind):
    path = tmp_path / "frames"
    if kind == "empty":
        path.mkdir()
        (path / "readme.txt").write_text("no images here")
    capture = captures(ImagesSource(kind="images", path=path), start=False)

    with pytest.raises(SourceError) as info:
        capture.start()

    assert str(path) in str(info.value)
    assert not capture.is_alive()


def test_identical_images_are_frozen_and_reopened(shared, captures, tmp_path, capture_log):
    for name in ("a.jpg", "b.jpg"):
        copy_atomically(shared("media/images/owl.jpg"), tmp_path / name)
    capture = captures(ImagesSource(kind="images", path=tmp_path, fps=50, loop=True), frozen_after_s=0.2)

    assert wait_for(lambda: capture.stats().state is CaptureState.FROZEN)
    assert wait_for(lambda: capture.stats().reopens >= 2)
    assert capture.stats().read_errors == 0
    assert len(messages(capture_log, "camera frozen")) == 1  # logged on the transition only


def test_moving_pattern_is_not_frozen_but_a_still_one_is(captures):
    moving = captures(PatternSource(kind="pattern", width=160, height=120, fps=50), frozen_after_s=0.2)
    still = captures(PatternSource(kind="pattern", width=160, height=120, fps=50, still=True),
                     frozen_after_s=0.2)

    assert wait_for(lambda: still.stats().state is CaptureState.FROZEN)
    assert wait_for(lambda: still.stats().reopens >= 1)
    assert wait_for(lambda: moving.stats().captured >= 30)
    stats = moving.stats()
    assert stats.state is CaptureState.LIVE and stats.reopens == 0


def test_deleted_images_reopen_with_backoff_then_recover(shared, captures, tmp_path, capture_log):
    names = ["0001.bmp", "0002.bmp", "0003.bmp"]
    originals = {name: shared(f"media/traffic_frames/{name}") for name in names}
    for name in names:
        copy_atomically(originals[name], tmp_path / name)
    capture = captures(ImagesSource(kind="images", path=tmp_path, fps=50, loop=True))
    assert wait_for(lambda: capture.stats().captured >= 5)

    for name in names:
        (tmp_path / name).unlink()
    assert wait_for(lambda: capture.stats().reopens >= 3)
    stats = capture.stats()
    assert stats.state is CaptureState.REOPENING
    assert stats.read_errors >= 1
    assert "no images" in (stats.last_error or "")
    delays = [r.fields["next_delay_s"] for r in messages(capture_log, "camera reopen failed")]
    assert delays[:3] == [0.04, 0.08, 0.1]  # doubling from initial_s, capped at max_s

    captured_while_down = stats.captured
    for name in names:
        copy_atomically(originals[name], tmp_path / name)
    assert wait_for(lambda: capture.stats().captured >= captured_while_down + 5)
    assert capture.stats().state is CaptureState.LIVE
    frame = capture.get(timeout=5.0)
    assert frame is not None and frame.seq >= captured_while_down
    assert messages(capture_log, "camera live")


def test_hung_read_is_stale_then_reopened(shared, captures, tmp_path, capture_log):
    for name in ("0001.bmp", "0002.bmp"):
        copy_atomically(shared(f"media/traffic_frames/{name}"), tmp_path / name)
    source = Scripted(ImageDirSource(tmp_path, fps=50, loop=True))
    capture = captures(source, stale_after_s=0.3)
    assert wait_for(lambda: capture.stats().captured >= 3)

    source.flowing.clear()  # the next read hangs, like a stream that stopped sending
    assert wait_for(lambda: capture.stats().state is CaptureState.STALE)
    for _ in range(5):
        assert capture.stats().state is CaptureState.STALE
    assert capture.stats().last_frame_age_s > 0.3
    assert len(messages(capture_log, "camera stale")) == 1

    captured_when_stale = capture.stats().captured
    source.flowing.set()
    assert wait_for(lambda: capture.stats().reopens >= 1)
    assert wait_for(lambda: capture.stats().captured > captured_when_stale + 3)
    stats = capture.stats()
    assert stats.state is CaptureState.LIVE
    assert source.opens == 2
    assert "no frame for" in (stats.last_error or "")
    assert len(messages(capture_log, "camera stale")) == 1


def test_a_read_that_never_returns_is_abandoned_and_the_camera_carries_on_with_a_fresh_source(captures,
                                                                                            capture_log):
    made: list[Scripted] = []

    def remake() -> Scripted:
        made.append(Scripted(TestPatternSource(width=64, height=48, fps=50), live=True))
        return made[-1]

    hanging = remake()
    capture = captures(hanging, stale_after_s=0.3, remake=remake)
    assert wait_for(lambda: capture.stats().captured >= 3)
    hanging.flowing.clear()  # a V4L2 or libcamera read that blocks for good
    assert wait_for(lambda: hanging.reads_started > hanging.reads)
    while capture.watch() and len(made) == 1:  # what liveness does on every poll
        time.sleep(0.02)
    assert len(made) == 2 and capture.watch()
    captured = capture.stats().captured
    assert wait_for(lambda: capture.stats().captured > captured + 5), "frames from the fresh source"
    assert capture.stats().state is CaptureState.LIVE and made[1].opens == 1
    assert messages(capture_log, "camera call blocked: thread abandoned, source made afresh")
    hanging.flowing.set()  # the old call returns at last: its thread ends and closes its own source
    assert wait_for(lambda: hanging.closed)
    assert not made[1].closed and capture.stats().captured > captured + 5


def test_a_read_that_never_returns_on_a_source_that_cannot_be_made_afresh_stops_liveness(captures, tmp_path):
    from types import SimpleNamespace

    from edge.config import SchedulerConfig
    from edge.schedule.liveness import Liveness

    hanging = Scripted(TestPatternSource(width=64, height=48, fps=50), live=True)
    capture = captures(hanging, stale_after_s=0.3)
    heartbeat = tmp_path / "heartbeat"
    liveness = Liveness([], SchedulerConfig(), heartbeat, [SimpleNamespace(capture=capture, cfg=SimpleNamespace(id="cam0"))])
    liveness.poll()
    assert liveness.alive and heartbeat.exists()
    hanging.flowing.clear()
    assert wait_for(lambda: (liveness.poll(), not liveness.alive)[1])
    heartbeat.unlink()
    liveness.poll(time.monotonic() + 60)
    assert not heartbeat.exists(), "no more pings: the supervisor restarts the daemon"
    hanging.flowing.set()


def test_live_source_returning_none_is_a_read_error(captures):
    source = Scripted(TestPatternSource(width=64, height=48, fps=100), live=True, none_on={3})
    capture = captures(source)

    assert wait_for(lambda: capture.stats().captured >= 6)
    stats = capture.stats()
    assert stats.read_errors == 1 and stats.reopens == 1
    assert "ended" in (stats.last_error or "")
    assert not capture.ended


def test_unexpected_error_fails_the_capture(captures):
    capture = captures(Broken(width=32, height=32, fps=100))

    assert wait_for(lambda: capture.ended)
    stats = capture.stats()
    assert stats.state is CaptureState.FAILED
    assert "boom" in (stats.last_error or "")
    assert capture.get(timeout=0.05) is None


# --- synthetic, Pi, GStreamer, USB, URL -----------------------------------------------------------


def test_pattern_frames_move_unless_still():
    moving = make_source(PatternSource(kind="pattern", width=160, height=120))
    moving.open()
    frames = [moving.read() for _ in range(5)]
    moving.close()
    assert all(f.shape == (120, 160, 3) and f.dtype == np.uint8 for f in frames)
    for a, b in zip(frames, frames[1:]):
        assert not np.array_equal(a[::8, ::8], b[::8, ::8])  # different even to the frozen check

    still = make_source(PatternSource(kind="pattern", width=160, height=120, still=True))
    still.open()
    frames = [still.read() for _ in range(5)]
    still.close()
    still.close()
    assert all(np.array_equal(frames[0], f) for f in frames[1:])
    assert still.paced and not still.live


@pytest.mark.skipif(importlib.util.find_spec("picamera2") is not None, reason="picamera2 is installed here")
def test_picamera2_off_a_pi_explains_how_to_install(captures):
    source = make_source(Picamera2Source(kind="picamera2"))
    with pytest.raises(SourceError) as info:
        source.open()
    message = str(info.value)
    assert "sudo apt install python3-picamera2" in message
    assert "--system-site-packages" in message
    # retrying cannot install a library: even though the camera is live, start() reports it
    capture = captures(source, start=False)
    with pytest.raises(SourceUnsupported):
        capture.start()
    assert not capture.is_alive()


def _has_gstreamer() -> bool:
    return any(
        line.split(":", 1)[0].strip() == "GStreamer" and "YES" in line
        for line in cv2.getBuildInformation().splitlines()
    )


@pytest.mark.skipif(_has_gstreamer(), reason="this OpenCV has GStreamer")
def test_gstreamer_without_support_says_so():
    source = make_source(GStreamerSource(kind="gstreamer", pipeline="videotestsrc ! videoconvert ! appsink"))
    with pytest.raises(SourceError, match="without GStreamer"):
        source.open()


def test_missing_usb_camera_names_the_device():
    source = make_source(UsbSource(kind="usb", device="/dev/video99"))
    assert isinstance(source, UsbCameraSource) and source.live
    with pytest.raises(SourceError, match="/dev/video99"):
        source.open()
    source.close()


def test_unreachable_stream_is_retried_and_never_leaks_credentials(captures, capture_log):
    url = f"rtsp://admin:hunter2@127.0.0.1:{free_port()}/stream"
    source = make_source(UrlSource(kind="url", url=url, open_timeout_s=2))
    assert "hunter2" not in source.description and "127.0.0.1" in source.description

    capture = captures(source)  # live: no exception, it keeps trying

    assert wait_for(lambda: capture.stats().reopens >= 2)
    stats = capture.stats()
    assert stats.state is CaptureState.REOPENING
    assert "cannot open stream" in (stats.last_error or "") and "hunter2" not in stats.last_error
    assert all("hunter2" not in str(r.fields) for r in capture_log)


class MjpegServer:
    """A real MJPEG-over-HTTP camera on localhost that can stop sending on cue."""

    def __init__(self, image: np.ndarray):
        self.stalled = threading.Event()
        self.closing = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                n = 0
                try:
                    while not server.closing.is_set():
                        if server.stalled.is_set():  # connected but silent, like a hung camera
                            time.sleep(0.02)
                            continue
                        frame = image.copy()
                        cv2.putText(frame, str(n), (4, 100), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (0, 0, 255), 2)
                        data = cv2.imencode(".jpg", frame)[1].tobytes()
                        head = b"--frame\r\nContent-Type: image/jpeg\r\n"
                        head += b"Content-Length: %d\r\n\r\n" % len(data)
                        self.wfile.write(head + data + b"\r\n")
                        n += 1
                        time.sleep(0.02)
                except OSError:  # the client hung up
                    pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.closing.set()
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture
def mjpeg_server(shared) -> Iterator[MjpegServer]:
    server = MjpegServer(small_image(shared))
    yield server
    server.close()


def test_hung_stream_times_out_goes_stale_and_recovers(mjpeg_server, captures, capture_log):
    url = f"http://viewer:hunter2@127.0.0.1:{mjpeg_server.port}/stream.mjpg"
    capture = captures(UrlSource(kind="url", url=url, open_timeout_s=1), stale_after_s=0.5)
    assert wait_for(lambda: capture.stats().captured >= 5)
    frame = capture.get(timeout=5.0)
    assert frame is not None and frame.image.shape == (120, 160, 3)
    assert capture.stats().state is CaptureState.LIVE

    mjpeg_server.stalled.set()
    assert wait_for(lambda: capture.stats().state is CaptureState.STALE)  # the read is still hanging
    assert wait_for(lambda: capture.stats().read_errors >= 1)  # the read timeout made it return
    assert wait_for(lambda: capture.stats().state is CaptureState.REOPENING)

    captured = capture.stats().captured
    mjpeg_server.stalled.clear()
    assert wait_for(lambda: capture.stats().captured >= captured + 5)
    stats = capture.stats()
    assert stats.state is CaptureState.LIVE and stats.reopens >= 1
    assert "hunter2" not in (stats.last_error or "")
    assert len(messages(capture_log, "camera stale")) == 1
    assert all("hunter2" not in str(r.fields) for r in capture_log)


def test_redact_strips_credentials():
    assert redact("rtsp://u:p@cam.local:554/s?x=1") == "rtsp://cam.local:554/s?x=1"
    assert redact("http://cam/mjpg") == "http://cam/mjpg"
    pipeline = "rtspsrc location=rtsp://u:p@10.0.0.2/s user-id=admin user-pw=secret ! appsink"
    assert redact(pipeline) == "rtspsrc location=rtsp://10.0.0.2/s user-id=*** user-pw=*** ! appsink"


# --- stopping ------------------------------------------------------------------------------------


def test_stop_while_waiting_on_back_pressure(shared, captures):
    capture = captures(VideoSource(kind="video", path=shared("media/pedestrians-360p10.avi"), pace="fast"))
    assert wait_for(lambda: capture.stats().captured == 1)  # frame 1 is read ahead, waiting for room

    capture.stop()

    assert not capture.is_alive()
    assert capture.ended and capture.get(timeout=0.05) is None
    assert capture.stats().captured == 1
    with pytest.raises(SourceError, match="not open"):
        capture.source.read()  # the thread closed the source on its way out


def test_stop_while_waiting_on_backoff(captures, tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    files = captures(ImagesSource(kind="images", path=tmp_path), backoff=SLOW_BACKOFF)
    stream = captures(UrlSource(kind="url", url=f"http://127.0.0.1:{free_port()}/mjpg"), backoff=SLOW_BACKOFF)
    assert wait_for(lambda: files.stats().state is CaptureState.REOPENING)
    assert stream.stats().state is CaptureState.REOPENING

    files.stop()
    stream.stop()

    assert not files.is_alive() and not stream.is_alive()
    assert files.stats().read_errors == 1 and files.stats().reopens == 0
