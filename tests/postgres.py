"""A private PostgreSQL cluster for tests: ``initdb`` in a temp dir, a free loopback port,
never a shared server. PostgreSQL refuses to run as root, so under root (CI) the cluster
is made and run by the unprivileged ``postgres`` account Debian's package creates."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from broker import free_port


def postgres_bin() -> Path:
    """Where initdb and postgres are, or skip the test saying how to get them."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if not found:
        pytest.skip("needs PostgreSQL's server binaries (apt-get install postgresql)")
    return Path(found[-1]).parent


class Postgres:
    """One cluster on 127.0.0.1:``port``; each test gets a database of its own in it."""

    def __init__(self) -> None:
        self.bin = postgres_bin()
        self.user: str | None = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root, and there is no unprivileged postgres account to run PostgreSQL")
            self.user = "postgres"
        # a temp dir under /tmp (pytest's are private to root): the server's account must own it
        self.dir = Path(tempfile.mkdtemp(prefix="edgecam-pg-"))
        if self.user:
            os.chown(self.dir, pwd.getpwnam(self.user).pw_uid, pwd.getpwnam(self.user).pw_gid)
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.port = free_port()
        self.host = "127.0.0.1"
        self.proc: subprocess.Popen | None = None
        self._databases = 0
        self._run([str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                   "--no-sync", "-E", "UTF8", "--locale=C"])

    def _run(self, cmd: list[str]) -> None:
        done = subprocess.run(cmd, capture_output=True, text=True, user=self.user, cwd=self.dir)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr[-1000:]}")

    def start(self, timeout: float = 30.0) -> "Postgres":
        log = open(self.log, "a")
        self.proc = subprocess.Popen(
            [str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port), "-k", str(self.dir),
             "-c", f"listen_addresses={self.host}", "-c", "fsync=off", "-c", "max_connections=200",
             "-c", "shared_buffers=32MB"],
            stdout=log, stderr=log, user=self.user, cwd=self.dir, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"postgres exited: {self.log.read_text()[-1500:]}")
                ready = [str(self.bin / "pg_isready"), "-h", self.host, "-p", str(self.port), "-q"]
                if subprocess.run(ready).returncode == 0:
                    return self
                time.sleep(0.1)
            raise RuntimeError(f"postgres did not accept connections in {timeout:g}s: {self.log.read_text()[-1500:]}")
        except BaseException:  # never leave a server behind
            self.remove()
            raise

    def stop(self, mode: str = "fast") -> None:
        """Shut down (``fast``: clients are disconnected, as a restart by an operator does)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT if mode == "fast" else signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        import psycopg

        self._databases += 1
        name = f"fleet{self._databases}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
