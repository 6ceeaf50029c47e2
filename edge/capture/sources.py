"""Capture sources: one small interface over every way a camera frame can arrive.

A :class:`Source` is opened, read frame by frame and closed by exactly one thread
(the camera's capture thread). Frames are always BGR ``uint8`` arrays of shape
``(H, W, 3)``. ``read()`` returns ``None`` at the end of a finite source and raises
:class:`SourceError` when a read fails; the capture thread decides what to do about it.

File sources (video, images) remember how far they got, so closing and reopening
one after an error resumes with the next frame instead of starting over.
"""

from __future__ import annotations

import bisect
import re
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import cv2
import numpy as np

from edge.config import (
    GStreamerSource,
    ImagesSource,
    PatternSource,
    Picamera2Source,
    UrlSource,
    UsbSource,
    VideoSource,
)
from edge.core.errors import SourceError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")

PICAMERA2_HINT = (
    "picamera2 is not installed: on Raspberry Pi OS run `sudo apt install python3-picamera2` "
    "and create the virtualenv with --system-site-packages"
)


class SourceUnsupported(SourceError):
    """This host cannot run this kind of source at all (a library or backend is missing).

    Retrying cannot help, so the capture thread reports it at start even for live sources.
    """


@runtime_checkable
class Source(Protocol):
    """What the capture thread needs from a camera, file or stream."""

    description: str  # for logs; never contains credentials
    live: bool  # a camera or stream: failing to open is retried, not fatal
    paced: bool  # the capture thread sleeps to `fps` between reads
    fps: float | None  # nominal rate, known after open()

    def open(self) -> None:
        """Open the source or raise SourceError with a one-line message."""
        ...

    def read(self) -> np.ndarray | None:
        """The next BGR uint8 HxWx3 frame; None at the end; SourceError on a failed read."""
        ...

    def close(self) -> None:
        """Release the source; safe to call more than once."""
        ...


# --- helpers ---------------------------------------------------------------------------


def to_bgr(image: np.ndarray) -> np.ndarray:
    """Convert a grey, grey+alpha or BGRA frame (8 or 16 bit) to 3-channel BGR uint8."""
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise SourceError(f"unsupported frame type {image.dtype} (expected 8 or 16 bit)")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.ndim == 3:
        channels = image.shape[2]
        if channels == 3:
            return image
        if channels == 1:
            return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        if channels == 2:  # grey + alpha
            return cv2.cvtColor(np.ascontiguousarray(image[:, :, 0]), cv2.COLOR_GRAY2BGR)
        if channels == 4:
            return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    raise SourceError(f"unsupported frame shape {image.shape}")


_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]*@")
_PIPELINE_SECRET = re.compile(r"\b(?P<key>user-id|user-pw|passwd|password)=(?:\"[^\"]*\"|'[^']*'|\S+)")


def redact(text: str) -> str:
    """Remove ``user:pass@`` from URLs and password properties from a pipeline string."""
    text = _URL_USERINFO.sub(r"\g<scheme>", text)
    return _PIPELINE_SECRET.sub(r"\g<key>=***", text)


def _valid_fps(value: float) -> bool:
    return value > 0 and value == value and value != float("inf")  # rejects 0, NaN, inf


def _opencv_has_gstreamer() -> bool:
    for line in cv2.getBuildInformation().splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "GStreamer":
            return value.strip().upper().startswith("YES")
    return False


# --- files -----------------------------------------------------------------------------


class VideoFileSource:
    """A video file through OpenCV; native pace uses the file's (or the configured) fps."""

    live = False

    def __init__(self, path: Path, *, pace: str = "native", loop: bool = False, fps: float | None = None,
                 decoder_threads: int = 1):
        self.path = Path(path)
        self.decoder_threads = decoder_threads
        self.loop = loop
        self.paced = pace == "native"
        self.description = f"video {self.path}"
        self.fps: float | None = fps
        self._fps_override = fps
        self._cap: cv2.VideoCapture | None = None
        self._pending: np.ndarray | None = None
        self._position = 0  # frames delivered in the current pass, to resume after a reopen

    def open(self) -> None:
        """Open the file; the first frame is decoded now so a bad file fails here, not later."""
        self.close()
        if not self.path.is_file():
            raise SourceError(f"cannot open video '{self.path}': no such file")
        self._cap = self._new_capture()
        if self._position:
            self._skip(self._position)
        else:
            first = self._read_raw()
            if first is None:
                self.close()
                raise SourceError(f"cannot open video '{self.path}': no frame could be decoded")
            self._pending = first
        native = float(self._cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self.fps = self._fps_override or (native if _valid_fps(native) else None)
        if self.paced and self.fps is None:
            self.close()
            raise SourceError(
                f"video '{self.path}' does not report a frame rate: set `fps` in its source config "
                "or use `pace: fast`"
            )

    def read(self) -> np.ndarray | None:
        """The next frame; at the end, rewinds when looping, else returns None."""
        if self._cap is None:
            raise SourceError(f"{self.description} is not open")
        if self._pending is not None:
            image, self._pending = self._pending, None
        else:
            image = self._read_raw()
        if image is None:
            if not self.loop:
                return None
            image = self._rewind()
        self._position += 1
        return to_bgr(image)

    def close(self) -> None:
        """Release the decoder (idempotent); the read position is kept for a reopen."""
        cap, self._cap, self._pending = self._cap, None, None
        if cap is not None:
            cap.release()

    def _new_capture(self) -> cv2.VideoCapture:
        cap = cv2.VideoCapture(str(self.path), cv2.CAP_ANY, [cv2.CAP_PROP_N_THREADS, self.decoder_threads])
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"cannot open video '{self.path}': not a video OpenCV can decode")
        return cap

    def _read_raw(self) -> np.ndarray | None:
        assert self._cap is not None
        try:
            ok, image = self._cap.read()
        except cv2.error as exc:
            raise SourceError(f"cannot decode video '{self.path}': {exc}") from None
        return image if ok and image is not None else None

    def _skip(self, count: int) -> None:
        # grab() decodes forward exactly; seeking by CAP_PROP_POS_FRAMES lands on keyframes
        assert self._cap is not None
        for _ in range(count):
            if not self._cap.grab():
                break

    def _rewind(self) -> np.ndarray:
        # reopening is more reliable than seeking to 0 across containers and codecs
        assert self._cap is not None
        self._cap.release()
        self._cap = self._new_capture()
        self._position = 0
        image = self._read_raw()
        if image is None:
            raise SourceError(f"video '{self.path}' yields no frame after rewinding")
        return image


class ImageDirSource:
    """Still images in a directory, in name order; paced only when ``fps`` is set."""

    live = False

    def __init__(self, path: Path, *, fps: float | None = None, loop: bool = False):
        self.path = Path(path)
        self.fps = fps
        self.paced = fps is not None
        self.loop = loop
        self.description = f"images {self.path}"
        self._files: list[Path] = []
        self._next = 0
        self._last_name: str | None = None  # survives close() so a reopen resumes after it
        self._open = False

    def open(self) -> None:
        """List the images; fail if there are none."""
        if not self.path.is_dir():
            raise SourceError(f"cannot open image directory '{self.path}': no such directory")
        try:
            files = sorted(
                (p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                key=lambda p: p.name,
            )
        except OSError as exc:
            raise SourceError(f"cannot list image directory '{self.path}': {exc.strerror or exc}") from None
        if not files:
            kinds = ", ".join(f"*{s}" for s in IMAGE_SUFFIXES)
            raise SourceError(f"no images ({kinds}) in '{self.path}'")
        self._files = files
        names = [p.name for p in files]
        self._next = 0 if self._last_name is None else bisect.bisect_right(names, self._last_name)
        if self._next >= len(files) and self.loop:
            self._next = 0
        self._open = True

    def read(self) -> np.ndarray | None:
        """Decode the next image; an unreadable one raises SourceError (and is skipped on reopen)."""
        if not self._open:
            raise SourceError(f"{self.description} is not open")
        if self._next >= len(self._files):
            if not self.loop:
                return None
            self._next = 0
        path = self._files[self._next]
        self._next += 1
        self._last_name = path.name
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise SourceError(f"cannot read image '{path}': {exc.strerror or exc}") from None
        # imdecode rather than imread: a clear error of our own instead of OpenCV's stderr warning
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise SourceError(f"cannot decode image '{path}': not a valid image")
        return to_bgr(image)

    def close(self) -> None:
        """Forget the listing (idempotent); the position is kept for a reopen."""
        self._open = False
        self._files = []


# --- cameras and streams through cv2.VideoCapture ----------------------------------------


class _CvLiveSource:
    """Shared read/close for live sources backed by cv2.VideoCapture."""

    live = True
    paced = False

    def __init__(self, description: str, fps: float | None = None):
        self.description = description
        self.fps: float | None = fps
        self._configured_fps = fps
        self._cap: cv2.VideoCapture | None = None

    def read(self) -> np.ndarray | None:
        """The next frame the device or stream delivers; SourceError if none came."""
        if self._cap is None:
            raise SourceError(f"{self.description} is not open")
        try:
            ok, image = self._cap.read()
        except cv2.error as exc:
            raise SourceError(f"read failed on {self.description}: {exc}") from None
        if not ok or image is None:
            raise SourceError(f"no frame from {self.description}{self._read_failure_hint()}")
        return to_bgr(image)

    def close(self) -> None:
        """Release the capture (idempotent)."""
        cap, self._cap = self._cap, None
        if cap is not None:
            cap.release()

    def _read_failure_hint(self) -> str:
        return ""

    def _adopt(self, cap: cv2.VideoCapture, failure: str) -> None:
        if not cap.isOpened():
            cap.release()
            raise SourceError(failure)
        self._cap = cap
        reported = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self.fps = reported if _valid_fps(reported) else self._configured_fps


class UsbCameraSource(_CvLiveSource):
    """A V4L2 camera by index or device path, with optional format/size/rate requests."""

    def __init__(
        self,
        device: int | str = 0,
        *,
        width: int | None = None,
        height: int | None = None,
        fps: float | None = None,
        fourcc: str | None = None,
    ):
        if isinstance(device, str) and device.isdigit():
            device = int(device)
        self.device = device
        self.width, self.height, self.fourcc = width, height, fourcc
        super().__init__(f"usb {device}", fps)

    def open(self) -> None:
        """Open the device and ask for the configured format; the driver may round them."""
        self.close()
        try:
            cap = cv2.VideoCapture(self.device, cv2.CAP_V4L2)
        except cv2.error as exc:
            raise SourceError(f"cannot open USB camera {self.device}: {exc}") from None
        self._adopt(cap, f"cannot open USB camera {self.device}: no such device, or busy, or no permission")
        assert self._cap is not None
        # the pixel format must be chosen before the size, or V4L2 may reject the size
        if self.fourcc:
            self._cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*self.fourcc))
        if self.width:
            self._cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.width)
        if self.height:
            self._cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.height)
        if self._configured_fps:
            self._cap.set(cv2.CAP_PROP_FPS, self._configured_fps)
        reported = float(self._cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self.fps = reported if _valid_fps(reported) else self._configured_fps

    def _read_failure_hint(self) -> str:
        return " (unplugged or in use?)"


class UrlStreamSource(_CvLiveSource):
    """An RTSP/HTTP/... stream through OpenCV's FFmpeg backend, with open and read timeouts."""

    def __init__(self, url: str, *, open_timeout_s: float = 10.0, decoder_threads: int = 1):
        self.url = url
        self.open_timeout_s = open_timeout_s
        self.decoder_threads = decoder_threads
        super().__init__(f"url {redact(url)}")

    def open(self) -> None:
        """Connect; gives up after open_timeout_s instead of hanging."""
        self.close()
        timeout_ms = int(self.open_timeout_s * 1000)
        # the same bound on reads, so a stream that stops sending makes read() return
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, timeout_ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, timeout_ms,
                  cv2.CAP_PROP_N_THREADS, self.decoder_threads]
        try:
            cap = cv2.VideoCapture(self.url, cv2.CAP_FFMPEG, params)
        except cv2.error as exc:
            raise SourceError(f"cannot open stream {redact(self.url)}: {redact(str(exc))}") from None
        self._adopt(
            cap,
            f"cannot open stream {redact(self.url)}: refused, unreachable, timed out after "
            f"{self.open_timeout_s:g} s, or not a stream FFmpeg can decode",
        )

    def _read_failure_hint(self) -> str:
        return f" (stream ended or nothing for {self.open_timeout_s:g} s)"


class GStreamerPipelineSource(_CvLiveSource):
    """A GStreamer pipeline ending in appsink, through OpenCV's GStreamer backend."""

    def __init__(self, pipeline: str):
        self.pipeline = pipeline
        super().__init__(f"gstreamer {redact(pipeline)}")

    def open(self) -> None:
        """Start the pipeline; fails clearly when OpenCV has no GStreamer support."""
        self.close()
        if not _opencv_has_gstreamer():
            raise SourceUnsupported(
                "this OpenCV was built without GStreamer support (cv2.getBuildInformation() "
                "shows GStreamer: NO); install an OpenCV built with GStreamer, e.g. the "
                "system python3-opencv with a --system-site-packages virtualenv"
            )
        try:
            cap = cv2.VideoCapture(self.pipeline, cv2.CAP_GSTREAMER)
        except cv2.error as exc:
            raise SourceError(f"cannot start GStreamer pipeline: {redact(str(exc))}") from None
        self._adopt(cap, f"cannot start GStreamer pipeline '{redact(self.pipeline)}'")


# --- Raspberry Pi camera ------------------------------------------------------------------


class Picamera2CameraSource:
    """A Raspberry Pi camera through picamera2 (imported only when opened).

    When the scheduler asks for it (:meth:`request_lores`), the camera is configured with
    a second, low-resolution stream that the ISP scales to the model's input size, in
    the same request as the full frame: the model is fed from it (``lores``, one colour
    conversion, no resize on the CPU) while the full frame stays for snapshots and the
    picture's quality measures.
    """

    live = True
    paced = False

    def __init__(self, camera: int = 0, *, width: int = 1280, height: int = 720, fps: float = 30.0,
                 lores: bool = True):
        self.camera = camera
        self.size = (width, height)
        self.fps: float | None = fps
        self.description = f"picamera2 camera {camera} {width}x{height}@{fps:g}"
        self.want_lores = lores
        self.lores: np.ndarray | None = None  # the last read's low-resolution copy, BGR
        self._lores_for: Callable[[int, int], tuple[int, int]] | None = None
        self._lores_size: tuple[int, int] | None = None
        self._cam: Any = None

    def request_lores(self, size_for: Callable[[int, int], tuple[int, int]]) -> None:
        """From the next open on, also stream ``size_for(width, height)`` (the model's scaled size)."""
        if self.want_lores:
            self._lores_for = size_for

    def open(self) -> None:
        """Configure and start the camera for video-rate RGB888 capture (and YUV420 lores)."""
        self.close()
        try:
            from picamera2 import Picamera2  # type: ignore[import-not-found]
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.split(".")[0] == "picamera2":
                raise SourceUnsupported(PICAMERA2_HINT) from None
            raise SourceUnsupported(f"picamera2 cannot be imported ({exc}); {PICAMERA2_HINT}") from None
        except ImportError as exc:
            raise SourceUnsupported(f"picamera2 cannot be imported ({exc}); {PICAMERA2_HINT}") from None
        lores = None
        if self._lores_for is not None:
            w, h = self._lores_for(*self.size)
            # YUV420 is the one lores format every Pi's ISP gives; its sizes must be even
            lores = {"size": (min(w + w % 2, self.size[0]), min(h + h % 2, self.size[1])), "format": "YUV420"}
        cam = None
        try:
            cam = Picamera2(self.camera)
            config = cam.create_video_configuration(
                main={"size": self.size, "format": "RGB888"}, lores=lores, controls={"FrameRate": self.fps})
            cam.configure(config)
            cam.start()
            self._lores_size = tuple(cam.camera_config["lores"]["size"]) if lores else None
        except Exception as exc:  # picamera2/libcamera raise a variety of types
            if cam is not None:
                _quietly(cam.close)
            raise SourceError(f"cannot start Pi camera {self.camera}: {exc}") from None
        self._cam = cam

    def read(self) -> np.ndarray | None:
        """The next frame; picamera2's "RGB888" is already B,G,R byte order, as OpenCV wants."""
        if self._cam is None:
            raise SourceError(f"{self.description} is not open")
        try:
            if self._lores_size is None:
                return to_bgr(np.asarray(self._cam.capture_array("main")))
            (image, small), _ = self._cam.capture_arrays(["main", "lores"])
        except Exception as exc:
            raise SourceError(f"capture failed on Pi camera {self.camera}: {exc}") from None
        w, h = self._lores_size
        # rows of the YUV420 array may be padded to the ISP's stride: convert, then crop
        self.lores = cv2.cvtColor(np.asarray(small), cv2.COLOR_YUV2BGR_I420)[:h, :w]
        return to_bgr(np.asarray(image))

    def close(self) -> None:
        """Stop and release the camera (idempotent)."""
        cam, self._cam, self.lores = self._cam, None, None
        if cam is not None:
            _quietly(cam.stop)
            _quietly(cam.close)


def _quietly(call: Any) -> None:
    # closing a camera that is already half gone must not hide the error that got us here
    try:
        call()
    except Exception:
        pass


# --- synthetic -------------------------------------------------------------------------------


class TestPatternSource:
    """A synthetic feed: a moving bar and a frame counter, or one repeated frame if ``still``."""

    __test__ = False  # not a pytest test class despite the name
    live = False
    paced = True

    def __init__(self, *, width: int = 640, height: int = 480, fps: float = 30.0, still: bool = False):
        self.width, self.height, self.still = width, height, still
        self.fps: float | None = fps
        self.description = f"pattern {width}x{height}@{fps:g}" + (" still" if still else "")
        self._background: np.ndarray | None = None
        self._still_frame: np.ndarray | None = None
        self._count = 0

    def open(self) -> None:
        """Draw the static background once."""
        ramp = np.linspace(40, 200, self.width, dtype=np.float32).astype(np.uint8)
        bg = np.empty((self.height, self.width, 3), np.uint8)
        bg[:, :, 0] = ramp
        bg[:, :, 1] = ramp[::-1]
        bg[:, :, 2] = 96
        self._background = bg
        self._still_frame = self._render(0) if self.still else None

    def read(self) -> np.ndarray | None:
        """The next frame; never ends."""
        if self._background is None:
            raise SourceError(f"{self.description} is not open")
        if self._still_frame is not None:
            return self._still_frame.copy()  # a copy: consumers may draw on what they get
        self._count += 1
        return self._render(self._count)

    def close(self) -> None:
        """Drop the buffers (idempotent)."""
        self._background = None
        self._still_frame = None

    def _render(self, n: int) -> np.ndarray:
        assert self._background is not None
        image = self._background.copy()
        # at least 8 px wide and moving 8 px per frame, so a stride-8 subsample always sees it move
        bar = max(8, self.width // 16)
        x = (n * max(8, self.width // 64)) % (self.width + bar) - bar
        cv2.rectangle(image, (x, 0), (x + bar, self.height - 1), (255, 255, 255), thickness=-1)
        scale = max(0.5, self.height / 240)
        cv2.putText(
            image, f"{n:06d}", (8, int(30 * scale)), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0),
            max(1, int(2 * scale)), cv2.LINE_AA,
        )
        return image


# --- factory ---------------------------------------------------------------------------------


def make_source(cfg: Any) -> Source:
    """Build (but do not open) the source described by a source config model."""
    if isinstance(cfg, VideoSource):
        return VideoFileSource(cfg.path, pace=cfg.pace, loop=cfg.loop, fps=cfg.fps, decoder_threads=cfg.decoder_threads)
    if isinstance(cfg, ImagesSource):
        return ImageDirSource(cfg.path, fps=cfg.fps, loop=cfg.loop)
    if isinstance(cfg, UsbSource):
        return UsbCameraSource(cfg.device, width=cfg.width, height=cfg.height, fps=cfg.fps, fourcc=cfg.fourcc)
    if isinstance(cfg, UrlSource):
        return UrlStreamSource(cfg.url, open_timeout_s=cfg.open_timeout_s, decoder_threads=cfg.decoder_threads)
    if isinstance(cfg, GStreamerSource):
        return GStreamerPipelineSource(cfg.pipeline)
    if isinstance(cfg, Picamera2Source):
        return Picamera2CameraSource(cfg.camera, width=cfg.width, height=cfg.height, fps=cfg.fps, lores=cfg.lores)
    if isinstance(cfg, PatternSource):
        return TestPatternSource(width=cfg.width, height=cfg.height, fps=cfg.fps, still=cfg.still)
    raise SourceError(f"unknown source config {type(cfg).__name__}")
