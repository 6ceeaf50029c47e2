"""The MQTT contract between a device and the fleet: topics, bodies, limits.

Both sides import this module, and no other module spells a topic or a body, so the
two cannot drift apart. Bodies are JSON with ``"v": 1``; every body is decoded by one
strict decoder (:func:`loads`, then the body's model): unknown keys, wrong types, a
different version, ``NaN``, ``Infinity`` and numbers beyond a float's range (``1e999``)
are refused, times, sizes and counts are range-checked, and the decoder either returns
a typed body or raises :class:`ContractError` with a short machine reason that the
receiver counts. This module must not import anything from ``fleet``.
"""

from __future__ import annotations

import functools
import json
import math
import re
import sys
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError, model_validator
from pydantic_core import from_json

DEFAULT_PREFIX = "edgecam/v1"
SPARKPLUG_NAMESPACE = "spBv1.0"  # the first topic level of every Sparkplug B topic
HA_DISCOVERY_PREFIX = "homeassistant"  # Home Assistant's default discovery prefix
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
MAX_INGEST_ONLINE_BYTES = 1024
MAX_DESIRED_BYTES = 256 * 1024  # a manifest carries its labels inline
MAX_REPORTED_BYTES = 64 * 1024
MAX_JOB_BYTES = 8 * 1024
MAX_CHUNK_BYTES = 128 * 1024  # one artifact chunk's data
MAX_CHUNK_HEADER_BYTES = 1024
MAX_ARTIFACT_REQUEST_BYTES = 2 * 1024
MAX_RPC_BYTES = 256 * 1024
MAX_ALERT_BYTES = 16 * 1024
MAX_COMMAND_BYTES = 2 * 1024  # a line controller's command: a handful of short fields
MAX_SUMMARY_BYTES = 64 * 1024  # a camera's summary: every rule's state and count
MAX_ARTIFACT_BYTES = 2**31  # a model or policy file; a FlatBuffer (TFLite) cannot be larger
MAX_ARTIFACT_DOC_BYTES = 48 * 1024  # one artifact's description: four slots and a policy fit one desired state
MAX_REVIEW_REQUEST_BYTES = 1024  # an operator's snapshot fetch: a handful of ids
MAX_SNAPSHOT_BYTES = 16 * 1024 * 1024  # a snapshot a device sends; a 4K JPEG at quality 100 fits

# Numbers. Times are seconds since the epoch: never negative, and at most the last
# second of the year 9999, which every date library can show; there is no lower bound
# beyond 0, because a board without a real-time clock boots in 1970 and its data counts.
# Integers (counts, sequence numbers, versions) fit in 64 bits, as SQLite and
# PostgreSQL store them.
MAX_TIME = 253402300799.0  # 9999-12-31T23:59:59Z
MAX_INT = 2**63 - 1

# Why a chunk request got no data (``ChunkHeader.error``). "busy" means the fleet is
# serving as many transfers as it allows: ask again after CHUNK_BUSY_RETRY_S;
# "not_assigned", that the device's current desired state names no such artifact.
CHUNK_ERRORS = ("unknown_artifact", "out_of_range", "busy", "not_assigned")
CHUNK_BUSY_RETRY_S = 1.0

EVENT_KINDS = ("detection_summary", "decision", "alert", "health", "model", "outbox_eviction", "drift", "command",
               "snapshot_exported", "review")

# Why a device sent no pixels for a snapshot fetch (``ReviewChunk.error``): its config
# keeps export off (``privacy.snapshot_export``), the identity is not one of its
# reviewers, it served as many fetches as its rate allows, it holds no such snapshot
# (never, or no longer: ``expired`` past its age cap, ``evicted`` for room), or the file
# could not be read or is larger than a fetch may carry.
REVIEW_ERRORS = ("export_off", "forbidden", "rate_limited", "unknown_snapshot", "expired", "evicted",
                 "unreadable", "too_large")

# Alert events. A rule's own: present, cleared, every, entered, left, crossed. Raised by
# the device about itself, each on a rule of the same name with retained state (on, then
# cleared when it recovers): camera_blind / camera_restored (rule camera_health),
# camera_tamper and image_quality (the picture), model_drift (the model's results).
ALERT_EVENTS = ("present", "cleared", "every", "entered", "left", "crossed", "camera_blind", "camera_restored",
                "camera_tamper", "image_quality", "model_drift")

# What a line controller may ask of a camera's rule (``Command.op``): stop evaluating it
# (disable) or start again (enable), keep evaluating it but send none of its alerts for
# ``minutes`` (mute) or stop doing so (unmute), or acknowledge its latest alert (ack).
COMMAND_OPS = ("enable", "disable", "mute", "unmute", "ack")
MAX_MUTE_MINUTES = 7 * 24 * 60  # a week: longer is "disable", and says so
# Why a command that decoded was still refused (``CommandResult.reason``), beyond REASONS.
COMMAND_REASONS = ("unknown_camera", "unknown_rule", "not_controllable", "nothing_to_ack", "stale_alert")

# Reasons a body is refused; receivers count rejections under these names.
# "non_finite": NaN, Infinity or a number beyond a float's range, anywhere in the body.
REASONS = ("oversized", "malformed_json", "non_finite", "bad_version", "schema", "wrong_device")

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # a device or camera id: one safe topic level
# A process with several MQTT connections (a device: sync, agent, alerts; a manager:
# control, job inbox, ingest) has one broker identity per connection,
# ``{identity}~{link}``: the broker binds each client id to its identity, and no id can
# contain "~".
LINK_SEPARATOR = "~"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
KEY_ID_PATTERN = r"^[0-9a-f]{16}$"  # a public key's id: the start of the sha256 of its raw bytes
OP_PATTERN = r"^[a-z][a-z0-9_.]{0,63}$"

# A model or policy change on a device goes through these states, in this order, and
# ends in one of the last three. "active" means swapped in and being watched;
# "committed" means it passed the device's health window.
JOB_STATES = ("downloading", "verifying", "testing", "active", "committed", "failed", "rolled_back")
POLICY_SLOT = "policy"  # the slot name under which a policy's job and reported state travel
ULID_PATTERN = r"^[0-9A-HJKMNP-TV-Z]{26}$"
Ulid = Annotated[str, Field(pattern=ULID_PATTERN)]
Time = Annotated[float, Field(ge=0, le=MAX_TIME)]
Count = Annotated[int, Field(ge=0, le=MAX_INT)]
ByteOffset = Annotated[int, Field(ge=0, le=MAX_ARTIFACT_BYTES)]
# the integer 1: strict, so neither true nor 1.0 passes (Literal[1] would take both)
Version = Annotated[int, Strict(), Field(ge=VERSION, le=VERSION)]


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

    def ingest_online(self) -> str:
        """Where a manager's ingest says it has just subscribed (QoS 0, not retained);
        devices then send their unacknowledged batches again at once."""
        return f"{self.prefix}/fleet/ingest/online"

    def artifact_get(self, device: str) -> str:
        """Where ``device`` asks for chunks. The device is a topic level, so the broker's
        ACL vouches for who asks (only device X may write ``{p}/dev/X/#``)."""
        return f"{self.prefix}/dev/{_level(device)}/artifact/get"

    def artifact(self, device: str, sha256: str) -> str:
        return f"{self.prefix}/dev/{_level(device)}/artifact/{_level(sha256)}"

    def artifacts(self, device: str) -> str:
        """The device's subscription to the chunks of every artifact it asks for."""
        return f"{self.prefix}/dev/{_level(device)}/artifact/+"

    def rpc(self, identity: str) -> str:
        """Where ``identity`` sends requests. The identity is a topic level, not a body
        field, so a broker ACL (``pattern write {p}/fleet/rpc/%u``) can vouch for it."""
        return f"{self.prefix}/fleet/rpc/{_level(identity)}"

    def rpc_reply(self, identity: str, session: str) -> str:
        """Where a client of ``identity`` wants its responses (ACL: read ``{p}/fleet/reply/%u/#``)."""
        return f"{self.prefix}/fleet/reply/{_level(identity)}/{_level(session)}"

    def review_get(self, device: str, operator: str) -> str:
        """Where ``operator`` asks ``device`` for one snapshot. Both are topic levels, so
        the broker's ACL vouches for who asks (an operator writes only
        ``{p}/dev/+/review/get/{itself}``) and who may read it (only the device)."""
        return f"{self.prefix}/dev/{_level(device)}/review/get/{_level(operator)}"

    def review_gets(self, device: str) -> str:
        """The device's subscription to every operator's fetch requests."""
        return f"{self.prefix}/dev/{_level(device)}/review/get/+"

    def review_reply(self, device: str, operator: str, request: str) -> str:
        """Where ``device`` sends the snapshot ``operator`` asked for: under the device's own
        topics (only it may write there) and the operator's name (only it may read)."""
        return f"{self.prefix}/dev/{_level(device)}/review/reply/{_level(operator)}/{_level(request)}"

    def review_replies(self, operator: str) -> str:
        """``operator``'s subscription to the answers of every device it asks."""
        return f"{self.prefix}/dev/+/review/reply/{_level(operator)}/+"

    def review_requester(self, device: str, topic: str) -> str | None:
        """The operator in ``{p}/dev/{device}/review/get/{operator}``, or None for any other topic."""
        head = f"{self.prefix}/dev/{device}/review/get/"
        rest = topic[len(head):] if topic.startswith(head) else ""
        return rest if rest and "/" not in rest else None

    def alert(self, site: str, line: str, camera: str) -> str:
        return f"{self.prefix}/alerts/{_level(site)}/{_level(line)}/{_level(camera)}"

    def alert_state(self, site: str, line: str, camera: str, rule: str) -> str:
        """Retained on/off state of one rule on one camera, for a controller that reconnects."""
        return f"{self.alert(site, line, camera)}/state/{_level(rule)}"

    def camera_summary(self, site: str, line: str, camera: str) -> str:
        """Retained :class:`CameraSummary` of one camera (beside its alerts, so a
        controller allowed to read the line's alerts reads it too)."""
        return f"{self.alert(site, line, camera)}/summary"

    def command(self, site: str, line: str, device: str) -> str:
        """Where a line controller sends :class:`Command` bodies to ``device``. One topic
        per device, under its site and line, so a broker ACL can confine who may write
        it (``topic write {p}/commands/{site}/{line}/#`` for the line's controllers)."""
        return f"{self.prefix}/commands/{_level(site)}/{_level(line)}/{_level(device)}"

    def command_result(self, site: str, line: str, device: str) -> str:
        """Where ``device`` answers each command with a :class:`CommandResult`."""
        return f"{self.command(site, line, device)}/result"

    # subscriptions of the fleet manager
    def all_status(self) -> str:
        return f"{self.prefix}/dev/+/status"

    def all_reported(self) -> str:
        return f"{self.prefix}/dev/+/reported"

    def all_jobs(self) -> str:
        return f"{self.prefix}/dev/+/job/+"

    def all_artifact_gets(self) -> str:
        return f"{self.prefix}/dev/+/artifact/get"

    def all_rpc(self) -> str:
        return f"{self.prefix}/fleet/rpc/+"

    def rpc_identity(self, topic: str) -> str | None:
        """The identity in ``{p}/fleet/rpc/{identity}``, or None for any other topic."""
        head = f"{self.prefix}/fleet/rpc/"
        if not topic.startswith(head) or "/" in topic[len(head):]:
            return None
        return topic[len(head):] or None

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


def link_identity(identity: str, link: str | None = None) -> str:
    """The broker identity (username and client id) of one of ``identity``'s connections;
    ``None`` is the main one (a device's sync, a manager's control link)."""
    return identity if link is None else f"{identity}{LINK_SEPARATOR}{link}"


def _level(value: str) -> str:
    if not value or "/" in value or "+" in value or "#" in value:
        raise ValueError(f"{value!r} cannot be one topic level")
    return value


# --- bodies --------------------------------------------------------------------------


class _Body(BaseModel):
    # strict: a string is not a number, unknown keys are errors; and a body with NaN or
    # Infinity cannot even be built, so neither side can send one
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)
    # fields added after a body first shipped: left off the wire while empty, so a reader
    # that predates them (and refuses unknown keys) still reads every body that has no use for them
    WIRE_OPTIONAL: ClassVar[tuple[str, ...]] = ()


class WireEvent(_Body):
    """One metadata event as it travels inside an outbox batch."""

    id: Ulid
    seq: Count = Field(description="the device outbox's order of commit")
    kind: Literal[EVENT_KINDS]  # type: ignore[valid-type]
    device: str = Field(pattern=ID_PATTERN)
    camera: str | None = Field(default=None, pattern=ID_PATTERN)
    captured_at: Time
    recorded_at: Time
    priority: int = Field(ge=0, le=9)
    payload: dict[str, Any]


class OutboxBatch(_Body):
    """``{p}/dev/{id}/outbox``: events the device wants stored, acked by batch id."""

    v: Version
    device: str = Field(pattern=ID_PATTERN)
    batch: Ulid
    sent_at: Time
    events: list[WireEvent] = Field(min_length=1, max_length=MAX_BATCH_EVENTS)


class Refusal(_Body):
    """A batch the fleet will never store, and why (the reason its ingest counts it under)."""

    batch: Ulid
    reason: str = Field(min_length=1, max_length=64)


class Ack(_Body):
    """``{p}/dev/{id}/ack``: batch ids whose events the fleet has committed, and batches it
    refuses (the device stops re-sending those and keeps their rows, parked)."""

    v: Version
    device: str = Field(pattern=ID_PATTERN)
    batches: list[Ulid] = Field(default_factory=list, max_length=MAX_ACK_BATCHES)
    refused: list[Refusal] = Field(default_factory=list, max_length=MAX_ACK_BATCHES)
    WIRE_OPTIONAL = ("refused",)

    @model_validator(mode="after")
    def _names_a_batch(self) -> "Ack":
        if not self.batches and not self.refused:
            raise ValueError("an ack names at least one batch")
        return self


class Status(_Body):
    """``{p}/dev/{id}/status``, retained; the device's will sets it offline."""

    v: Version
    device: str = Field(pattern=ID_PATTERN)
    state: Literal["online", "offline"]
    at: Time
    runtime: str | None = None
    site: str | None = None
    line: str | None = None
    models: dict[str, str] = {}


class IngestOnline(_Body):
    """``{p}/fleet/ingest/online``: a manager's ingest (re)subscribed to the devices'
    batches. Batches a device sent before may have reached no subscriber (a broker
    restart, a manager restart): it sends its unacknowledged ones again now."""

    v: Version
    manager: str = Field(min_length=1, max_length=256)  # its MQTT client id, for the logs
    at: Time


Sha256 = Annotated[str, Field(pattern=SHA256_PATTERN)]
Ident = Annotated[str, Field(pattern=ID_PATTERN)]
# a JSON array arrives as a list; a box is four numbers either way
Box = Annotated[tuple[float, float, float, float], BeforeValidator(lambda v: tuple(v) if type(v) is list else v)]


class Artifact(_Body):
    """A model (with its manifest, labels inline) or a policy document, signed.

    ``signature`` is base64 Ed25519 over :meth:`signed_bytes`: every other field in
    canonical JSON. None means unsigned, which a device refuses.
    """

    kind: Literal["model", "policy"]
    name: str = Field(min_length=1, max_length=128)
    version: str = Field(min_length=1, max_length=64)
    sha256: Sha256
    size: int = Field(gt=0, le=MAX_ARTIFACT_BYTES)
    manifest: dict[str, Any] = {}
    signature: str | None = None

    def signed_bytes(self) -> bytes:
        return canonical(self.model_dump(exclude={"signature"}))


class Assignment(_Body):
    """One slot's desired artifact and the rollout job that asked for it."""

    artifact: Artifact
    job: Ident | None = None


class Desired(_Body):
    """``{p}/dev/{id}/desired``, retained: what the fleet wants running.

    ``version`` grows with every change for this device; a device ignores a desired
    state whose version is not above the last one it acted on. A slot missing from
    ``models`` is left as it is. ``signature`` is base64 Ed25519 by the fleet's signing
    key over :meth:`signed_bytes` (everything else, the version and the device
    included); a device refuses the whole document, before it changes anything, unless
    it verifies with a key the device pins.
    """

    v: Version
    device: Ident
    version: Count
    at: Time
    models: dict[Ident, Assignment] = {}
    policy: Assignment | None = None
    signature: str | None = None

    def signed_bytes(self) -> bytes:
        return canonical(self.model_dump(exclude={"signature"}))

    def names(self, sha256: str) -> bool:
        """Whether this state assigns the artifact ``sha256`` to any slot or the policy."""
        return any(a.artifact.sha256 == sha256 for a in (*self.models.values(), self.policy) if a is not None)


class Running(_Body):
    """An artifact as it runs on a device."""

    name: str
    version: str
    sha256: Sha256


class Change(_Body):
    slot: str
    at: Time
    reason: str
    job: Ident | None = None


class Reported(_Body):
    """``{p}/dev/{id}/reported``, retained: what runs, and the last change and why."""

    v: Version
    device: Ident
    at: Time
    desired_version: Count | None = None  # the last desired state acted on
    models: dict[Ident, Running] = {}
    previous: dict[Ident, Running] = {}
    policy: Running | None = None
    last_change: Change | None = None
    keys: list[Annotated[str, Field(pattern=KEY_ID_PATTERN)]] = Field(default=[], max_length=16)  # pinned keys' ids


class JobStatus(_Body):
    """``{p}/dev/{id}/job/{job}``: one step of a model or policy change on a device."""

    v: Version
    device: Ident
    job: Ident
    slot: Ident  # a model slot, or POLICY_SLOT
    sha256: Sha256
    state: Literal[JOB_STATES]  # type: ignore[valid-type]
    at: Time
    reason: str | None = Field(default=None, max_length=1024)
    progress: float | None = Field(default=None, ge=0, le=1)  # while downloading
    metrics: dict[str, float] = {}


class ArtifactRequest(_Body):
    """``{p}/dev/{id}/artifact/get``: a device asks for ``length`` bytes at ``offset``.

    ``device`` must be the topic's and ``response_topic`` the device's own artifact
    topic for that sha256; the fleet refuses anything else, so a request cannot aim data
    at another client, and it serves only an artifact the device's current desired
    state names.
    """

    v: Version
    device: Ident
    sha256: Sha256
    offset: ByteOffset
    length: int = Field(gt=0, le=MAX_CHUNK_BYTES)
    request: Ident
    response_topic: str = Field(max_length=512)


class ChunkHeader(_Body):
    """The JSON line in front of a chunk's raw bytes; ``error`` set means no data."""

    v: Version
    sha256: Sha256
    offset: ByteOffset
    total: ByteOffset
    request: Ident
    error: str | None = None


class RpcRequest(_Body):
    """``{p}/fleet/rpc/{identity}``: an operator's request; the answer goes to the
    MQTT 5 response topic with the same correlation data."""

    v: Version
    id: Ident
    op: str = Field(pattern=OP_PATTERN)
    args: dict[str, Any] = {}


class RpcError(_Body):
    code: str
    message: str


class RpcResponse(_Body):
    v: Version
    id: Ident
    ok: bool
    result: Any = None
    error: RpcError | None = None


class ReviewRequest(_Body):
    """``{p}/dev/{id}/review/get/{operator}``: an operator asks for one snapshot's JPEG.

    ``operator`` must be the topic's last level and ``reply_topic`` exactly
    :meth:`Topics.review_reply` for this device, that operator and ``request``: the
    device sends nothing anywhere else."""

    v: Version
    device: Ident
    operator: Ident
    snapshot: Ulid
    request: Ident
    reply_topic: str = Field(max_length=512)


class ReviewChunk(_Body):
    """The JSON line in front of a snapshot chunk's raw bytes; ``error`` set means no data
    (one of :data:`REVIEW_ERRORS`, said in words in ``detail``)."""

    v: Version
    device: Ident
    snapshot: Ulid
    request: Ident
    sha256: Sha256 | None = None
    offset: Annotated[int, Field(ge=0, le=MAX_SNAPSHOT_BYTES)] = 0
    total: Annotated[int, Field(ge=0, le=MAX_SNAPSHOT_BYTES)] = 0
    error: str | None = Field(default=None, max_length=32)
    detail: str | None = Field(default=None, max_length=512)


class CropAnswer(_Body):
    """What a trigger task said about an alert's object, on the object's crop."""

    task: str
    label: str
    score: float = Field(ge=0, le=1)


class Alert(_Body):
    """``{p}/alerts/{site}/{line}/{camera}`` (or a rule's own topic): something that matters.

    ``captured_at`` is when the frame was taken, ``published_at`` when this message left
    the device; ``delayed`` says it waited for the broker. ``box`` is normalised
    (x1, y1, x2, y2 in 0..1). ``state`` is a level rule's new state (True on, False
    cleared); edge events (entered, left, crossed, every) leave it None. ``values`` are
    the measures behind a device alert (``{"brightness": 3.2}``, ``{"psi": 0.41}``);
    ``detail`` names the ones that failed.
    """

    v: Version
    id: Ulid
    device: Ident
    camera: Ident
    rule: str
    event: Literal[ALERT_EVENTS]  # type: ignore[valid-type]
    state: bool | None = None
    label: str | None = None
    confidence: float | None = None
    box: Box | None = None
    zone: str | None = None
    line: str | None = None
    direction: str | None = None
    track: Count | None = None
    count: Count | None = None  # objects matching now (present, every), or the rule's events so far
    counts: dict[str, Count] = {}  # the rule's events so far, by class
    detail: str | None = None
    values: dict[str, float] = {}
    task: str | None = None  # the camera task whose results drifted (model_drift)
    captured_at: Time
    published_at: Time
    delayed: bool = False
    model: str | None = None
    model_version: str | None = None
    policy_version: str
    snapshot: str | None = None  # the id of a JPEG kept on the device
    crop: CropAnswer | None = None  # a crop rule's: the answer on the object's crop that made it hold
    WIRE_OPTIONAL = ("crop",)


class AlertState(_Body):
    """A rule's retained state topic: whether its condition holds on the camera now."""

    v: Version
    device: Ident
    camera: Ident
    rule: str
    on: bool
    since: Time
    alert: Ulid | None = None  # the alert that set this state
    policy_version: str


class Command(_Body):
    """``{p}/commands/{site}/{line}/{device}``: a line controller steers one rule on one
    camera. The topic says who may send it (the broker's ACL); ``device`` must name the
    device whose topic it arrived on. ``minutes`` goes with ``mute`` only; ``alert``
    with ``ack`` only (without it, the rule's latest alert on the camera). ``id`` is the
    sender's own and comes back in the :class:`CommandResult`."""

    v: Version
    device: Ident
    camera: Ident
    rule: Ident
    op: Literal[COMMAND_OPS]  # type: ignore[valid-type]
    minutes: float | None = Field(default=None, gt=0, le=MAX_MUTE_MINUTES)
    alert: Ulid | None = None
    id: Ident | None = None

    @model_validator(mode="after")
    def _arguments(self) -> "Command":
        if (self.op == "mute") != (self.minutes is not None):
            raise ValueError("minutes: needed with op mute, and with no other op")
        if self.alert is not None and self.op != "ack":
            raise ValueError("alert: only with op ack")
        return self


class CommandResult(_Body):
    """``{p}/commands/{site}/{line}/{device}/result``: what became of a command, accepted
    (``ok``) or refused with a reason from :data:`REASONS` or :data:`COMMAND_REASONS`."""

    v: Version
    device: Ident
    id: Ident | None = None
    source: Literal["mqtt", "sparkplug"]
    camera: str | None = None
    rule: str | None = None
    op: str | None = None
    ok: bool
    reason: str | None = None
    detail: str | None = Field(default=None, max_length=512)
    at: Time
    muted_until: Time | None = None


class RuleSummary(_Body):
    """One rule of a :class:`CameraSummary`."""

    on: bool | None = None  # a level rule's state (present, every); None for object rules
    enabled: bool = True
    muted_until: Time | None = None
    acknowledged: bool = False  # the rule's latest alert was acknowledged
    count: Count = 0  # the rule's events so far (since the policy that defines it took effect)


class CameraSummary(_Body):
    """``{p}/alerts/{site}/{line}/{camera}/summary``, retained: the camera's health and
    every rule's state at a glance (what Home Assistant's entities read)."""

    v: Version
    device: Ident
    camera: Ident
    at: Time
    state: str  # the capture state: live, stale, frozen, reopening, ended, failed
    ok: bool  # neither blind nor tampered
    policy_version: str | None = None
    model_version: str | None = None
    rules: dict[Ident, RuleSummary] = {}


def decode_command(data: bytes, *, device: str) -> Command:
    """A command received on ``device``'s command topic, or ContractError."""
    return _decode(Command, data, limit=MAX_COMMAND_BYTES, device=device)


def decode_command_result(data: bytes) -> CommandResult:
    """A device's answer to a command, as the controller receives it, or ContractError."""
    return _decode(CommandResult, data, limit=MAX_COMMAND_BYTES, device=None)


def decode_camera_summary(data: bytes) -> CameraSummary:
    """A camera's summary as a controller receives it, or ContractError."""
    return _decode(CameraSummary, data, limit=MAX_SUMMARY_BYTES, device=None)


def decode_alert(data: bytes) -> Alert:
    """An alert as a line controller receives it, or ContractError."""
    return _decode(Alert, data, limit=MAX_ALERT_BYTES, device=None)


def decode_alert_state(data: bytes) -> AlertState:
    """A rule's retained state as a line controller receives it, or ContractError."""
    return _decode(AlertState, data, limit=MAX_ALERT_BYTES, device=None)


Body = TypeVar("Body", bound=_Body)


def canonical(doc: Any) -> bytes:
    """The one byte form a signature covers: sorted keys, no spaces, UTF-8."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode()


def ha_object_id(value: str) -> str:
    """``value`` as a Home Assistant discovery object or component id (``[a-zA-Z0-9_-]``)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", value)


def encode(body: _Body) -> bytes:
    """A body as compact JSON bytes."""
    empty = {name for name in body.WIRE_OPTIONAL if not getattr(body, name)}
    return body.model_dump_json(exclude=empty or None).encode()


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


def batch_id_of(data: bytes) -> str | None:
    """The batch id of a body that may break the contract, if it names one plainly (so the
    fleet can tell the device which batch it refuses); None when it does not."""
    if len(data) > MAX_BATCH_BYTES:
        return None
    try:
        body = from_json(data)
    except ValueError:
        return None
    batch = body.get("batch") if isinstance(body, dict) else None
    return batch if isinstance(batch, str) and re.fullmatch(ULID_PATTERN, batch) else None


def decode_ack(data: bytes, *, device: str) -> Ack:
    """An ack received on ``device``'s ack topic, or ContractError."""
    return _decode(Ack, data, limit=MAX_ACK_BYTES, device=device)


def decode_status(data: bytes, *, device: str) -> Status:
    """A status received on ``device``'s status topic, or ContractError."""
    return _decode(Status, data, limit=MAX_STATUS_BYTES, device=device)


def decode_ingest_online(data: bytes) -> IngestOnline:
    """A manager's announcement that its ingest is subscribed, or ContractError."""
    return _decode(IngestOnline, data, limit=MAX_INGEST_ONLINE_BYTES, device=None)


def decode_desired(data: bytes, *, device: str) -> Desired:
    """A desired state received on ``device``'s desired topic, or ContractError."""
    return _decode(Desired, data, limit=MAX_DESIRED_BYTES, device=device)


def decode_reported(data: bytes, *, device: str) -> Reported:
    """A reported state received on ``device``'s reported topic, or ContractError."""
    return _decode(Reported, data, limit=MAX_REPORTED_BYTES, device=device)


def decode_job(data: bytes, *, device: str, job: str) -> JobStatus:
    """A job status received on ``{p}/dev/{device}/job/{job}``, or ContractError."""
    body = _decode(JobStatus, data, limit=MAX_JOB_BYTES, device=device)
    if body.job != job:
        raise ContractError("schema", f"body names job {body.job!r} on job {job!r}'s topic")
    return body


def decode_artifact_request(data: bytes, topics: Topics, *, device: str) -> ArtifactRequest:
    """A chunk request received on ``device``'s request topic, or ContractError; its
    response topic must be the device's own."""
    body = _decode(ArtifactRequest, data, limit=MAX_ARTIFACT_REQUEST_BYTES, device=device)
    if body.response_topic != topics.artifact(body.device, body.sha256):
        raise ContractError("wrong_device", f"response topic {body.response_topic!r} is not the device's own")
    return body


def encode_chunk(header: ChunkHeader | ReviewChunk, data: bytes = b"") -> bytes:
    """A chunk on the wire (an artifact's or a snapshot's): the header as one JSON line,
    then the raw bytes.

    Raw, not base64: a 3 MB model would otherwise cost a third more through the broker.
    """
    if len(data) > MAX_CHUNK_BYTES:
        raise ValueError(f"chunk of {len(data)} bytes > {MAX_CHUNK_BYTES}")
    return encode(header) + b"\n" + data


_Chunk = TypeVar("_Chunk", ChunkHeader, ReviewChunk)


def _decode_framed(model: type[_Chunk], data: bytes, device: str | None) -> tuple[_Chunk, bytes]:
    end = data.find(b"\n", 0, MAX_CHUNK_HEADER_BYTES)
    if end < 0:
        raise ContractError("malformed_json", "no header line")
    payload = data[end + 1:]
    if len(payload) > MAX_CHUNK_BYTES:
        raise ContractError("oversized", f"{len(payload)} bytes of data > {MAX_CHUNK_BYTES}")
    header = _decode(model, data[:end], limit=MAX_CHUNK_HEADER_BYTES, device=device)
    if header.error is not None and payload:
        raise ContractError("schema", "a chunk with an error carries no data")
    if header.offset + len(payload) > header.total:
        raise ContractError("schema", f"chunk ends at {header.offset + len(payload)} > total {header.total}")
    return header, payload


def decode_chunk(data: bytes) -> tuple[ChunkHeader, bytes]:
    """A chunk's header and bytes, or ContractError."""
    return _decode_framed(ChunkHeader, data, None)


def decode_review_request(data: bytes, topics: Topics, *, device: str, operator: str) -> ReviewRequest:
    """A snapshot fetch that arrived on ``{p}/dev/{device}/review/get/{operator}``, or
    ContractError (``wrong_device`` for another device, operator or reply topic)."""
    body = _decode(ReviewRequest, data, limit=MAX_REVIEW_REQUEST_BYTES, device=device)
    if body.operator != operator:
        raise ContractError("wrong_device", f"body names operator {body.operator!r} on {operator!r}'s topic")
    if body.reply_topic != topics.review_reply(device, operator, body.request):
        raise ContractError("wrong_device", f"reply topic {body.reply_topic!r} is not {operator!r}'s own")
    return body


def decode_review_chunk(data: bytes, *, device: str) -> tuple[ReviewChunk, bytes]:
    """A snapshot chunk from ``device``'s reply topic, or ContractError."""
    header, payload = _decode_framed(ReviewChunk, data, device)
    if header.error is None and header.sha256 is None:
        raise ContractError("schema", "a chunk with data names the snapshot's sha256")
    return header, payload


def decode_rpc_request(data: bytes) -> RpcRequest:
    """An operator request, or ContractError."""
    return _decode(RpcRequest, data, limit=MAX_RPC_BYTES, device=None)


def decode_rpc_response(data: bytes) -> RpcResponse:
    """The fleet's answer to a request, or ContractError."""
    return _decode(RpcResponse, data, limit=MAX_RPC_BYTES, device=None)


def loads(data: bytes | str) -> Any:
    """JSON as the contract reads it, or ContractError.

    ``malformed_json`` for anything that is not UTF-8 JSON; ``non_finite`` for ``NaN``,
    ``Infinity``, ``-Infinity`` (not JSON, though many parsers take them) and for a
    number beyond a float's range, such as ``1e999``, which a parser would otherwise
    turn into Infinity.
    """
    raw = data.encode() if isinstance(data, str) else data
    try:
        doc = from_json(raw, allow_inf_nan=False)
    except ValueError as exc:
        if _non_finite(raw):
            raise ContractError("non_finite", f"NaN, Infinity or a number out of range: {exc}") from None
        raise ContractError("malformed_json", str(exc)) from None
    if _may_overflow(raw) and not _finite(doc):
        raise ContractError("non_finite", "a number beyond a float's range")
    return doc


class _NonFinite(Exception):
    pass


def _non_finite_constant(name: str) -> Any:
    raise _NonFinite(name)


def _non_finite(raw: bytes) -> bool:
    """Whether the strict parser refused ``raw`` for a number alone: Python's own parser
    reads NaN and Infinity, and refuses an integer of thousands of digits with a plain
    ValueError (not a JSONDecodeError)."""
    try:
        json.loads(raw, parse_constant=_non_finite_constant)
    except _NonFinite:
        return True
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return False
    except ValueError:  # "Exceeds the limit (4300 digits) for integer string conversion"
        return True
    return False  # JSON, but not UTF-8 (Python also reads UTF-16 and UTF-32)


# A number passes a float's range (about 1.8e308) only with an exponent of three digits
# or more, or with at least 210 digits before its point. With digits made "0", "E" made
# "e" and "+" dropped, both shapes are found with a plain search of the raw bytes; only
# then is the parsed document walked.
_NUMBER_SHAPE = bytes.maketrans(b"123456789E", b"000000000e")
_BEFORE_NUMBER = b"-:,[ \t\r\n"
_MAX_FLOAT_INT = int(sys.float_info.max)


def _may_overflow(raw: bytes) -> bool:
    shape = raw.translate(_NUMBER_SHAPE, b"+")
    if b"0" * 210 in shape:
        return True
    at = shape.find(b"e000")
    while at >= 0:
        start = at
        while start and shape[start - 1] in b"0.":
            start -= 1
        # digits right after a delimiter: a number, not the inside of an id like 01J5E123...
        if start < at and (start == 0 or shape[start - 1] in _BEFORE_NUMBER):
            return True
        at = shape.find(b"e000", at + 1)
    return False


def _finite(doc: Any) -> bool:
    stack = [doc]
    while stack:
        value = stack.pop()
        kind = type(value)
        if kind is dict:
            stack.extend(value.values())
        elif kind is list:
            stack.extend(value)
        elif kind is float:
            if not math.isfinite(value):
                return False
        elif kind is int and abs(value) > _MAX_FLOAT_INT:
            return False
    return True


def _decode(model: type[Body], data: bytes, *, limit: int, device: str | None) -> Body:
    if len(data) > limit:
        raise ContractError("oversized", f"{len(data)} bytes > {limit}")
    doc = loads(data)
    try:
        body = model.model_validate(doc)
    except ValidationError as exc:
        raise ContractError(*_reason(exc)) from None
    if device is not None and body.device != device:  # type: ignore[attr-defined]
        raise ContractError("wrong_device", f"body names {body.device!r} on {device!r}'s topic")  # type: ignore[attr-defined]
    return body


def _reason(exc: ValidationError) -> tuple[str, str]:
    errors = exc.errors(include_url=False)
    first = errors[0]
    # a body of another version is judged by its version alone: its other keys may differ
    for err in errors:
        if err["loc"][:1] == ("v",):
            return "bad_version", "expected \"v\": 1"
    where = ".".join(str(p) for p in first["loc"]) or "body"
    if first["type"] == "too_long":
        return "oversized", f"{where}: {first['msg']}"
    return "schema", f"{where}: {first['msg']}"
