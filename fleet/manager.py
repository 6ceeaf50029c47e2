"""The manager: ingest, plus the control link that runs rollouts, serves artifacts and
answers operators.

The control link is one MQTT 5 client on its own thread that owns the rollout engine,
the registry and the transfers: every message (reported state, job status, chunk
request, operator request) and every tick runs on that thread, so none of them needs
a lock. Its session is persistent (a fixed client id, kept by the broker for an hour),
so job statuses sent while the manager restarts wait for it. Job statuses are
committed in small batches (every ``FLUSH_S``), operator requests before they are
answered, and desired states before they are published.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge.core.contract import (
    DEFAULT_PREFIX,
    MAX_RPC_BYTES,
    ChunkHeader,
    ContractError,
    Desired,
    RpcError,
    RpcResponse,
    Topics,
    decode_artifact_request,
    decode_job,
    decode_reported,
    decode_rpc_request,
    encode,
    encode_chunk,
)
from edge.core.link import Link, LinkSettings
from edge.core.logs import fields

from .ingest import Ingest
from .keyring import Keyring
from .registry import Registry
from .rollouts import Engine
from .rpc import Operations
from .store import Store
from .transfers import Transfers

log = logging.getLogger("fleet.manager")

TICK_S = 0.2  # how often health windows and stages are judged
FLUSH_S = 0.1  # the longest a job status waits for its commit
SESSION_EXPIRY_S = 3600


@dataclass(frozen=True)
class ManagerSettings:
    db: Path
    host: str = "localhost"
    port: int = 1883
    prefix: str = DEFAULT_PREFIX
    artifacts: Path | None = None  # default: beside the store, <db>.artifacts
    keys: Path | None = None  # directory with fleet.key
    operators: frozenset[str] = frozenset({"operator"})
    client_id: str | None = None
    username: str | None = None
    password: str | None = None
    max_transfers: int = 64
    identity: str | None = None  # the manager's broker identity: control as it, ingest as {identity}~ingest
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    use_tls: bool = False

    def links(self) -> tuple[LinkSettings, LinkSettings]:
        """The control link's and the ingest's connection settings."""
        legacy = f"{self.client_id}-control" if self.client_id else f"fleet-control-{socket.gethostname()}"
        base = LinkSettings(host=self.host, port=self.port, client_id=self.identity or legacy,
                            username=self.identity or self.username, password=self.password, use_tls=self.use_tls,
                            tls_ca=self.tls_ca, tls_cert=self.tls_cert, tls_key=self.tls_key)
        control = replace(base, clean_start=False, session_expiry_s=SESSION_EXPIRY_S, backoff_initial_s=0.5,
                          backoff_max_s=5.0, max_inflight=200)
        if self.identity:
            return control, base.for_link("ingest")
        ingest_id = self.client_id or f"fleet-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        return control, replace(base, client_id=ingest_id)


@dataclass
class ControlCounters:
    rpc: int = 0
    rpc_errors: int = 0
    desired_published: int = 0
    rejected: dict[str, int] = field(default_factory=dict)


class Control:
    """The link handler that owns the engine, registry and transfers."""

    def __init__(self, store: Store, registry: Registry, engine: Engine, transfers: Transfers,
                 ops_factory: Any, topics: Topics) -> None:
        self.store = store
        self.registry = registry
        self.engine = engine
        self.transfers = transfers
        self.topics = topics
        self.ops: Operations = ops_factory(self)
        self.counters = ControlCounters()
        self.subscribed = False
        self._next_tick = 0.0
        self._next_flush = 0.0

    # --- link handler -------------------------------------------------------------------------

    def on_connect(self, client: mqtt.Client, session_present: bool) -> None:
        self.subscribed = False
        t = self.topics
        client.subscribe([(t.all_reported(), 1), (t.all_jobs(), 1), (t.all_artifact_gets(), 1), (t.all_rpc(), 1)])
        # the broker may have lost its retained messages; versions make a repeat harmless
        for doc in self.engine.book.all():
            self._publish_desired(client, doc)

    def on_subscribe(self, client: mqtt.Client, reasons: list) -> None:
        failed = [str(r) for r in reasons if r.is_failure]
        if failed:
            log.error("control subscription refused", extra=fields(reasons=failed))
            return
        self.subscribed = True
        log.info("control subscribed", extra=fields(prefix=self.topics.prefix))

    def on_message(self, client: mqtt.Client, message: mqtt.MQTTMessage) -> None:
        topic, now = message.topic, time.time()
        t = self.topics
        identity = t.rpc_identity(topic)
        if identity is not None:
            return self._rpc(client, identity, message, now)
        device = t.device_of(topic)
        if device is None:
            return self._reject("schema", topic, "not a device topic")
        if topic == t.artifact_get(device):
            return self._chunk_request(client, device, message.payload, now)
        try:
            if topic == t.reported(device):
                if message.payload:  # an empty retained message clears the topic
                    self.engine.on_reported(decode_reported(message.payload, device=device), now)
            elif topic.startswith(f"{t.prefix}/dev/{device}/job/"):
                job = topic.rsplit("/", 1)[1]
                self.engine.on_job(decode_job(message.payload, device=device, job=job), now)
        except ContractError as exc:
            self._reject(exc.reason, topic, exc.detail)

    def work(self, client: mqtt.Client) -> float:
        now = time.time()
        if now >= self._next_tick:
            self._next_tick = now + TICK_S
            self.engine.tick(now)
        if now >= self._next_flush:
            self._next_flush = now + FLUSH_S
            self._flush(client)
        more = self.transfers.pump(client, now)
        return 0.0 if more else min(FLUSH_S, TICK_S)

    def on_stop(self, client: mqtt.Client) -> list[mqtt.MQTTMessageInfo]:
        return self._flush(client)

    # --- messages -------------------------------------------------------------------------------

    def _flush(self, client: mqtt.Client) -> list[mqtt.MQTTMessageInfo]:
        infos = []
        for doc in self.engine.flush():  # committed first, then published
            infos.append(self._publish_desired(client, doc))
            self.counters.desired_published += 1
        return infos

    def _publish_desired(self, client: mqtt.Client, doc: Desired) -> mqtt.MQTTMessageInfo:
        """Signed as it leaves, with the signing key in use now (a rotated key included)."""
        return client.publish(self.topics.desired(doc.device), encode(self.registry.sign(doc)), qos=1, retain=True)

    def _chunk_request(self, client: mqtt.Client, device: str, payload: bytes, now: float) -> None:
        topic = self.topics.artifact_get(device)
        try:
            req = decode_artifact_request(payload, self.topics, device=device)
        except ContractError as exc:
            return self._reject(exc.reason, topic, exc.detail)
        desired = self.engine.book.desired.get(device)
        if desired is None or not desired.names(req.sha256):
            # the topic says who asks (the broker's ACL vouches for it): only what its own
            # desired state names is served, so no device fetches another's artifacts
            self._reject("not_assigned", topic, f"{device} asked for {req.sha256[:12]}…, which its desired "
                                                f"state (v{desired.version if desired else '-'}) does not name")
            client.publish(req.response_topic, encode_chunk(ChunkHeader(
                v=1, sha256=req.sha256, offset=req.offset, total=req.offset, request=req.request,
                error="not_assigned")), qos=1)
            return
        busy = self.transfers.request(req, now)
        if busy is not None:
            client.publish(req.response_topic, encode_chunk(busy), qos=1)

    def _rpc(self, client: mqtt.Client, identity: str, message: mqtt.MQTTMessage, now: float) -> None:
        self.counters.rpc += 1
        props = message.properties
        reply_to = getattr(props, "ResponseTopic", None) if props else None
        correlation = getattr(props, "CorrelationData", None) if props else None
        mine = f"{self.topics.prefix}/fleet/reply/{identity}/"
        if not reply_to or not reply_to.startswith(mine) or any(c in reply_to for c in "+#"):
            self.counters.rpc_errors += 1
            return self._reject("bad_reply_topic", message.topic, f"response topic {reply_to!r} is not under {mine}")
        try:
            req = decode_rpc_request(message.payload)
        except ContractError as exc:
            self.counters.rpc_errors += 1
            self._reject(exc.reason, message.topic, exc.detail)
            response = RpcResponse(v=1, id="invalid", ok=False,
                                   error=RpcError(code="bad_request", message=f"malformed request: {exc}"))
        else:
            try:
                response = self.ops.handle(identity, req, now)
                if response.ok:
                    self._flush(client)  # durable before the operator hears it is done
            except Exception as exc:  # a bug must not kill the manager nor leave the caller waiting
                log.exception("operation failed", extra=fields(op=req.op))
                self._flush(client)  # what the operation changed before it failed still reaches devices
                response = RpcResponse(v=1, id=req.id, ok=False,
                                       error=RpcError(code="internal", message=f"{type(exc).__name__}: {exc}"))
            if not response.ok:
                self.counters.rpc_errors += 1
        body = encode(response)
        if len(body) > MAX_RPC_BYTES:  # the client would refuse it: say why instead
            self.counters.rpc_errors += 1
            body = encode(RpcResponse(v=1, id=response.id, ok=False, error=RpcError(
                code="too_large", message=f"the answer is {len(body)} bytes, over the {MAX_RPC_BYTES} a response "
                                          "may hold; ask for less (a name, a version, one rollout)")))
        out = Properties(PacketTypes.PUBLISH)
        if correlation is not None:
            out.CorrelationData = correlation
        client.publish(reply_to, body, qos=1, properties=out)

    def _reject(self, reason: str, topic: str, detail: str) -> None:
        self.counters.rejected[reason] = self.counters.rejected.get(reason, 0) + 1
        log.warning("rejected", extra=fields(reason=reason, topic=topic, detail=detail[:200]))

    def stats(self) -> dict[str, Any]:
        e, t = self.engine.counters, self.transfers.counters
        rejected = dict(self.counters.rejected)
        for k, v in dict(e.rejected).items():
            rejected[k] = rejected.get(k, 0) + v
        return {"rpc": self.counters.rpc, "rpc_errors": self.counters.rpc_errors,
                "desired_published": self.counters.desired_published, "jobs": e.jobs, "reported": e.reported,
                "stale_jobs": e.stale_jobs, "chunk_requests": t.requests, "chunks": t.chunks,
                "chunk_bytes": t.bytes, "transfers_active": self.transfers.active,
                "transfers_completed": t.completed, "transfers_max_active": t.max_active,
                "transfers_max_waiting": t.max_waiting, "busy": t.busy, "chunk_errors": dict(t.errors),
                "rollouts_active": sum(1 for r in list(self.engine.rollouts.values()) if r.state in ("running", "paused")),
                "control_rejected": rejected}


class Manager:
    """``fleet serve``: the ingest and the control link over one store."""

    def __init__(self, settings: ManagerSettings) -> None:
        s = settings
        self.settings = s
        self.topics = Topics(s.prefix)
        keyring = Keyring(s.keys) if s.keys else None
        self.store = Store.open(s.db)
        directory = s.artifacts or s.db.with_name(s.db.name + ".artifacts")
        self.registry = Registry(self.store, directory, keyring.signing_key() if keyring else None,
                                 keyring.previous() if keyring else ())
        self.engine = Engine(self.store, self.registry)
        self.transfers = Transfers(directory, self.topics, max_transfers=s.max_transfers)
        control_link, ingest_link = s.links()
        self.ingest = Ingest(self.store, prefix=s.prefix, settings=ingest_link)
        self.control = Control(self.store, self.registry, self.engine, self.transfers,
                               lambda c: Operations(self.engine, self.registry, s.operators, self.stats), self.topics)
        self._link = Link(control_link, self.control, name="control")

    def start(self) -> None:
        self.ingest.start()
        self._link.start()

    def stop(self) -> None:
        self._link.stop(5.0)
        self.engine.flush()  # anything the link's goodbye could not commit
        self.ingest.stop()
        self.store.close()

    def stats(self) -> dict[str, Any]:
        store = self.store.stats()
        return {**self.ingest.stats(), **self.control.stats(), "store_skipped": store["skipped"],
                "store_refused": store["refused"], "pid": os.getpid()}
