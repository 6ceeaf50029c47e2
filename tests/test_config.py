"""Config validation: every error names its key; the CLI exits 2 on bad config."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from conftest import REPO

from edge.cli import main
from edge.config import load_config, parse_config
from edge.core.errors import ConfigError
from edge.decide.policy import load_policy

BASE = {
    "device": {"id": "cam-1"},
    "models": {"det": {"path": "det.tflite"}},
    "cameras": [{"id": "c0", "source": {"kind": "video", "path": "clip.avi"}, "model": "det"}],
}


def with_change(change) -> dict:
    data = copy.deepcopy(BASE)
    change(data)
    return data


def error_of(data) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data, base_dir=Path("/cfg"))
    return str(info.value)


def test_minimal_config_gets_defaults_and_resolves_paths_against_the_file():
    cfg = parse_config(BASE, base_dir=Path("/etc/edgecam"))
    assert cfg.models["det"].path == Path("/etc/edgecam/det.tflite")
    assert cfg.cameras[0].source.path == Path("/etc/edgecam/clip.avi")
    assert cfg.cameras[0].source.pace == "native"
    assert cfg.runtime.num_threads >= 1
    assert cfg.logging.format == "json"


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda d: d["cameras"].append({"id": "c1", "source": {"kind": "video", "path": "v", "fps": 0},
                                        "model": "det"}),
         "cameras[1].source.fps: must be > 0"),
        (lambda d: d["cameras"][0].update(colour="red"), "cameras[0].colour: unknown key"),
        (lambda d: d["cameras"][0]["source"].update(kind="webcam"), "cameras[0].source: unknown kind 'webcam'"),
        (lambda d: d["cameras"][0]["source"].pop("kind"), "cameras[0].source: needs a `kind`"),
        (lambda d: d["cameras"][0].update(model="classifier"),
         "cameras[0].model: unknown model 'classifier' (known: det)"),
        (lambda d: d["cameras"][0]["source"].update(loop="sometimes"), "cameras[0].source.loop: input should be"),
        (lambda d: d.pop("device"), "device: required key is missing"),
        (lambda d: d["runtime"].update(num_threads=0) if "runtime" in d else d.update(runtime={"num_threads": 0}),
         "runtime.num_threads: must be > 0"),
        (lambda d: d["cameras"].append(copy.deepcopy(d["cameras"][0])), "cameras[1].id: duplicate camera id"),
        (lambda d: d["cameras"][0].update(reopen={"initial_s": 5, "max_s": 1}),
         "cameras[0].reopen: max_s must be >= initial_s"),
        (lambda d: d["cameras"][0].update(id="bad/id"), "cameras[0].id: must match"),
        (lambda d: d.update(cameras=[]), "cameras: must have at least 1 item"),
    ],
)
def test_errors_name_the_offending_key(change, expected):
    assert expected in error_of(with_change(change))


def test_every_source_kind_validates():
    for source in (
        {"kind": "video", "path": "a.avi", "pace": "fast", "loop": True},
        {"kind": "images", "path": "frames/", "fps": 2},
        {"kind": "usb", "device": "/dev/video0", "width": 640, "height": 480, "fps": 30, "fourcc": "MJPG"},
        {"kind": "url", "url": "rtsp://10.0.0.1/stream"},
        {"kind": "gstreamer", "pipeline": "videotestsrc ! videoconvert ! appsink"},
        {"kind": "picamera2", "width": 1280, "height": 720},
        {"kind": "pattern", "still": True},
    ):
        cfg = parse_config(with_change(lambda d: d["cameras"][0].update(source=source)))
        assert cfg.cameras[0].source.kind == source["kind"]


def test_load_config_reports_yaml_syntax_with_line_and_column(tmp_path):
    path = tmp_path / "cam.yaml"
    path.write_text("device:\n  id: [unclosed\n")
    with pytest.raises(ConfigError, match=r"cam.yaml:\d+:\d+: not valid YAML"):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")


def test_config_check_exits_2_and_names_the_key(tmp_path, capsys):
    path = tmp_path / "cam.yaml"
    path.write_text(json.dumps(with_change(lambda d: d["cameras"][0]["source"].update(fps=-1))))
    assert main(["config", "check", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line, no traceback
    assert "cameras[0].source.fps: must be > 0" in err


def test_config_check_catches_missing_files(tmp_path, capsys):
    path = tmp_path / "cam.yaml"
    path.write_text(json.dumps(BASE))
    assert main(["config", "check", str(path)]) == 2
    assert "models.det.path: file not found" in capsys.readouterr().err


def test_the_shipped_example_configs_are_valid():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(path)
    policies = sorted((REPO / "configs" / "policies").glob("*.yaml"))
    assert policies
    for path in policies:
        assert load_policy(path).rules


def test_schema_is_json_schema_of_the_config(capsys):
    assert main(["config", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["type"] == "object"
    assert {"device", "models", "cameras"} <= set(schema["properties"])
    assert set(schema["required"]) == {"device", "models", "cameras"}
