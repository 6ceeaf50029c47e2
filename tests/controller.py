"""A stand-in line controller: a real MQTT 5 subscriber that records what it receives."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retained: bool
    expiry: int | None
    at: float  # time.time() on receipt


class Controller:
    """Subscribes to ``topic`` (QoS 1). ``persistent`` keeps its session across broker
    restarts and its own reconnects, so nothing published meanwhile is missed."""

    def __init__(self, broker, topic: str, client_id: str = "line-controller", persistent: bool = False) -> None:
        self.topic = topic
        self.messages: list[Received] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.reconnect_delay_set(1, 1)
        props = Properties(PacketTypes.CONNECT)
        if persistent:
            props.SessionExpiryInterval = 3600
        self.client.connect(broker.host, broker.port, keepalive=5, clean_start=not persistent, properties=props)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError("controller did not subscribe")

    def _on_connect(self, client, userdata, flags, reason, properties) -> None:
        client.subscribe(self.topic, qos=1)

    def _on_message(self, client, userdata, message) -> None:
        expiry = getattr(message.properties, "MessageExpiryInterval", None) if message.properties else None
        with self._lock:
            self.messages.append(Received(message.topic, message.payload, bool(message.retain), expiry, time.time()))

    def received(self) -> list[Received]:
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
