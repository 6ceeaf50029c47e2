"""Supervision: a thread that dies on an error nobody caught is noticed by its owner.

The daemon here is the one `edge run` runs, on a real model and a live test pattern; the
faults are injected into one component at a time."""

from __future__ import annotations

import threading

import pytest
from broker import wait_until
from conftest import manifest_for, shared_path

from edge.config import parse_config
from edge.daemon import Daemon
from edge.sync.recorder import fan_out

TINY = "models/mobilenet_v1_0.25_128_quant.tflite"


def config() -> dict:
    return {
        "device": {"id": "supervised"},
        "runtime": {"num_threads": 1},
        "logging": {"stats_interval_s": 60},
        "models": {"cls": {"path": str(shared_path(TINY)), "manifest": str(manifest_for(TINY))}},
        "cameras": [{"id": "cam", "source": {"kind": "pattern", "width": 128, "height": 96, "fps": 30},
                     "model": "cls"}],
    }


class Running:
    """The daemon on a thread; ``code`` is what `edge run` would exit with."""

    def __init__(self) -> None:
        self.daemon = Daemon(parse_config(config()))
        self.stop = threading.Event()
        self.code: int | None = None
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        self.code = self.daemon.run(self.stop)

    def processed(self) -> int:
        return self.daemon.scheduler.snapshot()["cameras"][0]["processed"]

    def __enter__(self) -> "Running":
        self.thread.start()
        wait_until(lambda: self.processed() >= 3, 20, "frames processed")
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive()


def failed_line(caplog) -> dict:
    record = next(r for r in caplog.records if r.getMessage().startswith("component failed"))
    return record.fields


def test_a_sink_that_raises_on_every_result_neither_stops_inference_nor_the_other_sinks(caplog):
    seen = []

    def broken(result):
        raise OSError(28, "No space left on device")

    with Running() as run:
        run.daemon.scheduler.sink = fan_out([broken, seen.append])  # the first fails, the next still gets it
        start = run.processed()
        wait_until(lambda: run.processed() >= start + 10, 20, "inference going on")
        assert run.thread.is_alive()
        errors = run.daemon.scheduler.snapshot()["sink_errors"]
        assert errors >= 10 and len(seen) >= 10
    assert run.code == 0
    tracebacks = [r for r in caplog.records if r.getMessage() == "result sink failed"]
    assert len(tracebacks) == 1, "one traceback a minute, every error counted"


@pytest.mark.parametrize("where, failure", [
    ("planner", "executor-0: MemoryError: injected"),  # the executor thread dies
    ("read", "capture-cam: MemoryError: injected"),  # the capture thread dies
])
def test_a_thread_that_dies_makes_the_daemon_exit_non_zero(caplog, where, failure):
    def broken(*args, **kw):
        raise MemoryError("injected")

    with Running() as run:
        camera = run.daemon.cameras[0]
        if where == "planner":
            camera.planner.start = broken
        else:
            camera.capture.source.read = broken
        run.thread.join(10)
        assert not run.thread.is_alive(), "the daemon noticed and stopped"
    assert run.code == 1
    assert failure in failed_line(caplog)["failure"]
