"""JPEG snapshots of alert and unsure frames, kept on the device under a size and age cap.

Pixels never leave the device: only a snapshot's id and sha256 travel in metadata, and
a technician reads the file here, or, with ``privacy.snapshot_export`` on, an operator
fetches one for review (:mod:`edge.sync.review`). Encoding a 720p JPEG
takes milliseconds, so it happens on the store's own thread; requests wait in a small
bounded queue and are skipped (and counted) when it is full, never slowing inference.
The caps are enforced after each write and on a timer, so a picture past its age goes
even when nothing new is written.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

from edge.core.files import replace_file
from edge.core.logs import fields

log = logging.getLogger("edge.snapshots")

QUEUE_SIZE = 4
PRUNE_EVERY_S = 60.0
GONE_KEPT = 10_000  # ids of deleted snapshots remembered, so a fetch can say why one is gone


@dataclass(frozen=True)
class SnapshotLimits:
    max_bytes: int
    max_age_s: float
    jpeg_quality: int = 85


class SnapshotStore:
    """``dir/<id>.jpg`` files; ``start`` / ``stop``."""

    def __init__(self, directory: Path, limits: SnapshotLimits, *, prune_every_s: float = PRUNE_EVERY_S) -> None:
        self.dir = directory
        self.limits = limits
        self.prune_every_s = prune_every_s
        self._queue: queue.Queue[tuple[np.ndarray, str, Callable[[str], None]]] = queue.Queue(QUEUE_SIZE)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="snapshots", daemon=True)
        self.counters = {"written": 0, "skipped_busy": 0, "pruned": 0, "errors": 0}
        self._gone: OrderedDict[str, str] = OrderedDict()  # id -> "expired" or "evicted", newest last

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        """Finish the snapshot being written; queued ones are dropped."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def failed(self) -> bool:
        return self._thread.ident is not None and not self._thread.is_alive() and not self._stop.is_set()

    def request(self, image: np.ndarray, sid: str, done: Callable[[str], None]) -> bool:
        """Keep ``image`` as ``sid``; ``done(sha256)`` runs once it is on disk. False: skipped."""
        if not self._thread.is_alive():
            return False
        try:
            # a copy: the capture thread may reuse the buffer once the frame is served
            self._queue.put_nowait((image.copy(), sid, done))
            return True
        except queue.Full:
            self.counters["skipped_busy"] += 1
            return False

    def path(self, sid: str) -> Path:
        return self.dir / f"{sid}.jpg"

    def gone(self, sid: str) -> str | None:
        """Why snapshot ``sid`` was deleted by this process (``expired``, ``evicted``), if it was."""
        return self._gone.get(sid)

    def _run(self) -> None:
        next_prune = time.monotonic()
        while not self._stop.is_set():
            if time.monotonic() >= next_prune:
                next_prune = time.monotonic() + self.prune_every_s
                self._step("prune", self._prune)
            try:
                image, sid, done = self._queue.get(timeout=min(0.2, self.prune_every_s))
            except queue.Empty:
                continue
            if self._step(sid, lambda: done(self._write(image, sid))):
                self._step("prune", self._prune)

    def _step(self, what: str, step: Callable[[], None]) -> bool:
        try:
            step()
            return True
        except Exception:  # a full disk, a file gone under us: counted, and the thread goes on
            self.counters["errors"] += 1
            log.exception("snapshot failed", extra=fields(snapshot=what))
            return False

    def _write(self, image: np.ndarray, sid: str) -> str:
        ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, self.limits.jpeg_quality])
        if not ok:
            raise ValueError("JPEG encoding failed")
        data = jpeg.tobytes()
        replace_file(self.path(sid), data, durable=False)
        self.counters["written"] += 1
        return hashlib.sha256(data).hexdigest()

    def _prune(self) -> None:
        """Oldest first: everything past the age cap, then until under the size cap."""
        files = []
        for p in self.dir.glob("*.jpg"):
            try:
                st = p.stat()
            except FileNotFoundError:  # removed meanwhile
                continue
            files.append((st.st_mtime, st.st_size, p))
        files.sort()
        total = sum(size for _, size, _ in files)
        horizon = time.time() - self.limits.max_age_s
        for mtime, size, path in files:
            if mtime >= horizon and total <= self.limits.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
            self.counters["pruned"] += 1
            self._gone[path.stem] = "expired" if mtime < horizon else "evicted"
            while len(self._gone) > GONE_KEPT:
                self._gone.popitem(last=False)

    def stats(self) -> dict[str, Any]:
        return dict(self.counters)
