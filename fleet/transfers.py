"""Artifact delivery: devices pull chunks, the manager answers within limits.

A device asks for ``length`` bytes at ``offset`` of an artifact on its own
``{p}/dev/{id}/artifact/get`` (the manager has checked that the device's desired state
names it before a request gets here); the answer goes to the device's own artifact
topic. A
*transfer* is one device fetching one artifact. At most ``max_transfers`` are served
at once; a request that would start another waits in a bounded queue (oldest first),
and past that it gets a ``busy`` chunk and asks again later. Chunks already published
but not yet acknowledged by the broker are capped in bytes too, so a 1,000-device
wave cannot flood the broker or the manager's memory: throughput is what the broker
drains, the rest waits as small requests.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt

from edge.core.contract import ArtifactRequest, ChunkHeader, Topics, encode_chunk
from edge.core.logs import fields

log = logging.getLogger("fleet.transfers")

TRANSFER_IDLE_S = 15.0  # a transfer with no request for this long no longer holds a place
CACHE_ARTIFACTS = 4  # artifacts kept in memory: a wave fetches one artifact many times


@dataclass
class TransferCounters:
    requests: int = 0
    chunks: int = 0
    bytes: int = 0
    busy: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    completed: int = 0
    max_active: int = 0
    max_waiting: int = 0


class Transfers:
    """Serves chunk requests; owned by the manager's control thread."""

    def __init__(self, directory: Path, topics: Topics, *, max_transfers: int = 64, max_waiting: int = 10_000,
                 max_unacked_bytes: int = 16 * 1024 * 1024) -> None:
        self.directory = directory
        self.topics = topics
        self.max_transfers = max_transfers
        self.max_waiting = max_waiting
        self.max_unacked_bytes = max_unacked_bytes
        self.counters = TransferCounters()
        self._active: dict[tuple[str, str], float] = {}  # transfer → last request (monotonic)
        self._ready: deque[ArtifactRequest] = deque()
        self._waiting: OrderedDict[tuple[str, str], ArtifactRequest] = OrderedDict()
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._unacked: deque[tuple[mqtt.MQTTMessageInfo, int]] = deque()
        self._unacked_bytes = 0

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def waiting(self) -> int:
        """Requests queued for a free transfer."""
        return len(self._waiting)

    def request(self, req: ArtifactRequest, now: float) -> ChunkHeader | None:
        """Take a request (``now``: monotonic); returns a ``busy`` header to send at once when it cannot wait."""
        self.counters.requests += 1
        key = (req.device, req.sha256)
        if key in self._active or (len(self._active) < self.max_transfers and not self._waiting):
            self._active[key] = now
            self._ready.append(req)
        elif key in self._waiting or len(self._waiting) < self.max_waiting:
            self._waiting[key] = req  # a device asking again replaces its earlier request
            self.counters.max_waiting = max(self.counters.max_waiting, len(self._waiting))
        else:
            self.counters.busy += 1
            return ChunkHeader(v=1, sha256=req.sha256, offset=req.offset, total=self._total(req), request=req.request,
                               error="busy")
        self.counters.max_active = max(self.counters.max_active, len(self._active))
        return None

    def pump(self, client: mqtt.Client, now: float) -> bool:
        """Publish answers while the broker keeps up; True if work is left."""
        self._expire(now)
        while self._unacked and _settled(self._unacked[0][0]):
            self._unacked_bytes -= self._unacked.popleft()[1]
        while self._ready and self._unacked_bytes < self.max_unacked_bytes:
            req = self._ready.popleft()
            header, data = self._answer(req)
            info = client.publish(req.response_topic, encode_chunk(header, data), qos=1)
            self._unacked.append((info, len(data)))
            self._unacked_bytes += len(data)
            if header.error is not None or req.offset + len(data) >= header.total:
                self._done((req.device, req.sha256), now)
        return bool(self._ready)

    def _answer(self, req: ArtifactRequest) -> tuple[ChunkHeader, bytes]:
        blob = self._bytes(req.sha256)
        if blob is None:
            return self._error(req, "unknown_artifact"), b""
        if req.offset >= len(blob):
            return self._error(req, "out_of_range"), b""
        data = blob[req.offset:req.offset + req.length]
        self.counters.chunks += 1
        self.counters.bytes += len(data)
        return ChunkHeader(v=1, sha256=req.sha256, offset=req.offset, total=len(blob), request=req.request), data

    def _error(self, req: ArtifactRequest, error: str) -> ChunkHeader:
        self.counters.errors[error] = self.counters.errors.get(error, 0) + 1
        log.warning("chunk refused", extra=fields(device=req.device, sha256=req.sha256[:12], error=error))
        return ChunkHeader(v=1, sha256=req.sha256, offset=req.offset, total=self._total(req), request=req.request,
                           error=error)

    def _total(self, req: ArtifactRequest) -> int:
        """The artifact's size for a header without data: never below the offset, so
        the header stays valid for the device's decoder even when the size is unknown."""
        blob = self._cache.get(req.sha256)
        if blob is None:
            try:
                size = (self.directory / req.sha256).stat().st_size
            except OSError:
                size = 0
        else:
            size = len(blob)
        return max(size, req.offset)

    def _bytes(self, sha256: str) -> bytes | None:
        if sha256 in self._cache:
            self._cache.move_to_end(sha256)
            return self._cache[sha256]
        try:
            blob = (self.directory / sha256).read_bytes()
        except OSError:
            return None
        self._cache[sha256] = blob
        while len(self._cache) > CACHE_ARTIFACTS:
            self._cache.popitem(last=False)
        return blob

    def _done(self, key: tuple[str, str], now: float) -> None:
        if self._active.pop(key, None) is not None:
            self.counters.completed += 1
        self._promote(now)

    def _expire(self, now: float) -> None:
        stale = [k for k, at in self._active.items() if now - at > TRANSFER_IDLE_S]
        for key in stale:  # e.g. a device that went offline mid-download
            del self._active[key]
        self._promote(now)

    def _promote(self, now: float) -> None:
        while self._waiting and len(self._active) < self.max_transfers:
            key, req = self._waiting.popitem(last=False)
            self._active[key] = now
            self._ready.append(req)
        self.counters.max_active = max(self.counters.max_active, len(self._active))


def _settled(info: mqtt.MQTTMessageInfo) -> bool:
    """The broker acknowledged the message, or paho gave up on it (a publish during a lost
    connection): either way it no longer takes the broker's capacity, and the device asks
    again for a chunk that never came. paho raises for the second case on every call, so
    without this one lost connection would stop every later chunk."""
    try:
        return info.is_published()
    except (RuntimeError, ValueError):
        return True
