"""The operator's side of the RPC: MQTT 5 request/response through the broker.

Requests go to ``{p}/fleet/rpc/{identity}`` with a response topic under
``{p}/fleet/reply/{identity}/{session}`` and the request id as correlation data; the
client waits for the answer with that correlation. An operator needs nothing but
broker access. With a credential (a client certificate or a password) the client id is
the identity, as the fleet's broker binds it; so a second command with the same
identity takes the first one's connection over, and the first one says so and stops.
"""

from __future__ import annotations

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

from edge.core.contract import DEFAULT_PREFIX, ContractError, RpcRequest, Topics, decode_rpc_response, encode
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
        self._client.on_subscribe = lambda c, u, mid, reasons, props: self._subscribed(reasons)
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
            client.subscribe(self._reply_topic, qos=1)
            return
        self._fail(f"the broker at {self._host}:{self._port} refused {self.identity!r}: {reason} (a wrong password, "
                   "a revoked identity, or a client id other than the identity)")

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
