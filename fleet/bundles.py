"""Credential bundles: one directory per identity, written once, mode 600.

A device's bundle is what an installer copies to ``/etc/edgecam/``: ``edgecam.yaml``
(the ``device``, ``mqtt`` and ``agent.public_keys`` parts of the device config, with
paths relative to that directory), the CA certificate, the device's key and one
certificate per connection (or, with a password, the password in ``edgecam.yaml``), and
the fleet's public keys. Any other identity's bundle has ``fleet.env``, the
``FLEET_*`` variables the ``fleet`` command and ``fleet serve`` read. The private key
or password exists nowhere else: the registry keeps a certificate's serial or a
password's hash.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from edge.core.errors import UsageError
from edge.core.files import fsync_dir

from .ca import cert_pem, key_pem
from .identities import Issued
from .keyring import Key

CONFIG = "edgecam.yaml"
ENV = "fleet.env"


@dataclass(frozen=True)
class Credentials:
    """What one client needs to connect as an identity (read back from its bundle)."""

    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


def write_bundle(out: Path, issued: Issued, *, host: str, port: int, ca_pem: bytes, keys: list[Key]) -> Path:
    """``issued``'s bundle in ``out/<name>``; refuses to overwrite one."""
    identity = issued.identity
    where = out / identity.name
    if where.exists() and any(where.iterdir()):
        raise UsageError(f"{where} exists and is not empty; a bundle is written once")
    where.mkdir(parents=True, exist_ok=True)
    os.chmod(where, 0o700)
    files: dict[str, bytes] = {"ca.crt": ca_pem}
    tls: dict[str, str] = {"ca_file": "ca.crt"}
    if issued.key is not None:
        files[f"{identity.name}.key"] = key_pem(issued.key)
        for name, cert in issued.certs.items():
            files[f"{name}.crt"] = cert_pem(cert)
        tls |= {"cert_file": f"{identity.name}.crt", "key_file": f"{identity.name}.key"}
    if identity.role == "device":
        for key in keys:
            files[key.pub_path.name] = key.pub_path.read_bytes()
        mqtt = {"host": host, "port": port, "username": identity.name, "tls": tls}
        if issued.password is not None:
            mqtt["password"] = issued.password
        doc = {"device": {"id": identity.name, "site": identity.site, "line": identity.line}, "mqtt": mqtt,
               "agent": {"public_keys": [k.pub_path.name for k in keys]}}
        files[CONFIG] = (f"# The fleet's part of the device config of {identity.name}: merge these sections into\n"
                         "# /etc/edgecam/device.yaml; the paths are this bundle's files beside it.\n"
                         + yaml.safe_dump(doc, sort_keys=False)).encode()
    else:
        env = {"FLEET_BROKER": f"{host}:{port}", "FLEET_IDENTITY": identity.name,
               "FLEET_TLS_CA": str((where / "ca.crt").resolve())}
        if issued.key is not None:
            env |= {"FLEET_TLS_CERT": str((where / tls["cert_file"]).resolve()),
                    "FLEET_TLS_KEY": str((where / tls["key_file"]).resolve())}
        if issued.password is not None:
            env["FLEET_MQTT_PASSWORD"] = issued.password
        files[ENV] = "".join(f"{k}={v}\n" for k, v in env.items()).encode()
    for name, data in files.items():  # new files, each on disk before the bundle is said written
        fd = os.open(where / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            os.fsync(f.fileno())
    fsync_dir(where)
    fsync_dir(where.parent)
    return where


def read_credentials(bundle: Path) -> Credentials:
    """The credentials in a device's bundle, with its files' paths made absolute."""
    try:
        mqtt = yaml.safe_load((bundle / CONFIG).read_text())["mqtt"]
    except (OSError, KeyError, TypeError, yaml.YAMLError) as exc:
        raise UsageError(f"{bundle} is not a device bundle: {exc}") from None
    tls = mqtt.get("tls") or {}

    def path(key: str) -> str | None:
        return str((bundle / tls[key]).resolve()) if tls.get(key) else None

    return Credentials(username=mqtt["username"], password=mqtt.get("password"), ca_file=path("ca_file"),
                       cert_file=path("cert_file"), key_file=path("key_file"))
