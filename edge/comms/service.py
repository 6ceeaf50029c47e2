"""The line's MQTT connection: one :class:`~edge.core.link.Link` (its own thread, which
reconnects with backoff and jitter) carries the Sparkplug edge node, Home Assistant
discovery and the commands.

The thread owns everything here: on each connect it subscribes to the command topics,
then publishes the births and the discovery config; every ``scan_ms`` it builds a
:class:`LineView` and publishes what changed; it decodes and applies commands as they
arrive. Nothing on the frame path waits for it or does any work for it: the view is
read from counters and states the other stages keep anyway. Under Sparkplug the session
is clean (``Clean Start``, no session expiry) and its will is the NDEATH, as the
specification asks; a clean stop publishes the NDEATH itself before disconnecting.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from typing import Any, Callable, Iterable

import paho.mqtt.client as mqtt

from edge.config import DeviceConfig
from edge.core.contract import Topics, encode
from edge.core.link import Link, Will, publish
from edge.core.logs import fields
from edge.decide.engine import DecisionEngine
from edge.observe.observer import ObserveSnapshot
from edge.schedule.scheduler import CameraRunner
from edge.sync.client import link_settings
from edge.sync.events import Event

from .commands import Commander
from .homeassistant import ONLINE, Discovery
from .sparkplug import EdgeNode, Rebirth, SparkplugError
from .view import ViewBuilder

log = logging.getLogger("edge.comms")

DEFAULT_SCAN_S = 0.1


class LineComms:
    """Everything the line controllers see of the device beyond its alerts; ``start`` / ``stop``."""

    def __init__(self, cfg: DeviceConfig, engine: DecisionEngine, cameras: Iterable[CameraRunner],
                 observe: Callable[[], ObserveSnapshot], model_version: Callable[[str, str], str | None],
                 audit: Callable[[Event], Any] | None = None) -> None:
        assert cfg.mqtt is not None, "the config requires mqtt with sparkplug, homeassistant or commands"
        cameras = list(cameras)
        self.device = cfg.device
        self.topics = Topics(cfg.mqtt.prefix)
        self.view = ViewBuilder(cameras, engine, observe, model_version)
        observed = cfg.observe
        self.node = (EdgeNode(cfg.sparkplug, cfg.device, quality=observed.quality.enabled,
                              drift=observed.drift.enabled) if cfg.sparkplug is not None else None)
        self.commander = (Commander(cfg.device, self.topics, engine, [c.cfg.id for c in cameras],
                                    cfg.commands.state_file, audit) if cfg.commands is not None else None)
        self.discovery = (Discovery(cfg.homeassistant, cfg.device, self.topics, commands=self.commander is not None)
                          if cfg.homeassistant is not None else None)
        self._scan_s = cfg.sparkplug.scan_ms / 1e3 if cfg.sparkplug is not None else DEFAULT_SCAN_S
        self._next_scan = 0.0
        self._fresh = False  # connected, births and discovery not yet sent
        self._rebirth = False
        self._announce = False  # Home Assistant came online: discovery again
        self._components: tuple[str, ...] | None = None
        self._summaries: dict[str, bytes] = {}  # camera -> last summary sent, without its time
        self.counters: dict[str, Any] = {"sparkplug_rejected": {}, "summaries": 0, "discoveries": 0,
                                         "publish_errors": 0}
        settings = link_settings(cfg.mqtt, f"edge-{cfg.device.id}-line",
                                 will=self._will if self.node is not None else None, max_inflight=50)
        # Sparkplug sessions are clean: a host must never see stale subscriptions or queued commands
        self._link = Link(replace(settings, clean_start=True, session_expiry_s=0), self, name="comms")

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        if self.commander is not None:
            self.commander.restore()
        self._link.start()

    def stop(self, timeout: float = 1.0) -> None:
        """NDEATH (under Sparkplug), disconnect, join the thread."""
        self._link.stop(timeout)

    @property
    def connected(self) -> bool:
        return self._link.connected

    @property
    def failed(self) -> bool:
        return self._link.failed

    def cpu_seconds(self) -> float | None:
        """CPU time the comms thread has used (what the line's second view costs)."""
        return self._link.cpu_seconds()

    def stats(self) -> dict[str, Any]:
        doc: dict[str, Any] = {**self._link.counters.as_dict(), **self.counters,
                               "sparkplug_rejected": dict(self.counters["sparkplug_rejected"])}
        if self.node is not None:
            doc["sparkplug"] = {"bdSeq": self.node.bd_seq, **self.node.counters}
        if self.commander is not None:
            doc["commands"] = self.commander.stats()
        return doc

    def _will(self) -> Will:
        assert self.node is not None
        return Will(self.node.topics.node("NDEATH"), self.node.new_session(), qos=1, retain=False)

    # --- link handler (all on the link's thread) ---------------------------------------------

    def on_connect(self, client: mqtt.Client, session_present: bool) -> None:
        if self.node is not None:  # subscribed before the births, as the specification asks
            client.subscribe(self.node.topics.node("NCMD"), qos=1)
            client.subscribe(self.node.topics.device("DCMD", "+"), qos=1)
        if self.commander is not None:
            client.subscribe(self.commander.topic, qos=1)
        if self.discovery is not None:
            client.subscribe(self.discovery.status_topic, qos=1)
        self._fresh = True

    def on_message(self, client: mqtt.Client, message: mqtt.MQTTMessage) -> None:
        topic = message.topic
        if self.commander is not None and topic == self.commander.topic:
            result = self.commander.from_topic(topic, message.payload)
            if result is not None:
                self._publish(client, self.commander.result_topic, encode(result))
        elif self.node is not None and topic.startswith("spBv1.0/"):
            self._sparkplug_command(topic, message.payload)
        elif self.discovery is not None and topic == self.discovery.status_topic:
            if message.payload.strip() == ONLINE:
                log.info("home assistant is online: discovery again")
                self._announce = True

    def _sparkplug_command(self, topic: str, data: bytes) -> None:
        assert self.node is not None
        try:
            command = self.node.command(topic, data)
        except SparkplugError as exc:
            rejected = self.counters["sparkplug_rejected"]
            rejected[exc.reason] = rejected.get(exc.reason, 0) + 1
            if self.commander is not None and "/DCMD/" in topic:
                self.commander.refuse_sparkplug(topic, exc.reason, exc.detail)
            else:
                log.warning("sparkplug command rejected", extra=fields(topic=topic, reason=exc.reason,
                                                                       error=exc.detail[:300]))
            return
        if isinstance(command, Rebirth):
            log.info("sparkplug rebirth requested")
            self._rebirth = True
        elif self.commander is None:
            rejected = self.counters["sparkplug_rejected"]
            rejected["not_writable"] = rejected.get("not_writable", 0) + 1
            log.warning("sparkplug DCMD refused: commands are not enabled (`commands:` in the config)",
                        extra=fields(topic=topic))
        else:
            self.commander.from_sparkplug(topic, command)
            self._next_scan = 0.0  # the new values go out at once

    def work(self, client: mqtt.Client) -> float:
        now = time.monotonic()
        fresh = self._fresh
        if not fresh and not self._rebirth and not self._announce and now < self._next_scan:
            return self._next_scan - now
        self._next_scan = now + self._scan_s
        view = self.view.build()
        if self.node is not None:
            if fresh or self._rebirth:
                self._rebirth = False
                messages = self.node.birth(view)
            else:
                messages = self.node.data(view)
            for topic, payload in messages:
                self._publish(client, topic, payload, qos=0)
        if self.discovery is not None:
            components = self.discovery.components(view)
            if fresh or self._announce or tuple(components) != self._components:
                self._announce = False
                self._components = tuple(components)
                config = json.dumps(self.discovery.config(components), separators=(",", ":")).encode()
                self._publish(client, self.discovery.config_topic, config, retain=True, qos=1)
                self.counters["discoveries"] += 1
                self._summaries.clear()  # a fresh Home Assistant reads them again too
            for camera in view.cameras:
                topic, body = self.discovery.summary(view, camera)
                key = _without_time(body)
                if self._summaries.get(camera) != key:
                    self._summaries[camera] = key
                    self._publish(client, topic, body, retain=True, qos=1)
                    self.counters["summaries"] += 1
        self._fresh = False
        return self._scan_s

    def on_stop(self, client: mqtt.Client) -> list[mqtt.MQTTMessageInfo]:
        if self.node is None:
            return []
        # a clean stop says so itself; the will stays for a death the node cannot announce
        info = publish(client, self.node.topics.node("NDEATH"), self.node.death())
        return [info] if info is not None else []

    def _publish(self, client: mqtt.Client, topic: str, body: bytes, *, qos: int = 1, retain: bool = False) -> None:
        if qos == 1:
            ok = publish(client, topic, body, retain=retain) is not None
        else:
            ok = client.publish(topic, body, qos=0, retain=retain).rc == mqtt.MQTT_ERR_SUCCESS
        if not ok:
            self.counters["publish_errors"] += 1


def _without_time(body: bytes) -> bytes:
    doc = json.loads(body)
    doc.pop("at", None)
    return json.dumps(doc, sort_keys=True).encode()
