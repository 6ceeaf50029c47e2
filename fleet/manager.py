"""The manager: ingest, the job inbox, and, in the one manager holding the lease, the
control link that runs rollouts, serves artifacts and answers operators.

Any number of managers may share one store (PostgreSQL). Each runs the ingest (the
shared subscription splits the batches between them) and a job inbox: a persistent
session (kept by the broker for an hour, so statuses sent while the manager restarts
wait for it) that stores every job status it hears, once whichever managers heard it.
One manager at a time holds the lease (:mod:`fleet.store.lease`) and runs the control
link: one MQTT 5 client on its own thread that owns the rollout engine, the registry
and the transfers, so none of them needs a lock. It judges the stored job statuses,
commits every change before it publishes the desired states it made (operator requests
before they are answered), and stops when it loses the lease. Another manager takes the
lease once it expires, loads the rollouts from the store and carries on.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
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
    JobStatus,
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
from .retention import Retention
from .rollouts import Engine
from .rpc import Operations
from .store import DatabaseError, Fence, LeaseLost, Store
from .store.lease import Lease
from .transfers import Transfers

log = logging.getLogger("fleet.manager")

TICK_S = 0.2  # how often health windows and stages are judged
FLUSH_S = 0.1  # the longest a job status waits for its commit
SESSION_EXPIRY_S = 3600
DEFAULT_FAILOVER_S = 10.0
MUTATING = frozenset({"artifacts.push", "rollouts.start", "rollouts.pause", "rollouts.resume", "rollouts.abort",
                      "rollouts.rollback", "review.label"})


@dataclass(frozen=True)
class ManagerSettings:
    db: str | Path  # a path (SQLite) or a URL
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
    identity: str | None = None  # the manager's broker identity (see links)
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    use_tls: bool = False
    failover_s: float = DEFAULT_FAILOVER_S  # how long a dead leader's lease holds the others back
    retain_events: tuple[tuple[str, float], ...] = ()  # (event kind or "*", seconds kept); none: kept forever

    def artifact_dir(self) -> Path:
        if self.artifacts is not None:
            return self.artifacts
        if "://" in str(self.db) and not str(self.db).startswith("sqlite"):
            return Path("fleet-artifacts")
        path = Path(str(self.db).split("sqlite:///", 1)[-1])
        return path.with_name(path.name + ".artifacts")

    def base_name(self) -> str:
        """What this manager's client ids and its lease holder name start with."""
        return self.identity or self.client_id or f"fleet-{socket.gethostname()}"

    def links(self) -> tuple[LinkSettings, LinkSettings, LinkSettings]:
        """The connection settings of the control link (run while the manager holds the
        lease), the job inbox and the ingest. Under ``identity`` NAME each is its own broker
        identity, NAME, NAME~jobs and NAME~ingest, so several managers (each enrolled under
        its own name) never take each other's client ids."""
        control = LinkSettings(
            host=self.host, port=self.port, client_id=self.identity or f"{self.base_name()}-lead",
            username=self.identity or self.username, password=self.password, use_tls=self.use_tls,
            tls_ca=self.tls_ca, tls_cert=self.tls_cert, tls_key=self.tls_key, clean_start=True, session_expiry_s=0,
            backoff_initial_s=0.5, backoff_max_s=5.0, max_inflight=200)
        # persistent: statuses sent while the manager restarts wait for it
        inbox = replace(control, clean_start=False, session_expiry_s=SESSION_EXPIRY_S)
        if self.identity:
            return control, inbox.for_link("jobs"), control.for_link("ingest")
        ingest_id = self.client_id or f"fleet-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        return control, replace(inbox, client_id=f"{self.base_name()}-control"), replace(control, client_id=ingest_id)


@dataclass
class ControlCounters:
    rpc: int = 0
    rpc_errors: int = 0
    desired_published: int = 0
    rejected: dict[str, int] = field(default_factory=dict)


class Control:
    """The link handler that owns the engine, registry and transfers."""

    def __init__(self, store: Store, registry: Registry, engine: Engine, transfers: Transfers,
                 ops_factory: Any, topics: Topics, fence: Fence | None = None) -> None:
        self.store = store
        self.fence = fence
        self.lost = threading.Event()  # set when a commit finds the lease taken over
        self.registry = registry
        self.engine = engine
        self.transfers = transfers
        self.topics = topics
        self.ops: Operations = ops_factory(self)
        self.counters = ControlCounters()
        self.subscribed = False
        self.committed = True
        self._next_tick = 0.0
        self._next_flush = 0.0

    # --- link handler -------------------------------------------------------------------------

    def on_connect(self, client: mqtt.Client, session_present: bool) -> None:
        self.subscribed = False
        t = self.topics
        client.subscribe([(t.all_reported(), 1), (t.all_artifact_gets(), 1), (t.all_rpc(), 1)])
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
            return self._chunk_request(client, device, message.payload, time.monotonic())
        try:
            if topic == t.reported(device) and message.payload:  # an empty retained message clears the topic
                self.engine.on_reported(decode_reported(message.payload, device=device), now)
        except ContractError as exc:
            self._reject(exc.reason, topic, exc.detail)

    def work(self, client: mqtt.Client) -> float:
        if self.lost.is_set():
            return 1.0
        now, mono = time.time(), time.monotonic()  # wall time for what is stored, monotonic for pacing
        if mono >= self._next_tick:
            self._next_tick = mono + TICK_S
            self.engine.tick(now)
        if mono >= self._next_flush:
            self._next_flush = mono + FLUSH_S
            try:
                self.engine.judge(self.store.pending_jobs(), now)
            except DatabaseError as exc:
                log.warning("cannot read job statuses; retrying", extra=fields(error=_first_line(exc)))
            self._flush(client)
        more = self.transfers.pump(client, mono)
        return 0.0 if more else min(FLUSH_S, TICK_S)

    def on_stop(self, client: mqtt.Client) -> list[mqtt.MQTTMessageInfo]:
        return self._flush(client)

    # --- messages -------------------------------------------------------------------------------

    def _flush(self, client: mqtt.Client) -> list[mqtt.MQTTMessageInfo]:
        """Commit the engine's changes, then publish the desired states they made. Nothing
        is published unless committed; on a database error the changes wait for the next try."""
        self.committed = False
        if self.lost.is_set():
            return []
        try:
            docs = self.engine.flush(self.fence)  # committed first, then published
        except LeaseLost as exc:
            log.error("lease lost: another manager runs the rollouts now", extra=fields(error=str(exc)))
            self.lost.set()
            return []
        except DatabaseError as exc:
            log.warning("store commit failed; retrying", extra=fields(error=_first_line(exc)))
            return []
        self.committed = True
        infos = []
        for doc in docs:
            infos.append(self._publish_desired(client, doc))
            self.counters.desired_published += 1
        return infos

    def _publish_desired(self, client: mqtt.Client, doc: Desired) -> mqtt.MQTTMessageInfo:
        """Signed as it leaves, with the signing key in use now (a rotated key included)."""
        return client.publish(self.topics.desired(doc.device), encode(self.registry.sign(doc)), qos=1, retain=True)

    def _chunk_request(self, client: mqtt.Client, device: str, payload: bytes, now: float) -> None:
        """``now``: time.monotonic(), the transfers' clock."""
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
                known = self.store.answer(identity, req.id) if req.op in MUTATING else None
                if known is not None:  # a request sent again (its answer was lost with a manager)
                    return self._reply(client, reply_to, correlation, known.encode())
                response = self.ops.handle(identity, req, now)
                if response.ok and req.op in MUTATING:
                    self.engine.answered(identity, req.id, encode(response).decode(), now)
                if response.ok:
                    self._flush(client)  # durable before the operator hears it is done
                    if self.lost.is_set():
                        response = RpcResponse(v=1, id=req.id, ok=False, error=RpcError(
                            code="unavailable", message="this manager lost the lease before the change was "
                                                        "committed: nothing changed; ask again"))
                    elif not self.committed:
                        response = RpcResponse(v=1, id=req.id, ok=False, error=RpcError(
                            code="unavailable", message="the store cannot be written now: the change is "
                                                        "committed once it can (see `fleet rollout status`)"))
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
        self._reply(client, reply_to, correlation, body)

    @staticmethod
    def _reply(client: mqtt.Client, reply_to: str, correlation: bytes | None, body: bytes) -> None:
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
                "transfers_waiting": self.transfers.waiting,
                "transfers_completed": t.completed, "transfers_max_active": t.max_active,
                "transfers_max_waiting": t.max_waiting, "busy": t.busy, "chunk_errors": dict(t.errors),
                "rollouts_active": sum(1 for r in list(self.engine.rollouts.values()) if r.state in ("running", "paused")),
                "control_rejected": rejected}


class JobInbox:
    """The link handler that stores every job status devices send, in small batches;
    which manager judges them is the lease's business."""

    def __init__(self, store: Store, topics: Topics) -> None:
        self.store = store
        self.topics = topics
        self.subscribed = False
        self.counters: dict[str, Any] = {"job_statuses": 0, "jobs_stored": 0, "rejected": {}}
        self._buffer: list[tuple[JobStatus, float]] = []
        self._next_flush = 0.0

    def on_connect(self, client: mqtt.Client, session_present: bool) -> None:
        self.subscribed = False
        client.subscribe([(self.topics.all_jobs(), 1)])

    def on_subscribe(self, client: mqtt.Client, reasons: list) -> None:
        if any(r.is_failure for r in reasons):
            log.error("job subscription refused", extra=fields(reasons=[str(r) for r in reasons]))
            return
        self.subscribed = True
        log.info("jobs subscribed", extra=fields(topic=self.topics.all_jobs()))

    def on_message(self, client: mqtt.Client, message: mqtt.MQTTMessage) -> None:
        topic = message.topic
        device = self.topics.device_of(topic)
        try:
            if device is None or not topic.startswith(f"{self.topics.prefix}/dev/{device}/job/"):
                raise ContractError("schema", "not a job topic")
            job = decode_job(message.payload, device=device, job=topic.rsplit("/", 1)[1])
        except ContractError as exc:
            rejected = self.counters["rejected"]
            rejected[exc.reason] = rejected.get(exc.reason, 0) + 1
            log.warning("rejected", extra=fields(reason=exc.reason, topic=topic, detail=exc.detail[:200]))
            return
        self.counters["job_statuses"] += 1
        self._buffer.append((job, time.time()))

    def work(self, client: mqtt.Client) -> float:
        if time.monotonic() >= self._next_flush:
            self._next_flush = time.monotonic() + FLUSH_S
            self.flush()
        return FLUSH_S

    def on_stop(self, client: mqtt.Client) -> list[mqtt.MQTTMessageInfo]:
        self.flush()
        return []

    def flush(self) -> None:
        if not self._buffer:
            return
        try:
            self.counters["jobs_stored"] += self.store.add_jobs(self._buffer)
            self._buffer = []
        except DatabaseError as exc:  # kept, and tried again: the broker has acked them to the device
            log.warning("cannot store job statuses; retrying", extra=fields(error=_first_line(exc),
                                                                            waiting=len(self._buffer)))


@dataclass
class Leadership:
    """What the manager holding the lease runs: the engine and its control link."""

    fence: Fence
    control: Control
    link: Link
    since: float


class Manager:
    """``fleet serve``: the ingest and the job inbox, and the control link while it holds the lease."""

    def __init__(self, settings: ManagerSettings) -> None:
        s = settings
        self.settings = s
        self.topics = Topics(s.prefix)
        if s.keys:
            Keyring(s.keys).signing_key()  # a keys directory that does not load stops the start, not a takeover
        self.store = Store.open(s.db)
        self.directory = s.artifact_dir()
        self._control_link, inbox_link, ingest_link = s.links()
        self.ingest = Ingest(self.store, prefix=s.prefix, settings=ingest_link)
        self.inbox = JobInbox(self.store, self.topics)
        self._inbox_link = Link(inbox_link, self.inbox, name="jobs")
        self.holder = f"{s.base_name()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.lease = Lease(self.store, self.holder, duration_s=0.7 * s.failover_s)
        self.leader: Leadership | None = None
        self.leaderships = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease", daemon=True)
        self.retention = Retention(self.store, dict(s.retain_events), lambda: self.leader is not None) \
            if s.retain_events else None

    def start(self) -> None:
        self.ingest.start()
        self._inbox_link.start()
        self._thread.start()
        if self.retention is not None:
            self.retention.start()

    def stop(self) -> None:
        if self.retention is not None:
            self.retention.stop()
        self._stop.set()
        self._thread.join(10)
        self._inbox_link.stop(5.0)
        self.ingest.stop()
        self.store.close()

    # --- the lease ------------------------------------------------------------------------------

    def _run(self) -> None:
        """Take the lease when it is free, keep it while the store says so, run the control
        link meanwhile; give it up on a clean stop."""
        failover = self.settings.failover_s
        renewed = 0.0  # monotonic time the last successful renewal was asked for
        while not self._stop.is_set():
            lead = self.leader
            try:
                if lead is None:
                    fence = self.lease.acquire()
                    if fence is not None:
                        renewed = time.monotonic()
                        self._lead(fence)
                elif lead.control.lost.is_set():
                    self._step_down("the store refused a commit under this manager's lease")
                else:
                    asked = time.monotonic()
                    if self.lease.renew(lead.fence):
                        renewed = asked
                    else:
                        self._step_down("the lease expired or was taken over")
            except DatabaseError as exc:
                log.warning("lease: store unreachable", extra=fields(error=_first_line(exc)))
            except Exception:  # a bug must not leave two leaders, nor none
                log.exception("lease: failed")
            if self.leader is not None and time.monotonic() - renewed > self.lease.duration_s - 0.1 * failover:
                self._step_down("the lease could not be renewed before it expires")
            self._stop.wait((0.2 if self.leader else 0.1) * failover)
        if self.leader is not None:
            fence = self.leader.fence
            self._step_down("stopping")
            try:
                self.lease.release(fence)
            except DatabaseError:
                pass  # it expires on its own

    def _lead(self, fence: Fence) -> None:
        s = self.settings
        started = time.monotonic()
        keyring = Keyring(s.keys) if s.keys else None  # read again: a key switched since the start signs now
        registry = Registry(self.store, self.directory, keyring.signing_key() if keyring else None,
                            keyring.previous() if keyring else ())
        written = registry.materialize()
        engine = Engine(self.store, registry)
        transfers = Transfers(self.directory, self.topics, max_transfers=s.max_transfers)
        control = Control(self.store, registry, engine, transfers,
                          lambda c: Operations(engine, registry, s.operators, self.stats), self.topics, fence)
        link = Link(self._control_link, control, name="control")
        self.leader = Leadership(fence, control, link, time.time())
        self.leaderships += 1
        link.start()
        active = sum(1 for r in engine.rollouts.values() if r.state in ("running", "paused"))
        log.info("lease acquired", extra=fields(holder=self.holder, epoch=fence.epoch, rollouts_active=active,
                                                artifacts_copied=written,
                                                load_s=round(time.monotonic() - started, 3)))

    def _step_down(self, why: str) -> None:
        lead, self.leader = self.leader, None
        if lead is None:
            return
        lead.link.stop(5.0)
        log.warning("lease given up", extra=fields(holder=self.holder, epoch=lead.fence.epoch, why=why))

    # --- views ----------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        store = self.store.stats()
        lead = self.leader
        control = lead.control.stats() if lead else {}
        inbox = self.inbox.counters
        rejected = dict(control.get("control_rejected", {}))
        for k, v in dict(inbox["rejected"]).items():
            rejected[k] = rejected.get(k, 0) + v
        return {**self.ingest.stats(), **control, "control_rejected": rejected, "leader": lead is not None,
                "leaderships": self.leaderships, "job_statuses": inbox["job_statuses"],
                "jobs_stored": inbox["jobs_stored"], "store_skipped": store["skipped"],
                "store_refused": store["refused"], "events_purged": self.retention.purged if self.retention else 0,
                "pid": os.getpid()}


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    lines = str(orig).strip().splitlines()
    return lines[0] if lines else type(orig).__name__
