"""A real Mosquitto for tests: its own config, port and temp dir; stoppable and restartable."""

from __future__ import annotations

import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def mosquitto_binary() -> str:
    """The mosquitto executable, or skip the test saying how to get it."""
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None)
    if not found:
        pytest.skip("needs the mosquitto broker (apt-get install mosquitto)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """Mosquitto on 127.0.0.1:``port``, persistence in ``workdir`` (never in the repo)."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.binary = mosquitto_binary()
        self.workdir = workdir
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.proc: subprocess.Popen | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {workdir}/\n"
            "autosave_interval 0\n"  # saved on shutdown only
            f"log_dest file {self.log}\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
            "max_queued_messages 10000\n"
            "set_tcp_nodelay true\n"
            # started as root, mosquitto would drop to its own user, which cannot write a
            # private temp dir: no log, and sessions silently not saved across a restart
            + (f"user {getpass.getuser()}\n" if os.geteuid() == 0 else "")
        )

    @classmethod
    def generated(cls, conf: Path, port: int, workdir: Path) -> "Broker":
        """Mosquitto on ``conf`` as `fleet broker config` wrote it (listening on ``port``),
        plus a log file in ``workdir``."""
        broker = cls(workdir, port)
        broker.conf.write_text(conf.read_text() + f"log_dest file {broker.log}\n"
                               "log_type error\nlog_type warning\nlog_type notice\n"
                               + (f"user {getpass.getuser()}\n" if os.geteuid() == 0 else ""))
        return broker

    def start(self, timeout: float = 10.0) -> "Broker":
        deadline = time.monotonic() + timeout
        while True:  # the port may be in TIME_WAIT right after a stop
            self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if self._wait_listening(deadline):
                return self
            self.proc.kill()
            self.proc.wait()
            if time.monotonic() > deadline:
                raise RuntimeError(f"mosquitto did not start on port {self.port}: {self._log_tail()}")
            time.sleep(0.2)

    def _wait_listening(self, deadline: float) -> bool:
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return True
            except OSError:
                time.sleep(0.05)
        return False

    def stop(self) -> None:
        """A clean broker shutdown (it saves its sessions)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """The broker dies at once: unsaved sessions and retained messages are gone."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def _log_tail(self) -> str:
        try:
            return self.log.read_text()[-500:]
        except OSError:
            return "(no log)"

    def __enter__(self) -> "Broker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class FleetProcess:
    """`fleet serve` as a real process, its JSON log collected from stderr."""

    def __init__(self, db: Path | str, broker: Broker, *extra: str, env: dict[str, str] | None = None) -> None:
        self.db = db
        self.lines: list[dict] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fleet", "serve", "--db", str(db), "--broker", f"{broker.host}:{broker.port}",
             "--stats-interval", "0.5", *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO,
            env={**os.environ, **env} if env else None)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            try:
                self.lines.append(json.loads(line))
            except ValueError:
                self.lines.append({"msg": line.rstrip()})

    def wait_for(self, msg: str, timeout: float = 20.0, since: int = 0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines[since:]:
                if line.get("msg") == msg:
                    return line
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"fleet never logged {msg!r}; last lines: {self.lines[-5:]}")

    def last_stats(self) -> dict:
        stats = [line for line in self.lines if line.get("msg") in ("stats", "stopped")]
        return stats[-1] if stats else {}

    def stop(self, timeout: float = 5.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(2)
        return self.proc.returncode


def stepped_clock(path: Path) -> dict[str, str]:
    """The environment that gives a Python daemon a wall clock the test can step: write the
    offset in seconds to ``path`` (tests/stepclock)."""
    path.write_text("0")
    return {"PYTHONPATH": str(REPO / "tests" / "stepclock"), "EDGECAM_STEP_CLOCK": str(path)}


def wait_until(condition, timeout: float, what: str, interval: float = 0.05):
    """Poll ``condition`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)
