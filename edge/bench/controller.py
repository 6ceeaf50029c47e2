"""The line controller of ``edge bench alerts``, in a process of its own.

It subscribes to the alert topic and records, per alert, the frame's capture time, the
publish stamp and its own receipt time. In its own process its network thread never
waits for the daemon's interpreter lock, so the time it measures is the broker's and
its own, not the daemon's threads'. Protocol on its pipes: it prints ``subscribed`` once
its subscription is granted; a line on its stdin (or its end) stops it, and it prints
one JSON document ``{"samples": [[captured_at, published_at, received], ...], "rejected": n}``.

    python -m edge.bench.controller PORT TOPIC
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge.core.contract import ContractError, decode_alert


def main(port: int, topic: str) -> int:
    lock = threading.Lock()
    samples: list[tuple[float, float, float]] = []
    rejected = 0

    def on_message(client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        nonlocal rejected
        received = time.time()
        try:
            alert = decode_alert(message.payload)
        except ContractError:
            with lock:
                rejected += 1
            return
        with lock:
            samples.append((alert.captured_at, alert.published_at, received))

    subscribed = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_message = on_message
    client.on_subscribe = lambda *a: subscribed.set()
    client.connect("127.0.0.1", port)
    client.subscribe(topic, qos=1)
    client.loop_start()
    if not subscribed.wait(10):
        print("the subscription was not granted", file=sys.stderr)
        return 1
    print("subscribed", flush=True)
    sys.stdin.readline()
    client.disconnect()
    client.loop_stop()
    with lock:
        print(json.dumps({"samples": samples, "rejected": rejected}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), sys.argv[2]))
