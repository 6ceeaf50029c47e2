"""The operator's side of the RPC: MQTT 5 request/response through the broker.

Requests go to ``{p}/fleet/rpc/{identity}`` with a response topic under
``{p}/fleet/reply/{identity}/{session}`` and the request id as correlation data; the
client waits for the answer with that correlation. An operator needs nothing but
broker access. With a credential (a client certificate or a password) the client id is
the identity, as the fleet's broker binds it; so a second command with the same
identity takes the first one's connection over, and the first one says so and stops.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge.core.contract import (
    DEFAULT_PREFIX,
    ContractError,
    ReviewRequest,
    RpcRequest,
    Topics,
    decode_review_chunk,
    decode_rpc_response,
    encode,
)
from edge.core.tls import client_context, refusal

from .errors import OpError

CONNECT_TIMEOUT_S = 5.0
RESEND_S = 4.0  # a request unanswered this long is sent again (the manager may have changed)
TAKEN_OVER = 142  # MQTT 5 reason code: another client connected with this client id


@dataclass(frozen=True)
class Tls:
    """TLS to the broker: the CA that signed its certificate, and the client's own."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None


class FleetClient:
    """One connection to the broker for a CLI command; use as a context manager."""

    def __init__(self, host: str, port: int, *, identity: str, prefix: str = DEFAULT_PREFIX,
                 username: str | None = None, password: str | None = None, timeout: float = 30.0,
                 tls: Tls | None = None) -> None:
        self.topics = Topics(prefix)
        self.identity = identity
        self.timeout = timeout
        self._request_topic = self.topics.rpc(identity)
        self._session = secrets.token_hex(6)
        self._reply_topic = self.topics.rpc_reply(identity, self._session)
        self._host, self._port = host, port
        self._answers: dict[bytes, Any] = {}
        self._cond = threading.Condition()
        self._ready = threading.Event()
        self._tls = tls
        self._failure: str | None = None  # why the connection is gone (refused, taken over, lost)
        self._paho_error = ""
        user = username or identity
        bound = password is not None or (tls is not None and tls.cert is not None)
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5,
                                   client_id=user if bound else f"fleet-cli-{identity}-{self._session}")
        self._client.username_pw_set(user, password)
        if tls is not None:
            self._client.tls_set_context(client_context(tls.ca, tls.cert, tls.key))
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_log = self._on_log
        self._client.on_subscribe = lambda c, u, mid, reasons, props: self._on_subscribe(mid, reasons)
        self._reply_mid: int | None = None
        self._subacks: dict[int, list] = {}
        self._chunks: dict[str, list[bytes]] = {}  # a fetch's reply topic -> what arrived on it
        self._client.on_message = self._on_message

    def __enter__(self) -> "FleetClient":
        where = f"{self._host}:{self._port}"
        try:
            self._client.connect(self._host, self._port, keepalive=30)
        except ssl.SSLCertVerificationError as exc:
            raise OpError("unavailable", f"TLS: the broker's certificate at {where} does not verify against "
                                         f"{self._tls.ca if self._tls and self._tls.ca else 'the system CAs'}: "
                                         f"{exc.verify_message}") from None
        except ssl.SSLError as exc:
            raise OpError("unavailable", f"TLS to {where} failed: {exc.reason or exc}") from None
        except OSError as exc:
            raise OpError("unavailable", f"cannot reach the broker at {where}: {exc.strerror or exc}") from None
        self._client.loop_start()
        if not self._ready.wait(CONNECT_TIMEOUT_S) or self._failure:
            self.close()
            raise OpError("unavailable", self._failure or f"the broker at {where} did not accept the connection")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if not reason.is_failure:
            self._reply_mid = client.subscribe(self._reply_topic, qos=1)[1]
            return
        self._fail(f"the broker at {self._host}:{self._port} refused {self.identity!r}: {reason} (a wrong password, "
                   "a revoked identity, or a client id other than the identity)")

    def _on_subscribe(self, mid: int, reasons: list) -> None:
        if mid == self._reply_mid:
            self._subscribed(reasons)
            return
        with self._cond:
            self._subacks[mid] = reasons
            self._cond.notify_all()

    def _subscribed(self, reasons: list) -> None:
        if any(r.is_failure for r in reasons):
            self._fail(f"the broker does not let this client read {self.identity!r}'s replies ({reasons[0]}): "
                       f"is {self.identity!r} enrolled as an operator, and is the certificate its own?")
        self._ready.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if self._failure is not None:
            return
        if getattr(reason, "value", None) == TAKEN_OVER:
            self._fail(f"another client connected as {self.identity!r} and took this connection over "
                       "(the broker allows one connection per identity)")
        elif not self._ready.is_set() and self._tls is not None:
            self._fail(refusal(self._tls.ca, self._tls.cert, self._paho_error))
        elif self._ready.is_set():
            self._fail(f"the broker closed the connection: {reason}")

    def _on_log(self, client: mqtt.Client, userdata: Any, level: int, message: str) -> None:
        if level == mqtt.MQTT_LOG_ERR:
            self._paho_error = message

    def _fail(self, why: str) -> None:
        """The connection is gone for good: no reconnect, every waiting call ends with ``why``."""
        self._failure = why
        self._client.disconnect()  # stops paho's reconnect loop
        self._ready.set()
        with self._cond:
            self._cond.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._cond:
            if message.topic in self._chunks:
                self._chunks[message.topic].append(message.payload)
                self._cond.notify_all()
                return
        correlation = getattr(message.properties, "CorrelationData", None)
        with self._cond:
            self._answers[bytes(correlation or b"")] = message.payload
            self._cond.notify_all()

    def call(self, op: str, args: dict[str, Any] | None = None, *, timeout: float | None = None) -> Any:
        """The result of ``op``, or OpError with the manager's code and message."""
        request = RpcRequest(v=1, id=secrets.token_hex(8), op=op, args=args or {})
        key = request.id.encode()
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self._reply_topic
        props.CorrelationData = key
        body = encode(request)
        self._client.publish(self._request_topic, body, qos=1, properties=props)
        deadline = time.monotonic() + (timeout or self.timeout)
        resend = time.monotonic() + RESEND_S
        with self._cond:
            while key not in self._answers:
                if self._failure is not None:
                    raise OpError("unavailable", self._failure)
                now = time.monotonic()
                if now >= deadline:
                    raise OpError("timeout", f"no answer to {op} within {timeout or self.timeout:g}s: is "
                                             f"`fleet serve` running on this broker and prefix {self.topics.prefix}?")
                if now >= resend:  # the same id: a manager that already did it answers from its store
                    self._client.publish(self._request_topic, body, qos=1, properties=props)
                    resend = now + RESEND_S
                self._cond.wait(min(deadline, resend) - now)
            payload = self._answers.pop(key)
        try:
            response = decode_rpc_response(payload)
        except ContractError as exc:
            raise OpError("internal", f"unreadable answer to {op}: {exc}") from None
        if not response.ok:
            error = response.error
            raise OpError(error.code if error else "internal", error.message if error else "request failed")
        return response.result

    def fetch_snapshot(self, device: str, snapshot: str, *, sha256: str | None = None,
                       timeout: float | None = None) -> bytes:
        """The JPEG of ``snapshot``, straight from ``device`` to this identity's own reply
        topic (the manager is not on the way); OpError with the device's reason when it
        refuses, ``bad_data`` when the bytes do not match ``sha256`` (the hash the fleet
        store holds)."""
        request = secrets.token_hex(8)
        reply = self.topics.review_reply(device, self.identity, request)
        wait = timeout or self.timeout
        with self._cond:
            self._chunks[reply] = []
        try:
            mid = self._client.subscribe(reply, qos=1)[1]
            deadline = time.monotonic() + wait
            with self._cond:
                if not self._cond.wait_for(lambda: mid in self._subacks or self._failure is not None,
                                           max(0.0, deadline - time.monotonic())):
                    raise OpError("timeout", "the broker did not answer the subscription to the reply topic")
                if self._failure is not None:
                    raise OpError("unavailable", self._failure)
                if any(r.is_failure for r in self._subacks.pop(mid)):
                    raise OpError("forbidden", f"the broker does not let {self.identity!r} read {reply}: is it "
                                               "enrolled as an operator under a broker config that knows reviews?")
            body = ReviewRequest(v=1, device=device, operator=self.identity, snapshot=snapshot, request=request,
                                 reply_topic=reply)
            self._client.publish(self.topics.review_get(device, self.identity), encode(body), qos=1)
            return self._assemble(device, snapshot, reply, sha256, deadline)
        finally:
            self._client.unsubscribe(reply)
            with self._cond:
                self._chunks.pop(reply, None)

    def _assemble(self, device: str, snapshot: str, reply: str, sha256: str | None, deadline: float) -> bytes:
        parts: dict[int, bytes] = {}
        total: int | None = None
        digest: str | None = None
        while total is None or sum(map(len, parts.values())) < total:
            with self._cond:
                if not self._cond.wait_for(lambda: self._chunks[reply] or self._failure is not None,
                                           max(0.0, deadline - time.monotonic())):
                    raise OpError("timeout", f"no answer from {device} (is it online, and does its runtime "
                                             "serve snapshot fetches?)" if total is None else
                                  f"{device} stopped sending {snapshot} halfway; fetch it again")
                if self._failure is not None:
                    raise OpError("unavailable", self._failure)
                arrived, self._chunks[reply] = self._chunks[reply], []
            for payload in arrived:
                try:
                    header, data = decode_review_chunk(payload, device=device)
                except ContractError as exc:
                    raise OpError("bad_data", f"{device} sent a chunk that breaks the contract: {exc}") from None
                if header.snapshot != snapshot:
                    raise OpError("bad_data", f"{device} answered with another snapshot, {header.snapshot}")
                if header.error is not None:
                    raise OpError(header.error, f"{device} refused: {header.detail or header.error}")
                total, digest = header.total, header.sha256
                parts[header.offset] = data
        blob = b"".join(parts[k] for k in sorted(parts))
        got = hashlib.sha256(blob).hexdigest()
        if len(blob) != total or got != digest or (sha256 is not None and got != sha256):
            raise OpError("bad_data", f"{snapshot} from {device} does not match its hash "
                                      f"({got[:16]}…, the fleet store has {(sha256 or digest or '')[:16]}…)")
        return blob

    def publish_raw(self, payload: bytes, *, topic: str | None = None, reply: bool = True) -> dict[str, Any] | None:
        """Send arbitrary bytes as a request (for tests of malformed input); the raw answer."""
        props = Properties(PacketTypes.PUBLISH)
        key = secrets.token_hex(8).encode()
        if reply:
            props.ResponseTopic = self._reply_topic
            props.CorrelationData = key
        self._client.publish(topic or self._request_topic, payload, qos=1, properties=props)
        deadline = time.monotonic() + 5.0
        with self._cond:
            while key not in self._answers and time.monotonic() < deadline:
                self._cond.wait(0.1)
            answer = self._answers.pop(key, None)
        return json.loads(answer) if answer else None
