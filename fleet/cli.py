"""The fleet command: the manager, its registry and rollouts, and the operator CLI."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from edge.core.contract import DEFAULT_PREFIX, EVENT_KINDS, Topics
from edge.core.errors import UsageError, run_command

from . import __version__, admin, operate, review_cli

if TYPE_CHECKING:
    from .client import Tls
    from .store import Store

log = logging.getLogger("fleet")

DEFAULT_DB = os.environ.get("FLEET_DB", "fleet.db")
FOLLOW_POLL_S = 0.5
CONSOLE_BUSY_S = 2.0  # a console request waits this long for a locked store, then answers 503


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("fleet", _parser(), argv)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks on errors")
    parser = argparse.ArgumentParser(prog="fleet", description="edgecam fleet manager and operator CLI",
                                     parents=[common])
    parser.add_argument("--version", action="version", version=f"edgecam {__version__}")
    sub = parser.add_subparsers(metavar="COMMAND")

    serve = sub.add_parser("serve", parents=[common], help="run the manager: ingest device outboxes")
    serve.add_argument("--db", required=True,
                       help="the fleet store: a SQLite path (created if missing) or postgresql://USER@HOST/DB")
    serve.add_argument("--broker", default=os.environ.get("FLEET_BROKER", "localhost:1883"), type=_broker,
                       help="host:port (default $FLEET_BROKER or localhost:1883)")
    serve.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"topic prefix (default {DEFAULT_PREFIX})")
    serve.add_argument("--identity", help="the manager's broker identity (`fleet identities add NAME --role "
                                          "manager`): the control link connects as NAME, the job inbox as NAME~jobs and the "
                                          "ingest as NAME~ingest")
    serve.add_argument("--client-id", help="MQTT client id without --identity (default fleet-<host>-<pid>-<random>)")
    serve.add_argument("--username", help="broker user without --identity; the password is read from "
                                          "$FLEET_MQTT_PASSWORD")
    tls_args(serve)
    serve.add_argument("--keys", type=Path, help="directory with the signing key fleet.key (`fleet keys init`)")
    serve.add_argument("--artifacts", type=Path,
                       help="where artifact bytes are kept (default <db>.artifacts, or ./fleet-artifacts for a URL)")
    serve.add_argument("--failover", type=float, default=10.0, metavar="SECONDS",
                       help="how soon another manager takes over from one that died (default 10)")
    serve.add_argument("--operator", action="append", metavar="IDENTITY",
                       help="an identity allowed to operate the fleet (repeatable; default: operator)")
    serve.add_argument("--max-transfers", type=_positive, default=64,
                       help="artifact downloads served at once (default 64)")
    serve.add_argument("--http", type=_http_address, metavar="HOST:PORT",
                       help="serve the read-only console and API (/api/v1, /metrics) here, e.g. 127.0.0.1:8080")
    serve.add_argument("--http-token-file", type=Path, metavar="FILE",
                       help="every HTTP request then needs `Authorization: Bearer <the token in FILE>`")
    serve.add_argument("--http-tls-cert", type=Path, metavar="PEM", help="serve HTTPS with this certificate chain")
    serve.add_argument("--http-tls-key", type=Path, metavar="PEM", help="the certificate's private key")
    serve.add_argument("--retain-events", action="append", default=[], metavar="[KIND=]AGE",
                       help="delete events captured longer ago than AGE (30d, 12h), of KIND only with KIND=AGE "
                            "(repeatable: --retain-events 30d --retain-events alert=90d); default: keep every event")
    serve.add_argument("--stats-interval", type=float, default=10.0, help="seconds between stats lines (default 10)")
    serve.add_argument("--log-format", choices=("json", "human"), default="json", help="log line format")
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info",
                       help="least severe level logged")
    serve.set_defaults(func=_cmd_serve)

    database = sub.add_parser("db", parents=[common], help="the fleet store's schema, and moving it")
    db_sub = database.add_subparsers(metavar="ACTION")
    upgrade = db_sub.add_parser("upgrade", parents=[common], help="bring the store's schema up to date")
    _db_arg(upgrade)
    upgrade.set_defaults(func=_cmd_db_upgrade)
    current = db_sub.add_parser("current", parents=[common],
                                help="the store's schema version, this code's, and who runs the rollouts")
    _db_arg(current)
    current.add_argument("--json", action="store_true", help="machine-readable output")
    current.set_defaults(func=_cmd_db_current)
    copy = db_sub.add_parser("copy", parents=[common], help="copy every row of one store into another")
    copy.add_argument("--from", dest="source", required=True, help="the store to copy (path or URL)")
    copy.add_argument("--to", dest="target", required=True, help="the store to fill (path or URL; created)")
    copy.add_argument("--artifacts", type=Path,
                      help="artifact bytes to carry along (default <from>.artifacts when --from is a path)")
    copy.set_defaults(func=_cmd_db_copy)

    events = sub.add_parser("events", parents=[common], help="stored device events")
    events_sub = events.add_subparsers(metavar="ACTION")
    tail = events_sub.add_parser("tail", parents=[common], help="the newest events, oldest first")
    _db_arg(tail)
    tail.add_argument("--device", help="only this device")
    tail.add_argument("--kind", choices=EVENT_KINDS, help="only this kind")
    tail.add_argument("--limit", type=_positive, default=20, help="how many (default 20)")
    tail.add_argument("--follow", "-f", action="store_true", help="keep printing events as they are stored")
    tail.add_argument("--json", action="store_true", help="one JSON document per line")
    tail.set_defaults(func=_cmd_events_tail)

    devices = sub.add_parser("devices", parents=[common], help="the device registry")
    devices_sub = devices.add_subparsers(metavar="ACTION")
    listing = devices_sub.add_parser("list", parents=[common, _rpc_parent()],
                                     help="every known device, its state, tags and models (via the broker)")
    listing.add_argument("--db",
                         help="read this fleet store directly instead (offline: no broker or manager needed)")
    listing.set_defaults(func=_cmd_devices_list)
    show = devices_sub.add_parser("show", parents=[common, _rpc_parent()],
                                  help="a device's desired and reported state and its rollout jobs (via the broker)")
    show.add_argument("device", help="the device id")
    show.set_defaults(func=operate.cmd_devices_show)
    admin.add_device_commands(devices_sub, common)

    identities_sub = admin.add_commands(sub, common)
    ids = identities_sub.add_parser("list", parents=[common], help="every identity, enrolled or revoked")
    _db_arg(ids)
    ids.add_argument("--json", action="store_true", help="a JSON array")
    ids.set_defaults(func=_cmd_identities_list)

    operate.add_commands(sub, common, _rpc_parent())
    review_cli.add_commands(sub, common, _rpc_parent())
    return parser


def _rpc_parent() -> argparse.ArgumentParser:
    """Arguments of every command that talks to the manager through the broker."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--broker", default=os.environ.get("FLEET_BROKER", "localhost:1883"), type=_broker,
                   help="host:port (default $FLEET_BROKER or localhost:1883)")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"topic prefix (default {DEFAULT_PREFIX})")
    p.add_argument("--identity", default=os.environ.get("FLEET_IDENTITY", "operator"),
                   help="who you are to the manager; also the broker user (default $FLEET_IDENTITY or operator)")
    p.add_argument("--username", help="broker user if not the identity; password from $FLEET_MQTT_PASSWORD")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the manager (default 30)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    tls_args(p)
    return p


def tls_args(p: argparse.ArgumentParser) -> None:
    """TLS to the broker, as an identity's bundle gives it (``fleet.env``)."""
    env = os.environ.get
    p.add_argument("--tls-ca", default=env("FLEET_TLS_CA"), help="the CA the broker's certificate must verify "
                                                                "against; turns TLS on (default $FLEET_TLS_CA)")
    p.add_argument("--tls-cert", default=env("FLEET_TLS_CERT"),
                   help="this client's certificate (default $FLEET_TLS_CERT); turns TLS on")
    p.add_argument("--tls-key", default=env("FLEET_TLS_KEY"), help="its key (default $FLEET_TLS_KEY)")


def tls_from(args: argparse.Namespace) -> "Tls | None":
    """The TLS the arguments ask for, or None for a plaintext connection."""
    from .client import Tls

    if not (args.tls_ca or args.tls_cert or args.tls_key):
        return None
    if args.tls_key and not args.tls_cert:
        raise UsageError("--tls-key needs --tls-cert")
    for flag, path in (("--tls-ca", args.tls_ca), ("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)):
        if path and not Path(path).is_file():
            raise UsageError(f"{flag}: no such file: {path}")
    return Tls(args.tls_ca, args.tls_cert, args.tls_key)


def _db_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default=DEFAULT_DB,
                   help=f"the fleet store, a path or URL (default {DEFAULT_DB}, or $FLEET_DB)")


def _broker(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected host:port, got {value!r}")
    return host, int(port)


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return int(value)


# --- serve ----------------------------------------------------------------------------------


def _cmd_serve(args: argparse.Namespace) -> int:
    from .manager import Manager, ManagerSettings

    if args.stats_interval <= 0:
        raise UsageError("--stats-interval must be > 0")
    if not 1.0 <= args.failover <= 3600:
        raise UsageError("--failover must be between 1 and 3600 seconds")
    host, port = args.broker
    try:
        Topics(args.prefix)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    operators = frozenset(args.operator or ["operator"])
    http = _http_settings(args)
    retain = _retention(args.retain_events)
    tls = tls_from(args)
    from edge.core.logs import setup_logging

    setup_logging(args.log_format, args.log_level, loggers=("edge", "fleet"))  # the MQTT link is edge code
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    manager = Manager(ManagerSettings(
        db=args.db, host=host, port=port, prefix=args.prefix, artifacts=args.artifacts, keys=args.keys,
        operators=operators, client_id=args.client_id, username=args.username,
        password=os.environ.get("FLEET_MQTT_PASSWORD"), max_transfers=args.max_transfers,
        failover_s=args.failover, retain_events=tuple(retain.items()), identity=args.identity,
        use_tls=tls is not None, tls_ca=tls.ca if tls else None, tls_cert=tls.cert if tls else None,
        tls_key=tls.key if tls else None))
    manager.start()
    server = None
    try:
        server = _start_console(manager, args.db, *http, retain) if http else None
    except BaseException:
        manager.stop()
        raise
    log.info("serving", extra={"fields": {"db": manager.store.name, "broker": f"{host}:{port}", "prefix": args.prefix,
                                          "operators": sorted(operators), "signing": args.keys is not None,
                                          "identity": args.identity, "tls": tls is not None}})
    try:
        while not stop.wait(args.stats_interval):
            log.info("stats", extra={"fields": manager.stats()})
    finally:
        if server is not None:
            server.stop()
            server.console.close()
        manager.stop()
        log.info("stopped", extra={"fields": manager.stats()})
    return 0


def _http_settings(args: argparse.Namespace) -> tuple[Any, str | None] | None:
    """The console's settings and token, checked before anything starts (exit 2 naming the option)."""
    if args.http is None:
        if args.http_token_file or args.http_tls_cert or args.http_tls_key:
            raise UsageError("--http-token-file and --http-tls-* need --http HOST:PORT")
        return None
    from .web import HttpError, HttpSettings, check

    settings = HttpSettings(host=args.http[0], port=args.http[1], token_file=args.http_token_file,
                            tls_cert=args.http_tls_cert, tls_key=args.http_tls_key)
    try:
        return settings, check(settings)
    except HttpError as exc:
        raise UsageError(str(exc)) from None


def _retention(values: list[str]) -> dict[str, float]:
    from .retention import EVERY_KIND, parse_rules

    try:
        rules = parse_rules(values, operate.duration)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    unknown = sorted(k for k in rules if k != EVERY_KIND and k not in EVENT_KINDS)
    if unknown:
        raise UsageError(f"--retain-events: unknown event kind {unknown[0]!r} (kinds: {', '.join(EVENT_KINDS)})")
    return rules


def _start_console(manager: Any, db: str, settings: Any, token: str | None, retain: dict[str, float]) -> Any:
    """The console, started on a read-only store of its own: nothing it runs can write."""
    from .store import Store
    from .web import Console, HttpServer, Queries

    store = Store.open_readonly(db, pool_size=4, busy_timeout_s=CONSOLE_BUSY_S)
    try:
        server = HttpServer(settings, Console(Queries(store), manager.stats, manager.ingest.ack_latency,
                                              retention=retain, token=token, secure_cookie=settings.tls))
        server.start()
    except BaseException:
        store.close()
        raise
    return server


def _http_address(value: str) -> tuple[str, int]:
    """HOST:PORT for the console ([::1]:8080 for IPv6; port 0: any free port, logged)."""
    host, _, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected host:port, got {value!r}")
    return host, int(port)


# --- reads --------------------------------------------------------------------------------------


# --- the store's schema ----------------------------------------------------------------------


def _cmd_db_upgrade(args: argparse.Namespace) -> int:
    from .store import Store
    from .store.engine import describe, parse_url

    name = describe(parse_url(args.db))
    before = _revision_or_none(args.db)
    store = Store.open(args.db)
    after = store.revision()
    store.close()
    if before == after:
        print(f"{name}: schema {after}, up to date")
    else:
        print(f"{name}: schema {before or 'none'} -> {after}")
    return 0


def _revision_or_none(db: str) -> str | None:
    from .store import Store, StoreError

    try:
        store = Store.open_readonly(db)
    except StoreError as exc:
        if "no fleet store here" in str(exc) or "no schema" in str(exc):
            return None
        raise
    try:
        return store.revision()
    finally:
        store.close()


def _cmd_db_current(args: argparse.Namespace) -> int:
    from .store.engine import head
    from .store.lease import Lease

    with _reading(args.db) as store:
        revision = store.revision()
        lease = Lease(store, "", duration_s=0).state() if revision == head() else None
    doc = {"db": store.name, "schema": revision, "code": head(), "up_to_date": revision == head(),
           "leader": lease["holder"] if lease and lease["expires_at"] > lease["now"] else None,
           "lease_epoch": lease["epoch"] if lease else None}
    if args.json:
        print(json.dumps(doc))
        return 0
    state = "up to date" if doc["up_to_date"] else f"older than this code's {doc['code']}: `fleet db upgrade`"
    print(f"{doc['db']}: schema {revision} ({state})")
    print(f"rollouts run by: {doc['leader'] or 'no manager holds the lease'}")
    return 0


def _cmd_db_copy(args: argparse.Namespace) -> int:
    from .store import Store
    from .store.copy import copy_store
    from .store.engine import is_sqlite, parse_url

    source_url = parse_url(args.source)
    artifacts = args.artifacts
    if artifacts is None and is_sqlite(source_url):
        artifacts = Path(f"{source_url.database}.artifacts")
    if str(parse_url(args.target)) == str(source_url):
        raise UsageError("--from and --to name the same store")
    source = Store.open(args.source)  # a store of an older schema is brought up to date first
    target = Store.open(args.target)
    try:
        done = copy_store(source, target, artifacts=artifacts,
                          progress=lambda table, rows: print(f"\r{table}: {rows} rows", end="", file=sys.stderr))
        print(file=sys.stderr)
        events = (source.count_events(), target.count_events())
    finally:
        source.close()
        target.close()
    print(f"copied {source.name} -> {target.name}: " + ", ".join(f"{t} {n}" for t, n in done.rows.items()))
    missing = events[0] - events[1]
    for table, keys in done.refused.items():
        print(f"not copied, {table}: {len(keys)} rows the target refuses: {', '.join(keys[:5])}", file=sys.stderr)
    if missing > 0:
        print(f"fleet: error: {missing} of {events[0]} events are not in the target", file=sys.stderr)
        return 1
    print(f"events: {events[0]} in the source, {events[1]} in the target")
    return 0


@contextlib.contextmanager
def _reading(db: str) -> Iterator["Store"]:
    """The store for a read command; rows it skips are one warning line on stderr a read."""
    from edge.core.logs import HumanFormatter

    from .store import Store

    warnings = logging.StreamHandler(sys.stderr)
    warnings.setFormatter(HumanFormatter())
    store_log = logging.getLogger("fleet.store")
    store_log.addHandler(warnings)
    try:
        store = Store.open_readonly(db)
        try:
            yield store
        finally:
            store.close()
    finally:
        store_log.removeHandler(warnings)


def _cmd_events_tail(args: argparse.Namespace) -> int:
    stop = threading.Event()
    if args.follow:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    with _reading(args.db) as store:
        last = store.last_rowid() if args.follow else 0
        for event in store.events(device=args.device, kind=args.kind, limit=args.limit):
            _print_event(event, args.json)
        while args.follow and not stop.wait(FOLLOW_POLL_S):
            events, last = store.events_after(last, device=args.device, kind=args.kind)
            for event in events:
                _print_event(event, args.json)
            sys.stdout.flush()
    return 0


def _print_event(event: dict[str, Any], as_json: bool) -> None:
    event = {k: v for k, v in event.items() if k != "rowid"}
    if as_json:
        print(json.dumps(event, separators=(",", ":")), flush=True)
        return
    payload = json.dumps(event["payload"], separators=(",", ":"))
    if len(payload) > 100:
        payload = payload[:97] + "..."
    print(f"{_when(event['captured_at'])}  {event['device']:<20} {event['camera'] or '-':<12} "
          f"{event['kind']:<17} {payload}", flush=True)


def _cmd_devices_list(args: argparse.Namespace) -> int:
    if args.db is not None:
        with _reading(args.db) as store:
            devices = store.devices()
    else:
        devices = operate.call(args, "devices.list")
    if args.json:
        print(json.dumps(devices, indent=2))
        return 0
    _print_table(("DEVICE", "STATE", "SITE", "LINE", "RUNTIME", "LAST SEEN", "EVENTS", "CLOCK", "MODELS",
                  "ENROLMENT"),
                 [(d["id"], d["state"] or "unknown", d["site"] or "-", d["line"] or "-", d["runtime"] or "-",
                   _when(d["last_seen"]), str(d["events"]), operate.skew_text(d.get("clock_skew_s")),
                   ",".join(f"{k}={v}" for k, v in sorted(d["models"].items())) or "-", d["enrolment"] or "-")
                  for d in devices], empty="no devices yet")
    return 0


def _cmd_identities_list(args: argparse.Namespace) -> int:
    with _reading(args.db) as store:
        rows = store.identities()
    if args.json:
        print(json.dumps([r.model_dump(exclude={"password_hash"}) for r in rows], indent=2))
        return 0
    _print_table(("NAME", "ROLE", "STATE", "CREDENTIAL", "SITE", "LINE", "ENROLLED", "REVOKED"),
                 [(r.name, r.role, r.state, r.credential, r.site or "-", r.line or "-", _when(r.created_at),
                   _when(r.revoked_at)) for r in rows], empty="no identities yet")
    return 0


def _print_table(header: tuple[str, ...], rows: list[tuple[str, ...]], *, empty: str) -> None:
    if not rows:
        print(empty)
        return
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def _when(t: float | None) -> str:
    if t is None:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


if __name__ == "__main__":
    sys.exit(main())
