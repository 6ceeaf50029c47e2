"""One capture thread per camera; the consumer always gets the newest frame.

The thread hands frames over through a one-slot mailbox, never a queue: a frame
nobody took yet is replaced by a newer one and counted as *superseded*, so a slow
model works on fresh frames instead of an ever older backlog. Three pacing modes:

* paced sources (a video at native pace, images with ``fps``, the test pattern) are
  read on a fixed schedule and the newest frame wins;
* other finite sources (a video at ``pace: fast``, images without ``fps``) apply
  back-pressure: the next frame waits until the consumer took the previous one, so
  a file is processed frame by frame, as fast as the consumer goes;
* live sources are read as fast as they deliver; the newest frame wins.

The thread watches its source: no frame for ``stale_after_s`` (STALE), identical
frames for ``frozen_after_s`` (FROZEN) or a failed read makes it close and reopen
the source, with exponential backoff while reopening fails.

A read (or an open) that never returns cannot be interrupted: the owner's polling of
:meth:`CaptureThread.watch` (liveness does it) abandons that thread once the call has
blocked for ``stale_after_s`` and starts a new one on a fresh source; the old thread
ends, closing its own source, if the call ever returns. A camera that cannot be made
afresh, or whose fresh sources block as well, is *stuck*: liveness stops the watchdog
pings so the service manager restarts the daemon.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from enum import Enum
from typing import Callable

import numpy as np

from edge.config import Backoff
from edge.core.errors import SourceError
from edge.core.logs import fields

from .sources import Source, SourceUnsupported

log = logging.getLogger(__name__)

MAX_ABANDONED = 2  # threads left blocked in a source call; past this the camera is stuck
# Frozen detection compares every 8th pixel in each direction: cheap, and sensor
# noise still makes consecutive frames of a live, still scene differ somewhere.
_FROZEN_STRIDE = 8


@dataclass(frozen=True, slots=True)
class Frame:
    """One captured frame and when it arrived."""

    camera: str
    seq: int  # 0-based count of frames this capture delivered (monotonic across reopens)
    image: np.ndarray  # BGR uint8 HxWx3
    captured_at: float  # time.time() when read returned
    captured_mono: float  # time.monotonic() when read returned (for ages)


class CaptureState(str, Enum):
    STARTING = "starting"  # opened, no frame yet
    LIVE = "live"
    STALE = "stale"  # a read has been waiting longer than stale_after_s
    FROZEN = "frozen"  # frames identical for frozen_after_s
    REOPENING = "reopening"  # closed after a failure, waiting to (re)open
    ENDED = "ended"  # a finite source is done and its last frame was taken, or stopped
    FAILED = "failed"  # the thread died on an unexpected error


@dataclass(frozen=True)
class CaptureStats:
    """A consistent snapshot of one capture thread's counters."""

    camera: str
    state: CaptureState
    captured: int  # frames put in the slot
    superseded: int  # frames replaced before anyone took them
    taken: int  # frames returned by get()
    reopens: int  # open attempts after the first
    read_errors: int
    last_frame_age_s: float | None
    last_error: str | None


class _Pacer:
    """Schedules reads at t0 + n/fps; when behind it restarts the schedule instead of bursting."""

    def __init__(self) -> None:
        self._period: float | None = None
        self._due: float | None = None

    def reset(self, fps: float | None) -> None:
        self._period = 1.0 / fps if fps else None
        self._due = None

    def wait_s(self) -> float:
        if self._period is None:
            return 0.0
        now = time.monotonic()
        if self._due is None:
            self._due = now
        return max(0.0, self._due - now)

    def advance(self) -> None:
        if self._period is None or self._due is None:
            return
        self._due += self._period
        now = time.monotonic()
        if self._due < now:
            self._due = now


class CaptureThread:
    """Reads one source on a daemon thread and offers its newest frame through ``get``."""

    def __init__(
        self,
        camera: str,
        source: Source,
        *,
        stale_after_s: float,
        frozen_after_s: float,
        backoff: Backoff,
        clock: Callable[[], float] = time.monotonic,
        on_frame: Callable[[], None] | None = None,
        on_image: Callable[[np.ndarray, float, float], None] | None = None,
        remake: Callable[[], Source] | None = None,
    ) -> None:
        """``clock`` times ages (stale, frozen, last_frame_age_s); sleeps always use real time.

        ``on_frame`` is called on the capture thread after each new frame, so one
        consumer can wait on several cameras at once. ``on_image(image, captured_at,
        captured_mono)`` sees each frame on the capture thread before any consumer can
        (the picture's quality is watched whatever the inference load). ``remake`` makes a
        fresh, unopened source like ``source``, for when a call into the old one never returns.
        """
        self.camera = camera
        self.source = source
        self._on_frame = on_frame
        self._on_image = on_image
        self._stale_after_s = stale_after_s
        self._frozen_after_s = frozen_after_s
        self._backoff = backoff
        self._clock = clock
        self._remake = remake
        self._back_pressure = not source.live and not source.paced

        self._cond = threading.Condition()  # guards everything below
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._slot: Frame | None = None
        self._waiting_since = 0.0  # captured_mono of the first frame put since the slot was emptied
        self._state = CaptureState.STARTING
        self._eof = False
        self._failed = False
        self._captured = 0
        self._superseded = 0
        self._taken = 0
        self._reopens = 0
        self._read_errors = 0
        self._last_error: str | None = None
        self._last_frame_clock: float | None = None
        self._reading_since: float | None = None
        self._stale_logged = False
        self._delay = backoff.initial_s
        self._generation = 0  # the thread of this generation owns self.source; older ones were abandoned
        self._abandoned: list[threading.Thread] = []
        self._abandons = 0
        self._stuck = False

        # only the capture thread touches these
        self._frozen = False
        self._prev_sample: np.ndarray | None = None
        self._sample_since = 0.0

    # --- the consumer's side ---------------------------------------------------------------

    def start(self) -> None:
        """Open the source and start the thread.

        A finite source that cannot be opened raises SourceError, as does a source this
        host cannot run at all (SourceUnsupported); a live camera or stream that is not
        there yet starts in REOPENING and keeps retrying with backoff.
        """
        if self._thread is not None:
            raise RuntimeError(f"capture for {self.camera} already started")
        opened = True
        try:
            self.source.open()
        except SourceUnsupported:
            self.source.close()
            raise
        except SourceError as exc:
            self.source.close()
            if not self.source.live:
                raise
            opened = False
            with self._cond:
                self._last_error = str(exc)
                self._state = CaptureState.REOPENING
        self._thread = threading.Thread(
            target=self._run, args=(opened, 0), name=f"capture-{self.camera}", daemon=True
        )
        self._thread.start()

    def watch(self) -> bool:
        """Abandon a source call blocked past ``stale_after_s`` and carry on with a fresh
        source; False once the camera is stuck (nothing left to try). Polled by liveness."""
        with self._cond:
            since = self._reading_since
            if self._stop.is_set() or since is None or self._clock() - since <= self._stale_after_s:
                return not self._stuck
            self._abandoned = [t for t in self._abandoned if t.is_alive()]
            first = False
            if self._remake is None or len(self._abandoned) >= MAX_ABANDONED:
                first, self._stuck = not self._stuck, True
            else:
                self._generation += 1
                generation = self._generation
                self._abandoned.append(self._thread)
                self._abandons += 1
                self._reading_since = None
                self._state = CaptureState.REOPENING
                self._last_error = f"a source call blocked for over {self._stale_after_s:g} s"
        if self._stuck:
            if first:
                log.error("camera stuck: a source call never returns and the source cannot be made afresh",
                          extra=fields(camera=self.camera, source=self.source.description,
                                       abandoned=len(self._abandoned)))
            return False
        log.warning("camera call blocked: thread abandoned, source made afresh",
                    extra=fields(camera=self.camera, source=self.source.description,
                                 blocked_s=round(self._clock() - since, 3), abandons=self._abandons))
        try:
            fresh = self._remake()
        except Exception:  # nothing to carry on with: stuck
            log.exception("camera source cannot be made afresh", extra=fields(camera=self.camera))
            with self._cond:
                self._stuck = True
            return False
        with self._cond:
            self.source = fresh
        self._thread = threading.Thread(target=self._run, args=(False, generation),
                                        name=f"capture-{self.camera}", daemon=True)
        self._thread.start()
        return True

    def get(self, timeout: float) -> Frame | None:
        """The newest frame not yet taken, waiting up to ``timeout`` s; None on timeout or once ended."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._slot is None:
                if self._stop.is_set() or self._eof or self._failed:
                    return None
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)
            if self._stop.is_set():
                return None
            frame, self._slot = self._slot, None
            self._taken += 1
            self._cond.notify_all()  # the thread may be waiting for the slot to empty
            return frame

    @property
    def on_demand(self) -> bool:
        """Frames are read as they are taken (a file at fast pace): none is ever late."""
        return self._back_pressure

    def peek(self) -> float | None:
        """When the oldest frame not yet served arrived (superseded ones count), or None.

        The waiting frame itself is newer when others were superseded; this is how
        long the camera has been waiting, which is what a fair scheduler must see.
        """
        with self._cond:
            return None if self._slot is None else self._waiting_since

    @property
    def ended(self) -> bool:
        """No frame will ever come: the source ended and its last frame was taken, the
        thread failed, or stop() was called."""
        with self._cond:
            return self._stop.is_set() or ((self._eof or self._failed) and self._slot is None)

    def is_alive(self) -> bool:
        """Whether the capture thread is still running."""
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> CaptureStats:
        """A snapshot of the state and counters; a read hanging past stale_after_s shows STALE."""
        log_stale = False
        with self._cond:
            now = self._clock()
            state = self._state
            if self._failed:
                state = CaptureState.FAILED
            elif self._stop.is_set() or (self._eof and self._slot is None):
                state = CaptureState.ENDED
            elif self._reading_since is not None and now - self._reading_since > self._stale_after_s:
                state = CaptureState.STALE
                log_stale, self._stale_logged = not self._stale_logged, True
            age = None if self._last_frame_clock is None else now - self._last_frame_clock
            stats = CaptureStats(
                camera=self.camera,
                state=state,
                captured=self._captured,
                superseded=self._superseded,
                taken=self._taken,
                reopens=self._reopens,
                read_errors=self._read_errors,
                last_frame_age_s=age,
                last_error=self._last_error,
            )
        if log_stale:
            self._log_stale(age)
        return stats

    def request_stop(self) -> None:
        """Ask the thread to stop without waiting, so several captures wind down together."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the thread, wait up to ``timeout`` s for it, and close the source."""
        self.request_stop()
        thread = self._thread
        if thread is None:
            self.source.close()
            return
        thread.join(timeout)
        if thread.is_alive():
            # Stuck inside the source's read: closing the source under it could crash the
            # decoder, so leave the (daemon) thread to close it when the read returns.
            log.warning(
                "capture thread did not stop in time",
                extra=fields(camera=self.camera, source=self.source.description, timeout_s=timeout),
            )

    # --- the capture thread ------------------------------------------------------------------

    def _run(self, opened: bool, generation: int) -> None:
        source = self.source
        try:
            cause = "blocked" if generation else "open failed"
            if opened or self._reopen(cause, self._last_error, generation):
                self._capture_loop(generation)
        except Exception as exc:  # a bug or an unexpected library error: report, don't hang the consumer
            if self._current(generation):
                log.exception(
                    "capture thread failed", extra=fields(camera=self.camera, source=source.description)
                )
                with self._cond:
                    self._failed = True
                    self._last_error = f"{type(exc).__name__}: {exc}"
        finally:
            if self._current(generation):
                self._close_source()
            else:  # abandoned: the source it blocked in is its own to close
                _close_quietly(source, self.camera)
            with self._cond:
                self._cond.notify_all()

    def _current(self, generation: int) -> bool:
        with self._cond:
            return generation == self._generation

    def _blocking(self, generation: int) -> Source | None:
        """Mark a source call as started (watch() times it); the source to call, or None if
        this thread was abandoned meanwhile."""
        with self._cond:
            if generation != self._generation:
                return None
            self._reading_since = self._clock()
            return self.source

    def _returned(self, generation: int) -> bool:
        """Mark the source call as done; False if this thread was abandoned while in it."""
        with self._cond:
            if generation != self._generation:
                return False
            self._reading_since = None
            return True

    def _capture_loop(self, generation: int) -> None:
        pacer = _Pacer()
        pacer.reset(self.source.fps if self.source.paced else None)
        while not self._stop.is_set():
            if self._stop.wait(pacer.wait_s()):
                return
            source = self._blocking(generation)
            if source is None:
                return
            started = self._clock()
            try:
                image, error = source.read(), None
            except SourceError as exc:
                image, error = None, str(exc)
            finally:
                wall, mono, now = time.time(), time.monotonic(), self._clock()
                current = self._returned(generation)
            if self._stop.is_set() or not current:
                return

            if error is None and image is None and self.source.live:
                error = f"{self.source.description} ended"
            if error is not None:
                with self._cond:
                    self._read_errors += 1
                    self._last_error = error
            cause = None if error is None else "read error"
            if now - started > self._stale_after_s:
                # the read hung; whatever it finally returned is old news, start afresh
                error = error or f"no frame for {now - started:.1f} s"
                self._mark_stale(error, now - started)
                cause = "stale"
            if cause is not None:
                if not self._reopen(cause, error, generation):
                    return
                pacer.reset(self.source.fps if self.source.paced else None)
                continue

            if image is None:
                self._end_of_stream()
                return
            frozen_for = self._frozen_for(image, now)
            if self._on_image is not None:
                self._on_image(image, wall, mono)
            if not self._put(image, wall, mono, now):
                return
            if frozen_for is not None:
                if not self._reopen("frozen", f"identical frames for {frozen_for:.1f} s", generation):
                    return
                self._sample_since = self._clock()  # give the reopened source a full period
                pacer.reset(self.source.fps if self.source.paced else None)
            else:
                pacer.advance()

    def _put(self, image: np.ndarray, wall: float, mono: float, now: float) -> bool:
        """Put a frame in the slot; False if stop() came while waiting for room."""
        recovered_from = None
        with self._cond:
            if self._back_pressure:
                while self._slot is not None and not self._stop.is_set():
                    self._cond.wait()
            if self._stop.is_set():
                return False
            if self._slot is not None:
                self._superseded += 1
            else:
                self._waiting_since = mono
            self._slot = Frame(self.camera, self._captured, image, wall, mono)
            self._captured += 1
            self._last_frame_clock = now
            self._delay = self._backoff.initial_s  # a frame arrived: the source works again
            self._stale_logged = False
            new_state = CaptureState.FROZEN if self._frozen else CaptureState.LIVE
            if new_state is CaptureState.LIVE and self._state in (
                CaptureState.REOPENING, CaptureState.STALE, CaptureState.FROZEN
            ):
                recovered_from = self._state
            self._state = new_state
            self._cond.notify_all()
        if self._on_frame is not None:
            self._on_frame()
        if recovered_from is not None:
            log.info(
                "camera live",
                extra=fields(camera=self.camera, source=self.source.description,
                             after=recovered_from.value, reopens=self._reopens),
            )
        return True

    def _frozen_for(self, image: np.ndarray, now: float) -> float | None:
        """How long the picture has been identical, once that reaches frozen_after_s."""
        sample = image[::_FROZEN_STRIDE, ::_FROZEN_STRIDE].copy()  # a copy: consumers may draw on frames
        prev, self._prev_sample = self._prev_sample, sample
        if prev is None or prev.shape != sample.shape or not np.array_equal(prev, sample):
            self._sample_since = now
            self._frozen = False
            return None
        same_for = now - self._sample_since
        if same_for < self._frozen_after_s:
            return None
        if not self._frozen:
            self._frozen = True
            log.warning(
                "camera frozen",
                extra=fields(camera=self.camera, source=self.source.description,
                             identical_s=round(same_for, 3)),
            )
        return same_for

    def _mark_stale(self, error: str, waited: float) -> None:
        with self._cond:
            self._state = CaptureState.STALE
            self._last_error = error
            log_it, self._stale_logged = not self._stale_logged, True
            last = self._last_frame_clock
            age = waited if last is None else self._clock() - last
        if log_it:
            self._log_stale(age)

    def _log_stale(self, age: float | None) -> None:
        log.warning(
            "camera stale",
            extra=fields(camera=self.camera, source=self.source.description,
                         stale_after_s=self._stale_after_s, last_frame_age_s=age),
        )

    def _end_of_stream(self) -> None:
        with self._cond:
            self._eof = True
            self._cond.notify_all()
        log.info("camera source ended", extra=fields(camera=self.camera, source=self.source.description,
                                                     captured=self._captured))

    def _take_delay(self) -> float:
        with self._cond:
            delay = self._delay
            self._delay = min(delay * 2, self._backoff.max_s)
            return delay

    def _reopen(self, cause: str, error: str | None, generation: int) -> bool:
        """Close the source and open it again, backing off while that fails; False if stopped
        (or abandoned in an open that blocked)."""
        self._close_source()
        delay = self._take_delay()
        with self._cond:
            self._state = CaptureState.REOPENING
        log.warning(
            "camera reopening",
            extra=fields(camera=self.camera, source=self.source.description, cause=cause,
                         error=error, next_delay_s=delay),
        )
        while not self._stop.wait(delay):
            with self._cond:
                self._reopens += 1
                attempt = self._reopens
            source = self._blocking(generation)
            if source is None:
                return False
            try:
                source.open()
            except SourceError as exc:
                if not self._returned(generation):
                    return False
                self._close_source()
                delay = self._take_delay()
                with self._cond:
                    self._last_error = str(exc)
                log.warning(
                    "camera reopen failed",
                    extra=fields(camera=self.camera, source=self.source.description, error=str(exc),
                                 reopens=attempt, next_delay_s=delay),
                )
                continue
            if not self._returned(generation):
                return False
            log.info("camera reopened", extra=fields(camera=self.camera, source=self.source.description,
                                                     reopens=attempt))
            return True
        return False

    def _close_source(self) -> None:
        _close_quietly(self.source, self.camera)


def _close_quietly(source: Source, camera: str) -> None:
    try:
        source.close()
    except Exception:  # closing must never mask why we are closing
        log.debug("closing the source failed", exc_info=True,
                  extra=fields(camera=camera, source=source.description))
