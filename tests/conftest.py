"""Shared test fixtures: the real models and media in ../shared, read in place."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("EDGECAM_SHARED", REPO.parent / "shared"))
MANIFESTS = REPO / "models"


def shared_path(relative: str) -> Path:
    """A file under ../shared, or skip the test naming what is missing."""
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"needs {path} (the shared models and media are not beside the checkout)")
    return path


def edge_run(config: Path, *args: str) -> subprocess.Popen:
    """``edge run --config`` as its own process; stderr (its log) is piped."""
    return subprocess.Popen([sys.executable, "-m", "edge", "run", "--config", str(config), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)


def manifest_for(model_file: str) -> Path:
    """The repo's manifest for a model in ../shared/models."""
    return MANIFESTS / Path(model_file).with_suffix(".yaml").name


@pytest.fixture
def shared():
    return shared_path


@pytest.fixture
def broker(tmp_path):
    """A real Mosquitto on a free 127.0.0.1 port (tests/broker.py); skips without the binary."""
    from broker import Broker

    b = Broker(tmp_path / "mosquitto").start()
    yield b
    b.stop()
