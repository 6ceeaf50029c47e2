"""Segmentation: DeepLab v3 from ../shared on real photos, its shares, and rules on them.

What deeplabv3_mnv2_dm05_pascal_quant.tflite (through models/deeplabv3_mnv2_dm05_pascal_quant.yaml,
stretched to 513x513) finds on ../shared/media/images, share of the frame:
grace_hopper.bmp person 0.66 (0.91 of the lower half, 0.41 of the upper); cat.bmp cat 0.41;
cat_720p.jpg cat 0.38; pets.jpg dog 0.13, horse 0.004 (a sliver of a dog taken for one);
owl.jpg bird 0.18; parrot.jpg bird 0.23; hot_dog.jpg diningtable 0.59; kite_and_cold.jpg
person 0.008, all of it in the lower left quarter. Everything else is background.
"""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
from conftest import REPO, AlertRecorder, manifest_for, shared_path

from edge.core.errors import ModelError
from edge.decide.engine import DecisionEngine, FrameInfo
from edge.decide.policy import PolicyError, check_classes, parse_policy
from edge.decide.shares import ShareMeter
from edge.inference.adapters import Detection, Prediction, SegmentMap, make_decoder
from edge.inference.manifest import Manifest, check_manifest, guess_manifest
from edge.inference.model import Model
from edge.inference.preprocess import Transform
from edge.inference.runtime import TensorInfo, load_interpreter

DEEPLAB = "models/deeplabv3_mnv2_dm05_pascal_quant.tflite"
LOWER_LEFT = [[0.0, 0.5], [0.5, 0.5], [0.5, 1.0], [0.0, 1.0]]
RIGHT_HALF = [[0.5, 0.0], [1.0, 0.0], [1.0, 1.0], [0.5, 1.0]]

pytestmark = pytest.mark.runtime


@pytest.fixture(scope="module")
def deeplab() -> Model:
    return Model.load(shared_path(DEEPLAB), manifest=manifest_for(DEEPLAB), num_threads=2)


def image(name: str) -> np.ndarray:
    return cv2.imread(str(shared_path(f"media/images/{name}")))


def shares(prediction: Prediction) -> dict[str, float]:
    return {s.label: s.share for s in prediction.segments}


# --- the adapter on real photos ------------------------------------------------------------


@pytest.mark.parametrize("name, label, low, high", [
    ("grace_hopper.bmp", "person", 0.60, 0.72),
    ("cat.bmp", "cat", 0.35, 0.47),
    ("pets.jpg", "dog", 0.10, 0.16),
    ("owl.jpg", "bird", 0.13, 0.23),
    ("hot_dog.jpg", "diningtable", 0.50, 0.68),
])
def test_deeplab_finds_the_photos_subject_with_its_share_of_the_frame(deeplab, name, label, low, high):
    prediction, _ = deeplab.predict(image(name))
    found = shares(prediction)
    assert low <= found[label] <= high, found
    assert set(found) <= {"background", label, "horse"}, found  # pets.jpg: a sliver of dog taken for a horse
    assert sum(found.values()) == pytest.approx(1.0)
    assert [s.share for s in prediction.segments] == sorted(found.values(), reverse=True)
    assert prediction.segments[0].class_id == deeplab.manifest.labels.index(prediction.segments[0].label)


def test_only_shares_leave_never_the_mask(deeplab):
    prediction, _ = deeplab.predict(image("grace_hopper.bmp"))
    doc = prediction.to_dict()
    assert set(doc) == {"kind", "segments"} and doc["kind"] == "segment"
    assert {s["label"] for s in doc["segments"]} == {"person", "background"}
    assert len(json.dumps(doc)) < 300
    assert prediction.segmap is not None and prediction.segmap.classes.shape == (513, 513)


def test_shares_per_zone_say_where_the_class_is(deeplab):
    prediction, _ = deeplab.predict(image("kite_and_cold.jpg"))
    segmap = prediction.segmap
    assert 0.02 < segmap.shares(segmap.region(LOWER_LEFT))["person"] < 0.05  # the people at the bottom left
    assert "person" not in segmap.shares(segmap.region(RIGHT_HALF))
    hopper = deeplab.predict(image("grace_hopper.bmp"))[0].segmap
    upper, lower = (hopper.shares(hopper.region(z))["person"] for z in (
        [[0, 0], [1, 0], [1, 0.5], [0, 0.5]], [[0, 0.5], [1, 0.5], [1, 1], [0, 1]]))
    assert upper < 0.5 < 0.85 < lower


def test_edge_infer_prints_the_shares(tmp_path):
    out = subprocess.run([sys.executable, "-m", "edge", "infer", "--model", str(shared_path(DEEPLAB)),
                          "--manifest", str(manifest_for(DEEPLAB)), "--json", str(shared_path("media/images/cat.bmp"))],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert {s["label"] for s in doc["segments"]} == {"cat", "background"}


def test_a_bare_deeplab_is_guessed_as_segmentation():
    loaded = load_interpreter(shared_path(DEEPLAB), num_threads=2)
    manifest = guess_manifest(loaded)
    assert manifest.task == "segment"
    prediction, _ = Model(loaded, manifest).predict(image("grace_hopper.bmp"))
    # without labels a class is its index: 15 is PASCAL VOC's person
    assert prediction.segments[0].label == "15" and prediction.segments[0].share > 0.6


def test_a_segmentation_manifest_on_another_model_is_refused():
    classifier = load_interpreter(shared_path("models/mobilenet_v2_1.0_224_quant.tflite"), num_threads=1)
    with pytest.raises(ModelError, match="task segment expects one output"):
        check_manifest(Manifest(name="x", version="1", task="segment"), classifier)
    deeplab = load_interpreter(shared_path(DEEPLAB), num_threads=1)
    with pytest.raises(ModelError, match="80 labels for 509 output classes"):
        check_manifest(Manifest(name="x", version="1", task="yolov8", labels=[str(i) for i in range(80)]), deeplab)


def test_per_class_scores_are_argmaxed_and_the_letterbox_is_cut_off():
    """The other DeepLab export: [1, h, w, C] scores at a quarter of the input, padded."""
    out = TensorInfo("scores", 0, (1, 4, 4, 3), np.dtype(np.uint8), 0.1, 0)
    decode = make_decoder(Manifest(name="s", version="1", task="segment", labels=["bg", "a", "b"]), [out], (8, 8))
    raw = np.zeros((1, 4, 4, 3), np.uint8)
    raw[..., 0] = 5
    raw[0, 1, :, 1] = 9  # row 1: class a
    raw[0, 2, :2, 2] = 9  # row 2, left half: class b
    raw[0, 0, :, 1] = 200  # row 0 is letterbox padding: must not count
    # a 8x4 frame letterboxed into 8x8: rows 2..5 of the input, rows 1..2 of the map
    prediction = decode([raw], Transform(1.0, 1.0, 0, 2, 8, 4))
    assert {s.label: s.share for s in prediction.segments} == {"a": 0.5, "b": 0.25, "bg": 0.25}


def test_a_class_id_past_the_labels_is_named_by_its_number():
    segmap = SegmentMap(np.array([[0, 0], [7, 255]], np.uint8), ["bg", "x"])
    assert segmap.shares() == {"bg": 0.5, "7": 0.25, "255": 0.25}


def test_class_ids_no_uint8_holds_are_counted_as_255_not_wrapped():
    """A broken model's ids (negative, or past 255) must not wrap onto real classes."""
    out = TensorInfo("ids", 0, (1, 2, 2), np.dtype(np.int64), 0.0, 0)
    decode = make_decoder(Manifest(name="s", version="1", task="segment", labels=["bg", "person"]), [out], (2, 2))
    raw = np.array([[[1, 256 + 1], [-255, 0]]], np.int64)  # 257 and -255 wrap to 1 as uint8
    prediction = decode([raw], Transform(1.0, 1.0, 0, 0, 2, 2))
    assert {s.label: s.share for s in prediction.segments} == {"person": 0.25, "bg": 0.25, "255": 0.5}


def test_a_zone_all_excluded_has_no_share_rather_than_a_division_by_zero():
    segmap = SegmentMap(np.full((4, 4), 1, np.uint8), ["bg", "person"])
    meter = ShareMeter()
    whole = [(0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)]
    assert meter.share(segmap, ["person"], whole, [whole]) == (0.0, "person")
    # a zone smaller than a map pixel still has the pixel it falls in
    assert meter.share(segmap, ["person"], [(0.3, 0.3), (0.31, 0.3), (0.31, 0.31)]) == (1.0, "person")
    assert meter.share(segmap, ["person", "cat"], None) == (1.0, "person")  # cat: not a class of this map


# --- rules on shares -------------------------------------------------------------------------

POLICY = """
version: seg-1
zones:
  desk: {polygon: [[0.0, 0.5], [0.5, 0.5], [0.5, 1.0], [0.0, 1.0]]}
  right: {polygon: [[0.5, 0.0], [1.0, 0.0], [1.0, 1.0], [0.5, 1.0]]}
rules:
  - name: person-in-frame
    when: {event: present, classes: [person], min_share: 0.5}
    state: true
  - name: someone-at-desk
    when: {event: present, classes: [person], zone: desk, min_share: 0.02}
  - name: someone-right
    when: {event: present, classes: [person], zone: right, min_share: 0.02}
  - name: animals
    when: {event: every, classes: [cat, dog], min_share: 0.1}
  - name: boxes
    when: {event: present, classes: [person]}
"""




def run(eng: DecisionEngine, deeplab: Model, names: list[str], t0: float = 100.0) -> None:
    for i, name in enumerate(names):
        frame = image(name)
        prediction, _ = deeplab.predict(frame)
        h, w = frame.shape[:2]
        eng.observe(FrameInfo("cam-1", t0 + i, w, h, "deeplab", "coral-1"), prediction)


def test_a_share_rule_turns_on_and_clears_with_the_share(deeplab):
    sink = AlertRecorder()
    eng = DecisionEngine("dev-1", lambda cam: "t", sink, policy=parse_policy(POLICY))
    run(eng, deeplab, ["grace_hopper.bmp", "grace_hopper.bmp", "cat.bmp"])
    mine = [a for a in sink.alerts if a.rule == "person-in-frame"]
    assert [(a.event, a.label) for a in mine] == [("present", "person"), ("cleared", None)]
    on = mine[0]
    assert 0.6 < on.values["share"] < 0.72 and on.confidence == pytest.approx(on.values["share"])
    assert on.box == (0.0, 0.0, 1.0, 1.0) and on.policy_version == "seg-1"
    assert mine[1].values["share"] == 0.0
    assert [s.on for s in sink.states] == [True, False]
    animals = [a for a in sink.alerts if a.rule == "animals"]
    assert [(a.event, a.label) for a in animals] == [("every", "cat")]
    # a share rule never fires on boxes, and a box rule never on a segmentation
    assert not [a for a in sink.alerts if a.rule == "boxes"]


def test_a_zone_share_fires_only_where_the_class_is(deeplab):
    sink = AlertRecorder()
    eng = DecisionEngine("dev-1", lambda cam: "t", sink, policy=parse_policy(POLICY))
    run(eng, deeplab, ["kite_and_cold.jpg"])
    (alert,) = [a for a in sink.alerts if a.rule.startswith("someone")]
    assert alert.rule == "someone-at-desk" and alert.zone == "desk" and alert.box == (0.0, 0.5, 0.5, 1.0)
    assert 0.02 < alert.values["share"] < 0.05


def test_an_exclude_zone_takes_its_pixels_out_of_every_share(deeplab):
    policy = POLICY.replace("zones:\n", "zones:\n  poster: {polygon: [[0, 0.5], [0.5, 0.5], [0.5, 1], [0, 1]], "
                                        "mode: exclude}\n")
    sink = AlertRecorder()
    eng = DecisionEngine("dev-1", lambda cam: "t", sink, policy=parse_policy(policy))
    run(eng, deeplab, ["kite_and_cold.jpg"])
    assert not [a for a in sink.alerts if a.rule == "someone-at-desk"]  # the desk is all poster now


def test_segmentations_leave_box_rules_and_their_objects_alone():
    """A camera running a detector and a segmenter: the segmenter's frames, which have no
    boxes, must not clear the detector's level or lose its objects."""
    sink = AlertRecorder()
    eng = DecisionEngine("dev-1", lambda cam: "t", sink, policy=parse_policy(POLICY))
    person = Prediction("yolov8", detections=(Detection(15, "person", 0.9, (10, 10, 50, 90)),))
    empty = Prediction("segment", segmap=SegmentMap(np.zeros((4, 4), np.uint8), ["background", "person"]))
    for i in range(6):
        eng.observe(FrameInfo("cam-1", 100 + i * 0.1, 100, 100, "m", "1"), person if i % 2 == 0 else empty)
    assert [(a.rule, a.event) for a in sink.alerts] == [("boxes", "present")]
    assert len(eng.tracks("cam-1")) == 1


def test_a_share_rule_ignores_a_segmentation_model_without_its_classes():
    """Two segmenters on one camera: the one that knows no person must not clear a person rule."""
    sink = AlertRecorder()
    eng = DecisionEngine("dev-1", lambda cam: "t", sink, policy=parse_policy(POLICY))
    people = Prediction("segment", segmap=SegmentMap(np.full((4, 4), 1, np.uint8), ["background", "person"]))
    cats = Prediction("segment", segmap=SegmentMap(np.zeros((4, 4), np.uint8), ["background", "cat"]))
    for i in range(4):
        eng.observe(FrameInfo("cam-1", 100 + i * 0.1, 100, 100, "m", "1"), people if i % 2 == 0 else cats)
    assert [(a.rule, a.event) for a in sink.alerts if a.rule == "person-in-frame"] == [("person-in-frame", "present")]


# --- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize("when, key", [
    ("{event: entered, classes: [person], zone: z, min_share: 0.1}", "rules[0].when.min_share: only for events"),
    ("{event: present, min_share: 0.1}", "rules[0].when.classes: required with min_share"),
    ("{event: present, classes: [person], min_share: 1.5}", "rules[0].when.min_share: must be <= 1"),
    ("{event: present, classes: [person], min_share: 0}", "rules[0].when.min_share: must be > 0"),
    ("{event: present, classes: [person], min_share: .nan}", "rules[0].when.min_share: must be <= 1"),
    ("{event: present, classes: [person], min_share: 0.1, min_count: 2}", "rules[0].when.min_share: a share has"),
])
def test_a_malformed_share_rule_is_refused_naming_the_key(when, key):
    with pytest.raises(PolicyError, match=key.replace("[", r"\[").replace("]", r"\]")):
        parse_policy(f"version: 1\nzones: {{z: {{polygon: [[0, 0], [1, 0], [1, 1]]}}}}\n"
                     f"rules: [{{name: r, when: {when}}}]")


def test_a_class_the_model_lacks_is_a_policy_error_naming_the_key(deeplab):
    policy = parse_policy("version: 1\nrules: [{name: ok, when: {event: present, classes: [person], min_share: 0.1}},"
                          " {name: r, when: {event: present, classes: [person, forklift], min_share: 0.1}}]")
    with pytest.raises(PolicyError, match=r"rules\[1\]\.when\.classes\[1\]: 'forklift' is not a class of "
                                          r"segmentation model deeplab \(known: background, aeroplane"):
        check_classes(policy, deeplab.manifest.labels, model="deeplab")
    check_classes(parse_policy("version: 1\nrules: [{name: r, when: {classes: [forklift]}}]"),
                  deeplab.manifest.labels, model="deeplab")  # a box rule is no segmentation's business


def test_edge_policy_check_with_the_model_exits_2_naming_the_key(tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\nrules: [{name: r, when: {event: present, classes: [persn], min_share: 0.1}}]\n")
    cmd = [sys.executable, "-m", "edge", "policy", "check", str(policy)]
    assert subprocess.run(cmd, capture_output=True, cwd=REPO, timeout=60).returncode == 0  # no model: no classes known
    out = subprocess.run([*cmd, "--model", str(manifest_for(DEEPLAB))], capture_output=True, text=True, cwd=REPO,
                         timeout=60)
    assert out.returncode == 2
    assert "rules[0].when.classes[0]: 'persn' is not a class of segmentation model" in out.stderr
    policy.write_text(policy.read_text().replace("persn", "person"))
    out = subprocess.run([*cmd, "--model", str(manifest_for(DEEPLAB))], capture_output=True, text=True, cwd=REPO,
                         timeout=60)
    assert out.returncode == 0, out.stderr
