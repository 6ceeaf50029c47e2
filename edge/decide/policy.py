"""The decision policy: thresholds, zones, lines, tracker settings and alert rules.

A policy is a versioned YAML document kept apart from the model, so engineers tune a
line without touching or redeploying a model, and can roll a bad change back on its
own. It is validated as a whole; a broken one is refused with the key that is wrong
and the policy in force stays. Coordinates are normalised to the frame (0..1, x right,
y down), so one policy fits a camera at any resolution.

Outcomes: a score at or above a class's ``reject_at`` is **reject**, below its
``accept_at`` is **accept**, and the band between is **unsure**. For an inspection
model "reject" is a rejected part; for a presence model (a person in a robot cell) it
reads "the class is confidently there".

Cascades: a rule may also ask what a trigger task (one run on the crops of a detection)
said about the object (``when.crop``), and ``verifiers`` let a second model settle a
class's unsure outcomes. Which tasks a camera runs is the device config's business, so
those names are checked against a device by :func:`edge.decide.cascade.check_device`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Collection, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edge.config import format_validation_error
from edge.core.errors import EdgeError

from .sampling import Sampling

OUTCOMES = ("accept", "reject", "unsure")
_ID = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"

Coord = Annotated[float, Field(ge=0, le=1)]
Point = tuple[Coord, Coord]
Name = Annotated[str, Field(pattern=_ID)]


class PolicyError(EdgeError):
    """A policy document that cannot be used; the one in force stays."""

    exit_code = 2


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Thresholds(_Strict):
    accept_at: float = Field(default=0.3, ge=0, le=1, description="scores below are accept")
    reject_at: float = Field(default=0.5, ge=0, le=1, description="scores at or above are reject")
    min_area: float = Field(default=0.0, ge=0, le=1, description="boxes smaller (fraction of the frame) are ignored")

    @model_validator(mode="after")
    def _ordered(self) -> "Thresholds":
        if self.accept_at > self.reject_at:
            raise ValueError(f"accept_at ({self.accept_at}) must not be above reject_at ({self.reject_at})")
        return self

    def outcome(self, score: float) -> str:
        return "reject" if score >= self.reject_at else "accept" if score < self.accept_at else "unsure"


class Zone(_Strict):
    polygon: list[Point] = Field(min_length=3)
    mode: Literal["include", "exclude"] = Field(
        default="include", description="exclude: detections whose anchor is inside are ignored everywhere")


class Line(_Strict):
    """A counting line; side "a" is left of someone walking from start to end."""

    start: Point
    end: Point

    @model_validator(mode="after")
    def _length(self) -> "Line":
        if self.start == self.end:
            raise ValueError("start and end must differ")
        return self


class TrackerSpec(_Strict):
    iou: float = Field(default=0.3, gt=0, le=1)
    max_distance: float = Field(default=0.1, ge=0, le=1, description="centre distance for boxes that stop overlapping")
    lost_after_s: float = Field(default=1.0, gt=0)
    min_hits: int = Field(default=2, ge=1, description="frames before a box becomes an object")
    anchor: Literal["bottom", "center"] = Field(
        default="bottom", description="the point tested against zones and lines")


class Debounce(_Strict):
    """On when the condition held in k of the last n frames; off when it failed in k of n."""

    k: int = Field(default=1, ge=1)
    n: int = Field(default=1, ge=1, le=1000)

    @model_validator(mode="after")
    def _k_le_n(self) -> "Debounce":
        if self.k > self.n:
            raise ValueError(f"k ({self.k}) must not exceed n ({self.n})")
        return self


def _one_class(data: object) -> object:
    """``class: X`` is what people write for one class; it means ``classes: [X]``."""
    if isinstance(data, dict) and "class" in data:
        if "classes" in data:
            raise ValueError("class: give class or classes, not both")
        data = {("classes" if k == "class" else k): ([v] if k == "class" else v) for k, v in data.items()}
    return data


class CropCondition(_Strict):
    """What a trigger task's result on the object's crop must say: its top class (a
    classifier) or one of its detections is one of ``classes``, scored ``min_score`` or more."""

    task: Name = Field(description="a trigger task of each camera the rule applies to")
    classes: list[str] = Field(min_length=1, description="classes of that task's model")
    min_score: float = Field(default=0.0, ge=0, le=1)

    _class = model_validator(mode="before")(_one_class)


class Verifier(_Strict):
    """A second model that settles a class's unsure outcomes: its answer on the object's
    crop confirms it (the outcome becomes reject: confidently there) when its top class
    is one of ``confirm`` at ``min_score`` or more, and dismisses it (accept) otherwise.
    Without an answer (the trigger did not run: budget, cadence) it stays unsure."""

    task: Name = Field(description="a trigger task with `outcomes: [unsure]`")
    confirm: list[str] = Field(min_length=1, description="classes of the verifier's model that confirm")
    min_score: float = Field(default=0.0, ge=0, le=1)


class Condition(_Strict):
    """What a rule looks for in each frame.

    ``present``: at least ``min_count`` matching objects (in ``zone``), each there for
    ``min_present_s``: a level that turns on and off. ``every``: the same, but it
    fires on every frame it holds (a rejected part per inspected frame). ``entered`` /
    ``left``: a tracked object's anchor enters or leaves ``zone``. ``crossed``: it
    crosses ``line`` in ``direction``. With ``min_share`` (``present`` / ``every``) the rule
    reads a segmentation instead: it holds while ``classes`` cover at least that share of
    ``zone`` (or of the frame).
    """

    event: Literal["present", "every", "entered", "left", "crossed"] = "present"
    classes: list[str] = Field(default=[], description="empty: any class")
    outcomes: list[Literal["accept", "reject", "unsure"]] = Field(default=["reject"], min_length=1)
    zone: Name | None = None
    line: Name | None = None
    direction: Literal["a_to_b", "b_to_a", "any"] = "any"
    min_count: int = Field(default=1, ge=1)
    min_present_s: float = Field(default=0.0, ge=0)
    crop: CropCondition | None = Field(default=None, description="what a trigger task said about the object's crop")
    min_share: float | None = Field(default=None, gt=0, le=1, description=(
        "segmentation: holds while the classes cover at least this share of the zone (or the frame)"))

    _class = model_validator(mode="before")(_one_class)

    @model_validator(mode="after")
    def _fits_event(self) -> "Condition":
        if self.min_share is not None:
            if self.event not in ("present", "every"):
                raise ValueError(f"min_share: only for events 'present' and 'every', not {self.event!r}")
            if not self.classes:
                raise ValueError("classes: required with min_share (the classes whose share counts)")
            if self.min_count != 1 or self.min_present_s:
                raise ValueError("min_share: a share has no objects to count or time; use debounce to hold it")
            if self.crop is not None:
                raise ValueError("crop: a share has no objects whose crops a trigger task could judge")
        if self.event in ("entered", "left") and self.zone is None:
            raise ValueError(f"zone: required for event {self.event!r}")
        if self.event == "crossed" and self.line is None:
            raise ValueError("line: required for event 'crossed'")
        if self.event != "crossed" and self.line is not None:
            raise ValueError("line: only for event 'crossed'")
        return self

    @property
    def tracked(self) -> bool:
        """Whether the rule needs objects with ids, not just this frame's boxes."""
        return self.event in ("entered", "left", "crossed") or self.min_present_s > 0


class Rule(_Strict):
    name: Name
    cameras: list[str] = Field(default=[], description="empty: every camera")
    when: Condition
    debounce: Debounce = Debounce()
    cooldown_s: float = Field(default=0.0, ge=0, description="least time between two alerts of this rule")
    class_cooldown_s: dict[str, Annotated[float, Field(ge=0)]] = Field(
        default={}, description="a class listed has a cooldown clock of its own, this long (the crop's class "
                                "for a crop rule): one class's alerts never hold back another's")
    topic: str | None = Field(default=None, description="publish here instead of the camera's alert topic")
    state: bool = Field(default=False, description="keep a retained on/off state topic (present/every rules)")
    expiry_s: int = Field(default=60, ge=1, description="MQTT message expiry: a controller never acts on older alerts")
    snapshot: bool = Field(default=False, description="keep a JPEG of the alerting frame on the device")

    @field_validator("topic")
    @classmethod
    def _topic(cls, value: str | None) -> str | None:
        if value is not None and (not value or "+" in value or "#" in value or value.startswith("$")):
            raise ValueError("must be a plain topic: no wildcards, no leading '$'")
        return value

    @model_validator(mode="after")
    def _cooled_classes(self) -> "Rule":
        alerting = self.when.crop.classes if self.when.crop is not None else self.when.classes
        for label in self.class_cooldown_s:
            if alerting and label not in alerting:
                raise ValueError(f"class_cooldown_s.{label}: not a class this rule alerts on "
                                 f"({', '.join(alerting)})")
        return self

    def alert_class(self, label: str, crop_label: str | None) -> str:
        """The class an alert's cooldown is kept by: the crop's for a crop rule."""
        return crop_label if self.when.crop is not None and crop_label is not None else label


class CameraHealth(_Strict):
    """Alert when a camera's feed is blind for ``after_s`` (and clear it when it returns)."""

    enabled: bool = True
    after_s: float = Field(default=5.0, ge=0)
    states: list[Literal["stale", "frozen", "reopening", "failed"]] = ["stale", "frozen", "reopening", "failed"]
    expiry_s: int = Field(default=300, ge=1)


class QualityLimits(_Strict):
    """Bounds on the picture's measures (edge/observe/quality.py); an unset bound is not checked."""

    min_brightness: float | None = Field(default=None, ge=0, le=255, description="mean grey level")
    max_brightness: float | None = Field(default=None, ge=0, le=255)
    min_contrast: float | None = Field(default=None, ge=0, description="standard deviation of the grey levels")
    min_sharpness: float | None = Field(default=None, ge=0, description="variance of the Laplacian")
    max_flat: float | None = Field(default=None, ge=0, le=1, description="share of the frame in one grey level")

    def failing(self, values: dict[str, float]) -> list[str]:
        """The measures of ``values`` out of these bounds, in a fixed order."""
        checks = (("brightness", self.min_brightness, self.max_brightness), ("contrast", self.min_contrast, None),
                  ("sharpness", self.min_sharpness, None), ("flat", None, self.max_flat))
        return [name for name, low, high in checks if name in values and
                ((low is not None and values[name] < low) or (high is not None and values[name] > high))]


TAMPER_LIMITS = QualityLimits(min_brightness=10, max_brightness=250, min_sharpness=50, max_flat=0.9)
QUALITY_LIMITS = QualityLimits(min_brightness=35, max_brightness=235, min_contrast=12, min_sharpness=300,
                               max_flat=0.7)
_CLOCK = r"^([01][0-9]|2[0-3]):[0-5][0-9]$"


class QualityProfile(_Strict):
    """Bounds for part of the day (``start`` to ``end``, local time; may wrap past midnight);
    each bound given replaces the day's, the others stay."""

    name: Name
    start: str = Field(pattern=_CLOCK, description="HH:MM")
    end: str = Field(pattern=_CLOCK, description="HH:MM")
    tamper: dict[str, float | None] = {}
    quality: dict[str, float | None] = {}

    @model_validator(mode="after")
    def _bounds(self) -> "QualityProfile":
        for key in ("tamper", "quality"):
            for bound, value in getattr(self, key).items():
                if bound not in QualityLimits.model_fields:
                    raise ValueError(f"{key}.{bound}: unknown bound (known: {', '.join(QualityLimits.model_fields)})")
                try:
                    QualityLimits.model_validate({bound: value})
                except ValidationError as exc:
                    raise ValueError(f"{key}.{bound}: {exc.errors()[0]['msg'].lower()}") from None
        return self

    def covers(self, minute: int) -> bool:
        """Whether ``minute`` of the day (0..1439) is in this profile."""
        start, end = (int(t[:2]) * 60 + int(t[3:]) for t in (self.start, self.end))
        return start <= minute < end if start <= end else minute >= start or minute < end


class ImageQuality(_Strict):
    """``camera_tamper`` (covered, blinded, sprayed, defocused, turned to a wall) and the
    milder ``image_quality``: a measure out of bounds for ``hold_s`` raises, every measure
    back in bounds for ``clear_s`` clears. Both keep a retained state."""

    enabled: bool = True
    hold_s: float = Field(default=10.0, ge=0)
    clear_s: float = Field(default=10.0, ge=0)
    tamper: QualityLimits = TAMPER_LIMITS
    quality: QualityLimits = QUALITY_LIMITS
    profiles: list[QualityProfile] = Field(default=[], description="the first that covers the time of day wins")
    expiry_s: int = Field(default=300, ge=1)

    def limits(self, minute: int) -> tuple[str, QualityLimits, QualityLimits]:
        """The profile name, tamper and quality bounds in force at ``minute`` of the day."""
        for p in self.profiles:
            if p.covers(minute):
                return (p.name, self.tamper.model_copy(update=p.tamper) if p.tamper else self.tamper,
                        self.quality.model_copy(update=p.quality) if p.quality else self.quality)
        return "day", self.tamper, self.quality


class DriftLimits(_Strict):
    """``model_drift`` when a camera's results move away from their baseline for ``windows``
    windows in a row; cleared by a window back within every limit."""

    enabled: bool = True
    max_psi: float = Field(default=0.2, gt=0, description="population stability index of the score histogram")
    max_class_shift: float = Field(default=0.3, gt=0, description="Cohen's w of the class mix (sqrt of chi2 / n)")
    detections_ratio: tuple[float, float] = Field(default=(0.5, 2.0), description="window / baseline a frame")
    min_detections: int = Field(default=100, ge=1, description="a window with fewer is not judged on scores")
    windows: int = Field(default=1, ge=1)
    expiry_s: int = Field(default=3600, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> "DriftLimits":
        low, high = self.detections_ratio
        if not 0 <= low <= high:
            raise ValueError("detections_ratio: must be [low, high] with 0 <= low <= high")
        return self

    def failing(self, report: dict[str, float]) -> list[str]:
        """The measures of a window's report beyond these limits."""
        out = []
        if report.get("detections", 0) >= self.min_detections:
            if report.get("psi", 0.0) > self.max_psi:
                out.append("psi")
            if report.get("class_shift", 0.0) > self.max_class_shift:
                out.append("class_shift")
        ratio = report.get("detections_ratio")
        if ratio is not None and not self.detections_ratio[0] <= ratio <= self.detections_ratio[1]:
            out.append("detections_ratio")
        return out


class Policy(_Strict):
    version: str = Field(min_length=1, max_length=64)
    default: Thresholds = Thresholds()
    classes: dict[str, Thresholds] = {}
    zones: dict[Name, Zone] = {}
    lines: dict[Name, Line] = {}
    tracker: TrackerSpec = TrackerSpec()
    rules: list[Rule] = []
    camera_health: CameraHealth = CameraHealth()
    image_quality: ImageQuality = ImageQuality()
    drift: DriftLimits = DriftLimits()
    snapshot_unsure: bool = Field(default=False, description="keep a JPEG of frames with an unsure outcome")
    verifiers: dict[str, Verifier] = Field(default={}, description="class -> the model that settles its unsure outcomes")
    sampling: Sampling = Field(default=Sampling(), description="frames kept on the device for review and retraining")

    @field_validator("version", mode="before")
    @classmethod
    def _version_text(cls, value: object) -> object:
        # `version: 3` is what people write; it means the text "3"
        return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _references(self) -> "Policy":
        seen: set[str] = set()
        for i, rule in enumerate(self.rules):
            if rule.name in seen:
                raise ValueError(f"rules[{i}].name: duplicate rule {rule.name!r}")
            seen.add(rule.name)
            zone = rule.when.zone
            if zone is not None and (zone not in self.zones or self.zones[zone].mode != "include"):
                raise ValueError(f"rules[{i}].when.zone: {zone!r} is not an include zone "
                                 f"(known: {', '.join(sorted(self.zones)) or 'none'})")
            if rule.when.line is not None and rule.when.line not in self.lines:
                raise ValueError(f"rules[{i}].when.line: unknown line {rule.when.line!r} "
                                 f"(known: {', '.join(sorted(self.lines)) or 'none'})")
        return self

    def thresholds(self, label: str) -> Thresholds:
        return self.classes.get(label, self.default)

    def outcome(self, label: str, score: float) -> str:
        """accept, reject or unsure for one score of one class."""
        return self.thresholds(label).outcome(score)


def check_classes(policy: Policy, labels: Collection[str], *, model: str, source: str = "policy") -> None:
    """PolicyError naming the first class of a share rule (``min_share``) that the
    segmentation model ``model``, with ``labels``, does not have: such a rule could never hold."""
    for i, rule in enumerate(policy.rules):
        if rule.when.min_share is None:
            continue
        for j, label in enumerate(rule.when.classes):
            if label not in labels:
                known = ", ".join(list(labels)[:30]) + (", ..." if len(labels) > 30 else "")
                raise PolicyError(f"{source}: rules[{i}].when.classes[{j}]: {label!r} is not a class of "
                                  f"segmentation model {model} (known: {known or 'none'})")


def parse_policy(text: str, *, source: str = "policy") -> Policy:
    """A policy from YAML text, or PolicyError naming the offending key."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise PolicyError(f"{source}: a policy must be a mapping")
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(f"{source}: {format_validation_error(exc)}") from None


def load_policy(path: Path) -> Policy:
    """The policy in the file at ``path``, or PolicyError."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read policy: {exc.strerror or exc}") from None
    return parse_policy(text, source=str(path))
