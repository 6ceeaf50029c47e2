"""The operator's side of the RPC: MQTT 5 request/response through the broker.

Requests go to ``{p}/fleet/rpc/{identity}`` with a response topic under
``{p}/fleet/reply/{identity}/{session}`` and the request id as correlation data; the
client waits for the answer with that correlation. An operator needs nothing but
broker access.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge.core.contract import DEFAULT_PREFIX, ContractError, RpcRequest, Topics, decode_rpc_response, encode

from .errors import OpError

CONNECT_TIMEOUT_S = 5.0
RESEND_S = 4.0  # a request unanswered this long is sent again (the manager may have changed)


class FleetClient:
    """One connection to the broker for a CLI command; use as a context manager."""

    def __init__(self, host: str, port: int, *, identity: str, prefix: str = DEFAULT_PREFIX,
                 username: str | None = None, password: str | None = None, timeout: float = 30.0) -> None:
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
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"fleet-cli-{identity}-{self._session}",
                                   protocol=mqtt.MQTTv5)
        if username is not None or identity:
            self._client.username_pw_set(username or identity, password)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = lambda c, u, mid, reasons, props: self._ready.set()
        self._client.on_message = self._on_message

    def __enter__(self) -> "FleetClient":
        try:
            self._client.connect(self._host, self._port, keepalive=30)
        except OSError as exc:
            raise OpError("unavailable", f"cannot reach the broker at {self._host}:{self._port}: "
                                         f"{exc.strerror or exc}") from None
        self._client.loop_start()
        if not self._ready.wait(CONNECT_TIMEOUT_S):
            self.close()
            raise OpError("unavailable", f"the broker at {self._host}:{self._port} did not accept the connection")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if not reason.is_failure:
            client.subscribe(self._reply_topic, qos=1)

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
