"""Fetching an artifact in chunks over MQTT into a staging file that survives restarts.

The device asks on its own ``{p}/dev/{id}/artifact/get`` for ``length`` bytes at
``offset`` of an artifact its desired state names, and the fleet answers on the
device's own artifact topic. Chunks are appended in order, so the
staging file's size is exactly how far the download got: after a restart (even a
kill -9) it resumes from there. A request that gets no answer is asked again with
exponential backoff, a bounded number of times.
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edge.core.contract import MAX_CHUNK_BYTES, Artifact, ArtifactRequest, ChunkHeader, Topics, encode
from edge.core.ids import new_id
from edge.core.link import Backoff
from edge.core.logs import fields

log = logging.getLogger("edge.download")

BUSY_RETRY_S = 1.0  # a "busy" answer means: ask again after this long
BUSY_PATIENCE = 60  # busy answers tolerated on top of the retries

Send = Callable[[str, bytes], None]  # publish (topic, body) through the agent's link
Progress = Callable[[float], None]


class DownloadError(Exception):
    """The download cannot finish; ``reason`` is short: disk_full, no_answer, fleet_error, stopped."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class DownloadSettings:
    retries: int = 5  # unanswered requests in a row before giving up
    chunk_timeout_s: float = 5.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 10.0
    min_free_bytes: int = 50 * 1024 * 1024  # left free on the disk after the download
    chunk_bytes: int = MAX_CHUNK_BYTES


class Downloader:
    """Fetches one artifact at a time; chunks arrive through :meth:`deliver` from the link thread."""

    def __init__(self, device: str, topics: Topics, send: Send, settings: DownloadSettings,
                 stop: threading.Event) -> None:
        self.device = device
        self.topics = topics
        self.send = send
        self.settings = settings
        self.stop = stop
        self._chunks: queue.Queue[tuple[ChunkHeader, bytes]] = queue.Queue(maxsize=64)
        self.counters = {"requests": 0, "chunks": 0, "retries": 0, "resumed_bytes": 0, "ignored_chunks": 0}

    def deliver(self, header: ChunkHeader, data: bytes) -> None:
        """A chunk from the link thread; never blocks it."""
        try:
            self._chunks.put_nowait((header, data))
        except queue.Full:  # asked for one at a time: a full queue is stale copies
            self.counters["ignored_chunks"] += 1

    def fetch(self, artifact: Artifact, part: Path, progress: Progress | None = None) -> Path:
        """Complete ``part`` with the artifact's bytes (resuming what it holds) and return it."""
        have = part.stat().st_size if part.exists() else 0
        if have > artifact.size:  # not this artifact's prefix: start over
            part.unlink()
            have = 0
        check_free_disk(part.parent, artifact.size - have, self.settings.min_free_bytes)
        if have:
            self.counters["resumed_bytes"] += have
            log.info("download resumed", extra=fields(sha256=artifact.sha256[:12], offset=have, size=artifact.size))
        self._drain()
        backoff = Backoff(self.settings.backoff_initial_s, self.settings.backoff_max_s)
        # unbuffered appends: every chunk written is on disk (in the page cache) at once,
        # so a killed process leaves a file whose size is exactly what it received
        with open(part, "ab", buffering=0) as out:
            while have < artifact.size:
                length = min(self.settings.chunk_bytes, artifact.size - have)
                data = self._chunk(artifact, have, length, backoff)
                out.write(data)
                have += len(data)
                if progress is not None:
                    progress(have / artifact.size)
        return part

    def _chunk(self, artifact: Artifact, offset: int, length: int, backoff: Backoff) -> bytes:
        misses = 0
        while True:
            if self.stop.is_set():
                raise DownloadError("stopped", "the agent is stopping")
            request = new_id()
            body = ArtifactRequest(v=1, device=self.device, sha256=artifact.sha256, offset=offset, length=length,
                                   request=request, response_topic=self.topics.artifact(self.device, artifact.sha256))
            self.send(self.topics.artifact_get(self.device), encode(body))
            self.counters["requests"] += 1
            answer = self._wait(request, artifact.sha256, offset)
            if answer is not None:
                header, data = answer
                if header.error == "busy":  # the fleet serves its maximum of transfers: wait, ask again
                    misses += 1
                    if misses > self.settings.retries + BUSY_PATIENCE:
                        raise DownloadError("fleet_busy", f"the fleet stayed busy for {misses} requests")
                    if self.stop.wait(BUSY_RETRY_S):
                        raise DownloadError("stopped", "the agent is stopping")
                    continue
                if header.error is not None:
                    raise DownloadError("fleet_error", header.error)
                if header.total != artifact.size:
                    raise DownloadError("size", f"the fleet has {header.total} bytes, the artifact says {artifact.size}")
                if not data:
                    raise DownloadError("fleet_error", f"empty chunk at {offset}")
                self.counters["chunks"] += 1
                backoff.reset()
                return data
            misses += 1
            if misses > self.settings.retries:
                raise DownloadError("no_answer", f"no chunk at offset {offset} after {misses} requests")
            self.counters["retries"] += 1
            delay = backoff.next()
            log.info("chunk request unanswered; asking again", extra=fields(
                sha256=artifact.sha256[:12], offset=offset, attempt=misses, delay_s=round(delay, 2)))
            if self.stop.wait(delay):
                raise DownloadError("stopped", "the agent is stopping")

    def _wait(self, request: str, sha256: str, offset: int) -> tuple[ChunkHeader, bytes] | None:
        deadline = time.monotonic() + self.settings.chunk_timeout_s
        while not self.stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                header, data = self._chunks.get(timeout=min(left, 0.2))
            except queue.Empty:
                continue
            if header.request == request and header.sha256 == sha256 and header.offset == offset:
                return header, data
            self.counters["ignored_chunks"] += 1  # an answer to an earlier, retried request
        return None

    def _drain(self) -> None:
        while True:
            try:
                self._chunks.get_nowait()
            except queue.Empty:
                return


def check_free_disk(directory: Path, needed: int, reserve: int) -> None:
    free = shutil.disk_usage(directory).free
    if free - needed < reserve:
        raise DownloadError("disk_full", f"{free} bytes free in {directory}; need {needed} + {reserve} reserved")
