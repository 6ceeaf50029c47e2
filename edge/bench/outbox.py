"""``edge bench outbox``: the metadata pipeline's rates against a real broker and ingest.

Everything is real and local: a Mosquitto started on a free loopback port, ``fleet
serve`` as its own process with its own store, and this process as the device (the
real Outbox and Sync). Four measurements, in order:

1. baseline: one paho client publishing single 330-byte QoS 1 messages, as fast as
   PUBACKs come back (the naive way to ship events, measured in the same run);
2. append: events made and appended from one thread until all are committed,
   with sync off, which leaves a backlog of ``events`` rows;
3. drain: sync on; the time until the backlog is acked by the fleet (so stored
   there), and this process's RSS during it, sampled every 50 ms;
4. live: ``live_events`` more, appended with sync running, until all are acked.
"""

from __future__ import annotations

import json
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack, closing
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge import __version__
from edge.config import Backoff, DeviceInfo, MqttConfig, OutboxConfig
from edge.core.errors import EdgeError, UsageError
from edge.sync.client import Sync
from edge.sync.events import Kind, new_event
from edge.sync.outbox import Outbox

from .kit import LocalMosquitto, cpu_s, rss_mb, terminate
from .pipeline import StealMeter

DEVICE = DeviceInfo(id="bench-cam", site="bench", line="1")
BASELINE_S = 3.0
BASELINE_BYTES = 330
RSS_SAMPLE_S = 0.05
TARGETS = {"append_events_per_s": 50_000, "end_to_end_events_per_s": 20_000, "drain_rss_growth_mb": 50}


def run_outbox_bench(
    events: int = 1_000_000,
    *,
    live_events: int = 200_000,
    batch_events: int = 500,
    window: int = 4,
    workdir: Path | None = None,
    timeout_s: float = 1800.0,
) -> dict[str, Any]:
    """Run the four measurements and return a JSON-ready report."""
    if events < 1 or live_events < 0:
        raise UsageError("--events must be >= 1 and --live-events >= 0")
    steal = StealMeter()
    with ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edgecam-bench-")))
        workdir.mkdir(parents=True, exist_ok=True)
        broker = stack.enter_context(LocalMosquitto(workdir / "mosquitto"))
        fleet = stack.enter_context(_FleetServe(workdir / "fleet.db", broker.port))
        baseline = _baseline(broker.port)

        cfg = OutboxConfig(path=workdir / "outbox.db", max_rows=events + live_events + 1000,
                           max_bytes=1 << 40, handoff=50_000, batch_events=batch_events, window=window,
                           ack_timeout_s=30.0)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{cfg.path}{suffix}").unlink(missing_ok=True)
        outbox = Outbox.open(cfg, DEVICE.id)
        stack.callback(outbox.close)
        deadline = time.monotonic() + timeout_s

        append = _append(outbox, events)
        db_mb = sum(Path(f"{cfg.path}{s}").stat().st_size for s in ("", "-wal") if Path(f"{cfg.path}{s}").exists())

        mqtt_cfg = MqttConfig(host="127.0.0.1", port=broker.port, reconnect=Backoff(initial_s=0.2, max_s=2.0))
        sync = Sync(mqtt_cfg, DEVICE, outbox)
        stack.callback(sync.stop)
        sampler = _RssSampler(fleet.pid)
        sampler.start()
        cpu0 = {name: cpu_s(pid) for name, pid in (("device", None), ("fleet", fleet.pid), ("broker", broker.pid))}
        started = time.perf_counter()
        sync.start()
        _wait_empty(outbox, deadline)
        drain_s = time.perf_counter() - started
        sampler.stop()
        cpu = {name: round((cpu_s(pid) - cpu0[name]) / drain_s, 2)
               for name, pid in (("device", None), ("fleet", fleet.pid), ("broker", broker.pid))}

        live: dict[str, Any] = {"events": live_events}
        if live_events:
            started = time.perf_counter()
            live.update(_append(outbox, live_events, flush=False))
            _wait_empty(outbox, deadline)
            live["seconds"] = round(time.perf_counter() - started, 2)
            live["end_to_end_events_per_s"] = round(live_events / live["seconds"])

        stored = fleet.count()
        stats = sync.stats()
        committed = outbox.stats()["committed"]  # the events, plus a report per refused-append episode
    if stored != committed:
        raise EdgeError(f"bench: the fleet stored {stored} events, the outbox committed {committed}")
    drain_rate = events / drain_s
    return {
        "scenario": "outbox",
        "events": events,
        "wire_bytes_per_event": append.pop("wire_bytes_per_event"),
        "baseline_single_publish_qos1": baseline,
        "append": append,
        "drain": {
            "events": events,
            "seconds": round(drain_s, 2),
            "end_to_end_events_per_s": round(drain_rate),
            "vs_baseline": round(drain_rate / baseline["messages_per_s"], 1),
            "rss_mb_start": sampler.start_mb,
            "rss_mb_peak": sampler.peak_mb,
            "rss_growth_mb": round(sampler.peak_mb - sampler.start_mb, 1),
            "fleet_rss_mb_peak": sampler.other_peak_mb,
            "cpu_cores_busy": cpu,  # CPU seconds per second of drain, per process
            "outbox_file_mb": round(db_mb / 1e6, 1),
        },
        "live": live,
        "fleet_stored": stored,
        "sync": {k: stats[k] for k in ("batches_sent", "resent", "acks_unknown", "disconnects")},
        "config": {"batch_events": batch_events, "batch_bytes": cfg.batch_bytes, "window": window,
                   "synchronous": cfg.synchronous, "commit_interval_s": cfg.commit_interval_s},
        "targets": TARGETS,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "edgecam": __version__,
                    "steal_percent": steal.percent()},
    }


# --- the measurements ----------------------------------------------------------------------


def _append(outbox: Outbox, n: int, *, flush: bool = True) -> dict[str, Any]:
    """Make and append ``n`` detection summaries from this thread and, with ``flush``,
    wait for their commits."""
    # about 330 bytes on the wire, like the baseline's messages
    base = {"scope": "frame", "model": "yolov8n", "count": 1, "counts": {"person": 1},
            "detections": [{"label": "person", "score": 0.912, "box": [412.5, 80.0, 598.0, 466.5]}]}
    waits = 0
    started = time.perf_counter()
    for i in range(n):
        event = new_event(Kind.DETECTION_SUMMARY, {**base, "frame": i}, camera="line3-infeed",
                          captured_at=time.time())
        while not outbox.append(event):  # the hand-off is full: this producer waits, a camera would drop
            waits += 1
            time.sleep(0.0005)
    handed = time.perf_counter() - started
    if not flush:
        return {"append_calls_per_s": round(n / handed), "handoff_full_waits": waits}
    if not outbox.flush(timeout=600):
        raise EdgeError("bench: the outbox did not commit its hand-off")
    committed = time.perf_counter() - started
    stats = outbox.stats()
    return {"events": n, "seconds": round(committed, 2), "events_per_s": round(n / committed),
            "append_calls_per_s": round(n / handed), "handoff_full_waits": waits,
            "wire_bytes_per_event": round(stats["bytes"] / max(1, stats["rows"]))}


def _wait_empty(outbox: Outbox, deadline: float) -> None:
    # flush first: rows is 0 too while appended events still wait for their commit
    while not (outbox.flush(timeout=1) and outbox.stats()["rows"] == 0):
        if time.monotonic() > deadline:
            raise EdgeError(f"bench: timed out with {outbox.stats()['rows']} rows still in the outbox")
        time.sleep(0.02)


def _baseline(port: int) -> dict[str, Any]:
    """Single 330-byte QoS 1 publishes from one paho client, counted by PUBACK."""
    acked = 0

    def on_publish(client, userdata, mid, reason, properties):
        nonlocal acked
        acked += 1

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-baseline", protocol=mqtt.MQTTv5)
    client.on_publish = on_publish
    client.max_inflight_messages_set(20)
    client.connect("127.0.0.1", port)
    client.loop_start()
    body = b"x" * BASELINE_BYTES
    try:
        started = time.perf_counter()
        sent = 0
        while time.perf_counter() - started < BASELINE_S:
            client.publish("edgecam/v1/bench/baseline", body, qos=1)
            sent += 1
            while sent - acked > 100:  # paho queues without bound; keep to the broker's pace
                time.sleep(0.0002)
        while acked < sent and time.perf_counter() - started < BASELINE_S + 5:
            time.sleep(0.005)
        elapsed = time.perf_counter() - started
    finally:
        client.loop_stop()
        client.disconnect()
    return {"messages_per_s": round(acked / elapsed), "message_bytes": BASELINE_BYTES, "seconds": round(elapsed, 1)}


class _RssSampler:
    """Peak RSS of this process (and of one other) while running."""

    def __init__(self, other_pid: int | None = None) -> None:
        self.other_pid = other_pid
        self.start_mb = rss_mb(None)
        self.peak_mb = self.start_mb
        self.other_peak_mb = rss_mb(other_pid) if other_pid else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_S):
            self.peak_mb = max(self.peak_mb, rss_mb(None))
            if self.other_pid:
                self.other_peak_mb = max(self.other_peak_mb or 0.0, rss_mb(self.other_pid))


# --- the real processes -----------------------------------------------------------------------


class _FleetServe:
    """``fleet serve`` on its own store, as a separate process."""

    def __init__(self, db: Path, port: int) -> None:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        self.db = db
        self._cmd = [sys.executable, "-m", "fleet", "serve", "--db", str(db), "--broker", f"127.0.0.1:{port}",
                     "--log-format", "json"]
        self._proc: subprocess.Popen | None = None
        self._ready = threading.Event()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def __enter__(self) -> "_FleetServe":
        self._proc = subprocess.Popen(self._cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._watch, daemon=True).start()
        if not self._ready.wait(30):
            self.__exit__()
            raise EdgeError("fleet serve did not subscribe within 30 s")
        return self

    def _watch(self) -> None:
        assert self._proc and self._proc.stderr
        for line in self._proc.stderr:
            try:
                if json.loads(line).get("msg") == "ingest subscribed":
                    self._ready.set()
            except ValueError:
                pass

    def count(self) -> int:
        """Events in the fleet's store, read with plain SQL: edge code never imports fleet."""
        with closing(sqlite3.connect(f"{self.db.resolve().as_uri()}?mode=ro", uri=True)) as conn:
            return conn.execute("SELECT count(*) FROM events").fetchone()[0]

    def __exit__(self, *exc: Any) -> None:
        terminate(self._proc)
