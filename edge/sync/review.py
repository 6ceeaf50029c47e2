"""Snapshot review: the one way a pixel leaves the device, and only when asked.

An operator asks on ``{p}/dev/{id}/review/get/{operator}`` for one snapshot by id; the
device answers on ``{p}/dev/{id}/review/reply/{operator}/{request}`` with the JPEG in
chunks (or one chunk saying why not). The broker's ACL lets only operator identities
write a request, each under its own name, and only that operator read its replies; the
device checks that the body agrees with the topic, that ``privacy.snapshot_export`` is
on, that the identity is one of ``privacy.reviewers`` (when the list is not empty) and
that the rate limit has room, then reads the file, sends it and writes a
``snapshot_exported`` audit event to the outbox, so who saw which picture, and when,
reaches the fleet store. The manager is on neither topic: it never holds the pixels.

Refusals are counted by reason and logged but not audited (what a hostile client sends
must not fill the outbox). A malformed request gets no answer: its reply topic cannot
be trusted. The subscription is QoS 0, so the device's persistent session keeps no
request while it is away: a fetch is answered now or not at all.

Everything here runs on the sync link's thread; reading one JPEG takes a millisecond.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Protocol

import paho.mqtt.client as mqtt

from edge.config import PrivacyConfig
from edge.core.contract import (
    MAX_CHUNK_BYTES,
    MAX_SNAPSHOT_BYTES,
    ULID_PATTERN,
    ContractError,
    ReviewChunk,
    ReviewRequest,
    Topics,
    decode_review_request,
    encode_chunk,
)
from edge.core.link import publish
from edge.core.logs import fields

from .events import Event, snapshot_exported

log = logging.getLogger("edge.review")


class Snapshots(Protocol):
    """What the exporter needs of :class:`edge.decide.snapshots.SnapshotStore`."""

    def path(self, sid: str) -> Path: ...

    def gone(self, sid: str) -> str | None: ...


class Refusal(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class RateLimit:
    """At most ``count`` events in any ``per_s`` seconds (a sliding window)."""

    def __init__(self, count: int, per_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.count, self.per_s, self._clock = count, per_s, clock
        self._times: deque[float] = deque()

    def take(self) -> float | None:
        """None when there is room (and it is taken), else the seconds until there is."""
        now = self._clock()
        while self._times and now - self._times[0] >= self.per_s:
            self._times.popleft()
        if len(self._times) >= self.count:
            return self.per_s - (now - self._times[0])
        self._times.append(now)
        return None


class Exporter:
    """Answers operators' snapshot fetches on one device; a handler part of the sync link."""

    def __init__(self, device: str, topics: Topics, cfg: PrivacyConfig, snapshots: Snapshots | None,
                 audit: Callable[[Event], Any] | None) -> None:
        self.device = device
        self.topics = topics
        self.cfg = cfg
        self.snapshots = snapshots
        self.audit = audit
        self.limit = RateLimit(cfg.max_fetches, cfg.per_s)
        self.counters: dict[str, Any] = {"exported": 0, "bytes": 0, "refused": {}, "rejected": {}}

    def on_connect(self, client: mqtt.Client) -> None:
        client.subscribe(self.topics.review_gets(self.device), qos=0)

    def handles(self, topic: str) -> bool:
        return self.topics.review_requester(self.device, topic) is not None

    def on_message(self, client: mqtt.Client, message: mqtt.MQTTMessage) -> None:
        operator = self.topics.review_requester(self.device, message.topic)
        assert operator is not None
        try:
            req = decode_review_request(message.payload, self.topics, device=self.device, operator=operator)
        except ContractError as exc:
            _count(self.counters["rejected"], exc.reason)
            log.warning("review request rejected", extra=fields(reason=exc.reason, detail=exc.detail[:200],
                                                                operator=operator, bytes=len(message.payload)))
            return
        try:
            data, sha = self._serve(req)
        except Refusal as exc:
            _count(self.counters["refused"], exc.reason)
            log.warning("snapshot fetch refused", extra=fields(reason=exc.reason, detail=exc.detail,
                                                               operator=operator, snapshot=req.snapshot))
            self._send(client, req, ReviewChunk(v=1, device=self.device, snapshot=req.snapshot, request=req.request,
                                                error=exc.reason, detail=exc.detail[:512]))
            return
        for offset in range(0, max(1, len(data)), MAX_CHUNK_BYTES):
            piece = data[offset:offset + MAX_CHUNK_BYTES]
            self._send(client, req, ReviewChunk(v=1, device=self.device, snapshot=req.snapshot, request=req.request,
                                                sha256=sha, offset=offset, total=len(data)), piece)
        self.counters["exported"] += 1
        self.counters["bytes"] += len(data)
        log.info("snapshot exported", extra=fields(snapshot=req.snapshot, operator=operator, bytes=len(data),
                                                   request=req.request))
        if self.audit is not None:
            self.audit(snapshot_exported(req.snapshot, sha, operator, req.request, len(data)))

    def _serve(self, req: ReviewRequest) -> tuple[bytes, str]:
        """The snapshot's bytes and sha256, or Refusal saying why not."""
        if not self.cfg.snapshot_export or self.snapshots is None:
            raise Refusal("export_off", f"{self.device} keeps its pictures: privacy.snapshot_export is off "
                                        "in its config")
        if self.cfg.reviewers and req.operator not in self.cfg.reviewers:
            raise Refusal("forbidden", f"{req.operator!r} is not one of {self.device}'s privacy.reviewers")
        if not re.fullmatch(ULID_PATTERN, req.snapshot):  # the contract checked it; the id names a file
            raise Refusal("unknown_snapshot", "not a snapshot id")
        path = self.snapshots.path(req.snapshot)
        try:
            size = path.stat().st_size
            if size > MAX_SNAPSHOT_BYTES:
                raise Refusal("too_large", f"{size} bytes, over the {MAX_SNAPSHOT_BYTES} a fetch carries")
            wait = self.limit.take()
            if wait is not None:
                raise Refusal("rate_limited", f"{self.cfg.max_fetches} fetches per {self.cfg.per_s:g}s served; "
                                              f"ask again in {wait:.0f}s")
            data = path.read_bytes()
        except FileNotFoundError:
            gone = self.snapshots.gone(req.snapshot)
            if gone == "expired":
                raise Refusal("expired", "deleted past decisions.snapshots.max_age_h") from None
            if gone == "evicted":
                raise Refusal("evicted", "deleted to keep under decisions.snapshots.max_mb") from None
            raise Refusal("unknown_snapshot", f"{self.device} holds no snapshot {req.snapshot}") from None
        except OSError as exc:
            raise Refusal("unreadable", f"{exc.strerror or exc}") from None
        return data, hashlib.sha256(data).hexdigest()

    def _send(self, client: mqtt.Client, req: ReviewRequest, header: ReviewChunk, data: bytes = b"") -> None:
        publish(client, req.reply_topic, encode_chunk(header, data))

    def stats(self) -> dict[str, Any]:
        return {**self.counters, "refused": dict(self.counters["refused"]),
                "rejected": dict(self.counters["rejected"])}


def _count(counter: dict[str, int], key: str) -> None:
    counter[key] = counter.get(key, 0) + 1
