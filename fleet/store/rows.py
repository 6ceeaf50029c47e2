"""What a stored row must hold to be read, and the loaders that check it.

No row may poison its reader. Every read goes through a row model or loader
(:class:`Skips`): a row that does not load (written by an older version, edited by
hand) is skipped, counted by table and logged, and the read goes on. Row models and
loaders take a row as a mapping of column to value, whatever database it came from.
"""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any, Callable, Iterable, Literal, Mapping, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError

from edge.core.contract import Artifact, Count, Time, loads
from edge.core.logs import fields

log = logging.getLogger("fleet.store")
T = TypeVar("T")
Loader = Callable[[Mapping[str, Any]], T]

EVENT_COLUMNS = ("id", "device", "seq", "kind", "camera", "captured_at", "recorded_at", "priority",
                 "payload", "received_at")
DEVICE_COLUMNS = ("id", "state", "site", "line", "runtime", "models", "status_at", "first_seen",
                  "last_seen", "events", "clock_skew_s")


class Skips:
    """Rows that do not load, by table: each left out, counted once and logged once (a
    row read again, as the device registry is on every tick of a rollout, is not news)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.counts: dict[str, int] = {}
        self._seen: set[int] = set()

    def load(self, table: str, rows: Iterable[Mapping[str, Any]], loader: Loader[T]) -> list[T]:
        """Each row through ``loader``, in order, without the rows it refuses."""
        loaded: list[T] = []
        new, first = 0, ""
        for row in rows:
            try:
                loaded.append(loader(row))
            except Exception as exc:  # whatever a row holds, the read goes on
                key = hash((table, repr(row)))
                if key not in self._seen:
                    self._seen.add(key)
                    new += 1
                    first = first or f"{_row_key(row)}: {_why(exc)}"
        if new:
            self.counts[table] = self.counts.get(table, 0) + new
            log.warning(self.what, extra=fields(table=table, rows=new, first=first[:300]))
        return loaded


def _row_key(row: Mapping[str, Any]) -> str:
    keys = [f"{k}={row[k]!r}" for k in ("rowid", "id", "rollout", "device", "job") if k in row]
    return " ".join(keys) or "row"


def _why(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        err = exc.errors(include_url=False)[0]
        return f"{'.'.join(str(p) for p in err['loc']) or 'row'}: {err['msg']}"
    return f"{type(exc).__name__}: {exc}"


def _json_column(value: Any) -> Any:
    return loads(value) if isinstance(value, str) else value


class _Row(BaseModel):
    # strict: a text in a REAL column (SQLite keeps what it is given) is no time
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


JsonColumn = BeforeValidator(_json_column)


class EventRow(_Row):
    """A stored event, as ``fleet events tail`` shows it."""

    rowid: int
    id: str
    device: str
    seq: int
    kind: str  # not only today's kinds: a newer device may know more
    camera: str | None
    captured_at: Time
    recorded_at: Time
    priority: int
    payload: Annotated[dict[str, Any], JsonColumn]
    received_at: Time


class DeviceRow(_Row):
    """A device in the registry."""

    id: str
    state: str | None
    site: str | None
    line: str | None
    runtime: str | None
    models: Annotated[dict[str, str], BeforeValidator(lambda v: {} if v is None else _json_column(v))]
    status_at: Time | None
    first_seen: Time
    last_seen: Time
    events: Count
    state_since: Time | None
    clock_skew_s: float | None = None


class JobRow(_Row):
    """A job status as a device sent it."""

    device: str
    job: str
    slot: str | None
    sha256: str | None
    state: str
    reason: str | None
    at: Time | None
    received_at: Time


class IdentityRow(_Row):
    """A broker identity in the registry (see ``fleet.identities``)."""

    name: str
    role: Literal["device", "manager", "operator", "controller", "admin"]
    site: str | None
    line: str | None
    tags: Annotated[dict[str, str], JsonColumn]
    credential: Literal["certificate", "password"]
    serials: Annotated[list[str], JsonColumn]  # hex, one per connection
    retired_serials: Annotated[list[str], JsonColumn] = []  # of the name's earlier credentials: always revoked
    password_hash: str | None
    not_after: Time | None
    state: Literal["enrolled", "revoked"]
    created_at: Time
    revoked_at: Time | None

    def row(self) -> dict[str, Any]:
        return {**self.model_dump(), "tags": json.dumps(self.tags), "serials": json.dumps(self.serials),
                "retired_serials": json.dumps(self.retired_serials)}


def load_job(row: Mapping[str, Any]) -> dict[str, Any]:
    return JobRow.model_validate(row).model_dump()


def load_artifact(row: Mapping[str, Any]) -> Artifact:
    return Artifact.model_validate(loads(row["doc"]))


def load_event(row: Mapping[str, Any]) -> dict[str, Any]:
    return EventRow.model_validate(row).model_dump()


def artifact_listing(row: Mapping[str, Any]) -> dict[str, Any]:
    return {**load_artifact(row).model_dump(), "pushed_at": row["pushed_at"], "pushed_by": row["pushed_by"]}
