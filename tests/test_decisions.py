"""Decisions on synthetic frames: outcomes, zones, tracker ids, debounce, cooldown, reload."""

from __future__ import annotations

import pytest

from edge.core.contract import Alert, AlertState
from edge.decide.engine import Debouncer, DecisionEngine, FrameInfo
from edge.decide.policy import PolicyError, parse_policy
from edge.decide.tracker import Observation, Tracker, TrackerSettings
from edge.decide.zones import inside, side
from edge.inference.adapters import Classification, Detection, Prediction

W, H = 1000, 500

POLICY = """
version: "1"
default: {accept_at: 0.3, reject_at: 0.5}
classes:
  person: {accept_at: 0.4, reject_at: 0.6, min_area: 0.001}
zones:
  cell: {polygon: [[0.5, 0.0], [1.0, 0.0], [1.0, 1.0], [0.5, 1.0]]}
  poster: {polygon: [[0.0, 0.0], [0.1, 0.0], [0.1, 0.2], [0.0, 0.2]], mode: exclude}
lines:
  door: {start: [0.3, 0.0], end: [0.3, 1.0]}
tracker: {min_hits: 2, lost_after_s: 0.5, anchor: center}
rules:
  - name: entered-cell
    when: {event: entered, classes: [person], zone: cell, outcomes: [reject, unsure]}
    debounce: {k: 2, n: 3}
  - name: left-cell
    when: {event: left, classes: [person], zone: cell, outcomes: [reject, unsure]}
    debounce: {k: 2, n: 3}
  - name: crossed-door
    when: {event: crossed, classes: [person], line: door, direction: a_to_b, outcomes: [reject, unsure]}
  - name: occupied
    when: {event: present, classes: [person], zone: cell}
    debounce: {k: 2, n: 3}
    state: true
"""


class Recorder:
    """A pure-logic stand-in for the MQTT publisher: records what would be sent."""

    def __init__(self) -> None:
        self.alerts: list[Alert] = []
        self.states: list[AlertState] = []

    def submit(self, alert: Alert, topic: str | None, expiry_s: int) -> bool:
        self.alerts.append(alert)
        return True

    def set_state(self, state: AlertState, topic: str | None) -> None:
        self.states.append(state)

    def events(self, rule: str | None = None) -> list[tuple[str, str, int | None]]:
        return [(a.rule, a.event, a.track) for a in self.alerts if rule is None or a.rule == rule]


def det(label: str, score: float, cx: float, cy: float, w: float = 0.1, h: float = 0.2) -> Detection:
    """A detection centred at (cx, cy) in normalised coordinates, boxed in frame pixels."""
    return Detection(0, label, score, ((cx - w / 2) * W, (cy - h / 2) * H, (cx + w / 2) * W, (cy + h / 2) * H))


def engine(policy: str = POLICY) -> tuple[DecisionEngine, Recorder, list]:
    sink, audit = Recorder(), []
    eng = DecisionEngine("dev-1", lambda cam: f"edgecam/v1/alerts/s/l/{cam}", sink,
                         policy=parse_policy(policy), audit=audit.append)
    return eng, sink, audit


def feed(eng: DecisionEngine, frames: list[list[Detection]], t0: float = 1000.0, dt: float = 0.1,
         camera: str = "cam-1") -> None:
    for i, dets in enumerate(frames):
        frame = FrameInfo(camera, t0 + i * dt, W, H, "yolov8n", "8.1.42-b")
        eng.observe(frame, Prediction("detect", detections=tuple(dets)))


def walk(x0: float, x1: float, steps: int, y: float = 0.5, score: float = 0.8) -> list[list[Detection]]:
    return [[det("person", score, x0 + (x1 - x0) * i / (steps - 1), y)] for i in range(steps)]


def test_outcomes_follow_per_class_thresholds_with_an_unsure_band():
    p = parse_policy(POLICY)
    assert [p.outcome("person", s) for s in (0.39, 0.4, 0.59, 0.6)] == ["accept", "unsure", "unsure", "reject"]
    assert [p.outcome("car", s) for s in (0.29, 0.3, 0.5)] == ["accept", "unsure", "reject"]


def test_zone_and_line_geometry():
    square = [(0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)]
    assert inside((0.5, 0.5), square) and not inside((1.5, 0.5), square)
    # walking down the line x=0.3 (start at top), side "a" is on the walker's left: larger x
    assert side((0.6, 0.5), (0.3, 0.0), (0.3, 1.0)) == 1
    assert side((0.1, 0.5), (0.3, 0.0), (0.3, 1.0)) == -1


def test_tracker_keeps_exact_ids_for_two_people_and_never_reuses_them():
    tracker = Tracker(TrackerSettings(iou=0.3, max_distance=0.1, lost_after_s=0.5, min_hits=2))
    ids = []
    for i in range(20):  # two people walking towards each other on different rows
        a = Observation("person", 0.9, (0.1 + i * 0.02, 0.1, 0.2 + i * 0.02, 0.4), "reject")
        b = Observation("person", 0.9, (0.8 - i * 0.02, 0.6, 0.9 - i * 0.02, 0.9), "reject")
        alive, lost = tracker.update([a, b], i * 0.1)
        ids.append(sorted(t.id for t in alive))
        assert not lost
    assert ids[0] == [] and all(x == [1, 2] for x in ids[1:])  # confirmed on the second frame
    _, lost = tracker.update([], 2.0 + 0.6)
    assert sorted(t.id for t in lost) == [1, 2]
    alive, _ = tracker.update([Observation("person", 0.9, (0.1, 0.1, 0.2, 0.4), "reject")] * 1, 2.7)
    alive, _ = tracker.update([Observation("person", 0.9, (0.1, 0.1, 0.2, 0.4), "reject")], 2.8)
    assert [t.id for t in alive] == [3]


def test_tracker_follows_a_fast_object_whose_boxes_stop_overlapping():
    tracker = Tracker(TrackerSettings(iou=0.3, max_distance=0.15, lost_after_s=0.5, min_hits=1))
    seen = set()
    for i in range(10):
        x = 0.1 * i  # moves its own width per frame: IoU is 0, the centre distance is 0.1
        alive, _ = tracker.update([Observation("person", 0.9, (x, 0.4, x + 0.1, 0.6), "reject")], i * 0.1)
        seen |= {t.id for t in alive}
    assert seen == {1}


def test_a_person_walking_through_the_cell_enters_crosses_and_leaves_once_each():
    eng, sink, audit = engine()
    feed(eng, walk(0.1, 0.9, 17) + walk(0.9, 0.1, 17)[1:])  # in, then back out
    assert sink.events("entered-cell") == [("entered-cell", "entered", 1)]
    assert sink.events("left-cell") == [("left-cell", "left", 1)]
    # side "a" of the door (walking from its start at the top to its end at the bottom, on
    # the left) is x > 0.3: going in is b→a, which this rule ignores; coming back is a→b
    assert sink.events("crossed-door") == [("crossed-door", "crossed", 1)]
    crossed = next(a for a in sink.alerts if a.rule == "crossed-door")
    assert crossed.direction == "a_to_b" and crossed.captured_at > 1000.0 + 16 * 0.1
    occupied = sink.events("occupied")
    assert [e for _, e, _ in occupied] == ["present", "cleared"]
    assert [s.on for s in sink.states] == [True, False]
    entered = next(a for a in sink.alerts if a.rule == "entered-cell")
    assert entered.label == "person" and entered.zone == "cell" and entered.model_version == "8.1.42-b"
    assert entered.policy_version == "1" and 0.5 <= entered.box[0] <= 1.0
    assert {e.payload["rule"] for e in audit if e.kind.value == "alert"} == {
        "entered-cell", "left-cell", "crossed-door", "occupied"}


def test_debounce_ignores_a_one_frame_flicker_into_the_zone():
    eng, sink, _ = engine()
    frames = walk(0.3, 0.4, 5) + [[det("person", 0.8, 0.7, 0.5)]] + walk(0.4, 0.3, 5)
    feed(eng, frames)
    assert sink.events("entered-cell") == [] and sink.events("occupied") == []


def test_low_scores_small_boxes_and_exclude_zones_are_not_objects():
    eng, sink, _ = engine()
    feed(eng, [[det("person", 0.2, 0.7, 0.5)]] * 5)  # accept: below accept_at
    feed(eng, [[det("person", 0.9, 0.7, 0.5, w=0.01, h=0.01)]] * 5, t0=2000)  # area 0.0001 < min_area
    feed(eng, [[det("person", 0.9, 0.05, 0.1)]] * 5, t0=3000)  # on the poster
    assert sink.alerts == []
    assert eng.stats()["outcomes"]["cam-1"]["accept"] == 5


def test_cooldown_spaces_alerts_of_an_every_frame_rule():
    eng, sink, _ = engine("""
version: "2"
rules:
  - name: reject-part
    when: {event: every, classes: [scratch]}
    cooldown_s: 1.0
""")
    feed(eng, [[det("scratch", 0.9, 0.5, 0.5)]] * 25, dt=0.1)  # 2.4 s of rejected parts
    times = [a.captured_at - 1000.0 for a in sink.alerts]
    assert times == pytest.approx([0.0, 1.0, 2.0])
    assert eng.stats()["cooldown_suppressed"] == 22


def test_present_counts_objects_and_min_count_holds_it_off():
    eng, sink, _ = engine("""
version: "3"
rules:
  - name: crowd
    when: {event: present, classes: [person], min_count: 3}
""")
    feed(eng, [[det("person", 0.9, 0.2 * k + 0.1, 0.5) for k in range(2)]] * 3)
    assert sink.alerts == []
    feed(eng, [[det("person", 0.9, 0.2 * k + 0.1, 0.5) for k in range(3)]] * 3, t0=2000)
    assert [(a.event, a.count) for a in sink.alerts] == [("present", 3)]


def test_present_for_n_seconds_waits_for_the_object_to_stay():
    eng, sink, _ = engine("""
version: "4"
tracker: {min_hits: 1}
rules:
  - name: loiter
    when: {event: present, classes: [person], min_present_s: 2.0}
""")
    feed(eng, [[det("person", 0.9, 0.5, 0.5)]] * 30, dt=0.1)
    assert [(a.event, round(a.captured_at - 1000.0, 1)) for a in sink.alerts] == [("present", 2.0)]


def test_a_classifier_outcome_drives_a_rule():
    eng, sink, audit = engine("""
version: "5"
classes: {defect: {accept_at: 0.2, reject_at: 0.7}}
rules:
  - name: defect
    when: {event: every, classes: [defect]}
""")
    for i, score in enumerate((0.1, 0.5, 0.9)):
        frame = FrameInfo("cam-1", 1000.0 + i, W, H, "mobilenet", "1")
        eng.observe(frame, Prediction("classify", classes=(Classification(1, "defect", score),)))
    assert [(a.event, a.confidence) for a in sink.alerts] == [("every", 0.9)]
    unsure = [e.payload for e in audit if e.kind.value == "decision"]
    assert [(u["outcome"], u["score"]) for u in unsure] == [("unsure", 0.5)]


def test_a_new_policy_applies_from_the_next_frame_and_unchanged_rules_keep_their_state():
    eng, sink, _ = engine()
    feed(eng, walk(0.1, 0.9, 17))  # inside the cell now
    assert len(sink.events("entered-cell")) == 1
    stricter = POLICY.replace('version: "1"', 'version: "2"').replace(
        "person: {accept_at: 0.4, reject_at: 0.6", "person: {accept_at: 0.4, reject_at: 0.95")
    eng.set_policy(parse_policy(stricter))
    feed(eng, [[det("person", 0.8, 0.9, 0.5)]] * 5, t0=2000.0)  # same person, now "unsure"
    assert len(sink.events("entered-cell")) == 1  # no second "entered" from the swap
    assert eng.policy.outcome("person", 0.8) == "unsure"
    assert sink.alerts[-1].policy_version in ("1", "2")


def test_a_broken_policy_is_refused_naming_the_key():
    with pytest.raises(PolicyError, match=r"rules\[0\]\.when\.zone"):
        parse_policy("version: x\nrules: [{name: r, when: {event: entered, zone: nowhere}}]")
    with pytest.raises(PolicyError, match="accept_at"):
        parse_policy("version: x\nclasses: {person: {accept_at: 0.9, reject_at: 0.1}}")


def test_camera_health_alerts_when_blind_long_enough_and_clears_when_it_sees_again():
    now, step = [100.0], [0.0]
    sink = Recorder()
    eng = DecisionEngine("dev-1", lambda cam: "t", sink, clock=lambda: now[0] + step[0], monotonic=lambda: now[0],
                         policy=parse_policy("version: h\ncamera_health: {after_s: 5}"))
    assert eng.poll_health({"cam-1": "live"}) == []
    now[0] = 101.0
    assert eng.poll_health({"cam-1": "stale"}) == []
    step[0] = -60.0  # the wall clock stepped back a minute: the 5 s still run on the monotonic clock
    now[0] = 105.9
    assert eng.poll_health({"cam-1": "reopening"}) == []
    now[0] = 106.1
    blind = eng.poll_health({"cam-1": "reopening"})
    assert [(a.event, a.state, a.detail, a.captured_at) for a in blind] == [("camera_blind", True, "reopening", 101.0)]
    now[0] = 110.0
    assert eng.poll_health({"cam-1": "reopening"}) == []  # once
    restored = eng.poll_health({"cam-1": "live"})
    assert [(a.event, a.state) for a in restored] == [("camera_restored", False)]
    assert [s.on for s in sink.states] == [True, False]


def test_debouncer_is_k_of_n_with_hysteresis():
    d = Debouncer(3, 5)
    flips = [d.feed(v) for v in (True, False, True, False, True, True, False, True, False, False, False)]
    assert flips == [False, False, False, False, True, False, False, False, False, True, False]


def test_a_new_tracker_mid_run_drops_the_old_ids_rule_state_so_no_one_crosses_by_inheritance():
    eng, sink, _ = engine()
    feed(eng, [[det("person", 0.8, 0.6, 0.5)]] * 5)  # track 1 learns side a of the door
    eng.set_policy(parse_policy(POLICY.replace("min_hits: 2", "min_hits: 3")))  # a new tracker, same rules
    # someone else, standing still on side b, is the new tracker's track 1
    feed(eng, [[det("person", 0.8, 0.1, 0.5)]] * 10, t0=1002.0)
    assert sink.events("crossed-door") == [], "a person who never crossed the line"


def test_a_wall_clock_step_mid_walk_does_not_age_the_track_out():
    eng, sink, _ = engine()
    walker = walk(0.55, 0.9, 20)
    for i, dets in enumerate(walker):
        step = 3600.0 if i >= 10 else 0.0  # NTP steps the wall clock an hour forward mid-walk
        frame = FrameInfo("cam-1", 1000.0 + i * 0.1 + step, W, H, "yolov8n", "8.1.42-b", captured_mono=50.0 + i * 0.1)
        eng.observe(frame, Prediction("detect", detections=tuple(dets)))
    assert sink.events("entered-cell") == [("entered-cell", "entered", 1)]
    assert sink.events("left-cell") == [], "the track was not aged out by the step"
