"""Rollouts end to end: a real Mosquitto, `fleet serve` as a real process, simulated
devices speaking the real contract, and the operator's RPC through the broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from broker import REPO, FleetProcess, stepped_clock, wait_until
from conftest import db_rows, manifest_for, shared_path

from edge.core import contract
from edge.core.signing import init_keys, load_private_key, load_public_key, sign, verify
from edge.inference.manifest import load_manifest
from fleet.client import FleetClient
from fleet.errors import OpError
from fleet.simprocesses import SimulatorProcesses
from fleet.simulator import Faults, SimSettings, Simulator, load_running
from fleet.store import Store
from fleet.upload import push_file

A = "models/yolov8n_full_integer_quant-a.tflite"
B = "models/yolov8n_full_integer_quant-b.tflite"
SLOT = "detector"
MAX_TRANSFERS = 8  # fewer than a wave's devices, so the bound is exercised


# --- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture
def keys(tmp_path):
    directory = tmp_path / "keys"
    init_keys(directory)
    return directory


@pytest.fixture
def fleet(tmp_path, broker, keys):
    proc = start_fleet(tmp_path, broker, keys)
    yield proc
    proc.stop()


def start_fleet(tmp_path: Path, broker, keys: Path, env: dict[str, str] | None = None) -> FleetProcess:
    proc = FleetProcess(tmp_path / "fleet.db", broker, "--keys", str(keys), "--operator", "operator",
                        "--operator", "alice", "--max-transfers", str(MAX_TRANSFERS), env=env)
    proc.wait_for("control subscribed")
    proc.wait_for("ingest subscribed")
    return proc


@pytest.fixture
def client(broker, fleet):
    with FleetClient(broker.host, broker.port, identity="operator", timeout=20) as c:
        yield c


@pytest.fixture
def models(client):
    """yolov8n -a and -b in the registry; returns their artifacts by suffix."""
    return {"a": push_model(client, A), "b": push_model(client, B)}


def push_model(client: FleetClient, relative: str) -> dict:
    path = shared_path(relative)
    manifest = load_manifest(manifest_for(relative), model_dir=path.parent).model_dump(mode="json")
    return push_file(client, path, kind="model", name=manifest["name"], version=manifest["version"],
                     manifest=manifest)


def simulate(broker, keys: Path, count: int, faults: Faults = Faults(), **kw) -> Simulator:
    sim = Simulator(SimSettings(host=broker.host, port=broker.port, count=count,
                                public_key=load_public_key(keys / "fleet.pub"), slot=SLOT,
                                runs=load_running("yolov8n@8.1.42-a", shared_path(A)), faults=faults,
                                health_window_s=0.5, **kw))
    sim.start()
    return sim


def registered(db: Path, count: int) -> None:
    def online() -> bool:
        store = Store.open_readonly(db)
        try:
            return sum(1 for d in store.device_states().values() if d["state"] == "online") >= count
        finally:
            store.close()
    wait_until(online, 30, f"{count} devices online in the registry")


def rollout_args(**kw) -> dict:
    args = {"kind": "model", "name": "yolov8n", "version": "8.1.42-b", "slot": SLOT, "target": {"tags": {"site": "plant-a"}},
            "canary": 1, "waves": [10, 50, 100], "health_window_s": 1.0, "abort_failure_pct": 20, "min_executed": 3}
    return {**args, **kw}


def fleet_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fleet", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)


# --- keys and the registry ---------------------------------------------------------------------------------


def test_keys_init_makes_a_private_key_and_never_overwrites(tmp_path):
    made = fleet_cli("keys", "init", "--dir", str(tmp_path / "k"), "--json")
    assert made.returncode == 0, made.stderr
    paths = json.loads(made.stdout)
    assert os.stat(paths["private"]).st_mode & 0o777 == 0o600
    before = Path(paths["private"]).read_bytes()
    again = fleet_cli("keys", "init", "--dir", str(tmp_path / "k"))
    assert again.returncode == 2 and again.stderr.startswith("fleet: error: ") and "refusing to overwrite" in again.stderr
    assert Path(paths["private"]).read_bytes() == before


def test_push_validates_signs_stores_by_sha_and_refuses_other_bytes_for_a_version(tmp_path, broker, keys, fleet, client):
    b = push_model(client, B)
    assert b["created"] and b["signed"] and b["size"] == shared_path(B).stat().st_size
    stored = tmp_path / "fleet.db.artifacts" / b["sha256"]
    assert stored.read_bytes() == shared_path(B).read_bytes()
    assert push_model(client, B)["created"] is False, "the same bytes again change nothing"
    (shown,) = client.call("artifacts.show", {"name": "yolov8n", "version": "8.1.42-b"})
    verify(load_public_key(keys / "fleet.pub"), contract.Artifact.model_validate(
        {k: shown[k] for k in ("kind", "name", "version", "sha256", "size", "manifest", "signature")}))
    assert len(shown["manifest"]["labels"]) == 80, "labels travel inline"

    # the -a bytes under -b's name and version: refused, nothing changes
    a_manifest = load_manifest(manifest_for(A), model_dir=shared_path(A).parent).model_dump(mode="json")
    b_manifest = {**a_manifest, "version": "8.1.42-b"}
    with pytest.raises(OpError) as conflict:
        push_file(client, shared_path(A), kind="model", name="yolov8n", version="8.1.42-b", manifest=b_manifest)
    assert conflict.value.code == "conflict" and "other bytes" in str(conflict.value)
    assert [r["version"] for r in client.call("artifacts.list", {})] == ["8.1.42-b"]

    # bytes that do not hash to what the upload claims: discarded
    data = shared_path(A).read_bytes()
    import base64
    import hashlib
    claimed = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(OpError) as tampered:
        client.call("artifacts.upload", {"sha256": claimed, "size": len(data[:1000]), "offset": 0,
                                         "data": base64.b64encode(data[:1000]).decode()})
    assert tampered.value.code == "invalid_artifact" and "tampered" in str(tampered.value)
    assert client.call("artifacts.has", {"sha256": claimed}) == {"stored": False}

    # a model LiteRT cannot run is refused by the CLI before any upload, exit 2
    broken = shared_path("models/broken/model_invoking_error.tflite")
    bad = fleet_cli("models", "push", str(broken), "--manifest", str(manifest_for(B)),
                    "--broker", f"{broker.host}:{broker.port}")
    assert bad.returncode == 2 and bad.stderr.splitlines()[-1].startswith("fleet: error: model rejected"), bad.stderr
    # through the CLI, --json, for an existing version
    ok = fleet_cli("models", "push", str(shared_path(B)), "--manifest", str(manifest_for(B)), "--json",
                   "--broker", f"{broker.host}:{broker.port}")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["created"] is False


def test_policies_push_with_their_own_versions(tmp_path, client):
    doc = tmp_path / "line3.yaml"
    doc.write_text("version: 7\ndefault: {accept_at: 0.2, reject_at: 0.6}\n")
    pushed = push_file(client, doc, kind="policy", name="line3", version="7", manifest=None)
    assert pushed["kind"] == "policy" and pushed["created"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 8\ndefault: {accept_at: 0.9, reject_at: 0.1}\n")
    with pytest.raises(OpError) as refused:
        push_file(client, bad, kind="policy", name="line3", version="8", manifest=None)
    assert refused.value.code == "invalid_artifact"
    assert [p["version"] for p in client.call("artifacts.list", {"kind": "policy"})] == ["7"]


# --- bad requests ---------------------------------------------------------------------------------------


def test_bad_requests_get_clear_errors_change_nothing_and_the_manager_keeps_running(tmp_path, broker, keys, fleet,
                                                                                    client, models):
    db = tmp_path / "fleet.db"
    sim = simulate(broker, keys, 4)
    try:
        registered(db, 4)
        cases = {
            "not_found": [rollout_args(version="9.9.9"), rollout_args(name="nosuch")],
            "empty_target": [rollout_args(target={"tags": {"site": "plant-z"}})],
            "bad_request": [rollout_args(waves=[50, 10]), rollout_args(waves=[10, 50]), rollout_args(slot=None),
                            rollout_args(target={"ids": ["sim-0000"], "tags": {"site": "plant-a"}}),
                            rollout_args(canary="one"), rollout_args(target={"tags": {"colour": "red"}})],
        }
        for code, bodies in cases.items():
            for body in bodies:
                with pytest.raises(OpError) as err:
                    client.call("rollouts.start", body)
                assert err.value.code == code, (body, err.value)
        with pytest.raises(OpError) as unknown:
            client.call("rollouts.start", rollout_args(target={"ids": ["sim-0000", "ghost-1"]}))
        assert unknown.value.code == "not_found" and "ghost-1" in str(unknown.value)
        with pytest.raises(OpError) as op:
            client.call("rollouts.explode", {})
        assert op.value.code == "bad_request"

        # malformed requests: answered when they say where, counted either way
        assert client.publish_raw(b'{"v": 1, "id": "x", "op":')["error"]["code"] == "bad_request"
        assert client.publish_raw(b'{"v": 2, "id": "x", "op": "ping"}')["ok"] is False
        assert client.publish_raw(b'{"v": 1, "id": "x", "op": "ping"}', reply=False) is None

        # a device's identity may not operate the fleet, not even read
        with FleetClient(broker.host, broker.port, identity="sim-0001", timeout=10) as device:
            with pytest.raises(OpError) as forbidden:
                device.call("rollouts.start", rollout_args())
            assert forbidden.value.code == "forbidden" and "not an operator" in str(forbidden.value)
        cli = fleet_cli("rollout", "start", "yolov8n@8.1.42-b", "--slot", SLOT, "--target", "site=plant-a",
                        "--identity", "sim-0001", "--broker", f"{broker.host}:{broker.port}")
        assert cli.returncode == 2 and cli.stderr.startswith("fleet: error: identity 'sim-0001'"), cli.stderr

        assert client.call("rollouts.list") == [], "nothing above started a rollout"
        assert db_rows(db, "SELECT count(*) FROM desired") == [(0,)]

        # one real rollout; a second on the same slot is refused while it runs
        first = client.call("rollouts.start", rollout_args(health_window_s=60))
        with pytest.raises(OpError) as busy:
            client.call("rollouts.start", rollout_args(target={"tags": {"site": "plant-b"}}))
        assert busy.value.code == "conflict" and first["id"] in str(busy.value)
        client.call("rollouts.abort", {"id": first["id"], "reason": "test"})

        # a tampered artifact in the store is never handed out
        stored = tmp_path / "fleet.db.artifacts" / models["b"]["sha256"]
        data = bytearray(stored.read_bytes())
        data[1000] ^= 0xFF
        stored.write_bytes(bytes(data))
        with pytest.raises(OpError) as tampered:
            client.call("rollouts.start", rollout_args())
        assert tampered.value.code == "invalid_artifact" and "tampered" in str(tampered.value)
        assert [r["id"] for r in client.call("rollouts.list")] == [first["id"]]

        assert client.call("ping")["identity"] == "operator"
        assert fleet.proc.poll() is None, "the manager is still running"
        stats = client.call("stats")
        assert stats["control_rejected"].get("malformed_json") == 1 and stats["control_rejected"].get("bad_version") == 1
        assert stats["control_rejected"].get("bad_reply_topic") == 1
    finally:
        sim.stop()


def test_devices_refuse_a_desired_state_signed_by_another_key(tmp_path, broker, keys, client, models):
    other = tmp_path / "other-keys"
    init_keys(other)
    sim = Simulator(SimSettings(host=broker.host, port=broker.port, count=3, id_prefix="cam",
                                public_key=load_public_key(other / "fleet.pub"), slot=SLOT,
                                runs=load_running("yolov8n@8.1.42-a", shared_path(A))))
    sim.start()
    try:
        registered(tmp_path / "fleet.db", 3)
        rid = client.call("rollouts.start", rollout_args(target={"ids": sorted(sim.devices)}, canary=0, waves=[100],
                                                         min_executed=2, abort_failure_pct=50,
                                                         job_timeout_s=3))["id"]
        final = wait_until(lambda: (s := client.call("rollouts.status", {"id": rid}))["state"] != "running" and s,
                           60, "the rollout to abort")
        # nothing about the desired state is kept, so the devices never start the job: the
        # rollout fails them when their job times out
        assert final["state"] == "aborted"
        assert all(d.rejected.get("bad_signature", 0) >= 1 and not d.jobs and d.acted_version == 0
                   for d in sim.devices.values())
        assert all(sim.running(d) == models["a"]["sha256"] for d in sim.devices)
    finally:
        sim.stop()


def test_the_cli_says_when_no_manager_answers(broker):
    out = fleet_cli("rollout", "status", "--broker", f"{broker.host}:{broker.port}", "--timeout", "1")
    assert out.returncode == 1 and "no answer" in out.stderr and out.stderr.count("\n") == 1
    out = fleet_cli("models", "list", "--broker", "127.0.0.1:1", "--timeout", "1")
    assert out.returncode == 1 and "cannot reach the broker" in out.stderr
    usage = fleet_cli("rollout", "start", "yolov8n", "--slot", "d", "--target", "a", "--broker", "127.0.0.1:1")
    assert usage.returncode == 2 and "NAME@VERSION" in usage.stderr


# --- rollouts --------------------------------------------------------------------------------------------


def test_a_staged_rollout_to_50_devices_completes_and_desired_meets_reported(tmp_path, broker, keys, fleet, client,
                                                                             models):
    db = tmp_path / "fleet.db"
    dropper = "sim-0030"  # drops off halfway through its download, back 2 s later
    sim = simulate(broker, keys, 50, Faults(offline_mid_download=frozenset({dropper}), offline_for_s=2.0))
    late = "sim-0013"
    try:
        registered(db, 50)
        sim.set_online(late, False)  # away when its wave comes
        wait_until(lambda: not sim.devices[late].online, 10, f"{late} offline")
        wait_until(lambda: db_rows(db, "SELECT state FROM devices WHERE id = ?", late) == [("offline",)], 10,
                   "the registry to see it go")
        started = fleet_cli("rollout", "start", "yolov8n@8.1.42-b", "--slot", SLOT, "--target",
                            ",".join(sorted(sim.devices)), "--canary", "1", "--waves", "10%,50%,100%",
                            "--health-window", "1s", "--json", "--broker", f"{broker.host}:{broker.port}")
        assert started.returncode == 0, started.stderr
        status = json.loads(started.stdout)
        rid = status["id"]
        assert [s["devices"] for s in status["stages"]] == [1, 4, 20, 25]
        canary = db_rows(db, "SELECT device FROM executions WHERE rollout = ? AND stage = 0", rid)[0][0]
        assert status["counts"] == {"assigned": 1, "pending": 49}

        # the canary runs alone until it has been healthy for the window
        wait_until(lambda: client.call("rollouts.status", {"id": rid})["stage"] >= 1, 60, "the canary to pass")
        assert sim.running(canary) == models["b"]["sha256"]
        first_other = min(r[0] for r in db_rows(db, "SELECT assigned_at FROM executions WHERE rollout = ? AND stage = 1", rid))
        canary_done = db_rows(db, "SELECT finished_at FROM executions WHERE rollout = ? AND device = ?", rid, canary)[0][0]
        assert first_other >= canary_done

        # every stage but the late device's finishes; that one waits for it
        def all_but_late() -> bool:
            s = client.call("rollouts.status", {"id": rid})
            return s["counts"].get("succeeded", 0) == 49 and s
        waiting = wait_until(all_but_late, 120, "49 devices to succeed")
        assert waiting["state"] == "running" and waiting["stage"] == 3
        assert db_rows(db, "SELECT state FROM executions WHERE rollout = ? AND device = ?", rid, late) == [("assigned",)]
        assert sim.running(late) == models["a"]["sha256"]
        sim.set_online(late, True)

        watch = fleet_cli("rollout", "watch", rid, "--broker", f"{broker.host}:{broker.port}", timeout=60)
        assert watch.returncode == 0, watch.stderr
        assert "COMPLETED" in watch.stdout.splitlines()[-5] and "25/25 ok" in watch.stdout
        final = client.call("rollouts.status", {"id": rid})
        assert final["state"] == "completed" and final["counts"] == {"succeeded": 50}

        # desired and reported converge on every device
        for device in sim.devices:
            view = wait_until(lambda device=device: (v := client.call("devices.show", {"id": device}))["reported"]
                              and v["reported"]["desired_version"] == v["desired"]["version"] and v,
                              10, f"{device}'s reported state")
            assert view["desired"]["models"][SLOT]["artifact"]["sha256"] == models["b"]["sha256"]
            assert view["reported"]["models"][SLOT]["sha256"] == models["b"]["sha256"]
            assert sim.running(device) == models["b"]["sha256"]
        stats = client.call("stats")
        assert stats["transfers_max_active"] <= MAX_TRANSFERS < 25, "never more downloads at once than allowed"
        assert stats["transfers_max_waiting"] > 0, "the rest of the wave waited its turn"
        assert stats["chunk_errors"] == {} and stats["busy"] == 0
        late_jobs = [s for (s,) in db_rows(db, "SELECT state FROM jobs WHERE device = ? AND job = ? ORDER BY rowid", late, rid)]
        assert late_jobs[-2:] == ["active", "committed"]
        assert sim.devices[dropper].offline_used and sim.devices[dropper].online
        (since,) = db_rows(db, "SELECT state_since FROM devices WHERE id = ?", dropper)[0]
        assert since > status["created_at"], "it went offline and came back during the rollout"
    finally:
        sim.stop()


def test_simulator_processes_share_the_devices_and_each_converges_exactly_once(tmp_path, broker, keys, fleet, client,
                                                                              models):
    db = tmp_path / "fleet.db"
    settings = SimSettings(host=broker.host, port=broker.port, count=20, public_key=load_public_key(keys / "fleet.pub"),
                           slot=SLOT, runs=load_running("yolov8n@8.1.42-a", shared_path(A)), health_window_s=0.2,
                           pumps=1)
    sim = SimulatorProcesses(settings, 2)
    try:
        sim.start()
        registered(db, 20)
        assert sorted(d for (d,) in db_rows(db, "SELECT id FROM devices")) == settings.device_ids()
        rid = client.call("rollouts.start", rollout_args(target={"ids": settings.device_ids()},
                                                          health_window_s=0.5))["id"]
        final = wait_until(lambda: (s := client.call("rollouts.status", {"id": rid}))["state"] != "running" and s,
                           60, "the rollout to finish")
        assert final["state"] == "completed" and final["counts"] == {"succeeded": 20}
        report = sim.report()
        assert report.devices == 20 and report.online == 20
        assert report.running == {models["b"]["sha256"]: 20}
        assert report.commits == {1: 20}, "every device committed the new model once, in one of the processes"
        committed = db_rows(db, "SELECT device, COUNT(*) FROM jobs WHERE job = ? AND state = 'committed' "
                                "GROUP BY device ORDER BY device", rid)
        assert committed == [(d, 1) for d in settings.device_ids()]

        sim.send_batches(2, 5)  # the outbox path through the workers too: every batch acked, each event once
        wait_until(lambda: sim.report().acks >= report.acks + 40, 30, "every batch acked")
        assert db_rows(db, "SELECT COUNT(*), COUNT(DISTINCT id) FROM events") == [(200, 200)]
    finally:
        sim.stop()


def test_failures_abort_after_the_minimum_and_every_updated_device_goes_back(tmp_path, broker, keys, fleet, client,
                                                                            models):
    db = tmp_path / "fleet.db"
    ids = SimSettings(host="", port=0, count=50, public_key=None).device_ids()
    # 30% fail: half of them corrupt the download, half roll back as unhealthy; never the canary
    bad = [ids[i] for i in range(1, 50, 10)] + [ids[i] for i in range(3, 50, 10)] + [ids[i] for i in range(7, 50, 10)]
    faults = Faults(fail_verify=frozenset(bad[::2]), unhealthy=frozenset(bad[1::2]))
    assert len(bad) == 15
    sim = simulate(broker, keys, 50, faults)
    try:
        registered(db, 50)
        status = client.call("rollouts.start", rollout_args(target={"ids": ids}, health_window_s=1.0))
        rid = status["id"]
        final = wait_until(lambda: (s := client.call("rollouts.status", {"id": rid}))["settled"] and s, 120,
                           "the rollout to abort and settle")
        assert final["state"] == "aborted" and final["reason"].startswith("failure threshold:"), final["reason"]
        assert final["finished"] >= 3, "not before the minimum number of executions"
        assert final["counts"].get("skipped", 0) > 0, "the stages after the abort were never assigned"
        assert final["counts"].get("succeeded", 0) < 50

        updated = [d for (d,) in db_rows(db, "SELECT device FROM executions WHERE rollout = ? AND state NOT IN"
                                              " ('pending', 'skipped')", rid)]
        assert updated and set(final["reverts"]) == {"done"} and final["reverts"]["done"] == len(updated)
        for device in ids:  # every device runs the previous model again, or never left it
            wait_until(lambda device=device: sim.running(device) == models["a"]["sha256"], 30, f"{device} back on -a")
        for device in updated:
            view = client.call("devices.show", {"id": device})
            assert view["desired"]["models"][SLOT]["artifact"]["sha256"] == models["a"]["sha256"]
            assert view["desired"]["models"][SLOT]["job"] == f"{rid}-rb"

        # the store says why: the rollout's reason, each failed execution's, each device's own words
        (reason,) = db_rows(db, "SELECT reason FROM rollouts WHERE id = ?", rid)[0]
        assert "failure threshold" in reason
        failed = dict(db_rows(db, "SELECT device, reason FROM executions WHERE rollout = ? AND state = 'failed'", rid))
        assert failed and set(failed) <= set(bad)
        assert any(r.startswith("failed: sha256") for r in failed.values()) or \
            any(r.startswith("rolled_back: unhealthy") for r in failed.values())
        device_reasons = db_rows(db, "SELECT reason FROM jobs WHERE job = ? AND state IN ('failed', 'rolled_back')", rid)
        assert len(device_reasons) >= len(failed)
    finally:
        sim.stop()


def test_a_manager_restarted_mid_rollout_carries_on_and_rollback_sends_devices_back(tmp_path, broker, keys, models,
                                                                                    client, fleet):
    db = tmp_path / "fleet.db"
    sim = simulate(broker, keys, 12)
    try:
        registered(db, 12)
        status = client.call("rollouts.start", rollout_args(target={"tags": {"site": "plant-a"}}, canary=1,
                                                            waves=[50, 100], health_window_s=2.0))
        rid = status["id"]
        assert status["devices"] == 6
        wait_until(lambda: client.call("rollouts.status", {"id": rid})["stage"] == 1, 60, "the first wave")
        assert fleet.stop() == 0  # mid-rollout: the wave is assigned, not yet healthy
        assert db_rows(db, "SELECT state FROM rollouts WHERE id = ?", rid) == [("running",)]
        again = start_fleet(tmp_path, broker, keys)
        try:
            done = wait_until(lambda: (s := client.call("rollouts.status", {"id": rid}))["state"] == "completed" and s,
                              60, "the rollout to finish after the restart")
            assert done["counts"] == {"succeeded": 6}
            plant_a = [d for d in sim.devices if sim.devices[d].site == "plant-a"]
            assert all(sim.running(d) == models["b"]["sha256"] for d in plant_a)
            for d in plant_a:  # each device ran the job exactly once, restart or not
                states = [s for (s,) in db_rows(db, "SELECT state FROM jobs WHERE device = ? AND job = ? ORDER BY rowid", d, rid)]
                assert states.count("active") == 1 and states.count("committed") == 1, (d, states)
            assert all(sim.running(d) == models["a"]["sha256"] for d in sim.devices if d not in plant_a)

            # roll one device back, then the rest, through the CLI
            one = fleet_cli("rollout", "rollback", rid, "--device", plant_a[0], "--json",
                            "--broker", f"{broker.host}:{broker.port}")
            assert one.returncode == 0, one.stderr
            wait_until(lambda: sim.running(plant_a[0]) == models["a"]["sha256"], 30, "the one device back on -a")
            assert sim.running(plant_a[1]) == models["b"]["sha256"]
            whole = fleet_cli("rollout", "rollback", rid, "--json", "--broker", f"{broker.host}:{broker.port}")
            assert whole.returncode == 0 and json.loads(whole.stdout)["state"] == "rolled_back"
            settled = wait_until(lambda: (s := client.call("rollouts.status", {"id": rid}))["settled"] and s, 60,
                                 "every device back")
            assert settled["reverts"] == {"done": 6}
            assert all(sim.running(d) == models["a"]["sha256"] for d in sim.devices)
            twice = fleet_cli("rollout", "rollback", rid, "--broker", f"{broker.host}:{broker.port}")
            assert twice.returncode == 2 and "already sent back" in twice.stderr
        finally:
            again.stop()
    finally:
        sim.stop()


def test_a_policy_rolls_out_on_its_own_beside_a_model_rollout(tmp_path, broker, keys, client, models):
    db = tmp_path / "fleet.db"
    doc = tmp_path / "line3.yaml"
    doc.write_text("version: 7\ndefault: {accept_at: 0.2, reject_at: 0.6}\n")
    policy = push_file(client, doc, kind="policy", name="line3", version="7", manifest=None)
    sim = simulate(broker, keys, 4)
    try:
        registered(db, 4)
        model = client.call("rollouts.start", rollout_args(target={"tags": {"site": "plant-b"}}, health_window_s=30))
        pol = client.call("rollouts.start", {"kind": "policy", "name": "line3", "version": "7",
                                             "target": {"ids": sorted(sim.devices)}, "canary": 1, "waves": [100],
                                             "health_window_s": 0.5})
        assert pol["slot"] == contract.POLICY_SLOT
        done = wait_until(lambda: (s := client.call("rollouts.status", {"id": pol["id"]}))["state"] != "running"
                          and s, 60, "the policy rollout to end")
        # a device in the middle of one slot's job keeps it when the other slot is assigned
        assert done["state"] == "completed", (done["reason"], done["failures"])
        assert done["counts"] == {"succeeded": 4}
        assert all(sim.running(d, contract.POLICY_SLOT) == policy["sha256"] for d in sim.devices)
        assert client.call("rollouts.status", {"id": model["id"]})["state"] == "running", "independent of the model's"
        view = client.call("devices.show", {"id": "sim-0001"})
        assert view["desired"]["policy"]["artifact"]["version"] == "7"
        assert view["desired"]["models"][SLOT]["artifact"]["version"] == "8.1.42-b", "the model slot kept"
        where = ("--broker", f"{broker.host}:{broker.port}")
        shown = fleet_cli("devices", "show", "sim-0001", *where)
        assert shown.returncode == 0 and "policy=7" in shown.stdout and f"rollout {pol['id']}: succeeded" in shown.stdout
        table = fleet_cli("rollout", "status", *where).stdout.splitlines()
        assert table[0].split()[:3] == ["ID", "STATE", "ARTIFACT"]
        assert {line.split()[0]: line.split()[1] for line in table[1:]} == {model["id"]: "running", pol["id"]: "completed"}
        one = fleet_cli("rollout", "status", pol["id"], *where).stdout
        assert "COMPLETED" in one and "4 devices" in one
    finally:
        sim.stop()


def test_devices_already_running_the_version_succeed_without_a_download(tmp_path, broker, keys, client, models):
    sim = simulate(broker, keys, 3)
    try:
        registered(tmp_path / "fleet.db", 3)
        before = client.call("stats")["chunks"]
        rid = client.call("rollouts.start", rollout_args(version="8.1.42-a", target={"ids": sorted(sim.devices)},
                                                         canary=1, waves=[100], health_window_s=0.5))["id"]
        done = wait_until(lambda: (s := client.call("rollouts.status", {"id": rid}))["state"] == "completed" and s,
                          30, "the rollout of what they already run")
        assert done["counts"] == {"succeeded": 3}
        assert client.call("stats")["chunks"] == before, "nothing was downloaded"
    finally:
        sim.stop()


def test_transfers_past_the_limit_wait_and_past_the_queue_are_told_busy(tmp_path):
    from fleet.transfers import Transfers

    sha = "ab" * 32
    (tmp_path / sha).write_bytes(b"x" * 300_000)
    topics = contract.Topics()
    transfers = Transfers(tmp_path, topics, max_transfers=1, max_waiting=1)

    def ask(device: str, offset: int) -> contract.ChunkHeader | None:
        return transfers.request(contract.ArtifactRequest(
            v=1, device=device, sha256=sha, offset=offset, length=1000, request="q1",
            response_topic=topics.artifact(device, sha)), 0.0)

    assert ask("cam-1", 0) is None and transfers.active == 1
    assert ask("cam-2", 131072) is None, "waits for a place"
    assert ask("cam-2", 131072) is None, "asking again keeps its place"
    busy = ask("cam-3", 262144)
    assert busy is not None and busy.error == "busy"
    header, data = contract.decode_chunk(contract.encode_chunk(busy))  # a device can read it
    assert (header.error, header.total, data) == ("busy", 300_000, b"")
    assert transfers.active == 1 and transfers.counters.busy == 1


def test_a_paused_rollout_assigns_no_new_stage_until_resumed(tmp_path, broker, keys, client, models):
    sim = simulate(broker, keys, 4)
    try:
        registered(tmp_path / "fleet.db", 4)
        rid = client.call("rollouts.start", rollout_args(target={"ids": sorted(sim.devices)}, canary=1, waves=[100],
                                                         health_window_s=0.5))["id"]
        assert client.call("rollouts.pause", {"id": rid})["state"] == "paused"
        with pytest.raises(OpError) as twice:
            client.call("rollouts.pause", {"id": rid})
        assert twice.value.code == "bad_state"
        wait_until(lambda: client.call("rollouts.status", {"id": rid})["counts"].get("succeeded") == 1, 30,
                   "the canary to succeed while paused")
        fleet_ticks = 5 * 0.2  # the manager judges stages every 0.2 s: give it several chances to misbehave
        time.sleep(fleet_ticks)  # a non-event has no condition to wait on
        paused = client.call("rollouts.status", {"id": rid})
        assert (paused["state"], paused["stage"], paused["counts"]) == ("paused", 0, {"succeeded": 1, "pending": 3})
        resumed = fleet_cli("rollout", "resume", rid, "--json", "--broker", f"{broker.host}:{broker.port}")
        assert resumed.returncode == 0 and json.loads(resumed.stdout)["state"] == "running"
        done = wait_until(lambda: (s := client.call("rollouts.status", {"id": rid}))["state"] == "completed" and s,
                          30, "the rollout to finish once resumed")
        assert done["counts"] == {"succeeded": 4}
    finally:
        sim.stop()


def test_with_a_job_timeout_a_device_that_stays_away_fails_instead_of_holding_its_stage(tmp_path, broker, keys,
                                                                                        client, models):
    db = tmp_path / "fleet.db"
    sim = simulate(broker, keys, 3)
    try:
        registered(db, 3)
        away = "sim-0002"
        sim.set_online(away, False)
        wait_until(lambda: db_rows(db, "SELECT state FROM devices WHERE id = ?", away) == [("offline",)], 10, "away")
        out = fleet_cli("rollout", "start", "yolov8n@8.1.42-b", "--slot", SLOT, "--target", ",".join(sorted(sim.devices)),
                        "--canary", "0", "--waves", "100%", "--health-window", "0.5s", "--job-timeout", "3s",
                        "--abort-failure-pct", "50", "--min-executed", "3", "--json",
                        "--broker", f"{broker.host}:{broker.port}")
        assert out.returncode == 0, out.stderr
        rid = json.loads(out.stdout)["id"]
        done = wait_until(lambda: (s := client.call("rollouts.status", {"id": rid}))["state"] == "completed" and s,
                          30, "the rollout to finish without the absent device")
        assert done["counts"] == {"succeeded": 2, "failed": 1}
        assert done["failures"] == [{"device": away, "reason": "timed_out: not active within 3s of its assignment"}]
    finally:
        sim.stop()


# --- signing-key rotation ---------------------------------------------------------------------------------


def test_the_signing_key_rotates_without_a_day_a_device_cannot_verify(tmp_path, broker, keys, models, client, fleet):
    db = tmp_path / "fleet.db"
    old_pub = keys / "fleet.pub"

    def devices(*pinned: Path) -> Simulator:
        sim = Simulator(SimSettings(host=broker.host, port=broker.port, count=3, id_prefix="rot", slot=SLOT,
                                    public_key=[load_public_key(p) for p in pinned],
                                    runs=load_running("yolov8n@8.1.42-a", shared_path(A)), health_window_s=0.5))
        sim.start()
        return sim

    sim = devices(old_pub)
    try:
        registered(db, 3)
        made = fleet_cli("keys", "rotate", "--dir", str(keys), "--json")
        assert made.returncode == 0, made.stderr
        new = json.loads(made.stdout)
        refused = fleet_cli("keys", "switch", "--dir", str(keys), "--db", str(db))
        assert refused.returncode == 2 and "rot-0000 (pins" in refused.stderr, "no device pins the new key yet"
    finally:
        sim.stop()
    sim = devices(old_pub, Path(new["public"]))  # step 1: the new key pinned beside the old one
    try:
        def pinning() -> bool:
            docs = [json.loads(d) for (d,) in db_rows(db, "SELECT doc FROM reported WHERE device LIKE 'rot-%'")]
            return len(docs) == 3 and all(new["id"] in d["keys"] for d in docs)
        wait_until(pinning, 15, "every device to report the new key")
        switched = fleet_cli("keys", "switch", "--dir", str(keys), "--db", str(db))  # step 2
        assert switched.returncode == 0, switched.stderr
        old_key = load_private_key(keys / "fleet.key")
    finally:
        sim.stop()
    assert fleet.stop() == 0
    again = start_fleet(tmp_path, broker, keys)  # signs with the new key, and its artifacts again
    try:
        (shown,) = client.call("artifacts.show", {"name": "yolov8n", "version": "8.1.42-b"})
        verify(load_public_key(Path(new["public"])), contract.Artifact.model_validate(
            {k: shown[k] for k in contract.Artifact.model_fields}))
        retired = fleet_cli("keys", "retire", "fleet", "--dir", str(keys))  # step 3
        assert retired.returncode == 0 and not (keys / "fleet.key").exists(), retired.stderr
        sim = devices(Path(new["public"]))  # the old key dropped from the devices
        try:
            rid = client.call("rollouts.start", rollout_args(target={"ids": sorted(sim.devices)}, canary=0,
                                                             waves=[100], health_window_s=0.5))["id"]
            done = wait_until(lambda: (s := client.call("rollouts.status", {"id": rid}))["settled"] and s, 60,
                              "the rollout signed with the new key")
            assert done["state"] == "completed" and all(not d.rejected for d in sim.devices.values())
        finally:
            sim.stop()
        # an artifact only the retired key signed is not vouched for: it never reaches a device
        stale = sign(old_key, contract.Artifact(kind="model", name="yolov8n", version="old-key", sha256=models["a"]["sha256"],
                                                size=models["a"]["size"], manifest={}))
        store = Store.open(db)
        try:
            store.put_artifact(stale, by="test", now=time.time())
        finally:
            store.close()
        with pytest.raises(OpError) as err:
            client.call("rollouts.start", rollout_args(version="old-key", target={"ids": ["rot-0000"]}))
        assert err.value.code == "invalid_artifact" and "signature" in str(err.value)
    finally:
        again.stop()


# --- several managers on one PostgreSQL store ----------------------------------------------------------


def test_the_lease_holder_killed_mid_rollout_twice_and_another_manager_finishes_it(tmp_path, broker, keys, postgres):
    url = postgres.new_database()
    failover = 3.0

    def manager(i: int) -> FleetProcess:
        return FleetProcess(url, broker, "--keys", str(keys), "--operator", "operator", "--client-id", f"fleet-{i}",
                            "--artifacts", str(tmp_path / f"artifacts-{i}"), "--failover", str(failover))

    managers = [manager(i) for i in range(3)]
    sim = None
    try:
        def leader() -> FleetProcess | None:
            live = [m for m in managers if m.proc.poll() is None and m.last_stats().get("leader")]
            assert len(live) <= 1, "never two leaders"
            return live[0] if live else None

        wait_until(leader, 30, "a leader")
        with FleetClient(broker.host, broker.port, identity="operator", timeout=60) as client:
            b = push_model(client, B)
            push_model(client, A)
            sim = simulate(broker, keys, 8)
            registered(url, 8)
            rid = client.call("rollouts.start", rollout_args(target={"ids": sorted(sim.devices)}, canary=1,
                                                             waves=[25, 50, 100], health_window_s=1.0))["id"]
            took = []
            for stage in (1, 2):  # kill -9 the lease holder mid-rollout, twice in a row
                wait_until(lambda: client.call("rollouts.status", {"id": rid})["stage"] >= stage, 60, f"stage {stage}")
                dead = leader()
                dead.proc.kill()
                dead.proc.wait()
                killed = time.monotonic()
                successor = wait_until(lambda: (m := leader()) is not None and m is not dead and m, 10 * failover,
                                       "another manager to take the lease")
                took.append(time.monotonic() - killed)
                assert successor.wait_for("lease acquired")["rollouts_active"] == 1
            status = client.call("rollouts.status", {"id": rid})  # answered by the third leader
            done = wait_until(lambda: (s := client.call("rollouts.status", {"id": rid}))["state"] == "completed"
                              and s, 90, "the rollout to complete under the third leader")
        assert status["stage"] >= 2 and done["counts"] == {"succeeded": 8}
        assert all(sim.running(d) == b["sha256"] for d in sim.devices)
        for device in sim.devices:  # assigned once, the job run once, whichever manager led
            states = [s for (s,) in db_rows(url, "SELECT state FROM jobs WHERE device = ? AND job = ? ORDER BY rowid",
                                            device, rid)]
            assert states.count("active") == 1 and states.count("committed") == 1, (device, states)
        stages = db_rows(url, "SELECT stage, count(*) FROM executions WHERE rollout = ? AND state = 'succeeded'"
                              " GROUP BY stage ORDER BY stage", rid)
        assert stages == [(0, 1), (1, 1), (2, 2), (3, 4)], "no stage skipped"
        assert db_rows(url, "SELECT count(*) FROM jobs WHERE pending") == [(0,)], "every status judged"
        (epoch,) = db_rows(url, "SELECT epoch FROM leases")[0]
        assert epoch >= 3, "two takeovers at least (a leader starved of CPU for its renewal steps down too)"
        print(f"takeover after kill -9: {', '.join(f'{t:.1f}s' for t in took)} (--failover {failover:g})")
        assert all(t < 3 * failover for t in took)
    finally:
        if sim:
            sim.stop()
        for m in managers:
            m.stop()


def test_the_managers_clock_stepped_an_hour_forward_and_back_health_windows_keep_their_length(tmp_path, broker, keys):
    """Wall time for what is stored, the monotonic clock for every interval: a step of the
    manager's clock neither passes a health window at once nor stalls the rollout."""
    clock = tmp_path / "clock-offset"
    fleet = start_fleet(tmp_path, broker, keys, env=stepped_clock(clock))
    db = tmp_path / "fleet.db"
    sim = simulate(broker, keys, 3)
    try:
        with FleetClient(broker.host, broker.port, identity="operator", timeout=20) as client:
            push_model(client, B)
            registered(db, 3)
            status = client.call("rollouts.start", rollout_args(
                target={"ids": sorted(sim.devices)}, canary=1, waves=[100], health_window_s=4.0, min_executed=1))
            rid = status["id"]
            wait_until(lambda: db_rows(db, "SELECT state FROM executions WHERE rollout = ? AND stage = 0", rid)
                       == [("active",)], 30, "the canary active")
            # an hour forward: the window must not pass at the next ticks (0.2 s apart); 4 s is long
            # enough that the time before the poll above saw the canary active, and this wait,
            # leave it well short of passing on its own
            clock.write_text("3600")
            time.sleep(0.6)
            assert db_rows(db, "SELECT state FROM executions WHERE rollout = ? AND stage = 0", rid) == [("active",)]
            clock.write_text("-3600")  # two hours back: ticks and desired states must go on
            done = wait_until(lambda: (s := client.call("rollouts.status", {"id": rid}))["state"] != "running" and s,
                              30, "the rollout to finish after the clock went back")
            assert done["state"] == "completed" and done["counts"] == {"succeeded": 3}, done
    finally:
        sim.stop()
        fleet.stop()


def test_a_device_whose_link_flaps_faster_than_the_health_window_fails_and_the_stage_ends(tmp_path, broker, keys,
                                                                                           client):
    db = tmp_path / "fleet.db"
    push_model(client, B)
    sim = simulate(broker, keys, 3)
    flapper = "sim-0002"
    stop = threading.Event()

    def flap() -> None:  # back online every second: each return restarts a 3 s health window
        while not stop.is_set():
            sim.set_online(flapper, False)
            stop.wait(0.4)
            sim.set_online(flapper, True)
            stop.wait(0.6)

    try:
        registered(db, 3)
        status = client.call("rollouts.start", rollout_args(
            target={"ids": sorted(sim.devices)}, canary=0, waves=[100], health_window_s=3.0, min_executed=3,
            abort_failure_pct=50))
        rid = status["id"]
        wait_until(lambda: db_rows(db, "SELECT state FROM executions WHERE rollout = ? AND device = ?", rid, flapper)
                   == [("active",)], 30, "the flapping device active")
        flapping = threading.Thread(target=flap, daemon=True)
        flapping.start()
        done = wait_until(lambda: (s := client.call("rollouts.status", {"id": rid}))["state"] != "running" and s,
                          40, "the stage to end despite the flapping device")
        assert done["state"] == "completed" and done["counts"] == {"succeeded": 2, "failed": 1}, done
        assert done["failures"][0]["device"] == flapper
        assert done["failures"][0]["reason"].startswith("flapping: back online 5 times"), done["failures"]
    finally:
        stop.set()
        sim.stop()
