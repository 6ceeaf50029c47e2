"""The fleet's half of the rollout contract, small enough to read at a glance.

It publishes a retained desired state signed with its key, serves artifact chunks from
a dict (optionally slowly), and records every job status and reported body a device
sends.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from edge.core.contract import (
    Assignment,
    ChunkHeader,
    ContractError,
    Desired,
    JobStatus,
    Reported,
    Topics,
    decode_artifact_request,
    decode_job,
    decode_reported,
    encode,
    encode_chunk,
)
from edge.core.signing import sign


@dataclass
class FleetPeer:
    host: str
    port: int
    device: str
    key: Ed25519PrivateKey | None = None  # signs desired states (None: they go unsigned)
    topics: Topics = field(default_factory=Topics)
    blobs: dict[str, bytes] = field(default_factory=dict)  # sha256 -> bytes served
    chunk_delay_s: float = 0.0
    serving: bool = True  # False: requests go unanswered

    def __post_init__(self) -> None:
        self.jobs: list[JobStatus] = []
        self.reported: list[Reported] = []
        self.requests: list[tuple[str, int]] = []  # (sha256, offset) in arrival order
        self._lock = threading.Lock()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"peer-{self.device}",
                                   protocol=mqtt.MQTTv5)
        self._client.on_message = self._on_message
        self._subscribed = threading.Event()
        self._client.on_subscribe = lambda *a: self._subscribed.set()
        self._client.connect(self.host, self.port)
        self._client.loop_start()
        self._client.subscribe([(self.topics.artifact_get(self.device), 1), (self.topics.all_jobs(), 1),
                                (self.topics.reported(self.device), 1)])
        self._subscribed.wait(5)
        self._version = 0

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()

    def desire(self, models: dict[str, Assignment], policy: Assignment | None = None, *,
               version: int | None = None) -> int:
        """Publish the next (or the given) retained desired state; returns its version."""
        if version is None:
            self._version += 1
            version = self._version
        body = Desired(v=1, device=self.device, version=version, at=time.time(), models=models, policy=policy)
        if self.key is not None:
            body = sign(self.key, body)
        self.raw(self.topics.desired(self.device), encode(body), retain=True)
        return version

    def raw(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self._client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def job(self, job: str) -> list[JobStatus]:
        with self._lock:
            return [j for j in self.jobs if j.job == job]

    def final(self, job: str) -> JobStatus | None:
        """The job's last status if it is a terminal one."""
        statuses = self.job(job)
        if statuses and statuses[-1].state in ("committed", "failed", "rolled_back"):
            return statuses[-1]
        return None

    def last_reported(self) -> Reported | None:
        with self._lock:
            return self.reported[-1] if self.reported else None

    def _on_message(self, client, userdata, message) -> None:
        if message.topic == self.topics.artifact_get(self.device):
            self._serve(message.payload)
            return
        try:
            if message.topic == self.topics.reported(self.device):
                body = decode_reported(message.payload, device=self.device)
                with self._lock:
                    self.reported.append(body)
                return
            job = message.topic.rsplit("/", 1)[1]
            status = decode_job(message.payload, device=self.device, job=job)
        except ContractError as exc:
            raise AssertionError(f"the device sent a body that breaks the contract: {exc}") from None
        with self._lock:
            self.jobs.append(status)

    def _serve(self, payload: bytes) -> None:
        req = decode_artifact_request(payload, self.topics, device=self.device)
        with self._lock:
            self.requests.append((req.sha256, req.offset))
        if not self.serving:
            return
        if self.chunk_delay_s:
            time.sleep(self.chunk_delay_s)
        blob = self.blobs.get(req.sha256)
        header = dict(v=1, sha256=req.sha256, offset=req.offset, request=req.request)
        if blob is None:
            body = encode_chunk(ChunkHeader(**header, total=0, error="unknown_artifact"))
        else:
            body = encode_chunk(ChunkHeader(**header, total=len(blob)), blob[req.offset:req.offset + req.length])
        self._client.publish(req.response_topic, body, qos=1)
