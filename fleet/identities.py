"""Broker identities: who may connect to the fleet's broker, as what, with which credential.

Every device, manager, operator and line controller is enrolled here, in the fleet
store, with a role and one credential: a client certificate from the fleet CA (the
default) or a random password kept only as the hash Mosquitto's password file holds.
A process with several connections has one broker identity per connection
(``cam-01``, ``cam-01~agent``, ``cam-01~alerts``), each its own certificate (one key) or
user name (one password), because the broker binds every client id to its identity.
Revoking keeps the row, so a revoked device's data and its history stay, and puts its
certificates on the revocation list.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from edge.core.contract import ID_PATTERN, link_identity
from edge.core.errors import UsageError

from .ca import FleetCA, PrivateKey, new_key, serial_hex
from .store import IdentityRow, Store

ROLES = ("device", "manager", "operator", "controller", "admin")
# a manager: its control link (while it holds the lease), its job inbox and its ingest
LINKS: dict[str, tuple[str | None, ...]] = {"device": (None, "agent", "alerts"), "manager": (None, "jobs", "ingest")}
ADMIN = "fleet-admin"  # the identity that changes the broker's ACL on the fleet's behalf
PW_ITERATIONS = 101  # mosquitto_passwd's default; the passwords are 192 random bits, not words
PW_SALT_BYTES = 12


@dataclass
class Issued:
    """A new credential: what goes into the identity's bundle, and nowhere else."""

    identity: IdentityRow
    key: PrivateKey | None = None
    certs: dict[str, x509.Certificate] = field(default_factory=dict)  # connection identity → certificate
    password: str | None = None


def connections(identity: IdentityRow) -> list[str]:
    """The broker identities (user names, client ids) of ``identity``'s connections."""
    return [link_identity(identity.name, link) for link in LINKS.get(identity.role, (None,))]


def enrol(store: Store, ca: FleetCA, name: str, role: str, *, site: str | None = None, line: str | None = None,
          tags: dict[str, str] | None = None, password: bool = False, now: float) -> Issued:
    """A new credential for ``name`` (the caller stores ``Issued.identity``, with others
    in one transaction); a revoked name may be enrolled again (its old certificates stay
    revoked), an enrolled one may not."""
    if role not in ROLES:
        raise UsageError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    if not re.fullmatch(ID_PATTERN, name):
        raise UsageError(f"{name!r} is not a valid name: letters, digits, '.', '_' and '-', up to 64")
    if role == "device":
        site, line = site or "default", line or "default"
    elif role == "controller" and not site:
        raise UsageError("a controller reads the alerts of one site (--site) or one line (--site and --line)")
    if line and not site:
        raise UsageError("--line needs --site")
    for value in (site, line):
        if value is not None and not re.fullmatch(ID_PATTERN, value):
            raise UsageError(f"{value!r} cannot be a site or line: it is a topic level")
    old = store.identity(name)
    if old is not None and old.state == "enrolled":
        raise UsageError(f"{name} is enrolled already ({old.role}); revoke it first to give it a new credential")
    issued = Issued(identity=IdentityRow(
        name=name, role=role, site=site, line=line, tags=tags or {}, credential="password" if password else "certificate",
        serials=[], retired_serials=(old.serials + old.retired_serials) if old is not None else [],
        password_hash=None, not_after=None, state="enrolled", created_at=now, revoked_at=None))
    if password:
        issued.password = secrets.token_urlsafe(24)
        issued.identity = issued.identity.model_copy(update={"password_hash": password_hash(issued.password)})
    else:
        issued.key = new_key()
        issued.certs = {conn: ca.issue(conn, issued.key) for conn in connections(issued.identity)}
        first = next(iter(issued.certs.values()))
        issued.identity = issued.identity.model_copy(update={
            "serials": [serial_hex(c) for c in issued.certs.values()],
            "not_after": first.not_valid_after_utc.timestamp()})
    return issued


def revoke(store: Store, name: str, *, now: float) -> IdentityRow:
    """Take ``name``'s credential away; its row (and the device's data) stays."""
    identity = store.identity(name)
    if identity is None:
        raise UsageError(f"no identity {name!r} is enrolled")
    if identity.state == "revoked":
        return identity
    identity = identity.model_copy(update={"state": "revoked", "revoked_at": now})
    store.put_identities([identity])
    return identity


def revoked_serials(identities: list[IdentityRow]) -> list[tuple[str, float]]:
    """Every certificate serial the revocation list must name, with when."""
    out = []
    for i in identities:
        at = i.revoked_at or i.created_at
        out += [(s, i.created_at) for s in i.retired_serials]
        if i.state == "revoked":
            out += [(s, at) for s in i.serials]
    return out


def password_hash(password: str, *, salt: bytes | None = None, iterations: int = PW_ITERATIONS) -> str:
    """``password`` as ``mosquitto_passwd`` writes it: PBKDF2-SHA512, ``$7$iterations$salt$hash``."""
    salt = salt if salt is not None else os.urandom(PW_SALT_BYTES)
    digest = PBKDF2HMAC(algorithm=hashes.SHA512(), length=64, salt=salt, iterations=iterations).derive(password.encode())
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"
