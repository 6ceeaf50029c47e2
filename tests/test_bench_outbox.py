"""`edge bench outbox` end to end on a small backlog: the report is complete and consistent."""

from __future__ import annotations

import json
import subprocess
import sys

from broker import REPO, mosquitto_binary


def test_the_outbox_bench_reports_every_figure_it_promises(tmp_path):
    mosquitto_binary()  # skips without the broker
    run = subprocess.run([sys.executable, "-m", "edge", "bench", "outbox", "--events", "3000", "--live-events", "1000",
                          "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["scenario"] == "outbox" and report["fleet_stored"] >= 4000
    assert report["baseline_single_publish_qos1"]["messages_per_s"] > 0
    assert report["append"]["events"] == 3000 and report["append"]["events_per_s"] > 0
    drain = report["drain"]
    assert drain["events"] == 3000 and drain["end_to_end_events_per_s"] > 0
    assert drain["rss_mb_peak"] >= drain["rss_mb_start"] > 0
    assert report["live"]["end_to_end_events_per_s"] > 0
    assert report["sync"]["resent"] == 0 and report["sync"]["disconnects"] == 0
