"""The comms stage's parts without a broker: the compiled Sparkplug schema, the edge node's
sequence numbers, deadbands and command decoding, the engine's rule controls across a policy
swap, the discovery payload against Home Assistant's schema, and the config keys."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import AlertRecorder
from ha_schema import check_device_discovery

from edge.comms import sparkplug_b_pb2 as pb
from edge.comms.homeassistant import Discovery
from edge.comms.sparkplug import EdgeNode, Rebirth, RuleOp, SparkplugError
from edge.comms.view import CameraView, LineView
from edge.config import DeviceInfo, HomeAssistantConfig, SparkplugConfig, parse_config
from edge.core.contract import Topics
from edge.core.errors import ConfigError
from edge.decide.engine import ControlError, DecisionEngine, FrameInfo, RuleStatus
from edge.decide.policy import parse_policy
from edge.inference.adapters import Detection, Prediction

REPO = Path(__file__).resolve().parent.parent
DEVICE = DeviceInfo(id="cam-1", site="s", line="l")


def test_the_committed_module_is_what_protoc_makes_of_the_proto(tmp_path):
    protoc = shutil.which("protoc")
    if protoc is None:
        pytest.skip("needs protoc (apt-get install protobuf-compiler)")
    subprocess.run([protoc, f"--proto_path={REPO}", f"--python_out={tmp_path}", "edge/comms/sparkplug_b.proto"],
                   check=True, cwd=REPO)
    made = (tmp_path / "edge/comms/sparkplug_b_pb2.py").read_text()
    assert made == (REPO / "edge/comms/sparkplug_b_pb2.py").read_text(), "run scripts/gen_sparkplug.sh"
    # the specification's field numbers, as any host decodes them
    metric = pb.Payload.Metric.DESCRIPTOR.fields_by_name
    assert (metric["name"].number, metric["alias"].number, metric["datatype"].number,
            metric["boolean_value"].number, metric["long_value"].number) == (1, 2, 4, 14, 11)
    assert pb.DataType.Value("DateTime") == 13 and pb.DataType.Value("DateTimeArray") == 34


def status(rule: str, **kw) -> RuleStatus:
    defaults = dict(level=False, events=0, enabled=True, muted_until=None, acknowledged=False, retained=True)
    return RuleStatus(rule, **{**defaults, **kw})


def view(at: float = 1000.0, fps: float | None = 10.0, rules: tuple[RuleStatus, ...] = (), **cam) -> LineView:
    camera = CameraView("door", cam.get("state", "live"), fps, True, rules or (status("occupied"),), None,
                        {"det": "1.0"})
    return LineView(at, "p1", {"door": camera})


def node(tmp_path: Path, **deadband) -> EdgeNode:
    cfg = SparkplugConfig(group_id="g", edge_node_id="n", bdseq_file=tmp_path / "bd.json",
                          deadband=deadband or {"fps": 0.5, "ratio": 0.05})
    return EdgeNode(cfg, DEVICE, quality=True, drift=True)


def test_births_then_changes_only_seq_wraps_and_bdseq_survives_a_restart(tmp_path):
    n = node(tmp_path)
    death = pb.Payload.FromString(n.new_session())
    assert [(m.name, m.long_value) for m in death.metrics] == [("bdSeq", 0)] and not death.HasField("seq")
    births = [pb.Payload.FromString(p) for _, p in n.birth(view())]
    assert [b.seq for b in births] == [0, 1]
    assert not n.data(view(fps=10.3))  # inside the fps deadband: nothing
    (topic, data), = n.data(view(fps=10.6))
    changed = pb.Payload.FromString(data)
    assert topic == "spBv1.0/g/DDATA/n/door" and changed.seq == 2
    assert [(m.alias, m.float_value) for m in changed.metrics] == [
        (next(m.alias for m in births[1].metrics if m.name == "Camera/Processed FPS"), pytest.approx(10.6))]
    seqs = [pb.Payload.FromString(p).seq for i in range(300)
            for _, p in n.data(view(rules=(status("occupied", level=i % 2 == 0),)))]
    assert len(seqs) == 300 and all(b == (a + 1) % 256 for a, b in zip([2, *seqs], seqs))
    assert seqs[251:254] == [254, 255, 0]
    # a policy with another rule is another metric set: births again
    again = n.data(view(rules=(status("occupied"), status("crowd"))))
    assert [t.split("/")[2] for t, _ in again] == ["NBIRTH", "DBIRTH"] and n.counters["rebirths"] == 1
    assert EdgeNode(n.cfg, DEVICE, quality=True, drift=True).bd_seq == 0  # the next session will be 1
    n.bd_seq = 255
    n.new_session()
    assert n.bd_seq == 0


def metric(**fields) -> pb.Payload.Metric:
    m = pb.Payload.Metric()
    for k, v in fields.items():
        setattr(m, k, v)
    return m


def cmd(*metrics: pb.Payload.Metric) -> bytes:
    p = pb.Payload(timestamp=1)
    p.metrics.extend(metrics)
    return p.SerializeToString()


@pytest.mark.parametrize("topic,data,reason", [
    ("spBv1.0/g/DCMD/n/door", b"\xff\xff\xff", "malformed"),
    ("spBv1.0/g/DCMD/n/door", cmd(), "empty"),
    ("spBv1.0/g/DCMD/n/door", cmd(metric(name="Nope", boolean_value=True)), "unknown_metric"),
    ("spBv1.0/g/DCMD/n/door", cmd(metric(alias=9999, boolean_value=True)), "unknown_metric"),
    ("spBv1.0/g/DCMD/n/door", cmd(metric(name="Rules/ghost/Enabled", boolean_value=True)), "unknown_rule"),
    ("spBv1.0/g/DCMD/n/door", cmd(metric(name="Rules/occupied/Enabled", string_value="x")), "wrong_type"),
    ("spBv1.0/g/DCMD/n/door", cmd(metric(name="Rules/occupied/Enabled", datatype=pb.Int8, int_value=1)),
     "wrong_type"),
    ("spBv1.0/g/DCMD/n/door", cmd(metric(name="Rules/occupied/Mute Minutes", double_value=float("nan"))),
     "bad_value"),
    ("spBv1.0/g/DCMD/n/door", cmd(metric(name="Rules/occupied/Acknowledge", boolean_value=False)), "bad_value"),
    ("spBv1.0/g/DCMD/n/door", cmd(metric(name="Camera/State", string_value="x")), "not_writable"),
    ("spBv1.0/g/DCMD/n/attic", cmd(metric(name="Rules/occupied/Enabled", boolean_value=True)), "unknown_camera"),
    ("spBv1.0/g/DCMD/other/door", cmd(metric(name="Rules/occupied/Enabled", boolean_value=True)), "wrong_device"),
    ("spBv1.0/g/NCMD/n", cmd(metric(name="Node Control/Rebirth", boolean_value=False)), "bad_value"),
    ("spBv1.0/g/NCMD/n", cmd(metric(name="bdSeq", long_value=3)), "not_writable"),
    ("spBv1.0/g/NCMD/n", b"\x00" * 20000, "oversized"),
])
def test_commands_the_node_refuses(tmp_path, topic, data, reason):
    n = node(tmp_path)
    n.birth(view())
    with pytest.raises(SparkplugError) as err:
        n.command(topic, data)
    assert err.value.reason == reason


def test_commands_the_node_takes_by_name_or_alias(tmp_path):
    n = node(tmp_path)
    dbirth = pb.Payload.FromString(n.birth(view())[1][1])
    alias = next(m.alias for m in dbirth.metrics if m.name == "Rules/occupied/Mute Minutes")
    assert isinstance(n.command("spBv1.0/g/NCMD/n", cmd(metric(name="Node Control/Rebirth", boolean_value=True))),
                      Rebirth)
    assert n.command("spBv1.0/g/DCMD/n/door", cmd(metric(alias=alias, datatype=pb.Double, double_value=5.0),
                                                  metric(name="Rules/occupied/Enabled", boolean_value=False))) == [
        RuleOp("door", "occupied", "mute", 5.0), RuleOp("door", "occupied", "disable")]
    assert n.command("spBv1.0/g/DCMD/n/door", cmd(metric(alias=alias, float_value=0.0))) == [
        RuleOp("door", "occupied", "unmute")]


POLICY = """
version: p1
classes: {person: {accept_at: 0.3, reject_at: 0.5}}
rules:
  - {name: seen, when: {event: every, classes: [person]}}
  - {name: occupied, when: {event: present, classes: [person]}, debounce: {k: 1, n: 1}, state: true}
camera_health: {enabled: false}
"""




def frame(engine: DecisionEngine, t: float, person: bool = True) -> list:
    det = [Detection(0, "person", 0.9, (10.0, 10.0, 50.0, 90.0))] if person else []
    return engine.observe(FrameInfo("door", t, 100, 100, "m", "1"), Prediction("yolov8", detections=tuple(det)))


def test_rule_controls_apply_from_the_next_frame_and_outlive_a_policy_swap():
    clock = [100.0]
    sink, audit = AlertRecorder(), []
    engine = DecisionEngine("cam-1", lambda c: "t", sink, policy=parse_policy(POLICY), audit=audit.append,
                            clock=lambda: clock[0])
    with pytest.raises(ControlError, match="nothing_to_ack"):
        engine.control("door", "seen", "ack")
    frame(engine, 1.0)
    assert {a.rule for a in sink.alerts} == {"seen", "occupied"}
    engine.control("door", "occupied", "disable")
    frame(engine, 2.0)  # the disabled rule's retained state is turned off, then it is left alone
    assert [s.on for s in sink.states] == [True, False]
    assert [s for s in engine.status("door") if s.rule == "occupied"][0].enabled is False
    engine.control("door", "seen", "mute", minutes=1)
    n = len(sink.alerts)
    assert frame(engine, 3.0) and len(sink.alerts) == n  # decided, not sent
    assert audit[-1].payload["muted"] is True and audit[-1].payload["delivered"] is False
    clock[0] += 61  # the mute has run out
    frame(engine, 4.0)
    assert sink.alerts[-1].rule == "seen"
    latest = sink.alerts[-1].id
    with pytest.raises(ControlError, match="stale_alert"):
        engine.control("door", "seen", "ack", alert=sink.alerts[0].id)
    assert engine.control("door", "seen", "ack").acked == latest
    assert [s for s in engine.status("door") if s.rule == "seen"][0].acknowledged
    frame(engine, 5.0)  # a new alert is not acknowledged
    assert not [s for s in engine.status("door") if s.rule == "seen"][0].acknowledged
    with pytest.raises(ControlError, match="unknown_rule"):
        engine.control("door", "ghost", "disable")
    with pytest.raises(ControlError, match="not_controllable"):
        engine.control("door", "camera_health", "disable")
    engine.control("door", "camera_health", "mute", minutes=5)
    # a reload keeps what the line said of the rules it still has, and drops the rest
    engine.set_policy(parse_policy(POLICY.replace("p1", "p2").replace("name: seen", "name: seen-2")))
    assert set(engine.controls()) == {("door", "occupied"), ("door", "camera_health")}
    assert not engine.controls()[("door", "occupied")].enabled
    engine.control("door", "occupied", "enable")
    frame(engine, 6.0)
    assert sink.alerts[-1].rule == "occupied" and sink.alerts[-1].event == "present"  # fresh: on again


def test_discovery_passes_home_assistant_schema_and_a_misspelt_key_would_not():
    discovery = Discovery(HomeAssistantConfig(), DEVICE, Topics(), commands=True)
    rules = (status("occupied"), status("seen", level=None, retained=False),
             status("camera_health", device_rule=True))
    config = discovery.config(discovery.components(view(rules=rules)))
    check_device_discovery(config)
    assert sorted(config["cmps"]) == ["door_alerts", "door_occupied", "door_occupied_count", "door_occupied_enabled",
                                      "door_problem", "door_seen_count", "door_seen_enabled"]
    assert config["cmps"]["door_alerts"]["evt_typ"][:2] == ["present", "cleared"]
    bad = {**config, "cmps": {**config["cmps"], "door_problem": {**config["cmps"]["door_problem"], "stat_tp": "x"}}}
    with pytest.raises(AssertionError, match="stat_tp"):
        check_device_discovery(bad)
    with pytest.raises(AssertionError, match="unique_id"):
        check_device_discovery({**config, "cmps": {"x": {"p": "sensor", "stat_t": "a/b"}}})
    # a rule gone from the policy is removed by its platform alone
    again = discovery.config(discovery.components(view(rules=rules[:1])))
    assert again["cmps"]["door_seen_count"] == {"p": "sensor"}
    check_device_discovery(again)


def test_config_keys_of_the_comms_stage_name_themselves():
    base = {"device": {"id": "c"}, "models": {"m": {"path": "m.tflite"}},
            "cameras": [{"id": "a", "model": "m", "source": {"kind": "pattern"}}]}
    for key, value in (("sparkplug", {"group_id": "g", "edge_node_id": "n"}), ("homeassistant", {}),
                       ("commands", {})):
        with pytest.raises(ConfigError, match=f"{key}: needs `mqtt`"):
            parse_config({**base, key: value})
    with pytest.raises(ConfigError, match="sparkplug.group_id"):
        parse_config({**base, "mqtt": {}, "sparkplug": {"group_id": "a/b", "edge_node_id": "n"}})
    with pytest.raises(ConfigError, match="sparkplug.deadband.ratio"):
        parse_config({**base, "mqtt": {}, "sparkplug": {"group_id": "g", "edge_node_id": "n",
                                                        "deadband": {"ratio": 2}}})
    cfg = parse_config({**base, "mqtt": {}, "sparkplug": {"group_id": "g", "edge_node_id": "n"}, "commands": {}})
    assert cfg.sparkplug.deadband.fps == 0.5 and cfg.commands.state_file.name == "commands.json"
