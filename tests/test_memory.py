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


def _resident_kb(path: Path) -> int:
    """This process's resident kB of the mappings of ``path``."""
    total, inside, target = 0, False, str(path.resolve())
    for line in Path("/proc/self/smaps").read_text().splitlines():
        parts = line.split()
        if "-" in parts[0] and len(parts) >= 5 and ":" in parts[3]:  # a mapping's header line
            inside = len(parts) > 5 and parts[5] == target
        elif inside and parts[0] == "Rss:":
            total += int(parts[1])
    return total


def test_release_file_pages_drops_a_read_mapping_whose_data_stays_readable(tmp_path):
    import mmap

    from edge.core.memory import release_file_pages

    data = tmp_path / "weights.bin"
    data.write_bytes(bytes(range(256)) * 4096)  # 1 MB
    with open(data, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
        checksum = sum(view[::4096])  # touches every page
        assert _resident_kb(data) > 0
        assert release_file_pages(data) >= len(view)
        assert _resident_kb(data) == 0
        assert sum(view[::4096]) == checksum  # faulted back in from the file, unchanged


def test_a_loaded_model_keeps_little_of_its_file_resident_and_still_answers_the_same():
    import numpy as np

    from edge.core.memory import release_file_pages
    from edge.inference.runtime import load_interpreter

    path = shared_path(YOLO)
    loaded = load_interpreter(path, num_threads=1)
    # XNNPACK packed the weights at allocation: what is read again is the tensors' descriptions
    assert _resident_kb(path) < path.stat().st_size / 1024 / 10
    it, tensor = loaded.interpreter, loaded.inputs[0]
    frame = np.random.default_rng(1).integers(0, 255, tensor.shape, dtype=np.uint8).astype(tensor.dtype)

    def outputs() -> list[np.ndarray]:
        it.set_tensor(tensor.index, frame)
        it.invoke()
        return [it.get_tensor(o.index).copy() for o in loaded.outputs]

    first = outputs()
    release_file_pages(path)  # again, after an invoke: whatever it read comes back from the file
    assert all(np.array_equal(a, b) for a, b in zip(first, outputs()))


def test_the_allocator_settings_apply_on_glibc():
    import platform

    from edge.core import memory

    if platform.libc_ver()[0] != "glibc":
        import pytest
        pytest.skip("mallopt is glibc's")
    assert memory.tune_allocator() is True


def test_a_video_source_decodes_with_the_configured_threads_and_the_same_frames():
    import cv2
    import numpy as np

    from edge.capture.sources import make_source
    from edge.config import VideoSource

    clip = str(shared_path("media/pedestrians-720p50.avi"))
    frames = {}
    for threads, expected in ((None, 1), (0, cv2.getNumberOfCPUs()), (2, 2)):
        cfg = VideoSource.model_validate({"kind": "video", "path": clip, "pace": "fast",
                                          **({} if threads is None else {"decoder_threads": threads})})
        source = make_source(cfg)
        source.open()
        try:
            assert source._cap.get(cv2.CAP_PROP_N_THREADS) == expected  # what FFmpeg was told
            frames[threads] = [source.read() for _ in range(5)]
        finally:
            source.close()
    assert all(np.array_equal(a, b) for a, b in zip(frames[None], frames[2]))


def test_edge_bench_memory_reports_each_run_split_into_anonymous_and_file_pages(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "edge", "bench", "memory", "--model", str(shared_path(YOLO)),
         "--manifest", str(manifest_for(YOLO)), "--source", str(shared_path("media/pedestrians-360p10.avi")),
         "--extra-source", str(shared_path("media/pedestrians-720p50.avi")), "--extra-cameras", "0,1",
         "--warmup", "1", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    one, two = report["runs"]
    assert (one["cameras"], two["cameras"]) == (1, 2)
    for run in (one, two):
        assert run["rss_mb"] <= run["peak_rss_mb"]
        assert abs(run["anon_mb"] + run["file_mb"] - run["rss_mb"]) <= 1.0  # the split accounts for the whole
    assert "per_extra_camera_mb" not in one
    assert two["per_extra_camera_mb"] == round(two["rss_mb"] - one["rss_mb"], 1)
    assert len(report["load_average_before"]) == 3
    # each run's daemon really ran the cameras it was given
    logged = (tmp_path / "run-1" / "edge.log").read_text()
    assert '"cameras": 2' in logged or '"cameras":2' in logged


def test_edge_bench_memory_refuses_extra_cameras_without_their_source(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "edge", "bench", "memory", "--model", str(shared_path(YOLO)),
         "--source", str(shared_path("media/pedestrians-360p10.avi")), "--extra-cameras", "0,1"],
        capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 2 and "--extra-source" in out.stderr


def test_release_file_pages_leaves_a_librarys_written_pages_alone():
    """A library's relocated data lives in its file's private mappings: dropping those pages
    would revert them to the file's bytes and crash the next call. A child, in case it does."""
    script = (
        "import numpy as np\n"
        "from edge.core.memory import release_file_pages\n"
        "lib = next(line.split()[-1] for line in open('/proc/self/maps') if '_multiarray_umath' in line)\n"
        "assert release_file_pages(lib) > 0\n"  # its clean mappings (code) were dropped
        "print(int(np.arange(1000).sum()), float(np.linalg.norm(np.ones(4))))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["499500", "2.0"]
