"""Metadata events: what the device records in its outbox and syncs to the fleet.

An :class:`Event` is immutable and already checked: its payload was serialised to
compact JSON when it was made, after a guard refused anything that is not plain
metadata (bytes, arrays, long strings, anything over :data:`MAX_PAYLOAD_BYTES`), so
a frame cannot reach the outbox by mistake and a caller cannot change an event after
handing it over. Ids are ULIDs (:mod:`edge.core.ids`): they sort by time, and
within one process they only grow. The device id is stamped by the outbox that records the event.
"""

from __future__ import annotations

import functools
import json
import math
import re
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any, Iterable, Mapping

from edge.core.contract import EVENT_KINDS, ID_PATTERN, MAX_PAYLOAD_BYTES, MAX_TIME, ContractError, loads
from edge.core.errors import EdgeError
from edge.core.ids import new_id

MAX_TOKEN_CHARS = 1024  # longer base64-like runs are refused as encoded binary
MAX_DEPTH = 32
TOP_DETECTIONS = 20  # detections listed one by one in a per-frame summary; the rest are counted


class Kind(str, Enum):
    DETECTION_SUMMARY = "detection_summary"
    DECISION = "decision"
    ALERT = "alert"
    HEALTH = "health"
    MODEL = "model"
    OUTBOX_EVICTION = "outbox_eviction"
    DRIFT = "drift"
    COMMAND = "command"
    SNAPSHOT_EXPORTED = "snapshot_exported"
    REVIEW = "review"


assert tuple(k.value for k in Kind) == EVENT_KINDS, "events.Kind and contract.EVENT_KINDS differ"

# Higher survives longer: a full outbox evicts the lowest priority, oldest first, and
# sync sends the highest first. Alerts (their audit rows) are evicted last of all.
PRIORITY: dict[Kind, int] = {
    Kind.HEALTH: 0,
    Kind.DETECTION_SUMMARY: 1,
    Kind.DECISION: 2,
    Kind.DRIFT: 2,
    Kind.MODEL: 3,
    Kind.OUTBOX_EVICTION: 3,
    Kind.ALERT: 4,
    Kind.COMMAND: 4,  # who changed what on the line: kept as long as the alerts
    Kind.SNAPSHOT_EXPORTED: 4,  # which pixels left the device, to whom: the audit trail
    Kind.REVIEW: 4,  # made by the fleet (an operator's label), never by a device
}


class PayloadError(EdgeError):
    """A payload that is not plain, small metadata."""


@dataclass(frozen=True, slots=True)
class Event:
    """One metadata event. Make it with :func:`new_event` or a helper below."""

    id: str
    kind: Kind
    camera: str | None
    captured_at: float  # when the observed thing happened (the frame's capture time)
    recorded_at: float  # when the event was made
    priority: int
    payload_json: str  # the checked payload, compact JSON

    @property
    def payload(self) -> dict[str, Any]:
        return json.loads(self.payload_json)


# --- the payload guard -------------------------------------------------------------------


def check_payload(payload: Mapping[str, Any]) -> str:
    """``payload`` as compact JSON, or PayloadError naming the offending key.

    The JSON encoder does the walk: anything it cannot encode natively (bytes, arrays,
    numpy scalars, sets, objects) ends in ``_refuse``; only a refusal walks the payload
    again, in Python, to name the key.
    """
    if type(payload) is not dict:
        if not isinstance(payload, Mapping):
            raise PayloadError(f"payload: must be a mapping, not {type(payload).__name__}")
        payload = dict(payload)
    try:
        text = _ENCODER.encode(payload)
    except (TypeError, ValueError, RecursionError) as exc:
        raise PayloadError(_locate(payload, "payload", 0) or f"payload: not JSON metadata: {exc}") from None
    if len(text) > MAX_PAYLOAD_BYTES:  # ensure_ascii: characters are bytes
        raise PayloadError(f"payload: {len(text)} bytes of JSON, over the {MAX_PAYLOAD_BYTES}-byte limit")
    blob = _BLOB.search(text)
    if blob:
        raise PayloadError(f"payload: a run of {len(blob.group())} base64-like characters looks like "
                           "encoded binary (an image?); events carry metadata only")
    if _LONG_NUMBER.search(text):
        # Python writes an integer of any size; the fleet refuses one beyond a float's
        # range, and would refuse the whole batch that carries it, again and again
        try:
            loads(text)
        except ContractError as exc:
            raise PayloadError(f"payload: {exc.detail}") from None
    return text


# A token this long without a space or punctuation is an encoded blob, not a label or a reason.
_BLOB = re.compile(r"[A-Za-z0-9+/=_-]{%d,}" % (MAX_TOKEN_CHARS + 1))
# Floats from Python are finite here (the encoder refuses the others); only an integer
# of 309 digits or more can pass a float's range (about 1.8e308).
_LONG_NUMBER = re.compile(r"[0-9]{309}")


def _refuse(value: Any) -> Any:
    raise TypeError(_refusal(value))


# stateless and reusable; a cycle ends in RecursionError, which the guard reports
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False, check_circular=False, default=_refuse)


def _locate(value: Any, path: str, depth: int) -> str | None:
    """``path: why`` for the first value the encoder refuses, or None."""
    if isinstance(value, (str, int, bool, type(None))):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{path}: {value} is not a finite number"
    if depth >= MAX_DEPTH:
        return f"{path}: nested deeper than {MAX_DEPTH} levels"
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, (str, int, float, bool, type(None))):
                return f"{path}: key {key!r} is not a string"
            found = _locate(item, f"{path}.{key}", depth + 1)
            if found:
                return found
        return None
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found = _locate(item, f"{path}[{i}]", depth + 1)
            if found:
                return found
        return None
    return f"{path}: {_refusal(value)}"


def _refusal(value: Any) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"{type(value).__name__} of {len(value)} bytes refused: events carry metadata, never pixels"
    if hasattr(value, "__array_interface__") or hasattr(value, "__array__"):
        shape = getattr(value, "shape", None)
        if shape == ():
            return f"numpy scalar {type(value).__name__} refused: convert it with float() or int()"
        return f"array of shape {shape} refused: events carry metadata, never pixels or tensors"
    if isinstance(value, (set, frozenset)):
        return "set refused: use a list"
    return f"{type(value).__name__} is not JSON metadata"


# --- making events --------------------------------------------------------------------------


def new_event(
    kind: Kind,
    payload: Mapping[str, Any],
    *,
    camera: str | None = None,
    captured_at: float | None = None,
    priority: int | None = None,
) -> Event:
    """An event of ``kind`` with a checked payload; raises PayloadError."""
    if type(kind) is not Kind:
        kind = Kind(kind)
    recorded_at = time.time()
    prio = PRIORITY[kind] if priority is None else priority
    if not 0 <= prio <= 9:
        raise PayloadError(f"priority: {prio} is outside 0..9")
    if camera is not None and not _valid_camera(camera):
        raise PayloadError(f"camera: {camera!r} must match {ID_PATTERN}")
    captured = recorded_at if captured_at is None else float(captured_at)
    if not 0 <= captured <= MAX_TIME:  # the contract's range: the fleet refuses any other
        raise PayloadError(f"captured_at: {captured_at} is not a time from 1970 to 9999")
    return Event(new_id(), kind, camera, captured, recorded_at, prio, check_payload(payload))


@functools.lru_cache(maxsize=256)
def _valid_camera(camera: str) -> bool:
    # the fleet would refuse every batch holding a bad id, for ever: refuse it here instead
    return isinstance(camera, str) and re.fullmatch(ID_PATTERN, camera) is not None


def detection_summary(
    camera: str,
    captured_at: float,
    model: str,
    detections: Iterable[Mapping[str, Any]],
    *,
    frame: int | None = None,
    top: int = TOP_DETECTIONS,
) -> Event:
    """One frame's detections: counts per label and the ``top`` highest-scoring boxes.

    ``detections`` are dicts as in ``Prediction.to_dict()["detections"]``
    (``label``, ``score``, ``box``; ``class_id`` is optional).
    """
    # a broken model's NaN would make the event unsendable (and raise in the sink): leave it out
    finite = [d for d in detections if all(map(math.isfinite, (float(d["score"]), *map(float, d["box"]))))]
    items = sorted(finite, key=lambda d: -float(d["score"]))
    counts: dict[str, int] = {}
    for d in items:
        counts[str(d["label"])] = counts.get(str(d["label"]), 0) + 1
    listed = [
        {"label": str(d["label"]), "score": round(float(d["score"]), 3),
         "box": [round(float(v), 1) for v in d["box"]]}
        for d in items[:top]
    ]
    payload: dict[str, Any] = {"scope": "frame", "model": model, "count": len(items),
                               "counts": counts, "detections": listed}
    if frame is not None:
        payload["frame"] = int(frame)
    return new_event(Kind.DETECTION_SUMMARY, payload, camera=camera, captured_at=captured_at)


def detection_interval(
    camera: str, since: float, until: float, model: str, frames: int, counts: Mapping[str, int]
) -> Event:
    """Detections over an interval: frames seen and detections per label."""
    payload = {"scope": "interval", "model": model, "since": since, "until": until,
               "frames": int(frames), "counts": {str(k): int(v) for k, v in counts.items()}}
    return new_event(Kind.DETECTION_SUMMARY, payload, camera=camera, captured_at=since)


def decision(
    camera: str, captured_at: float, model: str, outcome: str, label: str, score: float,
    **detail: Any,
) -> Event:
    """An accept / reject / unsure decision on one frame (or a debounced run of frames)."""
    if outcome not in ("accept", "reject", "unsure"):
        raise PayloadError(f"payload.outcome: {outcome!r} is not accept, reject or unsure")
    payload = {"model": model, "outcome": outcome, "label": label, "score": round(float(score), 4), **detail}
    return new_event(Kind.DECISION, payload, camera=camera, captured_at=captured_at)


def sample(camera: str, captured_at: float, model: str, reasons: Iterable[str], snapshot: str, sha256: str,
           **detail: Any) -> Event:
    """A frame kept on the device for review (``edge.decide.sampling``): the snapshot's id and
    hash and why it was sampled; a ``decision`` event, like the unsure frames' snapshots."""
    payload = {"model": model, "sampled": list(reasons), "snapshot": snapshot, "snapshot_sha256": sha256, **detail}
    return new_event(Kind.DECISION, payload, camera=camera, captured_at=captured_at)


def alert_audit(
    camera: str, captured_at: float, rule: str, topic: str, delivered: bool, **detail: Any
) -> Event:
    """The audit row of an alert already sent over MQTT (or not, and why in ``detail``)."""
    payload = {"rule": rule, "topic": topic, "delivered": bool(delivered), **detail}
    return new_event(Kind.ALERT, payload, camera=camera, captured_at=captured_at)


def command_audit(camera: str | None, source: str, topic: str, op: str | None, ok: bool, **detail: Any) -> Event:
    """The audit row of a command from the line (``source``: mqtt or sparkplug), applied
    or refused (``ok`` false, and why in ``detail``)."""
    payload = {"source": source, "topic": topic, "op": op, "ok": bool(ok), **detail}
    return new_event(Kind.COMMAND, payload, camera=camera)


def snapshot_exported(snapshot: str, sha256: str, operator: str, request: str, size: int) -> Event:
    """The audit row of one snapshot sent to ``operator`` (who asked, which file, when)."""
    payload = {"action": "snapshot_exported", "snapshot": snapshot, "sha256": sha256, "operator": operator,
               "request": request, "bytes": int(size)}
    return new_event(Kind.SNAPSHOT_EXPORTED, payload)


def health_snapshot(camera: str | None, stats: Mapping[str, Any]) -> Event:
    """A stats snapshot (a camera's, or the device's with ``camera=None``).

    Numpy scalars are turned into numbers; arrays are still refused.
    """
    return new_event(Kind.HEALTH, _plain_numbers(stats), camera=camera)


def model_event(action: str, slot: str, version: str, **detail: Any) -> Event:
    """A model lifecycle step: loaded, verified, activated, failed, rolled_back, ..."""
    return new_event(Kind.MODEL, {"action": action, "slot": slot, "version": version, **detail})


def drift(camera: str, since: float, report: Mapping[str, Any]) -> Event:
    """One drift window of a camera's task against its baseline (numbers only)."""
    return new_event(Kind.DRIFT, report, camera=camera, captured_at=since)


def eviction(reason: str, rows: int, nbytes: int, by_kind: Mapping[str, int], **detail: Any) -> Event:
    """Rows the outbox dropped (``reason`` is ``cap``, ``disk_full`` or ``overflow``), recorded as an event."""
    payload = {"reason": reason, "rows": int(rows), "bytes": int(nbytes), "by_kind": dict(by_kind), **detail}
    return new_event(Kind.OUTBOX_EVICTION, payload)


def _plain_numbers(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain_numbers(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_numbers(v) for v in value]
    if getattr(value, "shape", None) == () and hasattr(value, "item"):
        return value.item()  # a numpy scalar
    return value
