"""What `edge run` holds in memory: only the libraries its config needs, and a report of it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import REPO, edge_run, manifest_for, shared_path

YOLO = "models/yolov8n_full_integer_quant-b.tflite"
# what a config without MQTT, model agent or metrics server must not load
OPTIONAL = ("paho", "cryptography", "prometheus_client", "sqlite3", "google.protobuf", "edge.updates.agent",
            "edge.sync.client", "edge.sync.outbox", "edge.decide.alerts", "edge.core.link", "edge.observe.metrics",
            "edge.comms.service")


def demo_config(tmp_path: Path, **extra) -> Path:
    doc = {
        "device": {"id": "mem-cam"},
        "runtime": {"num_threads": 2, "stats_file": str(tmp_path / "stats.json")},
        "logging": {"format": "json", "stats_interval_s": 1},
        "models": {"detector": {"path": str(shared_path(YOLO)), "manifest": str(manifest_for(YOLO))}},
        "cameras": [{"id": "entrance", "model": "detector", "source": {
            "kind": "video", "path": str(shared_path("media/pedestrians-360p10.avi")), "loop": True}}],
        "decisions": {"policy": str(REPO / "configs" / "policies" / "crossing.yaml")},
        **extra,
    }
    path = tmp_path / f"device-{len(extra)}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def loaded_after_start(config: Path) -> list[str]:
    """The optional modules in sys.modules once a daemon for ``config`` is built (models loaded)."""
    script = (
        "import json, sys\n"
        "from edge.config import load_config\n"
        "from edge.daemon import Daemon\n"
        f"Daemon(load_config({str(config)!r}))\n"
        f"print(json.dumps(sorted(m for m in {OPTIONAL!r} if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def test_a_daemon_without_mqtt_agent_or_metrics_loads_none_of_their_libraries(tmp_path):
    assert loaded_after_start(demo_config(tmp_path)) == []
    # the same daemon with a broker configured (not started, so none need listen) does load them
    with_mqtt = demo_config(tmp_path, mqtt={"host": "127.0.0.1", "port": 1}, outbox={"path": str(tmp_path / "o.db")})
    assert {"paho", "sqlite3", "edge.sync.client", "edge.decide.alerts"} <= set(loaded_after_start(with_mqtt))


def test_edge_run_reports_its_memory_in_the_stats_line_file_and_edge_stats(tmp_path):
    config = demo_config(tmp_path)
    run = edge_run(config)
    try:
        first = run.wait_for("process stats")
        run.wait_for("stats")
        out = subprocess.run([sys.executable, "-m", "edge", "stats", "--config", str(config)],
                             capture_output=True, text=True, timeout=30)
    finally:
        assert run.stop() == 0
    # a loaded YOLOv8n alone is tens of megabytes; the peak never trails the current figure
    assert 50 < first["rss_mb"] <= first["peak_rss_mb"] < 2000
    snap = json.loads((tmp_path / "stats.json").read_text())
    assert 50 < snap["process"]["rss_mb"] <= snap["process"]["peak_rss_mb"]
    assert out.returncode == 0, out.stderr
    memory = out.stdout.splitlines()[2]
    assert memory.startswith("memory: ") and " MB resident, peak " in memory, out.stdout


def test_a_running_daemon_keeps_what_it_built_out_of_the_collectors_sight(tmp_path):
    script = (
        "import gc, threading, time\n"
        "from edge.config import load_config\n"
        "from edge.daemon import Daemon\n"
        f"d = Daemon(load_config({str(demo_config(tmp_path))!r}))\n"
        "stop = threading.Event(); seen = []\n"
        "def watch():\n"
        "    time.sleep(1.0); seen.append(gc.get_freeze_count()); stop.set()\n"
        "threading.Thread(target=watch).start()\n"
        "d.run(stop)\n"
        "print(seen[0], gc.get_freeze_count())\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    frozen_while_running, frozen_after = map(int, out.stdout.split()[-2:])
    # the built daemon (models, config, imports: tens of thousands of objects) is frozen while
    # frames run, so a full collection never scans it; stopped, the process is as before
    assert frozen_while_running > 10_000 and frozen_after == 0
