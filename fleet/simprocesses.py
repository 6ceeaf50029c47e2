"""Simulated devices in several processes: one Python process cannot receive, hash and
verify the downloads of thousands of devices on one core, so ``n`` worker processes each
run every n-th device (``Simulator(share=(k, n))``) and answer the parent over a pipe.

The protocol is a few tuples, each answered once done: ``("start",)`` (the devices
connect), ``("report",)`` (answered with a ``SimReport``), ``("batches", b, e)`` (every
device is told to send ``b`` outbox batches of ``e`` events), ``("stop",)`` (the devices
said goodbye, with their last wills). Workers ignore SIGINT: the parent stops them, so
a Ctrl-C reaches one process and ends cleanly.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import signal
from multiprocessing.connection import Connection
from typing import Any, Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from edge.bench.kit import cpu_s
from edge.core.errors import EdgeError

from .simulator import SimReport, SimSettings, Simulator

REPLY_TIMEOUT_S = 120.0  # a worker that says nothing this long is stuck (launching one on a loaded machine takes 20 s)


def _worker(conn: Connection, settings: SimSettings, keys: list[bytes], share: tuple[int, int]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pinned = [Ed25519PublicKey.from_public_bytes(k) for k in keys]
    sim = Simulator(dataclasses.replace(settings, public_key=pinned), share)
    conn.send(None)  # ready: what start() then times is the devices' own
    while True:
        what, *args = conn.recv()
        if what == "start":
            sim.start()
            conn.send(None)
        elif what == "report":
            conn.send(sim.report())
        elif what == "batches":
            sim.send_batches(*args)
            conn.send(None)
        elif what == "stop":
            sim.stop()
            conn.send(None)
            return


class SimulatorProcesses:
    """``settings.count`` devices across ``processes`` worker processes, launched (and
    ready) when this returns; their devices connect on ``start()``."""

    def __init__(self, settings: SimSettings, processes: int) -> None:
        if processes < 1:
            raise ValueError("processes must be at least 1")
        self.settings = settings
        pinned = settings.public_key if isinstance(settings.public_key, Sequence) else [settings.public_key]
        keys = [k.public_bytes(Encoding.Raw, PublicFormat.Raw) for k in pinned]
        # spawn, not fork: the parent has threads (paho loops, a manager's client) a fork would copy mid-step
        ctx = multiprocessing.get_context("spawn")
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        bare = dataclasses.replace(settings, public_key=None)  # key objects do not pickle; their bytes do
        for k in range(processes):
            parent, child = ctx.Pipe()
            self._conns.append(parent)
            self._procs.append(ctx.Process(target=_worker, args=(child, bare, keys, (k, processes)),
                                           name=f"sim-worker-{k}", daemon=True))
        for p in self._procs:
            p.start()
        try:
            self._replies("launch")
        except BaseException:
            self.stop()
            raise

    def start(self) -> None:
        self._ask("start")

    def _ask(self, *message: Any) -> list[Any]:
        for k, conn in enumerate(self._conns):
            try:
                conn.send(message)
            except OSError:
                raise EdgeError(f"simulator worker {k} exited (code {self._procs[k].exitcode})") from None
        return self._replies(message[0])

    def _replies(self, what: str) -> list[Any]:
        replies = []
        for k, conn in enumerate(self._conns):
            if not conn.poll(REPLY_TIMEOUT_S):
                raise EdgeError(f"simulator worker {k} did not answer {what!r} in {REPLY_TIMEOUT_S:g}s")
            try:
                replies.append(conn.recv())
            except EOFError:
                raise EdgeError(f"simulator worker {k} exited (code {self._procs[k].exitcode})") from None
        return replies

    def report(self) -> SimReport:
        return sum(self._ask("report"), SimReport())

    def send_batches(self, batches: int, events: int) -> None:
        self._ask("batches", batches, events)

    def cpu_s(self) -> float:
        """CPU seconds the workers have used so far."""
        return sum(cpu_s(p.pid) for p in self._procs if p.pid is not None)

    def stop(self, timeout: float = 10.0) -> None:
        live = [k for k, p in enumerate(self._procs) if p.is_alive()]
        for k in live:
            try:
                self._conns[k].send(("stop",))
            except OSError:
                pass
        for k in live:
            self._conns[k].poll(timeout)
            self._procs[k].join(timeout)
            if self._procs[k].is_alive():
                self._procs[k].kill()
