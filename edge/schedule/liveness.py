"""Liveness: tell the supervisor the daemon is alive, and stop saying so when it is not.

Under systemd (``Type=notify``, ``WatchdogSec=``) the daemon sends ``READY=1`` once
running and ``WATCHDOG=1`` at half the watchdog interval. An invoke that runs far
past its estimate (or past an absolute limit) is reported with its camera and model,
and from then on the pings stop, so systemd kills and restarts the daemon: a stuck
accelerator or driver never leaves a camera silently blind. A heartbeat file, touched
at the same rate, serves supervisors other than systemd. Each poll also lets every
capture thread deal with a source call that never returns (``CaptureThread.watch``); a
camera stuck beyond that stops the pings too.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

from edge.config import SchedulerConfig
from edge.core.logs import fields

from .scheduler import CameraRunner, Executor

log = logging.getLogger("edge.liveness")


def sd_notify(message: str) -> bool:
    """Send a systemd notification; False when not run under a notify-type unit."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
        return True
    except OSError as exc:
        log.warning("cannot notify systemd", extra=fields(error=str(exc)))
        return False


def watchdog_interval_s() -> float | None:
    """Half of systemd's WatchdogSec for this process, or None when there is none."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


class Liveness:
    """Owned and polled by the daemon's main thread."""

    def __init__(self, executors: list[Executor], cfg: SchedulerConfig, heartbeat: Path | None = None,
                 cameras: list[CameraRunner] = ()) -> None:
        self.executors = executors
        self.cameras = list(cameras)
        self.cfg = cfg
        self.heartbeat = heartbeat
        self.alive = True
        self.stuck = 0
        self._reported: set[tuple[int, float]] = set()
        self._interval = watchdog_interval_s() or 1.0
        self._next_ping = 0.0

    def ready(self) -> None:
        sd_notify("READY=1")
        self.poll()

    def stopping(self) -> None:
        sd_notify("STOPPING=1")

    def poll(self, now: float | None = None) -> None:
        """Check for stuck invokes and cameras; ping the supervisor while none is."""
        now = time.monotonic() if now is None else now
        for ex in self.executors:
            running = ex.running
            if running is None:
                continue
            elapsed_ms = (now - running.started) * 1e3
            limit = max(self.cfg.stuck_factor * running.estimate_ms, self.cfg.stuck_min_ms)
            if elapsed_ms > min(limit, self.cfg.stuck_limit_ms) and (ex.index, running.started) not in self._reported:
                self._reported.add((ex.index, running.started))
                self.stuck += 1
                self.alive = False
                log.error(
                    "inference stuck: liveness withdrawn so the supervisor restarts the daemon",
                    extra=fields(camera=running.camera, task=running.task, model=running.model,
                                 elapsed_ms=round(elapsed_ms), estimate_ms=round(running.estimate_ms, 2)),
                )
        for camera in self.cameras:
            if not camera.capture.watch() and self.alive:
                self.stuck += 1
                self.alive = False
                log.error("capture stuck: liveness withdrawn so the supervisor restarts the daemon",
                          extra=fields(camera=camera.cfg.id))
        if self.alive and now >= self._next_ping:
            self._next_ping = now + self._interval
            sd_notify("WATCHDOG=1")
            if self.heartbeat is not None:
                self.heartbeat.touch()
