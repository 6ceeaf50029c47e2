"""``fleet bench rollout``: a staged rollout to N simulated devices, measured.

Everything is real but the devices' inference: a Mosquitto of its own, ``fleet serve``
as a separate process (so its CPU and memory are its own), the operator's RPC, and N
simulated devices that download, hash and verify every byte. Reported: time from
``rollouts.start`` to ``completed``, bytes through the broker (its ``$SYS`` counters),
the manager's CPU seconds and peak RSS, and the ingest rates of the devices' statuses
and outbox batches.

With ``secure``, the fleet is set up as a plant would set it up: a CA, every device
enrolled with its own certificate, the broker on the configuration ``fleet broker
config`` generates (TLS, the dynamic security plugin's rights, no anonymous access),
and the manager, the operator and each simulated device connecting with their own
credentials.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge.bench.kit import LocalMosquitto, cpu_s, free_port, rss_mb
from edge.core.errors import EdgeError, UsageError
from edge.core.signing import init_keys, load_public_key
from edge.core.tls import client_context
from edge.inference.manifest import load_manifest

from .brokerconf import BrokerSettings, ensure_admin, ensure_server_cert, find_plugin, write_config
from .bundles import Credentials, read_credentials, write_bundle
from .ca import FleetCA
from .client import FleetClient, Tls
from .identities import ADMIN, enrol
from .keyring import Keyring
from .local_postgres import LocalPostgres
from .simprocesses import SimulatorProcesses
from .simulator import SimSettings, load_running
from .store import Store
from .upload import push_file

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("EDGECAM_SHARED", REPO.parent / "shared"))
DEFAULT_MODEL = SHARED / "models" / "yolov8n_full_integer_quant-b.tflite"
PREVIOUS_MODEL = SHARED / "models" / "yolov8n_full_integer_quant-a.tflite"


def run_rollout_bench(*, devices: int, model: Path | None, health_window_s: float, max_transfers: int, pumps: int,
                      ingest_batches: int, ingest_events: int, timeout_s: float = 900.0, managers: int = 1,
                      db: str | None = None, processes: int | None = None, secure: bool = False) -> dict[str, Any]:
    model = model or DEFAULT_MODEL
    manifest_file = REPO / "models" / model.with_suffix(".yaml").name
    for path in (model, manifest_file, PREVIOUS_MODEL):
        if not path.is_file():
            raise UsageError(f"needs {path}")
    if managers < 1 or (managers > 1 and not (db or "").startswith("postgresql")):
        raise UsageError("several managers share a PostgreSQL store: --managers N --db postgresql[://...]")
    processes = processes or simulator_processes(devices)
    raise_file_limit(devices + 1000)  # the broker's sockets (it inherits the limit), the managers' and ours
    work = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    init_keys(work / "keys")
    manager = sim = counters = pg = broker = fleet = None
    others: list[_Manager] = []
    try:
        if db == "postgresql":  # a private cluster of its own
            pg = LocalPostgres().start()
            db = pg.new_database()
        db = db or str(work / "fleet.db")
        t0 = time.monotonic()
        if secure:
            ids = SimSettings(host="", port=0, count=devices, public_key=[]).device_ids()
            fleet = _SecureFleet(work, ids, db, managers)
        enrol_s = time.monotonic() - t0
        # $SYS counters every second
        broker = (LocalMosquitto(work / "mosquitto", "sys_interval 1\n", conf=fleet.conf, port=fleet.port) if fleet
                  else LocalMosquitto(work, extra_conf="sys_interval 1\n"))
        broker.start()
        counters = _BrokerBytes(broker.port, fleet.tls(ADMIN, work / "pki") if fleet else None)
        manager, *others = [_Manager(work, broker.port, max_transfers, db, i, fleet.manager_args(i) if fleet else [])
                            for i in range(managers)]
        with FleetClient("127.0.0.1", broker.port, identity="operator", timeout=60,
                         tls=fleet.tls("operator") if fleet else None) as client:
            pushed = {}
            for path in (PREVIOUS_MODEL, model):
                manifest = load_manifest(REPO / "models" / path.with_suffix(".yaml").name,
                                         model_dir=path.parent).model_dump(mode="json")
                pushed[path] = push_file(client, path, kind="model", name=manifest["name"],
                                         version=manifest["version"], manifest=manifest)
            target = pushed[model]
            prev = pushed[PREVIOUS_MODEL]
            settings = SimSettings(host="127.0.0.1", port=broker.port, count=devices,
                                   public_key=load_public_key(work / "keys" / "fleet.pub"), slot="detector",
                                   runs=load_running(f"{prev['name']}@{prev['version']}", PREVIOUS_MODEL),
                                   health_window_s=min(1.0, health_window_s), pumps=pumps,
                                   credentials=fleet.credentials() if fleet else None)
            sim = SimulatorProcesses(settings, processes)
            t0 = time.monotonic()
            sim.start()
            _wait(lambda: manager.online() >= devices, timeout_s, "every device in the registry",
                  every=0.2 if devices < 2000 else 1.0)  # reading 10,000 rows is not free
            statuses_s = time.monotonic() - t0

            sys_before = counters.bytes()
            cpu_before = manager.cpu_s()
            broker_cpu_before = cpu_s(broker.pid)
            sim_cpu_before = sim.cpu_s()
            t0 = time.monotonic()
            status = client.call("rollouts.start", {
                "kind": "model", "name": target["name"], "version": target["version"], "slot": "detector",
                "target": {"ids": settings.device_ids()}, "canary": max(1, devices // 100), "waves": [10, 50, 100],
                "health_window_s": health_window_s, "abort_failure_pct": 20, "min_executed": 3})
            rid = status["id"]
            final = _wait(lambda: (s := client.call("rollouts.status", {"id": rid}))["state"] != "running" and s,
                          timeout_s, "the rollout to finish")
            rollout_s = time.monotonic() - t0
            cpu_rollout = manager.cpu_s() - cpu_before
            broker_cpu = cpu_s(broker.pid) - broker_cpu_before
            sim_cpu = sim.cpu_s() - sim_cpu_before
            time.sleep(1.5)  # one more $SYS period
            sys_after = counters.bytes()
            report = sim.report()
            converged = report.running[target["sha256"]]

            t0 = time.monotonic()
            sim.send_batches(ingest_batches, ingest_events)
            expected = report.acks + devices * ingest_batches
            _wait(lambda: sim.report().acks >= expected, timeout_s, "every batch acked")
            ingest_s = time.monotonic() - t0
            stats = client.call("stats")
        events = devices * ingest_batches * ingest_events
        return {
            "devices": devices,
            "secure": secure,
            **({"enrolment_s": round(enrol_s, 1)} if secure else {}),
            "artifact": f"{target['name']}@{target['version']} ({target['size']} bytes)",
            "stages": [s["devices"] for s in final["stages"]],
            "health_window_s": health_window_s,
            "state": final["state"],
            "reason": final["reason"],
            "rollout_s": round(rollout_s, 1),
            "converged": converged,
            "committed_once": report.commits[1],
            "broker_bytes_received": sys_after[0] - sys_before[0],
            "broker_bytes_sent": sys_after[1] - sys_before[1],
            "artifact_bytes_served": stats["chunk_bytes"],
            "manager_cpu_s_rollout": round(cpu_rollout, 1),
            "manager_peak_rss_mb": round(max(m.peak_rss_mb() for m in (manager, *others)), 1),
            "managers": managers,
            "store": "postgresql" if manager.db.startswith("postgresql") else "sqlite",
            "broker_cpu_s_rollout": round(broker_cpu, 1),
            "simulator_cpu_s_rollout": round(sim_cpu, 1),
            "simulator_processes": processes,
            "status_ingest_per_s": round(devices / statuses_s, 1),
            "outbox_batches": devices * ingest_batches,
            "outbox_events_per_s": round(events / ingest_s),
            "outbox_batches_per_s": round(devices * ingest_batches / ingest_s),
            "max_transfers": max_transfers,
            "busy_answers": stats["busy"],
            "cpus": os.cpu_count(),
        }
    finally:
        if sim is not None:
            sim.stop()
        for m in (*others, manager):
            if m is not None:
                m.stop()
        if counters is not None:
            counters.stop()
        if broker is not None:
            broker.stop()
        if pg is not None:
            pg.remove()
        shutil.rmtree(work, ignore_errors=True)


def simulator_processes(devices: int) -> int:
    """A simulator process per 2,500 devices, at most two per core."""
    return max(1, min(-(-devices // 2500), 2 * (os.cpu_count() or 1)))


def raise_file_limit(needed: int) -> None:
    """Raise this process's open-file limit (inherited by the broker it starts) to the hard
    limit, or say how when even that is too low for ``needed`` sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise UsageError(f"{needed} open files needed (a socket per device at the broker), the hard limit is "
                         f"{hard}: raise it (ulimit -Hn, or LimitNOFILE= under systemd) and run again")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else needed, hard))


def _wait(condition: Callable[[], Any], timeout: float, what: str, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise EdgeError(f"benchmark timed out after {timeout:g}s waiting for {what}")
        time.sleep(every)


class _SecureFleet:
    """The fleet as ``fleet broker config``, ``fleet identities add`` and ``fleet devices
    add`` set it up: a CA, a certificate per identity, the broker's configuration."""

    def __init__(self, work: Path, devices: list[str], db: str, managers: int) -> None:
        self.work, self.devices = work, devices
        self.port = free_port()
        pki = work / "pki"
        ca = FleetCA.open(pki, create=True)
        settings = BrokerSettings(out=work / "broker", hosts=["127.0.0.1"], port=self.port, password_port=None,
                                  plugin=find_plugin(None))
        ensure_server_cert(ca, pki, settings.hosts)
        store = Store.open(db)
        try:
            now = time.time()
            ensure_admin(store, ca, pki, now)
            issued = [*(enrol(store, ca, f"fleet-{i}", "manager", now=now) for i in range(managers)),
                      enrol(store, ca, "operator", "operator", now=now),
                      *(enrol(store, ca, d, "device", now=now) for d in devices)]
            keys = Keyring(work / "keys").pinned()
            for i in issued:
                write_bundle(work / "bundles", i, host="127.0.0.1", port=self.port, ca_pem=ca.pem, keys=keys)
            store.put_identities([i.identity for i in issued])
            write_config(settings, store, pki)
        finally:
            store.close()
        self.conf = (settings.out / "mosquitto.conf").read_text()

    def tls(self, name: str, where: Path | None = None) -> Tls:
        d = where or self.work / "bundles" / name
        return Tls(str(d / "ca.crt"), str(d / f"{name}.crt"), str(d / f"{name}.key"))

    def manager_args(self, index: int) -> list[str]:
        t = self.tls(f"fleet-{index}")
        return ["--identity", f"fleet-{index}", "--tls-ca", t.ca, "--tls-cert", t.cert, "--tls-key", t.key]

    def credentials(self) -> dict[str, Credentials]:
        return {d: read_credentials(self.work / "bundles" / d) for d in self.devices}


class _BrokerBytes:
    """The broker's ``$SYS`` byte counters, as a subscriber sees them (the fleet's
    administrator may read them on the secure broker)."""

    def __init__(self, port: int, tls: Tls | None = None) -> None:
        self._sys: dict[str, int] = {}
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, client_id=ADMIN if tls else "")
        if tls is not None:
            self._client.tls_set_context(client_context(tls.ca, tls.cert, tls.key))
        self._client.on_message = lambda c, u, m: self._sys.__setitem__(m.topic, int(m.payload))
        self._client.connect("127.0.0.1", port)
        self._client.subscribe([("$SYS/broker/bytes/received", 0), ("$SYS/broker/bytes/sent", 0)])
        self._client.loop_start()

    def bytes(self) -> tuple[int, int]:
        return self._sys.get("$SYS/broker/bytes/received", 0), self._sys.get("$SYS/broker/bytes/sent", 0)

    def stop(self) -> None:
        self._client.loop_stop()


class _Manager:
    """``fleet serve`` as its own process, its log in a file."""

    def __init__(self, work: Path, port: int, max_transfers: int, db: str, index: int, identity: list[str]) -> None:
        """``identity``: the arguments that make it connect as an enrolled manager."""
        self.db = db
        self.log = work / f"fleet-{index}.log"
        self._log = open(self.log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fleet", "serve", "--db", db, "--broker", f"127.0.0.1:{port}",
             "--keys", str(work / "keys"), "--max-transfers", str(max_transfers), "--stats-interval", "5",
             "--artifacts", str(work / f"artifacts-{index}"), *(identity or ["--client-id", f"fleet-bench-{index}"])],
            stdout=subprocess.DEVNULL, stderr=self._log, cwd=REPO)
        self._leader = index == 0  # started first, it takes the lease
        _wait(self._subscribed, 30, "fleet serve to subscribe")
        self._store: Store | None = None

    def _subscribed(self) -> bool:
        if self.proc.poll() is not None:
            raise EdgeError(f"fleet serve exited: {self.log.read_text()[-500:]}")
        text = self.log.read_text()
        return ('"control subscribed"' in text or not self._leader) and '"ingest subscribed"' in text

    def online(self) -> int:
        if self._store is None:
            self._store = Store.open_readonly(self.db)
        return sum(1 for d in self._store.device_states().values() if d["state"] == "online")

    def cpu_s(self) -> float:
        return cpu_s(self.proc.pid)

    def peak_rss_mb(self) -> float:
        return rss_mb(self.proc.pid, peak=True)

    def stop(self) -> None:
        if self._store is not None:
            self._store.close()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


