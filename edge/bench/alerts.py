"""``edge bench alerts``: capture-to-alert latency at a real subscriber.

A real Mosquitto on a free loopback port, the real daemon in this process (capture,
scheduler, model, decisions, alert publisher) on a real clip, and a separate MQTT
client standing in for a line controller. The policy raises an alert on every frame
with a person, so every processed frame yields one sample:

    latency = (time the controller received the alert) - (the frame's capture time)

Both clocks are this machine's. The baseline, measured in the same run, is the
model's own ``invoke()`` time on the same frames; the target is
``alert p99 <= invoke p99 + 15 ms``.

``line_protocols`` adds the Sparkplug edge node, Home Assistant discovery and the command
topic (``edge.comms``) with a Sparkplug host subscribed to ``spBv1.0/#``: run with and
without it, the two reports show what the line's second view costs the frame path.
"""

from __future__ import annotations

import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from edge import __version__
from edge.config import DeviceConfig
from edge.core.contract import ContractError, Topics, decode_alert
from edge.core.errors import EdgeError, UsageError
from edge.daemon import Daemon
from edge.schedule.scheduler import Result

from .kit import LocalMosquitto
from .pipeline import StealMeter

TARGET_EXTRA_MS = 15.0
POLICY = """
version: bench
classes: {person: {accept_at: 0.3, reject_at: 0.5}}
rules:
  - name: person
    when: {event: every, classes: [person]}
camera_health: {enabled: false}
"""


def run_alerts_bench(model: Path, source: Path, *, manifest: Path | None = None, seconds: float = 20.0,
                     threads: int = 2, workdir: Path | None = None, line_protocols: bool = False) -> dict[str, Any]:
    """Run the daemon on ``source`` for ``seconds`` and return a JSON-ready report."""
    if seconds <= 0:
        raise UsageError("--seconds must be > 0")
    steal = StealMeter()
    with ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edgecam-bench-")))
        workdir.mkdir(parents=True, exist_ok=True)
        broker = stack.enter_context(LocalMosquitto(workdir / "mosquitto"))
        cfg = _config(workdir, broker.port, model, manifest, source, threads, line_protocols)
        topic = Topics().alert(cfg.device.site, cfg.device.line, "cam")
        controller = _Controller(broker.port, topic)
        stack.callback(controller.close)
        host = _Controller(broker.port, "spBv1.0/#", count_only=True) if line_protocols else None
        if host is not None:
            stack.callback(host.close)
        invokes: list[float] = []
        daemon = Daemon(cfg, lambda result: _invoke(result, invokes))
        stop = threading.Event()
        runner = threading.Thread(target=daemon.run, args=(stop,), name="bench-daemon")
        runner.start()
        cpu0 = time.process_time()
        time.sleep(seconds)
        process_cpu = time.process_time() - cpu0
        comms_cpu = daemon.comms.cpu_seconds() if daemon.comms is not None else None
        stop.set()
        runner.join(10)
        time.sleep(0.2)  # the last alerts in flight
        latencies = controller.latencies()
        mqtt_legs = controller.mqtt_legs()
        published = daemon.alerts.stats()["published"] if daemon.alerts else 0
        comms = daemon.comms.stats() if daemon.comms is not None else None
    if not latencies or not invokes:
        raise EdgeError("no alert reached the subscriber: does the clip show people?")
    alert = _percentiles(latencies)
    invoke = _percentiles(invokes)
    return {
        "bench": "alerts",
        "edgecam": __version__,
        "model": str(model),
        "source": str(source),
        "seconds": seconds,
        "threads": threads,
        "cpu_steal_pct": steal.percent(),
        "line_protocols": line_protocols,
        "sparkplug_messages_received": host.received if host is not None else None,
        "comms": comms,
        "process_cpu_s": round(process_cpu, 2),
        "comms_thread_cpu_s": round(comms_cpu, 3) if comms_cpu is not None else None,
        "alerts_published": published,
        "alerts_received": len(latencies),
        "rejected_by_subscriber": controller.rejected,
        "alert_latency_ms": alert,
        "publish_to_receipt_ms": _percentiles(mqtt_legs),
        "invoke_ms": invoke,
        "alert_p99_minus_invoke_p99_ms": round(alert["p99"] - invoke["p99"], 2),
        "target": f"alert p99 <= invoke p99 + {TARGET_EXTRA_MS:g} ms",
        "target_met": alert["p99"] <= invoke["p99"] + TARGET_EXTRA_MS,
    }


def _invoke(result: Result, into: list[float]) -> None:
    into.append(result.times.invoke_ms)


def _percentiles(values: list[float]) -> dict[str, float]:
    a = np.asarray(values)
    return {"n": int(a.size), **{f"p{q}": round(float(np.percentile(a, q)), 2) for q in (50, 95, 99)}}


def _config(workdir: Path, port: int, model: Path, manifest: Path | None, source: Path, threads: int,
            line_protocols: bool = False) -> DeviceConfig:
    policy = workdir / "policy.yaml"
    policy.write_text(POLICY)
    doc = {
        "device": {"id": "bench-cam", "site": "bench", "line": "1"},
        "runtime": {"num_threads": threads},
        "logging": {"format": "json", "level": "warning", "stats_interval_s": 3600},
        "models": {"det": {"path": str(model), **({"manifest": str(manifest)} if manifest else {})}},
        "cameras": [{"id": "cam", "model": "det",
                     "source": {"kind": "video", "path": str(source), "pace": "native", "loop": True}}],
        "mqtt": {"host": "127.0.0.1", "port": port},
        "outbox": {"path": str(workdir / "outbox.db")},
        "decisions": {"policy": str(policy)},
    }
    if line_protocols:
        doc.update(sparkplug={"group_id": "bench", "edge_node_id": "bench-cam",
                              "bdseq_file": str(workdir / "sparkplug.json")},
                   homeassistant={}, commands={"state_file": str(workdir / "commands.json")})
    return DeviceConfig.model_validate(yaml.safe_load(yaml.safe_dump(doc)))


class _Controller:
    """The line controller: records receive time minus capture time of each alert."""

    def __init__(self, port: int, topic: str, *, count_only: bool = False) -> None:
        self._lock = threading.Lock()
        self._latencies: list[float] = []
        self._mqtt: list[float] = []  # publish on the device to receipt at the controller
        self.rejected = 0
        self.received = 0
        self._count_only = count_only  # a Sparkplug host: counts what it gets
        subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(topic, qos=1)
        self.client.loop_start()
        if not subscribed.wait(10):
            raise EdgeError("the bench subscriber could not subscribe")

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        received = time.time()
        self.received += 1
        if self._count_only:
            return
        try:
            alert = decode_alert(message.payload)
        except ContractError:
            self.rejected += 1
            return
        with self._lock:
            self._latencies.append((received - alert.captured_at) * 1e3)
            self._mqtt.append((received - alert.published_at) * 1e3)

    def latencies(self) -> list[float]:
        with self._lock:
            return list(self._latencies)

    def mqtt_legs(self) -> list[float]:
        with self._lock:
            return list(self._mqtt)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
