"""Ed25519 keys and signatures for artifacts (models and policies) and desired states.

The fleet signs an :class:`~edge.core.contract.Artifact` or a
:class:`~edge.core.contract.Desired` over its canonical bytes (every field but the
signature); a device verifies with the public keys pinned in its config (a list, so a
new key can be pinned before the fleet signs with it) and refuses anything unsigned or
signed by another key. Keys are PEM files: the private key PKCS#8 with mode 0600, the
public key SubjectPublicKeyInfo. A key's id is the start of the sha256 of its raw
bytes; devices report the ids they pin, so the fleet can tell when every device
pins a new key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from pathlib import Path
from typing import Sequence, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .contract import Artifact, Desired
from .errors import EdgeError
from .files import sha256_file

PRIVATE_NAME = "fleet.key"
PUBLIC_NAME = "fleet.pub"


class SignatureError(EdgeError):
    """An artifact that is unsigned, wrongly signed, or whose bytes do not match it.

    ``reason`` is short and machine-readable: unsigned, bad_signature, size, sha256.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class KeyFileError(EdgeError):
    """A key file that is missing, unreadable or not an Ed25519 key."""


def init_keys(directory: Path) -> tuple[Path, Path]:
    """Make ``fleet.key`` (0600) and ``fleet.pub`` in ``directory``; never overwrite."""
    directory.mkdir(parents=True, exist_ok=True)
    private, public = directory / PRIVATE_NAME, directory / PUBLIC_NAME
    for path in (private, public):
        if path.exists():
            raise KeyFileError(f"{path} exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    # O_EXCL: a key appearing between the check and here is still not overwritten
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public.write_bytes(public_pem(key.public_key()))
    return private, public


def key_id(key: Ed25519PublicKey) -> str:
    """A public key's short id (what devices report, what the fleet's keyring names)."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """The signing key in ``path``; refuses a key file others can read."""
    data = _read(path)
    if os.stat(path).st_mode & 0o077:
        raise KeyFileError(f"{path} is readable by others; chmod 600 it")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not a PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: not an Ed25519 key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """The pinned verification key in ``path``."""
    try:
        key = serialization.load_pem_public_key(_read(path))
    except ValueError as exc:
        raise KeyFileError(f"{path}: not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path}: not an Ed25519 key")
    return key


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read key {path}: {exc.strerror or exc}") from None


Signed = TypeVar("Signed", Artifact, Desired)
Keys = Ed25519PublicKey | Sequence[Ed25519PublicKey]


def sign(key: Ed25519PrivateKey, doc: Signed) -> Signed:
    """``doc`` (an artifact or a desired state) with its signature set."""
    signature = base64.b64encode(key.sign(doc.signed_bytes())).decode()
    return doc.model_copy(update={"signature": signature})


def verify(keys: Keys, doc: Artifact | Desired) -> None:
    """Raise SignatureError unless one of ``keys`` signed exactly this artifact or desired state."""
    what = (f"{doc.kind} {doc.name} {doc.version}" if isinstance(doc, Artifact)
            else f"desired state v{doc.version} for {doc.device}")
    if not doc.signature:
        raise SignatureError("unsigned", f"{what} has no signature")
    try:
        signature = base64.b64decode(doc.signature, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError("bad_signature", f"{what}: the signature is not base64") from None
    data = doc.signed_bytes()
    for key in [keys] if isinstance(keys, Ed25519PublicKey) else keys:
        try:
            key.verify(signature, data)
            return
        except InvalidSignature:
            continue
    raise SignatureError("bad_signature", f"{what}: the signature does not verify with any pinned key")


def verify_file(artifact: Artifact, path: Path) -> None:
    """Raise SignatureError unless the file at ``path`` is the artifact's bytes."""
    size = path.stat().st_size
    if size != artifact.size:
        raise SignatureError("size", f"{path.name} is {size} bytes, the artifact {artifact.size}")
    digest = sha256_file(path)
    if digest != artifact.sha256:
        raise SignatureError("sha256", f"{path.name} hashes to {digest[:12]}…, the artifact {artifact.sha256[:12]}…")

