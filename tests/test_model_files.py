"""Bad model files on every path that loads one: a clear one-line refusal, never a crash.

Run against each supported runtime (scripts/test runs this module under ai-edge-litert
1.4.0 as well): 1.4.0 dies with a segmentation fault in its interpreter's constructor
on a truncated file, so a test here that reached the interpreter unguarded would take
the whole test process down with it.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, manifest_for, shared_path

from edge.core.errors import ModelError
from edge.inference.manifest import load_manifest
from edge.inference.model import Model
from edge.inference.runtime import load_interpreter
from edge.updates.smoke import RuntimeOptions, SmokeError, smoke_test

MOBILENET = "models/mobilenet_v2_1.0_224_quant.tflite"
KINDS = ("truncated", "zero-length", "garbage", "wrong-identifier")

pytestmark = pytest.mark.runtime  # run on every supported LiteRT (scripts/test)


def bad_model(tmp_path: Path, kind: str) -> Path:
    """A model file broken the way ``kind`` says, made from a real one."""
    good = shared_path(MOBILENET).read_bytes()
    data = {
        "truncated": good[:100_000],  # header intact, tensors and buffers cut off
        "zero-length": b"",
        "garbage": random.Random(7).randbytes(4096),
        "wrong-identifier": good[:4] + b"XXXX" + good[8:],
    }[kind]
    path = tmp_path / f"{kind}.tflite"
    path.write_bytes(data)
    return path


def one_error_line(stderr: str, prefix: str = "edge: ") -> str:
    """The process's only line of its own on stderr (the runtime's INFO lines aside)."""
    assert "Traceback" not in stderr and "Segmentation" not in stderr, stderr
    ours = [line for line in stderr.splitlines() if line.startswith(prefix)]
    assert len(ours) == 1, stderr
    return ours[0]


def edge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=120)


@pytest.mark.parametrize("kind", KINDS)
def test_a_bad_model_file_is_refused_in_this_process_without_a_crash(tmp_path, kind):
    path = bad_model(tmp_path, kind)
    with pytest.raises(ModelError, match="not a valid TFLite model") as err:
        Model.load(path, manifest=manifest_for(MOBILENET), num_threads=1)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("kind", KINDS)
def test_edge_infer_refuses_it_in_one_line(tmp_path, kind):
    done = edge("infer", "--model", str(bad_model(tmp_path, kind)), "--manifest", str(manifest_for(MOBILENET)),
                str(shared_path("media/images/pets.jpg")))
    assert done.returncode == 1, done.stderr
    line = one_error_line(done.stderr)
    assert line.startswith("edge: error: ") and "not a valid TFLite model" in line, line


@pytest.mark.parametrize("kind", KINDS)
def test_edge_run_refuses_it_in_one_line(tmp_path, kind):
    cfg = {
        "device": {"id": "cam"},
        "logging": {"format": "json"},
        "models": {"m": {"path": str(bad_model(tmp_path, kind)), "manifest": str(manifest_for(MOBILENET))}},
        "cameras": [{"id": "c0", "source": {"kind": "pattern", "width": 64, "height": 64, "fps": 5}, "model": "m"}],
    }
    config = tmp_path / "cam.yaml"
    config.write_text(yaml.safe_dump(cfg))
    done = edge("run", "--config", str(config))
    assert done.returncode == 1, done.stderr
    line = one_error_line(done.stderr)
    assert line.startswith("edge: error: ") and "not a valid TFLite model" in line, line


def test_the_agents_smoke_test_refuses_each_as_a_load_error(tmp_path):
    spec = load_manifest(manifest_for(MOBILENET), model_dir=shared_path(MOBILENET).parent)
    frame = np.zeros((224, 224, 3), np.uint8)
    for kind in KINDS:
        with pytest.raises(SmokeError) as err:
            smoke_test(bad_model(tmp_path, kind), spec, frame, budget_ms=5000, factor=1, invokes=1,
                       rt=RuntimeOptions(num_threads=1))
        assert err.value.reason == "load_error" and "not a valid TFLite model" in str(err.value), (kind, err.value)


def test_a_file_that_passed_once_is_checked_again_when_it_is_rewritten(tmp_path):
    path = tmp_path / "m.tflite"
    shutil.copyfile(shared_path(MOBILENET), path)
    load_interpreter(path, num_threads=1)  # passes its trial load
    path.write_bytes(shared_path(MOBILENET).read_bytes()[:100_000])  # then replaced in place, truncated
    with pytest.raises(ModelError, match="not a valid TFLite model"):
        load_interpreter(path, num_threads=1)
