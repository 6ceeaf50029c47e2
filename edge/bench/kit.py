"""What the benchmarks share: a Mosquitto of their own, and a process's CPU and memory."""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from edge.core.errors import EdgeError
from edge.core.stats import rss_mb  # noqa: F401  (the benchmarks take it from here)


class LocalMosquitto:
    """Mosquitto on a free 127.0.0.1 port, without persistence, in ``workdir``.

    ``extra_conf`` lines are appended to its config (e.g. ``sys_interval 1``). ``conf``
    replaces the plain anonymous listener with a configuration of its own (the fleet's
    generated one), which must listen on ``port``."""

    def __init__(self, workdir: Path, extra_conf: str = "", *, conf: str | None = None,
                 port: int | None = None) -> None:
        binary = shutil.which("mosquitto") or next(
            (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None)
        if binary is None:
            raise EdgeError("benchmarks need the mosquitto broker (apt-get install mosquitto)")
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        base = conf if conf is not None else (f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
                                              "persistence false\nset_tcp_nodelay true\n")
        # started as root, mosquitto would drop to its own user, which cannot write its log here
        user = f"user {getpass.getuser()}\n" if os.geteuid() == 0 else ""
        conf_path = workdir / "mosquitto.conf"
        conf_path.write_text(f"{base}\nlog_dest file {workdir / 'mosquitto.log'}\nmax_queued_messages 100000\n"
                             f"{user}{extra_conf}")
        self._cmd = [binary, "-c", str(conf_path)]
        self._proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def process(self) -> subprocess.Popen | None:
        return self._proc

    def __enter__(self) -> "LocalMosquitto":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self, **popen: Any) -> "LocalMosquitto":
        """Start it (``popen``: more arguments for subprocess.Popen) and wait until it listens."""
        self._proc = subprocess.Popen(self._cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                if self._proc.poll() is not None:
                    break
                time.sleep(0.05)
        self.stop()
        raise EdgeError(f"mosquitto did not start on 127.0.0.1:{self.port}")

    def stop(self) -> None:
        terminate(self._proc)


def terminate(proc: subprocess.Popen | None) -> None:
    """SIGTERM, then SIGKILL after 10 s."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of a process (this one by default)."""
    try:
        with open(f"/proc/{pid or 'self'}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, or None where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
