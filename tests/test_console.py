"""The console: `fleet serve --http` as a real process on a real Mosquitto, simulated
devices, real ingested events and a real rollout; the API over real HTTP (and HTTPS with
a token, on a second manager that does not lead), the pages in a real headless Chromium.

One broker, one store and two managers serve the whole module, and one browser every
page test; screenshots go to a temp dir, named in the test output.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import shutil
import sqlite3
import ssl
import time
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest
from broker import Broker, FleetProcess, wait_until
from conftest import manifest_for, shared_path
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.parser import text_string_to_metric_families

from edge.core.contract import Topics, batch_body, event_json
from edge.core.ids import new_id
from edge.core.signing import init_keys, load_public_key
from edge.inference.manifest import load_manifest
from fleet.client import FleetClient
from fleet.simulator import SimSettings, Simulator, load_running
from fleet.store import Store
from fleet.upload import push_file

A = "models/yolov8n_full_integer_quant-a.tflite"
B = "models/yolov8n_full_integer_quant-b.tflite"
DEVICES = 6
SNAPSHOTS = 9  # health snapshots of sim-0000's camera c0
ALERTS = {("sim-0000", "c0", "person_in_zone"): 3, ("sim-0001", "c1", "no_helmet"): 2}
OLD = "sim-0005"  # has a health event and an alert from 40 days ago
TOKEN = "t0ken-for-the-console-tests-0123456789"


# --- the world: a broker, two managers on one store, devices, events ------------------------------------


class World:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.db = tmp / "fleet.db"
        self.broker = Broker(tmp / "mosquitto").start()
        self.keys = tmp / "keys"
        init_keys(self.keys)
        self._stored_long_ago()
        self.fleet = FleetProcess(self.db, self.broker, "--keys", str(self.keys), "--http", "127.0.0.1:0",
                                  "--retain-events", "30d", "--retain-events", "alert=90d")
        self.fleet.wait_for("control subscribed")
        self.fleet.wait_for("ingest subscribed")
        self.url = self.fleet.wait_for("http serving")["url"]
        self.http = httpx.Client(base_url=self.url, timeout=10)
        self.sim: Simulator | None = None
        self.guarded: FleetProcess | None = None
        self.rollout: str | None = None
        self.sent_at = time.time()

    def _stored_long_ago(self) -> None:
        """Events 40 days old, in the store before this manager starts with a retention of 30 days (90 for alerts)."""
        from edge.core.contract import decode_batch

        t = time.time() - 40 * 86400
        body = ",".join(event_json(id=new_id(), seq=k + 1, kind=kind, device=OLD, camera="c0", captured_at=t,
                                   recorded_at=t, priority=0, payload_json=json.dumps(payload))
                        for k, (kind, payload) in enumerate([("health", {"processed_fps": 1.0}),
                                                             ("alert", {"rule": "old_rule", "delivered": True})]))
        store = Store.open(self.db)
        store.add_batch(decode_batch(batch_body(OLD, new_id(), t, body), device=OLD), t)
        store.close()

    def start_devices(self) -> None:
        with FleetClient(self.broker.host, self.broker.port, identity="operator", timeout=20) as c:
            for relative in (A, B):
                path = shared_path(relative)
                manifest = load_manifest(manifest_for(relative), model_dir=path.parent).model_dump(mode="json")
                push_file(c, path, kind="model", name=manifest["name"], version=manifest["version"],
                          manifest=manifest)
        self.sim = Simulator(SimSettings(host=self.broker.host, port=self.broker.port, count=DEVICES,
                                         public_key=load_public_key(self.keys / "fleet.pub"), slot="detector",
                                         runs=load_running("yolov8n@8.1.42-a", shared_path(A)),
                                         health_window_s=0.3))
        self.sim.start()
        wait_until(lambda: len([d for d in self.api("/api/v1/devices")["items"] if d["state"] == "online"]) == DEVICES,
                   30, f"{DEVICES} devices online")
        self._send_events()

    def _send_events(self) -> None:
        """What real devices send: health snapshots (with quality), drift windows, alert audits."""
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="console-test-devices")
        client.connect(self.broker.host, self.broker.port)
        client.loop_start()
        topics, now, sent = Topics(), time.time(), []
        events: dict[str, list[str]] = {}

        def add(device: str, kind: str, camera: str | None, t: float, payload: dict) -> None:
            events.setdefault(device, []).append(event_json(
                id=new_id(), seq=len(events.get(device, [])) + 1, kind=kind, device=device, camera=camera,
                captured_at=t, recorded_at=t, priority=1 if kind == "alert" else 0, payload_json=json.dumps(payload)))

        for k in range(SNAPSHOTS):
            t = now - 60 * (SNAPSHOTS - k)
            add("sim-0000", "health", "c0", t, {
                "camera": "c0", "state": "running", "processed_fps": 5.0 - 0.2 * k, "capture_fps": 5.0,
                "dropped": {"budget": 4 * k, "stale": k}, "age_ms": {"p50": 40.0, "p99": 90.0 + 5 * k},
                "tasks": {"detect": {"runs": 100 * k, "latency_ms": {"p50": 30.0, "p95": 35.0 + k}}},
                "quality": {"brightness": 120.0 - k, "sharpness": 300.0 - 10 * k}})
        add("sim-0000", "health", None, now - 30, {"outbox": {"rows": 12, "bytes": 4000}})
        for k in range(2):
            add("sim-0000", "drift", "c0", now - 300 + 120 * k, {
                "task": "detect", "model": "yolov8n", "model_version": "8.1.42-a", "window": k + 1, "frames": 300,
                "detections": 900, "psi": 0.05 + 0.2 * k, "class_shift": 0.1 * k, "baseline": "manifest"})
        for (device, camera, rule), n in ALERTS.items():
            for k in range(n):
                add(device, "alert", camera, now - 600 + 100 * k, {"rule": rule, "topic": f"edgecam/x/{rule}",
                                                                     "delivered": True, "event": "present"})
        for device, body in events.items():
            info = client.publish(topics.outbox(device), batch_body(device, new_id(), now, ",".join(body)), qos=1)
            sent.append(info)
        for info in sent:
            info.wait_for_publish(10)
        client.loop_stop()
        client.disconnect()
        store = Store.open_readonly(self.db)
        try:
            wait_until(lambda: store.count_events() >= sum(len(v) for v in events.values()), 20, "events stored")
        finally:
            store.close()

    def api(self, path: str, **params) -> dict:
        r = self.http.get(path, params=params)
        assert r.status_code == 200, r.text
        return r.json()

    def start_rollout(self) -> str:
        """A rollout over every device, slow enough (a health window per stage) to watch."""
        if self.rollout is None:
            with FleetClient(self.broker.host, self.broker.port, identity="operator", timeout=20) as c:
                started = c.call("rollouts.start", {
                    "kind": "model", "name": "yolov8n", "version": "8.1.42-b", "slot": "detector",
                    "target": {"ids": self.sim.settings.device_ids()}, "canary": 1, "waves": [50, 100],
                    "health_window_s": 2.0, "abort_failure_pct": 50, "min_executed": 3})
            self.rollout = started["id"]
        return self.rollout

    def start_guarded(self) -> tuple[str, Path]:
        """A second manager on the same store (not the leader): HTTPS with a token."""
        if self.guarded is None:
            cert, key = self_signed(self.tmp)
            token = self.tmp / "http.token"
            token.write_text(TOKEN + "\n")
            self.guarded = FleetProcess(self.db, self.broker, "--http", "127.0.0.1:0", "--http-token-file", str(token),
                                        "--http-tls-cert", str(cert), "--http-tls-key", str(key))
            self.guarded_url = self.guarded.wait_for("http serving")["url"]
        return self.guarded_url, self.tmp / "cert.pem"

    def close(self) -> None:
        self.http.close()
        if self.sim is not None:
            self.sim.stop()
        for proc in (self.guarded, self.fleet):
            if proc is not None:
                assert proc.stop() == 0, proc.lines[-5:]
        self.broker.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = World(tmp_path_factory.mktemp("console"))
    try:
        w.start_devices()
        yield w
    finally:
        w.close()


def self_signed(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


# --- the API ------------------------------------------------------------------------------------------------


def test_devices_are_listed_a_page_at_a_time_with_their_latest_health(world):
    first = world.api("/api/v1/devices", limit=4)
    assert len(first["items"]) == 4 and first["next"]
    rest = world.api("/api/v1/devices", limit=4, cursor=first["next"])
    assert rest["next"] is None
    ids = [d["id"] for d in first["items"] + rest["items"]]
    assert ids == world.sim.settings.device_ids(), "every device once, in id order"
    zero = first["items"][0]
    assert zero["state"] == "online" and zero["site"] == "plant-a" and zero["models"]["detector"]
    assert zero["health"]["c0"]["processed_fps"] == pytest.approx(5.0 - 0.2 * (SNAPSHOTS - 1))
    only_b = world.api("/api/v1/devices", site="plant-b")["items"]
    assert only_b and all(d["site"] == "plant-b" for d in only_b)


def test_one_device_has_its_desired_and_reported_state_jobs_and_health_series(world):
    doc = world.api("/api/v1/devices/sim-0000")
    assert doc["device"]["id"] == "sim-0000" and doc["reported"]["device"] == "sim-0000"
    kinds = [e["kind"] for e in doc["series"]]
    assert kinds.count("health") == SNAPSHOTS + 1 and kinds.count("drift") == 2
    times = [e["captured_at"] for e in doc["series"] if e["camera"] == "c0" and e["kind"] == "health"]
    assert times == sorted(times)


def test_events_filter_by_device_camera_kind_and_time_and_page_by_cursor(world):
    assert len(world.api("/api/v1/alerts")["items"]) == sum(ALERTS.values()) + 1, "and the one from 40 days ago"
    every = world.api("/api/v1/alerts", since=str(time.time() - 86400))["items"]
    assert len(every) == sum(ALERTS.values())
    assert [e["id"] for e in every] == sorted((e["id"] for e in every), reverse=True), "newest first"
    seen, cursor = [], None
    while True:
        page = world.api("/api/v1/events", kind="alert", limit=2, since=str(time.time() - 86400),
                         **({"cursor": cursor} if cursor else {}))
        seen += [e["id"] for e in page["items"]]
        cursor = page["next"]
        if cursor is None:
            break
    assert seen == [e["id"] for e in every], "paging gives every alert once, in order"
    helmet = world.api("/api/v1/events", kind="alert", device="sim-0001", camera="c1")["items"]
    assert len(helmet) == 2 and {e["payload"]["rule"] for e in helmet} == {"no_helmet"}
    assert world.api("/api/v1/events", device="sim-0001", camera="c0")["items"] == []
    t0 = min(e["captured_at"] for e in every)
    iso = datetime.datetime.fromtimestamp(t0 + 1, datetime.timezone.utc).isoformat()
    later = world.api("/api/v1/alerts", since=iso)["items"]
    assert len(later) == len(every) - 2, "the two alerts captured at t0 are before since"
    assert len(world.api("/api/v1/alerts", since=str(t0 - 1), until=str(t0 + 1))["items"]) == 2
    drift = world.api("/api/v1/events", kind="drift")["items"]
    assert len(drift) == 2 and drift[0]["payload"]["psi"] == pytest.approx(0.25)


@pytest.mark.parametrize("path, status, parameter", [
    ("/api/v1/devices/no-such-device", 404, None),
    ("/api/v1/rollouts/no-such-rollout", 404, None),
    ("/api/v1/events?kind=bogus", 400, "kind"),
    ("/api/v1/events?limit=0", 400, "limit"),
    ("/api/v1/events?limit=many", 400, "limit"),
    ("/api/v1/events?cursor=bm90LWEtdWxpZA", 400, "cursor"),
    ("/api/v1/devices?cursor=%2F%2F%2F", 400, "cursor"),
    ("/api/v1/events?since=last-tuesday", 400, "since"),
    ("/api/v1/events?since=100&until=50", 400, "until"),
    ("/api/v1/rollouts?state=exploded", 400, "state"),
])
def test_bad_requests_get_a_json_error_naming_what_is_wrong(world, path, status, parameter):
    r = world.http.get(path)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == ("not_found" if status == 404 else "bad_request") and body["message"]
    assert body.get("parameter") == parameter


def test_nothing_changes_state_over_http(world):
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        for path in ("/api/v1/devices", "/api/v1/rollouts", "/api/v1/devices/sim-0000"):
            assert world.http.request(method, path).status_code == 405, (method, path)


def test_a_row_that_does_not_load_is_left_out_and_counted_not_a_failed_page(world):
    with sqlite3.connect(world.db, timeout=10) as c:
        c.execute("INSERT INTO devices (id, state, models, first_seen, last_seen, events) "
                  "VALUES ('sim-0003x', 'online', 'not json', 'yesterday', 1, 0)")
    try:
        ids = [d["id"] for d in world.api("/api/v1/devices")["items"]]
        assert "sim-0003x" not in ids and len(ids) == DEVICES
        assert world.http.get("/").status_code == 200
        metrics = scrape(world.http)
        assert metrics[("fleet_store_rows_skipped_total", (("table", "devices"),))] >= 1
    finally:
        with sqlite3.connect(world.db, timeout=10) as c:
            c.execute("DELETE FROM devices WHERE id = 'sim-0003x'")


def test_on_postgresql_a_locked_table_is_503_then_served_again(postgres):
    """The console's queries on the other engine, and a store that cannot answer in time:
    503 within the console's statement timeout, never a hung request; served once it can."""
    import psycopg

    from edge.core.contract import Status, decode_batch
    from fleet.web import Console, HttpServer, HttpSettings, Queries

    url = postgres.new_database()
    store = Store.open(url)
    now = time.time()
    for i in range(3):
        store.set_status(Status(v=1, device=f"pg-{i}", state="online", site="plant-a", line="1", runtime="sim",
                                models={}, at=now), now)
    body = ",".join(event_json(id=new_id(), seq=k + 1, kind="alert", device="pg-0", camera="c0", captured_at=now - k,
                               recorded_at=now, priority=1, payload_json=json.dumps({"rule": "person", "topic": "t",
                                                                                       "delivered": True}))
                    for k in range(4))
    store.add_batch(decode_batch(batch_body("pg-0", new_id(), now, body), device="pg-0"), now)
    reader = Store.open_readonly(url, pool_size=2, busy_timeout_s=1.0)
    server = HttpServer(HttpSettings(port=0), Console(Queries(reader), lambda: {}))
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            overview = http.get("/api/v1/overview").json()
            assert overview["totals"] == {"online": 3} and overview["alerts_last_hour"] == [{"rule": "person", "alerts": 4}]
            assert len(http.get("/api/v1/alerts", params={"limit": 3}).json()["items"]) == 3
            assert http.get("/").status_code == 200
            with psycopg.connect(url) as lock:
                lock.execute("LOCK TABLE devices IN ACCESS EXCLUSIVE MODE")
                started = time.monotonic()
                r = http.get("/api/v1/devices")
                assert r.status_code == 503 and r.json()["error"] == "store_unavailable" and r.headers["Retry-After"]
                assert time.monotonic() - started < 5, "answered, not hung"
            assert http.get("/api/v1/devices").status_code == 200
    finally:
        server.stop()
        reader.close()
        store.close()


def test_events_past_their_kinds_retention_are_purged_and_the_rest_kept(world):
    wait_until(lambda: world.api("/api/v1/events", device=OLD, kind="health")["items"] == [], 20,
               "the 40-day-old health event purged")
    assert [e["payload"]["rule"] for e in world.api("/api/v1/alerts", device=OLD)["items"]] == ["old_rule"]
    overview = world.api("/api/v1/overview")
    assert overview["retention"]["kept_s"] == {"*": 30 * 86400, "alert": 90 * 86400}
    assert overview["oldest_event"] < time.time() - 39 * 86400, "how far back the data goes: the old alert"


def serve_refused(capsys, *args: str) -> str:
    """`fleet serve` with options it refuses before starting anything: exit 2, and its message."""
    from fleet.cli import main

    assert main(["serve", *args]) == 2
    return capsys.readouterr().err


def test_metrics_show_devices_ingest_ack_latency_and_store_size(world):
    m = scrape(world.http)
    assert m[("fleet_devices", (("state", "online"),))] == DEVICES
    assert m[("fleet_ingest_batches_total", ())] >= 2
    assert m[("fleet_ingest_ack_seconds_count", ())] >= 2
    assert m[("fleet_store_bytes", ())] > 0
    assert m[("fleet_leader", ())] == 1
    assert ("fleet_transfers_waiting", ()) in m


def test_a_manager_that_does_not_lead_serves_https_only_with_the_token(world):
    url, cert = world.start_guarded()
    assert url.startswith("https://127.0.0.1:")
    with httpx.Client(base_url=url, verify=ssl.create_default_context(cafile=str(cert)), timeout=10) as https:
        for path in ("/api/v1/devices", "/api/v1/devices/sim-0000", "/metrics", "/api/v1/openapi.json"):
            assert https.get(path).status_code == 401, f"{path} without a token"
            for wrong in ("Bearer " + TOKEN[:-1], "Bearer " + TOKEN + "x", "Basic " + TOKEN, "Bearer", TOKEN):
                r = https.get(path, headers={"Authorization": wrong})
                assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer"), (path, wrong)
            assert https.get(path, headers={"Cookie": "fleet_token=guess"}).status_code == 401
        ok = https.get("/api/v1/devices", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200 and len(ok.json()["items"]) == DEVICES, "the same store, read by a non-leader"
        m = scrape(https, headers={"Authorization": f"Bearer {TOKEN}"})
        assert m[("fleet_leader", ())] == 0
        page = https.get("/", follow_redirects=False)
        assert page.status_code == 303 and page.headers["location"] == "/login", "a browser is sent to sign in"
        assert https.post("/login", data={"token": "guess"}).status_code == 401
        signed = https.post("/login", data={"token": TOKEN}, follow_redirects=False)
        assert signed.status_code == 303 and "secure" in signed.headers["set-cookie"].lower()
        https.cookies.set("fleet_token", TOKEN)
        assert https.get("/").status_code == 200
    with pytest.raises(httpx.HTTPError):
        httpx.get(url.replace("https", "http") + "/api/v1/devices", timeout=5)


def test_serve_refuses_unsound_console_and_retention_options(tmp_path, capsys):
    db = str(tmp_path / "f.db")
    for extra in ((), ("--http-token-file", str(tmp_path / "none"))):
        err = serve_refused(capsys, "--db", db, "--http", "0.0.0.0:8080", *extra)
        assert "beyond loopback" in err and "--http-tls-cert" in err, err
    short = tmp_path / "short.token"
    short.write_text("abc\n")
    assert "--http-token-file" in serve_refused(capsys, "--db", db, "--http", "127.0.0.1:0", "--http-token-file", str(short))
    assert "go together" in serve_refused(capsys, "--db", db, "--http", "127.0.0.1:0", "--http-tls-cert", str(short))
    assert "need --http" in serve_refused(capsys, "--db", db, "--http-token-file", str(short))
    assert "unknown event kind 'bogus'" in serve_refused(capsys, "--db", db, "--retain-events", "bogus=3d")
    assert "duration" in serve_refused(capsys, "--db", db, "--retain-events", "forever")
    assert not (tmp_path / "f.db").exists(), "nothing started"


def scrape(client: httpx.Client, **kw) -> dict:
    r = client.get("/metrics", **kw)
    assert r.status_code == 200, r.text
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


# --- the pages, in a real headless Chromium ------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("needs a headless Chromium and its driver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1600"):
        options.add_argument(arg)
    b = webdriver.Chrome(service=Service(driver), options=options)
    b.screenshots = tmp_path_factory.mktemp("screenshots")
    print(f"screenshots in {b.screenshots}")
    yield b
    b.quit()


def shot(browser, name: str) -> None:
    browser.save_screenshot(str(browser.screenshots / f"{name}.png"))


def test_overview_lists_every_device_by_site_and_line(world, browser):
    from selenium.webdriver.common.by import By

    browser.get(world.url + "/")
    rows = browser.find_elements(By.CSS_SELECTOR, "#devices tr.device")
    assert [r.get_attribute("data-device") for r in rows] == world.sim.settings.device_ids()
    assert browser.find_element(By.CSS_SELECTOR, '[data-condition="online"]').text.startswith(f"{DEVICES} online")
    sites = {td.text for td in browser.find_elements(By.CSS_SELECTOR, "#by-site-line td:first-child")}
    assert sites == {"plant-a", "plant-b"}
    rules = browser.find_element(By.ID, "alerts-by-rule").text
    assert "person_in_zone 3" in rules and "no_helmet 2" in rules
    shot(browser, "overview")
    rows[0].find_element(By.TAG_NAME, "a").click()
    assert browser.current_url.endswith("/devices/sim-0000")


def test_device_page_plots_the_stored_health_events(world, browser):
    from selenium.webdriver.common.by import By

    browser.get(world.url + "/devices/sim-0000")
    charts = {f.get_attribute("data-title"): f for f in browser.find_elements(By.CSS_SELECTOR, "figure.chart")}
    for title in ("Processed frames per second", "Capture-to-result age, p99", "Inference latency", "Drops by reason",
                  "Outbox backlog", "Image quality", "Drift against the baseline"):
        assert title in charts, f"no {title!r} chart"
    fps = charts["Processed frames per second"].find_element(By.CSS_SELECTOR, "g.series")
    assert fps.get_attribute("data-name") == "c0" and int(fps.get_attribute("data-points")) == SNAPSHOTS
    assert len(fps.find_elements(By.TAG_NAME, "circle")) == SNAPSHOTS, "a point per stored snapshot, drawn"
    drops = {g.get_attribute("data-name"): int(g.get_attribute("data-points"))
             for g in charts["Drops by reason"].find_elements(By.CSS_SELECTOR, "g.series")}
    assert drops == {"c0 budget": SNAPSHOTS - 1, "c0 stale": SNAPSHOTS - 1}
    drift = {g.get_attribute("data-name") for g in charts["Drift against the baseline"].find_elements(By.CSS_SELECTOR, "g.series")}
    assert "c0/detect psi" in drift
    assert "yolov8n@8.1.42" in browser.find_element(By.ID, "running").text
    shot(browser, "device")


def test_rollout_page_stage_bars_advance_while_watched(world, browser):
    from selenium.webdriver.common.by import By

    rollout = world.start_rollout()
    browser.get(f"{world.url}/rollouts/{rollout}")
    seen: list[int] = []

    def settled() -> bool:
        # the state and the bars read in one script, from one loaded page: read one after
        # the other, the page's own refresh could come between them (old bars, new state)
        try:
            read = browser.execute_script(
                "if (document.readyState !== 'complete') return null;"
                "const state = document.getElementById('state');"
                "const done = [...document.querySelectorAll('#stages .stage')]"
                "  .reduce((n, s) => n + Number(s.dataset.finished), 0);"
                "return state ? [state.textContent.trim(), done] : null;")
        except Exception:  # the page is being reloaded by its own refresh
            return False
        if read is None:
            return False
        seen.append(read[1])
        return read[0] == "completed"

    wait_until(settled, 60, "the rollout page to show the rollout completed", interval=0.5)
    shot(browser, "rollout")
    assert seen[0] < DEVICES and seen[-1] == DEVICES, seen
    assert len(set(seen)) >= 3, f"the bars were seen at several stages, not only before and after: {sorted(set(seen))}"
    assert seen == sorted(seen), "never backwards"
    states = {e.get_attribute("data-state") for e in browser.find_elements(By.CSS_SELECTOR, "tr.execution")}
    assert states == {"succeeded"}
    doc = world.api(f"/api/v1/rollouts/{rollout}")
    assert doc["state"] == "completed" and [s["finished"] for s in doc["stages"]] == [s["devices"] for s in doc["stages"]]
    assert len(doc["executions"]) == DEVICES and doc["failures"] == []
    device = world.api("/api/v1/devices/sim-0001")
    assert device["executions"][0]["rollout"] == rollout and {j["state"] for j in device["jobs"]} >= {"committed"}
    m = scrape(world.http)
    assert m[("fleet_artifact_bytes_served_total", ())] >= DEVICES * shared_path(B).stat().st_size
    assert m[("fleet_rollouts", (("state", "completed"),))] == 1


def test_alerts_page_filters_by_device(world, browser):
    from selenium.webdriver.common.by import By

    browser.get(world.url + "/alerts")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#alerts tr.alert")) == sum(ALERTS.values()) + 1
    box = browser.find_element(By.NAME, "device")
    box.send_keys("sim-0001")
    box.submit()
    wait_until(lambda: "device=sim-0001" in browser.current_url, 10, "the filtered page")
    rows = browser.find_elements(By.CSS_SELECTOR, "#alerts tr.alert")
    assert [r.get_attribute("data-device") for r in rows] == ["sim-0001"] * 2
    shot(browser, "alerts")
