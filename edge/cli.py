"""The edge command: run the daemon, check models and configs, benchmark."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Sequence

from edge import __version__
from edge.core.errors import ConfigError, EdgeError, SourceError, UsageError, run_command

DEFAULT_PIPELINE_ROUNDS = 20  # edge.bench.pipeline is imported only when the bench runs


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("edge", _parser(), argv)


def _parser() -> argparse.ArgumentParser:
    # --debug is accepted before or after the subcommand; SUPPRESS keeps a subparser
    # from resetting a value given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks on errors")
    parser = argparse.ArgumentParser(prog="edge", description=__doc__, parents=[common])
    parser.add_argument("--version", action="version", version=f"edgecam {__version__}")
    sub = parser.add_subparsers(metavar="COMMAND")

    run = sub.add_parser("run", parents=[common], help="run the camera daemon")
    run.add_argument("--config", required=True, type=Path, help="device config (YAML)")
    run.add_argument("--results", type=Path,
                     help="append per-frame results as JSON lines to this file ('-': stdout)")
    run.add_argument("--log-format", choices=("json", "human"), help="default: the config's logging.format")
    run.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                     help="default: the config's logging.level")
    run.set_defaults(func=_cmd_run)

    stats = sub.add_parser("stats", parents=[common], help="show a running daemon's counters")
    stats.add_argument("--config", required=True, type=Path, help="the daemon's config (runtime.stats_file)")
    stats.add_argument("--json", action="store_true", help="the raw snapshot")
    stats.set_defaults(func=_cmd_stats)

    infer = sub.add_parser("infer", parents=[common], help="run a model on images and print the results")
    _model_args(infer)
    infer.add_argument("--json", action="store_true", help="one JSON document per image")
    infer.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files (JPEG, PNG, BMP)")
    infer.set_defaults(func=_cmd_infer)

    baseline = sub.add_parser("baseline", parents=[common],
                              help="record a model's results on known-good video: the drift baseline")
    _model_args(baseline)
    baseline.add_argument("--source", required=True, type=Path, help="a video the site trusts")
    baseline.add_argument("--every", type=int, default=1, help="use every Nth frame (default 1)")
    baseline.add_argument("--max-frames", type=int, help="stop after this many frames")
    baseline.add_argument("--policy", type=Path, help="decision policy whose unsure band counts (default 0.25-0.5)")
    baseline.add_argument("--write", action="store_true", help="write it into the manifest instead of printing it")
    baseline.set_defaults(func=_cmd_baseline)

    config = sub.add_parser("config", parents=[common], help="check a config or print its schema")
    config_sub = config.add_subparsers(metavar="ACTION")
    check = config_sub.add_parser("check", parents=[common], help="validate a config file")
    check.add_argument("file", type=Path, help="the device config (YAML)")
    check.set_defaults(func=_cmd_config_check)
    schema = config_sub.add_parser("schema", parents=[common], help="print the config JSON Schema")
    schema.set_defaults(func=_cmd_config_schema)

    policy = sub.add_parser("policy", parents=[common], help="check a decision policy, or show the one in force")
    policy_sub = policy.add_subparsers(metavar="ACTION")
    policy_check = policy_sub.add_parser("check", parents=[common], help="validate a policy file")
    policy_check.add_argument("file", type=Path, help="the policy (YAML)")
    policy_check.add_argument("--config", type=Path,
                              help="device config: also check the trigger tasks and classes the policy names")
    policy_check.add_argument("--model", type=Path, action="append",
                              help="a model (.tflite, its manifest beside it) or manifest (.yaml) the policy is for: "
                                   "its share rules must name classes a segmentation model has (repeatable)")
    policy_check.set_defaults(func=_cmd_policy_check)
    policy_show = policy_sub.add_parser("show", parents=[common],
                                        help="the policy in force and where it came from (local file or fleet)")
    policy_show.add_argument("--config", required=True, type=Path, help="device config")
    policy_show.add_argument("--json", action="store_true", help="one JSON document")
    policy_show.set_defaults(func=_cmd_policy_show)

    models = sub.add_parser("models", parents=[common], help="the models the device holds, by slot")
    models_sub = models.add_subparsers(metavar="ACTION")
    models_list = models_sub.add_parser("list", parents=[common], help="active and previous model of each slot")
    models_list.add_argument("--config", required=True, type=Path, help="device config (agent.state_dir)")
    models_list.add_argument("--json", action="store_true", help="one JSON list")
    models_list.set_defaults(func=_cmd_models_list)
    models_rollback = models_sub.add_parser("rollback", parents=[common],
                                            help="make a slot's previous model the active one")
    models_rollback.add_argument("slot", help="the model slot, as named under models: in the config")
    models_rollback.add_argument("--config", required=True, type=Path, help="device config (agent.state_dir)")
    models_rollback.set_defaults(func=_cmd_models_rollback)

    bench = sub.add_parser("bench", parents=[common], help="benchmarks; each prints one JSON document")
    bench_sub = bench.add_subparsers(metavar="SCENARIO")
    # `edge bench --model M --source S` is the pipeline benchmark.
    _pipeline_bench_args(bench, required=False)
    bench.set_defaults(func=_cmd_bench)
    pipeline = bench_sub.add_parser("pipeline", parents=[common], help="pipeline fps against bare invoke()")
    _pipeline_bench_args(pipeline, required=True)
    pipeline.set_defaults(func=_cmd_bench)
    scheduler = bench_sub.add_parser("scheduler", parents=[common],
                                     help="the scheduler under overload against a FIFO queue")
    scheduler.add_argument("--model", required=True, type=Path, help=".tflite file")
    scheduler.add_argument("--manifest", type=Path, help="manifest (default: beside the model)")
    scheduler.add_argument("--threads", type=int, help="interpreter threads (default: core count)")
    scheduler.add_argument("--source", required=True, type=Path, help="a video file, looped")
    scheduler.add_argument("--cameras", type=int, help="default: enough for about 2x overload")
    scheduler.add_argument("--fps", type=float, default=50.0, help="pace of each camera (default 50)")
    scheduler.add_argument("--seconds", type=float, default=10.0, help="measured seconds per run")
    scheduler.set_defaults(func=_cmd_bench_scheduler)
    outbox = bench_sub.add_parser("outbox", parents=[common],
                                  help="outbox append, end-to-end and drain rates against a local Mosquitto")
    outbox.add_argument("--events", type=int, default=1_000_000, help="backlog to drain (default 1000000)")
    outbox.add_argument("--live-events", type=int, default=200_000,
                        help="events appended while syncing, end to end (default 200000)")
    outbox.add_argument("--batch-events", type=int, default=500, help="events per outbox batch (default 500)")
    outbox.add_argument("--window", type=int, default=4, help="batches awaiting an ack at once (default 4)")
    outbox.add_argument("--workdir", type=Path, help="keep the outbox, fleet store and broker files here")
    alerts = bench_sub.add_parser("alerts", parents=[common],
                                  help="capture-to-alert latency at a real subscriber against invoke()")
    _daemon_bench_args(alerts, model=".tflite file (a person detector)",
                       source="a video with people, looped at its own pace", seconds=20.0)
    alerts.add_argument("--line-protocols", action="store_true",
                        help="also run the Sparkplug edge node, Home Assistant discovery and the command "
                             "topic, with a Sparkplug host subscribed (default: off, alerts alone)")
    alerts.set_defaults(func=_cmd_bench_alerts)
    outbox.set_defaults(func=_cmd_bench_outbox)
    memory = bench_sub.add_parser("memory", parents=[common],
                                  help="edge run's resident memory after warm-up: one camera, then more")
    memory.add_argument("--model", required=True, type=Path, help=".tflite file (the demo's: YOLOv8n)")
    memory.add_argument("--manifest", type=Path, help="manifest (default: beside the model)")
    memory.add_argument("--source", required=True, type=Path, help="the first camera's video, looped")
    memory.add_argument("--extra-source", type=Path, help="each further camera's video, looped")
    memory.add_argument("--extra-cameras", default="0,1,2",
                        help="cameras beyond the first, a run for each count (default 0,1,2)")
    memory.add_argument("--warmup", type=float, default=25.0,
                        help="seconds after the daemon says it runs before reading (default 25)")
    memory.add_argument("--threads", type=int, default=2, help="interpreter threads (default 2)")
    memory.add_argument("--workdir", type=Path, help="keep each run's config and log here")
    memory.set_defaults(func=_cmd_bench_memory)
    observe = bench_sub.add_parser("observe", parents=[common],
                                   help="cost of the quality measures and of a scrape a second, against the budget")
    _daemon_bench_args(observe, model=".tflite file", source="a video, looped at its own pace (720p: the budget "
                       "the README quotes)", seconds=10.0)
    observe.set_defaults(func=_cmd_bench_observe)
    decode = bench_sub.add_parser("decode", parents=[common],
                                  help="the contract's strict decoder against plain pydantic on an outbox batch")
    decode.add_argument("--events", type=int, default=500, help="events in the batch (default 500)")
    decode.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    decode.set_defaults(func=_cmd_bench_decode)
    return parser


def _pipeline_bench_args(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument("--model", required=required, type=Path, help=".tflite file")
    p.add_argument("--manifest", type=Path, help="manifest (default: beside the model, else guessed)")
    p.add_argument("--labels", type=Path, help="labels file (overrides the manifest's)")
    p.add_argument("--threads", type=int, help="interpreter threads (default: core count)")
    p.add_argument("--source", required=required, type=Path, help="a video file")
    p.add_argument("--rounds", type=int, default=DEFAULT_PIPELINE_ROUNDS,
                   help=f"interleaved rounds of 2 s per loop (default {DEFAULT_PIPELINE_ROUNDS})")
    p.add_argument("--round-seconds", type=float, default=2.0,
                   help="measured seconds of each loop in a round (default 2; longer on a slow or busy machine)")
    p.add_argument("--no-naive", dest="naive", action="store_false", help="leave out the naive loop")


def _daemon_bench_args(p: argparse.ArgumentParser, *, model: str, source: str, seconds: float) -> None:
    p.add_argument("--model", required=True, type=Path, help=model)
    p.add_argument("--manifest", type=Path, help="manifest (default: beside the model)")
    p.add_argument("--source", required=True, type=Path, help=source)
    p.add_argument("--seconds", type=float, default=seconds, help=f"how long to run (default {seconds:g})")
    p.add_argument("--threads", type=int, default=2, help="interpreter threads (default 2)")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path, help=".tflite file")
    p.add_argument("--manifest", type=Path, help="manifest (default: beside the model, else guessed)")
    p.add_argument("--labels", type=Path, help="labels file, one per line (overrides the manifest's)")
    p.add_argument("--threads", type=int, help="interpreter threads (default: core count)")


def _checked_config(path: Path):
    """The config at ``path`` with every file it names in place and its policy valid, or
    ConfigError / PolicyError (exit 2: systemd does not restart a daemon whose config must
    be fixed first)."""
    from edge.config import load_config, missing_files
    from edge.decide.policy import load_policy

    cfg = load_config(path)
    problems = missing_files(cfg)
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
    if cfg.decisions.policy is not None:
        _check_on_device(load_policy(cfg.decisions.policy), cfg, str(cfg.decisions.policy))
    return cfg


def _check_on_device(policy, cfg, source: str) -> None:
    """PolicyError when the policy names trigger tasks or classes the device's config lacks:
    a crop rule's or verifier's, a share rule's (classes from each model's manifest, as the
    daemon will load it)."""
    from edge.decide.cascade import check_device, device_view
    from edge.decide.policy import check_classes
    from edge.inference.manifest import load_manifest, manifest_path_for

    specs = {}
    for slot, model in cfg.models.items():
        manifest = model.manifest or manifest_path_for(model.path)
        specs[slot] = load_manifest(manifest, model_dir=model.path.parent) if manifest.is_file() else None
        if specs[slot] is not None and specs[slot].task == "segment":
            check_classes(policy, specs[slot].labels, model=f"models.{slot} ({specs[slot].name})", source=source)
    check_device(policy, device_view(cfg, lambda slot: specs[slot].labels if specs[slot] else []), source=source)


def _cmd_run(args: argparse.Namespace) -> int:
    from edge.core.logs import setup_logging
    from edge.core.memory import tune_allocator
    from edge.daemon import Daemon, open_results

    tune_allocator()  # before any thread starts: the arenas are made as threads first allocate
    cfg = _checked_config(args.config)
    try:
        sink, stream = open_results(args.results)
    except OSError as exc:
        raise UsageError(f"--results {args.results}: cannot open: {exc.strerror or exc}") from None
    setup_logging(args.log_format or cfg.logging.format, args.log_level or cfg.logging.level)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until there is a daemon to reload
    try:
        daemon = Daemon(cfg, sink)
        signal.signal(signal.SIGHUP, lambda *_: daemon.reload_requested.set())
        return daemon.run(stop)
    finally:
        if stream:
            stream.close()


def _cmd_stats(args: argparse.Namespace) -> int:
    import time

    from edge.config import load_config

    cfg = load_config(args.config)
    path = cfg.runtime.stats_file
    if path is None:
        raise ConfigError(f"{args.config}: runtime.stats_file is not set, so the daemon writes no stats file")
    try:
        snap = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EdgeError(f"cannot read stats file {path}: {exc}") from None
    if args.json:
        print(json.dumps(snap, indent=2))
        return 0
    alive = "alive" if snap["liveness"]["alive"] else f"NOT alive ({snap['liveness']['stuck']} stuck invokes)"
    print(f"{path} ({time.time() - snap['at']:.0f} s old), {alive}")
    if snap.get("models"):
        print("models: " + ", ".join(f"{slot} {name}" for slot, name in sorted(snap["models"].items())))
    if snap.get("process"):
        print(f"memory: {snap['process']['rss_mb']:g} MB resident, peak {snap['process']['peak_rss_mb']:g} MB")
    d = snap.get("decisions") or {}
    if d.get("samples") or d.get("samples_capped"):
        kept, capped, busy = (d.get(k, {}) for k in ("samples", "samples_capped", "samples_skipped"))
        print("samples kept: " + ", ".join(
            f"{r} {kept.get(r, 0)} (capped {capped.get(r, 0)}, store busy {busy.get(r, 0)})"
            for r in sorted({*kept, *capped, *busy})))
    for cam in snap["cameras"]:
        dropped = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in sorted(cam["dropped"].items()))
        age = " / ".join(f"{k} {v:.0f} ms" for k, v in cam["age_ms"].items()) or "-"
        print(f"\n{cam['camera']}: {cam['state']}, budget {cam['budget_ms']:g} ms, captured {cam['captured']}, "
              f"processed {cam['processed']} ({cam['processed_fps']:g} fps), superseded {cam['superseded']}, "
              f"dropped {dropped or 0}, deadline misses {cam['deadline_misses']}, age {age}")
        print(f"  {'task':<16}{'runs':>8}{'forced':>8}{'budget':>8}{'period':>8}{'trigger':>8}{'motion':>8}"
              f"{'est ms':>9}{'p95 ms':>9}")
        for name, t in cam["tasks"].items():
            k = t["skips"]
            print(f"  {name:<16}{t['runs']:>8}{t['forced']:>8}{k['budget']:>8}{k['period']:>8}{k['trigger']:>8}"
                  f"{k['motion']:>8}{t['estimate_ms']:>9.2f}{t['latency_ms'].get('p95', 0):>9.2f}")
        for line in _observe_lines(cam):
            print(line)
    return 0


def _observe_lines(cam: dict) -> list[str]:
    """A camera's picture measures and each task's last drift window, for ``edge stats``."""
    lines = []
    q = cam.get("quality")
    if q:
        lines.append(f"  picture: brightness {q['brightness']:.0f}, contrast {q['contrast']:.1f}, "
                     f"sharpness {q['sharpness']:.0f}, flat {q['flat']:.2f}")
    for task, d in cam.get("drift", {}).items():
        head = (f"  drift {task} ({d['model']} {d['model_version']}): window {d['window']}, {d['frames']} frames, "
                f"{d['detections_per_frame']:.2f} results/frame, unsure {d['unsure_share']:.2f}")
        if d.get("learned"):
            lines.append(f"{head}; became the baseline")
        elif "psi" in d:
            lines.append(f"{head}; against the {d['baseline']} baseline: psi {d['psi']:.3f}, "
                         f"class shift {d['class_shift']:.3f}, detections x{d.get('detections_ratio', 0):.2f}")
        else:
            lines.append(f"{head}; no baseline yet")
    return lines


def _load_model(args: argparse.Namespace):
    from edge.inference.model import Model

    return Model.load(args.model, manifest=args.manifest, labels=args.labels, num_threads=args.threads)


def _cmd_infer(args: argparse.Namespace) -> int:
    import cv2

    from edge.core.logs import setup_logging

    setup_logging("human", "warning")
    model = _load_model(args)
    status = 0
    for path in args.images:
        image = cv2.imread(str(path)) if path.is_file() else None
        if image is None:
            print(f"edge: error: cannot read image {path}", file=sys.stderr)
            status = 1
            continue
        prediction, times = model.predict(image)
        if args.json:
            doc = {"image": str(path), "model": model.name, **prediction.to_dict(),
                   "invoke_ms": round(times.invoke_ms, 2)}
            print(json.dumps(doc))
        else:
            print(_describe(path, prediction))
    return status


def _cmd_baseline(args: argparse.Namespace) -> int:
    from edge.config import HealthConfig
    from edge.core.logs import setup_logging
    from edge.inference.manifest import manifest_path_for
    from edge.observe.baseline import baseline_yaml, read_frames, record_baseline, write_into_manifest
    from edge.updates.health import band_outcome

    setup_logging("human", "warning")
    if args.every < 1 or (args.max_frames is not None and args.max_frames < 1):
        raise UsageError("--every and --max-frames must be at least 1")
    if args.policy is not None:
        from edge.decide.policy import load_policy

        outcome = load_policy(args.policy).outcome
    else:
        outcome = band_outcome(*HealthConfig().unsure_band)
    model = _load_model(args)
    manifest = args.manifest or manifest_path_for(args.model)
    if args.write and not manifest.is_file():
        raise UsageError(f"--write: no manifest at {manifest} to write into (give --manifest)")
    frames = read_frames(args.source, every=args.every, limit=args.max_frames)
    try:
        baseline = record_baseline(model, frames, outcome, source=args.source.name)
    except ValueError as exc:
        raise SourceError(str(exc)) from None
    if args.write:
        write_into_manifest(manifest, baseline)
        print(f"{manifest}: baseline of {baseline.frames} frames, {baseline.detections} results, "
              f"{len(baseline.classes)} class(es)")
    else:
        print(baseline_yaml(baseline), end="")
    return 0


def _describe(path: Path, prediction) -> str:
    lines = [f"{path}:"]
    for c in prediction.classes:
        lines.append(f"  {c.score:6.3f}  {c.label}")
    for d in prediction.detections:
        box = ", ".join(f"{v:.0f}" for v in d.box)
        lines.append(f"  {d.score:6.3f}  {d.label:<16} [{box}]")
    for k in prediction.keypoints:
        lines.append(f"  {k.score:6.3f}  {k.name:<16} ({k.x:.0f}, {k.y:.0f})")
    for s in prediction.segments:
        lines.append(f"  {s.share:6.1%}  {s.label}")
    if len(lines) == 1:
        lines.append("  nothing above the score threshold")
    return "\n".join(lines)


def _cmd_config_check(args: argparse.Namespace) -> int:
    cfg = _checked_config(args.file)
    print(f"{args.file}: ok ({len(cfg.cameras)} camera(s), {len(cfg.models)} model(s))")
    return 0


def _cmd_policy_check(args: argparse.Namespace) -> int:
    from edge.config import load_config
    from edge.decide.policy import check_classes, load_policy

    policy = load_policy(args.file)
    cascades = any(r.when.crop is not None for r in policy.rules) or policy.verifiers
    if args.config is not None:
        _check_on_device(policy, load_config(args.config), str(args.file))
    for path in args.model or []:
        manifest = _manifest_of(path)
        if manifest.task == "segment":
            check_classes(policy, manifest.labels, model=f"{manifest.name} ({path})", source=str(args.file))
    note = "" if args.config is not None or not cascades else \
        "; its crop rules and verifiers name trigger tasks: give --config to check them against a device"
    print(f"{args.file}: ok (version {policy.version}, {len(policy.rules)} rule(s), {len(policy.zones)} zone(s), "
          f"{len(policy.lines)} line(s)){note}")
    return 0


def _policy_in_force(config: Path) -> dict:
    """The policy in force and where it came from: the running daemon's (its stats file),
    else what a start would use (the fleet's stored assignment, else the local file)."""
    import time

    from edge.config import load_config
    from edge.decide.policy import PolicyError, load_policy
    from edge.updates.modelstore import ModelStore

    cfg = load_config(config)
    local = None
    if cfg.decisions.policy is not None:
        try:
            local = {"file": str(cfg.decisions.policy), "version": load_policy(cfg.decisions.policy).version}
        except PolicyError as exc:
            local = {"file": str(cfg.decisions.policy), "error": str(exc)}
    assigned = None
    if cfg.agent is not None:
        entry = ModelStore(cfg.agent.state_dir, keep=cfg.agent.keep).load().policy.active
        if entry is not None:
            assigned = {"name": entry.name, "version": entry.version, "job": entry.job,
                        "activated_at": entry.activated_at}
    stats_file, snap = cfg.runtime.stats_file, None
    if stats_file is not None:
        try:
            snap = json.loads(stats_file.read_text())
        except (OSError, ValueError):
            snap = None
    if snap is not None and "policy_source" in snap.get("decisions", {}):
        active = snap["decisions"]["policy_source"]
        as_of = f"the daemon's stats file {stats_file} ({time.time() - snap['at']:.0f} s old)"
    else:
        as_of = "the config and the model store (no stats file from a running daemon)"
        if assigned is not None:
            active = {"origin": "fleet", "version": assigned["version"],
                      "source": f"{assigned['name']}@{assigned['version']}", "applied_at": assigned["activated_at"]}
        elif local is not None and "version" in local:
            active = {"origin": "local", "version": local["version"], "source": local["file"], "applied_at": None}
        else:
            active = None
    return {"active": active, "as_of": as_of, "local": local, "assigned": assigned}


def _cmd_policy_show(args: argparse.Namespace) -> int:
    doc = _policy_in_force(args.config)
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0
    active = doc["active"]
    if active is None:
        print("no policy in force: decisions.policy is not set and the fleet has assigned none")
    else:
        where = (f"fleet assignment {active['source']}" if active["origin"] == "fleet"
                 else f"local file {active['source']}")
        withdrawn = " (withdrawn by the fleet; no local policy took over)" if active.get("withdrawn") else ""
        print(f"policy {active['version']} from the {where}{withdrawn}")
    print(f"  as of: {doc['as_of']}")
    local = doc.get("local")
    if local:
        print(f"  local file: {local['file']}, " + (f"version {local['version']}" if "version" in local
                                                     else f"invalid: {local['error']}"))
    if doc.get("assigned"):
        a = doc["assigned"]
        print(f"  fleet assignment: {a['name']}@{a['version']} (job {a['job']})")
    print("  rule: the fleet's assignment wins while one is in force; SIGHUP applies the local file otherwise")
    return 0


def _manifest_of(path: Path):
    """The manifest of a model file (beside it, else guessed from its tensors), or the manifest file itself."""
    from edge.inference.manifest import load_manifest, manifest_path_for
    from edge.inference.model import Model

    if path.suffix in (".yaml", ".yml"):
        return load_manifest(path)
    beside = manifest_path_for(path)
    return load_manifest(beside, model_dir=path.parent) if beside.is_file() else Model.load(path, num_threads=1).manifest


def _model_store(config: Path):
    from edge.config import load_config
    from edge.updates.modelstore import ModelStore

    cfg = load_config(config)
    if cfg.agent is None:
        raise ConfigError(f"{config}: agent is not set, so this device keeps no model store")
    return ModelStore(cfg.agent.state_dir, keep=cfg.agent.keep)


def _cmd_models_list(args: argparse.Namespace) -> int:
    from edge.updates.modelstore import describe

    rows = describe(_model_store(args.config).load())
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print("no model updates yet: every slot runs the model its config names")
        return 0
    print(f"{'slot':<12}{'role':<10}{'name':<28}{'version':<16}{'committed':<11}sha256")
    for r in rows:
        print(f"{r['slot']:<12}{r['role']:<10}{r['name']:<28}{r['version']:<16}{str(r['committed']).lower():<11}"
              f"{r['sha256'][:16]}")
    return 0


def _cmd_models_rollback(args: argparse.Namespace) -> int:
    from edge.updates.modelstore import rollback_slot

    entry = rollback_slot(_model_store(args.config), args.slot)
    print(f"{args.slot}: {entry.name} {entry.version} is active: a running edge run swaps it in within a "
          "second, else it starts on it")
    return 0


def _cmd_config_schema(args: argparse.Namespace) -> int:
    from edge.config import config_schema

    print(json.dumps(config_schema(), indent=2))
    return 0


def _cmd_bench_scheduler(args: argparse.Namespace) -> int:
    from edge.bench.scheduler import run_scheduler_bench

    if not args.source.is_file():
        raise SourceError(f"cannot open video {str(args.source)!r}: no such file")
    report = run_scheduler_bench(args.model, args.source, manifest=args.manifest, threads=args.threads,
                                 cameras=args.cameras, fps=args.fps, seconds=args.seconds)
    print(json.dumps(report, indent=2))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from edge.bench.pipeline import run_bench

    if args.model is None or args.source is None:
        raise UsageError("edge bench [pipeline] needs --model and --source; the other scenarios are "
                         "scheduler, outbox, alerts, decode and observe (edge bench --help)")
    if not args.source.is_file():
        raise SourceError(f"cannot open video {str(args.source)!r}: no such file")
    if args.rounds < 1 or args.round_seconds <= 0:
        raise UsageError("--rounds must be at least 1 and --round-seconds above 0")
    report = run_bench(args.model, args.source, manifest=args.manifest, labels=args.labels, threads=args.threads,
                       rounds=args.rounds, round_s=args.round_seconds, naive=args.naive)
    print(json.dumps(report, indent=2))
    return 0


def _cmd_bench_outbox(args: argparse.Namespace) -> int:
    from edge.bench.outbox import run_outbox_bench

    report = run_outbox_bench(args.events, live_events=args.live_events, batch_events=args.batch_events,
                              window=args.window, workdir=args.workdir)
    print(json.dumps(report, indent=2))
    return 0


def _cmd_bench_decode(args: argparse.Namespace) -> int:
    from edge.bench.decode import run_decode_bench

    if not 0 < args.events <= 2000 or args.rounds < 1:
        raise UsageError("--events must be 1..2000 (a batch's limit) and --rounds at least 1")
    print(json.dumps(run_decode_bench(events=args.events, rounds=args.rounds), indent=2))
    return 0


def _cmd_bench_alerts(args: argparse.Namespace) -> int:
    from edge.bench.alerts import run_alerts_bench

    report = run_alerts_bench(args.model, args.source, manifest=args.manifest, seconds=args.seconds,
                              threads=args.threads, line_protocols=args.line_protocols)
    print(json.dumps(report, indent=2))
    return 0


def _cmd_bench_memory(args: argparse.Namespace) -> int:
    from edge.bench.memory import run_memory_bench

    try:
        extra = tuple(int(n) for n in args.extra_cameras.split(","))
    except ValueError:
        raise UsageError(f"--extra-cameras {args.extra_cameras!r}: counts separated by commas, e.g. 0,1,2") from None
    report = run_memory_bench(args.model, args.source, manifest=args.manifest, extra_source=args.extra_source,
                              extra=extra, warmup_s=args.warmup, threads=args.threads, workdir=args.workdir)
    print(json.dumps(report, indent=2))
    return 0


def _cmd_bench_observe(args: argparse.Namespace) -> int:
    from edge.bench.observe import run_observe_bench

    if not args.source.is_file():
        raise SourceError(f"cannot open video {str(args.source)!r}: no such file")
    report = run_observe_bench(args.model, args.source, manifest=args.manifest, threads=args.threads,
                               seconds=args.seconds)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
