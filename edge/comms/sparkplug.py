"""A Sparkplug B edge node (Eclipse Sparkplug 3.0): the device is the edge node, each
camera one of its devices.

Topics are ``spBv1.0/{group_id}/{verb}/{edge_node_id}[/{camera}]``. On every new MQTT
session the node publishes an NBIRTH (``seq`` 0, the ``bdSeq`` of the session's will,
``Node Control/Rebirth``) and then one DBIRTH per camera with the definition of every
metric it will ever report, each with an alias; after that only what changed goes
out, in NDATA and DDATA messages carrying aliases alone (report by exception; the
processed frame rate and the picture and drift measures only once they moved past a
deadband). ``seq`` counts every message but the death 0..255 and wraps. The NDEATH is
the session's MQTT will (QoS 1, not retained) with the same ``bdSeq``, so a host knows
the node is gone when its connection drops; a clean stop publishes it first. An NCMD
``Node Control/Rebirth`` true (or a change of the metric set, after a policy reload)
starts the births again. All births and data are QoS 0 and never retained, as the
specification says.

:class:`EdgeNode` is the protocol without a socket: it turns :class:`LineView` s into
(topic, payload) pairs and NCMD/DCMD payloads into commands, raising
:class:`SparkplugError` with a counted reason for anything it cannot take.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from google.protobuf.message import DecodeError

from edge import __version__
from edge.config import DeviceInfo, SparkplugConfig
from edge.core.contract import MAX_MUTE_MINUTES, SPARKPLUG_NAMESPACE
from edge.core.files import replace_file
from edge.core.logs import fields

from . import sparkplug_b_pb2 as pb
from .view import CameraView, LineView

log = logging.getLogger("edge.sparkplug")

NAMESPACE = SPARKPLUG_NAMESPACE
MAX_COMMAND_BYTES = 16 * 1024
REBIRTH = "Node Control/Rebirth"
BDSEQ = "bdSeq"

# Why an NCMD or DCMD was refused; counted under these names.
REASONS = ("oversized", "malformed", "empty", "unknown_metric", "not_writable", "wrong_type", "bad_value",
           "unknown_rule", "unknown_camera", "wrong_device")

# the protobuf value field of each data type used here
_FIELD = {pb.Boolean: "boolean_value", pb.String: "string_value", pb.Float: "float_value",
          pb.Double: "double_value", pb.UInt64: "long_value", pb.DateTime: "long_value"}


class SparkplugError(ValueError):
    """An NCMD/DCMD refused; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class MetricDef:
    name: str
    datatype: int
    deadband: str | None = None  # "fps" (absolute) or "ratio" (relative to the last value sent)
    writable: bool = False


@dataclass(frozen=True)
class RuleOp:
    """A DCMD write turned into a rule control (``op`` as in ``contract.COMMAND_OPS``)."""

    camera: str
    rule: str
    op: str
    minutes: float | None = None


@dataclass(frozen=True)
class Rebirth:
    """NCMD ``Node Control/Rebirth``: publish the births again."""


class SparkplugTopics:
    def __init__(self, group_id: str, edge_node_id: str) -> None:
        self.group_id = group_id
        self.edge_node_id = edge_node_id

    def node(self, verb: str) -> str:
        return f"{NAMESPACE}/{self.group_id}/{verb}/{self.edge_node_id}"

    def device(self, verb: str, device: str) -> str:
        return f"{self.node(verb)}/{device}"

    def parse(self, topic: str) -> tuple[str, str, str, str | None]:
        """(group, verb, edge node, device or None) of a Sparkplug topic, or SparkplugError."""
        parts = topic.split("/")
        if len(parts) not in (4, 5) or parts[0] != NAMESPACE:
            raise SparkplugError("wrong_device", f"{topic!r} is not a Sparkplug edge node topic")
        return parts[1], parts[2], parts[3], parts[4] if len(parts) == 5 else None


def rule_metrics(rule: str, *, level: bool, device_rule: bool) -> list[MetricDef]:
    """The metrics of one rule on a camera."""
    base = f"Rules/{rule}"
    defs = []
    if level:
        defs.append(MetricDef(f"{base}/Active", pb.Boolean))
    if not device_rule:
        defs += [MetricDef(f"{base}/Count", pb.UInt64), MetricDef(f"{base}/Enabled", pb.Boolean, writable=True)]
    return defs + [
        MetricDef(f"{base}/Muted Until", pb.DateTime),
        MetricDef(f"{base}/Mute Minutes", pb.Double, writable=True),
        MetricDef(f"{base}/Acknowledged", pb.Boolean),
        MetricDef(f"{base}/Acknowledge", pb.Boolean, writable=True),
    ]


QUALITY = (("Brightness", "brightness"), ("Contrast", "contrast"), ("Sharpness", "sharpness"), ("Flat", "flat"))
DRIFT = (("PSI", "psi"), ("Class Shift", "class_shift"), ("Detections Ratio", "detections_ratio"))


def device_metrics(cam: CameraView, *, quality: bool, drift: bool) -> list[tuple[MetricDef, Any]]:
    """Every metric of one camera with its value now (None: null)."""
    alert = cam.last_alert
    out: list[tuple[MetricDef, Any]] = [
        (MetricDef("Camera/State", pb.String), cam.state),
        (MetricDef("Camera/OK", pb.Boolean), cam.ok),
        (MetricDef("Camera/Processed FPS", pb.Float, deadband="fps"), cam.fps),
        (MetricDef("Last Alert/Id", pb.String), alert.id if alert else None),
        (MetricDef("Last Alert/Rule", pb.String), alert.rule if alert else None),
        (MetricDef("Last Alert/Event", pb.String), alert.event if alert else None),
        (MetricDef("Last Alert/Class", pb.String), alert.label if alert else None),
        (MetricDef("Last Alert/Confidence", pb.Float), alert.confidence if alert else None),
        (MetricDef("Last Alert/Time", pb.DateTime), _ms(alert.captured_at) if alert else None),
    ]
    for task, version in sorted(cam.models.items()):
        out.append((MetricDef(f"Models/{task}/Version", pb.String), version))
    for status in cam.rules:
        defs = rule_metrics(status.rule, level=status.level is not None, device_rule=status.device_rule)
        values = {"Active": status.level, "Count": status.events, "Enabled": status.enabled,
                  "Muted Until": _ms(status.muted_until) if status.muted_until else None,
                  "Mute Minutes": 0.0, "Acknowledged": status.acknowledged, "Acknowledge": False}
        out += [(d, values[d.name.rsplit("/", 1)[1]]) for d in defs]
    if quality:
        q = cam.quality
        out += [(MetricDef(f"Quality/{name}", pb.Float, deadband="ratio"), getattr(q, key) if q else None)
                for name, key in QUALITY]
    if drift:
        for task in sorted(cam.models):
            report = cam.drift.get(task)
            out += [(MetricDef(f"Drift/{task}/{name}", pb.Float, deadband="ratio"),
                     getattr(report, key) if report is not None else None) for name, key in DRIFT]
    return out


class EdgeNode:
    """The Sparkplug state of one edge node: sequence numbers, aliases, what was sent."""

    def __init__(self, cfg: SparkplugConfig, device: DeviceInfo, *, quality: bool, drift: bool) -> None:
        self.cfg = cfg
        self.device = device
        self.topics = SparkplugTopics(cfg.group_id, cfg.edge_node_id)
        self._quality = quality
        self._drift = drift
        self.bd_seq = _load_bdseq(cfg.bdseq_file)
        self._seq = 0
        self._aliases: dict[tuple[str | None, str], int] = {}
        self._defs: dict[str | None, dict[str, MetricDef]] = {}
        self._sent: dict[tuple[str | None, str], Any] = {}
        self._shape: tuple[Any, ...] | None = None
        self.counters = {"births": 0, "data": 0, "rebirths": 0}

    # --- sessions -----------------------------------------------------------------------

    def new_session(self) -> bytes:
        """The next ``bdSeq`` (kept on disk first, so a restart never reuses the one a
        late will may still carry) and the NDEATH payload the session's will carries."""
        self.bd_seq = (self.bd_seq + 1) % 256
        try:
            replace_file(self.cfg.bdseq_file, json.dumps({"bdSeq": self.bd_seq}).encode())
        except OSError as exc:  # the node still comes up; only a restart may reuse this number
            log.error("bdSeq not saved", extra=fields(path=str(self.cfg.bdseq_file), error=str(exc)))
        return self.death()

    def death(self) -> bytes:
        payload = pb.Payload(timestamp=_ms())
        _fill(payload.metrics.add(), MetricDef(BDSEQ, pb.UInt64), self.bd_seq, name=True)
        return payload.SerializeToString()

    # --- births and data ---------------------------------------------------------------

    def birth(self, view: LineView) -> list[tuple[str, bytes]]:
        """NBIRTH (seq 0) and a DBIRTH per camera, defining every metric with its alias."""
        self._seq = 0
        self._aliases.clear()
        self._defs.clear()
        self._sent.clear()
        now = _ms(view.at)
        out = [(self.topics.node("NBIRTH"), self._payload(None, self._node_metrics(view), now, birth=True))]
        for camera, cam in view.cameras.items():
            out.append((self.topics.device("DBIRTH", camera),
                        self._payload(camera, self._device_metrics(cam), now, birth=True)))
        self._shape = self._shape_of(view)
        self.counters["births"] += 1
        return out

    def data(self, view: LineView) -> list[tuple[str, bytes]]:
        """NDATA and DDATA with what changed since it was last sent; births again when the
        metric set itself changed (a policy with other rules)."""
        if self._shape is None or self._shape_of(view) != self._shape:
            if self._shape is not None:
                self.counters["rebirths"] += 1
            return self.birth(view)
        now = _ms(view.at)
        out = []
        changed = self._changed(None, self._node_metrics(view))
        if changed:
            out.append((self.topics.node("NDATA"), self._payload(None, changed, now)))
        for camera, cam in view.cameras.items():
            changed = self._changed(camera, self._device_metrics(cam))
            if changed:
                out.append((self.topics.device("DDATA", camera), self._payload(camera, changed, now)))
        self.counters["data"] += len(out)
        return out

    def _node_metrics(self, view: LineView) -> list[tuple[MetricDef, Any]]:
        d = self.device
        return [(MetricDef(BDSEQ, pb.UInt64), self.bd_seq),
                (MetricDef(REBIRTH, pb.Boolean, writable=True), False),
                (MetricDef("Properties/Device", pb.String), d.id),
                (MetricDef("Properties/Site", pb.String), d.site),
                (MetricDef("Properties/Line", pb.String), d.line),
                (MetricDef("Properties/Software Version", pb.String), __version__),
                (MetricDef("Policy/Version", pb.String), view.policy_version)]

    def _device_metrics(self, cam: CameraView) -> list[tuple[MetricDef, Any]]:
        return device_metrics(cam, quality=self._quality, drift=self._drift)

    def _shape_of(self, view: LineView) -> tuple[Any, ...]:
        return tuple((camera, tuple(d.name for d, _ in self._device_metrics(cam)))
                     for camera, cam in view.cameras.items())

    def _changed(self, device: str | None, metrics: list[tuple[MetricDef, Any]]) -> list[tuple[MetricDef, Any]]:
        return [(d, value) for d, value in metrics
                if _moved(d, self._sent.get((device, d.name)), value, self.cfg.deadband)]

    def _payload(self, device: str | None, metrics: list[tuple[MetricDef, Any]], now: int, *,
                 birth: bool = False) -> bytes:
        payload = pb.Payload(timestamp=now, seq=self._next_seq(birth and device is None))
        defs = self._defs.setdefault(device, {})
        for d, value in metrics:
            key = (device, d.name)
            if birth:
                self._aliases[key] = len(self._aliases) + 1  # unique across the node, as the spec asks
                defs[d.name] = d
            m = payload.metrics.add()
            _fill(m, d, value, name=birth, alias=self._aliases[key], timestamp=now)
            self._sent[key] = value
        return payload.SerializeToString()

    def _next_seq(self, first: bool) -> int:
        seq = 0 if first else (self._seq + 1) % 256
        self._seq = seq
        return seq

    # --- commands ------------------------------------------------------------------------

    def command(self, topic: str, data: bytes) -> Rebirth | list[RuleOp]:
        """An NCMD or DCMD as what it asks for, or SparkplugError (nothing applied)."""
        if len(data) > MAX_COMMAND_BYTES:
            raise SparkplugError("oversized", f"{len(data)} bytes > {MAX_COMMAND_BYTES}")
        group, verb, node, device = self.topics.parse(topic)
        if (group, node) != (self.cfg.group_id, self.cfg.edge_node_id) or verb not in ("NCMD", "DCMD"):
            raise SparkplugError("wrong_device", f"{topic!r} is not this edge node's command topic")
        try:
            payload = pb.Payload.FromString(data)
        except (DecodeError, RuntimeWarning, ValueError) as exc:
            raise SparkplugError("malformed", f"not a Sparkplug B payload: {exc}") from None
        if not payload.metrics:
            raise SparkplugError("empty", "no metrics")
        if verb == "NCMD":
            if device is not None:
                raise SparkplugError("wrong_device", "an NCMD names no device")
            for m in payload.metrics:
                d = self._lookup(None, m)
                if d.name != REBIRTH:
                    raise SparkplugError("not_writable", f"{d.name!r} cannot be written")
                if not _value(d, m):
                    raise SparkplugError("bad_value", f"{REBIRTH} must be true")
            return Rebirth()
        if device is None or device not in self._defs:
            raise SparkplugError("unknown_camera", f"no device {device!r} on this edge node")
        return [self._rule_op(device, self._lookup(device, m), m) for m in payload.metrics]

    def _lookup(self, device: str | None, m: pb.Payload.Metric) -> MetricDef:
        defs = self._defs.get(device, {})
        if m.HasField("name"):
            d = defs.get(m.name)
            if d is None:
                if device is not None and m.name.startswith("Rules/") and m.name.count("/") == 2:
                    raise SparkplugError("unknown_rule", f"no rule {m.name.split('/')[1]!r} on {device!r}")
                raise SparkplugError("unknown_metric", f"no metric {m.name[:80]!r}")
            if m.HasField("alias") and self._aliases.get((device, d.name)) != m.alias:
                raise SparkplugError("unknown_metric", f"alias {m.alias} is not {d.name!r}'s")
            return d
        if m.HasField("alias"):
            for (dev, name), alias in self._aliases.items():
                if dev == device and alias == m.alias:
                    return defs[name]
            raise SparkplugError("unknown_metric", f"no metric with alias {m.alias}")
        raise SparkplugError("unknown_metric", "a metric with neither name nor alias")

    def _rule_op(self, camera: str, d: MetricDef, m: pb.Payload.Metric) -> RuleOp:
        if not d.writable:
            raise SparkplugError("not_writable", f"{d.name!r} cannot be written")
        value = _value(d, m)
        _, rule, leaf = d.name.split("/")
        if leaf == "Enabled":
            return RuleOp(camera, rule, "enable" if value else "disable")
        if leaf == "Acknowledge":
            if not value:
                raise SparkplugError("bad_value", "Acknowledge must be true")
            return RuleOp(camera, rule, "ack")
        if not math.isfinite(value) or not 0 <= value <= MAX_MUTE_MINUTES:
            raise SparkplugError("bad_value", f"Mute Minutes must be 0..{MAX_MUTE_MINUTES} (0 unmutes)")
        return RuleOp(camera, rule, "mute", value) if value > 0 else RuleOp(camera, rule, "unmute")


def _value(d: MetricDef, m: pb.Payload.Metric) -> Any:
    """A written metric's value, of the type its birth declared, or SparkplugError."""
    if m.HasField("datatype") and m.datatype != d.datatype:
        raise SparkplugError("wrong_type", f"{d.name!r} is {pb.DataType.Name(d.datatype)}, "
                                           f"not datatype {m.datatype}")
    if m.is_null:
        raise SparkplugError("bad_value", f"{d.name!r} cannot be written null")
    field = m.WhichOneof("value")
    if d.datatype == pb.Double and field == "float_value":  # a float is a double, narrower
        return float(m.float_value)
    if field != _FIELD[d.datatype]:
        raise SparkplugError("wrong_type", f"{d.name!r} needs {_FIELD[d.datatype]}, not {field}")
    return getattr(m, field)


def _fill(m: pb.Payload.Metric, d: MetricDef, value: Any, *, name: bool, alias: int | None = None,
          timestamp: int | None = None) -> None:
    if name:
        m.name = d.name
        m.datatype = d.datatype
    if alias is not None:
        m.alias = alias
    if timestamp is not None:
        m.timestamp = timestamp
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        m.is_null = True
        if not name:
            m.datatype = d.datatype
        return
    setattr(m, _FIELD[d.datatype], value)


def _moved(d: MetricDef, old: Any, new: Any, deadband: Any) -> bool:
    if old is None or new is None or d.deadband is None or isinstance(new, bool):
        return old != new
    if d.deadband == "fps":
        return abs(new - old) >= deadband.fps or (new == 0) != (old == 0)
    return abs(new - old) > deadband.ratio * max(abs(old), 1e-9)


def _ms(t: float | None = None) -> int:
    return int(round((time.time() if t is None else t) * 1000))


def _load_bdseq(path: Path) -> int:
    """The last session's bdSeq, or 255 so that the first session is 0."""
    try:
        value = json.loads(path.read_text())["bdSeq"]
    except (OSError, ValueError, KeyError, TypeError):
        return 255
    return value if type(value) is int and 0 <= value <= 255 else 255


def decode(data: bytes) -> pb.Payload:
    """A Sparkplug B payload (for host applications and tests)."""
    return pb.Payload.FromString(data)


def metric_value(m: pb.Payload.Metric) -> Any:
    """A decoded metric's value (None when null)."""
    if m.is_null:
        return None
    field = m.WhichOneof("value")
    return getattr(m, field) if field else None


def named(metrics: Iterable[pb.Payload.Metric]) -> dict[str, Any]:
    """A birth's metrics by name (for host applications and tests)."""
    return {m.name: metric_value(m) for m in metrics}
