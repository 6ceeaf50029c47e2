"""The fleet's signing keys and their rotation, without a day a device cannot verify.

A keys directory holds Ed25519 pairs (``NAME.key``, mode 600, and ``NAME.pub``) and
``keyring.json``, the state of each: ``next`` (made by ``fleet keys rotate``; devices
are to pin it, nothing signs with it), ``active`` (signs every artifact and desired
state), ``previous`` (was active; devices still pin it, so what it signed still
verifies) and ``retired`` (its private key deleted; devices drop it, and anything only
it signed is refused). A directory from ``fleet keys init`` alone, with no
``keyring.json``, is one active key named ``fleet``.

Devices report the ids of the keys they pin (``Reported.keys``), so ``fleet keys
switch`` can refuse to sign with a key some device does not pin yet.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict

from edge.core.errors import UsageError
from edge.core.files import replace_file
from edge.core.signing import PRIVATE_NAME, key_id, load_private_key, load_public_key, public_pem

KEYRING = "keyring.json"
FIRST = PRIVATE_NAME.removesuffix(".key")  # "fleet", as `fleet keys init` names it
State = Literal["next", "active", "previous", "retired"]
PINNED: tuple[State, ...] = ("next", "active", "previous")  # what a device's bundle carries


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    state: State


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keys: list[_Entry]


@dataclass(frozen=True)
class Key:
    name: str
    state: State
    public: Ed25519PublicKey
    pub_path: Path

    @property
    def id(self) -> str:
        return key_id(self.public)


class Keyring:
    """The keys in ``directory`` and their states."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.keys: list[Key] = []
        self._load()

    def _load(self) -> None:
        directory = self.directory
        path = directory / KEYRING
        if path.exists():
            try:
                entries = _File.model_validate_json(path.read_text()).keys
            except (OSError, ValueError) as exc:
                raise UsageError(f"{path} does not load: {exc}") from None
        elif (directory / f"{FIRST}.pub").exists():
            entries = [_Entry(name=FIRST, state="active")]
        else:
            raise UsageError(f"no signing keys in {directory} (`fleet keys init --dir {directory}` makes them)")
        self.keys = [Key(e.name, e.state, load_public_key(directory / f"{e.name}.pub"), directory / f"{e.name}.pub")
                     for e in entries]
        if sum(k.state == "active" for k in self.keys) != 1:
            raise UsageError(f"{path}: exactly one key must be active")

    @property
    def active(self) -> Key:
        return next(k for k in self.keys if k.state == "active")

    def signing_key(self) -> Ed25519PrivateKey:
        return load_private_key(self.directory / f"{self.active.name}.key")

    def pinned(self) -> list[Key]:
        """The keys a device pins now: the next one, the active one and the previous one."""
        return [k for k in self.keys if k.state in PINNED]

    def previous(self) -> list[Ed25519PublicKey]:
        """The key that signed before the last switch, while devices still pin it: what it
        signed, the manager signs again with the active key."""
        return [k.public for k in self.keys if k.state == "previous"]

    def get(self, name: str) -> Key:
        for k in self.keys:
            if k.name == name:
                return k
        raise UsageError(f"no key {name!r} in {self.directory} (have: {', '.join(k.name for k in self.keys)})")

    # --- rotation --------------------------------------------------------------------------------

    def rotate(self) -> Key:
        """Make the next signing key; nothing signs with it until :meth:`switch`."""
        if any(k.state == "next" for k in self.keys):
            raise UsageError("a next key exists already: pin it on the devices, then `fleet keys switch`")
        n = 2
        while (self.directory / f"{FIRST}-{n}.key").exists() or (self.directory / f"{FIRST}-{n}.pub").exists():
            n += 1
        name = f"{FIRST}-{n}"
        key = Ed25519PrivateKey.generate()
        fd = os.open(self.directory / f"{name}.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        (self.directory / f"{name}.pub").write_bytes(public_pem(key.public_key()))
        self._set({name: "next"}, added=name)
        return self.get(name)

    def switch(self) -> tuple[Key, Key]:
        """The next key signs from now on; the active one becomes the previous (still pinned)."""
        nxt = next((k for k in self.keys if k.state == "next"), None)
        if nxt is None:
            raise UsageError("no next key: `fleet keys rotate` makes one")
        if any(k.state == "previous" for k in self.keys):
            old = next(k for k in self.keys if k.state == "previous")
            raise UsageError(f"retire {old.name} first (`fleet keys retire {old.name}`): devices pin at most "
                             "a next, an active and a previous key")
        old = self.active
        self._set({nxt.name: "active", old.name: "previous"})
        return self.get(nxt.name), self.get(old.name)

    def retire(self, name: str) -> Key:
        """Stop vouching for ``name`` (a previous key): its private key is deleted."""
        key = self.get(name)
        if key.state != "previous":
            raise UsageError(f"{name} is {key.state}: only the previous key (after a switch) can be retired")
        (self.directory / f"{name}.key").unlink(missing_ok=True)
        self._set({name: "retired"})
        return self.get(name)

    def _set(self, states: dict[str, State], added: str | None = None) -> None:
        entries = [_Entry(name=k.name, state=states.get(k.name, k.state)) for k in self.keys]
        if added is not None:
            entries.append(_Entry(name=added, state=states[added]))
        replace_file(self.directory / KEYRING, _File(keys=entries).model_dump_json(indent=2).encode())
        self._load()
