"""Fleet ingest: devices' outbox batches into the store, acked after the commit.

One MQTT 5 client with a shared subscription (``$share/fleet/{p}/dev/+/outbox``), so
several managers behind one broker split the batches, and a plain subscription to the
retained statuses (shared subscriptions get no retained messages), which every
manager applies to the registry. Each batch is validated against the contract, its
events inserted by id in one transaction, and only then acked on the device's ack
topic. A batch that breaks the contract is counted under its reason, logged, and
neither stored nor acked; if it names its batch id, the device is told the batch is
refused (so it parks it instead of re-sending it for good). Nothing a device sends can
stop the manager.

The manager's session is clean: a manager that is down must not keep a share of the
batches queued for itself (a broker gives an offline member of a shared subscription
its turn all the same). Devices keep their rows and send them again: once the
subscriptions are live the ingest says so on ``{p}/fleet/ingest/online``, and every
device sends its unacknowledged batches again at once, instead of after its ack
timeout. So a broker or manager restart costs no stall, whichever side is back first.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from dataclasses import replace
from typing import Any

import paho.mqtt.client as mqtt
from prometheus_client import Histogram

from edge.core.contract import (
    DEFAULT_PREFIX,
    SHARE_GROUP,
    Ack,
    ContractError,
    IngestOnline,
    Refusal,
    Topics,
    batch_id_of,
    decode_batch,
    decode_status,
    encode,
)
from edge.core.link import Link, LinkSettings
from edge.core.logs import fields

from .store import DatabaseError, Store

log = logging.getLogger("fleet.ingest")

ACK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Ingest:
    """Runs the ingest on its own thread until :meth:`stop`."""

    def __init__(self, store: Store, *, host: str = "localhost", port: int = 1883,
                 prefix: str = DEFAULT_PREFIX, client_id: str | None = None, group: str = SHARE_GROUP,
                 username: str | None = None, password: str | None = None,
                 backoff_initial_s: float = 0.5, backoff_max_s: float = 5.0,
                 settings: LinkSettings | None = None) -> None:
        """``settings`` (the manager's: its identity, credential and TLS) replace host,
        port, client id, user and password."""
        self.store = store
        self.topics = Topics(prefix)
        self.group = group
        self._counters: dict[str, Any] = dict(
            batches=0, events=0, stored=0, duplicates=0, acks=0, refusals=0, statuses=0, store_errors=0,
            rejected={})
        settings = settings or LinkSettings(
            host=host, port=port, username=username, password=password,
            client_id=client_id or f"fleet-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}")
        settings = replace(settings, clean_start=True, session_expiry_s=0, backoff_initial_s=backoff_initial_s,
                           backoff_max_s=backoff_max_s, max_inflight=100)
        self.client_id = settings.client_id
        self._link = Link(settings, self, name="ingest")
        self.subscribed = False
        # a batch's arrival to its ack: the store's commit, mostly (registered by whoever exports it)
        self.ack_latency = Histogram("fleet_ingest_ack_seconds", "Time from a batch's arrival to its ack",
                                     registry=None, buckets=ACK_BUCKETS)

    def start(self) -> None:
        self._link.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._link.stop(timeout)

    @property
    def connected(self) -> bool:
        return self._link.connected

    def stats(self) -> dict[str, Any]:
        """Counters: batches and events received, stored, duplicates, rejected by reason."""
        return {**self._link.counters.as_dict(), **self._counters, "rejected": dict(self._counters["rejected"])}

    # --- link handler ------------------------------------------------------------------------

    def on_connect(self, client: mqtt.Client, session_present: bool) -> None:
        self.subscribed = False
        client.subscribe([(self.topics.shared_outbox(self.group), 1), (self.topics.all_status(), 1)])

    def on_subscribe(self, client: mqtt.Client, reasons: list) -> None:
        failed = [str(r) for r in reasons if r.is_failure]
        if failed:
            log.error("subscription refused", extra=fields(reasons=failed))
            return
        self.subscribed = True
        log.info("ingest subscribed", extra=fields(outbox=self.topics.shared_outbox(self.group),
                                                   status=self.topics.all_status()))
        # QoS 0: only devices online now need it (one that returns later re-sends on its own)
        online = IngestOnline(v=1, manager=self.client_id[:256], at=time.time())
        client.publish(self.topics.ingest_online(), encode(online), qos=0)

    def on_message(self, client: mqtt.Client, message: mqtt.MQTTMessage) -> None:
        topic = message.topic
        device = self.topics.device_of(topic)
        if device is None:
            return self._reject("schema", topic, "not a device topic")
        if topic == self.topics.outbox(device):
            self._batch(client, device, message.payload)
        elif topic == self.topics.status(device):
            self._status(device, message.payload)

    def work(self, client: mqtt.Client) -> float:
        return 0.5

    def on_stop(self, client: mqtt.Client) -> list[mqtt.MQTTMessageInfo]:
        return []

    # --- bodies --------------------------------------------------------------------------------

    def _batch(self, client: mqtt.Client, device: str, data: bytes) -> None:
        now = time.time()
        try:
            batch = decode_batch(data, device=device)
            stored = self.store.add_batch(batch, now)
        except ContractError as exc:
            self._reject(exc.reason, self.topics.outbox(device), exc.detail)
            batch_id = batch_id_of(data)
            if batch_id is not None:  # it would be refused every time: the device stops sending it
                refusal = Ack(v=1, device=device, refused=[Refusal(batch=batch_id, reason=exc.reason[:64])])
                client.publish(self.topics.ack(device), encode(refusal), qos=1)
                self._counters["refusals"] += 1
            return
        except DatabaseError as exc:  # not acked: the device sends it again
            self._counters["store_errors"] += 1
            log.error("store failed; batch not acked", extra=fields(device=device, error=str(exc).splitlines()[0]))
            return
        k = self._counters
        k["batches"] += 1
        k["events"] += len(batch.events)
        k["stored"] += stored.inserted
        k["duplicates"] += stored.duplicates
        ack = encode(Ack(v=1, device=device, batches=[batch.batch]))
        client.publish(self.topics.ack(device), ack, qos=1)
        self.ack_latency.observe(time.time() - now)
        k["acks"] += 1
        if stored.duplicates:
            log.debug("batch already stored", extra=fields(device=device, batch=batch.batch,
                                                          duplicates=stored.duplicates))

    def _status(self, device: str, data: bytes) -> None:
        if not data:  # an empty retained message clears the topic: nothing to record
            return
        try:
            status = decode_status(data, device=device)
            self.store.set_status(status, time.time())
        except ContractError as exc:
            return self._reject(exc.reason, self.topics.status(device), exc.detail)
        except DatabaseError as exc:
            self._counters["store_errors"] += 1
            log.error("store failed; status not recorded", extra=fields(device=device, error=str(exc).splitlines()[0]))
            return
        self._counters["statuses"] += 1
        log.info("device status", extra=fields(device=device, state=status.state, runtime=status.runtime))

    def _reject(self, reason: str, topic: str, detail: str) -> None:
        rejected = self._counters["rejected"]
        rejected[reason] = rejected.get(reason, 0) + 1
        log.warning("rejected", extra=fields(reason=reason, topic=topic, detail=detail[:200]))
