#!/usr/bin/env python3
"""The whole system on one machine: a private Mosquitto, `fleet serve` with fresh keys,
two `edge run` daemons on the two sample clips with a policy that alerts, a line
controller that prints the alerts as they arrive and, after a short while, a staged
rollout of YOLOv8n -a to -b across both cameras, followed with `fleet rollout watch`.

    scripts/demo                  # sets up, then runs this until Ctrl-C
    scripts/demo --seconds 60     # a bounded run

Every process it starts is its own process group (a Ctrl-C reaches only this script,
which stops them in order) and gets SIGTERM should this script die. It drives every
part as its own process, as a site would; it imports only the contract, the benchmarks'
Mosquitto helper and the rollout renderer of `fleet rollout watch`.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from edge.bench.kit import LocalMosquitto
from edge.core.contract import ContractError, Topics, decode_alert
from edge.core.errors import EdgeError
from fleet.operate import render

REPO = Path(__file__).resolve().parent.parent
MODEL_A = REPO / "models" / "yolov8n_full_integer_quant-a.tflite"
MODEL_B = REPO / "models" / "yolov8n_full_integer_quant-b.tflite"
POLICY = REPO / "configs" / "policies" / "crossing.yaml"
SITE, LINE = "lab", "demo"
SLOT = "detector"
START_TIMEOUT_S = 180.0  # loading YOLOv8n twice on two busy cores
STOP_TIMEOUT_S = 4.0  # edge run stops within 2 s; then SIGKILL
TICK_S = 0.5
PLAIN_TABLE_EVERY_S = 10.0  # without a terminal the table is printed, not redrawn
LATENCY_FACTOR = 10  # the agent's smoke and health limits: budget x this


@dataclass(frozen=True)
class Camera:
    id: str
    clip: Path

    @property
    def device(self) -> str:
        return f"demo-{self.id}"


CAMERAS = (Camera("entrance", REPO / "media" / "pedestrians-360p10.avi"),
           Camera("hall", REPO / "media" / "pedestrians-720p50.avi"))


class DemoError(Exception):
    """A step of the demo failed; the message says which and where its log is."""


# --- the processes ---------------------------------------------------------------------------------------

_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1


def _own_group() -> None:
    """In the child before exec: a process group of its own (a terminal's Ctrl-C reaches
    only the demo) and SIGTERM when the demo dies, however it dies."""
    os.setpgid(0, 0)
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log: Path
    may_exit: bool = False  # the watch ends by itself when the rollout settles


class Processes:
    """Every process the demo starts, so that all of them are stopped, whatever happens."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.children: list[Child] = []

    def spawn(self, name: str, argv: list[str], *, stdout: int | None = None, may_exit: bool = False) -> Child:
        log = self.workdir / f"{name.replace(' ', '-')}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout or out, stderr=out, cwd=REPO,
                                    preexec_fn=_own_group)
        child = Child(name, proc, log, may_exit)
        self.children.append(child)
        return child

    def adopt(self, name: str, proc: subprocess.Popen, log: Path) -> None:
        self.children.append(Child(name, proc, log))

    def died(self) -> Child | None:
        """A child that should still run but has exited."""
        return next((c for c in self.children if not c.may_exit and c.proc.poll() is not None), None)

    def stop(self, *, force: threading.Event) -> float:
        """SIGTERM to all but the broker at once, then the broker, SIGKILL to what is left
        after STOP_TIMEOUT_S (or at once when ``force`` is set); returns the seconds taken."""
        started = time.monotonic()
        broker = [c for c in self.children if c.name == "mosquitto"]
        for group in ([c for c in self.children if c not in broker], broker):
            for c in group:
                if c.proc.poll() is None:
                    c.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            for c in group:
                while c.proc.poll() is None and time.monotonic() < deadline and not force.is_set():
                    time.sleep(0.05)
                if c.proc.poll() is None:
                    c.proc.kill()
                c.proc.wait()
        return time.monotonic() - started


class LogWatch:
    """Reads a process's JSON log lines as they are written, keeping the messages seen."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen: set[str] = set()
        self._offset = 0

    def poll(self) -> set[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except OSError:
            return self.seen
        end = data.rfind(b"\n") + 1  # only whole lines
        self._offset += end
        for line in data[:end].splitlines():
            if line.startswith(b"{"):
                try:
                    self.seen.add(json.loads(line).get("msg", ""))
                except ValueError:
                    pass
        return self.seen


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_logged(child: Child, msgs: set[str], stop: threading.Event, timeout: float = START_TIMEOUT_S) -> None:
    """Until ``child`` has logged every message in ``msgs``; DemoError if it exits first."""
    watch = LogWatch(child.log)
    deadline = time.monotonic() + timeout
    while not msgs <= watch.poll():
        if child.proc.poll() is not None:
            raise DemoError(f"{child.name} exited ({child.proc.returncode}) while starting; "
                            f"{child.log}:\n{tail(child.log)}")
        if stop.is_set():
            raise KeyboardInterrupt
        if time.monotonic() > deadline:
            raise DemoError(f"{child.name} did not start in {timeout:g} s; {child.log}:\n{tail(child.log)}")
        time.sleep(0.1)


# --- the line controller ------------------------------------------------------------------------------


class LineController:
    """A real MQTT subscriber on the cameras' alert topics, as a PLC gateway would be."""

    def __init__(self, port: int, topics: Topics) -> None:
        self.alerts: dict[str, int] = {c.id: 0 for c in CAMERAS}  # received, by camera
        self.lines: queue.Queue[str] = queue.Queue()
        self.rejected = 0
        self._subscribed = threading.Event()
        self.topic = topics.alert(SITE, LINE, "x").rpartition("/")[0] + "/+"  # every camera of the line
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="demo-line-controller",
                                   protocol=mqtt.MQTTv5)
        self._client.on_connect = lambda c, *_: c.subscribe(self.topic, qos=1)
        self._client.on_subscribe = lambda *_: self._subscribed.set()
        self._client.on_message = self._on_message
        self._client.connect("127.0.0.1", port, keepalive=10)
        self._client.loop_start()
        if not self._subscribed.wait(10):
            raise DemoError("the line controller could not subscribe to the broker")

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            alert = decode_alert(message.payload)
        except ContractError:
            self.rejected += 1
            return
        self.alerts[alert.camera] = self.alerts.get(alert.camera, 0) + 1
        what = " ".join(str(x) for x in (alert.label, f"{alert.confidence:.2f}" if alert.confidence else None,
                                         f"track {alert.track}" if alert.track is not None else None) if x)
        stamp = time.strftime("%H:%M:%S", time.localtime(alert.captured_at))
        late = (time.time() - alert.captured_at) * 1e3
        self.lines.put(f"{stamp}  ALERT  {alert.camera:<9} {alert.rule:<24} {alert.event:<8} {what:<26} "
                       f"{alert.model_version or '-':<9} {late:4.0f} ms after capture")

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


# --- the demo -----------------------------------------------------------------------------------------


def device_config(cam: Camera, workdir: Path, port: int, fps: float, threads: int) -> dict[str, Any]:
    """One camera box: the -a model, its clip looped at ``fps``, alerts, outbox and model agent."""
    d = workdir / cam.id
    return {
        "device": {"id": cam.device, "site": SITE, "line": LINE},
        "runtime": {"num_threads": threads, "stats_file": str(d / "stats.json")},
        "logging": {"format": "json", "level": "info", "stats_interval_s": 1},
        "models": {SLOT: {"path": str(MODEL_A)}},
        "cameras": [{"id": cam.id, "model": SLOT,
                     "source": {"kind": "video", "path": str(cam.clip), "loop": True, "fps": fps}}],
        "mqtt": {"host": "127.0.0.1", "port": port, "reconnect": {"initial_s": 0.2, "max_s": 2}},
        "outbox": {"path": str(d / "outbox.db")},
        "decisions": {"policy": str(POLICY)},
        # a short health window so that the rollout is over in well under a minute. The
        # latency gates are loose (a device keeps 1.0): here two daemons, the fleet and
        # whatever else runs share two cores, and a busy minute must not fail the rollout.
        "agent": {"public_key": str(workdir / "keys" / "fleet.pub"), "state_dir": str(d / "models"),
                  "smoke": {"latency_factor": LATENCY_FACTOR},
                  "health": {"window_s": 5, "min_results": 10, "latency_factor": LATENCY_FACTOR}},
    }


@dataclass
class Rollout:
    """The rollout's progress as `fleet rollout watch --json` reports it."""

    note: str = "not started"
    id: str | None = None
    status: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def state(self) -> str:
        return self.status.get("state", self.note)


class Demo:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.procs = Processes(workdir)
        self.stop = threading.Event()
        self.force = threading.Event()
        self.topics = Topics()
        self.rollout = Rollout()
        self.tty = sys.stdout.isatty()
        self.controller: LineController | None = None
        self.port = 0
        self._drawn = 0
        self._next_plain_table = 0.0
        self._last_rollout_lines: list[str] = []

    # --- start ---

    def fleet(self, *argv: str) -> list[str]:
        return [sys.executable, "-m", "fleet", *argv]

    def start(self) -> None:
        say = self.say
        keys = self.workdir / "keys"
        subprocess.run(self.fleet("keys", "init", "--dir", str(keys), "--json"), check=True, capture_output=True)
        broker = LocalMosquitto(self.workdir / "mosquitto")
        broker.start(preexec_fn=_own_group)
        self.procs.adopt("mosquitto", broker.process, self.workdir / "mosquitto" / "mosquitto.log")
        self.port = broker.port
        say(f"broker: mosquitto on 127.0.0.1:{self.port} (pid {broker.pid})")
        fleet = self.procs.spawn("fleet serve", self.fleet(
            "serve", "--db", str(self.workdir / "fleet.db"), "--broker", f"127.0.0.1:{self.port}",
            "--keys", str(keys), "--stats-interval", "5"))
        wait_logged(fleet, {"serving", "control subscribed", "ingest subscribed"}, self.stop)
        say(f"fleet: fleet serve with fresh keys in {keys} (pid {fleet.proc.pid})")
        self.controller = LineController(self.port, self.topics)
        say(f"line controller: subscribed to {self.controller.topic}")
        daemons = []
        for cam in CAMERAS:
            config = self.workdir / cam.id / "device.yaml"
            config.parent.mkdir(parents=True, exist_ok=True)
            config.write_text(yaml.safe_dump(device_config(cam, self.workdir, self.port, self.args.fps,
                                                           self.args.threads), sort_keys=False))
            daemons.append(self.procs.spawn(f"edge run {cam.id}", [sys.executable, "-m", "edge", "run",
                                                                    "--config", str(config)]))
        for cam, daemon in zip(CAMERAS, daemons):
            wait_logged(daemon, {"running"}, self.stop)
            say(f"camera {cam.id}: edge run on {cam.clip.name} at {self.args.fps:g} fps as {cam.device} "
                f"(pid {daemon.proc.pid})")

    # --- the rollout ---

    def start_rollout(self) -> None:
        """Push -b and start the rollout (on a thread: it takes a few seconds)."""
        manifest = yaml.safe_load(MODEL_B.with_suffix(".yaml").read_text())
        ref = f"{manifest['name']}@{manifest['version']}"
        broker = ["--broker", f"127.0.0.1:{self.port}", "--json"]
        self.rollout.note = f"pushing {ref}"
        self.say(f"rollout: pushing {ref} to the fleet's registry")
        push = subprocess.run(self.fleet("models", "push", str(MODEL_B), *broker), capture_output=True, text=True)
        if push.returncode != 0:
            self.rollout.error = f"fleet models push failed: {push.stderr.strip()}"
            return
        start = subprocess.run(self.fleet(
            "rollout", "start", ref, "--slot", SLOT, "--target", ",".join(c.device for c in CAMERAS),
            "--canary", "1", "--waves", "100%", "--health-window", "5s", "--min-executed", "1",
            "--abort-failure-pct", "50", *broker), capture_output=True, text=True)
        if start.returncode != 0:
            self.rollout.error = f"fleet rollout start failed: {start.stderr.strip()}"
            return
        self.rollout.id = json.loads(start.stdout)["id"]
        self.rollout.note = "started"
        self.say(f"rollout: {self.rollout.id} started, {ref} to both cameras, canary first; "
                 f"following it with fleet rollout watch {self.rollout.id}")

    def watch_rollout(self) -> None:
        watch = self.procs.spawn("fleet rollout watch", self.fleet(
            "rollout", "watch", self.rollout.id, "--broker", f"127.0.0.1:{self.port}", "--json"),
            stdout=subprocess.PIPE, may_exit=True)

        def read() -> None:
            for line in watch.proc.stdout:
                try:
                    self.rollout.status = json.loads(line)
                except ValueError:
                    pass

        threading.Thread(target=read, name="watch-reader", daemon=True).start()

    # --- the screen ---

    def say(self, line: str) -> None:
        """A line that scrolls above the table."""
        if self.controller is not None:
            self.controller.lines.put(line)
        else:
            print(line, flush=True)

    def camera_rows(self) -> list[str]:
        header = f"{'CAMERA':<9} {'STATE':<8} {'MODEL':<17} {'FPS':>5} {'DROPS':>6} {'AGE p99':>8} {'ALERTS':>7}"
        rows = [header]
        for cam in CAMERAS:
            try:
                snap = json.loads((self.workdir / cam.id / "stats.json").read_text())
                stats = snap["cameras"][0]
            except (OSError, ValueError, KeyError, IndexError):
                snap, stats = {}, {}
            alerts = self.controller.alerts.get(cam.id, 0) if self.controller else 0
            drops = stats.get("superseded", 0) + sum(stats.get("dropped", {}).values())
            p99 = stats.get("age_ms", {}).get("p99")
            rows.append(f"{cam.id:<9} {stats.get('state', '-'):<8} {snap.get('models', {}).get(SLOT, '-'):<17} "
                        f"{stats.get('processed_fps', 0):>5.1f} {drops:>6} "
                        f"{f'{p99:.0f} ms' if p99 is not None else '-':>8} {alerts:>7}")
        return rows

    def rollout_rows(self) -> list[str]:
        r = self.rollout
        if r.error:
            return [f"rollout: {r.error}"]
        if not r.status:
            return [f"rollout: {r.note}"]
        return render(r.status)

    def draw(self, elapsed: float, until: float | None) -> None:
        scrolled = []
        if self.controller is not None:
            while True:
                try:
                    scrolled.append(self.controller.lines.get_nowait())
                except queue.Empty:
                    break
        left = f", {until - elapsed:.0f} s left" if until is not None else ""
        table = [f"edgecam demo: {elapsed:.0f} s{left}; Ctrl-C stops everything", *self.camera_rows(),
                 *self.rollout_rows()]
        if self.tty:
            width = shutil.get_terminal_size().columns
            out = [f"\x1b[{self._drawn}F\x1b[J" if self._drawn else ""]
            out += [line + "\n" for line in scrolled]
            out += [line[:width - 1] + "\n" for line in table]
            sys.stdout.write("".join(out))
            self._drawn = len(table)
        else:
            for line in scrolled:
                print(line)
            rollout = self.rollout_rows()
            if rollout != self._last_rollout_lines:
                print("\n".join(rollout))
                self._last_rollout_lines = rollout
            if time.monotonic() >= self._next_plain_table:
                print("\n".join(table[:1 + 1 + len(CAMERAS)]))
                self._next_plain_table = time.monotonic() + PLAIN_TABLE_EVERY_S
        sys.stdout.flush()

    # --- run ---

    def run(self) -> int:
        self.start()
        began = time.monotonic()
        until = self.args.seconds
        rollout_at = began + self.args.rollout_after
        pusher: threading.Thread | None = None
        watching = False
        while not self.stop.is_set():
            elapsed = time.monotonic() - began
            if until is not None and elapsed >= until:
                break
            dead = self.procs.died()
            if dead is not None:
                self.draw(elapsed, until)
                raise DemoError(f"{dead.name} exited ({dead.proc.returncode}); {dead.log}:\n{tail(dead.log)}")
            if pusher is None and time.monotonic() >= rollout_at:
                pusher = threading.Thread(target=self.start_rollout, name="rollout", daemon=True)
                pusher.start()
            if self.rollout.id and not watching:
                self.watch_rollout()  # from this thread: the watch dies with the demo's main thread
                watching = True
            if pusher is None:
                self.rollout.note = f"YOLOv8n -a to -b on both cameras in {rollout_at - time.monotonic():.0f} s"
            self.draw(elapsed, until)
            self.stop.wait(TICK_S)
        if pusher is None:
            self.rollout.note = "not started: the run ended first"
        self.draw(time.monotonic() - began, until)
        return 0

    def summary(self, stop_s: float) -> list[str]:
        gone = [c for c in self.procs.children if c.proc.poll() is not None]
        lines = [f"stopped in {stop_s:.1f} s: " + ", ".join(f"{c.name} (pid {c.proc.pid})" for c in gone)
                 + ("" if len(gone) == len(self.procs.children) else "; STILL RUNNING: " + ", ".join(
                     c.name for c in self.procs.children if c not in gone))]
        if self.controller is not None:
            lines.append("alerts at the line controller: " + ", ".join(
                f"{cam} {n}" for cam, n in self.controller.alerts.items()))
        r = self.rollout
        if r.status:
            lines.append(f"rollout {r.id}: {r.state}, {r.status.get('finished', 0)} of {r.status.get('devices', 0)} "
                         f"devices finished, {r.status.get('failed', 0)} failed"
                         + (f" ({r.status['reason']})" if r.status.get("reason") else ""))
        else:
            lines.append(f"rollout {r.id or ''}: {r.error or r.note}".replace(" :", ":"))
        return lines


def check_files() -> None:
    missing = [p for p in (MODEL_A, MODEL_B, MODEL_A.with_suffix(".yaml"), MODEL_B.with_suffix(".yaml"),
                           POLICY, *(c.clip for c in CAMERAS)) if not p.is_file()]
    if missing:
        raise DemoError("missing " + ", ".join(str(p.relative_to(REPO)) for p in missing) + ": the YOLOv8n "
                        "exports and the sample clips have no public URL; they come from ../shared "
                        "(scripts/fetch_models.py --mirror DIR copies them from any copy of it)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/demo", description="The whole edgecam system on this machine: "
                                "broker, fleet, two cameras, a line controller and a staged rollout.")
    p.add_argument("--seconds", type=float, help="stop after this many seconds of running (default: at Ctrl-C)")
    p.add_argument("--rollout-after", type=float, default=10.0,
                   help="seconds of running before the rollout starts (default 10)")
    p.add_argument("--fps", type=float, default=5.0, help="frames a second each camera reads from its clip "
                   "(default 5: two daemons and the fleet on two cores)")
    p.add_argument("--threads", type=int, default=1, help="interpreter threads per daemon (default 1)")
    p.add_argument("--workdir", type=Path, help="keep configs, logs, stores and keys here "
                   "(default: a temporary directory, removed at the end)")
    args = p.parse_args(argv)
    if args.seconds is not None and args.seconds <= 0:
        p.error("--seconds must be > 0")
    if args.workdir is not None and args.workdir.exists() and any(args.workdir.iterdir()):
        p.error(f"--workdir {args.workdir} is not empty: each run starts from fresh keys and stores")
    if args.fps <= 0 or args.threads < 1:
        p.error("--fps must be > 0 and --threads at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_files()
    except DemoError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="edgecam-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    demo = Demo(args, workdir)

    def on_signal(signum: int, frame: Any) -> None:
        if demo.stop.is_set():
            demo.force.set()  # a second Ctrl-C: no more waiting
        demo.stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    code = 0
    try:
        code = demo.run()
    except KeyboardInterrupt:
        pass  # stopped while starting
    except (DemoError, EdgeError, subprocess.CalledProcessError, OSError) as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        code = 1
    finally:
        print("stopping...", flush=True)
        stop_s = demo.procs.stop(force=demo.force)
        if demo.controller is not None:
            demo.controller.close()
        print("\n".join(demo.summary(stop_s)), flush=True)
        if args.workdir is None and code == 0:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"configs, logs and stores are in {workdir}")
    return code


if __name__ == "__main__":
    sys.exit(main())
