"""One MQTT 5 client on a thread of its own, connected for as long as it runs.

The thread owns the paho client outright: it connects, runs the network loop, calls
its handler's hooks and publishes from the same thread, so nothing about the client
is shared. A lost or refused connection is retried with exponential backoff and
jitter (many devices losing one broker must not come back in step). Both the device's
sync and the fleet's ingest are a handler on a link.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import ssl
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .contract import LINK_SEPARATOR, link_identity
from .logs import fields
from .tls import client_context, refusal

log = logging.getLogger("edge.link")

CONNECT_TIMEOUT_S = 3.0  # TCP connect; a stop waits for at most this much of it
STOP_DRAIN_S = 0.5  # on stop, how long the last publishes may take
MAX_LOOP_WAIT_S = 0.2  # the longest the loop blocks, so a stop is noticed promptly


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class LinkSettings:
    """Where and how to connect. ``will`` is called before each attempt, so the last
    will can carry the attempt's time."""

    host: str
    port: int
    client_id: str
    keepalive_s: int = 30
    clean_start: bool = False
    session_expiry_s: int = 0  # 0: the broker drops the session when the link drops
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    use_tls: bool = False
    will: Callable[[], Will] | None = None
    max_inflight: int = 20

    def for_link(self, link: str | None) -> "LinkSettings":
        """These settings for another of the process's connections: its own client id,
        user and certificate (see :func:`link_cert`), so a broker that binds client ids
        to identities sees one identity per connection."""
        if link is None:
            return self
        return replace(self, client_id=link_identity(self.client_id, link),
                       username=link_identity(self.username, link) if self.username else None,
                       tls_cert=link_cert(self.tls_cert, link))


def link_cert(cert: str | None, link: str | None) -> str | None:
    """The client certificate of one of a process's connections: ``<stem>~<link><suffix>``
    beside the main one when that file exists (the fleet's bundles hold one per
    connection, each naming its own identity), else the main one."""
    if cert is None or link is None:
        return cert
    path = Path(cert)
    own = path.with_name(f"{path.stem}{LINK_SEPARATOR}{link}{path.suffix}")
    return str(own) if own.is_file() else cert


class Handler(Protocol):
    """What a link calls, always on its own thread."""

    def on_connect(self, client: mqtt.Client, session_present: bool) -> None: ...

    def on_message(self, client: mqtt.Client, message: mqtt.MQTTMessage) -> None: ...

    def work(self, client: mqtt.Client) -> float:
        """Do what is due while connected; return how long the loop may wait (s)."""
        ...

    def on_stop(self, client: mqtt.Client) -> list[mqtt.MQTTMessageInfo]:
        """Last publishes before the clean disconnect; the link waits briefly for them."""
        ...


@dataclass
class Backoff:
    """Exponential delays with "equal jitter": half fixed, half random."""

    initial_s: float
    max_s: float
    rng: Callable[[], float] = random.random
    attempt: int = 0

    def next(self) -> float:
        ceiling = min(self.max_s, self.initial_s * 2 ** min(self.attempt, 30))
        self.attempt += 1
        return ceiling * (0.5 + 0.5 * self.rng())

    def reset(self) -> None:
        self.attempt = 0


@dataclass
class LinkCounters:
    connects: int = 0
    disconnects: int = 0
    connect_failures: int = 0
    connected: bool = False
    last_error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """For a stats line."""
        return {"connected": self.connected, "connects": self.connects, "disconnects": self.disconnects,
                "connect_failures": self.connect_failures, "last_error": self.last_error}


def new_client(s: LinkSettings) -> mqtt.Client:
    """An MQTT 5 paho client with the settings' identity, credentials, TLS and window."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=s.client_id, protocol=mqtt.MQTTv5)
    client.connect_timeout = CONNECT_TIMEOUT_S
    client.max_inflight_messages_set(s.max_inflight)
    if s.username is not None:
        client.username_pw_set(s.username, s.password)
    if s.use_tls:
        client.tls_set_context(client_context(s.tls_ca, s.tls_cert, s.tls_key))
    return client


def connect_properties(s: LinkSettings) -> Properties:
    props = Properties(PacketTypes.CONNECT)
    if s.session_expiry_s > 0:
        props.SessionExpiryInterval = s.session_expiry_s
    return props


def publish(client: mqtt.Client, topic: str, body: bytes, *, retain: bool = False,
            properties: Properties | None = None) -> mqtt.MQTTMessageInfo | None:
    """Publish QoS 1; None (logged) if paho refused it.

    NO_CONN counts as sent: paho keeps a QoS 1 message and sends it on the reconnect.
    Anything else is lost to paho, and the caller decides what to do about it.
    """
    info = client.publish(topic, body, qos=1, retain=retain, properties=properties)
    if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
        log.warning("publish failed", extra=fields(topic=topic, error=mqtt.error_string(info.rc)))
        return None
    return info


class Link:
    """Runs ``handler`` on an MQTT 5 client until :meth:`stop`."""

    def __init__(self, settings: LinkSettings, handler: Handler, *, name: str = "mqtt") -> None:
        self.settings = settings
        self.handler = handler
        self.counters = LinkCounters()
        self._backoff = Backoff(settings.backoff_initial_s, settings.backoff_max_s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._client = self._make_client()  # after handler: it looks for optional hooks
        self._awaiting_connack = False
        self._paho_error: str | None = None  # paho's last error, e.g. why a read failed

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Say goodbye (handler's last publishes, then DISCONNECT) and join the thread."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("mqtt link did not stop in time", extra=fields(client=self.settings.client_id))

    @property
    def connected(self) -> bool:
        return self.counters.connected

    @property
    def failed(self) -> bool:
        """The thread ended without being asked to (a bug): its owner must notice."""
        return self._thread.ident is not None and not self._thread.is_alive() and not self._stop.is_set()

    def cpu_seconds(self) -> float | None:
        """CPU time the link's thread has used so far (Linux; None elsewhere or when not running)."""
        tid = self._thread.native_id
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields_ = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError, TypeError):
            return None
        return (int(fields_[11]) + int(fields_[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    # --- the thread --------------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        client = new_client(self.settings)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_log = self._on_log
        on_subscribe = getattr(self.handler, "on_subscribe", None)
        if on_subscribe is not None:  # optional: who needs to know the subscription is live
            client.on_subscribe = lambda c, userdata, mid, reasons, props: on_subscribe(c, reasons)
        return client

    def _run(self) -> None:
        client = self._client
        wait = 0.0
        socket_open = False
        try:
            while not self._stop.is_set():
                if not socket_open:
                    socket_open = self._connect(client)
                    if not socket_open:
                        self._stop.wait(self._backoff.next())
                        continue
                rc = client.loop(timeout=min(wait, MAX_LOOP_WAIT_S))
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    socket_open = False
                    self._lost(rc)
                    self._stop.wait(self._backoff.next())
                    continue
                wait = self._work(client) if self.counters.connected else 0.1
            if socket_open:
                self._goodbye(client)
        except Exception:  # a bug here must be loud, not a silently dead link
            log.exception("mqtt link failed", extra=fields(client=self.settings.client_id))
            self.counters.connected = False

    def _work(self, client: mqtt.Client) -> float:
        try:
            return self.handler.work(client)
        except Exception:  # e.g. a disk error reading the outbox: log it, keep the link up
            log.exception("link work failed", extra=fields(client=self.settings.client_id))
            return 1.0

    def _connect(self, client: mqtt.Client) -> bool:
        s = self.settings
        if s.will is not None:
            will = s.will()
            client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        try:
            self._paho_error = None
            client.connect(s.host, s.port, keepalive=s.keepalive_s, clean_start=s.clean_start,
                           properties=connect_properties(s))
            sock = client.socket()
            if sock is not None:  # an ack is small and waited for: no Nagle delay on it
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._awaiting_connack = True
            return True
        except ssl.SSLCertVerificationError as exc:  # the broker's certificate
            self._connect_failed(f"TLS: the broker's certificate does not verify against "
                                 f"{s.tls_ca or 'the system CAs'}: {exc.verify_message}")
        except (OSError, ValueError) as exc:  # refused, unreachable, DNS, TLS handshake
            self._connect_failed(f"{type(exc).__name__}: {exc}")
        return False

    def _connect_failed(self, error: str) -> None:
        """Each failure counts; the first of a run is a warning, the rest are info."""
        s = self.settings
        self.counters.connect_failures += 1
        self.counters.last_error = error
        level = logging.WARNING if self.counters.connect_failures == 1 else logging.INFO
        log.log(level, "mqtt connect failed", extra=fields(
            broker=f"{s.host}:{s.port}", client=s.client_id, error=error, attempt=self._backoff.attempt + 1))

    def _lost(self, rc: MQTTErrorCode) -> None:
        reason = self._paho_error or mqtt.error_string(rc)
        if self._awaiting_connack:  # closed before the broker answered CONNECT
            self._awaiting_connack = False
            if self.settings.use_tls:
                reason = refusal(self.settings.tls_ca, self.settings.tls_cert, reason)
            self._connect_failed(reason)
            return
        if self.counters.connected:  # paho did not report it (e.g. a read error)
            self.counters.connected = False
            self.counters.disconnects += 1
            log.warning("mqtt connection lost", extra=fields(client=self.settings.client_id, reason=reason))
        self.counters.last_error = reason

    def _goodbye(self, client: mqtt.Client) -> None:
        infos = self.handler.on_stop(client) if self.counters.connected else []
        deadline = time.monotonic() + STOP_DRAIN_S
        while time.monotonic() < deadline and not all(i.is_published() for i in infos):
            if client.loop(timeout=0.05) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
        client.disconnect()
        for _ in range(10):  # let the DISCONNECT out
            if client.loop(timeout=0.02) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
        self.counters.connected = False

    # --- paho callbacks (on this thread, inside client.loop) ----------------------------

    def _on_log(self, client: mqtt.Client, userdata: Any, level: int, message: str) -> None:
        if level == mqtt.MQTT_LOG_ERR and not message.startswith("Client is not connected"):
            self._paho_error = message

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self._awaiting_connack = False
        if reason.is_failure:
            self.counters.connect_failures += 1
            self.counters.last_error = self._paho_error = f"refused: {reason}"  # what the lost link says next
            log.error("mqtt connect refused", extra=fields(client=self.settings.client_id, reason=str(reason),
                                                           username=self.settings.username))
            return
        self.counters.connected = True
        self.counters.connects += 1
        self._backoff.reset()
        log.info("mqtt connected", extra=fields(broker=f"{self.settings.host}:{self.settings.port}",
                                                client=self.settings.client_id,
                                                session_present=bool(flags.session_present)))
        self.handler.on_connect(client, bool(flags.session_present))

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if self.counters.connected:
            self.counters.disconnects += 1
            if not self._stop.is_set():
                log.warning("mqtt connection lost", extra=fields(client=self.settings.client_id, reason=str(reason)))
        self.counters.connected = False

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            self.handler.on_message(client, message)
        except Exception:  # one bad message must never stop the link
            log.exception("message handler failed", extra=fields(topic=message.topic))
