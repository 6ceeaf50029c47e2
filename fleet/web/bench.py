"""``fleet bench console``: the console's response times on a big store.

A store filled with N devices and M events (health snapshots per camera, detection
summaries, alerts, drift windows, spread over 30 days), the console served on it by the
real server on a free loopback port, and each page and API call requested in turn by a
real HTTP client (``--db`` names a store to fill, or one that holds devices already,
measured as it is). Reported per route: p50 and p99 in ms, and the p50 as a ratio to a
baseline measured in the same run: the OpenAPI document, which touches no table (what
the HTTP stack costs by itself).
"""

from __future__ import annotations

import http.client
import json
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa

from edge.core.ids import new_id
from fleet.store import Store
from fleet.store import schema as S

from .app import Console
from .queries import Queries
from .server import HttpServer, HttpSettings

CHUNK = 20_000
SPAN_S = 30 * 86400
KINDS = (("health", 0.70), ("detection_summary", 0.20), ("alert", 0.05), ("drift", 0.05))
RULES = ("person_in_zone", "no_helmet", "line_crossed", "camera_health")


def fill(store: Store, devices: int, events: int, *, seed: int = 0) -> None:
    """``devices`` devices and ``events`` events over the last 30 days, inserted in chunks."""
    rnd = random.Random(seed)
    now = time.time()
    ids = [f"cam-{i:05d}" for i in range(devices)]
    with store.engine.begin() as c:
        for start in range(0, devices, CHUNK):
            c.execute(S.devices.insert(), [
                {"id": d, "state": "online" if rnd.random() < 0.9 else "offline", "site": f"plant-{i % 5}",
                 "line": str(i % 4 + 1), "runtime": "litert-2.3.0", "models": json.dumps({"detector": "yolov8n@8.1.42"}),
                 "status_at": now - rnd.random() * 600, "first_seen": now - SPAN_S,
                 "last_seen": now - rnd.random() * 600, "events": events // devices, "state_since": now - 3600}
                for i, d in enumerate(ids[start:start + CHUNK], start)])
    kinds, weights = zip(*KINDS)
    for start in range(0, events, CHUNK):
        rows = []
        for k in range(start, min(events, start + CHUNK)):
            t = now - SPAN_S + SPAN_S * k / events
            kind = rnd.choices(kinds, weights)[0]
            rows.append({"id": new_id(), "device": ids[rnd.randrange(devices)], "seq": k + 1, "kind": kind,
                         "camera": "c0", "captured_at": t, "recorded_at": t, "priority": 1 if kind == "alert" else 0,
                         "payload": _payload(kind, rnd), "batch": "bench", "received_at": t})
        with store.engine.begin() as c:
            c.execute(S.events.insert(), rows)


class _Client:
    """One kept-alive connection, as a browser's."""

    def __init__(self, host: str, port: int) -> None:
        self.conn = http.client.HTTPConnection(host, port, timeout=30)

    def get(self, path: str) -> tuple[int, bytes]:
        self.conn.request("GET", path)
        r = self.conn.getresponse()
        return r.status, r.read()

    def close(self) -> None:
        self.conn.close()


def _payload(kind: str, rnd: random.Random) -> str:
    if kind == "health":
        return json.dumps({"camera": "c0", "processed_fps": round(4 + rnd.random(), 2), "dropped": {"budget": rnd.randrange(50)},
                           "age_ms": {"p50": 40.0, "p99": round(80 + 40 * rnd.random(), 1)},
                           "tasks": {"detect": {"latency_ms": {"p50": 30.0, "p95": round(35 + 10 * rnd.random(), 1)}}},
                           "quality": {"brightness": 120.0, "sharpness": round(300 * rnd.random(), 1)}})
    if kind == "alert":
        return json.dumps({"rule": rnd.choice(RULES), "topic": "edgecam/alerts", "delivered": True, "event": "present"})
    if kind == "drift":
        return json.dumps({"task": "detect", "psi": round(rnd.random() * 0.3, 3), "frames": 300, "detections": 800})
    return json.dumps({"model": "yolov8n", "detections": [{"label": "person", "score": 0.8}]})


def run_console_bench(*, devices: int, events: int, requests: int, db: str | None = None) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="fleet-console-bench-"))
    try:
        where = db or str(work / "fleet.db")
        store = Store.open(where)
        started = time.monotonic()
        with store.engine.connect() as c:
            ids = list(c.execute(sa.select(S.devices.c.id)).scalars())
        if not ids:  # a store that holds devices already is measured as it is
            fill(store, devices, events)
            ids = [f"cam-{i:05d}" for i in range(devices)]
        filled_s = time.monotonic() - started
        events = store.count_events()
        store.close()
        reader = Store.open_readonly(where, pool_size=4)
        server = HttpServer(HttpSettings(port=0), Console(Queries(reader), lambda: {}))
        server.start()
        rnd = random.Random(1)
        routes = {
            "baseline (openapi.json)": lambda: "/api/v1/openapi.json",
            "overview page /": lambda: "/",
            "device page": lambda: f"/devices/{rnd.choice(ids)}",
            "alerts page": lambda: "/alerts",
            "GET /api/v1/overview": lambda: "/api/v1/overview",
            "GET /api/v1/devices": lambda: "/api/v1/devices",
            "GET /api/v1/devices/{id}": lambda: f"/api/v1/devices/{rnd.choice(ids)}",
            "GET /api/v1/events?device=": lambda: f"/api/v1/events?device={rnd.choice(ids)}",
            "GET /api/v1/alerts?since=1h": lambda: f"/api/v1/alerts?since={time.time() - 3600:.0f}",
        }
        out: dict[str, Any] = {"devices": len(ids), "events": events, "requests_per_route": requests,
                               "fill_s": round(filled_s, 1)}
        http = _Client("127.0.0.1", server.port)
        try:
            base = None
            for name, path in routes.items():
                http.get(path())  # warm: the connection, caches, templates compiled
                times = []
                for _ in range(requests):
                    t0 = time.perf_counter()
                    status, body = http.get(path())
                    times.append((time.perf_counter() - t0) * 1000)
                    if status != 200:
                        raise RuntimeError(f"{name}: HTTP {status}: {body[:200]!r}")
                p50, p99 = (float(np.percentile(times, q)) for q in (50, 99))
                base = base or p50
                out[name] = {"p50_ms": round(p50, 1), "p99_ms": round(p99, 1), "x_baseline": round(p50 / base, 1)}
        finally:
            http.close()
            server.stop()
            reader.close()
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)
