"""scripts/demo, the README's main command, as a user runs it: the whole system, then Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from broker import wait_until
from conftest import REPO
from controller import Controller

from edge.core.contract import decode_alert

NEEDS = ("models/yolov8n_full_integer_quant-a.tflite", "models/yolov8n_full_integer_quant-b.tflite",
         "media/pedestrians-360p10.avi", "media/pedestrians-720p50.avi")


def session_members(sid: int) -> list[str]:
    """The processes (pid and name) of session ``sid``: everything the demo started stays in it."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            name, rest = (entry / "stat").read_text().rsplit(")", 1)
        except OSError:
            continue  # gone meanwhile
        if int(rest.split()[3]) == sid:
            found.append(f"{entry.name} {name.split('(', 1)[1]}")
    return found


@pytest.mark.slow
def test_the_demo_alerts_from_both_cameras_rolls_out_b_to_both_and_ctrl_c_stops_every_process():
    for name in NEEDS:
        if not (REPO / name).is_file():
            pytest.skip(f"needs {REPO / name} (scripts/fetch_models.py --mirror ../shared puts it there)")
    # scripts/demo sets up .venv and runs scripts/demo.py with it; from another virtualenv,
    # run that part alone rather than make a .venv as a side effect of a test
    own_venv = Path(sys.executable).parent.parent == REPO / ".venv"
    scripts = REPO / "scripts"
    command = ["bash", str(scripts / "demo")] if own_venv else [sys.executable, str(scripts / "demo.py")]
    # a session of its own, as a terminal would give it: afterwards nothing may be left in it
    demo = subprocess.Popen([*command, "--seconds", "60", "--rollout-after", "3"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=REPO, start_new_session=True)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(iter(demo.stdout.readline, "")), daemon=True)
    reader.start()
    controller = None
    try:
        port = wait_until(lambda: next((int(m.group(1)) for line in out if (m := re.match(
            r"broker: mosquitto on 127\.0\.0\.1:(\d+)", line))), None) or demo.poll() is not None, 120,
            "the demo's broker")
        assert demo.poll() is None, "".join(out)
        # a line controller of the test's own, beside the demo's
        controller = Controller(SimpleNamespace(host="127.0.0.1", port=port), "edgecam/v1/alerts/lab/demo/+",
                                client_id="test-controller")

        def versions() -> dict[str, set[str]]:
            seen: dict[str, set[str]] = {}
            for message in controller.received():
                alert = decode_alert(message.payload)
                seen.setdefault(alert.camera, set()).add(alert.model_version)
            return seen

        def done() -> bool:
            completed = any(re.match(r"r0001 .*COMPLETED {2}2 devices, 2 finished, 0 failed", line) for line in out)
            seen = versions()
            return demo.poll() is not None or (completed and all("8.1.42-b" in seen.get(c, ()) for c in
                                                                 ("entrance", "hall")))

        wait_until(done, 120, "the rollout to complete and -b alerts from both cameras")
        assert demo.poll() is None, "".join(out[-40:])
        seen = versions()
        assert {"8.1.42-a", "8.1.42-b"} <= seen["entrance"] and {"8.1.42-a", "8.1.42-b"} <= seen["hall"], seen
        # the demo's own controller printed alerts of both cameras as they came
        printed = [line for line in out if "  ALERT  " in line]
        assert {line.split()[2] for line in printed} == {"entrance", "hall"}

        stopping = time.monotonic()
        os.killpg(demo.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the foreground process group
        assert demo.wait(15) == 0, "".join(out[-40:])
        stop_s = time.monotonic() - stopping
    finally:
        if controller is not None:
            controller.close()
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()
        reader.join(5)
    assert stop_s < 5, stop_s
    assert session_members(demo.pid) == []
    tail = "".join(out[-6:])
    assert re.search(r"stopped in \d+\.\d s: mosquitto \(pid \d+\), fleet serve \(pid \d+\), edge run entrance "
                     r"\(pid \d+\), edge run hall \(pid \d+\), fleet rollout watch \(pid \d+\)\n", tail), tail
    assert "rollout r0001: completed, 2 of 2 devices finished, 0 failed" in tail, tail
    assert "STILL RUNNING" not in tail
