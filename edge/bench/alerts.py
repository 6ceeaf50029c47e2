"""``edge bench alerts``: capture-to-alert latency at a real subscriber.

A real Mosquitto on a free loopback port, the real daemon in this process (capture,
scheduler, model, decisions, alert publisher) on a real clip, and an MQTT client in a
process of its own (``edge.bench.controller``) standing in for a line controller. The policy raises an alert on every frame
with a person, so every processed frame yields one sample:

    latency = (time the controller received the alert) - (the frame's capture time)

Both clocks are this machine's. The baseline, measured in the same run, is the
model's own ``invoke()`` time on the same frames; the target is
``alert p99 <= invoke p99 + 15 ms``.

Where the time goes, per alert: ``wait`` (capture to the executor taking the frame up:
the invoke before it, when the model is busy), ``preprocess``, ``invoke``,
``postprocess`` (output copy and decode), ``handoff`` (the queue to the finisher and
waits for the interpreter lock), ``decisions`` (the decision engine up to and including
the alert's publish stamp), ``publish`` (encoding the alert, up to paho's publish call)
and ``broker`` (from there to receipt at the controller: paho's network thread in the
daemon, Mosquitto, and the controller's client in its own process, which waits for no
lock of the daemon's; ``paho_publish_call_ms`` beside it is how long the publish call
held the publishing thread, not a stage of its own). The stages of one alert add up to
its latency. The report gives each stage's p50 and p99 over all alerts and its mean over
the slowest 1%, names the stage whose mean over the slowest 1% exceeds its own median
the most, and gives the load average before and after the run beside the figures (they
are load-sensitive), so a missed target is explained by its own run.

``line_protocols`` adds the Sparkplug edge node, Home Assistant discovery and the command
topic (``edge.comms``) with a Sparkplug host subscribed to ``spBv1.0/#``: run with and
without it, the two reports show what the line's second view costs the frame path.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
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

from .kit import LocalMosquitto, load_average
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
        controller = _ControllerProcess(broker.port, topic)
        stack.callback(controller.close)
        host = _Controller(broker.port, "spBv1.0/#", count_only=True) if line_protocols else None
        if host is not None:
            stack.callback(host.close)
        invokes: list[float] = []
        frames: dict[float, dict[str, float]] = {}  # wall capture time -> stage times of the frame
        daemon = Daemon(cfg, lambda result: _stages(result, invokes, frames))
        sent: dict[float, tuple[float, float, float]] = {}  # wall capture time -> publish stamp, call in, out
        if daemon.alerts is not None:
            daemon.alerts.on_sent = lambda alert, entered, returned: sent.__setitem__(
                round(alert.captured_at, 6), (alert.published_at, entered, returned))
        load_before = load_average()
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
        controller.finish()
        latencies = controller.latencies()
        mqtt_legs = controller.mqtt_legs()
        load_after = load_average()
        breakdown = _breakdown(controller.samples(), frames, sent)
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
        "load_average_before": load_before,
        "load_average_after": load_after,
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
        "where_the_time_goes_ms": breakdown,
        "target": f"alert p99 <= invoke p99 + {TARGET_EXTRA_MS:g} ms",
        "target_met": alert["p99"] <= invoke["p99"] + TARGET_EXTRA_MS,
    }


def _stages(result: Result, invokes: list[float], frames: dict[float, dict[str, float]]) -> None:
    """The bench's own sink: the executor's and the finisher's share of each frame's time."""
    t = result.times
    invokes.append(t.invoke_ms)
    started = result.started_at if result.started_at is not None else result.finished_at
    work_ms = t.preprocess_ms + t.invoke_ms + t.postprocess_ms
    frames[round(result.frame.captured_at, 6)] = {
        "wait": (started - result.frame.captured_mono) * 1e3,
        "preprocess": t.preprocess_ms,
        "invoke": t.invoke_ms,
        "postprocess": t.postprocess_ms,
        "handoff": max(0.0, (result.finished_at - started) * 1e3 - work_ms),
        "to_sinks": (result.finished_at - result.frame.captured_mono) * 1e3,
    }


STAGES = ("wait", "preprocess", "invoke", "postprocess", "handoff", "decisions", "publish", "broker")


def _breakdown(samples: list[tuple[float, float, float]], frames: dict[float, dict[str, float]],
               sent: dict[float, tuple[float, float, float]]) -> dict[str, Any]:
    """Per stage: p50 and p99 over the alerts, and the mean over the slowest 1% of them."""
    rows, calls = [], []
    for captured_at, total_ms, mqtt_ms in samples:
        stages, sent_at = frames.get(round(captured_at, 6)), sent.get(round(captured_at, 6))
        if stages is None or sent_at is None:
            continue
        published_at, entered, returned = sent_at
        publish_ms = (entered - published_at) * 1e3
        calls.append((returned - entered) * 1e3)
        rows.append((total_ms, {
            **stages,
            # the engine's share ends at the alert's publish stamp: capture to stamp, less capture to sinks
            "decisions": total_ms - mqtt_ms - stages["to_sinks"],
            "publish": publish_ms,
            "broker": mqtt_ms - publish_ms,
        }))
    if not rows:
        return {}
    rows.sort(key=lambda r: r[0])
    slowest = rows[-max(1, len(rows) // 100):]
    per_stage = {name: {**{k: v for k, v in _percentiles([r[1][name] for r in rows]).items() if k != "n"},
                        "slowest_1pct_mean": round(float(np.mean([r[1][name] for r in slowest])), 2)}
                 for name in STAGES}
    return {
        "alerts": len(rows),
        **per_stage,
        "slowest_1pct_total_mean": round(float(np.mean([r[0] for r in slowest])), 2),
        # where the slowest alerts lost the time the typical one does not: the stage whose
        # mean over them exceeds its own median the most
        "slowest_1pct_excess_mostly_in": max(
            STAGES, key=lambda name: per_stage[name]["slowest_1pct_mean"] - per_stage[name]["p50"]),
        "paho_publish_call_ms": {k: v for k, v in _percentiles(calls).items() if k != "n"},
    }


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


class _ControllerProcess:
    """The line controller (``edge.bench.controller``) in its own process, so that its
    receipt times do not wait for this process's interpreter lock; ``finish`` collects them."""

    def __init__(self, port: int, topic: str) -> None:
        self.rejected = 0
        self._samples: list[tuple[float, float, float]] = []  # captured_at, published_at, received
        self._proc = subprocess.Popen([sys.executable, "-m", "edge.bench.controller", str(port), topic],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready, _, _ = select.select([self._proc.stdout], [], [], 15)
        line = self._proc.stdout.readline() if ready else ""
        if line.strip() != "subscribed":
            self.close()
            raise EdgeError("the bench subscriber could not subscribe")

    def finish(self) -> None:
        """Stop the controller and take what it received."""
        out, _ = self._proc.communicate("stop\n", timeout=30)
        report = json.loads(out.strip().splitlines()[-1])
        self._samples = [tuple(s) for s in report["samples"]]
        self.rejected = report["rejected"]

    def latencies(self) -> list[float]:
        return [(received - captured) * 1e3 for captured, _, received in self._samples]

    def mqtt_legs(self) -> list[float]:
        return [(received - published) * 1e3 for _, published, received in self._samples]

    def samples(self) -> list[tuple[float, float, float]]:
        """(capture time, capture-to-receipt ms, publish-to-receipt ms) of each alert."""
        return [(c, (r - c) * 1e3, (r - p) * 1e3) for c, p, r in self._samples]

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        for pipe in (self._proc.stdin, self._proc.stdout):
            if pipe is not None:
                pipe.close()


class _Controller:
    """A subscriber in this process: the Sparkplug host, which only counts what it gets."""

    def __init__(self, port: int, topic: str, *, count_only: bool = False) -> None:
        self._lock = threading.Lock()
        self._latencies: list[float] = []
        self._mqtt: list[float] = []  # publish on the device to receipt at the controller
        self._captured: list[float] = []
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
            self._captured.append(alert.captured_at)

    def latencies(self) -> list[float]:
        with self._lock:
            return list(self._latencies)

    def samples(self) -> list[tuple[float, float, float]]:
        """(capture time, capture-to-receipt ms, publish-to-receipt ms) of each alert."""
        with self._lock:
            return list(zip(self._captured, self._latencies, self._mqtt))

    def mqtt_legs(self) -> list[float]:
        with self._lock:
            return list(self._mqtt)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
