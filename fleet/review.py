"""Review of unsure and alert frames: the metadata side, in the fleet store.

A device keeps the JPEG; the fleet store holds what the device already syncs about it
(the snapshot's id and sha256 in a ``decision`` or ``alert`` event, with the model and
policy versions that produced it). Here an operator lists those cases and records a
verdict on one as a ``review`` event, tied to the same device, camera, model version
and policy version. The pixels never pass through the manager: an operator fetches
them from the device itself (:meth:`fleet.client.FleetClient.fetch_snapshot`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from edge.core.contract import ID_PATTERN, ULID_PATTERN
from edge.core.ids import new_id

from .errors import OpError
from .rpc import Op, _Args
from .store import Store

KINDS = {"unsure": ("decision",), "alert": ("alert",), None: ("decision", "alert")}
MAX_LIST = 1000


class ListArgs(_Args):
    device: str | None = Field(default=None, pattern=ID_PATTERN)
    outcome: Literal["unsure", "alert"] | None = None
    limit: int = Field(default=50, gt=0, le=MAX_LIST)


class SnapshotArgs(_Args):
    snapshot: str = Field(pattern=ULID_PATTERN)


class LabelArgs(_Args):
    snapshot: str = Field(pattern=ULID_PATTERN)
    label: str = Field(min_length=1, max_length=128, pattern=r"^[^\s].*$")
    note: str | None = Field(default=None, max_length=1000)


class LabelsArgs(_Args):
    device: str | None = Field(default=None, pattern=ID_PATTERN)
    limit: int = Field(default=MAX_LIST, gt=0, le=MAX_LIST)


def case(event: dict[str, Any]) -> dict[str, Any]:
    """A decision or alert event naming a snapshot, as a review case."""
    p = event["payload"]
    alert = event["kind"] == "alert"
    return {"snapshot": p["snapshot"], "sha256": p["snapshot_sha256"], "device": event["device"],
            "camera": event["camera"], "captured_at": event["captured_at"],
            "outcome": "alert" if alert else p.get("outcome"), "rule": p.get("rule") if alert else None,
            "label": p.get("label"), "score": p.get("confidence") if alert else p.get("score"),
            "box": p.get("box"), "model": p.get("model"), "model_version": p.get("model_version"),
            "policy_version": p.get("policy_version"), "event": event["id"]}


def verdicts(store: Store, device: str | None = None, limit: int = MAX_LIST) -> dict[str, dict[str, Any]]:
    """The latest review of each snapshot, by snapshot id."""
    latest: dict[str, dict[str, Any]] = {}
    for event in store.snapshot_events(device=device, kinds=("review",), limit=limit):
        latest[event["payload"]["snapshot"]] = event["payload"]  # oldest first: the last one wins
    return latest


def find(store: Store, snapshot: str) -> dict[str, Any]:
    """The case of ``snapshot``, or OpError ``not_found``."""
    found = store.snapshot_events(snapshot=snapshot, limit=1)
    if not found:
        raise OpError("not_found", f"no snapshot {snapshot} in the fleet store: no device reported keeping it")
    return case(found[0])


def list_cases(store: Store, a: ListArgs) -> list[dict[str, Any]]:
    cases = [case(e) for e in store.snapshot_events(device=a.device, kinds=KINDS[a.outcome], limit=a.limit)]
    if a.outcome == "unsure":
        cases = [c for c in cases if c["outcome"] == "unsure"]
    reviewed = verdicts(store, a.device)
    return [{**c, "review": reviewed.get(c["snapshot"])} for c in cases]


def label(store: Store, a: LabelArgs, by: str, now: float) -> dict[str, Any]:
    """Record ``by``'s verdict on a known snapshot as a ``review`` event."""
    c = find(store, a.snapshot)
    payload = {"snapshot": c["snapshot"], "snapshot_sha256": c["sha256"], "label": a.label, "note": a.note,
               "by": by, "at": now, "outcome": c["outcome"], "rule": c["rule"], "predicted": c["label"],
               "score": c["score"], "model": c["model"], "model_version": c["model_version"],
               "policy_version": c["policy_version"], "event": c["event"]}
    event = new_id()
    store.add_event(id=event, device=c["device"], kind="review", camera=c["camera"], captured_at=c["captured_at"],
                    payload=payload, now=now)
    return {"id": event, **payload, "device": c["device"], "camera": c["camera"]}


def labelled(store: Store, a: LabelsArgs) -> list[dict[str, Any]]:
    """Every labelled case (its latest verdict), for an export."""
    out = []
    for snapshot, verdict in verdicts(store, a.device, a.limit).items():
        found = store.snapshot_events(snapshot=snapshot, limit=1)
        if found:
            out.append({**case(found[0]), "review": verdict})
    return out


def operations(store: Store) -> dict[str, Op]:
    """The review operations of the manager's RPC."""
    return {
        "review.list": Op(ListArgs, lambda a, by, now: list_cases(store, a)),
        "review.show": Op(SnapshotArgs, lambda a, by, now: {**find(store, a.snapshot),
                                                             "review": verdicts(store).get(a.snapshot)}),
        "review.label": Op(LabelArgs, lambda a, by, now: label(store, a, by, now)),
        "review.labels": Op(LabelsArgs, lambda a, by, now: labelled(store, a)),
    }
