"""The device's side of the MQTT contract: status, outbox batches, the fleet's acks.

Batches go out QoS 1 on ``{p}/dev/{id}/outbox``, at most ``window`` of them awaiting
an ack at a time. The broker's PUBACK only says the broker has the message; rows are
deleted when the fleet's ack naming the batch id arrives on ``{p}/dev/{id}/ack``,
which the fleet sends after its own commit. A batch not acked within
``ack_timeout_s`` is sent again with the same id and events; the fleet stores events
by id, so a copy changes nothing. After a restart the in-flight list is gone: the
rows are still in the outbox and go out again in new batches, with the same effect.

The session is persistent (``clean_start=False`` and a session expiry), so an ack
published while the device was briefly away is delivered when it returns. The status
is retained: online on connect, offline by the last will if the device vanishes, or
by the device itself on a clean stop.

A batch can reach no one: the broker has no member of the fleet's shared subscription
while a manager (re)connects, and after a broker restart the device may be back before
any manager is. So the window in flight is sent again at once on every reconnect and
whenever a manager's ingest announces it has subscribed (``{p}/fleet/ingest/online``),
rather than only after ``ack_timeout_s``: whichever side is back first, the backlog
drains as soon as both are.

A batch nobody acknowledges is sent again with exponential backoff and jitter, from
``ack_timeout_s`` up to ``resend_max_s``: a manager that stays down costs a metered link
a few re-sends an hour, not a window every ack timeout. A reconnect or an announcement
starts the backoff afresh. A batch that goes unacknowledged while the fleet acks later
ones, or that the fleet says it refuses (a newer event kind than it knows, say), is
*parked*: it leaves the window, so the rest keeps flowing, its rows stay in the outbox, and it is
offered again every ``resend_max_s``; parked batches are counted in the stats.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Mapping

import paho.mqtt.client as mqtt

from edge import __version__
from edge.config import DeviceInfo, MqttConfig
from edge.core.contract import ContractError, Status, Topics, batch_body, decode_ack, decode_ingest_online, encode
from edge.core.ids import new_id
from edge.core.link import Link, LinkSettings, Will, publish
from edge.core.logs import fields

from .outbox import Batch, Outbox
from .review import Exporter

log = logging.getLogger("edge.sync")

IDLE_POLL_S = 0.05  # how often an idle link looks for new commits
MAX_WAIT_S = 0.5
RESEND_MIN_GAP_S = 1.0  # a manager's announcement re-sends a batch at most this often
PARK_AFTER_SENDS = 4  # sent this often, never acked while later batches were: the fleet refuses it


@dataclass
class _InFlight:
    batch: Batch
    body: bytes
    sent: float  # time.monotonic() it last went out
    deadline: float  # time.monotonic() after which it is sent again
    first_sent: float = 0.0
    sends: int = 1  # since the backoff last started afresh
    why: str = "ack_timeout"  # what the next re-send is for, for its log line


def link_settings(cfg: MqttConfig, device: str, link: str | None = None, *, will=None,
                  max_inflight: int = 20) -> LinkSettings:
    """Connection settings for one of a device's links (None: the sync, "agent", "alerts")
    from its ``mqtt`` config. Each link is its own broker identity: the user (or the
    device id) for the sync, ``{user}~agent`` and ``{user}~alerts`` for the others, as
    client id and user, with ``<cert>~agent.crt`` and so on when the bundle has them."""
    tls = cfg.tls
    return LinkSettings(
        host=cfg.host, port=cfg.port, client_id=cfg.username or device, keepalive_s=cfg.keepalive_s,
        clean_start=False, session_expiry_s=cfg.session_expiry_s,
        backoff_initial_s=cfg.reconnect.initial_s, backoff_max_s=cfg.reconnect.max_s,
        username=cfg.username, password=cfg.password, use_tls=tls is not None,
        tls_ca=str(tls.ca_file) if tls and tls.ca_file else None,
        tls_cert=str(tls.cert_file) if tls and tls.cert_file else None,
        tls_key=str(tls.key_file) if tls and tls.key_file else None,
        will=will, max_inflight=max_inflight,
    ).for_link(link)


class Sync:
    """Syncs ``outbox`` to the fleet through the broker in ``mqtt``. ``start`` / ``stop``."""

    def __init__(self, mqtt_cfg: MqttConfig, device: DeviceInfo, outbox: Outbox, *,
                 models: Mapping[str, str] | None = None, runtime: str = __version__,
                 review: Exporter | None = None) -> None:
        self.device = device
        self.review = review  # operators' snapshot fetches ride this link: the device's own identity
        self.outbox = outbox
        self.topics = Topics(mqtt_cfg.prefix)
        self._cfg = outbox.cfg
        self._runtime = runtime
        self._models = dict(models or {})
        self._status_due = False
        self._inflight: dict[str, _InFlight] = {}
        self._parked: dict[str, _InFlight] = {}  # out of the window: the fleet acks others, not these
        self._last_ack = -float("inf")  # time.monotonic() of the last ack for a batch in flight
        self._rng = random.Random()
        self._counters: dict[str, Any] = dict(
            batches_sent=0, events_sent=0, resent=0, acked_batches=0, acked_events=0,
            acks_unknown=0, acks_rejected={}, publish_errors=0, ingest_online=0, ingest_online_rejected={},
            parked_batches=0)
        settings = link_settings(mqtt_cfg, device.id, will=self._will,
                                 max_inflight=self._cfg.window + 4)
        self._link = Link(settings, self, name="sync")

    # --- public ------------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background and keep syncing until :meth:`stop`."""
        self.outbox.rewind()  # anything handed out before belongs to no one now
        self._link.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Publish the offline status, disconnect, join. Unacked rows stay in the outbox."""
        self._link.stop(timeout)

    def set_models(self, models: Mapping[str, str]) -> None:
        """Active model versions by slot, for the status; republished while connected."""
        self._models = dict(models)
        self._status_due = True

    @property
    def connected(self) -> bool:
        return self._link.connected

    @property
    def failed(self) -> bool:
        return self._link.failed

    def stats(self) -> dict[str, Any]:
        """Counters for the stats line."""
        return {**self._link.counters.as_dict(), "inflight": len(self._inflight), "parked": len(self._parked),
                "parked_events": sum(f.batch.count for f in list(self._parked.values())),
                **self._counters, "acks_rejected": dict(self._counters["acks_rejected"]),
                "ingest_online_rejected": dict(self._counters["ingest_online_rejected"]),
                **({"review": self.review.stats()} if self.review is not None else {})}

    # --- link handler (all on the link's thread) ------------------------------------------

    def on_connect(self, client: mqtt.Client, session_present: bool) -> None:
        # subscribe every time: the broker may have lost the session (restart without persistence);
        # before the re-sends below, so an announcement that follows them is heard
        client.subscribe([(self.topics.ack(self.device.id), 1), (self.topics.ingest_online(), 0)])
        if self.review is not None:
            self.review.on_connect(client)
        self._publish_status(client, "online")
        # paho re-sends only what the broker never acknowledged; what it did may have
        # reached no manager (the broker restarted, or had no subscriber): all of it, now
        self._resend_window("reconnect", time.monotonic())

    def on_message(self, client: mqtt.Client, message: mqtt.MQTTMessage) -> None:
        if message.topic == self.topics.ingest_online():
            return self._ingest_online(message.payload)
        if self.review is not None and self.review.handles(message.topic):
            return self.review.on_message(client, message)
        try:
            ack = decode_ack(message.payload, device=self.device.id)
        except ContractError as exc:
            self._rejected("acks_rejected", exc, message.topic)
            return
        for refusal in ack.refused:
            flight = self._inflight.get(refusal.batch)
            if flight is not None:
                self._park(refusal.batch, flight, time.monotonic(), refusal.reason)
        for batch_id in ack.batches:
            flight = self._inflight.pop(batch_id, None) or self._parked.pop(batch_id, None)
            if flight is None:  # a second ack after a re-send, or one for a previous process's batch
                self._counters["acks_unknown"] += 1
                log.info("ack for an unknown batch", extra=fields(batch=batch_id))
                continue
            self.outbox.delete(flight.batch)
            self._last_ack = time.monotonic()
            self._counters["acked_batches"] += 1
            self._counters["acked_events"] += flight.batch.count

    def work(self, client: mqtt.Client) -> float:
        now = time.monotonic()
        if self._status_due:
            self._publish_status(client, "online")
        timeout = self._cfg.ack_timeout_s
        for batch_id, flight in list(self._inflight.items()):
            if flight.deadline <= now:
                if flight.sends >= PARK_AFTER_SENDS and self._last_ack > flight.first_sent:
                    self._park(batch_id, flight, now, "never acked while later batches were")
                    continue
                self._resend(client, batch_id, flight, now)
        for batch_id, flight in self._parked.items():
            if flight.deadline <= now:
                self._resend(client, batch_id, flight, now)
        while len(self._inflight) < self._cfg.window:
            batch = self.outbox.next_batch(self._cfg.batch_events, self._cfg.batch_bytes)
            if batch is None:
                break
            batch_id = new_id()
            body = batch_body(self.device.id, batch_id, time.time(), batch.events)
            self._publish(client, self.topics.outbox(self.device.id), body)
            self._inflight[batch_id] = _InFlight(batch, body, now, now + timeout, first_sent=now)
            self._counters["batches_sent"] += 1
            self._counters["events_sent"] += batch.count
        if len(self._inflight) < self._cfg.window:
            return IDLE_POLL_S
        next_deadline = min(f.deadline for f in [*self._inflight.values(), *self._parked.values()])
        return max(0.0, min(MAX_WAIT_S, next_deadline - now))

    def _resend(self, client: mqtt.Client, batch_id: str, flight: _InFlight, now: float) -> None:
        """Send a batch again, stamped with this send time (the fleet measures the device's
        clock by it); the next re-send waits twice as long (with jitter), up to resend_max_s."""
        flight.body = batch_body(self.device.id, batch_id, time.time(), flight.batch.events)
        self._publish(client, self.topics.outbox(self.device.id), flight.body)
        delay = min(self._cfg.resend_max_s, self._cfg.ack_timeout_s * 2 ** min(flight.sends, 30))
        flight.sent, flight.deadline = now, now + delay * (0.5 + 0.5 * self._rng.random())
        flight.sends += 1
        self._counters["resent"] += 1
        log.info("batch re-sent", extra=fields(batch=batch_id, events=flight.batch.count, why=flight.why,
                                               sends=flight.sends, next_s=round(flight.deadline - now, 2)))
        flight.why = "ack_timeout"

    def _park(self, batch_id: str, flight: _InFlight, now: float, why: str) -> None:
        """Out of the window, rows kept, offered again every resend_max_s."""
        del self._inflight[batch_id]
        flight.deadline = now + self._cfg.resend_max_s
        self._parked[batch_id] = flight
        self._counters["parked_batches"] += 1
        log.warning("batch parked", extra=fields(batch=batch_id, events=flight.batch.count, why=why,
                                                 sends=flight.sends, retry_s=self._cfg.resend_max_s))

    def on_stop(self, client: mqtt.Client) -> list[mqtt.MQTTMessageInfo]:
        info = self._publish_status(client, "offline")
        return [info] if info is not None else []

    # --- helpers --------------------------------------------------------------------------

    def _ingest_online(self, data: bytes) -> None:
        try:
            body = decode_ingest_online(data)
        except ContractError as exc:
            self._rejected("ingest_online_rejected", exc, self.topics.ingest_online())
            return
        self._counters["ingest_online"] += 1
        log.info("a manager's ingest is online", extra=fields(manager=body.manager, inflight=len(self._inflight)))
        # spaced, so a flood of announcements cannot turn into a flood of re-sends
        self._resend_window("ingest_online", time.monotonic(), min_gap=RESEND_MIN_GAP_S)

    def _resend_window(self, why: str, now: float, *, min_gap: float = 0.0) -> None:
        """Send every batch in flight again now, or ``min_gap`` after it last went out, and
        start its backoff afresh (someone is there to ack it now)."""
        for flight in self._inflight.values():
            when = max(now, flight.sent + min_gap)
            if when < flight.deadline:
                flight.deadline, flight.why, flight.sends = when, why, 0

    def _rejected(self, counter: str, exc: ContractError, topic: str) -> None:
        rejected = self._counters[counter]
        rejected[exc.reason] = rejected.get(exc.reason, 0) + 1
        log.warning("message rejected", extra=fields(reason=exc.reason, detail=exc.detail[:200], topic=topic))

    def _status(self, state: str) -> bytes:
        d = self.device
        return encode(Status(v=1, device=d.id, state=state, at=time.time(), runtime=self._runtime,
                             site=d.site, line=d.line, models=self._models))

    def _will(self) -> Will:
        return Will(self.topics.status(self.device.id), self._status("offline"))

    def _publish_status(self, client: mqtt.Client, state: str) -> mqtt.MQTTMessageInfo | None:
        self._status_due = False
        return self._publish(client, self.topics.status(self.device.id), self._status(state), retain=True)

    def _publish(self, client: mqtt.Client, topic: str, body: bytes, *, retain: bool = False
                 ) -> mqtt.MQTTMessageInfo | None:
        info = publish(client, topic, body, retain=retain)
        if info is None:  # lost to paho: the ack timeout sends the batch again
            self._counters["publish_errors"] += 1
        return info
