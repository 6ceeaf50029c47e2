"""Alerts to line controllers over MQTT: out in milliseconds, never behind the outbox.

The publisher has its own MQTT 5 client, apart from the metadata sync, so a backlog of
metadata can never delay an alert. An alert is published from the thread that decided
it, straight into paho's send path (paho's own network thread, started with
``loop_start``, is woken by the publish), so no queue or poll interval sits between
a decision and the socket.

While the broker is unreachable alerts wait in a bounded queue, oldest dropped first
(and counted) if it ever fills, and go out on reconnect, in order, marked
``delayed`` and with their original capture time. Each message carries an MQTT 5
message expiry, so a controller that was itself away never receives one that is too
old to act on. A rule's retained state topic keeps only the latest state per topic
while offline.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from typing import Any, Callable

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge.config import DeviceInfo, MqttConfig
from edge.core.contract import Alert, AlertState, Topics, encode
from edge.core.link import Backoff, LinkSettings, connect_properties, new_client, publish
from edge.core.logs import fields
from edge.sync.client import link_settings

log = logging.getLogger("edge.alerts")

DEFAULT_MAX_PENDING = 1000


class AlertPublisher:
    """Publishes alerts and rule states for one device; ``start`` / ``stop``."""

    def __init__(self, settings: LinkSettings, device: DeviceInfo, topics: Topics, *,
                 max_pending: int = DEFAULT_MAX_PENDING, clock: Callable[[], float] = time.time,
                 rng: Callable[[], float] = random.random) -> None:
        self.device = device
        self.topics = topics
        self._settings = settings
        self._clock = clock
        self._lock = threading.Lock()  # connected flag, queue and the order of publishes
        self._connected = False
        self._stopping = False
        self._pending: deque[tuple[Alert, str, int]] = deque(maxlen=max_pending)
        self._states: dict[str, bytes] = {}  # latest retained state per topic, while offline
        self.counters: dict[str, int] = {"published": 0, "delayed": 0, "dropped_queue_full": 0,
                                         "publish_errors": 0, "states": 0, "connects": 0, "disconnects": 0}
        self.by_rule: dict[str, dict[str, int]] = {}  # rule -> published, delayed, dropped
        # told (alert as sent, clock time paho's publish call was entered, and returned) after
        # each publish: a benchmark splits with it the device's share of a publish from the broker's
        self.on_sent: Callable[[Alert, float, float], None] | None = None
        self._backoff = Backoff(settings.backoff_initial_s, settings.backoff_max_s, rng)
        client = new_client(settings)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = lambda c, userdata: self._next_delay()
        self._client = client
        self._next_delay()

    @classmethod
    def for_device(cls, cfg: MqttConfig, device: DeviceInfo, **kw: Any) -> "AlertPublisher":
        return cls(link_settings(cfg, device.id, "alerts", max_inflight=100), device, Topics(cfg.prefix), **kw)

    def topic(self, camera: str) -> str:
        """The camera's default alert topic."""
        return self.topics.alert(self.device.site, self.device.line, camera)

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        s = self._settings
        self._client.connect_async(s.host, s.port, keepalive=s.keepalive_s, clean_start=s.clean_start,
                                   properties=connect_properties(s))
        self._client.loop_start()

    def stop(self, timeout: float = 0.5) -> None:
        """Give in-flight alerts ``timeout`` to be acknowledged, then disconnect."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._connected and self._client.want_write():
            time.sleep(0.01)
        self._stopping = True  # a goodbye, not a lost link
        self._client.disconnect()
        self._client.loop_stop()

    @property
    def connected(self) -> bool:
        return self._connected

    # --- publishing ----------------------------------------------------------------------

    def submit(self, alert: Alert, topic: str | None, expiry_s: int) -> bool:
        """Publish now if connected (True), else queue it for the reconnect (False)."""
        topic = topic or self.topic(alert.camera)
        with self._lock:
            if self._connected and not self._pending:
                return self._publish(alert, topic, expiry_s, delayed=False)
            if len(self._pending) == self._pending.maxlen:
                self.counters["dropped_queue_full"] += 1
                self._count_rule(self._pending[0][0].rule, "dropped")
                log.error("alert queue full: oldest alert dropped", extra=fields(max=self._pending.maxlen))
            self._pending.append((alert, topic, expiry_s))
            return False

    def set_state(self, state: AlertState, topic: str | None) -> None:
        """Publish a rule's retained state (the latest one only, if offline)."""
        topic = topic or self.topics.alert_state(self.device.site, self.device.line, state.camera, state.rule)
        body = encode(state)
        with self._lock:
            self.counters["states"] += 1
            if self._connected:
                self._raw(topic, body, retain=True)
            else:
                self._states[topic] = body

    def _publish(self, alert: Alert, topic: str, expiry_s: int, *, delayed: bool) -> bool:
        sent = alert.model_copy(update={"published_at": self._clock(), "delayed": delayed})
        props = Properties(PacketTypes.PUBLISH)
        props.MessageExpiryInterval = expiry_s
        body = encode(sent)
        entered = self._clock()
        ok = self._raw(topic, body, properties=props)
        if ok and self.on_sent is not None:
            self.on_sent(sent, entered, self._clock())
        if ok:
            self.counters["published"] += 1
            self.counters["delayed"] += delayed
            self._count_rule(alert.rule, "published")
            if delayed:
                self._count_rule(alert.rule, "delayed")
        return ok

    def _count_rule(self, rule: str, key: str) -> None:  # under self._lock
        counts = self.by_rule.get(rule)
        if counts is None:
            counts = self.by_rule[rule] = {"published": 0, "delayed": 0, "dropped": 0}
        counts[key] += 1

    def _raw(self, topic: str, body: bytes, *, retain: bool = False, properties: Properties | None = None) -> bool:
        if publish(self._client, topic, body, retain=retain, properties=properties) is None:
            self.counters["publish_errors"] += 1
            return False
        return True

    # --- paho callbacks (on paho's network thread) -----------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.error("alert link refused", extra=fields(reason=str(reason)))
            return
        self._backoff.reset()
        with self._lock:
            self._connected = True
            self.counters["connects"] += 1
            waiting = len(self._pending)
            while self._pending:
                self._publish(*self._pending.popleft(), delayed=True)
            for topic, body in self._states.items():
                self._raw(topic, body, retain=True)
            self._states.clear()
        log.info("alert link connected", extra=fields(broker=f"{self._settings.host}:{self._settings.port}",
                                                      delayed_alerts=waiting))

    def _next_delay(self) -> None:
        """paho's own reconnect delay doubles with no jitter, so a plant's cameras would all
        reconnect in step after an outage: give it the link's backoff (exponential, equal
        jitter) as its next delay, after each loss and each failed attempt."""
        delay = self._backoff.next()
        self._client.reconnect_delay_set(delay, delay)  # type: ignore[arg-type]  # floats work

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self._next_delay()
        with self._lock:
            if self._connected and not self._stopping:
                self.counters["disconnects"] += 1
                log.warning("alert link lost", extra=fields(reason=str(reason)))
            self._connected = False

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"connected": self._connected, "pending": len(self._pending), **self.counters,
                    "by_rule": {rule: dict(c) for rule, c in self.by_rule.items()}}
