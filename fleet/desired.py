"""Per-device desired state: what the fleet wants running, versioned and retained.

Every change makes a new :class:`~edge.core.contract.Desired` with a higher version, is
committed to the store, and only then published retained on the device's desired
topic, so a device that is offline finds it when it returns. Versions are
``max(previous + 1, now in ms)``: they keep growing even if the store were rebuilt,
and a device ignores any version not above the last it acted on.
"""

from __future__ import annotations

from typing import Any, Mapping

from edge.core.contract import POLICY_SLOT, Assignment, Desired, Reported, loads


class DesiredBook:
    """Desired and reported state of every device, in memory, backed by the store."""

    def __init__(self, desired: list[Desired], reported: list[Reported]) -> None:
        self.desired: dict[str, Desired] = {d.device: d for d in desired}
        self.reported: dict[str, Reported] = {r.device: r for r in reported}
        self._unpublished: dict[str, Desired] = {}

    def slot(self, device: str, slot: str) -> Assignment | None:
        doc = self.desired.get(device)
        if doc is None:
            return None
        return doc.policy if slot == POLICY_SLOT else doc.models.get(slot)

    def running(self, device: str, slot: str) -> str | None:
        """The sha256 the device last reported running in ``slot``."""
        rep = self.reported.get(device)
        if rep is None:
            return None
        run = rep.policy if slot == POLICY_SLOT else rep.models.get(slot)
        return run.sha256 if run else None

    def assign(self, device: str, slot: str, assignment: Assignment, now: float) -> Desired:
        """A new desired state for ``device`` with ``slot`` set; other slots kept."""
        old = self.desired.get(device)
        version = max((old.version + 1) if old else 1, int(now * 1000))
        models = dict(old.models) if old else {}
        policy = old.policy if old else None
        if slot == POLICY_SLOT:
            policy = assignment
        else:
            models[slot] = assignment
        doc = Desired(v=1, device=device, version=version, at=now, models=models, policy=policy)
        self.desired[device] = doc
        self._unpublished[device] = doc
        return doc

    def take_unpublished(self) -> list[Desired]:
        docs, self._unpublished = list(self._unpublished.values()), {}
        return docs

    def all(self) -> list[Desired]:
        return list(self.desired.values())


def desired_row(doc: Desired) -> dict[str, Any]:
    return {"device": doc.device, "version": doc.version, "doc": doc.model_dump_json(), "updated_at": doc.at}


def reported_row(doc: Reported, received_at: float) -> dict[str, Any]:
    return {"device": doc.device, "doc": doc.model_dump_json(), "at": doc.at, "received_at": received_at}


def load_desired(row: Mapping[str, Any]) -> Desired:
    """A ``desired`` row's document, decoded as a device would; ValueError if it does not hold one."""
    return _doc(Desired, row)


def load_reported(row: Mapping[str, Any]) -> Reported:
    """A ``reported`` row's document; ValueError if it does not hold one."""
    return _doc(Reported, row)


def _doc(model: type[Desired] | type[Reported], row: Mapping[str, Any]) -> Any:
    doc = model.model_validate(loads(row["doc"]))
    if doc.device != row["device"]:
        raise ValueError(f"the document names device {doc.device!r}")
    return doc
