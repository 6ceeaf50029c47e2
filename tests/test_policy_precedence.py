"""Policy precedence on a running `edge run`: the fleet's assignment wins while one is in
force, a SIGHUP then leaves it alone, and `edge policy show` says which policy is active and
where it came from. Real Mosquitto, a real model, a contract peer as the fleet."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from broker import wait_until
from conftest import REPO, edge_run, manifest_for, shared_path
from fleet_peer import FleetPeer

from edge.core.contract import Artifact, Assignment
from edge.core.signing import init_keys, load_private_key, sign

TINY = "models/mobilenet_v1_0.25_128_quant.tflite"
DEVICE = "cam-precedence"


def local_policy(version: str) -> str:
    return f"version: {version}\ndefault: {{accept_at: 0.2, reject_at: 0.6}}\ncamera_health: {{enabled: false}}\n"


def write_config(tmp_path: Path, broker, public_key: Path) -> Path:
    (tmp_path / "policy.yaml").write_text(local_policy("local-1"))
    cfg = {
        "device": {"id": DEVICE},
        "runtime": {"num_threads": 1, "stats_file": str(tmp_path / "stats.json")},
        "logging": {"format": "json", "stats_interval_s": 30},  # changes are written at once, not on this tick
        "models": {"cls": {"path": str(shared_path(TINY)), "manifest": str(manifest_for(TINY))}},
        "cameras": [{"id": "door", "source": {"kind": "video", "path": str(shared_path("media/pedestrians-360p10.avi")),
                                              "loop": True}, "model": "cls"}],
        "mqtt": {"host": broker.host, "port": broker.port, "reconnect": {"initial_s": 0.2, "max_s": 1}},
        "outbox": {"path": str(tmp_path / "outbox.db")},
        "agent": {"public_key": str(public_key), "state_dir": str(tmp_path / "store")},
        "decisions": {"policy": str(tmp_path / "policy.yaml")},
    }
    path = tmp_path / "cam.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def show(config: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "edge", "policy", "show", "--config", str(config), "--json"],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def active(config: Path) -> tuple[str, str] | None:
    doc = show(config)["active"]
    return (doc["origin"], doc["version"]) if doc else None


@pytest.fixture
def keys(tmp_path):
    private, public = init_keys(tmp_path / "keys")
    return load_private_key(private), public


def test_the_fleets_policy_wins_over_a_sighup_until_it_is_withdrawn(tmp_path, broker, keys):
    key, public = keys
    config = write_config(tmp_path, broker, public)
    data = local_policy("fleet-7").encode()
    art = sign(key, Artifact(kind="policy", name="line3", version="7", sha256=hashlib.sha256(data).hexdigest(),
                             size=len(data)))
    run = edge_run(config)
    peer = FleetPeer(broker.host, broker.port, DEVICE, key, blobs={art.sha256: data})
    try:
        run.wait_for("running")
        wait_until(lambda: active(config) == ("local", "local-1"), 30, "the local policy shown in force")

        peer.desire({}, policy=Assignment(artifact=art, job="policy-7"))
        assert wait_until(lambda: peer.final("policy-7"), 60, "the policy job").state == "committed"
        wait_until(lambda: active(config) == ("fleet", "fleet-7"), 30, "the fleet's policy shown in force")
        doc = show(config)
        assert doc["active"]["source"] == "line3@7" and doc["assigned"]["job"] == "policy-7"
        assert doc["local"] == {"file": str(tmp_path / "policy.yaml"), "version": "local-1"}

        # an operator edits the local file and reloads: checked, not applied
        (tmp_path / "policy.yaml").write_text(local_policy("local-2"))
        run.proc.send_signal(signal.SIGHUP)
        refused = run.wait_for("local policy not applied: the fleet's assignment is in force", 30)
        assert (refused["local"], refused["current"], refused["assigned"]) == ("local-2", "fleet-7", "line3@7")
        assert active(config) == ("fleet", "fleet-7")
        text = subprocess.run([sys.executable, "-m", "edge", "policy", "show", "--config", str(config)],
                              capture_output=True, text=True, cwd=REPO, timeout=60).stdout
        assert text.startswith("policy fleet-7 from the fleet assignment line3@7"), text

        # a broken local file is still reported as broken while the fleet's is in force
        (tmp_path / "policy.yaml").write_text("version: x\nrules: [{name: r, when: {event: entered}}]\n")
        run.proc.send_signal(signal.SIGHUP)
        assert "rules[0].when.zone" in run.wait_for("policy refused; the current one stays", 30)["error"]
        (tmp_path / "policy.yaml").write_text(local_policy("local-2"))

        # a fleet policy naming a crop task this device does not run is refused, naming the key
        bad = b"version: bad\nrules: [{name: r, when: {class: person, crop: {task: helmet, class: x}}}]\n"
        bad_art = sign(key, Artifact(kind="policy", name="line3", version="8", size=len(bad),
                                     sha256=hashlib.sha256(bad).hexdigest()))
        peer.blobs[bad_art.sha256] = bad
        peer.desire({}, policy=Assignment(artifact=bad_art, job="policy-8"))
        failed = wait_until(lambda: peer.final("policy-8"), 60, "the bad policy job")
        assert failed.state == "failed" and failed.reason.startswith("invalid_policy"), failed
        assert "rules[0].when.crop.task: 'helmet' is not a trigger task of camera 'door'" in failed.reason
        assert active(config) == ("fleet", "fleet-7")

        # the fleet withdraws its assignment (a newer desired state without a policy): the local file takes over
        peer.desire({})
        run.wait_for("policy assignment withdrawn", 30)
        wait_until(lambda: active(config) == ("local", "local-2"), 30, "the local policy back in force")
        wait_until(lambda: (r := peer.last_reported()) and r.policy is None, 10, "no policy reported")
        run.proc.send_signal(signal.SIGHUP)  # and a reload applies the file again
        applied = wait_until(lambda: (a := run.logged("policy applied")) and len(a) >= 3 and a, 30, "the reload")
        assert [(a["origin"], a["version"]) for a in applied] == [
            ("fleet", "fleet-7"), ("local", "local-2"), ("local", "local-2")]
    finally:
        peer.close()
        code = run.stop()
    assert code == 0, run.text()[-3000:]


def test_policy_show_without_a_running_daemon_says_what_a_start_would_use(tmp_path, broker, keys):
    config = write_config(tmp_path, broker, keys[1])
    doc = show(config)
    assert doc["active"] == {"origin": "local", "version": "local-1", "source": str(tmp_path / "policy.yaml"),
                             "applied_at": None}
    assert "no stats file" in doc["as_of"]


def test_a_withdrawn_fleet_policy_stays_in_force_when_there_is_no_local_one_to_take_over(tmp_path):
    from edge.config import parse_config
    from edge.daemon import Daemon

    cfg = {"device": {"id": "d"}, "runtime": {"num_threads": 1},
           "models": {"cls": {"path": str(shared_path(TINY)), "manifest": str(manifest_for(TINY))}},
           "cameras": [{"id": "door", "source": {"kind": "pattern"}, "model": "cls"}]}
    daemon = Daemon(parse_config(cfg))
    assert daemon.policy_source is None
    daemon.apply_fleet_policy(local_policy("fleet-7"), source="line3@7")
    assert (daemon.policy_source.origin, daemon.policy_source.withdrawn) == ("fleet", False)
    daemon.release_policy()
    s = daemon.policy_source
    assert (s.origin, s.version, s.source, s.withdrawn) == ("fleet", "fleet-7", "line3@7", True)
    assert daemon.decisions.policy.version == "fleet-7"
