"""The operator's commands: keys, models, policies, rollouts, devices, the simulator
and the rollout benchmark. All but `keys init` reach the manager through the broker."""

from __future__ import annotations

import argparse
import json
import re
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from edge.core.errors import UsageError

from .client import FleetClient
from .errors import OpError
from .upload import push_file

WATCH_POLL_S = 0.5
BAR = 24


def add_commands(sub: Any, common: argparse.ArgumentParser, rpc: argparse.ArgumentParser) -> None:
    keys = sub.add_parser("keys", parents=[common], help="the fleet's signing keys")
    keys_sub = keys.add_subparsers(metavar="ACTION")
    init = keys_sub.add_parser("init", parents=[common], help="make an Ed25519 key pair (never overwrites)")
    init.add_argument("--dir", type=Path, default=Path("fleet-keys"), help="where (default ./fleet-keys)")
    init.add_argument("--json", action="store_true", help="the key paths as JSON")
    init.set_defaults(func=cmd_keys_init)
    for action, helptext in (("rotate", "make the next signing key (nothing signs with it yet)"),
                             ("switch", "sign with the next key, once every device pins it"),
                             ("retire", "stop vouching for the previous key (its private key is deleted)"),
                             ("list", "the keys and their states")):
        p = keys_sub.add_parser(action, parents=[common], help=helptext)
        p.add_argument("--dir", type=Path, default=Path("fleet-keys"), help="the keys (default ./fleet-keys)")
        p.add_argument("--json", action="store_true", help="the result as JSON")
        if action == "retire":
            p.add_argument("name", help="the previous key's name (fleet keys list)")
        if action == "switch":
            p.add_argument("--db", type=Path, default=Path("fleet.db"),
                           help="the fleet store: every device must report that it pins the next key")
            p.add_argument("--force", action="store_true", help="switch even if some device does not say so")
        p.set_defaults(func=cmd_keys, action=action)

    for kind, plural in (("model", "models"), ("policy", "policies")):
        group = sub.add_parser(plural, parents=[common], help=f"the {kind} registry")
        group_sub = group.add_subparsers(metavar="ACTION")
        push = group_sub.add_parser("push", parents=[common, rpc], help=f"validate, upload and sign a {kind}")
        push.add_argument("file", type=Path, help=f"the {kind} file")
        push.add_argument("--name", help=f"{kind} name" + (" (default: the manifest's)" if kind == "model" else ""))
        push.add_argument("--version", help=f"{kind} version (default: the {'manifest' if kind == 'model' else 'document'}'s)")
        if kind == "model":
            push.add_argument("--manifest", type=Path, help="the model's manifest (default: beside the model)")
        push.set_defaults(func=cmd_push, kind=kind)
        listing = group_sub.add_parser("list", parents=[common, rpc], help=f"every {kind} version")
        listing.add_argument("--name", help="only this name")
        listing.set_defaults(func=cmd_list, kind=kind)
        show = group_sub.add_parser("show", parents=[common, rpc], help=f"a {kind}'s versions, or one (NAME@VERSION)")
        show.add_argument("ref", metavar="NAME[@VERSION]", help=f"the {kind}, or one version of it")
        show.set_defaults(func=cmd_show, kind=kind)

    rollout = sub.add_parser("rollout", parents=[common], help="staged rollouts of models and policies")
    r_sub = rollout.add_subparsers(metavar="ACTION")
    start = r_sub.add_parser("start", parents=[common, rpc], help="start a staged rollout")
    start.add_argument("ref", metavar="NAME@VERSION", help="the model or policy version to roll out")
    start.add_argument("--kind", choices=("model", "policy"), default="model", help="what to roll out")
    start.add_argument("--slot", help="the model slot on the devices (models only)")
    start.add_argument("--target", required=True, help="device ids (cam-1,cam-2) or tags (site=plant-a,line=3)")
    start.add_argument("--canary", type=int, default=1, help="devices in the canary stage (default 1; 0: none)")
    start.add_argument("--waves", default="10%,50%,100%", help="cumulative share of the target per wave")
    start.add_argument("--health-window", default="5m", help="how long a device must stay healthy (5m, 30s)")
    start.add_argument("--abort-failure-pct", type=float, default=20.0, help="abort at this failure share")
    start.add_argument("--min-executed", type=int, default=3, help="finished executions before it may abort")
    start.add_argument("--job-timeout", help="a device not active this long after its assignment has failed "
                                             "(e.g. 1h; default: no limit, an offline device holds its stage)")
    start.set_defaults(func=cmd_rollout_start)
    for action, helptext in (("pause", "stop assigning new stages"), ("resume", "carry on a paused rollout"),
                             ("abort", "stop and send every updated device back"),
                             ("rollback", "send a rollout's devices (or one) back to their previous version"),
                             ("status", "a rollout's progress (or every rollout)"),
                             ("watch", "live progress per stage until the rollout settles")):
        p = r_sub.add_parser(action, parents=[common, rpc], help=helptext)
        p.add_argument("id", nargs="?" if action == "status" else None,
                       help="the rollout id" + (" (default: every rollout)" if action == "status" else ""))
        if action == "abort":
            p.add_argument("--reason", help="why, kept with the rollout")
        if action == "rollback":
            p.add_argument("--device", help="only this device")
        p.set_defaults(func=cmd_rollout, action=action)

    sim = sub.add_parser("simulate", parents=[common, rpc], help="run N simulated devices")
    sim.add_argument("--devices", type=int, required=True, help="how many devices")
    sim.add_argument("--processes", type=int, default=1, help="worker processes sharing the devices (default 1)")
    sim.add_argument("--public-key", type=Path, required=True, action="append",
                     help="a key the devices pin (fleet.pub; repeatable)")
    sim.add_argument("--bundles", type=Path, help="each device's credential from its bundle, DIR/<id>/ "
                                                  "(`fleet devices add ID... --out DIR`); without it: anonymous")
    sim.add_argument("--slot", default="detector", help="the model slot the devices run")
    sim.add_argument("--runs", metavar="NAME@VERSION", help="what the devices run at start (with --runs-file)")
    sim.add_argument("--runs-file", type=Path, help="the file of --runs (for its sha256)")
    sim.add_argument("--id-prefix", default="sim", help="device ids start with this")
    sim.add_argument("--health-window", default="1s", help="each device's own watch before it commits")
    sim.add_argument("--fail-verify", type=float, default=0, metavar="PCT", help="percent whose download is corrupted")
    sim.add_argument("--unhealthy", type=float, default=0, metavar="PCT", help="percent that roll back as unhealthy")
    sim.add_argument("--offline-mid-download", type=float, default=0, metavar="PCT",
                     help="percent that drop off halfway through a download")
    sim.add_argument("--offline-for", default="5s", help="how long they stay away")
    sim.add_argument("--seed", type=int, default=0, help="picks which devices get each fault")
    sim.set_defaults(func=cmd_simulate)

    bench = sub.add_parser("bench", parents=[common], help="benchmarks")
    b_sub = bench.add_subparsers(metavar="WHAT")
    b = b_sub.add_parser("rollout", parents=[common], help="a staged rollout to N simulated devices, measured")
    b.add_argument("--devices", type=int, default=1000, help="simulated devices")
    b.add_argument("--model", type=Path, help="the model to roll out (default ../shared/models/yolov8n_full_integer_quant-b.tflite)")
    b.add_argument("--health-window", default="2s", help="the rollout's health window")
    b.add_argument("--max-transfers", type=int, default=64, help="the manager's --max-transfers")
    b.add_argument("--pumps", type=int, default=2, help="threads per simulator process")
    b.add_argument("--processes", type=int, help="simulator processes (default one per 2,500 devices, "
                                                 "at most two per core)")
    b.add_argument("--ingest-batches", type=int, default=5, help="outbox batches per device in the ingest phase")
    b.add_argument("--ingest-events", type=int, default=20, help="events per batch")
    b.add_argument("--secure", action="store_true",
                   help="the fleet set up for a plant: its own CA, a certificate per device, TLS and the generated "
                        "broker ACL (the benchmark makes them, so it takes no --tls-* files)")
    b.add_argument("--managers", type=int, default=1, help="`fleet serve` processes sharing the store (default 1)")
    b.add_argument("--db", help="the store they share (default a SQLite file in the run's temp dir; "
                                "several managers need postgresql://..., or `postgresql`: a private "
                                "cluster made for the run)")
    b.add_argument("--timeout", default="15m", help="how long each phase may take before the run gives up")
    b.add_argument("--json", action="store_true", help="the results as one JSON document")
    b.set_defaults(func=cmd_bench_rollout)
    c = b_sub.add_parser("console", parents=[common], help="the console's page and API response times on a big store")
    c.add_argument("--devices", type=int, default=10_000, help="devices in the store (default 10000)")
    c.add_argument("--events", type=int, default=1_000_000, help="events in the store (default 1000000)")
    c.add_argument("--requests", type=int, default=100, help="requests per route (default 100)")
    c.add_argument("--db", help="the store: filled if it holds no devices, else measured as it is "
                                "(default a SQLite file in a temp dir, removed after)")
    c.add_argument("--json", action="store_true", help="the results as one JSON document")
    c.set_defaults(func=cmd_bench_console)


# --- helpers ----------------------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> FleetClient:
    import os

    from .cli import tls_from

    host, port = args.broker
    return FleetClient(host, port, identity=args.identity, prefix=args.prefix, username=args.username,
                       password=os.environ.get("FLEET_MQTT_PASSWORD"), timeout=args.timeout, tls=tls_from(args))


def call(args: argparse.Namespace, op: str, body: dict[str, Any] | None = None) -> Any:
    """One request to the manager through the broker, with the command's connection options."""
    with _client(args) as client:
        return client.call(op, body)


def _ref(value: str, *, version_required: bool) -> tuple[str, str | None]:
    name, at, version = value.partition("@")
    if not name or (at and not version) or (version_required and not version):
        raise UsageError(f"expected NAME@VERSION, got {value!r}" if version_required
                         else f"expected NAME or NAME@VERSION, got {value!r}")
    return name, version or None


def duration(value: str) -> float:
    """90, 90s, 5m, 1h, 30d, 1.5s → seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*", value)
    if not m:
        raise UsageError(f"expected a duration like 30s, 5m, 1h or 30d, got {value!r}")
    scale = {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    return float(m.group(1)) * scale


def waves(value: str) -> list[float]:
    try:
        return [float(w.strip().rstrip("%")) for w in value.split(",") if w.strip()]
    except ValueError:
        raise UsageError(f"expected percentages like 10%,50%,100%, got {value!r}") from None


def target(value: str) -> dict[str, Any]:
    parts = [p.strip() for p in value.split(",") if p.strip()]
    if not parts:
        raise UsageError("--target is empty")
    tagged = ["=" in p for p in parts]
    if all(tagged):
        return {"tags": dict(p.split("=", 1) for p in parts)}
    if any(tagged):
        raise UsageError("--target is either device ids or key=value tags, not both")
    return {"ids": parts}


def _out(args: argparse.Namespace, doc: Any, human: str) -> None:
    print(json.dumps(doc, indent=2) if args.json else human)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


# --- keys, models, policies ----------------------------------------------------------------------


def cmd_keys_init(args: argparse.Namespace) -> int:
    from edge.core.signing import KeyFileError, init_keys

    try:
        private, public = init_keys(args.dir)
    except KeyFileError as exc:
        raise UsageError(str(exc)) from None
    _out(args, {"private": str(private), "public": str(public)},
         f"private key {private} (mode 600: keep it with the manager, `fleet serve --keys {args.dir}`)\n"
         f"public key  {public} (pin it on every device)")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from .keyring import Keyring

    ring = Keyring(args.dir)
    if args.action == "rotate":
        key = ring.rotate()
        _out(args, {"name": key.name, "id": key.id, "public": str(key.pub_path)}, "\n".join([
            f"made {key.name} (id {key.id}); nothing signs with it yet. Then:",
            f"  1. pin {key.pub_path} on every device: add it to agent.public_keys (new bundles carry it) and",
            "     restart edge run; each device reports the keys it pins",
            f"  2. fleet keys switch --dir {args.dir} --db fleet.db  (refused while a device does not pin it),",
            "     then restart fleet serve: it signs with the new key, and signs its artifacts again",
            f"  3. fleet keys retire {ring.active.name} --dir {args.dir}, and drop it from the devices' public_keys"]))
    elif args.action == "switch":
        nxt = next((k for k in ring.keys if k.state == "next"), None)
        if nxt is not None and not args.force:
            missing = _not_pinning(args.db, nxt.id)
            if missing:
                raise UsageError(f"{len(missing)} device(s) do not report pinning {nxt.name} ({nxt.id}): "
                                 f"{', '.join(missing[:10])}; pin it there first (or --force)")
        new, old = ring.switch()
        _out(args, {"active": new.name, "previous": old.name},
             f"{new.name} signs from now on (restart fleet serve); {old.name} is still pinned, so what it signed "
             f"verifies until `fleet keys retire {old.name}`")
    elif args.action == "retire":
        key = ring.retire(args.name)
        _out(args, {"retired": key.name}, f"{key.name} retired and its private key deleted; drop {key.pub_path.name}"
                                          " from the devices' agent.public_keys: anything only it signed is refused")
    else:
        rows = [{"name": k.name, "id": k.id, "state": k.state} for k in ring.keys]
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            _table(("NAME", "ID", "STATE"), [(r["name"], r["id"], r["state"]) for r in rows])
    return 0


def _not_pinning(db: Path, key: str) -> list[str]:
    """Devices (enrolled, or that reported) that do not say they pin ``key``."""
    from .desired import load_reported
    from .store import Store

    if not db.is_file():
        raise UsageError(f"no fleet store at {db}: it says which keys the devices pin (or --force)")
    store = Store.open_readonly(db)
    try:
        reported = {r.device: r for r in store.load("reported", load_reported)}
        enrolled = {i.name for i in store.identities("device") if i.state == "enrolled"}
        revoked = {i.name for i in store.identities("device") if i.state == "revoked"}
    finally:
        store.close()
    missing = []
    for device in sorted((enrolled | set(reported)) - revoked):
        rep = reported.get(device)
        if rep is None:
            missing.append(f"{device} (never reported)")
        elif key not in rep.keys:
            missing.append(f"{device} (pins {', '.join(rep.keys) or 'no key ids: an older edge run'})")
    return missing


def cmd_push(args: argparse.Namespace) -> int:
    from .registry import ArtifactError, validate_model, validate_policy

    path: Path = args.file
    if not path.is_file():
        raise UsageError(f"no such file: {path}")
    try:
        if args.kind == "model":
            manifest = validate_model(path, args.manifest)
            name, version = args.name or manifest["name"], args.version or manifest["version"]
            if (name, version) != (manifest["name"], manifest["version"]):
                raise UsageError(f"the manifest names {manifest['name']}@{manifest['version']}, "
                                 f"not {name}@{version}; fix one of them")
        else:
            manifest = None
            found = validate_policy(path)
            version = args.version or found
            name = args.name or path.stem
            if version != found:
                raise UsageError(f"the policy document says version {found}, not {version}")
    except ArtifactError as exc:
        raise UsageError(str(exc)) from None
    with _client(args) as client:
        result = push_file(client, path, kind=args.kind, name=name, version=version, manifest=manifest,
                           progress=not args.json, timeout=max(args.timeout, 60))
    verb = "pushed" if result["created"] else "already there:"
    _out(args, result, f"{verb} {args.kind} {name}@{version} sha256 {result['sha256'][:16]}… "
                       f"{_mb(result['size'])}, signed")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        rows = client.call("artifacts.list", {"kind": args.kind, "name": args.name})
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"no {args.kind}s yet")
    else:
        _table(("NAME", "VERSION", "SHA256", "SIZE", "PUSHED BY"),
               [(r["name"], r["version"], r["sha256"][:16], _mb(r["size"]), r["pushed_by"] or "-") for r in rows])
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    name, version = _ref(args.ref, version_required=False)
    with _client(args) as client:
        rows = client.call("artifacts.show", {"kind": args.kind, "name": name, "version": version})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        m = r.get("manifest") or {}
        print(f"{r['kind']} {r['name']}@{r['version']}\n  sha256 {r['sha256']}\n  size {r['size']} bytes\n"
              f"  signed {'yes' if r.get('signature') else 'no'}\n  pushed by {r['pushed_by']}"
              + (f"\n  task {m.get('task')}, {len(m.get('labels', []))} labels" if m else ""))
    return 0


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())


# --- rollouts ---------------------------------------------------------------------------------------------


def cmd_rollout_start(args: argparse.Namespace) -> int:
    name, version = _ref(args.ref, version_required=True)
    if args.kind == "model" and not args.slot:
        raise UsageError("a model rollout needs --slot")
    body = {"kind": args.kind, "name": name, "version": version, "slot": args.slot, "target": target(args.target),
            "canary": args.canary, "waves": waves(args.waves), "health_window_s": duration(args.health_window),
            "abort_failure_pct": args.abort_failure_pct, "min_executed": args.min_executed,
            "job_timeout_s": duration(args.job_timeout) if args.job_timeout else None}
    with _client(args) as client:
        status = client.call("rollouts.start", body)
    _out(args, status, f"rollout {status['id']} started: {name}@{version} to {status['devices']} devices in "
                       f"{len(status['stages'])} stages; `fleet rollout watch {status['id']}` to follow it")
    return 0


def cmd_rollout(args: argparse.Namespace) -> int:
    action = args.action
    if action != "status" and not args.id:
        raise UsageError(f"rollout {action} needs a rollout id")
    with _client(args) as client:
        if action == "watch":
            return _watch(client, args)
        if action == "status" and not args.id:
            rows = client.call("rollouts.list")
            if args.json:
                print(json.dumps(rows, indent=2))
            elif not rows:
                print("no rollouts yet")
            else:
                _table(("ID", "STATE", "ARTIFACT", "SLOT", "DEVICES", "STAGE", "FAILED"),
                       [(r["id"], r["state"], f"{r['name']}@{r['version']}", r["slot"], str(r["devices"]),
                         str(r["stage"]), str(r["failed"])) for r in rows])
            return 0
        body: dict[str, Any] = {"id": args.id}
        if action == "abort" and args.reason:
            body["reason"] = args.reason
        if action == "rollback" and args.device:
            body["device"] = args.device
        status = client.call(f"rollouts.{action}", body)
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print("\n".join(render(status)))
    return 0


def render(s: dict[str, Any]) -> list[str]:
    """A rollout as lines of text: a header, one bar per stage, then why it stopped."""
    lines = [f"{s['id']}  {s['name']}@{s['version']} → slot {s['slot']}  {s['state'].upper()}  "
             f"{s['devices']} devices, {s['finished']} finished, {s['failed']} failed"]
    for st in s["stages"]:
        n = st["devices"]
        ok = st.get("succeeded", 0)
        bad = st.get("failed", 0)
        busy = sum(st.get(k, 0) for k in ("assigned", "in_progress", "active"))
        filled, failed = int(BAR * ok / max(1, n)), int(BAR * bad / max(1, n))
        bar = "#" * filled + "x" * failed + "." * (BAR - filled - failed)
        mark = ">" if s["stage"] == st["stage"] and s["state"] in ("running", "paused") else " "
        lines.append(f"{mark} {st['name']:<8} [{bar}] {ok}/{n} ok  {bad} failed  {busy} in progress"
                     + (f"  {st['skipped']} skipped" if st.get("skipped") else ""))
    if s["reverts"]:
        lines.append("  sent back: " + ", ".join(f"{v} {k}" for k, v in sorted(s["reverts"].items())))
    if s["reason"]:
        lines.append(f"  reason: {s['reason']}")
    return lines


def _watch(client: FleetClient, args: argparse.Namespace) -> int:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    tty = sys.stdout.isatty() and not args.json
    drawn, last = 0, None
    status: dict[str, Any] = {}
    while not stop.is_set():
        status = client.call("rollouts.status", {"id": args.id})
        if args.json:
            key = json.dumps({k: v for k, v in status.items() if k != "updated_at"}, sort_keys=True)
            if key != last:
                print(json.dumps(status), flush=True)
                last = key
        else:
            lines = render(status)
            if tty:
                if drawn:
                    sys.stdout.write(f"\x1b[{drawn}F\x1b[J")
                sys.stdout.write("\n".join(lines) + "\n")
                drawn = len(lines)
            elif "\n".join(lines) != last:
                print("\n".join(lines), flush=True)
                last = "\n".join(lines)
            sys.stdout.flush()
        if status.get("settled"):
            break
        stop.wait(WATCH_POLL_S)
    return 0 if status.get("state") == "completed" else 1


SKEW_FLAG_S = 2.0  # a device clock further off than this is flagged: its event times are suspect


def skew_text(skew: float | None) -> str:
    """A device's clock skew for a table: ``+0.1s``, or ``+3600.0s SKEWED`` past the threshold."""
    if skew is None:
        return "-"
    return f"{skew:+.1f}s" + (" SKEWED" if abs(skew) > SKEW_FLAG_S else "")


def cmd_devices_show(args: argparse.Namespace) -> int:
    with _client(args) as client:
        view = client.call("devices.show", {"id": args.device})
    if args.json:
        print(json.dumps(view, indent=2))
        return 0
    desired, reported = view["desired"], view["reported"]
    print(f"device {view['device']}" + (f"  clock {skew_text(view['clock_skew_s'])}"
                                        if view.get("clock_skew_s") is not None else ""))
    if desired:
        print(f"  desired v{desired['version']}: " + ", ".join(
            f"{slot}={a['artifact']['name']}@{a['artifact']['version']} (job {a['job']})"
            for slot, a in sorted(desired["models"].items())) + (
            f", policy={desired['policy']['artifact']['version']}" if desired.get("policy") else ""))
    if reported:
        print(f"  reported (desired v{reported['desired_version']}): " + ", ".join(
            f"{slot}={r['name']}@{r['version']}" for slot, r in sorted(reported["models"].items())))
        if reported.get("last_change"):
            print(f"  last change: {reported['last_change']['reason']}")
    for e in view["executions"]:
        print(f"  rollout {e['rollout']}: {e['state']}" + (f" ({e['reason']})" if e["reason"] else "")
              + (f", sent back: {e['revert']}" if e["revert"] else ""))
    return 0


# --- simulator and benchmark -----------------------------------------------------------------------------


def cmd_simulate(args: argparse.Namespace) -> int:
    from edge.core.signing import KeyFileError, load_public_key

    from .bundles import Credentials, read_credentials
    from .cli import tls_from
    from .simprocesses import SimulatorProcesses
    from .simulator import Faults, SimSettings, load_running, pick

    if args.devices < 1:
        raise UsageError("--devices must be at least 1")
    if not 1 <= args.processes <= args.devices:
        raise UsageError("--processes must be between 1 and --devices")
    if bool(args.runs) != bool(args.runs_file):
        raise UsageError("--runs and --runs-file go together")
    try:
        key = [load_public_key(p) for p in args.public_key]
    except KeyFileError as exc:
        raise UsageError(str(exc)) from None
    host, port = args.broker
    ids = SimSettings(host=host, port=port, count=args.devices, public_key=key, id_prefix=args.id_prefix).device_ids()
    # each device's own credential is in its bundle; without bundles, --tls-ca alone
    # (TLS without a client credential) is all that applies to them
    tls = tls_from(args)
    if args.bundles:
        credentials = {i: read_credentials(args.bundles / i) for i in ids}
    elif tls is not None and tls.ca:
        credentials = {i: Credentials(ca_file=tls.ca) for i in ids}
    else:
        credentials = None
    faults = Faults(fail_verify=pick(ids, args.fail_verify, seed=args.seed),
                    unhealthy=pick(ids, args.unhealthy, seed=args.seed + 1),
                    offline_mid_download=pick(ids, args.offline_mid_download, seed=args.seed + 2),
                    offline_for_s=duration(args.offline_for))
    settings = SimSettings(host=host, port=port, count=args.devices, public_key=key, prefix=args.prefix,
                           id_prefix=args.id_prefix, slot=args.slot,
                           runs=load_running(args.runs, args.runs_file) if args.runs else None,
                           health_window_s=duration(args.health_window), faults=faults, credentials=credentials)
    _reachable(host, port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    sim = SimulatorProcesses(settings, args.processes)
    try:
        sim.start()
        print(json.dumps({"devices": args.devices, "processes": args.processes,
                          "fail_verify": sorted(faults.fail_verify), "unhealthy": sorted(faults.unhealthy),
                          "offline_mid_download": sorted(faults.offline_mid_download)}), flush=True)
        while not stop.wait(5.0):
            report = sim.report()
            print(json.dumps({"online": report.online, "jobs": dict(report.jobs)}), flush=True)
    finally:
        sim.stop()
    return 0


def _reachable(host: str, port: int) -> None:
    """OpError (exit 1) naming the broker when nothing accepts a connection there."""
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as exc:
        raise OpError("unavailable", f"cannot reach the broker at {host}:{port}: {exc.strerror or exc}") from None


def cmd_bench_console(args: argparse.Namespace) -> int:
    from .web.bench import run_console_bench

    if args.devices < 1 or args.events < 0 or args.requests < 1:
        raise UsageError("--devices and --requests must be at least 1, --events at least 0")
    result = run_console_bench(devices=args.devices, events=args.events, requests=args.requests, db=args.db)
    print(json.dumps(result, indent=2) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))
    return 0


def cmd_bench_rollout(args: argparse.Namespace) -> int:
    from .bench import run_rollout_bench

    result = run_rollout_bench(devices=args.devices, model=args.model, health_window_s=duration(args.health_window),
                               max_transfers=args.max_transfers, pumps=args.pumps,
                               ingest_batches=args.ingest_batches, ingest_events=args.ingest_events,
                               managers=args.managers, db=args.db, processes=args.processes,
                               timeout_s=duration(args.timeout), secure=args.secure)
    print(json.dumps(result, indent=2) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))
    return 0 if result.get("state") == "completed" else 1

