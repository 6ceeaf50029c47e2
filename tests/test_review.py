"""Review of unsure and alert frames: list, fetch, label, export, and what the wire carries.

One broker for the module, with a recorder subscribed to every topic from before anything
else connects; one `fleet serve`; two `edge run` daemons on YOLOv8n and the real clip,
``cam-on`` with ``privacy.snapshot_export`` and ``cam-off`` without; operators drive it with
the `fleet` command. The last test reads everything the broker carried and checks that
image bytes went out once per fetch an operator asked for, on that operator's reply topic,
and nowhere else.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import urllib.request
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import yaml
from broker import Broker, FleetProcess, free_port, wait_until
from conftest import EdgeRun, both_engines, manifest_for, shared_path
from controller import Controller
from paho.mqtt.enums import CallbackAPIVersion

from edge.config import PrivacyConfig
from edge.core import contract as C
from edge.core.ids import new_id
from edge.core.signing import init_keys
from edge.decide.snapshots import SnapshotLimits, SnapshotStore
from edge.sync.review import Exporter, RateLimit, Refusal
from fleet.cli import main as fleet_main
from fleet.client import FleetClient
from fleet.errors import OpError
from fleet.review_cli import coco_box, jpeg_size
from fleet.store import Store
from fleet.upload import push_file

T = C.Topics()
YOLO = "models/yolov8n_full_integer_quant-b.tflite"
VIDEO = "media/pedestrians-360p10.avi"

# Nearly every person is unsure (0.2 <= score < 0.95), and a person on the frame raises an
# alert every 2 s; both keep a snapshot.
POLICY = """
version: "{version}"
classes:
  person: {{accept_at: 0.2, reject_at: 0.95}}
rules:
  - name: person-seen
    when: {{event: every, classes: [person], outcomes: [unsure, reject]}}
    cooldown_s: 2
    snapshot: true
snapshot_unsure: true
camera_health: {{enabled: false}}
"""

IMAGE_MARKS = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"/9j/", b"iVBORw0KGgo")  # JPEG, PNG, and in base64


# --- pure parts ----------------------------------------------------------------------------------


def test_a_review_request_must_agree_with_its_topic():
    good = C.ReviewRequest(v=1, device="cam-1", operator="alice", snapshot=new_id(), request="r1",
                           reply_topic=T.review_reply("cam-1", "alice", "r1"))
    assert C.decode_review_request(C.encode(good), T, device="cam-1", operator="alice") == good
    bad = {
        "malformed_json": b"{not json",
        "oversized": b"{" + b" " * C.MAX_REVIEW_REQUEST_BYTES + b"}",
        "schema": C.encode(good)[:-1] + b',"extra":1}',
    }
    for reason, data in bad.items():
        with pytest.raises(C.ContractError) as exc:
            C.decode_review_request(data, T, device="cam-1", operator="alice")
        assert exc.value.reason == reason
    for body, operator in ((good, "bob"),  # alice's body on bob's topic
                           (good.model_copy(update={"reply_topic": T.review_reply("cam-1", "bob", "r1")}), "alice"),
                           (good.model_copy(update={"reply_topic": "edgecam/v1/fleet/reply/alice/x"}), "alice"),
                           (good.model_copy(update={"device": "cam-2"}), "alice")):
        with pytest.raises(C.ContractError) as exc:
            C.decode_review_request(C.encode(body), T, device="cam-1", operator=operator)
        assert exc.value.reason == "wrong_device"
    with pytest.raises(C.ContractError):  # a snapshot id that could name another file
        C.decode_review_request(C.encode(good)[:-1].replace(good.snapshot.encode(), b"../../etc/passwd") + b"}",
                                T, device="cam-1", operator="alice")
    assert T.review_requester("cam-1", T.review_get("cam-1", "alice")) == "alice"
    assert T.review_requester("cam-1", T.review_get("cam-2", "alice")) is None
    assert T.review_requester("cam-1", T.review_get("cam-1", "alice") + "/x") is None


def test_a_chunk_with_an_error_carries_no_data_and_data_names_its_hash():
    header = C.ReviewChunk(v=1, device="cam-1", snapshot=new_id(), request="r1", sha256="ab" * 32, total=3)
    assert C.decode_review_chunk(C.encode_chunk(header, b"abc"), device="cam-1") == (header, b"abc")
    refused = header.model_copy(update={"sha256": None, "error": "export_off", "total": 0})
    with pytest.raises(C.ContractError):
        C.decode_review_chunk(C.encode_chunk(refused, b"x"), device="cam-1")
    with pytest.raises(C.ContractError):
        C.decode_review_chunk(C.encode_chunk(header.model_copy(update={"sha256": None}), b"abc"),
                              device="cam-1")
    with pytest.raises(C.ContractError) as exc:
        C.decode_review_chunk(C.encode_chunk(header, b"abc"), device="cam-2")
    assert exc.value.reason == "wrong_device"


def test_the_rate_limit_is_a_sliding_window():
    now = [0.0]
    limit = RateLimit(2, 10.0, clock=lambda: now[0])
    assert limit.take() is None and limit.take() is None
    assert limit.take() == pytest.approx(10.0)
    now[0] = 9.0
    assert limit.take() == pytest.approx(1.0)
    now[0] = 10.0
    assert limit.take() is None


def test_a_snapshot_gone_says_whether_it_expired_or_was_evicted(tmp_path):
    store = SnapshotStore(tmp_path, SnapshotLimits(max_bytes=150, max_age_s=3600))
    old, big, kept = (new_id() for _ in range(3))
    for sid, size, age in ((old, 10, 7200), (big, 100, 60), (kept, 100, 30)):
        path = store.path(sid)
        path.write_bytes(b"\xff\xd8\xff" + b"x" * (size - 3))
        t = time.time() - age
        os.utime(path, (t, t))
    store._prune()
    assert (store.gone(old), store.gone(big), store.gone(kept)) == ("expired", "evicted", None)
    exporter = Exporter("cam-1", T, PrivacyConfig(snapshot_export=True), store, audit=None)

    def serve(sid: str, operator: str = "alice") -> tuple[bytes, str]:
        return exporter._serve(C.ReviewRequest(v=1, device="cam-1", operator=operator, snapshot=sid, request="r",
                                               reply_topic=T.review_reply("cam-1", operator, "r")))

    for sid, reason in ((old, "expired"), (big, "evicted"), (new_id(), "unknown_snapshot")):
        with pytest.raises(Refusal) as exc:
            serve(sid)
        assert exc.value.reason == reason
    data, sha = serve(kept)
    assert sha == hashlib.sha256(data).hexdigest() and len(data) == 100
    off = Exporter("cam-1", T, PrivacyConfig(), store, audit=None)
    with pytest.raises(Refusal) as exc:
        off._serve(C.ReviewRequest(v=1, device="cam-1", operator="alice", snapshot=kept, request="r",
                                   reply_topic=T.review_reply("cam-1", "alice", "r")))
    assert exc.value.reason == "export_off" and "privacy.snapshot_export is off" in exc.value.detail


def test_export_on_without_snapshots_or_mqtt_is_a_config_error_naming_the_key(tmp_path):
    from edge.config import load_config
    from edge.core.errors import ConfigError

    base = {"device": {"id": "cam-1"}, "models": {"m": {"path": str(tmp_path / "m.tflite")}},
            "cameras": [{"id": "c", "source": {"kind": "video", "path": "x.avi"}, "model": "m"}],
            "privacy": {"snapshot_export": True}}
    for extra, why in (({}, "needs `mqtt`"), ({"mqtt": {"host": "localhost"}}, "needs `decisions.snapshots`")):
        path = tmp_path / "cam.yaml"
        path.write_text(yaml.safe_dump(base | extra))
        with pytest.raises(ConfigError, match="privacy.snapshot_export") as exc:
            load_config(path)
        assert why in str(exc.value) and exc.value.exit_code == 2
    path.write_text(yaml.safe_dump({k: v for k, v in base.items() if k != "privacy"}))
    assert load_config(path).privacy.snapshot_export is False, "off by default"


@both_engines
def test_the_store_finds_snapshots_and_keeps_verdicts_on_either_engine(fleet_db):
    from fleet.review import LabelArgs, ListArgs, find, label, list_cases

    store = Store.open(fleet_db)
    try:
        snaps, events = [], []
        for i in range(6):
            sid = new_id()
            snaps.append(sid)
            if i % 2:
                kind, payload = "alert", {"rule": "r", "topic": "t", "delivered": True, "label": "person",
                                          "confidence": 0.9, "snapshot": sid, "snapshot_sha256": f"{i:02d}" * 32,
                                          "model_version": "1", "policy_version": "p"}
            else:
                kind, payload = "decision", {"model": "m", "outcome": "unsure", "label": "person", "score": 0.4,
                                             "snapshot": sid, "snapshot_sha256": f"{i:02d}" * 32,
                                             "model_version": "1", "policy_version": "p"}
            events.append(C.WireEvent(id=new_id(), seq=i, kind=kind, device="cam-1", camera="door",
                                      captured_at=time.time(), recorded_at=time.time(), priority=2, payload=payload))
        events.append(C.WireEvent(id=new_id(), seq=9, kind="alert", device="cam-1", camera="door", captured_at=0,
                                  recorded_at=0, priority=4, payload={"rule": "r", "topic": "t", "delivered": True}))
        store.add_batch(C.OutboxBatch(v=1, device="cam-1", batch=new_id(), sent_at=time.time(), events=events),
                        time.time())
        assert [c["snapshot"] for c in list_cases(store, ListArgs())] == snaps
        assert [c["snapshot"] for c in list_cases(store, ListArgs(outcome="unsure"))] == snaps[::2]
        assert [c["snapshot"] for c in list_cases(store, ListArgs(limit=2))] == snaps[-2:]
        assert find(store, snaps[3])["sha256"] == "03" * 32 and find(store, snaps[3])["outcome"] == "alert"
        with pytest.raises(OpError) as exc:
            find(store, new_id())
        assert exc.value.code == "not_found"
        verdict = label(store, LabelArgs(snapshot=snaps[0], label="person"), "alice", time.time())
        label(store, LabelArgs(snapshot=snaps[0], label="coat", note="on a hook"), "bob", time.time())
        assert verdict["model_version"] == "1" and verdict["policy_version"] == "p" and verdict["device"] == "cam-1"
        (first,) = [c for c in list_cases(store, ListArgs()) if c["snapshot"] == snaps[0]]
        assert first["review"]["label"] == "coat" and first["review"]["by"] == "bob"
        assert store.count_events("cam-1") == 9
    finally:
        store.close()


def test_coco_boxes_and_jpeg_sizes(shared):
    import cv2

    image = cv2.imread(str(shared("media/images/grace_hopper.bmp")))
    data = cv2.imencode(".jpg", image)[1].tobytes()
    assert jpeg_size(data) == (image.shape[1], image.shape[0])
    assert coco_box([0.1, 0.2, 0.5, 0.6], 200, 100) == [20.0, 20.0, 80.0, 40.0]
    assert coco_box(None, 200, 100) is None


# --- the fleet, two devices, the recorder ------------------------------------------------------


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("review")


@pytest.fixture(scope="module")
def broker(root):
    b = Broker(root / "mosquitto").start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def wire(broker):
    """Every message the broker carries: subscribed to ``#`` before anyone else connects."""
    recorder = Controller(broker, "#", client_id="wire-recorder")
    yield recorder
    recorder.close()


@pytest.fixture(scope="module")
def keys(root):
    init_keys(root / "keys")
    return root / "keys"


@pytest.fixture(scope="module")
def manager(root, broker, wire, keys):
    proc = FleetProcess(root / "fleet.db", broker, "--keys", str(keys), "--operator", "alice", "--operator", "bob",
                        "--artifacts", str(root / "artifacts"))
    proc.wait_for("control subscribed")
    proc.wait_for("ingest subscribed")
    yield proc
    assert proc.stop() == 0, proc.lines[-5:]


METRICS_PORT = free_port()


def device_config(root: Path, broker: Broker, keys: Path, name: str, privacy: dict) -> Path:
    d = root / name
    d.mkdir()
    (d / "policy.yaml").write_text(POLICY.format(version="p1"))
    cfg = {
        "device": {"id": name, "site": "plant-r", "line": "1"},
        "runtime": {"num_threads": 1, "stats_file": str(d / "stats.json")},
        "logging": {"format": "json", "stats_interval_s": 0.5},
        "models": {"det": {"path": str(shared_path(YOLO)), "manifest": str(manifest_for(YOLO))}},
        "cameras": [{"id": "door", "source": {"kind": "video", "path": str(shared_path(VIDEO)), "loop": True,
                                              "pace": "native"}, "model": "det"}],
        "mqtt": {"host": broker.host, "port": broker.port, "reconnect": {"initial_s": 0.2, "max_s": 1}},
        "outbox": {"path": str(d / "outbox.db"), "ack_timeout_s": 5},
        # a small cap: older snapshots are evicted while the test runs
        "decisions": {"policy": str(d / "policy.yaml"),
                      "snapshots": {"dir": str(d / "snapshots"), "max_mb": 1.0, "max_age_h": 1}},
        "agent": {"public_keys": [str(keys / "fleet.pub")], "state_dir": str(d / "store"),
                  "health": {"window_s": 1, "min_results": 2, "latency_factor": 50, "max_unsure_rate": 1,
                             "max_unsure_increase": 1, "max_confidence_drop": 1, "detections_ratio": [0, 1000]}},
        "privacy": privacy,
    }
    if privacy:
        cfg["metrics"] = {"listen": f"127.0.0.1:{METRICS_PORT}"}
    path = d / "device.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def stats(root: Path, name: str) -> dict:
    try:
        return json.loads((root / name / "stats.json").read_text())
    except (OSError, ValueError):
        return {}


@pytest.fixture(scope="module")
def daemons(root, broker, keys, manager):
    runs = {
        "cam-on": EdgeRun(device_config(root, broker, keys, "cam-on", {"snapshot_export": True, "reviewers": ["alice"],
                                                                       "max_fetches": 3}), name="cam-on"),
        "cam-off": EdgeRun(device_config(root, broker, keys, "cam-off", {}), name="cam-off"),
    }
    try:
        for name, run in runs.items():
            wait_until(lambda: stats(root, name).get("sync", {}).get("acked_batches", 0) >= 1
                       or run.proc.poll() is not None, 90, f"{name}'s first batch acked")
            assert run.proc.poll() is None, run.text()[-2000:]
        yield runs
    finally:
        for run in runs.values():
            if run.proc.poll() is None:
                run.stop()


def fleet(capsys, *args: str) -> tuple[int, str, str]:
    """The `fleet` command in this process: exit code, stdout, stderr."""
    capsys.readouterr()
    code = fleet_main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def rpc(broker: Broker, identity: str) -> list[str]:
    return ["--broker", f"{broker.host}:{broker.port}", "--identity", identity, "--timeout", "15"]


def cases(capsys, broker: Broker, *args: str) -> list[dict]:
    code, out, err = fleet(capsys, "review", "list", *args, "--json", *rpc(broker, "alice"))
    assert code == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def policy_rolled_out(root, broker, manager, daemons):
    """Policy p2 rolled out to both devices by the fleet (so later snapshots carry it)."""
    doc = root / "p2.yaml"
    doc.write_text(POLICY.format(version="p2"))
    with FleetClient(broker.host, broker.port, identity="alice", timeout=30) as client:
        push_file(client, doc, kind="policy", name="review", version="p2", manifest=None)
        started = client.call("rollouts.start", {"kind": "policy", "name": "review", "version": "p2",
                                                 "target": {"ids": ["cam-on", "cam-off"]}, "canary": 0,
                                                 "waves": [100], "health_window_s": 1})
        wait_until(lambda: client.call("rollouts.status", {"id": started["id"]})["settled"], 90,
                   "the policy rollout to settle")
        assert client.call("rollouts.status", {"id": started["id"]})["state"] == "completed"
    return "p2"


# --- list, fetch, label, export --------------------------------------------------------------------


def test_review_list_shows_unsure_and_alert_snapshots_with_their_versions(capsys, broker, daemons, policy_rolled_out):
    wait_until(lambda: {c["policy_version"] for c in cases(capsys, broker, "--device", "cam-on")} >= {"p2"}
               and {c["outcome"] for c in cases(capsys, broker, "--device", "cam-on")} >= {"unsure", "alert"}, 60,
               "unsure and alert snapshots of cam-on under p2")
    unsure = cases(capsys, broker, "--device", "cam-on", "--outcome", "unsure")
    assert unsure and {c["outcome"] for c in unsure} == {"unsure"} and {c["device"] for c in unsure} == {"cam-on"}
    assert all(re.fullmatch(C.SHA256_PATTERN, c["sha256"]) and c["model_version"] == "8.1.42-b" for c in unsure)
    alerts = cases(capsys, broker, "--outcome", "alert")
    assert {c["rule"] for c in alerts} == {"person-seen"} and {c["device"] for c in alerts} == {"cam-on", "cam-off"}
    code, out, _ = fleet(capsys, "review", "list", "--device", "cam-on", "--limit", "3", *rpc(broker, "alice"))
    assert code == 0 and "SNAPSHOT" in out.splitlines()[0] and len(out.splitlines()) == 4


def _newest(capsys, broker, device: str) -> dict:
    return cases(capsys, broker, "--device", device, "--limit", "1")[-1]


@pytest.fixture(scope="module")
def fetched() -> list[str]:
    """What alice fetched from cam-on (ids), in order: the tests that fetch add to it."""
    return []


def test_an_operator_fetches_a_snapshot_from_the_device_verified_against_the_stores_hash(
        capsys, root, broker, daemons, policy_rolled_out, fetched):
    case = _newest(capsys, broker, "cam-on")
    out = root / "alice-out" / "frame.jpg"
    code, stdout, err = fleet(capsys, "review", "fetch", case["snapshot"], "--out", str(out),
                              "--cases", str(root / "alice-cases"), *rpc(broker, "alice"))
    assert code == 0, err
    fetched.append(case["snapshot"])
    data = out.read_bytes()
    assert data.startswith(b"\xff\xd8\xff") and hashlib.sha256(data).hexdigest() == case["sha256"]
    assert (root / "alice-cases" / f"{case['snapshot']}.jpg").read_bytes() == data
    assert jpeg_size(data) == (480, 360)
    assert "verified" in stdout and "cam-on" in stdout
    wait_until(lambda: _exports(root), 20, "the snapshot_exported audit event in the fleet store")
    (audit,) = _exports(root)
    assert (audit["device"], audit["payload"]["operator"], audit["payload"]["snapshot"],
            audit["payload"]["sha256"]) == ("cam-on", "alice", case["snapshot"], case["sha256"])


def _exports(root: Path) -> list[dict]:
    store = Store.open_readonly(root / "fleet.db")
    try:
        return store.events(kind="snapshot_exported", limit=100)
    finally:
        store.close()


def test_a_fetch_from_a_device_with_export_off_is_refused_and_says_why(capsys, root, broker, daemons):
    case = _newest(capsys, broker, "cam-off")
    code, _, err = fleet(capsys, "review", "fetch", case["snapshot"], "--cases", str(root / "alice-cases"),
                         *rpc(broker, "alice"))
    assert code == 1 and "privacy.snapshot_export is off" in err, err
    assert not (root / "alice-cases" / f"{case['snapshot']}.jpg").exists()
    wait_until(lambda: stats(root, "cam-off")["sync"]["review"]["refused"] == {"export_off": 1}, 10, "counted")


def test_bad_fetches_get_clear_errors_and_hostile_requests_are_rejected_counted_and_logged(
        capsys, root, broker, wire, daemons, policy_rolled_out, fetched):
    cases_dir = str(root / "alice-cases")
    code, _, err = fleet(capsys, "review", "fetch", new_id(), "--cases", cases_dir, *rpc(broker, "alice"))
    assert code == 2 and "no snapshot" in err and "fleet store" in err
    code, _, err = fleet(capsys, "review", "fetch", "../../etc/passwd", *rpc(broker, "alice"))
    assert code == 2 and "not a snapshot id" in err
    # the oldest snapshot cam-on reported is no longer there: its size cap evicted it
    oldest = cases(capsys, broker, "--device", "cam-on", "--limit", "1000")[0]
    wait_until(lambda: not (root / "cam-on" / "snapshots" / f"{oldest['snapshot']}.jpg").exists(), 60,
               "the oldest snapshot evicted")
    code, _, err = fleet(capsys, "review", "fetch", oldest["snapshot"], "--cases", cases_dir, *rpc(broker, "alice"))
    assert code == 1 and "max_mb" in err, err
    # an operator the device does not list among its reviewers
    newest = _newest(capsys, broker, "cam-on")
    code, _, err = fleet(capsys, "review", "fetch", newest["snapshot"], "--cases", str(root / "bob-cases"),
                         *rpc(broker, "bob"))
    assert code == 2 and "not one of cam-on's privacy.reviewers" in err, err
    # hostile requests straight to the device's topic: no answer, counted, logged
    before = stats(root, "cam-on")["sync"]["review"]
    hostile = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="hostile", protocol=mqtt.MQTTv5)
    hostile.connect(broker.host, broker.port)
    hostile.loop_start()
    good = C.ReviewRequest(v=1, device="cam-on", operator="alice", snapshot=newest["snapshot"], request="h1",
                           reply_topic=T.review_reply("cam-on", "alice", "h1"))
    try:
        for body in (b"\x00garbage", b"{" + b" " * 4096 + b"}",
                     C.encode(good.model_copy(update={"reply_topic": T.review_reply("cam-on", "mallory", "h1")})),
                     C.encode(good.model_copy(update={"operator": "mallory"}))):
            hostile.publish(T.review_get("cam-on", "alice"), body, qos=1).wait_for_publish(5)
    finally:
        hostile.disconnect()
        hostile.loop_stop()
    wait_until(lambda: sum(stats(root, "cam-on")["sync"]["review"]["rejected"].values())
               >= sum(before["rejected"].values()) + 4, 10, "the four hostile requests rejected")
    rejected = stats(root, "cam-on")["sync"]["review"]["rejected"]
    assert {k: v - before["rejected"].get(k, 0) for k, v in rejected.items()} == {
        "malformed_json": 1, "oversized": 1, "wrong_device": 2}
    assert len(daemons["cam-on"].logged("review request rejected")) >= 4
    assert not [m for m in wire.received() if "/review/reply/mallory/" in m.topic or m.topic.endswith("/h1")]
    # the rate limit: three fetches an hour on cam-on; alice has had one
    ids = [c["snapshot"] for c in cases(capsys, broker, "--device", "cam-on", "--limit", "3")]
    for sid in ids[-2:]:
        code, _, err = fleet(capsys, "review", "fetch", sid, "--cases", cases_dir, *rpc(broker, "alice"))
        assert code == 0, err
        fetched.append(sid)
    code, _, err = fleet(capsys, "review", "fetch", ids[0], "--cases", cases_dir, *rpc(broker, "alice"))
    assert code == 1 and "3 fetches per 3600s" in err, err
    wait_until(lambda: stats(root, "cam-on")["sync"]["review"]["refused"] == {
        "evicted": 1, "forbidden": 1, "rate_limited": 1}, 10, "each refusal counted by its reason")
    wait_until(lambda: len(_exports(root)) == 3, 20, "three exports audited")
    with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=5) as r:
        metrics = r.read().decode()
    for line in ("edgecam_review_exported_total 3.0", 'edgecam_review_refused_total{reason="rate_limited"} 1.0',
                 'edgecam_review_rejected_total{reason="wrong_device"} 2.0'):
        assert line in metrics.splitlines(), line


def test_labels_are_review_events_tied_to_versions_and_export_writes_the_fetched_ones(
        capsys, root, broker, daemons, fetched):
    assert len(fetched) == 3, "the fetch tests ran first"
    code, _, err = fleet(capsys, "review", "label", new_id(), "--label", "person", *rpc(broker, "alice"))
    assert code == 2 and "no snapshot" in err, "a label for an unknown snapshot is refused"
    code, _, err = fleet(capsys, "review", "label", fetched[0], "--label", " ", *rpc(broker, "alice"))
    assert code == 2 and "label" in err
    not_fetched = cases(capsys, broker, "--device", "cam-off", "--limit", "1")[0]
    for sid, label in ((fetched[0], "person"), (fetched[1], "false_alarm"), (fetched[1], "person"),
                       (not_fetched["snapshot"], "person")):
        code, out, err = fleet(capsys, "review", "label", sid, "--label", label, "--note", "checked",
                               "--json", *rpc(broker, "alice"))
        assert code == 0, err
    verdict = json.loads(out)
    assert verdict["by"] == "alice" and verdict["device"] == "cam-off"
    store = Store.open_readonly(root / "fleet.db")
    try:
        reviews = store.events(kind="review", limit=10)
    finally:
        store.close()
    assert len(reviews) == 4
    assert all(r["payload"]["model_version"] == "8.1.42-b" and r["payload"]["policy_version"] in ("p1", "p2")
               for r in reviews)
    listed = {c["snapshot"]: c for c in cases(capsys, broker, "--device", "cam-on", "--limit", "1000")}
    assert listed[fetched[1]]["review"]["label"] == "person", "the latest verdict counts"

    out_dir = root / "export"
    code, out, err = fleet(capsys, "review", "export", "--dir", str(out_dir), "--cases", str(root / "alice-cases"),
                           "--json", *rpc(broker, "alice"))
    assert code == 0, err
    result = json.loads(out)
    assert result["images"] == 2 and result["not_fetched"] == [not_fetched["snapshot"]]
    doc = json.loads((out_dir / "labels.json").read_text())
    assert sorted(i["snapshot"] for i in doc["images"]) == sorted(fetched[:2])
    assert [c["name"] for c in doc["categories"]] == ["person"]
    for image in doc["images"]:
        data = (out_dir / image["file_name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == image["sha256"] and (image["width"], image["height"]) == (480, 360)
        assert image["model_version"] == "8.1.42-b" and image["device"] == "cam-on"
    assert all(a["category_id"] == 1 and len(a["bbox"]) == 4 for a in doc["annotations"])


# --- the wire (last: it reads everything the module's run carried) ------------------------------


def test_pixels_crossed_the_wire_only_in_the_fetches_asked_for_on_the_askers_reply_topic(
        root, wire, manager, daemons, fetched):
    assert len(fetched) == 3
    for run in daemons.values():
        run.stop()
    messages = wire.received()
    levels = [m.topic[len(T.prefix) + 1:].split("/") for m in messages if m.topic.startswith(f"{T.prefix}/")]
    topics = {rest[2] if rest[0] == "dev" else rest[0] for rest in levels}
    # the run carried everything: status, sync, acks, alerts, desired, jobs, RPC, reviews
    assert {"status", "outbox", "ack", "desired", "reported", "job", "review"} <= topics, topics
    assert any(m.topic.startswith(f"{T.prefix}/alerts/") for m in messages)
    assert any(m.topic.startswith(f"{T.prefix}/fleet/rpc/") for m in messages)
    carrying = [m for m in messages if any(mark in m.payload for mark in IMAGE_MARKS) or _pixel_array(m.payload)]
    by_topic: dict[str, list[bytes]] = {}
    for m in carrying:
        by_topic.setdefault(m.topic, []).append(m.payload)
    allowed = re.compile(rf"^{re.escape(T.prefix)}/dev/cam-on/review/reply/alice/[0-9a-f]{{16}}$")
    assert all(allowed.match(t) for t in by_topic), sorted(by_topic)
    assert len(by_topic) == 3, "one reply topic per fetch alice asked for"
    served = set()
    for payloads in by_topic.values():
        header, data = C.decode_review_chunk(payloads[0], device="cam-on")
        assert header.error is None and data.startswith(b"\xff\xd8\xff")
        served.add(header.snapshot)
    assert served == set(fetched)
    assert not [m for m in carrying if "/cam-off/" in m.topic], "nothing from the device with export off"
    # the manager never held the pixels: not in its store, not among its artifacts
    jpeg = (root / "alice-cases" / f"{fetched[0]}.jpg").read_bytes()
    sample = jpeg[len(jpeg) // 2:len(jpeg) // 2 + 64]
    for path in [root / "fleet.db", *(p for p in (root / "artifacts").rglob("*") if p.is_file())]:
        assert sample not in path.read_bytes(), path


def _pixel_array(payload: bytes) -> bool:
    """A JSON body holding a long run of small integers (pixels as numbers)."""
    return re.search(rb"\[(\s*\d{1,3}\s*,){256}", payload) is not None
