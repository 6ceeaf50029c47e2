"""Fleet ingest and the `fleet` CLI against a real Mosquitto: bad input, dedupe, registry, reads."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from broker import REPO, Broker, FleetProcess, wait_until
from conftest import both_engines, db_rows
from paho.mqtt.enums import CallbackAPIVersion

from edge.config import Backoff, DeviceInfo, MqttConfig, OutboxConfig
from edge.core import contract
from edge.core.ids import new_id
from edge.sync import events as E
from edge.sync.client import Sync
from edge.sync.outbox import Outbox
from fleet.cli import main as fleet_main
from fleet.ingest import Ingest
from fleet.store import Store

TOPICS = contract.Topics()


class Listener:
    """A raw MQTT client that publishes what a test says and records the acks it sees."""

    def __init__(self, broker: Broker) -> None:
        self.acks: list[tuple[str, dict]] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = lambda c, u, m: self.acks.append((m.topic, json.loads(m.payload)))
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.client.subscribe(f"{TOPICS.prefix}/dev/+/ack", qos=1)[0]
        time.sleep(0.2)

    def publish(self, topic: str, body: bytes, retain: bool = False) -> None:
        self.client.publish(topic, body, qos=1, retain=retain).wait_for_publish(5)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def fleet(fleet_db, broker):
    store = Store.open(fleet_db)
    ingest = Ingest(store, host=broker.host, port=broker.port)
    ingest.start()
    wait_until(lambda: ingest.subscribed, 10, "the ingest's subscriptions")
    yield ingest
    ingest.stop()
    store.close()


@pytest.fixture
def listener(broker):
    client = Listener(broker)
    yield client
    client.close()


def wire(device: str, events: list[E.Event], seq0: int = 1) -> str:
    return ",".join(contract.event_json(id=e.id, seq=seq0 + i, kind=e.kind.value, device=device, camera=e.camera,
                                captured_at=e.captured_at, recorded_at=e.recorded_at, priority=e.priority,
                                payload_json=e.payload_json) for i, e in enumerate(events))


def batch(device: str, n: int = 3, batch_id: str | None = None) -> tuple[str, bytes]:
    batch_id = batch_id or new_id()
    events = [E.health_snapshot("c0", {"i": i}) for i in range(n)]
    return batch_id, contract.batch_body(device, batch_id, time.time(), wire(device, events))


@both_engines
def test_bad_batches_are_rejected_counted_and_never_stored_or_acked(fleet, listener):
    good_id, good = batch("cam-1")
    _, foreign = batch("cam-2")
    big_payload = json.dumps({"blob": ["x" * 900] * 10})
    huge_event = wire("cam-1", [E.health_snapshot("c0", {})]).replace('"payload":{}', f'"payload":{big_payload}')
    many = contract.batch_body("cam-1", new_id(), time.time(),
                               wire("cam-1", [E.health_snapshot("c0", {}) for _ in range(contract.MAX_BATCH_EVENTS + 1)]))
    bad = {
        "malformed_json": [b'{"v": 1, "device": "cam-1", "batch":', b"\xff\xfe\x00", b""],
        "bad_version": [good.replace(b'"v":1', b'"v":2'), good.replace(b'"v":1,', b"")],
        "wrong_device": [foreign,  # another device's batch on cam-1's topic
                         good.replace(b'"device":"cam-1","camera"', b'"device":"cam-2","camera"', 1)],
        "oversized": [b"{" + b" " * contract.MAX_BATCH_BYTES + b"}", many,
                      contract.batch_body("cam-1", new_id(), time.time(), huge_event)],
        "schema": [good.replace(b'"kind":"health"', b'"kind":"selfie"', 1), b"[]",
                   good.replace(good_id.encode(), b"batch-1"), good.replace(b'"seq":1', b'"seq":"1"'),
                   contract.batch_body("cam-1", new_id(), time.time(), "")],
    }
    for bodies in bad.values():
        for body in bodies:
            listener.publish(TOPICS.outbox("cam-1"), body)
    listener.publish(TOPICS.outbox("cam-1"), good)
    wait_until(lambda: fleet.stats()["batches"] == 1, 10, "the good batch after the bad ones")
    stats = fleet.stats()
    assert stats["rejected"] == {reason: len(bodies) for reason, bodies in bad.items()}
    assert stats["connected"] and stats["stored"] == 3
    assert fleet.store.count_events() == 3
    wait_until(lambda: any(a.get("batches") for _, a in listener.acks), 5, "the ack")
    time.sleep(0.3)
    acks = [a for topic, a in listener.acks if topic == TOPICS.ack("cam-1")]
    assert len(acks) == len(listener.acks)
    assert [a["batches"] for a in acks if a.get("batches")] == [[good_id]]
    # a refused batch whose id can be read is named, so the device parks it instead of sending it for ever
    refused = [(r["batch"], r["reason"]) for a in acks for r in a.get("refused", [])]
    assert (good_id, "bad_version") in refused and ("wrong_device" in {reason for _, reason in refused})
    assert all(a["batches"] == [] for a in acks if a.get("refused"))
    assert stats["refusals"] == len(refused)


@both_engines
def test_a_batch_sent_again_changes_nothing_but_is_acked_again(fleet, listener):
    batch_id, body = batch("cam-1", n=5)
    listener.publish(TOPICS.outbox("cam-1"), body)
    wait_until(lambda: fleet.stats()["acks"] == 1, 10, "the first ack")
    before = fleet.store.events(limit=10)
    listener.publish(TOPICS.outbox("cam-1"), body)
    wait_until(lambda: fleet.stats()["acks"] == 2, 10, "the second ack")
    assert fleet.store.events(limit=10) == before, "the copy changed nothing, not even received_at"
    assert (fleet.stats()["stored"], fleet.stats()["duplicates"]) == (5, 5)
    assert fleet.store.devices()[0]["events"] == 5
    wait_until(lambda: len(listener.acks) == 2, 5, "the second ack at the device")  # counted when sent
    assert [a[1]["batches"] for a in listener.acks] == [[batch_id], [batch_id]]


@both_engines
def test_the_registry_follows_retained_statuses(broker, listener, fleet_db):
    status = contract.Status(v=1, device="cam-9", state="online", at=time.time(), runtime="0.1.0",
                             site="s", line="l", models={"detector": "v2"})
    listener.publish(TOPICS.status("cam-9"), contract.encode(status), retain=True)
    listener.publish(TOPICS.status("cam-8"), contract.encode(status), retain=True)  # names cam-9: refused
    store = Store.open(fleet_db)
    ingest = Ingest(store, host=broker.host, port=broker.port)
    ingest.start()  # started after the statuses: it gets them because they are retained
    try:
        wait_until(lambda: ingest.stats()["statuses"] == 1 and ingest.stats()["rejected"], 10, "the retained statuses")
        (device,) = store.devices()
        assert (device["id"], device["state"], device["models"]) == ("cam-9", "online", {"detector": "v2"})
        assert ingest.stats()["rejected"] == {"wrong_device": 1}
        offline = status.model_copy(update={"state": "offline", "at": time.time()})
        listener.publish(TOPICS.status("cam-9"), contract.encode(offline), retain=True)
        wait_until(lambda: store.devices()[0]["state"] == "offline", 10, "offline")
    finally:
        listener.publish(TOPICS.status("cam-9"), b"", retain=True)
        listener.publish(TOPICS.status("cam-8"), b"", retain=True)
        ingest.stop()
        store.close()


def test_two_managers_split_the_batches_through_the_shared_subscription(broker, listener, tmp_path):
    stores = [Store.open(tmp_path / f"fleet{i}.db") for i in range(2)]
    ingests = [Ingest(s, host=broker.host, port=broker.port) for s in stores]
    for ingest in ingests:
        ingest.start()
    try:
        wait_until(lambda: all(i.subscribed for i in ingests), 10, "both subscriptions")
        sent = [batch("cam-1")[1] for _ in range(20)]
        for body in sent:
            listener.publish(TOPICS.outbox("cam-1"), body)
        wait_until(lambda: sum(i.stats()["batches"] for i in ingests) == 20, 10, "every batch, once")
        counts = [s.count_events() for s in stores]
        assert sum(counts) == 60 and all(counts), f"each manager took a share: {counts}"
    finally:
        for ingest, store in zip(ingests, stores):
            ingest.stop()
            store.close()


def test_two_managers_on_one_postgresql_store_each_event_once(broker, listener, postgres):
    url = postgres.new_database()
    stores = [Store.open(url) for _ in range(2)]
    ingests = [Ingest(s, host=broker.host, port=broker.port) for s in stores]
    for ingest in ingests:
        ingest.start()
    try:
        wait_until(lambda: all(i.subscribed for i in ingests), 10, "both subscriptions")
        sent = [batch("cam-1", n=5) for _ in range(30)]
        for _, body in sent + sent:  # every batch twice: a device that re-sends what was not acked in time
            listener.publish(TOPICS.outbox("cam-1"), body)
        wait_until(lambda: sum(i.stats()["batches"] for i in ingests) == 60, 15, "every copy, acked")
        stats = [i.stats() for i in ingests]
        assert all(s["batches"] for s in stats), f"each manager took a share: {[s['batches'] for s in stats]}"
        assert sum(s["stored"] for s in stats) == 150 and sum(s["duplicates"] for s in stats) == 150
        assert db_rows(url, "SELECT count(*), count(DISTINCT id) FROM events") == [(150, 150)]
        assert db_rows(url, "SELECT events FROM devices WHERE id = ?", "cam-1") == [(150,)]
    finally:
        for ingest, store in zip(ingests, stores):
            ingest.stop()
            store.close()


# --- the CLI, as real processes -----------------------------------------------------------------


def fleet_cli(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fleet", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


@both_engines
def test_fleet_serve_stores_what_a_device_syncs_and_the_cli_reads_it(tmp_path, broker, fleet_db):
    db = fleet_db
    serve = FleetProcess(db, broker, "--artifacts", str(tmp_path / "artifacts"))
    outbox = Outbox.open(OutboxConfig(path=tmp_path / "outbox.db", ack_timeout_s=2), "cam-1")
    sync = Sync(MqttConfig(host=broker.host, port=broker.port, reconnect=Backoff(initial_s=0.1, max_s=1)),
                DeviceInfo(id="cam-1", site="plant-a", line="3"), outbox, models={"detector": "8.1.42-b"})
    follower = None
    try:
        serve.wait_for("ingest subscribed")
        for i in range(30):
            outbox.append(E.detection_summary("c0", time.time(), "yolov8n",
                                              [{"label": "person", "score": 0.9, "box": [0, 0, 5, 5]}], frame=i))
        outbox.append(E.alert_audit("c1", time.time(), "intrusion", TOPICS.alert("plant-a", "3", "c1"), True))
        sync.start()
        wait_until(lambda: outbox.flush() and outbox.stats()["rows"] == 0, 20, "the device's events stored")

        tail = fleet_cli("events", "tail", "--db", str(db), "--json", "--limit", "5")
        assert tail.returncode == 0, tail.stderr
        docs = [json.loads(line) for line in tail.stdout.splitlines()]
        assert len(docs) == 5 and [d["id"] for d in docs] == sorted(d["id"] for d in docs)
        assert docs[-1]["kind"] == "alert" and docs[-1]["device"] == "cam-1"

        only = fleet_cli("events", "tail", "--db", str(db), "--kind", "detection_summary", "--device", "cam-1",
                         "--json", "--limit", "100")
        frames = [json.loads(line)["payload"]["frame"] for line in only.stdout.splitlines()]
        assert frames == list(range(30))
        assert fleet_cli("events", "tail", "--db", str(db), "--device", "nobody").stdout == ""

        human = fleet_cli("events", "tail", "--db", str(db), "--limit", "1")
        assert "cam-1" in human.stdout and "alert" in human.stdout and "intrusion" in human.stdout

        devices = fleet_cli("devices", "list", "--db", str(db), "--json")
        (device,) = json.loads(devices.stdout)
        assert (device["id"], device["state"], device["events"], device["models"]) == (
            "cam-1", "online", 31, {"detector": "8.1.42-b"})
        table = fleet_cli("devices", "list", "--db", str(db)).stdout.splitlines()
        assert table[0].split()[:3] == ["DEVICE", "STATE", "SITE"] and table[1].split()[:3] == ["cam-1", "online", "plant-a"]

        follower = subprocess.Popen([sys.executable, "-m", "fleet", "events", "tail", "--db", str(db), "--follow",
                                     "--json", "--limit", "1"], stdout=subprocess.PIPE, text=True, cwd=REPO)
        lines: list[str] = []
        threading.Thread(target=lambda: lines.extend(follower.stdout), daemon=True).start()
        wait_until(lambda: len(lines) == 1, 10, "the follower's first line")
        late = E.model_event("activated", "detector", "8.1.43")
        outbox.append(late)
        wait_until(lambda: len(lines) == 2, 15, "the followed event")
        assert json.loads(lines[1])["id"] == late.id
        follower.send_signal(signal.SIGTERM)
        assert follower.wait(5) == 0
        follower = None
    finally:
        if follower:
            follower.kill()
        sync.stop()
        outbox.close()
        started = time.monotonic()
        assert serve.stop() == 0
        assert time.monotonic() - started < 3, "fleet serve stops promptly on SIGTERM"
    assert serve.last_stats()["msg"] == "stopped" and serve.last_stats()["stored"] == 32


def test_cli_errors_are_one_line_with_an_exit_code(tmp_path, capsys):
    assert fleet_main(["events", "tail", "--db", str(tmp_path / "none.db")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fleet: error: ") and "no fleet store" in err and err.count("\n") == 1
    (tmp_path / "junk.db").write_text("not sqlite")
    assert fleet_main(["devices", "list", "--db", str(tmp_path / "junk.db")]) == 1
    assert "not a fleet store" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        fleet_main(["serve", "--db", "x.db", "--broker", "nohost"])
    assert usage.value.code == 2
    assert fleet_main(["serve", "--db", str(tmp_path / "f.db"), "--prefix", "a/#"]) == 2
    assert "bad topic prefix" in capsys.readouterr().err
    assert fleet_main([]) == 2
    with pytest.raises(SystemExit) as version:
        fleet_main(["--version"])
    assert version.value.code == 0 and "edgecam" in capsys.readouterr().out


def test_an_empty_store_lists_nothing_politely(tmp_path):
    Store.open(tmp_path / "fleet.db").close()
    assert fleet_cli("devices", "list", "--db", str(tmp_path / "fleet.db")).stdout == "no devices yet\n"
    assert fleet_cli("events", "tail", "--db", str(tmp_path / "fleet.db")).stdout == ""


def test_postgresql_restarted_mid_ingest_loses_nothing_stores_nothing_twice(tmp_path, broker, postgres):
    url = postgres.new_database()
    managers = [FleetProcess(url, broker, "--client-id", f"fleet-{i}", "--artifacts", str(tmp_path / "a"))
                for i in range(2)]
    outbox = Outbox.open(OutboxConfig(path=tmp_path / "outbox.db", ack_timeout_s=1, batch_events=20), "cam-1")
    sync = Sync(MqttConfig(host=broker.host, port=broker.port, reconnect=Backoff(initial_s=0.1, max_s=1)),
                DeviceInfo(id="cam-1", site="plant-a", line="3"), outbox, models={})
    try:
        for m in managers:
            m.wait_for("ingest subscribed")
        sync.start()
        ids = []
        for i in range(600):
            event = E.health_snapshot("c0", {"i": i})
            outbox.append(event)
            ids.append(event.id)
            if i == 200:
                postgres.stop()  # mid-ingest: what reaches the managers now cannot be stored
            if i == 400:
                postgres.start()
            time.sleep(0.005)
        wait_until(lambda: outbox.flush() and outbox.stats()["rows"] == 0, 60, "every event acked")
        stored = [i for (i,) in db_rows(url, "SELECT id FROM events")]
        assert len(stored) == len(set(stored)) == 600 and set(stored) == set(ids)
        assert all(m.proc.poll() is None for m in managers), "no manager exited"
        stats = [m.last_stats() for m in managers]
        assert sum(s.get("store_errors", 0) for s in stats) > 0, "the restart was felt, and survived"
    finally:
        sync.stop()
        outbox.close()
        for m in managers:
            m.stop()
        if postgres.proc is None:
            postgres.start()
