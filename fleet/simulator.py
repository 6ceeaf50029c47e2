"""Simulated devices: many light MQTT clients in one process speaking the real contract.

Each device is a real MQTT 5 client with its own id, retained status and last will,
retained ``reported`` state and desired-state subscription, and, given a directory of
device bundles, its own credential (a client certificate or a password, over TLS). It
does what a device agent does with a desired state, minus inference: it refuses a
desired state whose signature does not verify with a pinned key, downloads the
artifact in chunks, verifies its size, sha256 and Ed25519 signature against the pinned keys,
"tests" and activates it, watches it for its own health window and commits it, or
reports why not. Faults can be injected per device: fail verification (the bytes are
corrupted on arrival), report unhealthy (roll back after activation), go offline in
the middle of a download (and come back later to finish it).

The clients are not one thread each: a few *pumps* each drive many paho clients from
one selector loop (paho's external-loop API), so a thousand devices cost a few threads.
Everything a device does runs on its pump's thread.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import logging
import queue
import selectors
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes

from edge.core.contract import (
    CHUNK_BUSY_RETRY_S,
    DEFAULT_PREFIX,
    MAX_CHUNK_BYTES,
    POLICY_SLOT,
    ArtifactRequest,
    Assignment,
    Change,
    ContractError,
    Desired,
    JobStatus,
    Reported,
    Running,
    Status,
    Topics,
    batch_body,
    decode_ack,
    decode_chunk,
    decode_desired,
    encode,
    event_json,
)
from edge.core.ids import new_id
from edge.core.signing import Keys, SignatureError, key_id, sha256_file, verify
from edge.core.tls import client_context

from .bundles import Credentials

log = logging.getLogger("fleet.simulator")

CHUNK_TIMEOUT_S = 10.0  # no answer to a chunk request for this long: ask again
RECONNECT_S = 1.0
MISC_EVERY_S = 1.0  # keepalive bookkeeping for every client


@dataclass(frozen=True)
class Faults:
    """Device ids that misbehave, and how."""

    fail_verify: frozenset[str] = frozenset()
    unhealthy: frozenset[str] = frozenset()
    offline_mid_download: frozenset[str] = frozenset()
    offline_for_s: float = 5.0


@dataclass(frozen=True)
class SimSettings:
    host: str
    port: int
    count: int
    public_key: Keys  # the key the devices pin, or several
    prefix: str = DEFAULT_PREFIX
    id_prefix: str = "sim"
    sites: int = 2
    lines: int = 2
    slot: str = "detector"
    runs: Running | None = None  # what every device runs in ``slot`` at start
    health_window_s: float = 1.0  # the device's own watch before it commits
    faults: Faults = Faults()
    pumps: int = 2
    keepalive_s: int = 60
    credentials: dict[str, Credentials] | None = None  # per device id (from its bundle); None: anonymous

    def device_ids(self) -> list[str]:
        width = max(4, len(str(self.count)))
        return [f"{self.id_prefix}-{i:0{width}d}" for i in range(self.count)]


@dataclass
class Job:
    slot: str
    assignment: Assignment
    offset: int = 0
    hasher: Any = field(default_factory=hashlib.sha256)
    request: int = 0
    reported_half: bool = False


class SimDevice:
    """One simulated device; every method runs on its pump's thread."""

    def __init__(self, device_id: str, site: str, line: str, settings: SimSettings, pump: "Pump") -> None:
        self.id = device_id
        self.site, self.line = site, line
        self.s = settings
        self.pump = pump
        self.topics = Topics(settings.prefix)
        self.running: dict[str, Running] = {settings.slot: settings.runs} if settings.runs else {}
        self.previous: dict[str, Running] = {}
        self.policy: Running | None = None
        self.acted_version = 0
        self.last_change: Change | None = None
        self.queue: list[tuple[str, Assignment]] = []
        self.job: Job | None = None
        self.jobs: dict[str, str] = {}  # job id → last state sent (for tests)
        self.online = False
        self.want_online = True
        self.offline_used = False
        self.away_for: float | None = None
        self.acks = 0
        self.commits = 0
        self.batches_sent = 0
        self.rejected: dict[str, int] = {}  # desired states refused, by reason
        keys = settings.public_key
        self.key_ids = sorted({key_id(k) for k in (keys if isinstance(keys, (list, tuple)) else [keys])})
        self.client: mqtt.Client | None = None
        self.next_connect = 0.0

    # --- connection ---------------------------------------------------------------------------

    def connect(self) -> None:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.id, protocol=mqtt.MQTTv5)
        client.max_inflight_messages_set(50)
        cred = self.s.credentials[self.id] if self.s.credentials is not None else None
        if cred is not None:
            if cred.username is not None:
                client.username_pw_set(cred.username, cred.password)
            if cred.ca_file is not None:
                client.tls_set_context(client_context(cred.ca_file, cred.cert_file, cred.key_file))
        client.will_set(self.topics.status(self.id), encode(self._status("offline")), qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        client.on_disconnect = self._on_disconnect
        self.pump.attach(self, client)
        self.client = client
        try:
            client.connect(self.s.host, self.s.port, keepalive=self.s.keepalive_s, clean_start=True)
        except OSError:
            self.pump.detach(self)
            self.client = None
            self.next_connect = time.monotonic() + RECONNECT_S

    def go_offline(self, for_s: float | None = None) -> None:
        """Drop off the network as a crash would (the broker publishes the last will);
        back after ``for_s``, or when told."""
        self.want_online = False
        self.away_for = for_s
        if self.client is not None:
            self.client.disconnect(reasoncode=mqtt.ReasonCode(PacketTypes.DISCONNECT, identifier=4))

    def come_back(self) -> None:
        self.want_online = True
        self.next_connect = 0.0

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            return
        self.online = True
        t = self.topics
        client.subscribe([(t.desired(self.id), 1), (t.ack(self.id), 1), (t.artifacts(self.id), 1)])
        client.publish(t.status(self.id), encode(self._status("online")), qos=1, retain=True)
        self._publish_reported()
        if self.job is not None:  # back from a drop mid-download: carry on where it was
            self._ask()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self.online = False
        self.pump.detach(self)
        self.client = None
        self.next_connect = time.monotonic() + RECONNECT_S
        if not self.want_online and self.away_for is not None:
            self.pump.later(self.away_for, self, self.come_back)

    def _status(self, state: str) -> Status:
        return Status(v=1, device=self.id, state=state, at=time.time(), runtime="sim", site=self.site,
                      line=self.line, models={slot: r.version for slot, r in self.running.items()})

    def _publish_reported(self) -> None:
        if self.client is None:  # offline: the reconnect publishes it
            return
        rep = Reported(v=1, device=self.id, at=time.time(), desired_version=self.acted_version or None,
                       models=dict(self.running), previous=dict(self.previous), policy=self.policy,
                       last_change=self.last_change, keys=self.key_ids)
        self.client.publish(self.topics.reported(self.id), encode(rep), qos=1, retain=True)

    def _job(self, job: str | None, slot: str, sha: str, state: str, *, reason: str | None = None,
             progress: float | None = None) -> None:
        if job is None:
            return
        self.jobs[job] = state
        if self.client is None:
            return
        body = JobStatus(v=1, device=self.id, job=job, slot=slot, sha256=sha, state=state, at=time.time(),
                         reason=reason, progress=progress)
        self.client.publish(self.topics.job(self.id, job), encode(body), qos=1)

    # --- messages ---------------------------------------------------------------------------------

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        t = self.topics
        try:
            if message.topic == t.desired(self.id):
                if message.payload:
                    doc = decode_desired(message.payload, device=self.id)
                    try:
                        verify(self.s.public_key, doc)  # like the agent: before anything is kept
                    except SignatureError as exc:
                        self.rejected[exc.reason] = self.rejected.get(exc.reason, 0) + 1
                        return
                    self._desired(doc)
            elif message.topic == t.ack(self.id):
                self.acks += 1
                decode_ack(message.payload, device=self.id)
            elif self.job is not None and message.topic == t.artifact(self.id, self.job.assignment.artifact.sha256):
                self._chunk(message.payload)
        except ContractError as exc:
            log.warning("simulated device rejected a message", extra={"fields": {
                "device": self.id, "topic": message.topic, "reason": str(exc)}})

    def _desired(self, doc: Desired) -> None:
        if doc.version <= self.acted_version:
            return
        self.acted_version = doc.version
        wanted = [(slot, a) for slot, a in sorted(doc.models.items())]
        if doc.policy is not None:
            wanted.append((POLICY_SLOT, doc.policy))
        j = self.job
        if j is not None and (j.slot, j.assignment) in wanted:
            # the new state still asks for the job in progress (it changed another slot):
            # like the device agent, carry on with it; failing it would fail its rollout
            wanted.remove((j.slot, j.assignment))
        elif j is not None:  # a newer desired state replaces what was in progress
            self.job = None
            self._job(j.assignment.job, j.slot, j.assignment.artifact.sha256, "failed",
                      reason="superseded by a newer desired state")
        self.queue = [(slot, a) for slot, a in wanted if self._needs(slot, a)]
        self._next()

    def _needs(self, slot: str, a: Assignment) -> bool:
        current = self.policy if slot == POLICY_SLOT else self.running.get(slot)
        # already there: like the device agent, no job, only the reported state that says so
        return current is None or current.sha256 != a.artifact.sha256

    def _next(self) -> None:
        if self.job is not None or not self.queue:
            self._publish_reported()
            return
        slot, a = self.queue.pop(0)
        self.job = Job(slot=slot, assignment=a)
        self._job(a.job, slot, a.artifact.sha256, "downloading", progress=0.0)
        self._ask()

    def _ask(self) -> None:
        j = self.job
        if j is None or self.client is None or not self.online:
            return
        art = j.assignment.artifact
        j.request += 1
        req = ArtifactRequest(v=1, device=self.id, sha256=art.sha256, offset=j.offset,
                              length=min(MAX_CHUNK_BYTES, art.size - j.offset), request=f"q{j.request}",
                              response_topic=self.topics.artifact(self.id, art.sha256))
        self.client.publish(self.topics.artifact_get(self.id), encode(req), qos=1)
        self.pump.later(CHUNK_TIMEOUT_S, self, lambda r=j.request: self._chunk_timeout(j, r))

    def _chunk_timeout(self, j: Job, request: int) -> None:
        if self.job is j and j.request == request:
            self._ask()

    def _chunk(self, payload: bytes) -> None:
        j = self.job
        header, data = decode_chunk(payload)
        if header.request != f"q{j.request}":
            return  # the answer to a request asked again since
        art = j.assignment.artifact
        if header.error == "busy":
            j.request += 1  # make the timeout of the old request moot
            self.pump.later(CHUNK_BUSY_RETRY_S, self, lambda: self.job is j and self._ask())
            return
        if header.error is not None or header.offset != j.offset or not data:
            return self._fail(f"download: {header.error or 'unexpected chunk'}")
        if self.id in self.s.faults.fail_verify and j.offset == 0:
            data = bytes([data[0] ^ 0xFF]) + data[1:]  # corrupted on arrival
        j.hasher.update(data)
        j.offset += len(data)
        if j.offset >= art.size or j.offset >= header.total:
            return self._verify()
        if not j.reported_half and j.offset * 2 >= art.size:
            j.reported_half = True
            self._job(j.assignment.job, j.slot, art.sha256, "downloading", progress=round(j.offset / art.size, 3))
            if self.id in self.s.faults.offline_mid_download and not self.offline_used:
                self.offline_used = True
                self.go_offline(self.s.faults.offline_for_s)
                return
        self._ask()

    def _verify(self) -> None:
        j = self.job
        art = j.assignment.artifact
        self._job(j.assignment.job, j.slot, art.sha256, "verifying")
        digest = j.hasher.hexdigest()
        if j.offset != art.size:
            return self._fail(f"size: got {j.offset} bytes, the artifact has {art.size}")
        if digest != art.sha256:
            return self._fail(f"sha256: the download hashes to {digest[:12]}…, the artifact {art.sha256[:12]}…")
        try:
            verify(self.s.public_key, art)
        except SignatureError as exc:
            return self._fail(str(exc))
        self._job(j.assignment.job, j.slot, art.sha256, "testing")
        old = self.policy if j.slot == POLICY_SLOT else self.running.get(j.slot)
        new = Running(name=art.name, version=art.version, sha256=art.sha256)
        self._set(j.slot, new, old)
        self.last_change = Change(slot=j.slot, at=time.time(), reason="activated", job=j.assignment.job)
        self._job(j.assignment.job, j.slot, art.sha256, "active")
        self._publish_reported()
        self.pump.later(self.s.health_window_s, self, lambda: self._watched(j, old))

    def _set(self, slot: str, new: Running | None, old: Running | None) -> None:
        if slot == POLICY_SLOT:
            self.policy = new
        elif new is not None:
            self.running[slot] = new
        if old is not None:
            self.previous[slot] = old

    def _watched(self, j: Job, old: Running | None) -> None:
        if self.job is not j:
            return
        art = j.assignment.artifact
        if self.id in self.s.faults.unhealthy and old is not None:
            self._set(j.slot, old, None)
            self.previous.pop(j.slot, None)
            reason = "unhealthy: error rate over the limit during the health window"
            self.last_change = Change(slot=j.slot, at=time.time(), reason=reason, job=j.assignment.job)
            self._job(j.assignment.job, j.slot, art.sha256, "rolled_back", reason=reason)
        else:
            self.commits += 1
            self._job(j.assignment.job, j.slot, art.sha256, "committed")
        self.job = None
        if self.client is not None:
            self.client.publish(self.topics.status(self.id), encode(self._status("online")), qos=1, retain=True)
        self._next()

    def _fail(self, reason: str) -> None:
        j = self.job
        self.job = None
        self.last_change = Change(slot=j.slot, at=time.time(), reason=reason, job=j.assignment.job)
        self._job(j.assignment.job, j.slot, j.assignment.artifact.sha256, "failed", reason=reason)
        self._next()

    # --- outbox traffic (for the ingest benchmark) ----------------------------------------------

    def send_batches(self, batches: int, events: int) -> None:
        if self.client is None:
            return
        for _ in range(batches):
            now = time.time()
            body = ",".join(event_json(id=new_id(), seq=self.batches_sent * events + i + 1, kind="health",
                                       device=self.id, camera="c0", captured_at=now, recorded_at=now, priority=0,
                                       payload_json=f'{{"i":{i}}}')
                            for i in range(events))
            self.client.publish(self.topics.outbox(self.id), batch_body(self.id, new_id(), now, body), qos=1)
            self.batches_sent += 1


class Pump(threading.Thread):
    """Drives many paho clients from one selector loop; owns its devices."""

    def __init__(self, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.devices: list[SimDevice] = []
        self._sel = selectors.DefaultSelector()
        self._socks: dict[SimDevice, Any] = {}
        self._timers: list[tuple[float, int, SimDevice, Callable[[], Any]]] = []
        self._seq = itertools.count()
        self._calls: queue.SimpleQueue[Callable[[], Any]] = queue.SimpleQueue()
        self._halt = threading.Event()


    def attach(self, device: SimDevice, client: mqtt.Client) -> None:
        client.on_socket_open = lambda c, u, sock: self._open(device, sock)
        client.on_socket_close = lambda c, u, sock: self._close(device)
        client.on_socket_register_write = lambda c, u, sock: self._interest(device, True)
        client.on_socket_unregister_write = lambda c, u, sock: self._interest(device, False)

    def detach(self, device: SimDevice) -> None:
        self._close(device)

    def _open(self, device: SimDevice, sock: Any) -> None:
        self._close(device)
        self._socks[device] = sock
        self._sel.register(sock, selectors.EVENT_READ, device)

    def _close(self, device: SimDevice) -> None:
        sock = self._socks.pop(device, None)
        if sock is not None:
            try:
                self._sel.unregister(sock)
            except (KeyError, ValueError):
                pass

    def _interest(self, device: SimDevice, write: bool) -> None:
        sock = self._socks.get(device)
        if sock is not None:
            try:
                self._sel.modify(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if write else 0), device)
            except (KeyError, ValueError):
                pass

    def later(self, delay: float, device: SimDevice, fn: Callable[[], Any]) -> None:
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), device, fn))

    def call(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` on this pump's thread (from any thread)."""
        self._calls.put(fn)

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        next_misc = 0.0
        while not self._halt.is_set():
            now = time.monotonic()
            while not self._calls.empty():
                self._calls.get()()
            for d in self.devices:
                if d.client is None and d.want_online and now >= d.next_connect:
                    d.connect()
            timeout = 0.05
            if self._timers:
                timeout = max(0.0, min(timeout, self._timers[0][0] - now))
            for key, mask in (self._sel.select(timeout) if self._socks else _sleep(timeout)):
                d: SimDevice = key.data
                client = d.client
                if client is None:
                    continue
                if mask & selectors.EVENT_READ:
                    rc = client.loop_read()
                    # TLS keeps decrypted bytes of its own that the selector cannot see
                    while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and _pending(client):
                        rc = client.loop_read()
                    if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                        self._lost(d)
                        continue
                if mask & selectors.EVENT_WRITE and d.client is not None:
                    if client.loop_write() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                        self._lost(d)
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                _, _, d, fn = heapq.heappop(self._timers)
                try:
                    fn()
                except Exception:  # one device's bug must not stop every device on this pump
                    log.exception("simulated device step failed", extra={"fields": {"device": d.id}})
            if now >= next_misc:
                next_misc = now + MISC_EVERY_S
                for d in self.devices:
                    if d.client is not None and d.client.loop_misc() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                        self._lost(d)
        for d in self.devices:  # goodbye with the will: the broker marks each one offline
            if d.client is not None:
                d.want_online = False
                d.client.disconnect(reasoncode=mqtt.ReasonCode(PacketTypes.DISCONNECT, identifier=4))
                d.client.loop_write()

    def _lost(self, d: SimDevice) -> None:
        if d.client is not None:
            d._on_disconnect(d.client, None, None, None, None)


def _pending(client: mqtt.Client) -> int:
    sock = client.socket()
    return sock.pending() if sock is not None and hasattr(sock, "pending") else 0


def _sleep(timeout: float) -> list:
    time.sleep(timeout)
    return []


@dataclass
class SimReport:
    """What a simulator's devices have done, summed (several processes' reports add up)."""

    devices: int = 0
    online: int = 0
    acks: int = 0
    running: Counter[str] = field(default_factory=Counter)  # sha256 in the slot → devices
    commits: Counter[int] = field(default_factory=Counter)  # jobs committed → devices that did that many
    jobs: Counter[str] = field(default_factory=Counter)  # each job's last state → jobs

    def __add__(self, other: "SimReport") -> "SimReport":
        return SimReport(self.devices + other.devices, self.online + other.online, self.acks + other.acks,
                         self.running + other.running, self.commits + other.commits, self.jobs + other.jobs)


class Simulator:
    """N simulated devices on a few pumps; start, inspect, inject faults, stop.

    ``share=(k, n)``: only every n-th device from the k-th, so that n simulators (in n
    processes) together run the ``settings.count`` devices, each with the id, site and
    line it has in one."""

    def __init__(self, settings: SimSettings, share: tuple[int, int] = (0, 1)) -> None:
        self.settings = settings
        self.pumps = [Pump(f"sim-pump-{i}") for i in range(max(1, settings.pumps))]
        self.devices: dict[str, SimDevice] = {}
        first, step = share
        ids = settings.device_ids()
        for i in range(first, settings.count, step):
            device_id = ids[i]
            pump = self.pumps[(i // step) % len(self.pumps)]
            site = f"plant-{chr(ord('a') + i % settings.sites)}"
            line = str(1 + (i // settings.sites) % settings.lines)
            d = SimDevice(device_id, site, line, settings, pump)
            pump.devices.append(d)
            self.devices[device_id] = d

    def start(self) -> None:
        for p in self.pumps:
            p.start()

    def stop(self, timeout: float = 5.0) -> None:
        for p in self.pumps:
            p.stop()
        for p in self.pumps:
            p.join(timeout)

    def online(self) -> int:
        return sum(1 for d in self.devices.values() if d.online)

    def set_online(self, device_id: str, online: bool) -> None:
        d = self.devices[device_id]
        d.pump.call(d.come_back if online else d.go_offline)

    def send_batches(self, batches: int, events: int) -> None:
        for d in self.devices.values():
            d.pump.call(lambda d=d: d.send_batches(batches, events))

    def report(self) -> SimReport:
        """What the devices have done so far (read beside the running pumps: a moment's picture)."""
        r = SimReport(devices=len(self.devices))
        for device_id, d in list(self.devices.items()):
            r.online += d.online
            r.acks += d.acks
            r.commits[d.commits] += 1
            r.jobs.update(list(d.jobs.values()))
            sha = self.running(device_id)
            if sha:
                r.running[sha] += 1
        return r

    def running(self, device_id: str, slot: str | None = None) -> str | None:
        """The sha256 a device runs in ``slot`` (default: the simulator's slot)."""
        d = self.devices[device_id]
        slot = slot or self.settings.slot
        run = d.policy if slot == POLICY_SLOT else d.running.get(slot)
        return run.sha256 if run else None


def load_running(name_version: str, path: Path) -> Running:
    """``NAME@VERSION`` and the file it is, as what a device runs."""
    name, _, version = name_version.partition("@")
    return Running(name=name, version=version, sha256=sha256_file(path))


def pick(ids: list[str], pct: float, *, seed: int = 0) -> frozenset[str]:
    """A reproducible ``pct`` percent of ``ids``, spread out."""
    import random

    return frozenset(random.Random(seed).sample(ids, round(len(ids) * pct / 100)))

