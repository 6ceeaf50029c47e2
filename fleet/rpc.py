"""Operator requests: one function per operation, arguments validated, identity checked.

The identity is the topic level the request arrived on (``{p}/fleet/rpc/{identity}``),
which the broker's ACL lets only that identity write; every operation needs an
identity the manager was started with (``--operator``) or one enrolled as an operator
(``fleet identities add NAME --role operator``) and not revoked. A refused or failed request is answered
with an error code and a message and changes nothing.
"""

from __future__ import annotations

import base64
import binascii
import logging
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge.core.contract import ID_PATTERN, MAX_CHUNK_BYTES, RpcError, RpcRequest, RpcResponse

from . import __version__
from .errors import OpError
from .registry import Registry
from .rollouts import Engine, StartRequest

log = logging.getLogger("fleet.rpc")

UPLOAD_CHUNK_BYTES = MAX_CHUNK_BYTES  # raw bytes per upload request (base64 in the body)


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class NoArgs(_Args):
    pass


class UploadArgs(_Args):
    sha256: str
    size: int = Field(gt=0)
    offset: int = Field(ge=0)
    data: str = Field(max_length=4 * UPLOAD_CHUNK_BYTES // 3 + 4)


class HasArgs(_Args):
    sha256: str


class PushArgs(_Args):
    kind: str = Field(pattern="^(model|policy)$")
    name: str = Field(min_length=1, max_length=128, pattern=r"^[^\s/]+$")
    version: str = Field(min_length=1, max_length=64, pattern=r"^[^\s/@]+$")
    sha256: str
    manifest: dict[str, Any] | None = None


class ListArgs(_Args):
    kind: str | None = Field(default=None, pattern="^(model|policy)$")
    name: str | None = None


class ShowArgs(_Args):
    kind: str = Field(default="model", pattern="^(model|policy)$")
    name: str
    version: str | None = None


class RolloutArgs(_Args):
    id: str


class AbortArgs(_Args):
    id: str
    reason: str | None = Field(default=None, max_length=500)


class RollbackArgs(_Args):
    id: str
    device: str | None = Field(default=None, pattern=ID_PATTERN)


class DeviceArgs(_Args):
    id: str = Field(pattern=ID_PATTERN)


@dataclass(frozen=True)
class Op:
    args: type[BaseModel]
    run: Callable[[Any, str, float], Any]


class Operations:
    """Dispatches requests to the engine and the registry (on the control thread)."""

    def __init__(self, engine: Engine, registry: Registry, operators: frozenset[str],
                 stats: Callable[[], dict[str, Any]]) -> None:
        self.engine = engine
        self.registry = registry
        self.operators = operators
        self._stats = stats
        self.ops: dict[str, Op] = {
            "ping": Op(NoArgs, lambda a, by, now: {"version": __version__, "identity": by}),
            "stats": Op(NoArgs, lambda a, by, now: self._stats()),
            "artifacts.upload": Op(UploadArgs, self._upload),
            "artifacts.has": Op(HasArgs, lambda a, by, now: {"stored": registry.has_bytes(a.sha256)}),
            "artifacts.push": Op(PushArgs, self._push),
            "artifacts.list": Op(ListArgs, lambda a, by, now: [_summary(d) for d in
                                                              engine.store.artifacts(a.kind, a.name)]),
            "artifacts.show": Op(ShowArgs, self._show),
            "rollouts.start": Op(StartRequest, lambda a, by, now: engine.status(engine.start(a, by=by, now=now))),
            "rollouts.pause": Op(RolloutArgs, lambda a, by, now: engine.status(engine.pause(a.id, now))),
            "rollouts.resume": Op(RolloutArgs, lambda a, by, now: engine.status(engine.resume(a.id, now))),
            "rollouts.abort": Op(AbortArgs, lambda a, by, now: engine.status(
                engine.abort(a.id, by=by, reason=a.reason, now=now))),
            "rollouts.rollback": Op(RollbackArgs, lambda a, by, now: engine.status(
                engine.rollback(a.id, device=a.device, by=by, now=now))),
            "rollouts.status": Op(RolloutArgs, lambda a, by, now: engine.status(engine.get(a.id))),
            "rollouts.list": Op(NoArgs, lambda a, by, now: [
                {k: v for k, v in engine.status(r).items() if k not in ("stages", "failures")}
                for r in sorted(engine.rollouts.values(), key=lambda r: r.seq)]),
            "devices.list": Op(NoArgs, lambda a, by, now: engine.store.devices()),
            "devices.show": Op(DeviceArgs, lambda a, by, now: engine.device_view(a.id)),
        }
        from .review import operations as review_operations  # it builds on this module's Op

        self.ops.update(review_operations(engine.store))

    def handle(self, identity: str, req: RpcRequest, now: float) -> RpcResponse:
        try:
            if not self._operator(identity):
                raise OpError("forbidden", f"identity {identity!r} is not an operator of this fleet")
            op = self.ops.get(req.op)
            if op is None:
                raise OpError("bad_request", f"unknown operation {req.op!r}")
            args = parse_args(op.args, req.args)
            result = op.run(args, identity, now)
        except OpError as exc:
            log.info("request refused", extra={"fields": {"op": req.op, "identity": identity, "code": exc.code,
                                                           "error": str(exc)}})
            return RpcResponse(v=1, id=req.id, ok=False, error=RpcError(code=exc.code, message=str(exc)))
        return RpcResponse(v=1, id=req.id, ok=True, result=result)

    def _operator(self, identity: str) -> bool:
        if identity in self.operators:
            return True
        enrolled = self.engine.store.identity(identity)
        return enrolled is not None and enrolled.role == "operator" and enrolled.state == "enrolled"

    def _upload(self, a: UploadArgs, by: str, now: float) -> dict[str, Any]:
        try:
            data = base64.b64decode(a.data, validate=True)
        except (binascii.Error, ValueError):
            raise OpError("bad_request", "data is not base64") from None
        return {"received": self.registry.upload(a.sha256, a.size, a.offset, data)}

    def _push(self, a: PushArgs, by: str, now: float) -> dict[str, Any]:
        pushed = self.registry.push(kind=a.kind, name=a.name, version=a.version, sha256=a.sha256,
                                    manifest=a.manifest, by=by, now=now)
        return {**_summary(pushed.artifact.model_dump()), "created": pushed.created}

    def _show(self, a: ShowArgs, by: str, now: float) -> list[dict[str, Any]]:
        found = [d for d in self.engine.store.artifacts(a.kind, a.name) if a.version in (None, d["version"])]
        if not found:
            raise OpError("not_found", f"unknown {a.kind} {a.name}" + (f"@{a.version}" if a.version else ""))
        return found


def _summary(doc: dict[str, Any]) -> dict[str, Any]:
    """An artifact without its manifest's bulk (labels)."""
    manifest = doc.get("manifest") or {}
    return {k: v for k, v in doc.items() if k not in ("manifest", "signature")} | {
        "task": manifest.get("task"), "labels": len(manifest.get("labels", [])), "signed": bool(doc.get("signature"))}


def parse_args(model: type[BaseModel], args: dict[str, Any]) -> Any:
    try:
        return model.model_validate(args)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "args"
        raise OpError("bad_request", f"{where}: {first['msg']}") from None
