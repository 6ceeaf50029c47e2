"""The MQTT contract between a device and the fleet: topics, bodies, limits.

Both sides import this module, and no other module spells a topic or a body, so the
two cannot drift apart. Bodies are JSON with ``"v": 1``; decoding is strict (unknown
keys, wrong types, a different version are refused) and either returns a typed body
or raises :class:`ContractError` with a short machine reason that the receiver counts.
This module must not import anything from ``fleet``.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

DEFAULT_PREFIX = "edgecam/v1"
VERSION = 1
SHARE_GROUP = "fleet"  # the fleet's shared-subscription group

# Size limits. A payload this small cannot hold an image; a batch this small keeps the
# broker's and the fleet's memory per message bounded.
MAX_PAYLOAD_BYTES = 8 * 1024  # one event's payload, as compact JSON
MAX_EVENT_BYTES = MAX_PAYLOAD_BYTES + 1024  # one event on the wire, envelope included
MAX_BATCH_EVENTS = 2000
MAX_BATCH_BYTES = 1024 * 1024
MAX_ACK_BATCHES = 64
MAX_ACK_BYTES = 8 * 1024
MAX_STATUS_BYTES = 16 * 1024

EVENT_KINDS = ("detection_summary", "decision", "alert", "health", "model", "outbox_eviction")

# Reasons a body is refused; receivers count rejections under these names.
REASONS = ("oversized", "malformed_json", "bad_version", "schema", "wrong_device")

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # a device or camera id: one safe topic level
ULID_PATTERN = r"^[0-9A-HJKMNP-TV-Z]{26}$"
Ulid = Annotated[str, Field(pattern=ULID_PATTERN)]


class ContractError(ValueError):
    """A body that breaks the contract; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# --- topics ------------------------------------------------------------------------


@dataclass(frozen=True)
class Topics:
    """Every topic of the DESIGN.md table under one prefix."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        p = self.prefix
        if not p or p.startswith(("/", "$")) or p.endswith("/") or "+" in p or "#" in p:
            raise ValueError(f"bad topic prefix {p!r}: no wildcards, no leading '$' or '/'")

    def status(self, device: str) -> str:
        return f"{self.prefix}/dev/{_level(device)}/status"

    def outbox(self, device: str) -> str:
        return f"{self.prefix}/dev/{_level(device)}/outbox"

    def ack(self, device: str) -> str:
        return f"{self.prefix}/dev/{_level(device)}/ack"

    def desired(self, device: str) -> str:
        return f"{self.prefix}/dev/{_level(device)}/desired"

    def reported(self, device: str) -> str:
        return f"{self.prefix}/dev/{_level(device)}/reported"

    def job(self, device: str, job: str) -> str:
        return f"{self.prefix}/dev/{_level(device)}/job/{_level(job)}"

    def artifact_get(self) -> str:
        return f"{self.prefix}/fleet/artifact/get"

    def artifact(self, device: str, sha256: str) -> str:
        return f"{self.prefix}/dev/{_level(device)}/artifact/{_level(sha256)}"

    def rpc(self) -> str:
        return f"{self.prefix}/fleet/rpc"

    def alert(self, site: str, line: str, camera: str) -> str:
        return f"{self.prefix}/alerts/{_level(site)}/{_level(line)}/{_level(camera)}"

    # subscriptions of the fleet manager
    def all_status(self) -> str:
        return f"{self.prefix}/dev/+/status"

    def shared_outbox(self, group: str = SHARE_GROUP) -> str:
        """Shared subscription: several managers split the devices' batches."""
        return f"$share/{_level(group)}/{self.prefix}/dev/+/outbox"

    def device_of(self, topic: str) -> str | None:
        """The device id in ``{p}/dev/{id}/...``, or None for any other topic."""
        head = f"{self.prefix}/dev/"
        if not topic.startswith(head):
            return None
        device = topic[len(head):].split("/", 1)[0]
        return device or None


def _level(value: str) -> str:
    if not value or "/" in value or "+" in value or "#" in value:
        raise ValueError(f"{value!r} cannot be one topic level")
    return value


# --- bodies --------------------------------------------------------------------------


class _Body(BaseModel):
    # strict: a string is not a number, unknown keys are errors
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class WireEvent(_Body):
    """One metadata event as it travels inside an outbox batch."""

    id: Ulid
    seq: int = Field(ge=0, description="the device outbox's order of commit")
    kind: Literal[EVENT_KINDS]  # type: ignore[valid-type]
    device: str = Field(pattern=ID_PATTERN)
    camera: str | None = Field(default=None, pattern=ID_PATTERN)
    captured_at: float
    recorded_at: float
    priority: int = Field(ge=0, le=9)
    payload: dict[str, Any]


class OutboxBatch(_Body):
    """``{p}/dev/{id}/outbox``: events the device wants stored, acked by batch id."""

    v: Literal[1]
    device: str = Field(pattern=ID_PATTERN)
    batch: Ulid
    sent_at: float
    events: list[WireEvent] = Field(min_length=1, max_length=MAX_BATCH_EVENTS)


class Ack(_Body):
    """``{p}/dev/{id}/ack``: batch ids whose events the fleet has committed."""

    v: Literal[1]
    device: str = Field(pattern=ID_PATTERN)
    batches: list[Ulid] = Field(min_length=1, max_length=MAX_ACK_BATCHES)


class Status(_Body):
    """``{p}/dev/{id}/status``, retained; the device's will sets it offline."""

    v: Literal[1]
    device: str = Field(pattern=ID_PATTERN)
    state: Literal["online", "offline"]
    at: float
    runtime: str | None = None
    site: str | None = None
    line: str | None = None
    models: dict[str, str] = {}


Body = TypeVar("Body", bound=_Body)


def encode(body: _Body) -> bytes:
    """A body as compact JSON bytes."""
    return body.model_dump_json().encode()


def event_json(
    *,
    id: str,
    seq: int,
    kind: str,
    device: str,
    camera: str | None,
    captured_at: float,
    recorded_at: float,
    priority: int,
    payload_json: str,
) -> str:
    """One :class:`WireEvent` as JSON, from a payload that is already JSON.

    The device stores each event in this form and a batch is these strings joined,
    so the hot path never parses or re-serialises a payload.
    """
    return (
        f'{{"id":"{id}","seq":{seq},"kind":"{kind}","device":{_quoted(device)},'
        f'"camera":{_quoted(camera)},"captured_at":{captured_at!r},"recorded_at":{recorded_at!r},'
        f'"priority":{priority},"payload":{payload_json}}}'
    )


# device and camera ids repeat endlessly: quote each once
_quoted = functools.lru_cache(maxsize=256)(json.dumps)


BATCH_OVERHEAD = 200  # bytes of a batch body around its events (generous)


def batch_body(device: str, batch: str, sent_at: float, events: str) -> bytes:
    """An :class:`OutboxBatch` body from events in :func:`event_json` form, joined by commas."""
    head = f'{{"v":{VERSION},"device":{json.dumps(device)},"batch":"{batch}","sent_at":{sent_at!r},"events":['
    return (head + events + "]}").encode()


def decode_batch(data: bytes, *, device: str) -> OutboxBatch:
    """A batch received on ``device``'s outbox topic, or ContractError."""
    batch = _decode(OutboxBatch, data, limit=MAX_BATCH_BYTES, device=device)
    for i, event in enumerate(batch.events):
        if event.device != device:
            raise ContractError("wrong_device", f"events[{i}].device is {event.device!r}, not {device!r}")
    return batch


def decode_ack(data: bytes, *, device: str) -> Ack:
    """An ack received on ``device``'s ack topic, or ContractError."""
    return _decode(Ack, data, limit=MAX_ACK_BYTES, device=device)


def decode_status(data: bytes, *, device: str) -> Status:
    """A status received on ``device``'s status topic, or ContractError."""
    return _decode(Status, data, limit=MAX_STATUS_BYTES, device=device)


def _decode(model: type[Body], data: bytes, *, limit: int, device: str) -> Body:
    if len(data) > limit:
        raise ContractError("oversized", f"{len(data)} bytes > {limit}")
    try:
        body = model.model_validate_json(data)
    except ValidationError as exc:
        raise ContractError(*_reason(exc)) from None
    if body.device != device:  # type: ignore[attr-defined]
        raise ContractError("wrong_device", f"body names {body.device!r} on {device!r}'s topic")  # type: ignore[attr-defined]
    return body


def _reason(exc: ValidationError) -> tuple[str, str]:
    errors = exc.errors(include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        return "malformed_json", str(first["msg"])
    # a body of another version is judged by its version alone: its other keys may differ
    for err in errors:
        if err["loc"][:1] == ("v",):
            return "bad_version", "expected \"v\": 1"
    where = ".".join(str(p) for p in first["loc"]) or "body"
    if first["type"] == "too_long":
        return "oversized", f"{where}: {first['msg']}"
    return "schema", f"{where}: {first['msg']}"
