"""Segmentation and sampling on a running `edge run`: DeepLab and a classifier on one camera
of real photos, a share rule alerting over a real broker, samplers filling the snapshot
store under their caps, the outbox holding only ids and hashes, and /metrics counting."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import subprocess
import sys
import urllib.request

import yaml
from broker import Broker, free_port, wait_until
from conftest import REPO, edge_run, manifest_for, shared_path
from controller import Controller
from prometheus_client.parser import text_string_to_metric_families

from edge.core.contract import decode_alert

DEEPLAB = "models/deeplabv3_mnv2_dm05_pascal_quant.tflite"
CLASSIFIER = "models/mobilenet_v1_0.25_128_quant.tflite"

POLICY = """
version: seg-e2e
camera_health: {enabled: false}
image_quality: {enabled: false}
rules:
  - name: person-in-view
    when: {event: present, classes: [person], min_share: 0.5}
    state: true
sampling:
  near_threshold: {epsilon: 0.5, per_hour: 3}   # every score is within 0.5 of a threshold: only the cap stops it
  random: {share: 0.1, per_hour: 2}
"""


def config(tmp_path, policy: str, broker: Broker | None = None, port: int | None = None) -> dict:
    """Two tasks on one camera of real photos; without ``broker`` no MQTT, outbox or metrics."""
    images = tmp_path / "images"
    images.mkdir()
    for name in ("grace_hopper.bmp", "cat.bmp"):  # a person, then no one, over and over
        shutil.copy(shared_path(f"media/images/{name}"), images / name)
    (tmp_path / "policy.yaml").write_text(policy)
    cfg = {
        "device": {"id": "cam-seg", "site": "plant-a", "line": "3"},
        "runtime": {"num_threads": 2, "stats_file": str(tmp_path / "stats.json")},
        "logging": {"format": "json"},
        "models": {"seg": {"path": str(shared_path(DEEPLAB)), "manifest": str(manifest_for(DEEPLAB))},
                   "cls": {"path": str(shared_path(CLASSIFIER)), "manifest": str(manifest_for(CLASSIFIER))}},
        "cameras": [{"id": "desk", "source": {"kind": "images", "path": str(images), "fps": 4, "loop": True},
                     "tasks": [{"name": "seg", "model": "seg"}, {"name": "cls", "model": "cls"}]}],
        "decisions": {"policy": str(tmp_path / "policy.yaml"),
                      "snapshots": {"dir": str(tmp_path / "snaps"), "max_mb": 50, "max_age_h": 1}},
    }
    if broker is not None:
        cfg["mqtt"] = {"host": broker.host, "port": broker.port, "reconnect": {"initial_s": 0.2, "max_s": 1}}
        cfg["outbox"] = {"path": str(tmp_path / "outbox.db")}
        cfg["metrics"] = {"listen": f"127.0.0.1:{port}"}
    return cfg


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sampled(tmp_path) -> list[dict]:
    """The payloads of the sampled snapshots' decision events in the outbox."""
    with sqlite3.connect(f"file:{tmp_path / 'outbox.db'}?mode=ro", uri=True) as conn:
        bodies = [json.loads(b) for (b,) in conn.execute("select body from events where kind = 'decision'")]
    return [b["payload"] for b in bodies if "sampled" in b["payload"]]


def test_share_alerts_and_capped_samples_on_a_running_daemon(tmp_path, broker):
    port = free_port()
    cfg_path = tmp_path / "cam.yaml"
    cfg_path.write_text(yaml.safe_dump(config(tmp_path, POLICY, broker, port)))
    controller = Controller(broker, "edgecam/v1/alerts/#")
    run = edge_run(cfg_path)
    try:
        run.wait_for("metrics listening")

        def alerts():
            return [decode_alert(m.payload) for m in controller.received() if "/state/" not in m.topic]

        wait_until(lambda: [a.event for a in alerts()][:2] == ["present", "cleared"], 60,
                   "the share rule on and off as the person comes and goes")
        wait_until(lambda: scrape(port).get(("edgecam_samples_capped_total", (("reason", "near_threshold"),)), 0) > 0,
                   60, "the near-threshold sampler's cap to refuse a frame")
        wait_until(lambda: scrape(port).get(("edgecam_samples_capped_total", (("reason", "random"),)), 0) > 0,
                   120, "the random sampler's cap to refuse a frame")
        metrics = scrape(port)
        # the last snapshot's event is made once its JPEG is on disk, on the store's thread
        wait_until(lambda: len(sampled(tmp_path)) == 5, 30, "every sampled snapshot's event in the outbox")
    finally:
        code = run.stop()
        controller.close()
    assert code == 0, run.text()[-3000:]
    on = alerts()[0]
    assert on.rule == "person-in-view" and on.label == "person" and 0.6 < on.values["share"] < 0.72
    assert metrics[("edgecam_samples_total", (("reason", "near_threshold"),))] == 3
    assert metrics[("edgecam_samples_total", (("reason", "random"),))] == 2
    stats = subprocess.run([sys.executable, "-m", "edge", "stats", "--config", str(cfg_path)], capture_output=True,
                           text=True, cwd=REPO, timeout=60)
    assert stats.returncode == 0, stats.stderr
    line = next(x for x in stats.stdout.splitlines() if x.startswith("samples kept: "))
    assert "near_threshold 3 (capped " in line and "random 2 (capped " in line
    kept = sampled(tmp_path)
    reasons = sorted(r for p in kept for r in p["sampled"])
    assert reasons == ["near_threshold"] * 3 + ["random"] * 2
    for p in kept:
        data = (tmp_path / "snaps" / f"{p['snapshot']}.jpg").read_bytes()
        assert hashlib.sha256(data).hexdigest() == p["snapshot_sha256"]
        assert len(json.dumps(p)) < 600  # metadata: no pixels went with it


def test_a_share_rule_naming_a_class_deeplab_lacks_stops_the_start_with_exit_2(tmp_path):
    policy = POLICY.replace("classes: [person]", "classes: [forklift]")
    cfg_path = tmp_path / "cam.yaml"
    cfg_path.write_text(yaml.safe_dump(config(tmp_path, policy)))
    for cmd in (["config", "check", str(cfg_path)], ["run", "--config", str(cfg_path)]):
        out = subprocess.run([sys.executable, "-m", "edge", *cmd], capture_output=True, text=True, cwd=REPO,
                             timeout=120)
        assert out.returncode == 2, (cmd, out.stderr[-2000:])
        assert "rules[0].when.classes[0]: 'forklift' is not a class of segmentation model" in out.stderr, cmd
