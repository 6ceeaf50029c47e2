"""Decisions: a model's boxes and scores become outcomes, objects, rule states and alerts.

The engine is a scheduler sink. For each result it turns detections (or a whole-frame
classification) into observations with an outcome (accept / reject / unsure, from the
policy's per-class thresholds), drops what is too small or inside an exclude zone,
feeds the camera's tracker, and evaluates every rule for the camera:

- level rules (``present``, ``every``) debounce "the condition holds on this frame"
  with k-of-n hysteresis; ``present`` alerts when it turns on (and says so again when
  it clears), ``every`` alerts on each frame while it is on;
- object rules (``entered``, ``left``, ``crossed``) debounce each tracked object's
  membership of a zone (or its side of a line) the same way and alert on each change.

A cooldown spaces a rule's alerts (per camera for level rules, per object for object
rules); a class in ``class_cooldown_s`` has a clock of its own.

Cascades (edge/decide/cascade.py): a crop's result is joined to the detection it was cut
from, so the object carries what each trigger task said about it (a track keeps each
task's latest answer). A rule with ``when.crop`` wants only objects whose answer fits,
and a ``verifier`` settles an unsure object to reject or accept. On a camera whose policy
uses crops, a frame's results wait until the scheduler says the frame is done
(:meth:`DecisionEngine.frame_done`, with ``framed``), so all its crops are in.

Everything about a camera is touched by one executor at a time (the scheduler
guarantees it), so per-camera state needs no lock; a policy swap replaces the policy
and the rule states in one assignment between two frames.

Line controllers steer rules per camera (:meth:`DecisionEngine.control`): disable
(the rule is not evaluated; its state starts afresh when enabled again), mute for a
while (evaluated, states published, alerts decided and audited but not sent), and
acknowledge the latest alert. The controls are one mapping replaced whole, read once
per frame, so a command takes effect between two frames. They belong to the line, not
to a policy version: a policy swap (SIGHUP, or one the fleet assigns) keeps the
controls of every rule the new policy still has by name, and drops those of rules it
no longer has.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping, Protocol

import numpy as np

from edge.core.contract import COMMAND_OPS, Alert, AlertState, CropAnswer
from edge.core.errors import EdgeError
from edge.core.ids import new_id
from edge.core.logs import fields
from edge.inference.adapters import Prediction, SegmentMap
from edge.observe.drift import DriftReport
from edge.observe.observer import ObserveSnapshot
from edge.observe.quality import QualityReading
from edge.schedule.scheduler import Result
from edge.sync.events import Event, alert_audit, decision, sample

from .cascade import CropResult, crop_match, needs_crops, settle
from .policy import Policy, Rule
from .sampling import CameraSamples, Pick, pick, take
from .shares import ShareMeter, bounds
from .tracker import NO_CROPS, Observation, Track, Tracker, TrackerSettings
from .zones import anchor, area, inside, side, within_segment

log = logging.getLogger("edge.decisions")

UNSURE_EVENT_INTERVAL_S = 1.0  # at most one unsure decision event per camera per second
# Alerts the device raises about a camera itself: muted and acknowledged like a policy's
# rules, never disabled (a blind camera must not go unsaid by mistake).
DEVICE_RULES = ("camera_health", "camera_tamper", "image_quality", "model_drift")


class ControlError(EdgeError):
    """A rule control refused: ``reason`` is one of ``contract.COMMAND_REASONS``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class RuleControl:
    """What the line has said about one rule on one camera."""

    enabled: bool = True
    muted_until: float | None = None  # seconds since the epoch
    acked: str | None = None  # the id of the alert acknowledged

    def muted(self, now: float) -> bool:
        return self.muted_until is not None and now < self.muted_until

    def to_dict(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "muted_until": self.muted_until, "acked": self.acked}


@dataclass(frozen=True)
class RuleStatus:
    """One rule on one camera as the line sees it (what the comms stage exports)."""

    rule: str
    level: bool | None  # a level rule's debounced state; None for object rules and device alerts
    events: int
    enabled: bool
    muted_until: float | None
    acknowledged: bool
    retained: bool  # the rule keeps a retained state topic (``state: true``)
    device_rule: bool = False


class AlertSink(Protocol):
    """Where alerts go: MQTT now (:class:`edge.decide.alerts.AlertPublisher`)."""

    def submit(self, alert: Alert, topic: str | None, expiry_s: int) -> bool: ...

    def set_state(self, state: AlertState, topic: str | None) -> None: ...


class SnapshotSink(Protocol):
    """Keeps JPEGs on the device (:class:`edge.decide.snapshots.SnapshotStore`)."""

    def request(self, image: np.ndarray, sid: str, done: Callable[[str], None]) -> bool: ...


class Debouncer:
    """k-of-n hysteresis: the state flips when k of the last n inputs disagree with it."""

    __slots__ = ("k", "window", "state")

    def __init__(self, k: int, n: int, state: bool = False) -> None:
        self.k = k
        self.window: deque[bool] = deque(maxlen=n)
        self.state = state

    def feed(self, value: bool) -> bool:
        """Add one frame's value; True when the state flipped."""
        self.window.append(value)
        if sum(v != self.state for v in self.window) >= self.k:
            self.state = not self.state
            return True
        return False


@dataclass
class _ObjectState:
    member: Debouncer  # inside the zone, or on side b of the line
    known: bool = False  # a line side is learnt from the first sighting, not assumed
    last_alert: float = float("-inf")
    class_last: dict[str, float] = field(default_factory=dict)  # the clocks of class_cooldown_s


@dataclass
class _RuleState:
    rule: Rule
    level: Debouncer
    level_alert: str | None = None  # the id of the alert that turned the level on (None: suppressed)
    last_alert: float = float("-inf")
    class_last: dict[str, float] = field(default_factory=dict)  # the clocks of class_cooldown_s
    objects: dict[int, _ObjectState] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    events: int = 0


@dataclass
class _Watch:
    """A device alert about a camera (tamper, quality, drift): on or off, and since when
    its measures have been failing or passing."""

    on: bool = False
    bad_since: float | None = None
    good_since: float | None = None
    seen: Any = None  # the last reading or report judged
    streak: int = 0  # drift windows in a row past a limit


@dataclass
class _Camera:
    """A camera's tracker and rule states under one policy."""

    tracker: Tracker
    rules: list[_RuleState]
    blind_since: float | None = None
    blind_mono: float = 0.0
    blind_alerted: bool = False
    watches: dict[str, _Watch] = field(default_factory=dict)  # camera_tamper, image_quality, model_drift/{task}
    last_unsure_event: float = float("-inf")
    outcomes: dict[str, int] = field(default_factory=lambda: {"accept": 0, "reject": 0, "unsure": 0})
    crops: bool = False  # the policy joins crops on this camera: its frames wait for frame_done


@dataclass
class _Parent:
    """A whole-frame result waiting for its crops."""

    frame: "FrameInfo"
    prediction: Prediction
    crops: dict[int, dict[str, CropResult]] = field(default_factory=dict)  # detection index -> task -> answer


@dataclass
class _Pending:
    """One camera's frame in progress: its whole-frame results, in the order they came."""

    seq: int
    parents: dict[str, _Parent] = field(default_factory=dict)  # task -> result


@dataclass(frozen=True)
class _Current:
    """A policy and the per-camera state built for it, swapped as one."""

    policy: Policy
    cameras: dict[str, _Camera]


@dataclass(frozen=True)
class FrameInfo:
    """What the engine needs of a result's frame."""

    camera: str
    captured_at: float
    width: int
    height: int
    model: str
    model_version: str | None
    image: np.ndarray | None = None  # kept only for snapshots
    captured_mono: float | None = None  # monotonic capture time; None: captured_at serves for both

    @property
    def mono(self) -> float:
        """The capture time every interval (cooldown, tracker ageing) is measured on."""
        return self.captured_at if self.captured_mono is None else self.captured_mono


class DecisionEngine:
    """Turns results into outcomes and alerts under a swappable policy."""

    def __init__(
        self,
        device: str,
        topics: Callable[[str], str],
        alerts: AlertSink | None,
        *,
        policy: Policy | None = None,
        audit: Callable[[Event], None] | None = None,
        snapshots: SnapshotSink | None = None,
        model_version: Callable[[str, str], str | None] = lambda camera, task: None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        framed: bool = False,
        rng: random.Random | None = None,
    ) -> None:
        """``clock`` stamps what is published; ``monotonic`` times how long (camera health).
        ``framed``: the caller calls :meth:`frame_done` after each frame's last result.
        ``rng`` draws the random sampler's frames."""
        self._framed = framed
        self._pending: dict[str, _Pending] = {}  # camera -> its frame in progress (its executor's alone)
        self.device = device
        self._monotonic = monotonic
        self._alert_topic = topics
        self._alerts = alerts
        self._audit = audit
        self._snapshots = snapshots
        self._model_version = model_version
        self._clock = clock
        self._current: _Current | None = _Current(policy, {}) if policy is not None else None
        self._swap = threading.Lock()  # policy swaps against health polling; frames never wait on it
        self._count_lock = threading.Lock()
        self.counters: dict[str, Any] = {"alerts": {}, "cooldown_suppressed": 0, "policy_swaps": 0,
                                         "snapshots_requested": 0, "snapshots_skipped": 0, "muted": {},
                                         "controls": 0, "verified": {}, "samples": {}, "samples_capped": {},
                                         "samples_skipped": {}}
        self._rng = rng or random.Random()
        self._samples: dict[str, CameraSamples] = {}  # camera -> its samplers' caps and class counts
        self._meter = ShareMeter()
        if policy is not None:
            self._warn_sampling(policy)
        # (camera, rule) -> control, replaced whole under _control_lock, read once per frame
        self._controls: Mapping[tuple[str, str], RuleControl] = {}
        self._control_lock = threading.Lock()
        self._last: dict[tuple[str, str], Alert] = {}  # (camera, rule) -> its latest alert

    # --- policy ------------------------------------------------------------------------

    @property
    def policy(self) -> Policy | None:
        current = self._current
        return current.policy if current is not None else None

    def set_policy(self, policy: Policy) -> None:
        """Use ``policy`` from the next frame on. Rules whose definition did not change
        keep their state (an object inside a zone does not "enter" it again)."""
        with self._swap:
            cameras: dict[str, _Camera] = {}
            for camera_id, old in (self._current.cameras if self._current else {}).items():
                cam = self._new_camera(policy, camera_id)
                same_tracker = old.tracker.settings == cam.tracker.settings
                if same_tracker:
                    cam.tracker = old.tracker
                kept = {s.rule.name: s for s in old.rules}
                cam.rules = [self._kept(kept[s.rule.name], same_tracker)
                             if s.rule.name in kept and kept[s.rule.name].rule == s.rule else s for s in cam.rules]
                cam.blind_since, cam.blind_alerted, cam.outcomes = old.blind_since, old.blind_alerted, old.outcomes
                cam.blind_mono = old.blind_mono
                cam.watches = old.watches
                cameras[camera_id] = cam
            self._current = _Current(policy, cameras)  # one assignment, read once per frame
            self._count("policy_swaps")
        self._warn_sampling(policy)
        names = {r.name for r in policy.rules} | set(DEVICE_RULES)
        with self._control_lock:
            dropped = sorted({rule for (_, rule) in self._controls if rule not in names})
            if dropped:
                self._controls = {k: c for k, c in self._controls.items() if k[1] in names}
        if dropped:
            log.warning("rule controls dropped: the new policy has no such rules",
                        extra=fields(rules=dropped, policy=policy.version))

    def _warn_sampling(self, policy: Policy) -> None:
        if policy.sampling.active and self._snapshots is None:
            log.warning("the policy samples frames but no snapshot store is configured (decisions.snapshots): "
                        "none is kept", extra=fields(policy=policy.version))

    @staticmethod
    def _kept(state: _RuleState, same_tracker: bool) -> _RuleState:
        """A rule's state carried into a new policy; a new tracker numbers its objects
        afresh, so the per-object state of the old ids must not follow (a recycled id would
        inherit another object's side of a line)."""
        if same_tracker:
            return state
        return replace(state, objects={})

    def _new_camera(self, policy: Policy, camera: str) -> _Camera:
        t = policy.tracker
        tracker = Tracker(TrackerSettings(t.iou, t.max_distance, t.lost_after_s, t.min_hits))
        rules = [_RuleState(r, Debouncer(r.debounce.k, r.debounce.n)) for r in policy.rules
                 if not r.cameras or camera in r.cameras]
        return _Camera(tracker, rules, crops=needs_crops(policy, camera))

    def _camera(self, current: _Current, camera: str) -> _Camera:
        cam = current.cameras.get(camera)
        if cam is None:
            with self._swap:
                cam = current.cameras.setdefault(camera, self._new_camera(current.policy, camera))
        return cam

    # --- frames --------------------------------------------------------------------------

    def __call__(self, result: Result) -> None:
        """Scheduler sink: one task's result on one frame. A crop's result joins its parent's
        (when the policy uses crops and the frame is still in progress), else is left out."""
        current = self._current
        if current is None:
            return
        camera, seq = result.frame.camera, result.frame.seq
        if result.crop is not None:
            pending = self._pending.get(camera)
            parent = pending.parents.get(result.parent[0]) if pending is not None and pending.seq == seq \
                and result.parent is not None else None
            if parent is not None:
                parent.crops.setdefault(result.parent[1], {})[result.task] = CropResult.of(  # type: ignore[index]
                    result.task, result.prediction)
            return
        h, w = result.frame.image.shape[:2]
        frame = FrameInfo(camera, result.frame.captured_at, w, h, result.model,
                          self._model_version(camera, result.task), result.frame.image,
                          result.frame.captured_mono)
        if self._framed and self._camera(current, camera).crops:
            pending = self._pending.get(camera)
            if pending is not None and pending.seq != seq:  # a frame never said done: judge it as it is
                self.frame_done(camera, pending.seq)
                pending = None
            if pending is None:
                pending = self._pending[camera] = _Pending(seq)
            pending.parents[result.task] = _Parent(frame, result.prediction)
            return
        self.observe(frame, result.prediction)

    def frame_done(self, camera: str, seq: int) -> None:
        """Every result of frame ``seq`` of ``camera`` is in: judge the results that waited
        for their crops (scheduler ``on_frame_done``)."""
        pending = self._pending.get(camera)
        if pending is None or pending.seq != seq:
            return
        del self._pending[camera]
        for parent in pending.parents.values():
            self.observe(parent.frame, parent.prediction, parent.crops)

    def observe(self, frame: FrameInfo, prediction: Prediction,
                crops: Mapping[int, Mapping[str, CropResult]] | None = None) -> list[Alert]:
        """Evaluate one frame under the policy in force; returns the alerts it raised
        (already handed to the alert sink). Does nothing without a policy. ``crops``: per
        detection (its index), what each trigger task answered on its crop."""
        current = self._current
        if current is None:
            return []
        policy = current.policy
        cam = self._camera(current, frame.camera)
        observations = self._observations(policy, frame, prediction, crops or {})
        for obs in observations:
            cam.outcomes[obs.outcome] += 1
        if any(o.outcome == "unsure" for o in observations):
            self._unsure(policy, cam, frame, observations)
        if policy.sampling.active and self._snapshots is not None and frame.image is not None:
            self._sample(policy, frame, observations)
        segmap = prediction.segmap
        # "accept" is below a class's accept_at: noise, not an object worth an id; a
        # segmentation has no objects, and must not age the tracker's
        tracks, lost = (cam.tracker.update([o for o in observations if o.outcome != "accept"], frame.mono)
                        if segmap is None else ([], []))
        raised: list[Alert] = []
        controls = self._controls
        for i, state in enumerate(cam.rules):
            if (state.rule.when.min_share is not None) != (segmap is not None):
                continue  # share rules judge segmentations; the others, boxes and classes
            control = controls.get((frame.camera, state.rule.name)) if controls else None
            if control is not None and not control.enabled:
                self._disabled(policy, cam, i, frame)
                continue
            raised.extend(self._evaluate(policy, state, frame, observations, tracks, lost) if segmap is None
                          else self._shares(policy, state, frame, segmap))
        return raised

    def _disabled(self, policy: Policy, cam: _Camera, i: int, frame: FrameInfo) -> None:
        """A disabled rule starts afresh when enabled again; a retained state that was on
        is turned off, since the rule no longer watches (on the executor: it owns the camera)."""
        state = cam.rules[i]
        if state.events == 0 and not state.level.window and not state.objects:
            return  # already fresh
        if state.rule.state and state.level.state:
            self._publish_state(policy, frame.camera, state.rule, False, frame.captured_at, None)
        cam.rules[i] = _RuleState(state.rule, Debouncer(state.rule.debounce.k, state.rule.debounce.n))

    def _observations(self, policy: Policy, frame: FrameInfo, prediction: Prediction,
                      crops: Mapping[int, Mapping[str, CropResult]]) -> list[Observation]:
        anchor_at = policy.tracker.anchor
        excludes = [z.polygon for z in policy.zones.values() if z.mode == "exclude"]
        out = []
        if prediction.detections:
            for i, det in enumerate(prediction.detections):
                if not all(map(math.isfinite, (det.score, *det.box))):
                    continue  # a broken model's NaN is no observation, and no alert could carry it
                x1, y1, x2, y2 = det.box
                box = (x1 / frame.width, y1 / frame.height, x2 / frame.width, y2 / frame.height)
                limits = policy.thresholds(det.label)
                if area(box) < limits.min_area:
                    continue
                if excludes and any(inside(anchor(box, anchor_at), z) for z in excludes):
                    continue
                answers = crops.get(i, NO_CROPS)
                outcome = limits.outcome(det.score)
                verifier = policy.verifiers.get(det.label) if outcome == "unsure" else None
                if verifier is not None:
                    verdict = settle(verifier, answers)
                    if verdict is not None:
                        outcome = verdict
                        self._count("verified", "confirmed" if verdict == "reject" else "dismissed")
                out.append(Observation(det.label, det.score, box, outcome, answers))
        elif prediction.classes and math.isfinite(prediction.classes[0].score):
            top = prediction.classes[0]  # a classifier speaks for the whole frame: its top class
            out.append(Observation(top.label, top.score, (0.0, 0.0, 1.0, 1.0), policy.outcome(top.label, top.score)))
        return out

    # --- rules ---------------------------------------------------------------------------

    def _evaluate(self, policy: Policy, state: _RuleState, frame: FrameInfo, observations: list[Observation],
                  tracks: list[Track], lost: list[Track]) -> Iterable[Alert]:
        when = state.rule.when
        if when.event in ("present", "every"):
            return self._level(policy, state, frame, self._matching(policy, state.rule, observations, tracks))
        return self._objects(policy, state, frame, [t for t in tracks if t.seen_now and self._wanted(state.rule, t)],
                             lost)

    def _shares(self, policy: Policy, state: _RuleState, frame: FrameInfo, segmap: SegmentMap) -> list[Alert]:
        """A ``min_share`` rule on one segmentation: a level, on while its classes cover enough
        of its zone; the alert's label is the class covering most, its confidence the share."""
        when = state.rule.when
        if not any(c in segmap.labels for c in when.classes):
            return []  # another segmentation model's result (one camera may run two): not this rule's to judge
        zone = policy.zones[when.zone].polygon if when.zone else None
        excludes = [z.polygon for z in policy.zones.values() if z.mode == "exclude"]
        share, label = self._meter.share(segmap, when.classes, zone, excludes)
        held = share >= (when.min_share or 0.0)
        matching = [Observation(label, share, bounds(zone), "reject")] if held else []
        return self._level(policy, state, frame, matching, values={"share": round(share, 4)})

    def _wanted(self, rule: Rule, obj: Observation | Track) -> bool:
        when = rule.when
        return ((not when.classes or obj.label in when.classes) and obj.outcome in when.outcomes
                and (when.crop is None or crop_match(when.crop, obj.crops) is not None))

    @staticmethod
    def _crop_answer(rule: Rule, obj: Any) -> tuple[str, float] | None:
        """A crop rule's answer on the object, the one that made the rule want it."""
        return crop_match(rule.when.crop, obj.crops) if rule.when.crop is not None and obj is not None else None

    def _cooled_class(self, rule: Rule, obj: Any) -> str | None:
        """The class whose own clock spaces this alert, or None: the rule's clock does."""
        if not rule.class_cooldown_s or obj is None:
            return None
        answer = self._crop_answer(rule, obj)
        label = rule.alert_class(obj.label, answer[0] if answer else None)
        return label if label in rule.class_cooldown_s else None

    def _matching(self, policy: Policy, rule: Rule, observations: list[Observation],
                  tracks: list[Track]) -> list[Observation | Track]:
        when = rule.when
        pool: list[Any] = ([t for t in tracks if t.seen_now and t.age_s >= when.min_present_s]
                           if when.tracked else observations)
        zone = policy.zones[when.zone].polygon if when.zone else None
        at = policy.tracker.anchor
        return [o for o in pool if self._wanted(rule, o) and (zone is None or inside(anchor(o.box, at), zone))]

    def _level(self, policy: Policy, state: _RuleState, frame: FrameInfo, matching: list[Any],
               values: dict[str, float] | None = None) -> list[Alert]:
        rule = state.rule
        holds = len(matching) >= rule.when.min_count
        flipped = state.level.feed(holds)
        best = max(matching, key=lambda o: o.score, default=None)
        alerts: list[Alert] = []
        if rule.when.event == "every" and rule.class_cooldown_s and state.level.state:
            # each class alerts on its own clock: the best object of each
            by_class: dict[str | None, list[Any]] = {}
            for o in sorted(matching, key=lambda o: -o.score):
                by_class.setdefault(self._cooled_class(rule, o), []).append(o)
            for group in by_class.values():
                if self._cool(state, frame.mono, group[0]):
                    alerts.append(self._raise(policy, state, frame, "every", group[0], count=len(group),
                                              values=values))
        elif rule.when.event == "every":
            if state.level.state and self._cool(state, frame.mono, best):
                alerts.append(self._raise(policy, state, frame, "every", best, count=len(matching), values=values))
        elif flipped and state.level.state:
            if self._cool(state, frame.mono, best):
                alert = self._raise(policy, state, frame, "present", best, count=len(matching), on=True,
                                    values=values)
                state.level_alert = alert.id
                alerts.append(alert)
            else:
                state.level_alert = None
        elif flipped and state.level_alert is not None:  # a cleared level is news only if its start was
            alerts.append(self._raise(policy, state, frame, "cleared", None, count=len(matching), on=False,
                                      values=values))
            state.level_alert = None
        if flipped and rule.state:
            self._publish_state(policy, frame.camera, rule, state.level.state, frame.captured_at,
                                alerts[-1].id if alerts else None)
        return alerts

    def _objects(self, policy: Policy, state: _RuleState, frame: FrameInfo, tracks: list[Track],
                 lost: list[Track]) -> list[Alert]:
        rule, when = state.rule, state.rule.when
        at = policy.tracker.anchor
        alerts: list[Alert] = []
        for track in tracks:
            obj = state.objects.get(track.id)
            if obj is None:
                obj = state.objects[track.id] = _ObjectState(Debouncer(rule.debounce.k, rule.debounce.n))
            point = anchor(track.box, at)
            if when.event == "crossed":
                line = policy.lines[when.line]  # type: ignore[index]
                s = side(point, line.start, line.end)
                if s == 0:
                    continue
                on_b = s < 0
                if not obj.known:  # first sighting: learn the side, nothing crossed yet
                    obj.member.state, obj.known = on_b, True
                    obj.member.window.clear()
                    continue
                if obj.member.feed(on_b) and within_segment(point, line.start, line.end, margin=0.05):
                    direction = "a_to_b" if on_b else "b_to_a"
                    if when.direction in ("any", direction):
                        alert = self._object_alert(policy, state, obj, frame, "crossed", track, direction=direction)
                        if alert is not None:
                            alerts.append(alert)
            else:
                zone = policy.zones[when.zone].polygon  # type: ignore[index]
                if obj.member.feed(inside(point, zone)):
                    event = "entered" if obj.member.state else "left"
                    if event == when.event:
                        alert = self._object_alert(policy, state, obj, frame, event, track)
                        if alert is not None:
                            alerts.append(alert)
        for track in lost:  # an object that vanishes inside a zone has left it
            obj = state.objects.pop(track.id, None)
            if obj is not None and when.event == "left" and obj.member.state:
                alert = self._object_alert(policy, state, obj, frame, "left", track, detail="lost")
                if alert is not None:
                    alerts.append(alert)
        return alerts

    def _object_alert(self, policy: Policy, state: _RuleState, obj: _ObjectState, frame: FrameInfo, event: str,
                      track: Track, **extra: Any) -> Alert | None:
        label = self._cooled_class(state.rule, track)
        last = obj.last_alert if label is None else obj.class_last.get(label, float("-inf"))
        cooldown = state.rule.cooldown_s if label is None else state.rule.class_cooldown_s[label]
        if frame.mono - last < cooldown:
            self._count("cooldown_suppressed")
            return None
        if label is None:
            obj.last_alert = frame.mono
        else:
            obj.class_last[label] = frame.mono
        return self._raise(policy, state, frame, event, track, **extra)

    def _cool(self, state: _RuleState, t: float, obj: Any = None) -> bool:
        label = self._cooled_class(state.rule, obj)
        if label is None:
            if t - state.last_alert < state.rule.cooldown_s:
                self._count("cooldown_suppressed")
                return False
            state.last_alert = t
            return True
        if t - state.class_last.get(label, float("-inf")) < state.rule.class_cooldown_s[label]:
            self._count("cooldown_suppressed")
            return False
        state.class_last[label] = t
        return True

    # --- alerts --------------------------------------------------------------------------

    def _raise(self, policy: Policy, state: _RuleState, frame: FrameInfo, event: str, obj: Any, *,
               count: int | None = None, on: bool | None = None, direction: str | None = None,
               detail: str | None = None, values: dict[str, float] | None = None) -> Alert:
        rule = state.rule
        if obj is not None and event != "cleared":
            state.counts[obj.label] = state.counts.get(obj.label, 0) + 1
            state.events += 1
        snapshot = new_id() if rule.snapshot and self._snapshots is not None and frame.image is not None else None
        answer = self._crop_answer(rule, obj) if event != "cleared" else None
        crop = CropAnswer(task=rule.when.crop.task, label=answer[0], score=round(answer[1], 4)) \
            if answer is not None and rule.when.crop is not None else None
        alert = Alert(
            v=1, id=new_id(), device=self.device, camera=frame.camera, rule=rule.name, event=event, state=on,
            label=getattr(obj, "label", None), confidence=round(obj.score, 4) if obj is not None else None,
            box=tuple(round(v, 4) for v in obj.box) if obj is not None else None,
            zone=rule.when.zone, line=rule.when.line, direction=direction,
            track=obj.id if isinstance(obj, Track) else None,
            count=count if count is not None else state.events, counts=dict(state.counts), detail=detail,
            captured_at=frame.captured_at, published_at=frame.captured_at, model=frame.model,
            model_version=frame.model_version, policy_version=policy.version, snapshot=snapshot, crop=crop,
            values=values or {},
        )
        sent = self._send(alert, rule.topic, rule.expiry_s)
        # the audit row waits for the snapshot's hash; the alert itself never does
        if snapshot is None or not self._snapshot(frame.image, snapshot,
                                                  lambda sha: self._record(alert, rule.topic, sent, sha)):
            self._record(alert, rule.topic, sent)
        return alert

    def _send(self, alert: Alert, topic: str | None, expiry_s: int) -> bool:
        self._last[(alert.camera, alert.rule)] = alert
        control = self._controls.get((alert.camera, alert.rule))
        muted = control is not None and control.muted(self._clock())
        if muted:
            self._count("muted", alert.rule)
            sent = False
        else:
            sent = self._alerts.submit(alert, topic, expiry_s) if self._alerts is not None else False
        self._count("alerts", alert.rule)
        log.info("alert", extra=fields(rule=alert.rule, camera=alert.camera, alert_event=alert.event,
                                       label=alert.label, track=alert.track, sent=sent, muted=muted))
        return sent

    def _record(self, alert: Alert, topic: str | None, sent: bool, snapshot_sha256: str | None = None) -> None:
        if self._audit is None:
            return
        detail = {k: v for k, v in alert.model_dump(exclude={"v", "device", "camera", "captured_at", "rule"}).items()
                  if v not in (None, {}, [])}
        if snapshot_sha256 is not None:
            detail["snapshot_sha256"] = snapshot_sha256
        control = self._controls.get((alert.camera, alert.rule))
        if not sent and control is not None and control.muted(self._clock()):
            detail["muted"] = True
        self._audit(alert_audit(alert.camera, alert.captured_at, alert.rule,
                                topic or self._alert_topic(alert.camera), sent, **detail))

    def _count(self, key: str, sub: str | None = None) -> None:
        with self._count_lock:  # executors of different cameras count at once
            if sub is None:
                self.counters[key] += 1
            else:
                self.counters[key][sub] = self.counters[key].get(sub, 0) + 1

    def _publish_state(self, policy: Policy, camera: str, rule: Rule, on: bool, since: float,
                       alert: str | None) -> None:
        if self._alerts is not None:
            self._alerts.set_state(AlertState(v=1, device=self.device, camera=camera, rule=rule.name, on=on,
                                              since=since, alert=alert, policy_version=policy.version), None)

    def _unsure(self, policy: Policy, cam: _Camera, frame: FrameInfo, observations: list[Observation]) -> None:
        if self._audit is None or frame.mono - cam.last_unsure_event < UNSURE_EVENT_INTERVAL_S:
            return
        cam.last_unsure_event = frame.mono
        unsure = max((o for o in observations if o.outcome == "unsure"), key=lambda o: o.score)
        unsure_count = sum(o.outcome == "unsure" for o in observations)
        audit = self._audit

        def record(snapshot: str | None = None, sha256: str | None = None) -> None:
            extra = {"snapshot": snapshot, "snapshot_sha256": sha256} if snapshot else {}
            audit(decision(frame.camera, frame.captured_at, frame.model, "unsure", unsure.label, unsure.score,
                           unsure=unsure_count, policy_version=policy.version, model_version=frame.model_version,
                           box=[round(v, 4) for v in unsure.box], **extra))

        if policy.snapshot_unsure and self._snapshots is not None and frame.image is not None:
            sid = new_id()
            if self._snapshot(frame.image, sid, lambda sha: record(sid, sha)):
                return
        record()

    def _sample(self, policy: Policy, frame: FrameInfo, observations: list[Observation]) -> None:
        """Keep the frame for review when a sampler wants it and its caps have room."""
        cam = self._samples.get(frame.camera) or self._samples.setdefault(frame.camera, CameraSamples())

        def thresholds(label: str) -> tuple[float, float]:
            t = policy.thresholds(label)
            return t.accept_at, t.reject_at

        chosen = pick(policy.sampling, cam, observations, thresholds, self._rng, frame.mono)
        if chosen is None:
            return
        for reason in chosen.capped:
            self._count("samples_capped", reason)
        if not chosen.reasons:
            return
        sid = new_id()
        assert frame.image is not None
        if not self._snapshot(frame.image, sid, lambda sha: self._record_sample(policy, frame, chosen, sid, sha)):
            for reason in chosen.reasons:
                self._count("samples_skipped", reason)
            return
        take(cam, chosen.reasons, frame.mono)
        for reason in chosen.reasons:
            self._count("samples", reason)

    def _record_sample(self, policy: Policy, frame: FrameInfo, chosen: Pick, sid: str, sha256: str) -> None:
        if self._audit is None:
            return
        detail: dict[str, Any] = {"policy_version": policy.version}
        o = chosen.obs
        if o is not None:
            detail.update(label=o.label, score=round(o.score, 4), outcome=o.outcome, box=[round(v, 4) for v in o.box])
        if chosen.threshold is not None:
            detail["threshold"] = chosen.threshold
        self._audit(sample(frame.camera, frame.captured_at, frame.model, chosen.reasons, sid, sha256, **detail))

    def _snapshot(self, image: np.ndarray, sid: str, done: Callable[[str], None]) -> bool:
        taken = self._snapshots is not None and self._snapshots.request(image, sid, done)
        self._count("snapshots_requested" if taken else "snapshots_skipped")
        return taken

    # --- camera health -----------------------------------------------------------------

    def poll_health(self, states: Mapping[str, str], now: float | None = None) -> list[Alert]:
        """Feed each camera's capture state; alerts when one has been blind long enough,
        and again when it sees again."""
        current = self._current
        if current is None or not current.policy.camera_health.enabled:
            return []
        policy = current.policy
        spec = policy.camera_health
        mono = self._monotonic() if now is None else now  # how long: monotonic; since when: wall
        now = self._clock() if now is None else now
        alerts = []
        for camera, state in states.items():
            cam = self._camera(current, camera)
            blind = state in spec.states
            if blind and cam.blind_since is None:
                cam.blind_since, cam.blind_mono = now, mono
            elif not blind:
                if cam.blind_alerted:
                    alerts.append(self._device_alert(policy, camera, "camera_health", False, now, spec.expiry_s,
                                                      event="camera_restored", detail=state))
                cam.blind_since, cam.blind_alerted = None, False
            if blind and not cam.blind_alerted and mono - cam.blind_mono >= spec.after_s:
                cam.blind_alerted = True
                alerts.append(self._device_alert(policy, camera, "camera_health", True, cam.blind_since, spec.expiry_s,
                                                  event="camera_blind", detail=state))
        return alerts

    # --- the picture and the results (edge/observe) ------------------------------------------

    def poll_observe(self, snapshot: ObserveSnapshot) -> list[Alert]:
        """Judge each camera's newest quality reading and drift window against the policy:
        ``camera_tamper`` / ``image_quality`` once a measure has failed for ``hold_s``,
        ``model_drift`` after ``windows`` windows past a limit; each cleared on recovery."""
        current = self._current
        if current is None:
            return []
        policy = current.policy
        alerts: list[Alert] = []
        for camera, obs in snapshot.cameras.items():
            cam = self._camera(current, camera)
            if obs.quality is not None and policy.image_quality.enabled:
                alerts.extend(self._judge_quality(policy, camera, cam, obs.quality))
            if policy.drift.enabled:
                for task, report in obs.drift.items():
                    alerts.extend(self._judge_drift(policy, camera, cam, task, report))
        return alerts

    def _judge_quality(self, policy: Policy, camera: str, cam: _Camera, reading: QualityReading) -> list[Alert]:
        spec = policy.image_quality
        tamper_w = cam.watches.setdefault("camera_tamper", _Watch())
        if tamper_w.seen is reading:
            return []
        local = time.localtime(reading.at)
        profile, tamper, quality = spec.limits(local.tm_hour * 60 + local.tm_min)
        values = reading.values()
        alerts = []
        for rule, limits in (("camera_tamper", tamper), ("image_quality", quality)):
            watch = cam.watches.setdefault(rule, _Watch())
            watch.seen = reading
            failing = limits.failing(values)
            # a tampered camera also has a poor picture: one alert says it
            quiet = rule == "image_quality" and tamper_w.on and not watch.on
            change = self._hold(watch, bool(failing), reading.at, spec.hold_s, spec.clear_s)
            if change is not None and not quiet:
                watch.on = change
                alerts.append(self._device_alert(
                    policy, camera, rule, change, reading.at, spec.expiry_s,
                    detail=",".join(failing) if change else None, values=values, profile=profile))
            elif change is not None:
                watch.bad_since = None  # raise it later if it outlasts the tamper
        return alerts

    @staticmethod
    def _hold(watch: _Watch, failing: bool, at: float, hold_s: float, clear_s: float) -> bool | None:
        """The watch's new state once the measures failed (or passed) long enough, else None."""
        if failing:
            watch.good_since = None
            watch.bad_since = at if watch.bad_since is None else watch.bad_since
            return True if not watch.on and at - watch.bad_since >= hold_s else None
        watch.bad_since = None
        watch.good_since = at if watch.good_since is None else watch.good_since
        return False if watch.on and at - watch.good_since >= clear_s else None

    def _judge_drift(self, policy: Policy, camera: str, cam: _Camera, task: str, report: DriftReport) -> list[Alert]:
        watch = cam.watches.setdefault(f"model_drift/{task}", _Watch())
        if watch.seen is report or report.baseline == "none" or report.learned:
            return []
        watch.seen = report
        spec = policy.drift
        failing = spec.failing(report.judged())
        watch.streak = watch.streak + 1 if failing else 0
        change = True if failing and not watch.on and watch.streak >= spec.windows else (
            False if not failing and watch.on else None)
        if change is None:
            return []
        watch.on = change
        values = {k: v for k, v in report.judged().items() if k != "detections"}
        return [self._device_alert(policy, camera, "model_drift", change, report.since, spec.expiry_s,
                                   detail=",".join(failing) if change else None, values=values,
                                   model=report.model, model_version=report.model_version, task=task)]

    def _device_alert(self, policy: Policy, camera: str, rule: str, on: bool, since: float, expiry_s: int, *,
                      event: str | None = None, profile: str | None = None, **extra: Any) -> Alert:
        """An alert the device raises about a camera (by default event ``rule`` when on,
        ``cleared`` when off), its audit row and the rule's retained state."""
        alert = Alert(v=1, id=new_id(), device=self.device, camera=camera, rule=rule,
                      event=event or (rule if on else "cleared"), state=on, captured_at=since,
                      published_at=self._clock(), policy_version=policy.version, **extra)
        self._record(alert, None, self._send(alert, None, expiry_s))
        if self._alerts is not None:
            self._alerts.set_state(AlertState(v=1, device=self.device, camera=camera, rule=rule, on=on, since=since,
                                              alert=alert.id, policy_version=policy.version), None)
        if on and rule != "camera_health":  # the capture thread has said why already
            log.warning(rule.replace("_", " "), extra=fields(camera=camera, detail=alert.detail, values=alert.values,
                                                             profile=profile))
        return alert

    # --- controls from the line (edge/comms) ----------------------------------------------

    def rules_of(self, camera: str) -> list[str]:
        """The names of the rules the policy in force applies to ``camera``."""
        current = self._current
        if current is None:
            return []
        return [r.name for r in current.policy.rules if not r.cameras or camera in r.cameras]

    def control(self, camera: str, rule: str, op: str, *, minutes: float | None = None,
                alert: str | None = None) -> RuleControl:
        """Apply one of ``contract.COMMAND_OPS`` to ``rule`` on ``camera`` from the next
        frame on; returns the rule's control now, or raises ControlError. The caller
        has checked that ``camera`` is one of the device's."""
        if op not in COMMAND_OPS:
            raise ControlError("not_controllable", f"unknown op {op!r}")
        device_rule = rule in DEVICE_RULES
        if not device_rule and rule not in self.rules_of(camera):
            raise ControlError("unknown_rule", f"the policy in force has no rule {rule!r} for camera {camera!r}")
        if device_rule and op in ("enable", "disable"):
            raise ControlError("not_controllable", f"{rule} is the device's own alert: mute it instead")
        now = self._clock()
        with self._control_lock:
            old = self._controls.get((camera, rule), RuleControl())
            if op == "enable":
                new = replace(old, enabled=True)
            elif op == "disable":
                new = replace(old, enabled=False)
            elif op == "mute":
                new = replace(old, muted_until=now + float(minutes or 0) * 60)
            elif op == "unmute":
                new = replace(old, muted_until=None)
            else:
                latest = self._last.get((camera, rule))
                if latest is None:
                    raise ControlError("nothing_to_ack", f"{rule!r} has raised no alert on {camera!r}")
                if alert is not None and alert != latest.id:
                    raise ControlError("stale_alert", f"{alert} is not {rule!r}'s latest alert ({latest.id})")
                new = replace(old, acked=latest.id)
            self._controls = {**self._controls, (camera, rule): new}
        self._count("controls")
        return new

    def controls(self) -> dict[tuple[str, str], RuleControl]:
        """Every (camera, rule) the line has a control on."""
        return dict(self._controls)

    def restore_controls(self, controls: Mapping[tuple[str, str], RuleControl]) -> list[tuple[str, str]]:
        """Controls kept from an earlier run (``edge.comms``' state file); those of rules
        the policy in force lacks are left out and returned."""
        current = self._current
        names = ({r.name for r in current.policy.rules} if current is not None else set()) | set(DEVICE_RULES)
        kept = {k: c for k, c in controls.items() if k[1] in names}
        with self._control_lock:
            self._controls = {**kept, **self._controls}
        return [k for k in controls if k not in kept]

    def status(self, camera: str) -> list[RuleStatus]:
        """Every rule on ``camera`` with its state, count and controls, for the line;
        read from another thread (each value is read whole)."""
        current = self._current
        cam = current.cameras.get(camera) if current is not None else None
        controls = self._controls
        out = []
        states = {s.rule.name: s for s in cam.rules} if cam is not None else {}
        for name in self.rules_of(camera):
            s = states.get(name)
            rule = s.rule if s is not None else next(r for r in current.policy.rules if r.name == name)
            level = s.level.state if s is not None else False
            out.append(self._status(camera, name, controls, retained=rule.state, events=s.events if s else 0,
                                    level=level if rule.when.event in ("present", "every") else None))
        on = self.device_alerts()
        for name in DEVICE_RULES:  # always listed: what a line exports keeps one shape
            out.append(self._status(camera, name, controls, retained=True, events=0,
                                    level=on.get((camera, name), False), device_rule=True))
        return out

    def _status(self, camera: str, rule: str, controls: Mapping[tuple[str, str], RuleControl], *,
                retained: bool, events: int, level: bool | None, device_rule: bool = False) -> RuleStatus:
        c = controls.get((camera, rule), RuleControl())
        latest = self._last.get((camera, rule))
        now = self._clock()
        return RuleStatus(rule, level, events, c.enabled, c.muted_until if c.muted(now) else None,
                          latest is not None and c.acked == latest.id, retained, device_rule)

    def last_alert(self, camera: str) -> Alert | None:
        """The camera's latest alert, of any rule (sent or muted)."""
        latest = [a for (c, _), a in list(self._last.items()) if c == camera]
        return max(latest, key=lambda a: a.id) if latest else None

    def camera_ok(self, camera: str) -> bool:
        """Neither blind nor tampered nor a poor picture now: its results may become a baseline."""
        current = self._current
        cam = current.cameras.get(camera) if current is not None else None
        if cam is None:
            return True
        return cam.blind_since is None and not any(
            w.on for rule, w in cam.watches.items() if rule in ("camera_tamper", "image_quality"))

    def device_alerts(self) -> dict[tuple[str, str], bool]:
        """(camera, rule) -> on, for camera_health, camera_tamper, image_quality and model_drift."""
        current = self._current
        out: dict[tuple[str, str], bool] = {}
        for camera, cam in (current.cameras.items() if current is not None else ()):
            out[(camera, "camera_health")] = cam.blind_alerted
            for key, watch in list(cam.watches.items()):
                rule = key.split("/", 1)[0]
                out[(camera, rule)] = out.get((camera, rule), False) or watch.on
        return out

    def tracks(self, camera: str) -> list[Track]:
        """The camera's confirmed objects, as of its last frame."""
        current = self._current
        cam = current.cameras.get(camera) if current is not None else None
        return [t for t in cam.tracker.tracks.values() if t.confirmed] if cam is not None else []

    def stats(self) -> dict[str, Any]:
        """Counters for the stats line."""
        current = self._current
        cameras = current.cameras if current is not None else {}
        return {"policy": current.policy.version if current is not None else None,
                "outcomes": {c: dict(cam.outcomes) for c, cam in cameras.items()},
                "tracks": {c: len(cam.tracker.tracks) for c, cam in cameras.items()},
                **{k: (dict(v) if isinstance(v, dict) else v) for k, v in self.counters.items()}}
