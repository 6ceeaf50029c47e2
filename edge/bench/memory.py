"""``edge bench memory``: what `edge run` holds resident, with one camera and with more.

Each run starts a real ``edge run`` (its own process, as systemd would) on the demo's
config: one camera on ``source`` with the model, no MQTT, agent or metrics server, and
``extra`` more cameras on ``extra_source`` with the same model. Once the daemon says it
is running and ``warmup_s`` more have passed, its ``/proc/PID/status`` gives the resident
memory (``VmRSS``), its peak (``VmHWM``), and the resident split into anonymous memory
(heap, arenas, tensors, frames: what the daemon holds) and file pages (libraries' code and
mapped files: clean pages the kernel can take back and read again). Resident memory does
not depend on the machine's load, so the figures hold on a busy machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import yaml

from edge import __version__
from edge.core.errors import EdgeError, UsageError

from .kit import load_average, terminate

REPO = Path(__file__).resolve().parents[2]
STATUS_FIELDS = {"VmRSS": "rss_mb", "VmHWM": "peak_rss_mb", "RssAnon": "anon_mb", "RssFile": "file_mb"}
START_TIMEOUT_S = 120.0


def run_memory_bench(model: Path, source: Path, *, manifest: Path | None = None, extra_source: Path | None = None,
                     extra: tuple[int, ...] = (0, 1, 2), warmup_s: float = 25.0, threads: int = 2,
                     policy: Path | None = None, workdir: Path | None = None) -> dict[str, Any]:
    """One ``edge run`` per entry of ``extra`` (cameras beyond the first); a JSON-ready report."""
    if warmup_s < 0:
        raise UsageError("--warmup must be >= 0")
    if any(n < 0 for n in extra) or not extra:
        raise UsageError("--extra-cameras: counts >= 0, at least one")
    if any(extra) and extra_source is None:
        raise UsageError("--extra-source is needed for extra cameras")
    policy = policy or REPO / "configs" / "policies" / "crossing.yaml"
    # the config's paths are read relative to the config, which lives in the work directory
    model, source, policy = model.resolve(), source.resolve(), policy.resolve()
    manifest = manifest.resolve() if manifest else None
    extra_source = extra_source.resolve() if extra_source else None
    load_before = load_average()
    runs = []
    with ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edgecam-bench-")))
        workdir.mkdir(parents=True, exist_ok=True)
        for n in extra:
            config = _config(workdir / f"run-{n}", model, manifest, source, extra_source, n, threads, policy)
            runs.append({"cameras": 1 + n, **_measure(config, warmup_s)})
    base = next((r for r in runs if r["cameras"] == 1), None)
    for run in runs:
        if base is not None and run is not base:
            run["per_extra_camera_mb"] = round((run["rss_mb"] - base["rss_mb"]) / (run["cameras"] - 1), 1)
    return {
        "bench": "memory",
        "edgecam": __version__,
        "model": str(model),
        "source": str(source),
        "extra_source": str(extra_source) if extra_source else None,
        "warmup_s": warmup_s,
        "threads": threads,
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "runs": runs,
    }


def _config(workdir: Path, model: Path, manifest: Path | None, source: Path, extra_source: Path | None,
            extra: int, threads: int, policy: Path) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    detector = {"path": str(model), **({"manifest": str(manifest)} if manifest else {})}
    cameras = [{"id": "entrance", "model": "detector", "source": {"kind": "video", "path": str(source), "loop": True}}]
    cameras += [{"id": f"extra{i}", "model": "detector",
                 "source": {"kind": "video", "path": str(extra_source), "loop": True}} for i in range(extra)]
    doc = {
        "device": {"id": "bench-mem"},
        "runtime": {"num_threads": threads},
        "logging": {"format": "json", "stats_interval_s": 3600},
        "models": {"detector": detector},
        "cameras": cameras,
        "decisions": {"policy": str(policy)},
    }
    path = workdir / "device.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _measure(config: Path, warmup_s: float) -> dict[str, Any]:
    log_path = config.parent / "edge.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "edge", "run", "--config", str(config)],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        _wait_running(proc, log_path)
        time.sleep(warmup_s)
        if proc.poll() is not None:
            raise EdgeError(f"edge run exited ({proc.returncode}) during the warm-up; see {log_path}")
        status = read_status(proc.pid)
    finally:
        terminate(proc)
    return status


def _wait_running(proc: subprocess.Popen, log_path: Path) -> None:
    """Until the daemon logs ``running`` (its cameras and executors started)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EdgeError(f"edge run exited ({proc.returncode}) before running; see {log_path}")
        for line in log_path.read_text().splitlines():
            try:
                if json.loads(line).get("msg") == "running":
                    return
            except ValueError:
                continue
        time.sleep(0.2)
    raise EdgeError(f"edge run did not start within {START_TIMEOUT_S:g} s; see {log_path}")


def read_status(pid: int | str = "self") -> dict[str, Any]:
    """Resident, peak, anonymous and file-backed memory (MB) and thread count of a process."""
    out: dict[str, Any] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in STATUS_FIELDS:
                out[STATUS_FIELDS[key]] = round(int(value.split()[0]) / 1024, 1)
            elif key == "Threads":
                out["threads"] = int(value)
    missing = set(STATUS_FIELDS.values()) - out.keys()
    if missing:
        raise EdgeError(f"/proc/{pid}/status does not give {', '.join(sorted(missing))}")
    return out
