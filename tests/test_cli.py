"""The `edge` command end to end: real processes, real models, real video."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, manifest_for, shared_path

from edge.cli import main

YOLO_B = "models/yolov8n_full_integer_quant-b.tflite"


def write_config(tmp_path: Path, source: dict, model: str = YOLO_B, manifest: Path | None = None,
                 model_path: Path | None = None, **more) -> Path:
    cfg = {
        "device": {"id": "test-cam"},
        "runtime": {"num_threads": 2},
        "logging": {"format": "json", "stats_interval_s": 1},
        "models": {"det": {"path": str(model_path or shared_path(model)),
                           "manifest": str(manifest or manifest_for(model))}},
        "cameras": [{"id": "c0", "source": source, "model": "det"}],
        **more,
    }
    path = tmp_path / "cam.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def edge(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edge", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def json_logs(stderr: str) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def excerpt(video: Path, out: Path, frames: int) -> int:
    """The first ``frames`` frames of ``video`` as a clip of its own (MJPG); how many it holds."""
    import cv2

    src = cv2.VideoCapture(str(video))
    writer = None
    written = 0
    try:
        while written < frames:
            ok, frame = src.read()
            if not ok:
                break
            if writer is None:
                writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"MJPG"), src.get(cv2.CAP_PROP_FPS),
                                         (frame.shape[1], frame.shape[0]))
            writer.write(frame)
            written += 1
    finally:
        src.release()
        if writer is not None:
            writer.release()
    return written


@pytest.mark.slow
def test_edge_run_finds_persons_in_the_pedestrian_clip_and_stops_at_its_end(tmp_path):
    # the clip's first 250 frames (of about 795): the whole run, end included, at a third of the time
    video = tmp_path / "excerpt.avi"
    assert excerpt(shared_path("media/pedestrians-360p10.avi"), video, 250) == 250
    config = write_config(tmp_path, {"kind": "video", "path": str(video), "pace": "fast"})
    results = tmp_path / "results.jsonl"
    proc = edge("run", "--config", str(config), "--results", str(results))
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr

    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["seq"] for r in rows] == list(range(len(rows)))
    assert len(rows) == 250  # fast pace drops none
    with_person = [r for r in rows if any(d["label"] == "person" for d in r.get("detections", []))]
    assert len(with_person) / len(rows) > 0.8
    assert all(r["model"] == "yolov8n@8.1.42-b" and "image" not in r for r in rows)

    assert all(r["task"] == "det" for r in rows)

    logs = json_logs(stderr)
    final = [e for e in logs if e["msg"] == "stats"][-1]
    assert final["processed"] == final["captured"] == len(rows)
    assert final["superseded"] == 0 and final["dropped"] == {"too_old": 0}
    assert final["tasks"]["det"]["runs"] == len(rows)
    assert {"p50", "p95"} <= set(final["tasks"]["det"]["latency_ms"])
    assert any(e["msg"] == "stopped" and e["reason"] == "sources ended" for e in logs)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_edge_run_stops_cleanly_on_a_signal(tmp_path, sig):
    video = shared_path("media/pedestrians-360p10.avi")
    config = write_config(tmp_path, {"kind": "video", "path": str(video), "pace": "native", "loop": True})
    results = tmp_path / "results.jsonl"
    proc = edge("run", "--config", str(config), "--results", str(results))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not results.exists() or len(results.read_text().splitlines()) < 5):
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.1)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    stopped = [e for e in json_logs(stderr) if e["msg"] == "stopped"]
    assert stopped and stopped[0]["reason"] == "signal"
    assert stopped[0]["stop_s"] <= 2.0
    assert "Traceback" not in stderr


def run_main(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def assert_one_line_error(err: str, expected: str) -> None:
    ours = [line for line in err.splitlines() if line.startswith("edge: ")]
    assert len(ours) == 1, err
    assert ours[0].startswith("edge: error: ") and expected in ours[0], err
    assert "Traceback" not in err


def video_source() -> dict:
    return {"kind": "video", "path": str(shared_path("media/pedestrians-360p10.avi"))}


def test_every_problem_config_check_reports_stops_edge_run_with_exit_2(tmp_path, capsys):
    """systemd restarts a daemon that exits 1 but not one that exits 2: a config that needs
    fixing must not become a restart loop."""
    broken_policy = tmp_path / "policy.yaml"
    broken_policy.write_text("version: '1'\nrules: [{name: x, when: {event: sideways}}]\n")
    cases = {  # what the error names: the config that causes it
        "models.det.path: file not found": dict(source=video_source(), model_path=tmp_path / "gone.tflite"),
        "cameras[0].source.path: not found": dict(source={"kind": "video", "path": str(tmp_path / "gone.avi")}),
        "runtime.stats_file: directory not found": dict(source=video_source(),
                                                        runtime={"stats_file": str(tmp_path / "no" / "stats.json")}),
        "rules[0].when.event: input should be": dict(source=video_source(), decisions={"policy": str(broken_policy)}),
    }
    for expected, kwargs in cases.items():
        config = write_config(tmp_path, **kwargs)
        check, check_err = run_main(capsys, "config", "check", str(config))
        run, run_err = run_main(capsys, "run", "--config", str(config))
        assert (check, run) == (2, 2), (expected, check_err, run_err)
        assert_one_line_error(check_err, expected)
        assert_one_line_error(run_err, expected)


def test_results_into_a_missing_directory_is_a_clear_error(tmp_path, capsys):
    config = write_config(tmp_path, video_source())
    code, err = run_main(capsys, "run", "--config", str(config), "--results", str(tmp_path / "no" / "r.jsonl"))
    assert code == 2
    assert_one_line_error(err, f"--results {tmp_path / 'no' / 'r.jsonl'}: cannot open: No such file or directory")


@pytest.mark.runtime
def test_model_with_an_unresolved_custom_op(tmp_path, capsys):
    config = write_config(tmp_path, video_source(), model="models/broken/model_invoking_error.tflite",
                          manifest=manifest_for("mobilenet_v2_1.0_224_quant.tflite"))
    code, err = run_main(capsys, "run", "--config", str(config))
    assert code == 1
    assert_one_line_error(err, "unresolved custom op 'fake-op-double'")


@pytest.mark.runtime
def test_manifest_that_does_not_match_the_tensors(tmp_path, capsys):
    config = write_config(tmp_path, video_source(), manifest=manifest_for("mobilenet_v2_1.0_224_quant.tflite"))
    code, err = run_main(capsys, "run", "--config", str(config))
    assert code == 1
    assert_one_line_error(err, "does not match yolov8n_full_integer_quant-b.tflite")


def test_video_that_cannot_be_opened(tmp_path, capsys):
    bad = tmp_path / "clip.avi"
    bad.write_bytes(b"RIFF" + os.urandom(2048))
    config = write_config(tmp_path, {"kind": "video", "path": str(bad)})
    code, err = run_main(capsys, "run", "--config", str(config))
    assert code == 1
    assert_one_line_error(err, "cannot open video")


def test_corrupt_config(tmp_path, capsys):
    config = tmp_path / "cam.yaml"
    config.write_text("device: {id: x}\ncameras: [\n")
    code, err = run_main(capsys, "run", "--config", str(config))
    assert code == 2
    assert_one_line_error(err, "not valid YAML")


def test_debug_shows_the_traceback(tmp_path):
    garbage = tmp_path / "garbage.tflite"
    garbage.write_bytes(os.urandom(4096))
    config = write_config(tmp_path, video_source(), model_path=garbage)
    proc = edge("--debug", "run", "--config", str(config))
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "Traceback" in stderr and "not a valid TFLite model" in stderr


@pytest.mark.runtime
def test_edge_infer_prints_the_top_class(capsys):
    model = "models/mobilenet_v2_1.0_224_quant.tflite"
    code = main(["infer", "--model", str(shared_path(model)), "--manifest", str(manifest_for(model)),
                 "--labels", str(shared_path("models/imagenet_labels.txt")),
                 str(shared_path("media/images/grace_hopper.bmp"))])
    out = capsys.readouterr().out
    assert code == 0
    assert out.splitlines()[1].split(maxsplit=1)[1] == "military uniform"


@pytest.mark.runtime
def test_edge_infer_json_for_several_images(capsys):
    images = [shared_path("media/images/pets.jpg"), shared_path("media/images/kite_and_cold.jpg")]
    code = main(["infer", "--json", "--model", str(shared_path(YOLO_B)), "--manifest", str(manifest_for(YOLO_B)),
                 "--labels", str(shared_path("models/coco80_labels.txt")), *map(str, images)])
    docs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0 and len(docs) == 2
    assert [d["label"] for d in docs[0]["detections"]].count("dog") == 2
    assert {"kite", "person"} <= {d["label"] for d in docs[1]["detections"]}


@pytest.mark.runtime
def test_edge_infer_on_an_unreadable_image_fails_but_reports_the_rest(tmp_path, capsys):
    model = "models/mobilenet_v2_1.0_224_quant.tflite"
    code = main(["infer", "--model", str(shared_path(model)), "--manifest", str(manifest_for(model)),
                 str(tmp_path / "missing.jpg"), str(shared_path("media/images/grace_hopper.bmp"))])
    captured = capsys.readouterr()
    assert code == 1
    assert "cannot read image" in captured.err and "military uniform" in captured.out


# --- help texts, log lines, packaging ------------------------------------------------------------------


def parsers(prog: str):
    """Every (command words, parser) of the edge or fleet command, as run_command sees it."""
    import argparse

    import edge.cli
    import fleet.cli
    from edge.core.errors import prepare_parser

    root = (edge.cli if prog == "edge" else fleet.cli)._parser()
    prepare_parser(root)
    todo = [([], root)]
    while todo:
        words, parser = todo.pop()
        yield words, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo += [([*words, name], child) for name, child in action.choices.items()]


@pytest.mark.parametrize("prog", ["edge", "fleet"])
def test_help_is_plain_text_and_every_option_says_what_it_does_and_its_default(prog, capsys):
    import argparse

    import fleet.cli

    run = main if prog == "edge" else fleet.cli.main
    seen = 0
    for words, parser in parsers(prog):
        with pytest.raises(SystemExit):
            run([*words, "--help"])
        text = capsys.readouterr().out
        assert "``" not in text and "None" not in text, (words, text)
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            assert action.help, f"{prog} {' '.join(words)} {action.option_strings or action.dest}: no help"
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                shown = parser._get_formatter()._get_help_string(action)
                assert "default" in shown, f"{prog} {' '.join(words)} {action.option_strings}: no default in help"
        seen += 1
    assert seen > 10


@pytest.mark.parametrize("prog", ["edge", "fleet"])
def test_a_bare_command_group_prints_its_own_help(prog, capsys):
    import argparse

    import fleet.cli

    run = main if prog == "edge" else fleet.cli.main
    groups = [words for words, parser in parsers(prog)
              if words and any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)]
    assert len(groups) >= (3 if prog == "edge" else 6)
    for words in groups:
        code = run(words)
        err = capsys.readouterr().err
        if prog == "edge" and words == ["bench"]:  # alone, the pipeline benchmark: it asks for its arguments
            assert code == 2 and "needs --model and --source" in err
            continue
        assert code == 2 and err.startswith(f"usage: {prog} {' '.join(words)} "), (words, err)


def test_log_lines_show_values_not_none_or_python_reprs():
    import enum
    import io
    import logging
    from dataclasses import dataclass

    from edge.core.logs import fields, setup_logging

    class Colour(enum.Enum):
        RED = "red"

    @dataclass
    class Box:
        x: int

    stream = io.StringIO()
    for fmt in ("human", "json"):
        setup_logging(fmt, "info", stream=stream)
        logging.getLogger("edge.test").info("alert", extra=fields(
            track=None, colour=Colour.RED, box=(1, 2), where=Path("/tmp/x"), item=Box(3), sent=False,
            error=OSError(2, "No such file or directory"), nested={"a": Colour.RED}))
    human, js = stream.getvalue().splitlines()
    assert "None" not in human and "track" not in human
    assert "colour=red box=[1,2] where=/tmp/x item={\"x\":3} sent=false" in human
    assert "error=[Errno 2] No such file or directory" in human and 'nested={"a":"red"}' in human
    doc = json.loads(js)
    assert (doc["colour"], doc["box"], doc["item"], doc["nested"], doc["track"]) == ("red", [1, 2], {"x": 3},
                                                                                    {"a": "red"}, None)
    assert "Colour." not in js and "Box(" not in js


def test_installing_the_package_prints_no_setuptools_warning(tmp_path):
    """The licence in PEP 639 form and a layout setuptools installs editable without an
    import hook: `pip install -e .` (what scripts/setup.sh runs) builds without a warning."""
    import re

    # into a prefix of its own; --ignore-installed keeps pip from uninstalling this venv's copy
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--ignore-installed", "-v",
                          "--prefix", str(tmp_path / "prefix"), "-e", str(REPO)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    warnings = [line for line in (out.stdout + out.stderr).splitlines() if re.search(r"[a-z]Warning\b", line)]
    assert not warnings, warnings


# --- fleet commands through the broker -----------------------------------------------------------------


def test_fleet_devices_list_asks_the_manager_through_the_broker_and_db_reads_offline(tmp_path, broker, capsys):
    import paho.mqtt.client as mqtt
    from broker import FleetProcess, wait_until
    from paho.mqtt.enums import CallbackAPIVersion

    import fleet.cli
    from edge.core.contract import Status, Topics, encode

    db = tmp_path / "fleet.db"
    manager = FleetProcess(db, broker)
    device = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="cam-7", protocol=mqtt.MQTTv5)
    try:
        manager.wait_for("control subscribed")
        device.connect(broker.host, broker.port)
        device.loop_start()
        status = Status(v=1, device="cam-7", state="online", at=time.time(), runtime="0.1.0", site="plant-a",
                        line="3", models={"detector": "yolov8n@8.1.42-b"})
        device.publish(Topics().status("cam-7"), encode(status), qos=1, retain=True).wait_for_publish(5)
        where = ["--broker", f"{broker.host}:{broker.port}"]

        def listed() -> list[dict]:
            assert fleet.cli.main(["devices", "list", "--json", *where]) == 0
            return json.loads(capsys.readouterr().out)

        (row,) = wait_until(listed, 10, "the manager to list the device")
        assert (row["id"], row["state"], row["site"], row["line"], row["models"]) == (
            "cam-7", "online", "plant-a", "3", {"detector": "yolov8n@8.1.42-b"})
        assert fleet.cli.main(["devices", "list", *where]) == 0
        table = capsys.readouterr().out.splitlines()
        assert table[0].split()[:4] == ["DEVICE", "STATE", "SITE", "LINE"]
        assert table[1].split()[:4] == ["cam-7", "online", "plant-a", "3"]
        assert "detector=yolov8n@8.1.42-b" in table[1]
        assert fleet.cli.main(["devices", "list", "--json", "--db", str(db)]) == 0  # offline: the store itself
        assert json.loads(capsys.readouterr().out) == [row]
    finally:
        device.disconnect()
        device.loop_stop()
        manager.stop()
    assert fleet.cli.main(["devices", "list", *where, "--timeout", "1"]) == 1
    assert "no answer to devices.list" in capsys.readouterr().err


def test_fleet_simulate_says_when_it_cannot_reach_the_broker(tmp_path, capsys):
    from broker import free_port

    import fleet.cli

    assert fleet.cli.main(["keys", "init", "--dir", str(tmp_path)]) == 0
    port = free_port()
    code = fleet.cli.main(["simulate", "--devices", "2", "--public-key", str(tmp_path / "fleet.pub"),
                           "--broker", f"127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert code == 1
    assert err == f"fleet: error: cannot reach the broker at 127.0.0.1:{port}: Connection refused\n"


def test_the_demo_config_makes_edge_stats_work(tmp_path):
    from conftest import edge_run

    from edge.config import load_config

    demo = REPO / "configs" / "demo.yaml"
    cfg = load_config(demo)
    for path in (cfg.models["detector"].path, cfg.cameras[0].source.path):
        if not path.exists():
            pytest.skip(f"needs {path} (scripts/fetch_models.py --mirror ../shared puts it there)")
    assert cfg.runtime.stats_file is not None and cfg.runtime.stats_file.parent.is_dir()
    # the same config with its stats file in this test's directory, reported every second
    doc = yaml.safe_load(demo.read_text())
    doc["runtime"]["stats_file"] = str(tmp_path / "stats.json")
    doc["logging"] = {"format": "json", "stats_interval_s": 1}
    doc["models"]["detector"]["path"] = str(cfg.models["detector"].path)
    doc["cameras"][0]["source"]["path"] = str(cfg.cameras[0].source.path)
    doc["decisions"]["policy"] = str(cfg.decisions.policy)
    config = tmp_path / "demo.yaml"
    config.write_text(yaml.safe_dump(doc))
    run = edge_run(config)
    try:
        run.wait_for("stats")
        out = subprocess.run([sys.executable, "-m", "edge", "stats", "--config", str(config)],
                             capture_output=True, text=True, timeout=30)
    finally:
        assert run.stop() == 0
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"{tmp_path / 'stats.json'} (") and lines[0].endswith("alive")
    assert lines[1] == "models: detector yolov8n@8.1.42-b"
    assert lines[2].startswith("memory: ") and lines[4].startswith("entrance: live, budget 100 ms, captured ")
    assert "{" not in out.stdout and "None" not in out.stdout
