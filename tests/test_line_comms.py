"""The line controllers' languages on a running `edge run` and a real Mosquitto: a Sparkplug
host application written here (subscribed to ``spBv1.0/#``, decoding with the compiled
protobuf), Home Assistant's discovery checked against its documented schema, commands
through the switch topic, the plain command topic and DCMD, hostile bodies on each, and
the NDEATH of a daemon killed with SIGKILL. One broker and one daemon serve the module;
the kill comes last."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import yaml
from broker import Broker, wait_until
from conftest import EdgeRun, edge_run, manifest_for, shared_path
from ha_schema import check_device_discovery
from paho.mqtt.enums import CallbackAPIVersion

from edge.comms import sparkplug_b_pb2 as pb
from edge.core.contract import decode_alert, decode_camera_summary, decode_command_result

YOLO = "models/yolov8n_full_integer_quant-b.tflite"
DEVICE = "cam-line"
GROUP, NODE = "plant-a", "line3-cam"
ALERTS = "edgecam/v1/alerts/plant-a/3/door"
COMMANDS = "edgecam/v1/commands/plant-a/3/cam-line"

# The crossing in the middle of the overhead clip: people walk in and out of it, so the
# occupied rule turns on and off; "seen" alerts on every frame with a person (cooldown 0.3 s).
POLICY = """
version: "lc-1"
classes:
  person: {accept_at: 0.3, reject_at: 0.5}
zones:
  crosswalk: {polygon: [[0.3, 0.45], [0.7, 0.45], [0.7, 1.0], [0.3, 1.0]]}
tracker: {min_hits: 2, lost_after_s: 1.0}
rules:
  - name: crosswalk-occupied
    when: {event: present, classes: [person], zone: crosswalk, min_count: 3}
    debounce: {k: 2, n: 3}
    state: true
  - name: seen
    when: {event: every, classes: [person]}
    cooldown_s: 0.3
camera_health: {enabled: false}
"""


class Host:
    """A Sparkplug host application: every message on ``spBv1.0/#``, decoded, in order."""

    def __init__(self, broker: Broker) -> None:
        self.messages: list[tuple[str, pb.Payload]] = []
        self.undecodable = 0
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="scada-host", protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.subscribe("spBv1.0/#", qos=1)
        self.client.loop_start()
        assert subscribed.wait(10)

    def _on_message(self, client, userdata, message) -> None:
        try:
            payload = pb.Payload.FromString(message.payload)
        except Exception:
            self.undecodable += 1
            return
        with self._lock:
            self.messages.append((message.topic, payload))

    def received(self, since: int = 0) -> list[tuple[str, pb.Payload]]:
        with self._lock:
            return self.messages[since:]

    def verb(self, topic: str) -> str:
        return topic.split("/")[2]

    def last_birth(self) -> int:
        """The index of the newest NBIRTH."""
        msgs = self.received()
        return max(i for i, (t, _) in enumerate(msgs) if self.verb(t) == "NBIRTH")

    def aliases(self, since: int) -> dict[int, str]:
        """alias -> name from the births at ``since``."""
        out = {}
        for topic, p in self.received(since):
            if self.verb(topic) in ("NBIRTH", "DBIRTH"):
                out.update({m.alias: m.name for m in p.metrics})
        return out

    def values(self, since: int, device: str, name: str) -> list:
        """Every value of one device metric from the births at ``since`` on, in order."""
        names = self.aliases(since)
        out = []
        for topic, p in self.received(since):
            if topic.endswith(f"/{device}") and self.verb(topic) in ("DBIRTH", "DDATA"):
                for m in p.metrics:
                    if (m.name or names.get(m.alias)) == name:
                        out.append(None if m.is_null else getattr(m, m.WhichOneof("value")))
        return out

    def send(self, verb: str, metrics: list[dict], device: str | None = None) -> None:
        payload = pb.Payload(timestamp=int(time.time() * 1000))
        for spec in metrics:
            m = payload.metrics.add()
            for key, value in spec.items():
                setattr(m, key, value)
        topic = f"spBv1.0/{GROUP}/{verb}/{NODE}" + (f"/{device}" if device else "")
        self.client.publish(topic, payload.SerializeToString(), qos=0)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Listener:
    """Any other MQTT client: alerts, summaries, command results, discovery."""

    def __init__(self, broker: Broker, *topics: str) -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = lambda c, u, m: self._add(m)
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.subscribe([(t, 1) for t in topics])
        self.client.loop_start()
        assert subscribed.wait(10)

    def _add(self, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(message)

    def on(self, topic: str, since: int = 0) -> list[mqtt.MQTTMessage]:
        with self._lock:
            return [m for m in self.messages[since:] if m.topic == topic]

    def count(self) -> int:
        with self._lock:
            return len(self.messages)

    def publish(self, topic: str, payload: bytes | str) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def write_config(tmp: Path, broker: Broker) -> Path:
    (tmp / "policy.yaml").write_text(POLICY)
    cfg = {
        "device": {"id": DEVICE, "site": "plant-a", "line": "3"},
        "runtime": {"num_threads": 2, "stats_file": str(tmp / "stats.json")},
        "logging": {"format": "json", "stats_interval_s": 0.5},
        "models": {"det": {"path": str(shared_path(YOLO)), "manifest": str(manifest_for(YOLO))}},
        "cameras": [{"id": "door", "model": "det", "source": {
            "kind": "video", "path": str(shared_path("media/pedestrians-360p10.avi")), "pace": "native",
            "loop": True}}],
        "mqtt": {"host": broker.host, "port": broker.port, "reconnect": {"initial_s": 0.2, "max_s": 1}},
        "outbox": {"path": str(tmp / "outbox.db")},
        "decisions": {"policy": str(tmp / "policy.yaml")},
        "sparkplug": {"group_id": GROUP, "edge_node_id": NODE, "bdseq_file": str(tmp / "sparkplug.json")},
        "homeassistant": {},
        "commands": {"state_file": str(tmp / "commands.json")},
    }
    path = tmp / "cam.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def line(tmp_path_factory):
    """A broker, the host, a listener, then the daemon (so nothing it says is missed)."""
    tmp = tmp_path_factory.mktemp("line")
    broker = Broker(tmp / "mosquitto").start()
    host = Host(broker)
    listener = Listener(broker, f"{ALERTS}/#", ALERTS, f"{COMMANDS}/result", "homeassistant/#")
    config = write_config(tmp, broker)
    state = {"tmp": tmp, "broker": broker, "host": host, "listener": listener, "run": edge_run(config),
             "config": config}
    try:
        state["run"].wait_for("running", timeout=120)
        yield state
    finally:
        if state["run"].proc.poll() is None:
            state["run"].stop()
        host.close()
        listener.close()
        broker.stop()


def stats(tmp: Path) -> dict:
    try:
        return json.loads((tmp / "stats.json").read_text())
    except (OSError, ValueError):
        return {}


def alerts_of(listener: Listener, rule: str, since: int = 0) -> list:
    return [a for a in (decode_alert(m.payload) for m in listener.on(ALERTS, since)) if a.rule == rule]


def summary(listener: Listener) -> dict:
    messages = listener.on(f"{ALERTS}/summary")
    return decode_camera_summary(messages[-1].payload).model_dump() if messages else {}


def command(listener: Listener, **body) -> dict:
    """Send a plain command; returns the device's result for it."""
    before = len(listener.on(f"{COMMANDS}/result"))
    listener.publish(COMMANDS, json.dumps({"v": 1, "device": DEVICE, **body}))
    wait_until(lambda: len(listener.on(f"{COMMANDS}/result")) > before, 10, "the command's result")
    return decode_command_result(listener.on(f"{COMMANDS}/result")[before].payload).model_dump()


def test_births_then_data_by_exception_with_sequence_numbers_in_order(line):
    host: Host = line["host"]
    wait_until(lambda: any(host.verb(t) == "DBIRTH" for t, _ in host.received()), 30, "the DBIRTH")
    first = host.received()[:2]
    (nt, nbirth), (dt, dbirth) = first
    assert nt == f"spBv1.0/{GROUP}/NBIRTH/{NODE}" and nbirth.seq == 0
    node = {m.name: m for m in nbirth.metrics}
    assert node["bdSeq"].datatype == pb.UInt64 and node["bdSeq"].long_value == 0  # first session of a fresh node
    assert node["Node Control/Rebirth"].datatype == pb.Boolean and node["Node Control/Rebirth"].boolean_value is False
    assert node["Policy/Version"].string_value == "lc-1"
    assert dt == f"spBv1.0/{GROUP}/DBIRTH/{NODE}/door" and dbirth.seq == 1
    metrics = {m.name: m for m in dbirth.metrics}
    for name, datatype in (("Camera/State", pb.String), ("Camera/Processed FPS", pb.Float),
                           ("Rules/crosswalk-occupied/Active", pb.Boolean), ("Rules/seen/Count", pb.UInt64),
                           ("Rules/seen/Enabled", pb.Boolean), ("Rules/seen/Mute Minutes", pb.Double),
                           ("Last Alert/Class", pb.String), ("Last Alert/Confidence", pb.Float),
                           ("Models/det/Version", pb.String), ("Quality/Sharpness", pb.Float),
                           ("Drift/det/PSI", pb.Float), ("Rules/camera_health/Active", pb.Boolean)):
        assert metrics[name].datatype == datatype, name
    assert metrics["Models/det/Version"].string_value == "8.1.42-b"
    assert metrics["Drift/det/PSI"].is_null  # no drift window closed yet: null, but defined
    aliases = [m.alias for _, p in first for m in p.metrics]
    assert len(set(aliases)) == len(aliases) and 0 not in aliases  # unique across the node
    # data: aliases only, each a change, and seq counting on from the DBIRTH, wrapping at 255
    wait_until(lambda: sum(host.verb(t) == "DDATA" for t, _ in host.received()) >= 5, 60, "DDATA")
    seqs = [p.seq for t, p in host.received() if host.verb(t) != "NDEATH"]
    assert all(b == (a + 1) % 256 for a, b in zip(seqs, seqs[1:])), seqs
    for t, p in host.received()[2:]:
        assert host.verb(t) in ("DDATA", "NDATA") and all(not m.name and m.alias for m in p.metrics)
    assert host.undecodable == 0


def test_ddata_follows_the_occupied_rule_on_and_off_on_the_clip(line):
    host: Host = line["host"]
    since = host.last_birth()
    def on_then_off():
        v = host.values(since, "door", "Rules/crosswalk-occupied/Active")
        return True in v and False in v[v.index(True):]

    wait_until(on_then_off, 90, "the rule on, then off again")
    values = host.values(since, "door", "Rules/crosswalk-occupied/Active")
    assert values[0] is False and all(a != b for a, b in zip(values, values[1:]))  # reported on change only
    # the same transitions as the edgecam state topic, which keeps going as before
    states = [json.loads(m.payload)["on"] for m in line["listener"].on(f"{ALERTS}/state/crosswalk-occupied")]
    assert True in states and False in states
    counts = host.values(since, "door", "Rules/seen/Count")
    assert counts == sorted(counts) and counts[-1] > 0
    assert "person" in host.values(since, "door", "Last Alert/Class")  # null after a "cleared"


def test_home_assistant_discovery_matches_the_documented_schema_and_is_sent_again_on_its_birth(line):
    listener: Listener = line["listener"]
    topic = f"homeassistant/device/{DEVICE.replace('.', '_')}/config"
    wait_until(lambda: listener.on(topic), 20, "the discovery config")
    config = json.loads(listener.on(topic)[-1].payload)
    check_device_discovery(config)  # keys, abbreviations, required options, per platform
    platforms = sorted(c["p"] for c in config["cmps"].values())
    assert platforms == ["binary_sensor", "binary_sensor", "event", "sensor", "sensor", "switch", "switch"]
    occupied = config["cmps"]["door_crosswalk-occupied"]
    assert occupied["stat_t"] == f"{ALERTS}/summary" and "crosswalk-occupied" in occupied["val_tpl"]
    assert config["avty"][0]["t"] == f"edgecam/v1/dev/{DEVICE}/status"
    # the summary every sensor reads is there, retained, and says what the rules are
    wait_until(lambda: summary(listener).get("rules"), 20, "the camera summary")
    doc = summary(listener)
    assert set(doc["rules"]) >= {"crosswalk-occupied", "seen"} and doc["state"] == "live"
    retained = Listener(line["broker"], topic)
    try:
        wait_until(lambda: retained.on(topic), 5, "the retained config")
        assert retained.on(topic)[0].retain
    finally:
        retained.close()
    before = len(listener.on(topic))
    listener.publish("homeassistant/status", "online")  # Home Assistant (re)started
    wait_until(lambda: len(listener.on(topic)) > before, 10, "discovery sent again")


def test_the_switch_topic_disables_the_rule_and_a_mute_holds_alerts_until_it_ends(line):
    listener: Listener = line["listener"]
    topic = f"homeassistant/device/{DEVICE}/config"
    switch = json.loads(listener.on(topic)[-1].payload)["cmps"]["door_seen_enabled"]
    wait_until(lambda: alerts_of(listener, "seen"), 30, "alerts of the rule")
    # what Home Assistant sends when the switch is turned off: pl_off on cmd_t
    listener.publish(switch["cmd_t"], switch["pl_off"])
    wait_until(lambda: summary(listener)["rules"]["seen"]["enabled"] is False, 10, "the rule disabled")
    time.sleep(0.5)  # frames in flight
    quiet = listener.count()
    time.sleep(2.5)
    assert not alerts_of(listener, "seen", quiet), "no alert while the rule is off"
    listener.publish(switch["cmd_t"], switch["pl_on"])
    wait_until(lambda: alerts_of(listener, "seen", quiet), 20, "alerts again once switched on")
    # a mute for 0.05 minutes through the plain command topic: decided, audited, not sent
    result = command(listener, camera="door", rule="seen", op="mute", minutes=0.05, id="m1")
    assert result["ok"] and result["id"] == "m1" and result["muted_until"] > time.time()
    time.sleep(0.5)
    muted = listener.count()
    wait_until(lambda: time.time() > result["muted_until"] + 0.2, 10, "the mute's end")
    during = [a for a in alerts_of(listener, "seen", muted) if a.captured_at < result["muted_until"] - 0.5]
    assert not during, "no alert while muted"
    wait_until(lambda: alerts_of(listener, "seen", muted), 20, "alerts again after the mute")
    wait_until(lambda: stats(line["tmp"]).get("decisions", {}).get("muted", {}).get("seen", 0) > 0, 5,
               "muted alerts counted")
    with sqlite3.connect(f"file:{line['tmp'] / 'outbox.db'}?mode=ro", uri=True) as conn:
        audit = [json.loads(r[0])["payload"] for r in conn.execute("select body from events where kind='command'")]
    assert [(a["op"], a["source"]) for a in audit] == [("disable", "mqtt"), ("enable", "mqtt"), ("mute", "mqtt")]
    assert all(a["ok"] and a["topic"] == COMMANDS for a in audit)


def test_dcmd_writes_a_rule_and_acknowledges_its_alert(line):
    host: Host = line["host"]
    since = host.last_birth()
    host.send("DCMD", [{"name": "Rules/seen/Acknowledge", "datatype": pb.Boolean, "boolean_value": True}], "door")
    wait_until(lambda: True in host.values(since, "door", "Rules/seen/Acknowledged"), 10, "the alert acknowledged")
    host.send("DCMD", [{"name": "Rules/crosswalk-occupied/Enabled", "datatype": pb.Boolean,
                        "boolean_value": False}], "door")
    wait_until(lambda: host.values(since, "door", "Rules/crosswalk-occupied/Enabled")[-1] is False, 10,
               "the rule disabled through DCMD")
    wait_until(lambda: summary(line["listener"])["rules"]["crosswalk-occupied"]["enabled"] is False, 5,
               "the summary saying so")


def test_hostile_commands_are_rejected_counted_and_the_daemon_keeps_going(line):
    host: Host = line["host"]
    listener: Listener = line["listener"]
    rng = os.urandom
    for body in (rng(64), b"{", b'{"v":1,"device":"cam-line","camera":"door","rule":"seen","op":"explode"}',
                 b'{"v":1,"device":"cam-line","camera":"door","rule":"seen","op":"mute"}'):
        assert not command_raw(listener, body)["ok"]
    assert command(listener, camera="door", rule="no-such-rule", op="disable")["reason"] == "unknown_rule"
    assert command(listener, camera="attic", rule="seen", op="disable")["reason"] == "unknown_camera"
    before = len(listener.on(f"{COMMANDS}/result"))
    listener.publish(COMMANDS, json.dumps({"v": 1, "device": "other-cam", "camera": "door", "rule": "seen",
                                           "op": "disable"}))  # another device's command on ours: ignored
    host.client.publish(f"spBv1.0/{GROUP}/NCMD/{NODE}", rng(200))
    host.client.publish(f"spBv1.0/{GROUP}/DCMD/{NODE}/door", rng(200))
    host.send("DCMD", [{"name": "Rules/seen/Enabled", "datatype": pb.String, "string_value": "no"}], "door")
    host.send("DCMD", [{"name": "Rules/seen/Enabled", "boolean_value": True, "datatype": pb.Int32}], "door")
    host.send("DCMD", [{"name": "Rules/seen/Mute Minutes", "datatype": pb.Double, "double_value": -3.0}], "door")
    host.send("DCMD", [{"name": "Rules/ghost/Enabled", "datatype": pb.Boolean, "boolean_value": False}], "door")
    host.send("DCMD", [{"name": "Camera/Unknown", "datatype": pb.Boolean, "boolean_value": False}], "door")
    host.send("DCMD", [{"name": "Camera/State", "datatype": pb.String, "string_value": "live"}], "door")
    host.send("DCMD", [{"name": "Rules/seen/Enabled", "datatype": pb.Boolean, "boolean_value": False}], "attic")
    host.send("NCMD", [{"name": "Node Control/Reboot", "datatype": pb.Boolean, "boolean_value": True}])

    def counted():
        c = stats(line["tmp"]).get("comms", {})
        rejected = c.get("commands", {}).get("rejected", {})
        return (c.get("sparkplug_rejected", {}).get("wrong_type", 0) >= 2
                and c.get("commands", {}).get("ignored", {}).get("wrong_device") == 1
                and c.get("commands", {}).get("ignored", {}).get("unknown_camera") == 1
                and {"malformed_json", "schema", "unknown_rule", "unknown_camera", "bad_value", "unknown_metric",
                     "not_writable"} <= set(rejected) and c)
    found = wait_until(counted, 15, "every bad command counted")
    assert len(listener.on(f"{COMMANDS}/result")) == before  # the other device's command got no answer
    assert found["sparkplug_rejected"]["malformed"] + found["sparkplug_rejected"].get("empty", 0) >= 1
    assert line["run"].proc.poll() is None
    since = len(host.received())
    wait_until(lambda: any(host.verb(t) == "DDATA" for t, _ in host.received(since)), 20, "data still flowing")
    # none of it changed a rule: seen is still enabled
    assert summary(listener)["rules"]["seen"]["enabled"] is True


def command_raw(listener: Listener, body: bytes) -> dict:
    before = len(listener.on(f"{COMMANDS}/result"))
    listener.publish(COMMANDS, body)
    wait_until(lambda: len(listener.on(f"{COMMANDS}/result")) > before, 10, "the command's result")
    return json.loads(listener.on(f"{COMMANDS}/result")[before].payload)


def test_rebirth_on_ncmd(line):
    host: Host = line["host"]
    first = host.last_birth()
    bdseq = next(m.long_value for m in host.received()[first][1].metrics if m.name == "bdSeq")
    host.send("NCMD", [{"name": "Node Control/Rebirth", "datatype": pb.Boolean, "boolean_value": True}])
    wait_until(lambda: host.last_birth() > first, 10, "a fresh NBIRTH")
    again = host.last_birth()
    wait_until(lambda: len(host.received(again)) >= 2, 5, "its DBIRTH")
    (nt, nbirth), (dt, dbirth) = host.received(again)[:2]
    assert nbirth.seq == 0 and dbirth.seq == 1 and dt.endswith("/DBIRTH/line3-cam/door")
    assert next(m.long_value for m in nbirth.metrics if m.name == "bdSeq") == bdseq  # the same session


def test_ndeath_when_the_daemon_is_killed_and_a_restart_is_born_again_with_its_controls(line):
    host: Host = line["host"]
    birth = host.last_birth()
    bdseq = next(m.long_value for m in host.received()[birth][1].metrics if m.name == "bdSeq")
    run: EdgeRun = line["run"]
    run.proc.send_signal(signal.SIGKILL)
    run.proc.wait(10)
    wait_until(lambda: any(host.verb(t) == "NDEATH" for t, _ in host.received(birth)), 15, "the NDEATH")
    death = next(p for t, p in host.received(birth) if host.verb(t) == "NDEATH")
    assert not death.HasField("seq")
    assert [(m.name, m.datatype, m.long_value) for m in death.metrics] == [("bdSeq", pb.UInt64, bdseq)]
    # a new life: the next bdSeq, and the rule the line disabled is still disabled
    after = len(host.received())
    again = edge_run(line["config"], name="edge-2")
    line["run"] = again
    wait_until(lambda: any(host.verb(t) == "DBIRTH" for t, _ in host.received(after)), 90, "births of the restart")
    nbirth = next(p for t, p in host.received(after) if host.verb(t) == "NBIRTH")
    assert next(m.long_value for m in nbirth.metrics if m.name == "bdSeq") == (bdseq + 1) % 256
    assert host.values(after, "door", "Rules/crosswalk-occupied/Enabled")[0] is False
    assert again.stop() == 0
    wait_until(lambda: sum(host.verb(t) == "NDEATH" for t, _ in host.received(after)) == 1, 10,
               "the NDEATH of a clean stop")
