"""Hostile and broken input on every topic each side subscribes to, and in the fleet's
store: each refused and counted by its reason, no process stops, `fleet serve` starts
again on the store and every read command reads it. One Mosquitto and one manager for
the module; many bad messages per test."""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import yaml
from broker import Broker, FleetProcess, wait_until
from conftest import edge_run, manifest_for, shared_path
from controller import Controller
from paho.mqtt.enums import CallbackAPIVersion

from edge.core import contract as C
from edge.core.ids import new_id
from edge.core.signing import init_keys
from edge.sync import events as E
from fleet.cli import main as fleet_main
from fleet.client import FleetClient
from fleet.desired import desired_row, reported_row
from fleet.rollouts import ROW_LOADERS, Execution, Rollout, Spec, Target
from fleet.store import Store

T = C.Topics()
SHA = "cd" * 32
TINY = "models/mobilenet_v1_0.25_128_quant.tflite"
NON_FINITE = ("NaN", "Infinity", "-Infinity", "1e999")


# --- one broker and one manager for the module ----------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hostile")


@pytest.fixture(scope="module")
def mosquitto(workdir):
    b = Broker(workdir / "mosquitto").start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def keys(workdir) -> Path:
    init_keys(workdir / "keys")
    return workdir / "keys"


class Manager:
    """`fleet serve` on one store, restartable; its counters through the broker. Each has
    its own prefix, so two on one broker never answer each other's requests."""

    def __init__(self, db: Path, broker: Broker, keys: Path, prefix: str = C.DEFAULT_PREFIX) -> None:
        self.db, self.broker, self.keys, self.prefix = db, broker, keys, prefix
        self.proc: FleetProcess | None = None

    def start(self) -> "Manager":
        self.proc = FleetProcess(self.db, self.broker, "--keys", str(self.keys), "--operator", "operator",
                                 "--prefix", self.prefix, "--client-id", f"fleet-{self.db.stem}")
        self.proc.wait_for("control subscribed")
        self.proc.wait_for("ingest subscribed")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            assert self.proc.stop() == 0, self.proc.lines[-5:]

    def restart(self) -> None:
        self.stop()
        self.start()

    def client(self) -> FleetClient:
        return FleetClient(self.broker.host, self.broker.port, identity="operator", prefix=self.prefix, timeout=10)

    def stats(self) -> dict:
        with self.client() as client:
            return client.call("stats")

    def cli(self, capsys, *args: str, broker: bool = False) -> Output:
        """A read command (the `fleet` command's own code, in this process); it must succeed."""
        where = (["--broker", f"{self.broker.host}:{self.broker.port}", "--prefix", self.prefix] if broker
                 else ["--db", str(self.db)])
        capsys.readouterr()
        code = fleet_main([*args, *where])
        out = Output(*capsys.readouterr())
        assert code == 0, f"fleet {' '.join(args)}: {out.stderr}"
        return out


@dataclass
class Output:
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def manager(workdir, mosquitto, keys):
    m = Manager(workdir / "fleet.db", mosquitto, keys).start()
    yield m
    m.stop()


class Publisher:
    """A raw client: publishes whatever bytes a test says, QoS 1, and waits for the broker."""

    def __init__(self, broker: Broker) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def send(self, topic: str, bodies: dict[str, list[bytes]]) -> None:
        for group in bodies.values():
            for body in group:
                self.client.publish(topic, body, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def publisher(mosquitto):
    p = Publisher(mosquitto)
    yield p
    p.close()


def put(doc: dict, key: str, raw: str) -> bytes:
    """``doc`` as JSON with ``key`` (a dotted path) set to the raw JSON text ``raw``."""
    *path, last = key.split(".")
    target = doc = json.loads(json.dumps(doc))
    for part in path:
        target = target[int(part)] if isinstance(target, list) else target[part]
    target[last] = "@RAW@"
    return json.dumps(doc).replace('"@RAW@"', raw).encode()


def variants(doc: dict, key: str, values: tuple[str, ...]) -> list[bytes]:
    return [put(doc, key, v) for v in values]


def merged(*groups: dict[str, list[bytes]]) -> dict[str, int]:
    """Bodies per reason over several topics, as a receiver counts them."""
    out: dict[str, int] = {}
    for group in groups:
        for reason, bodies in group.items():
            out[reason] = out.get(reason, 0) + len(bodies)
    return out


def grown(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


# --- the manager's topics ---------------------------------------------------------------------


def test_bad_bodies_on_every_manager_topic_are_counted_by_reason_and_a_restart_reads_everything(
        manager, publisher, capsys):
    device = "cam-h"
    events = [E.health_snapshot("c0", {"fps": 9.5}), E.detection_summary("c0", time.time(), "m", [])]
    wire = ",".join(C.event_json(id=e.id, seq=i + 1, kind=e.kind.value, device=device, camera=e.camera,
                                 captured_at=e.captured_at, recorded_at=e.recorded_at, priority=e.priority,
                                 payload_json=e.payload_json) for i, e in enumerate(events))
    batch = json.loads(C.batch_body(device, new_id(), time.time(), wire))
    status = C.Status(v=1, device=device, state="online", at=time.time(), site="plant-a", line="3").model_dump()
    reported = C.Reported(v=1, device=device, at=time.time(), desired_version=1).model_dump()
    job = C.JobStatus(v=1, device=device, job="r0001", slot="det", sha256=SHA, state="downloading", at=time.time(),
                      progress=0.5).model_dump()
    request = C.ArtifactRequest(v=1, device=device, sha256=SHA, offset=0, length=1024, request="q1",
                                response_topic=T.artifact(device, SHA)).model_dump()
    rpc = {"v": 1, "id": "x1", "op": "ping", "args": {}}

    outbox_bad = {
        "non_finite": [*variants(batch, "events.0.captured_at", NON_FINITE), put(batch, "sent_at", "1e999"),
                       put(batch, "events.1.payload.count", "-Infinity")],
        "bad_version": variants(batch, "v", ("true", "1.0")),
        "schema": [*variants(batch, "events.0.captured_at", ("-1", "1e300", '"now"')),
                   *variants(batch, "events.0.seq", ("-1", str(2**63), "1.5"))],
        "oversized": [put(batch, "events.0.payload.pad", json.dumps("x" * C.MAX_BATCH_BYTES))],
    }
    status_bad = {
        "non_finite": variants(status, "at", NON_FINITE),
        "bad_version": variants(status, "v", ("true", "1.0")),
        "schema": variants(status, "at", ("-5", "1e300")),
        "oversized": [put(status, "runtime", json.dumps("x" * C.MAX_STATUS_BYTES))],
    }
    reported_bad = {
        "non_finite": [*variants(reported, "at", NON_FINITE), put(reported, "desired_version", "1e999")],
        "bad_version": variants(reported, "v", ("true", "1.0")),
        "schema": [put(reported, "desired_version", "-1"), put(reported, "at", "1e300"),
                   put(reported, "desired_version", "true")],
        "oversized": [put(reported, "device", json.dumps("x" * C.MAX_REPORTED_BYTES))],
    }
    job_bad = {
        "non_finite": [put(job, "progress", "NaN"), put(job, "at", "Infinity"), put(job, "metrics", '{"ms": 1e999}')],
        "bad_version": variants(job, "v", ("true", "1.0")),
        "schema": [put(job, "progress", "2"), put(job, "at", "-1")],
        "oversized": [put(job, "reason", json.dumps("x" * C.MAX_JOB_BYTES))],
    }
    request_bad = {
        "non_finite": [put(request, "offset", "1e999"), put(request, "length", "NaN")],
        "bad_version": variants(request, "v", ("true", "1.0")),
        "schema": variants(request, "offset", ("-1", str(C.MAX_ARTIFACT_BYTES + 1), "0.5")),
        "oversized": [put(request, "request", json.dumps("x" * C.MAX_ARTIFACT_REQUEST_BYTES))],
    }
    rpc_bad = {
        "non_finite": [put(rpc, "args", '{"x": NaN}'), put(rpc, "args", '{"x": [1, 2e400]}')],
        "bad_version": variants(rpc, "v", ("true", "1.0")),
        "oversized": [put(rpc, "args", json.dumps({"x": "y" * C.MAX_RPC_BYTES}))],
    }
    before = manager.stats()
    publisher.send(T.outbox(device), outbox_bad)
    publisher.send(T.status(device), status_bad)
    publisher.send(T.reported(device), reported_bad)
    publisher.send(T.job(device, "r0001"), job_bad)
    publisher.send(T.artifact_get(device), request_bad)
    with manager.client() as client:
        for bodies in rpc_bad.values():
            for body in bodies:
                answer = client.publish_raw(body)
                assert answer and answer["error"]["code"] == "bad_request", answer
        assert client.call("ping")["identity"] == "operator", "good requests are still answered"
    for topic, doc in ((T.outbox(device), batch), (T.status(device), status), (T.reported(device), reported),
                       (T.job(device, "r0001"), job), (T.artifact_get(device), request)):
        publisher.send(topic, {"good": [json.dumps(doc).encode()]})

    goods = ("batches", "statuses", "reported", "jobs")

    def good_ones_counted() -> dict | None:
        stats = manager.stats()
        return stats if all(stats[k] > before[k] for k in goods) else None

    stats = wait_until(good_ones_counted, 15, "the good message on each topic, after the bad ones")
    assert grown(stats["rejected"], before["rejected"]) == merged(outbox_bad, status_bad)
    # the well-formed request is refused too: no desired state of the device names that artifact
    assert grown(stats["control_rejected"], before["control_rejected"]) == {
        **merged(reported_bad, job_bad, request_bad, rpc_bad), "not_assigned": 1}
    assert stats["chunk_requests"] == before["chunk_requests"]
    assert grown({k: stats[k] for k in (*goods, "stored", "store_errors")}, before) == {
        **dict.fromkeys(goods, 1), "stored": 2}

    manager.restart()  # a store that took all of this must start, and hold what it acked only
    assert manager.stats()["store_skipped"] == {}
    tail = [json.loads(line)
            for line in manager.cli(capsys, "events", "tail", "--device", device, "--json").stdout.splitlines()]
    assert [e["id"] for e in tail] == [e.id for e in events]
    assert all(0 < e["captured_at"] < C.MAX_TIME for e in tail)
    (listed,) = [d for d in json.loads(manager.cli(capsys, "devices", "list", "--json").stdout) if d["id"] == device]
    assert (listed["state"], listed["site"], listed["events"]) == ("online", "plant-a", 2)
    assert device in manager.cli(capsys, "devices", "list").stdout
    shown = json.loads(manager.cli(capsys, "devices", "show", device, "--json", broker=True).stdout)
    assert shown["reported"]["desired_version"] == 1 and [j["state"] for j in shown["jobs"]] == ["downloading"]
    manager.cli(capsys, "rollout", "status", broker=True)


# --- a store holding what no version could read ------------------------------------------------


def test_a_store_with_unreadable_rows_starts_and_every_read_command_skips_them(workdir, mosquitto, keys, capsys):
    db = workdir / "old.db"
    Store.open(db).close()  # the schema, as the migrations make it
    now = time.time()
    art = C.Artifact(kind="model", name="m", version="1", sha256=SHA, size=10)
    spec = Spec(kind="model", name="m", version="1", sha256=SHA, slot="det", target=Target(ids=["cam-good"]),
                devices=["cam-good"], bounds=[1], canary=0, waves=[100.0], health_window_s=1.0,
                abort_failure_pct=20.0, min_executed=1)
    good_rollout = Rollout(id="r0001", seq=1, spec=spec, state="completed", stage=0, created_by="operator",
                           created_at=now, updated_at=now).row()
    good_execution = Execution(rollout="r0001", device="cam-good", stage=0, state="succeeded", job_state="committed",
                               previous=C.Assignment(artifact=art), updated_at=now).row()
    good_desired = desired_row(C.Desired(v=1, device="cam-good", version=5, at=now,
                                         models={"det": C.Assignment(artifact=art, job="r0001")}))
    good_reported = reported_row(C.Reported(v=1, device="cam-good", at=now, desired_version=5), now)
    event = {"id": new_id(), "device": "cam-good", "seq": 1, "kind": "health", "camera": "c0", "captured_at": now,
             "recorded_at": now, "priority": 0, "payload": '{"fps":9.5}', "batch": new_id(), "received_at": now}
    device = {"id": "cam-good", "state": "online", "site": "plant-a", "line": "3", "runtime": "0.1.0",
              "models": '{"det":"1"}', "status_at": now, "first_seen": now, "last_seen": now, "events": 1,
              "state_since": now}
    job = {"device": "cam-good", "job": "r0001", "slot": "det", "sha256": SHA, "state": "committed", "reason": None,
           "at": now, "received_at": now}
    inf = float("inf")
    # what older versions stored (NaN became null, 1e999 became Infinity) or a hand edit left
    rows = {
        "events": [event,
                   {**event, "id": new_id(), "captured_at": inf},
                   {**event, "id": new_id(), "captured_at": 1e300},
                   {**event, "id": new_id(), "payload": "{not json"},
                   {**event, "id": new_id(), "recorded_at": "yesterday"}],
        "devices": [device,
                    {**device, "id": "cam-bad-1", "last_seen": "yesterday"},
                    {**device, "id": "cam-bad-2", "models": "[1, 2"},
                    {**device, "id": "cam-bad-3", "events": -4}],
        "jobs": [job, {**job, "at": inf}, {**job, "at": -1.0}],
        "artifacts": [{"kind": "model", "name": "m", "version": "1", "sha256": SHA, "size": 10,
                       "doc": art.model_dump_json(), "pushed_at": now, "pushed_by": "operator"},
                      {"kind": "model", "name": "m", "version": "2", "sha256": SHA, "size": 10,
                       "doc": '{"kind": "model"}', "pushed_at": now, "pushed_by": "operator"}],
        "desired": [good_desired,
                    {**good_desired, "device": "cam-old-1", "doc": "{truncated"},
                    {**good_desired, "device": "cam-old-2"}],  # the document names another device
        "reported": [good_reported,
                     {**good_reported, "device": "cam-old-1",
                      "doc": good_reported["doc"].replace(f'"at":{now!r}', '"at":null')
                                                 .replace("cam-good", "cam-old-1")}],
        "rollouts": [good_rollout,
                     {**good_rollout, "id": "r0002", "seq": 2, "spec": "{}"},
                     {**good_rollout, "id": "r0003", "seq": 3, "stage": 7},
                     {**good_rollout, "id": "r0004", "seq": 4, "state": "exploded"}],
        "executions": [good_execution,
                       {**good_execution, "rollout": "r0002"},  # its rollout was skipped
                       {**good_execution, "device": "cam-x", "state": "exploded"},
                       {**good_execution, "device": "cam-y", "previous": '{"artifact": 5}'}],
    }
    assert "null" in rows["reported"][1]["doc"]
    with sqlite3.connect(db) as conn:
        for table, table_rows in rows.items():
            for row in table_rows:
                conn.execute(f"INSERT INTO {table} ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                             tuple(row.values()))
    # not "internal error: ValidationError" and a restart loop under systemd
    manager = Manager(db, mosquitto, keys, prefix="edgecam/old").start()
    try:
        skipped = manager.stats()["store_skipped"]
        assert skipped == {"desired": 2, "reported": 1, "rollouts": 3, "executions": 3}
        tail = manager.cli(capsys, "events", "tail", "--json")
        assert [json.loads(line)["id"] for line in tail.stdout.splitlines()] == [event["id"]]
        assert "unreadable rows skipped" in tail.stderr and "table=events rows=4" in tail.stderr
        listed = manager.cli(capsys, "devices", "list", "--json")
        assert [d["id"] for d in json.loads(listed.stdout)] == ["cam-good"] and "table=devices rows=3" in listed.stderr
        manager.cli(capsys, "devices", "list")
        shown = json.loads(manager.cli(capsys, "devices", "show", "cam-good", "--json", broker=True).stdout)
        assert shown["desired"]["version"] == 5 and shown["reported"]["desired_version"] == 5
        assert [e["rollout"] for e in shown["executions"]] == ["r0001"] and len(shown["jobs"]) == 1
        rollouts = json.loads(manager.cli(capsys, "rollout", "status", "--json", broker=True).stdout)
        assert [r["id"] for r in rollouts] == ["r0001"]
        assert "COMPLETED" in manager.cli(capsys, "rollout", "status", "r0001", broker=True).stdout
        assert json.loads(manager.cli(capsys, "models", "list", "--json", broker=True).stdout)[0]["version"] == "1"
        with sqlite3.connect(db) as conn:  # versions whose descriptions together outgrow one response
            for version in range(3, 10):
                doc = art.model_copy(update={"version": str(version), "manifest": {"labels": ["x" * 40_000]}})
                conn.execute("INSERT INTO artifacts (kind, name, version, sha256, size, doc, pushed_at, pushed_by)"
                             " VALUES ('model', 'm', ?, ?, 10, ?, ?, 'operator')",
                             (str(version), SHA, doc.model_dump_json(), now))
        capsys.readouterr()
        assert fleet_main(["models", "show", "m", "--broker", f"{mosquitto.host}:{mosquitto.port}",
                           "--prefix", manager.prefix]) == 2
        assert "over the 262144 a response may hold" in capsys.readouterr().err
        expected = {**skipped, "jobs": 2, "artifacts": 1}
        assert manager.stats()["store_skipped"] == expected
        manager.cli(capsys, "devices", "show", "cam-good", broker=True)
        assert manager.stats()["store_skipped"] == expected, "a row read again is counted once"
        assert manager.proc.proc.poll() is None
    finally:
        manager.stop()


def test_nothing_is_written_that_would_not_read_back(tmp_path):
    store = Store.open(tmp_path / "fleet.db")
    try:
        now = time.time()
        good = reported_row(C.Reported(v=1, device="cam-1", at=now), now)
        bad = {**good, "device": "cam-2", "doc": good["doc"].replace(f'"at":{now!r}', '"at":null')}
        store.commit({"reported": [good, bad], "jobs": [{"device": "cam-1", "job": "j", "slot": "s", "sha256": SHA,
                                                        "state": "active", "reason": None, "at": float("inf"),
                                                        "received_at": now}]}, ROW_LOADERS)
        assert store.stats()["refused"] == {"reported": 1, "jobs": 1}
        assert [r.device for r in store.load("reported", ROW_LOADERS["reported"])] == ["cam-1"]
        assert store.jobs() == [] and store.stats()["skipped"] == {}
    finally:
        store.close()


def test_the_registry_refuses_a_manifest_a_device_would_refuse(tmp_path):
    from edge.core.signing import load_private_key, sha256_file
    from edge.inference.manifest import load_manifest
    from fleet.registry import ArtifactError, Registry

    model = shared_path(TINY)
    manifest = load_manifest(manifest_for(TINY), model_dir=model.parent).model_dump(mode="json")
    private, _ = init_keys(tmp_path / "keys")
    store = Store.open(tmp_path / "fleet.db")
    try:
        registry = Registry(store, tmp_path / "artifacts", load_private_key(private))
        sha = sha256_file(model)
        assert registry.upload(sha, model.stat().st_size, 0, model.read_bytes()) == model.stat().st_size
        push = lambda doc: registry.push(kind="model", name=doc["name"], version=doc["version"],  # noqa: E731
                                         sha256=sha, manifest=doc, by="operator", now=time.time())
        long_labels = [f"{label} ({'a description that runs on ' * 2})" for label in manifest["labels"]]
        refusals = {
            "finite number": {**manifest, "input": {**manifest["input"], "mean": [float("nan")] * 3}},
            "a number devices refuse": {**manifest, "thresholds": {**manifest["thresholds"], "top_k": 10**400}},
            "a desired state has room for": {**manifest, "labels": long_labels},
        }
        for why, doc in refusals.items():
            with pytest.raises(ArtifactError) as err:
                push(doc)
            assert err.value.code == "invalid_artifact" and why in str(err.value), str(err.value)
        assert push(manifest).created and store.stats()["refused"] == {}
    finally:
        store.close()


# --- the device's topics ----------------------------------------------------------------------


def device_config(tmp_path: Path, broker: Broker, keys: Path) -> Path:
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: h1\ncamera_health: {after_s: 0.2}\n")
    cfg = {
        "device": {"id": "cam-dev", "site": "plant-a", "line": "3"},
        "runtime": {"num_threads": 1, "stats_file": str(tmp_path / "stats.json")},
        "logging": {"format": "json", "stats_interval_s": 0.3},
        "models": {"det": {"path": str(shared_path(TINY)), "manifest": str(manifest_for(TINY))}},
        # a frozen feed: the camera goes blind at once, and the controller gets a real alert
        "cameras": [{"id": "eye", "source": {"kind": "pattern", "width": 128, "height": 96, "fps": 5, "still": True},
                     "model": "det", "frozen_after_s": 0.5}],
        "mqtt": {"host": broker.host, "port": broker.port, "reconnect": {"initial_s": 0.2, "max_s": 1}},
        "outbox": {"path": str(tmp_path / "outbox.db")},
        "decisions": {"policy": str(policy)},
        "agent": {"public_key": str(keys / "fleet.pub"), "state_dir": str(tmp_path / "models")},
    }
    path = tmp_path / "cam.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def device_stats(tmp_path: Path) -> dict:
    try:
        return json.loads((tmp_path / "stats.json").read_text())
    except (OSError, ValueError):
        return {}


def test_bad_bodies_on_every_device_topic_are_counted_by_reason_and_the_daemon_serves_on(
        tmp_path, mosquitto, keys, manager, publisher):
    alerts_topic = T.alert("plant-a", "3", "eye")
    controller = Controller(mosquitto, f"{alerts_topic}/#", client_id="hostile-controller")
    run = edge_run(device_config(tmp_path, mosquitto, keys))
    try:
        # the fleet's own acks arrive: the device's subscriptions are in place
        wait_until(lambda: device_stats(tmp_path).get("sync", {}).get("acked_batches", 0) >= 1
                   or run.proc.poll() is not None, 60, "the first batch acked by the real manager")
        assert run.proc.poll() is None, run.text()[-3000:]
        wait_until(lambda: "agent" in device_stats(tmp_path), 10, "the agent's stats")
        ack = C.Ack(v=1, device="cam-dev", batches=[new_id()]).model_dump()
        art = C.Artifact(kind="model", name="m", version="2", sha256=SHA, size=10, manifest={"input": {"mean": [0.5]}})
        desired = C.Desired(v=1, device="cam-dev", version=10**12, at=time.time(),
                            models={"det": C.Assignment(artifact=art, job="r0009")}).model_dump()
        header = C.ChunkHeader(v=1, sha256=SHA, offset=0, total=3, request="q1").model_dump()
        online = C.IngestOnline(v=1, manager="fleet-x", at=time.time()).model_dump()
        acks_bad = {
            "non_finite": [put(ack, "v", "NaN"), put(ack, "v", "1e999"), put(ack, "v", "-Infinity")],
            "bad_version": variants(ack, "v", ("true", "1.0")),
        }
        desired_bad = {
            "non_finite": [put(desired, "version", "NaN"), put(desired, "at", "1e999"),
                           put(desired, "models.det.artifact.manifest.input.mean", "[Infinity, 0, 0]")],
            "bad_version": variants(desired, "v", ("true", "1.0")),
            "schema": [put(desired, "version", "-1"), put(desired, "at", "-1"),
                       put(desired, "models.det.artifact.size", str(2**40)), put(desired, "version", "1.5e12")],
            "oversized": [put(desired, "models.det.artifact.manifest.pad", json.dumps("x" * C.MAX_DESIRED_BYTES))],
        }
        online_bad = {
            "non_finite": [put(online, "at", "NaN"), put(online, "at", "1e999")],
            "bad_version": variants(online, "v", ("true", "1.0")),
            "schema": [put(online, "at", "-1"), put(online, "manager", '""')],
            "oversized": [put(online, "manager", json.dumps("x" * C.MAX_INGEST_ONLINE_BYTES))],
        }
        chunks_bad = {
            "non_finite": [put(header, "offset", "NaN") + b"\nabc", put(header, "total", "1e999") + b"\nabc"],
            "bad_version": [put(header, "v", "1.0") + b"\nabc"],
            "schema": [put(header, "offset", "-1") + b"\nabc", put(header, "total", str(2**40)) + b"\nabc"],
            "oversized": [put(header, "total", str(2**20)) + b"\n" + b"x" * (C.MAX_CHUNK_BYTES + 1)],
            "malformed_json": [b"x" * 2000],
        }
        publisher.send(T.ack("cam-dev"), acks_bad)
        publisher.send(T.ingest_online(), online_bad)
        publisher.send(T.desired("cam-dev"), desired_bad)
        publisher.send(T.artifact("cam-dev", SHA), chunks_bad)

        total = {"sync": sum(merged(acks_bad, online_bad).values()),
                 "agent": sum(merged(desired_bad, chunks_bad).values())}
        sync_rejected = lambda: sum(sum(device_stats(tmp_path)["sync"][k].values())  # noqa: E731
                                    for k in ("acks_rejected", "ingest_online_rejected"))
        wait_until(lambda: (sync_rejected() >= total["sync"]
                            and sum(device_stats(tmp_path)["agent"]["rejected"].values()) >= total["agent"]), 15,
                   "every bad body counted")
        stats = device_stats(tmp_path)
        assert stats["sync"]["acks_rejected"] == merged(acks_bad)
        assert stats["sync"]["ingest_online_rejected"] == merged(online_bad)
        assert stats["agent"]["rejected"] == merged(desired_bad, chunks_bad)
        assert stats["agent"]["desired"] == 0 and stats["agent"]["jobs"] == {}, "nothing was acted on"
        acked = stats["sync"]["acked_batches"]
        wait_until(lambda: device_stats(tmp_path)["sync"]["acked_batches"] > acked, 15,
                   "the fleet's acks still accepted after the bad ones")
        assert run.proc.poll() is None

        # what a line controller decodes: the daemon's real alert and state, and forgeries
        wait_until(lambda: any("/state/" not in m.topic for m in controller.received()), 30, "the blind-camera alert")
        alert = json.loads(next(m.payload for m in controller.received() if "/state/" not in m.topic))
        state = json.loads(next(m.payload for m in controller.received() if "/state/" in m.topic))
        alerts_bad = {
            "non_finite": [put(alert, "captured_at", "NaN"), put(alert, "published_at", "1e999"),
                           put(alert, "confidence", "Infinity")],
            "bad_version": variants(alert, "v", ("true", "1.0")),
            "schema": [put(alert, "captured_at", "-1"), put(alert, "count", "-1"), put(alert, "box", "[0, 0, 1]")],
            "oversized": [put(alert, "detail", json.dumps("x" * C.MAX_ALERT_BYTES))],
        }
        states_bad = {"non_finite": [put(state, "since", "NaN")], "bad_version": [put(state, "v", "true")],
                      "schema": [put(state, "since", "-1e3")]}
        seen, forged = len(controller.received()), sum(merged(alerts_bad, states_bad).values())
        publisher.send(alerts_topic, alerts_bad)
        publisher.send(f"{alerts_topic}/state/forged", states_bad)
        wait_until(lambda: len(controller.received()) - seen >= forged, 10, "the forged alerts at the controller")
    finally:
        assert run.stop() == 0, run.text()[-3000:]
        controller.close()
    refused: dict[str, int] = {}
    decoded = []
    for m in controller.received():
        try:
            decoded.append((C.decode_alert_state if "/state/" in m.topic else C.decode_alert)(m.payload))
        except C.ContractError as exc:
            refused[exc.reason] = refused.get(exc.reason, 0) + 1
    assert refused == merged(alerts_bad, states_bad)
    assert any(isinstance(d, C.Alert) and d.event == "camera_blind" for d in decoded)
    assert any(isinstance(d, C.AlertState) and d.rule == "camera_health" for d in decoded)
