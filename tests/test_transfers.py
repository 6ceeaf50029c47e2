"""Artifact delivery through a real Mosquitto: the manager's transfers on a real link."""

from __future__ import annotations

import queue
import threading
import time

import paho.mqtt.client as mqtt
from broker import wait_until
from paho.mqtt.enums import CallbackAPIVersion

from edge.core import contract
from edge.core.link import Link, LinkSettings
from fleet.transfers import Transfers

SHA = "cd" * 32
SIZE = 4 * 1024 * 1024
CHUNK = 64 * 1024


class Pumping:
    """A link handler that serves chunk requests the way the manager's control link does:
    requests come in, ``work`` publishes the answers. ``before_pump`` runs once, on the link's
    thread, just before a pump (to kill the broker at the worst moment)."""

    def __init__(self, transfers: Transfers) -> None:
        self.transfers = transfers
        self.requests: queue.Queue[contract.ArtifactRequest] = queue.Queue()
        self.before_pump: list = []

    def on_connect(self, client, session_present):
        pass

    def on_message(self, client, message):
        pass

    def work(self, client) -> float:
        while not self.requests.empty():
            self.transfers.request(self.requests.get(), time.monotonic())
        while self.before_pump:
            self.before_pump.pop()()
        return 0.0 if self.transfers.pump(client, time.monotonic()) else 0.02

    def on_stop(self, client):
        return []


def test_delivery_resumes_by_itself_after_the_broker_dies_mid_delivery(tmp_path, broker, caplog):
    (tmp_path / SHA).write_bytes(b"z" * SIZE)
    topics = contract.Topics()
    handler = Pumping(Transfers(tmp_path, topics, max_transfers=64))
    received: list[tuple[str, int]] = []
    lock = threading.Lock()

    def on_message(c, userdata, message):
        header, _ = contract.decode_chunk(message.payload)
        with lock:
            received.append((message.topic, header.offset))

    device = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="devices", protocol=mqtt.MQTTv5)
    device.on_message = on_message
    device.on_connect = lambda c, u, f, r, p: c.subscribe(f"{topics.prefix}/dev/+/artifact/+", qos=1)
    device.connect_async(broker.host, broker.port)
    device.reconnect_delay_set(0.1, 0.5)
    device.loop_start()
    link = Link(LinkSettings(host=broker.host, port=broker.port, client_id="fleet-lead", clean_start=True,
                             backoff_initial_s=0.1, backoff_max_s=0.5, max_inflight=200), handler, name="control")
    link.start()

    def ask(offset: int, devices: range) -> None:
        for i in devices:
            name = f"cam-{i}"
            handler.requests.put(contract.ArtifactRequest(
                v=1, device=name, sha256=SHA, offset=offset, length=CHUNK, request=f"q{offset}",
                response_topic=topics.artifact(name, SHA)))

    try:
        wait_until(lambda: link.connected and device.is_connected(), 10, "both clients connected")
        time.sleep(0.2)  # the device's subscription
        ask(0, range(40))
        wait_until(lambda: len(received) == 40, 10, "the first chunks")
        # the broker dies while the manager is publishing a wave of chunks
        handler.before_pump.append(broker.kill)
        ask(CHUNK, range(40))
        wait_until(lambda: not link.connected, 10, "the link to see the broker gone")
        broker.start()
        wait_until(lambda: link.connected and device.is_connected(), 10, "both clients back")
        time.sleep(0.2)
        # devices ask again, as they do when an answer does not come
        with lock:
            received.clear()
        ask(2 * CHUNK, range(40))
        wanted = {(topics.artifact(f"cam-{i}", SHA), 2 * CHUNK) for i in range(40)}
        wait_until(lambda: set(received) >= wanted, 10, "every device's next chunk after the broker came back")
        assert not [r for r in caplog.records if r.getMessage() == "link work failed"]
    finally:
        link.stop()
        device.loop_stop()
        device.disconnect()
