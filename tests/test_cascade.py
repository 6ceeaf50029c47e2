"""Cascades into decisions, on synthetic results: crop rules, verifiers, per-class cooldowns,
the policy checked against a device's trigger tasks, and triggers that fire on an outcome."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from conftest import AlertRecorder

from edge.capture.thread import Frame
from edge.cli import main
from edge.config import TaskConfig, parse_config
from edge.decide.cascade import CropResult, TaskView, check_device, device_view
from edge.decide.engine import DecisionEngine, FrameInfo
from edge.decide.policy import PolicyError, parse_policy
from edge.inference.adapters import Classification, Detection, Prediction
from edge.inference.model import StageTimes
from edge.schedule.planner import CostModel, Planner, _pad
from edge.schedule.scheduler import Result

W, H = 1000, 500

HELMETS = """
version: "h1"
classes:
  person: {accept_at: 0.3, reject_at: 0.6}
zones:
  cell: {polygon: [[0.5, 0.0], [1.0, 0.0], [1.0, 1.0], [0.5, 1.0]]}
tracker: {min_hits: 1, anchor: center}
rules:
  - name: no-helmet
    when: {class: person, zone: cell, min_present_s: 0.05,
           crop: {task: helmet, class: no_helmet, min_score: 0.6}}
    cooldown_s: 100
"""




def det(label: str, score: float, cx: float, cy: float = 0.5, w: float = 0.1, h: float = 0.2) -> Detection:
    return Detection(0, label, score, ((cx - w / 2) * W, (cy - h / 2) * H, (cx + w / 2) * W, (cy + h / 2) * H))


def engine(policy: str, **kw) -> tuple[DecisionEngine, AlertRecorder]:
    sink = AlertRecorder()
    return DecisionEngine("dev-1", lambda cam: "t", sink, policy=parse_policy(policy), **kw), sink


def helmet(label: str, score: float) -> dict[str, CropResult]:
    return {"helmet": CropResult("helmet", ((label, score),))}


def observe(eng: DecisionEngine, t: float, dets: list[Detection], crops: dict[int, dict[str, CropResult]]) -> None:
    eng.observe(FrameInfo("cam-1", t, W, H, "yolov8n", "b"), Prediction("detect", detections=tuple(dets)), crops)


# --- policy syntax and its bad input ------------------------------------------------------------


def test_a_crop_rule_reads_as_the_issue_writes_it():
    rule = parse_policy(HELMETS).rules[0]
    assert rule.when.classes == ["person"] and rule.when.zone == "cell"
    assert (rule.when.crop.task, rule.when.crop.classes, rule.when.crop.min_score) == ("helmet", ["no_helmet"], 0.6)


@pytest.mark.parametrize("change, key", [
    ("crop: {task: helmet, class: no_helmet, min_score: 0.6}",
     "crop: {task: helmet, class: no_helmet, classes: [x]}"),
    ("crop: {task: helmet, class: no_helmet, min_score: 0.6}", "crop: {task: helmet, min_score: 0.6}"),
    ("crop: {task: helmet, class: no_helmet, min_score: 0.6}", "crop: {task: helmet, class: x, min_score: 1.5}"),
    ("cooldown_s: 100", "cooldown_s: 100\n    class_cooldown_s: {person: 5}"),
])
def test_a_malformed_crop_rule_is_refused_naming_the_key(change, key):
    with pytest.raises(PolicyError) as err:
        parse_policy(HELMETS.replace(change, key))
    message = str(err.value)
    expected = ("rules[0].class_cooldown_s.person: not a class this rule alerts on (no_helmet)"
                if "class_cooldown_s" in key else "rules[0].when.crop")
    assert expected in message, message


def test_a_verifier_without_classes_to_confirm_is_refused():
    with pytest.raises(PolicyError, match=r"verifiers\.person\.confirm"):
        parse_policy("version: v\nverifiers: {person: {task: verify, confirm: []}}")


# --- a policy against the device's tasks ---------------------------------------------------------


DEVICE = {
    "device": {"id": "d"},
    "models": {"det": {"path": "det.tflite"}, "cls": {"path": "cls.tflite"}},
    "cameras": [
        {"id": "cam1", "source": {"kind": "pattern"}, "tasks": [
            {"name": "detect", "model": "det"},
            {"name": "helmet", "model": "cls", "trigger": {"task": "detect", "classes": ["person"]}},
            {"name": "verify", "model": "cls", "trigger": {"task": "detect", "outcomes": ["unsure"]}}]},
        {"id": "cam2", "source": {"kind": "pattern"}, "tasks": [
            {"name": "detect", "model": "det"}, {"name": "helmet", "model": "cls"}]},
    ],
}
LABELS = {"det": ["person", "car"], "cls": ["helmet", "no_helmet"]}


def view():
    return device_view(parse_config(DEVICE), LABELS.__getitem__)


def test_the_device_view_names_each_cameras_triggers_and_classes():
    v = view()
    assert v["cam1"]["helmet"] == TaskView("cls", ("helmet", "no_helmet"), "detect", ())
    assert v["cam1"]["verify"].outcomes == ("unsure",) and v["cam2"]["helmet"].trigger_of is None


def test_a_crop_rule_that_fits_the_cameras_it_applies_to_passes():
    check_device(parse_policy(HELMETS.replace("cooldown_s: 100", "cameras: [cam1]")), view())


@pytest.mark.parametrize("policy, message", [
    # cam2 runs helmet on whole frames, not on crops
    (HELMETS, "rules[0].when.crop.task: 'helmet' is not a trigger task of camera 'cam2' (it has no trigger tasks)"),
    (HELMETS.replace("task: helmet", "task: hat").replace("cooldown_s: 100", "cameras: [cam1]"),
     "rules[0].when.crop.task: 'hat' is not a trigger task of camera 'cam1' (its trigger tasks: helmet, verify)"),
    (HELMETS.replace("class: no_helmet", "class: no_vest").replace("cooldown_s: 100", "cameras: [cam1]"),
     "rules[0].when.crop.classes: 'no_vest' is not a class of model 'cls' (task 'helmet' on camera 'cam1')"),
    ("version: v\nverifiers: {person: {task: detect, confirm: [helmet]}}",
     "verifiers.person.task: 'detect' is not a trigger task of any camera "
     "(cam1: its trigger tasks: helmet, verify; cam2: it has no trigger tasks)"),
    ("version: v\nverifiers: {person: {task: verify, confirm: [person]}}",
     "verifiers.person.confirm: 'person' is not a class of model 'cls' (task 'verify' on camera 'cam1')"),
])
def test_a_policy_naming_what_the_device_lacks_is_refused_naming_the_key(policy, message):
    with pytest.raises(PolicyError) as err:
        check_device(parse_policy(policy), view(), source="p.yaml")
    assert str(err.value) == f"p.yaml: {message}"
    assert err.value.exit_code == 2


# --- crop results joined to their objects --------------------------------------------------------


def test_a_crop_answer_joins_its_object_its_track_and_box():
    eng, sink = engine(HELMETS)
    # two people in the cell: the helmet model says the second one has none
    for i in range(5):
        observe(eng, 1000 + i * 0.1, [det("person", 0.9, 0.6), det("person", 0.9, 0.85)],
                {0: helmet("helmet", 0.9), 1: helmet("no_helmet", 0.8)})
    assert len(sink.alerts) == 1
    alert = sink.alerts[0]
    track = next(t for t in eng.tracks("cam-1") if t.box == pytest.approx(alert.box, abs=1e-4))
    assert alert.track == track.id == 2 and alert.label == "person"
    assert alert.box == pytest.approx((0.8, 0.4, 0.9, 0.6), abs=1e-4)
    assert (alert.crop.task, alert.crop.label, alert.crop.score) == ("helmet", "no_helmet", 0.8)


def test_a_crop_answer_below_min_score_or_of_another_class_does_not_hold():
    eng, sink = engine(HELMETS)
    for i in range(5):
        observe(eng, 1000 + i * 0.1, [det("person", 0.9, 0.6), det("person", 0.9, 0.85)],
                {0: helmet("helmet", 0.9), 1: helmet("no_helmet", 0.55)})
    assert sink.alerts == []


def test_a_track_keeps_its_last_answer_on_frames_the_crop_did_not_run():
    eng, sink = engine(HELMETS.replace("cooldown_s: 100", "cooldown_s: 0").replace(
        "min_present_s: 0.05", "event: every, min_present_s: 0.05"))
    observe(eng, 1000.0, [det("person", 0.9, 0.85)], {0: helmet("no_helmet", 0.9)})
    for i in range(1, 4):  # the helmet task skipped (budget) on these frames
        observe(eng, 1000 + i * 0.1, [det("person", 0.9, 0.85)], {})
    assert len(sink.alerts) == 3 and {a.crop.label for a in sink.alerts} == {"no_helmet"}


def result(frame: Frame, task: str, prediction: Prediction, crop=None, parent=None) -> Result:
    return Result(frame, task, "m", prediction, StageTimes(0, 0, 0), 0.0, crop, None, parent)


def test_results_wait_for_the_frame_to_be_done_when_the_policy_uses_crops():
    eng, sink = engine(HELMETS.replace("min_present_s: 0.05", "event: every").replace("cooldown_s: 100", ""),
                       framed=True)
    for seq in range(3):
        frame = Frame("cam-1", seq, np.zeros((H, W, 3), np.uint8), 1000.0 + seq * 0.1, 50.0 + seq * 0.1)
        people = (det("person", 0.9, 0.6), det("person", 0.9, 0.85))
        eng(result(frame, "detect", Prediction("detect", detections=people)))
        # the crop of the second person only: joined by the index of the detection it was cut from
        eng(result(frame, "helmet", Prediction("classify", classes=(Classification(2, "no_helmet", 0.7),)),
                   crop=_pad(people[1].box, 0.1), parent=("detect", 1)))
        assert len(sink.alerts) == seq  # nothing judged before the frame is done
        eng.frame_done("cam-1", seq)
        assert len(sink.alerts) == seq + 1
    assert all(a.box == pytest.approx((0.8, 0.4, 0.9, 0.6), abs=1e-4) for a in sink.alerts)


def test_without_crop_rules_results_are_judged_at_once():
    eng, sink = engine("version: p\nrules: [{name: p, when: {event: every, class: person}}]", framed=True)
    frame = Frame("cam-1", 0, np.zeros((H, W, 3), np.uint8), 1000.0, 50.0)
    eng(result(frame, "detect", Prediction("detect", detections=(det("person", 0.9, 0.5),))))
    assert len(sink.alerts) == 1


# --- the verifier settles unsure outcomes ---------------------------------------------------------


VERIFIED = """
version: "v1"
classes:
  person: {accept_at: 0.3, reject_at: 0.6}
verifiers:
  person: {task: verify, confirm: [pedestrian], min_score: 0.5}
rules:
  - name: person
    when: {event: every, class: person}
"""


def verify(label: str, score: float) -> dict[str, CropResult]:
    return {"verify": CropResult("verify", ((label, score),))}


def test_a_verifier_confirms_or_dismisses_an_unsure_object_and_leaves_it_unsure_without_an_answer():
    eng, sink = engine(VERIFIED)
    dets = [det("person", 0.9, 0.1), det("person", 0.4, 0.3), det("person", 0.45, 0.5), det("person", 0.5, 0.7),
            det("person", 0.35, 0.9)]
    # 0.4 confirmed; 0.45 dismissed (another class); 0.5 dismissed (too low); 0.35 not verified (budget)
    observe(eng, 1000.0, dets, {1: verify("pedestrian", 0.8), 2: verify("dog", 0.9), 3: verify("pedestrian", 0.3)})
    assert [(a.count, a.confidence) for a in sink.alerts] == [(2, 0.9)]  # the sure one and the confirmed one
    stats = eng.stats()
    assert stats["verified"] == {"confirmed": 1, "dismissed": 2}
    assert stats["outcomes"]["cam-1"] == {"reject": 2, "accept": 2, "unsure": 1}


def test_a_verifier_answer_never_changes_a_sure_outcome():
    eng, sink = engine(VERIFIED)
    observe(eng, 1000.0, [det("person", 0.9, 0.1), det("person", 0.1, 0.5)],
            {0: verify("dog", 0.9), 1: verify("pedestrian", 0.9)})
    assert eng.stats()["outcomes"]["cam-1"] == {"reject": 1, "accept": 1, "unsure": 0}


# --- per-class cooldowns ------------------------------------------------------------------------


def test_each_class_listed_alerts_on_its_own_clock():
    eng, sink = engine("""
version: c
rules:
  - name: ppe
    when: {event: every, class: person, crop: {task: ppe, classes: [no_helmet, no_vest]}}
    cooldown_s: 0
    class_cooldown_s: {no_helmet: 1.0, no_vest: 0.5}
""")
    for i in range(11):  # 1 s: no_helmet (the higher score) must not hold no_vest back
        observe(eng, 1000 + i * 0.1, [det("person", 0.9, 0.3), det("person", 0.9, 0.7)],
                {0: {"ppe": CropResult("ppe", (("no_helmet", 0.9),))},
                 1: {"ppe": CropResult("ppe", (("no_vest", 0.7),))}})
    times = {label: [round(a.captured_at - 1000, 1) for a in sink.alerts if a.crop.label == label]
             for label in ("no_helmet", "no_vest")}
    assert times == {"no_helmet": [0.0, 1.0], "no_vest": [0.0, 0.5, 1.0]}


def test_an_object_rule_spaces_each_class_per_object():
    eng, sink = engine("""
version: c
zones: {cell: {polygon: [[0.5, 0.0], [1.0, 0.0], [1.0, 1.0], [0.5, 1.0]]}}
tracker: {min_hits: 1, anchor: center}
rules:
  - name: entered
    when: {event: entered, class: person, zone: cell}
    cooldown_s: 0
    class_cooldown_s: {person: 10}
""")
    xs = [0.3, 0.7, 0.3, 0.7, 0.3, 0.7]  # in and out of the cell, 0.4 s apart
    for i, x in enumerate(xs):
        for k in range(4):
            observe(eng, 1000 + i * 0.4 + k * 0.1, [det("person", 0.9, x + k * 0.01)], {})
    assert [a.event for a in sink.alerts] == ["entered"]


# --- triggers that fire on an outcome --------------------------------------------------------------


def test_a_trigger_on_unsure_runs_only_on_the_uncertain_detections_naming_each_parent():
    tasks = [TaskConfig(name="detect", model="det"),
             TaskConfig.model_validate({"name": "verify", "model": "cls",
                                        "trigger": {"task": "detect", "outcomes": ["unsure"], "max_crops": 5}})]
    policy = parse_policy("version: p\nclasses: {person: {accept_at: 0.3, reject_at: 0.6}}")
    planner = Planner(tasks, CostModel(), 1000.0, policy.outcome)
    dets = (det("person", 0.9, 0.1), det("person", 0.45, 0.3), det("car", 0.2, 0.5), det("person", 0.55, 0.7))
    plan = planner.start(0, 0.0)
    first = plan.next(100.0)
    assert first.task == "detect"
    plan.done(first, 1.0, Prediction("detect", detections=dets))
    items = []
    while (item := plan.next(100.0)) is not None:
        items.append(item)
        plan.done(item, 1.0, Prediction("classify", classes=()))
    assert [(i.task, i.parent) for i in items] == [("verify", ("detect", 3)), ("verify", ("detect", 1))]
    assert items[0].crop == _pad(dets[3].box, 0.1)


def test_a_trigger_on_an_outcome_never_fires_without_an_outcome_to_judge_by():
    tasks = [TaskConfig(name="detect", model="det"),
             TaskConfig.model_validate({"name": "verify", "model": "cls",
                                        "trigger": {"task": "detect", "outcomes": ["unsure"]}})]
    plan = Planner(tasks, CostModel(), 1000.0).start(0, 0.0)
    first = plan.next(100.0)
    plan.done(first, 1.0, Prediction("detect", detections=(det("person", 0.45, 0.3),)))
    assert plan.next(100.0) is None


# --- the command line: exit 2 naming the key ------------------------------------------------------


def cli_files(tmp_path, policy: str):
    from conftest import manifest_for, shared_path

    det, cls = "models/yolov8n_full_integer_quant-b.tflite", "models/mobilenet_v1_0.25_128_quant.tflite"
    doc = {**DEVICE, "models": {"det": {"path": str(shared_path(det)), "manifest": str(manifest_for(det))},
                                "cls": {"path": str(shared_path(cls)), "manifest": str(manifest_for(cls))}}}
    (tmp_path / "policy.yaml").write_text(policy)
    doc["decisions"] = {"policy": str(tmp_path / "policy.yaml")}
    (tmp_path / "device.yaml").write_text(yaml.safe_dump(doc))
    return tmp_path / "policy.yaml", tmp_path / "device.yaml"


TALL_HAT = HELMETS.replace("class: no_helmet", "class: 'bearskin, busby, shako'").replace(
    "cooldown_s: 100", "cameras: [cam1]")


def test_policy_check_against_a_device_passes_with_the_models_real_classes(tmp_path, capsys):
    policy, device = cli_files(tmp_path, TALL_HAT)
    assert main(["policy", "check", str(policy)]) == 0
    assert "give --config to check them against a device" in capsys.readouterr().out
    assert main(["policy", "check", str(policy), "--config", str(device)]) == 0
    assert main(["config", "check", str(device)]) == 0


@pytest.mark.parametrize("change, key", [
    (("cameras: [cam1]", "cameras: []"), "rules[0].when.crop.task: 'helmet' is not a trigger task of camera 'cam2'"),
    (("bearskin, busby, shako", "no_helmet"),
     "rules[0].when.crop.classes: 'no_helmet' is not a class of model 'cls' (task 'helmet' on camera 'cam1')"),
])
@pytest.mark.parametrize("command", ["policy", "config"])
def test_a_policy_that_does_not_fit_the_device_exits_2_naming_the_key(tmp_path, capsys, change, key, command):
    policy, device = cli_files(tmp_path, TALL_HAT.replace(*change))
    argv = ["policy", "check", str(policy), "--config", str(device)] if command == "policy" else \
        ["config", "check", str(device)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{policy}: {key}" in err, err


def test_a_broken_crop_models_nan_is_no_answer():
    nan = float("nan")
    broken = CropResult.of("helmet", Prediction("classify", classes=(Classification(1, "no_helmet", nan),)))
    assert broken.answers == ()
    eng, sink = engine(HELMETS.replace("min_present_s: 0.05", "event: every").replace("min_score: 0.6", "min_score: 0"))
    observe(eng, 1000.0, [det("person", 0.9, 0.85)], {0: {"helmet": broken}})
    assert sink.alerts == []
