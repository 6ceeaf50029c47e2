"""The artifact registry: validated, signed models and policies, stored by sha256.

An artifact's bytes live in ``<dir>/<sha256>`` (content-addressed, written once by an
atomic rename); its signed description (:class:`~edge.core.contract.Artifact`) lives in the
store. A version is immutable: pushing the same name and version again with the same
bytes changes nothing, with different bytes it is refused.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge.core.contract import MAX_ARTIFACT_DOC_BYTES, SHA256_PATTERN, Artifact, Desired, canonical, loads
from edge.core.logs import fields
from edge.core.signing import SignatureError, sha256_file, sign, verify, verify_file
from edge.decide.policy import PolicyError, parse_policy

from .errors import OpError
from .store import Conflict, Store

log = logging.getLogger("fleet.registry")

MAX_ARTIFACT_BYTES = 256 * 1024 * 1024


class ArtifactError(OpError):
    """An artifact that cannot be accepted or served; ``code`` names why."""


def validate_model(path: Path, manifest: dict[str, Any] | str | Path | None) -> dict[str, Any]:
    """Load ``path`` with LiteRT and check the manifest against its tensors; returns the
    manifest as JSON-ready data with its labels inline. ``manifest`` is a file, a parsed
    manifest, or None (beside the model, else guessed from the tensors)."""
    from edge.core.errors import ModelError
    from edge.inference.manifest import Manifest
    from edge.inference.model import Model
    from edge.inference.runtime import load_interpreter

    try:
        if isinstance(manifest, dict):
            model = Model(load_interpreter(path, num_threads=1), Manifest.model_validate(manifest))
        else:
            model = Model.load(path, manifest=manifest, num_threads=1)
    except ModelError as exc:
        raise ArtifactError("invalid_artifact", f"model rejected: {exc}") from None
    except ValueError as exc:  # pydantic: a manifest with wrong fields
        raise ArtifactError("invalid_artifact", f"manifest rejected: {exc}") from None
    return model.manifest.model_dump(mode="json")


def validate_policy(path: Path) -> str:
    """Check a policy document with the edge's own parser; returns its version."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ArtifactError("invalid_artifact", f"cannot read policy {path.name}: {exc}") from None
    try:
        return str(parse_policy(text, source=path.name).version)
    except PolicyError as exc:
        raise ArtifactError("invalid_artifact", f"policy rejected: {exc}") from None


@dataclass(frozen=True)
class Pushed:
    artifact: Artifact
    created: bool  # False: this exact version was already there


class Registry:
    """Artifacts on disk and in the store; signs with the fleet's private key."""

    def __init__(self, store: Store, directory: Path, key: Ed25519PrivateKey | None,
                 vouched: Sequence[Ed25519PublicKey] = ()) -> None:
        self.store = store
        self.directory = directory
        self.uploads = directory / "uploads"
        self.uploads.mkdir(parents=True, exist_ok=True)
        self._key = key
        self.public_key: Ed25519PublicKey | None = key.public_key() if key else None
        self.vouched = list(vouched)  # the previous key, after a switch, while devices still pin it
        self.resigned = self._resign()

    def current(self, art: Artifact) -> Artifact:
        """``art`` as the registry signs it now (signed again after a key switch)."""
        return self.resigned.get((art.kind, art.name, art.version), art)

    def _resign(self) -> dict[tuple[str, str, str], Artifact]:
        """After a key switch: every artifact signed by a key the fleet still vouches
        for, but not by the signing key, is signed again with it (so devices that drop the
        old key still take it). One signed by a retired or unknown key is left as it is,
        and refused by :meth:`check` and by every device. Returns the new ones by kind, name and version."""
        out: dict[tuple[str, str, str], Artifact] = {}
        if self._key is None or not self.vouched:
            return out
        for art in self.store.all_artifacts():
            try:
                verify(self.public_key, art)
                continue
            except SignatureError:
                pass
            try:
                verify(self.vouched, art)
            except SignatureError:
                log.warning("artifact signed by a key the fleet no longer vouches for; left as it is",
                            extra=fields(name=art.name, version=art.version, sha256=art.sha256))
                continue
            new = sign(self._key, art)
            self.store.resign_artifact(new)
            out[(art.kind, art.name, art.version)] = new
        if out:
            log.info("artifacts signed again with the signing key", extra=fields(artifacts=len(out)))
        return out

    def path(self, sha256: str) -> Path:
        return self.directory / sha256

    def has_bytes(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    # --- uploads: bytes arrive in pieces over RPC, in order ----------------------------

    def upload(self, sha256: str, size: int, offset: int, data: bytes) -> int:
        """Append ``data`` at ``offset`` of the upload of ``sha256``; returns bytes held."""
        _check_sha(sha256)
        if not 0 < size <= MAX_ARTIFACT_BYTES:
            raise ArtifactError("bad_request", f"size must be 1..{MAX_ARTIFACT_BYTES} bytes")
        if self.has_bytes(sha256):
            return size
        part = self.uploads / f"{sha256}.part"
        held = part.stat().st_size if part.exists() else 0
        if offset == 0:
            held = 0
        elif offset != held:
            raise ArtifactError("bad_request", f"upload of {sha256[:12]}… holds {held} bytes, not {offset}")
        if offset + len(data) > size:
            raise ArtifactError("bad_request", f"upload runs past its size {size}")
        with open(part, "r+b" if offset else "wb") as f:
            f.seek(offset)
            f.write(data)
            f.truncate()
        held = offset + len(data)
        if held == size:
            self._finish_upload(part, sha256)
        return held

    def _finish_upload(self, part: Path, sha256: str) -> None:
        digest = sha256_file(part)
        if digest != sha256:
            part.unlink()
            raise ArtifactError("invalid_artifact", f"uploaded bytes hash to {digest[:12]}…, not {sha256[:12]}…"
                                                   " (tampered or corrupted in transit); upload discarded")
        with open(part, "rb") as f:
            os.fsync(f.fileno())
        self.store.put_blob(sha256, part.read_bytes())  # for whichever manager runs the rollouts next
        os.replace(part, self.path(sha256))

    def materialize(self) -> int:
        """Write every artifact the store holds but this directory lacks (a manager taking
        over from another); returns how many. Each is checked against its sha256."""
        written = 0
        for sha256 in self.store.blob_shas():
            if self.has_bytes(sha256):
                continue
            data = self.store.blob(sha256)
            if data is None or hashlib.sha256(data).hexdigest() != sha256:
                log.error("stored artifact bytes do not hash to their sha256; not served", extra=fields(sha256=sha256))
                continue
            part = self.uploads / f"{sha256}.copy"
            with open(part, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(part, self.path(sha256))
            written += 1
        return written

    # --- push -----------------------------------------------------------------------------

    def push(self, *, kind: str, name: str, version: str, sha256: str,
             manifest: dict[str, Any] | None, by: str, now: float) -> Pushed:
        """Validate the stored bytes, sign, and record the version (idempotent)."""
        _check_sha(sha256)
        if self._key is None:
            raise ArtifactError("no_key", "the manager has no signing key (start it with --keys DIR)")
        existing = self.store.find_artifact(kind, name, version)
        if existing is not None:
            if existing.sha256 != sha256:
                raise ArtifactError("conflict", f"{kind} {name} {version} exists with other bytes "
                                                f"(sha256 {existing.sha256[:12]}…); push a new version")
            return Pushed(existing, False)
        path = self.path(sha256)
        if not path.is_file():
            raise ArtifactError("not_found", f"no uploaded bytes for sha256 {sha256[:12]}…; upload first")
        if sha256_file(path) != sha256:
            raise ArtifactError("invalid_artifact", f"stored bytes of {sha256[:12]}… do not hash to it")
        if kind == "model":
            doc = validate_model(path, manifest)
            if (doc["name"], doc["version"]) != (name, version):
                raise ArtifactError("invalid_artifact", f"manifest names {doc['name']} {doc['version']}, "
                                                        f"the push {name} {version}")
        else:
            if manifest:
                raise ArtifactError("bad_request", "a policy carries no manifest")
            found = validate_policy(path)
            if found != version:
                raise ArtifactError("invalid_artifact", f"policy document says version {found}, the push {version}")
            doc = {}
        artifact = Artifact(kind=kind, name=name, version=version, sha256=sha256, size=path.stat().st_size,
                            manifest=doc)
        _check_sendable(artifact)
        artifact = sign(self._key, artifact)
        try:
            self.store.put_artifact(artifact, by=by, now=now)
        except Conflict as exc:  # raced with another push of the same version
            raise ArtifactError("conflict", str(exc)) from None
        log.info("artifact pushed", extra={"fields": {"kind": kind, "name": name, "version": version,
                                                      "sha256": sha256, "by": by}})
        return Pushed(artifact, True)

    def sign(self, doc: Desired) -> Desired:
        """A desired state signed with the fleet's key (as it is, without one: devices
        refuse it, and a manager without a key has nothing to roll out)."""
        return sign(self._key, doc) if self._key is not None else doc

    def check(self, artifact: Artifact) -> None:
        """Refuse to hand out an artifact whose bytes or signature no longer match."""
        path = self.path(artifact.sha256)
        if not path.is_file():
            raise ArtifactError("invalid_artifact", f"bytes of {artifact.name} {artifact.version} are missing")
        try:
            verify_file(artifact, path)
            if self.public_key is not None:
                verify(self.public_key, artifact)
        except SignatureError as exc:
            raise ArtifactError("invalid_artifact", f"{artifact.name} {artifact.version} is tampered: {exc}") from None


def _check_sendable(artifact: Artifact) -> None:
    """Refuse an artifact whose description a device would refuse inside a desired state."""
    try:
        doc = canonical(artifact.model_dump())  # refuses NaN and Infinity
        loads(doc)  # and numbers beyond a float's range
    except ValueError as exc:  # ContractError included
        raise ArtifactError("invalid_artifact", f"the manifest holds a number devices refuse: {exc}") from None
    if len(doc) > MAX_ARTIFACT_DOC_BYTES:
        raise ArtifactError("invalid_artifact", f"the manifest makes a {len(doc)}-byte description, over the "
                                                f"{MAX_ARTIFACT_DOC_BYTES} bytes a desired state has room for")


def _check_sha(sha256: str) -> None:
    if not isinstance(sha256, str) or not re.fullmatch(SHA256_PATTERN, sha256):
        raise ArtifactError("bad_request", "sha256 must be 64 lowercase hex digits")
