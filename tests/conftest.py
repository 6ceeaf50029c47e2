"""Shared test fixtures: the real models and media in ../shared, read in place."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("EDGECAM_SHARED", REPO.parent / "shared"))
MANIFESTS = REPO / "models"


def shared_path(relative: str) -> Path:
    """A file under ../shared, or skip the test naming what is missing."""
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"needs {path} (the shared models and media are not beside the checkout)")
    return path


class EdgeRun:
    """`edge run` as a process. Its log goes to a file beside its config (a pipe nobody
    reads would fill and stall it); tests wait for lines it logs, not for files to appear."""

    def __init__(self, config: Path, *args: str, name: str = "edge") -> None:
        self.log = config.parent / f"{name}.log"
        self._log_file = open(self.log, "a")
        self._start = self.log.stat().st_size  # a restarted daemon appends; read only this life
        self.proc = subprocess.Popen([sys.executable, "-m", "edge", "run", "--config", str(config), *args],
                                     stdout=subprocess.DEVNULL, stderr=self._log_file, cwd=REPO)

    def text(self) -> str:
        """This life's log so far."""
        with open(self.log, errors="replace") as f:
            f.seek(self._start)
            return f.read()

    def logged(self, msg: str) -> list[dict]:
        """This life's JSON log lines whose message is ``msg``."""
        found = []
        for line in self.text().splitlines():
            if line.startswith("{") and line.endswith("}"):
                doc = json.loads(line)
                if doc.get("msg") == msg:
                    found.append(doc)
        return found

    def wait_for(self, msg: str, timeout: float = 60.0) -> dict:
        """The first line logged with ``msg``; fails if the daemon exits or ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self.logged(msg)
            if lines:
                return lines[0]
            if self.proc.poll() is not None:
                raise AssertionError(f"edge run exited ({self.proc.returncode}) before logging {msg!r}: "
                                     f"{self.text()[-2000:]}")
            time.sleep(0.05)
        raise AssertionError(f"edge run never logged {msg!r} in {timeout:g}s: {self.text()[-2000:]}")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait; kill if it does not stop in time. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log_file.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._log_file.close()


def edge_run(config: Path, *args: str, name: str = "edge") -> EdgeRun:
    """``edge run --config`` as its own process (see :class:`EdgeRun`)."""
    return EdgeRun(config, *args, name=name)


def manifest_for(model_file: str) -> Path:
    """The repo's manifest for a model in ../shared/models."""
    return MANIFESTS / Path(model_file).with_suffix(".yaml").name


@pytest.fixture
def shared():
    return shared_path


@pytest.fixture
def broker(tmp_path):
    """A real Mosquitto on a free 127.0.0.1 port (tests/broker.py); skips without the binary."""
    from broker import Broker

    b = Broker(tmp_path / "mosquitto").start()
    yield b
    b.stop()


@pytest.fixture(scope="session")
def postgres():
    """One private PostgreSQL cluster for the session (tests/postgres.py); skips without it."""
    from postgres import Postgres

    pg = Postgres().start()
    yield pg
    pg.remove()


ENGINES = ["sqlite", "postgresql"]
both_engines = pytest.mark.parametrize("fleet_db", ENGINES, indirect=True)  # a test run on each engine


@pytest.fixture
def fleet_db(request, tmp_path) -> str:
    """A fleet store's location: a SQLite path (the default), or with ``@both_engines`` also
    a fresh database in the session's PostgreSQL cluster."""
    if getattr(request, "param", "sqlite") == "sqlite":
        return str(tmp_path / "fleet.db")
    return request.getfixturevalue("postgres").new_database()


def db_rows(db: str, sql: str, *args) -> list[tuple]:
    """Rows of a query on a fleet store of either engine (``?`` placeholders)."""
    import sqlalchemy as sa

    from fleet.store.engine import create, parse_url

    parts = sql.split("?")
    text = parts[0] + "".join(f":p{i}{part}" for i, part in enumerate(parts[1:]))
    engine = create(parse_url(db), readonly=True, pool_size=1)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text(text), {f"p{i}": a for i, a in enumerate(args)})]
    finally:
        engine.dispose()


class AlertRecorder:
    """A pure-logic stand-in for the alert publisher: records what would be sent."""

    def __init__(self) -> None:
        self.alerts: list = []
        self.states: list = []

    def submit(self, alert, topic, expiry_s) -> bool:
        self.alerts.append(alert)
        return True

    def set_state(self, state, topic) -> None:
        self.states.append(state)
