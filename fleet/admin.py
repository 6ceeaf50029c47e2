"""The fleet administrator's commands, run on the manager's host: enrol and revoke
devices and other identities, and write the broker's configuration.

They need the fleet store, the CA's directory (``--pki``: its private key never leaves
this host) and, for a device's bundle, the signing keys' directory (``--keys``: only
the public keys go into a bundle). Every enrolment or revocation regenerates the
broker's configuration and brings a running broker in step (see ``fleet.brokerconf``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from edge.core.errors import UsageError

from .brokerconf import BrokerSettings, apply, ensure_admin, ensure_server_cert, find_plugin, write_config
from .bundles import write_bundle
from .ca import FleetCA
from .identities import ADMIN, enrol, revoke, revoked_serials
from .keyring import Keyring
from .store import Store

DEFAULT_PKI = os.environ.get("FLEET_PKI", "fleet-pki")
DEFAULT_KEYS = os.environ.get("FLEET_KEYS", "fleet-keys")


def add_device_commands(devices_sub: Any, common: argparse.ArgumentParser) -> None:
    """``fleet devices add`` and ``fleet devices revoke``."""
    add = devices_sub.add_parser("add", parents=[common, _admin()],
                                 help="enrol devices: a credential each, a bundle each, the broker updated")
    add.add_argument("names", nargs="+", metavar="ID", help="device ids (one safe topic level each)")
    add.add_argument("--site", help="the device's site (default: default); its alerts go under it")
    add.add_argument("--line", help="the device's line (default: default)")
    add.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="a tag (repeatable; default none)")
    add.add_argument("--keys", type=Path, default=Path(DEFAULT_KEYS),
                     help=f"the signing keys' directory: its public keys go into the bundle (default {DEFAULT_KEYS})")
    _enrol_args(add)
    add.set_defaults(func=cmd_enrol, role="device")
    rev = devices_sub.add_parser("revoke", parents=[common, _admin()],
                                 help="take a device's credential away (its stored data stays)")
    rev.add_argument("names", nargs="+", metavar="ID", help="the devices to revoke")
    rev.set_defaults(func=cmd_revoke)


def add_commands(sub: Any, common: argparse.ArgumentParser) -> Any:
    """``fleet identities add|revoke`` and ``fleet broker config``; returns the
    ``identities`` subcommands, for the read command the CLI adds."""
    ids = sub.add_parser("identities", parents=[common], help="broker identities: managers, operators, controllers")
    ids_sub = ids.add_subparsers(metavar="ACTION")
    add = ids_sub.add_parser("add", parents=[common, _admin()], help="enrol an identity: a credential and a bundle")
    add.add_argument("names", nargs="+", metavar="NAME", help="identity names (letters, digits, '.', '_', '-')")
    add.add_argument("--role", required=True, choices=("operator", "controller", "manager"),
                     help="what it may do on the broker (see README: Security)")
    add.add_argument("--site", help="a controller's site (it reads that site's alerts)")
    add.add_argument("--line", help="a controller's line within --site (it reads only that line's alerts)")
    _enrol_args(add)
    add.set_defaults(func=cmd_enrol, tag=[], keys=None)
    rev = ids_sub.add_parser("revoke", parents=[common, _admin()], help="take an identity's credential away")
    rev.add_argument("names", nargs="+", metavar="NAME", help="the identities to revoke")
    rev.set_defaults(func=cmd_revoke)

    broker = sub.add_parser("broker", parents=[common], help="the fleet's Mosquitto")
    broker_sub = broker.add_subparsers(metavar="ACTION")
    conf = broker_sub.add_parser("config", parents=[common, _admin()],
                                 help="write the Mosquitto configuration for the fleet (TLS, no anonymous, the ACL)")
    conf.add_argument("--out", type=Path, required=True, help="the broker's directory (mosquitto -c DIR/mosquitto.conf)")
    conf.add_argument("--host", action="append", help="a name or address devices reach the broker by (repeatable; "
                                                       "they go into its certificate; default localhost)")
    conf.add_argument("--port", type=int, default=8883, help="the certificate listener (default 8883)")
    conf.add_argument("--password-port", type=int, default=8884,
                      help="the password listener, TLS too (default 8884; 0: none)")
    conf.add_argument("--plaintext-port", type=int, default=0,
                      help="a plaintext listener on 127.0.0.1 for password identities (default 0: none)")
    conf.add_argument("--prefix", default=None, help="topic prefix (default edgecam/v1)")
    conf.add_argument("--plugin", help="the dynamic security plugin (default: found where Mosquitto installs it)")
    conf.set_defaults(func=cmd_broker_config)
    return ids_sub


def _admin() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--db", type=Path, default=Path(os.environ.get("FLEET_DB", "fleet.db")),
                   help="the fleet store (default $FLEET_DB or fleet.db)")
    p.add_argument("--pki", type=Path, default=Path(DEFAULT_PKI),
                   help=f"the CA's directory (default $FLEET_PKI or {DEFAULT_PKI})")
    p.add_argument("--broker", type=_address, help="where to reach the running broker (default: the first --host "
                                                   "and --port of `fleet broker config`)")
    p.add_argument("--json", action="store_true", help="the result as JSON")
    return p


def _enrol_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--password", action="store_true",
                   help="a random password (kept as a hash) instead of a client certificate")
    p.add_argument("--out", type=Path, default=Path("bundles"), help="bundles go to OUT/NAME/ (default ./bundles)")


def _address(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected host:port, got {value!r}")
    return host, int(port)


def _tags(values: list[str]) -> dict[str, str]:
    tags = {}
    for value in values:
        key, eq, val = value.partition("=")
        if not eq or not key:
            raise UsageError(f"--tag wants KEY=VALUE, got {value!r}")
        tags[key] = val
    return tags


def _settings(pki: Path) -> BrokerSettings:
    settings = BrokerSettings.load(pki)
    if settings is None:
        raise UsageError(f"no broker configuration for the CA in {pki}: `fleet broker config --out DIR --pki {pki}` "
                         "first (it makes the CA and says where devices reach the broker)")
    return settings


def _report(args: argparse.Namespace, doc: dict[str, Any], lines: list[str]) -> None:
    print(json.dumps(doc, indent=2) if args.json else "\n".join(lines))


def cmd_enrol(args: argparse.Namespace) -> int:
    settings = _settings(args.pki)
    ca = FleetCA.open(args.pki)
    if args.password and not settings.password_port:
        raise UsageError("the broker has no password listener (`fleet broker config --password-port`)")
    keys = Keyring(args.keys).pinned() if args.role == "device" else []
    host, port = settings.hosts[0], settings.password_port if args.password else settings.port
    now = time.time()
    store = Store.open(args.db)
    try:
        issued = [enrol(store, ca, name, args.role, site=args.site, line=args.line, tags=_tags(args.tag),
                        password=args.password, now=now) for name in dict.fromkeys(args.names)]
        bundles = [write_bundle(args.out, i, host=host, port=port, ca_pem=ca.pem, keys=keys) for i in issued]
        store.put_identities([i.identity for i in issued])  # after the bundles: a failed write enrols no one
        plan = write_config(settings, store, args.pki)
    finally:
        store.close()
    notes = apply(plan, settings, args.pki, revoking=False, broker=args.broker)
    _report(args, {"enrolled": args.names, "bundles": [str(b) for b in bundles], "broker": notes},
            [f"enrolled {name} ({args.role}, {'password' if args.password else 'certificate'}): bundle {b} "
             "(mode 600: copy it to the device or the user, then delete it here)" for name, b in zip(args.names, bundles)]
            + [f"broker configuration in {settings.out} regenerated", *notes])
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    settings = _settings(args.pki)
    ca = FleetCA.open(args.pki)
    if ADMIN in args.names:
        raise UsageError(f"{ADMIN} is how the fleet changes the broker; it is not revoked this way")
    now = time.time()
    store = Store.open(args.db)
    try:
        revoked = [revoke(store, name, now=now) for name in args.names]
        ca.write_crl(revoked_serials(store.identities()))
        plan = write_config(settings, store, args.pki)
    finally:
        store.close()
    notes = apply(plan, settings, args.pki, revoking=True, broker=args.broker)
    _report(args, {"revoked": args.names, "broker": notes},
            [f"revoked {i.name} ({i.role}): it can no longer connect; what it stored stays" for i in revoked]
            + [f"broker configuration in {settings.out} regenerated", *notes])
    return 0


def cmd_broker_config(args: argparse.Namespace) -> int:
    from edge.core.contract import DEFAULT_PREFIX, Topics

    old = BrokerSettings.load(args.pki)
    try:
        settings = BrokerSettings(out=args.out.resolve(), hosts=args.host or (old.hosts if old else ["localhost"]),
                                  port=args.port, password_port=args.password_port or None,
                                  plaintext_port=args.plaintext_port or None,
                                  prefix=args.prefix or (old.prefix if old else DEFAULT_PREFIX),
                                  plugin=find_plugin(args.plugin))
        Topics(settings.prefix)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    ca = FleetCA.open(args.pki, create=True)
    ensure_server_cert(ca, args.pki, settings.hosts)
    store = Store.open(args.db)
    try:
        ensure_admin(store, ca, args.pki, time.time())
        plan = write_config(settings, store, args.pki)
    finally:
        store.close()
    settings.save(args.pki)
    notes = apply(plan, settings, args.pki, revoking=False, broker=args.broker)
    ports = [f"{settings.port} (certificates)"] + ([f"{settings.password_port} (passwords)"]
                                                   if settings.password_port else [])
    if settings.plaintext_port:
        ports.append(f"127.0.0.1:{settings.plaintext_port} (plaintext, passwords)")
    _report(args, {"out": str(settings.out), "conf": str(settings.out / "mosquitto.conf"), "broker": notes},
            [f"broker configuration written to {settings.out}: mosquitto -c {settings.out / 'mosquitto.conf'}",
             f"listeners: {', '.join(ports)}; {len(plan.clients)} client(s), {len(plan.roles)} role(s)", *notes])
    return 0
