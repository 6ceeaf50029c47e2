"""The secure fleet end to end, and every attack on it, against a real Mosquitto running
the configuration `fleet broker config` generates.

Devices and identities are enrolled with the `fleet` command, the broker runs that
configuration over TLS, `fleet serve` connects with its own certificate, and two
`edge run` daemons with their bundles take a rollout. Then every rule is tried by
another identity with its own valid credential: a third camera (certificate), two
password cameras, a second operator, a line controller and a stolen manager
credential without the signing key. One broker, one manager and two daemons for the
module; the revocation comes last.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import yaml
from broker import REPO, Broker, FleetProcess, free_port, wait_until
from conftest import EdgeRun, manifest_for, shared_path
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion

from edge.core import contract as C
from edge.core.ids import new_id
from edge.core.link import Link, LinkSettings
from edge.core.signing import init_keys, load_private_key, sign
from edge.inference.manifest import load_manifest
from edge.updates.modelstore import ModelStore
from fleet.ca import FleetCA, cert_pem, key_pem, new_key
from fleet.cli import main as fleet_main
from fleet.client import FleetClient, Tls
from fleet.errors import OpError
from fleet.upload import push_file

T = C.Topics()
P = T.prefix
TINY = "models/mobilenet_v1_0.25_128_quant.tflite"
NEXT = "models/mobilenet_v1_0.5_160_quant.tflite"
VIDEO = "media/pedestrians-360p10.avi"
SLOT = "det"
DELIVERED = ("Success", "No matching subscribers")  # a PUBACK the broker took the message with


def fleet(*args: str) -> None:
    """The `fleet` command in this process; it must succeed."""
    assert fleet_main(list(args)) == 0, args


class Fleet:
    """Paths and ports of the module's fleet."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.db, self.pki, self.keys = root / "fleet.db", root / "pki", root / "keys"
        self.bundles, self.broker_dir = root / "bundles", root / "broker"
        self.port, self.password_port = free_port(), free_port()

    def admin(self, *args: str) -> None:
        fleet(*args, "--db", str(self.db), "--pki", str(self.pki))

    def bundle(self, name: str) -> Path:
        return self.bundles / name

    def tls(self, name: str) -> Tls:
        b = self.bundle(name)
        return Tls(str(b / "ca.crt"), str(b / f"{name}.crt"), str(b / f"{name}.key"))

    def env(self, name: str) -> dict[str, str]:
        """An identity's `fleet.env`, as a shell sourcing it would have it."""
        lines = (self.bundle(name) / "fleet.env").read_text().splitlines()
        return {**os.environ, **dict(line.split("=", 1) for line in lines)}

    def client(self, name: str = "alice", **kw) -> FleetClient:
        return FleetClient("127.0.0.1", self.port, identity=name, tls=self.tls(name), timeout=20, **kw)

    def password(self, name: str) -> str:
        return yaml.safe_load((self.bundle(name) / "edgecam.yaml").read_text())["mqtt"]["password"]


class Raw:
    """One MQTT 5 connection as an attacker makes it, recording what the broker answers."""

    def __init__(self, f: Fleet, *, client_id: str, cert: str | None = None, key: str | None = None,
                 username: str | None = None, password: str | None = None, port: int | None = None,
                 ca: str | None = None) -> None:
        self.connack: str | None = None
        self.error: str | None = None
        self.disconnects: list[str] = []
        self.messages: list[mqtt.MQTTMessage] = []
        self._acks: dict[int, str] = {}
        self._cond = threading.Condition()
        c = self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        c.tls_set(ca_certs=ca or str(f.pki / "ca.crt"), certfile=cert, keyfile=key)
        if username:
            c.username_pw_set(username, password)
        c.on_connect = lambda cl, u, fl, rc, p: self._event(connack=str(rc))
        c.on_disconnect = lambda cl, u, fl, rc, p: self._event(disconnect=str(rc))
        c.on_subscribe = lambda cl, u, mid, rcs, p: self._event(ack=(mid, str(rcs[0])))
        c.on_publish = lambda cl, u, mid, rc, p: self._event(ack=(mid, str(rc)))
        c.on_message = lambda cl, u, m: self._event(message=m)
        try:
            c.connect("127.0.0.1", port or f.port, keepalive=30)
        except OSError as exc:
            self.error = str(exc)
            return
        c.loop_start()
        with self._cond:
            self._cond.wait_for(lambda: self.connack or self.disconnects, 10)

    @classmethod
    def device(cls, f: Fleet, name: str, client_id: str | None = None) -> "Raw":
        b = f.bundle(name)
        return cls(f, client_id=client_id or name, cert=str(b / f"{name}.crt"), key=str(b / f"{name}.key"))

    def _event(self, connack=None, disconnect=None, ack=None, message=None) -> None:
        with self._cond:
            if connack is not None:
                self.connack = connack
            if disconnect is not None:
                self.disconnects.append(disconnect)
            if ack is not None:
                self._acks[ack[0]] = ack[1]
            if message is not None:
                self.messages.append(message)
            self._cond.notify_all()

    @property
    def refused(self) -> bool:
        """Refused at connect: by the TLS handshake (a disconnect before any CONNACK) or by CONNACK."""
        return self.error is not None or self.connack not in (None, "Success") or (
            self.connack is None and bool(self.disconnects))

    def _wait(self, mid: int) -> str:
        with self._cond:
            assert self._cond.wait_for(lambda: mid in self._acks, 10), "no answer from the broker"
            return self._acks.pop(mid)

    def sub(self, topic: str) -> str:
        return self._wait(self.client.subscribe(topic, qos=1)[1])

    def pub(self, topic: str, payload: bytes, *, retain: bool = False) -> str:
        return self._wait(self.client.publish(topic, payload, qos=1, retain=retain).mid)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# --- the fleet: enrolled, configured, running --------------------------------------------------


@pytest.fixture(scope="module")
def f(tmp_path_factory) -> Fleet:
    f = Fleet(tmp_path_factory.mktemp("secure"))
    init_keys(f.keys)
    f.admin("broker", "config", "--out", str(f.broker_dir), "--host", "127.0.0.1", "--port", str(f.port),
            "--password-port", str(f.password_port))
    f.admin("identities", "add", "fleet", "fleet-b", "fleet-2", "--role", "manager", "--out", str(f.bundles))
    f.admin("identities", "add", "alice", "bob", "--role", "operator", "--out", str(f.bundles))
    f.admin("identities", "add", "plc-x", "--role", "controller", "--site", "plant-x", "--out", str(f.bundles))
    f.admin("identities", "add", "plc-x1", "--role", "controller", "--site", "plant-x", "--line", "1",
            "--out", str(f.bundles))
    f.admin("devices", "add", "cam-a", "cam-b", "--site", "plant-a", "--line", "3", "--keys", str(f.keys),
            "--out", str(f.bundles))
    f.admin("devices", "add", "cam-p", "cam-q", "--password", "--site", "plant-x", "--keys", str(f.keys),
            "--out", str(f.bundles))
    return f


@pytest.fixture(scope="module")
def broker(f):
    b = Broker.generated(f.broker_dir / "mosquitto.conf", f.port, f.root / "mosquitto").start()
    # one device enrolled while the broker runs: the plugin learns it live, no restart
    f.admin("devices", "add", "cam-x", "--site", "plant-x", "--line", "1", "--keys", str(f.keys),
            "--out", str(f.bundles))
    yield b
    b.stop()


def serve(f: Fleet, broker: Broker, name: str) -> FleetProcess:
    """`fleet serve` as the enrolled manager ``name``, on the module's store."""
    t = f.tls(name)
    return FleetProcess(f.db, broker, "--keys", str(f.keys), "--identity", name, "--tls-ca", t.ca,
                        "--tls-cert", t.cert, "--tls-key", t.key, "--artifacts", str(f.root / f"artifacts-{name}"),
                        "--failover", "3")


@pytest.fixture(scope="module")
def manager(f, broker):
    proc = serve(f, broker, "fleet")
    proc.wait_for("control subscribed")
    proc.wait_for("ingest subscribed")
    yield proc
    assert proc.stop() == 0, proc.lines[-5:]


@pytest.fixture(scope="module")
def start_standby(f, broker, manager):
    """A second manager on the same store, started by the test that needs it: ingest and job
    inbox at once, the rollouts once it holds the lease."""
    started: list[FleetProcess] = []
    yield lambda: started.append(serve(f, broker, "fleet-b")) or started[0]
    for proc in started:
        assert proc.stop() == 0, proc.lines[-5:]


def device_config(f: Fleet, name: str) -> Path:
    """The device config an installer makes: the bundle's part, merged into the local one."""
    bundle = f.bundle(name)
    cfg = yaml.safe_load((bundle / "edgecam.yaml").read_text())
    cfg["mqtt"]["reconnect"] = {"initial_s": 0.2, "max_s": 1}
    cfg["agent"].update({"state_dir": str(bundle / "store"), "smoke": {"latency_factor": 8},
                         "health": {"window_s": 2, "min_results": 5, "latency_factor": 8, "max_unsure_rate": 1,
                                    "max_unsure_increase": 1, "max_confidence_drop": 1,
                                    "detections_ratio": [0, 1000]},
                         "download": {"chunk_timeout_s": 2, "backoff": {"initial_s": 0.2, "max_s": 1}}})
    cfg |= {"runtime": {"num_threads": 1, "stats_file": str(bundle / "stats.json")},
            "logging": {"format": "json", "stats_interval_s": 1},
            "models": {SLOT: {"path": str(shared_path(TINY)), "manifest": str(manifest_for(TINY))}},
            "cameras": [{"id": "door", "source": {"kind": "video", "path": str(shared_path(VIDEO)), "loop": True},
                         "model": SLOT}],
            "outbox": {"path": str(bundle / "outbox.db"), "ack_timeout_s": 10}}
    path = bundle / "device.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def stats(f: Fleet, name: str) -> dict:
    try:
        return json.loads((f.bundle(name) / "stats.json").read_text())
    except (OSError, ValueError):
        return {}


def acted(f: Fleet, name: str) -> int | None:
    return ModelStore(f.bundle(name) / "store").load().desired_version


@pytest.fixture(scope="module")
def daemons(f, manager):
    runs = {name: EdgeRun(device_config(f, name), name=name) for name in ("cam-a", "cam-b")}
    try:
        wait_until(lambda: all(stats(f, n).get("sync", {}).get("acked_batches", 0) >= 1 or run.proc.poll() is not None
                               for n, run in runs.items()), 60, "both daemons' first batch acked by the manager")
        for run in runs.values():
            assert run.proc.poll() is None, run.text()[-2000:]
        yield runs
    finally:
        for run in runs.values():
            if run.proc.poll() is None:
                run.stop()


@pytest.fixture(scope="module")
def models(f, manager):
    """Both models in the registry, pushed by an operator over TLS."""
    pushed = {}
    with f.client() as client:
        for rel in (TINY, NEXT):
            path = shared_path(rel)
            manifest = load_manifest(manifest_for(rel), model_dir=path.parent).model_dump(mode="json")
            pushed[rel] = push_file(client, path, kind="model", name=manifest["name"], version=manifest["version"],
                                    manifest=manifest)
    return pushed


@pytest.fixture(scope="module")
def rolled_out(f, daemons, models):
    """A rollout of NEXT to both daemons, started and watched with the `fleet` command as
    alice, her bundle's fleet.env being all it is told."""
    n = models[NEXT]
    env = f.env("alice")
    started = subprocess.run([sys.executable, "-m", "fleet", "rollout", "start", f"{n['name']}@{n['version']}",
                              "--slot", SLOT, "--target", "cam-a,cam-b", "--canary", "1", "--waves", "100%",
                              "--health-window", "1s", "--json"], capture_output=True, text=True, env=env,
                             cwd=REPO, timeout=60)
    assert started.returncode == 0, started.stderr
    rid = json.loads(started.stdout)["id"]
    watched = subprocess.run([sys.executable, "-m", "fleet", "rollout", "watch", rid], capture_output=True,
                             text=True, env=env, cwd=REPO, timeout=120)
    assert watched.returncode == 0 and "COMPLETED" in watched.stdout, (watched.stdout, watched.stderr)
    return rid


# --- the rollout --------------------------------------------------------------------------------


def test_two_enrolled_daemons_take_a_rollout_over_tls_through_the_generated_acl(f, daemons, models, rolled_out):
    sha = models[NEXT]["sha256"]
    for name, run in daemons.items():
        wait_until(lambda: ModelStore(f.bundle(name) / "store").load().slots[SLOT].active.sha256 == sha, 20,
                   f"{name} to run the new model")
        assert run.proc.poll() is None
        link = stats(f, name)["sync"]
        assert link["connected"] and link["connects"] == 1 and link["resent"] == 0
    with f.client() as client:
        shown = client.call("devices.show", {"id": "cam-a"})
        assert shown["reported"]["models"][SLOT]["sha256"] == sha
        assert shown["reported"]["keys"], "the device says which keys it pins"
    passwd = (f.broker_dir / "passwd").read_text()
    assert "cam-p:$7$101$" in passwd and f.password("cam-p") not in passwd, "the broker holds only the hash"
    assert all(os.stat(p).st_mode & 0o077 == 0 for p in f.bundle("cam-a").iterdir() if p.suffix in (".key", ".crt"))


# --- device against device ------------------------------------------------------------------------


def test_a_device_cannot_write_another_devices_topics_and_the_store_holds_nothing_of_it(f, daemons, manager):
    x = Raw.device(f, "cam-x")
    try:
        assert x.connack == "Success"
        forged_event = new_id()
        wire = C.event_json(id=forged_event, seq=1, kind="health", device="cam-b", camera="door",
                            captured_at=time.time(), recorded_at=time.time(), priority=0, payload_json="{}")
        forged = {
            T.outbox("cam-b"): C.batch_body("cam-b", new_id(), time.time(), wire),
            T.status("cam-b"): C.encode(C.Status(v=1, device="cam-b", state="offline", at=time.time(),
                                                 runtime="forged")),
            T.reported("cam-b"): C.encode(C.Reported(v=1, device="cam-b", at=time.time(), desired_version=7)),
            T.job("cam-b", "forged"): C.encode(C.JobStatus(v=1, device="cam-b", job="forged", slot=SLOT,
                                                          sha256="ab" * 32, state="failed", at=time.time())),
            T.desired("cam-b"): b"{}",
            T.ack("cam-b"): b"{}",
            T.alert("plant-a", "3", "door"): b"{}",  # another site's alerts
            T.rpc("alice"): b"{}",
        }
        for topic, body in forged.items():
            assert x.pub(topic, body) == "Not authorized", topic
        own = C.event_json(id=new_id(), seq=1, kind="health", device="cam-x", camera="c", captured_at=time.time(),
                           recorded_at=time.time(), priority=0, payload_json="{}")
        assert x.pub(T.outbox("cam-x"), C.batch_body("cam-x", new_id(), time.time(), own)) in DELIVERED
        assert x.pub(T.alert("plant-x", "1", "c"), b"{}") in DELIVERED, "its own site and line"
        with f.client() as client:
            wait_until(lambda: client.call("stats")["batches"] and "cam-x" in {
                d for d in _store_devices(f)}, 10, "the attacker's own batch stored")
    finally:
        x.close()
    from fleet.store import Store
    store = Store.open_readonly(f.db)
    try:
        assert forged_event not in store.event_ids("cam-b")
        (b,) = [d for d in store.devices() if d["id"] == "cam-b"]
        assert b["runtime"] != "forged" and b["state"] == "online"
        assert not store.jobs(device="cam-b", job="forged")
    finally:
        store.close()
    with f.client() as client:
        assert client.call("devices.show", {"id": "cam-b"})["reported"]["desired_version"] != 7


def _store_devices(f: Fleet) -> list[str]:
    from fleet.store import Store
    store = Store.open_readonly(f.db)
    try:
        return [d["id"] for d in store.devices()]
    finally:
        store.close()


def test_a_device_cannot_read_another_devices_topics_nor_join_the_fleets_ingest_group(f, daemons):
    before = stats(f, "cam-b")["sync"]
    x = Raw.device(f, "cam-x")
    try:
        for topic in (T.desired("cam-b"), T.ack("cam-b"), T.artifacts("cam-b"), T.shared_outbox(),
                      f"$share/other/{P}/dev/+/outbox", T.all_status(), f"{P}/#", "#"):
            assert x.sub(topic) == "Not authorized", topic
        assert x.sub(T.desired("cam-x")) == "Granted QoS 1"
        # the real camera's batches all reach the manager and are acked while the attacker is there
        wait_until(lambda: stats(f, "cam-b")["sync"]["acked_batches"] >= before["acked_batches"] + 3, 20,
                   "three more of cam-b's batches acked")
        assert not [m for m in x.messages if "/cam-b/" in m.topic]
    finally:
        x.close()
    after = stats(f, "cam-b")["sync"]
    assert after["resent"] == before["resent"] == 0, "no batch waited for its ack timeout"


def test_a_device_cannot_take_another_devices_client_id(f, daemons):
    before = stats(f, "cam-b")["sync"]
    # a certificate: the broker takes the client id from it, so the intruder is itself
    x = Raw.device(f, "cam-x", client_id="cam-b")
    try:
        assert x.connack == "Success"
        assert x.pub(T.status("cam-b"), b"{}") == "Not authorized", "connected as cam-x, not as cam-b"
    finally:
        x.close()
    # a password: the plugin binds the user to its own client id and refuses any other
    p = Raw(f, client_id="cam-b", username="cam-p", password=f.password("cam-p"), port=f.password_port)
    assert p.refused and p.connack == "Not authorized"
    q = Raw(f, client_id="cam-q", username="cam-q", password=f.password("cam-q"), port=f.password_port)
    try:
        assert q.connack == "Success", "the right client id connects"
        intruder = Raw(f, client_id="cam-q", username="cam-p", password=f.password("cam-p"), port=f.password_port)
        assert intruder.connack == "Not authorized" and not q.disconnects, "cam-q stays connected"
    finally:
        q.close()
    time.sleep(1.5)  # a stats interval: a takeover would show as a reconnect
    after = stats(f, "cam-b")["sync"]
    assert after["connected"] and after["connects"] == before["connects"] and after["disconnects"] == 0


def test_no_one_without_a_valid_credential_connects(f, broker):
    ca = FleetCA.open(f.pki)
    expired_key = new_key()
    now = datetime.datetime.now(datetime.timezone.utc)
    expired = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cam-x")]))
               .issuer_name(ca.cert.subject).public_key(expired_key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=30))
               .not_valid_after(now - datetime.timedelta(days=1)).sign(ca.key, hashes.SHA256()))
    other = FleetCA.open(f.root / "other-ca", create=True)
    foreign_key = new_key()
    creds = f.root / "creds"
    creds.mkdir()
    for name, key, cert in (("expired", expired_key, expired), ("foreign", foreign_key,
                                                                other.issue("cam-x", foreign_key))):
        (creds / f"{name}.key").write_bytes(key_pem(key))
        (creds / f"{name}.crt").write_bytes(cert_pem(cert))
    attempts = {
        "anonymous, password listener": Raw(f, client_id="anon", port=f.password_port),
        "anonymous, certificate listener": Raw(f, client_id="anon"),
        "wrong password": Raw(f, client_id="cam-p", username="cam-p", password="guess", port=f.password_port),
        "unknown user": Raw(f, client_id="eve", username="eve", password="guess", port=f.password_port),
        "expired certificate": Raw(f, client_id="cam-x", cert=str(creds / "expired.crt"),
                                   key=str(creds / "expired.key")),
        "certificate of another CA": Raw(f, client_id="cam-x", cert=str(creds / "foreign.crt"),
                                         key=str(creds / "foreign.key")),
    }
    for what, raw in attempts.items():
        assert raw.refused, what
        raw.close()
    # the device's own link keeps trying and says why, in one line
    link = Link(LinkSettings(host="127.0.0.1", port=f.port, client_id="cam-x", use_tls=True,
                             tls_ca=str(f.pki / "ca.crt"), tls_cert=str(creds / "expired.crt"),
                             tls_key=str(creds / "expired.key"), backoff_initial_s=0.1, backoff_max_s=0.2), _Idle())
    link.start()
    try:
        wait_until(lambda: link.counters.connect_failures >= 2, 10, "two refused attempts")
        assert "expired" in link.counters.last_error and not link.connected
    finally:
        link.stop()


class _Idle:
    def on_connect(self, client, session_present): pass
    def on_message(self, client, message): pass
    def work(self, client): return 0.2
    def on_stop(self, client): return []


def test_a_certificate_that_does_not_verify_is_a_one_line_error_never_a_hang(f, manager):
    other = FleetCA.open(f.root / "other-ca", create=True)
    (f.root / "other-ca.crt").write_bytes(other.pem)
    cases = {
        "the broker's certificate is not from the CA the client trusts":
            (["--tls-ca", str(f.root / "other-ca.crt")], "does not verify"),
        "no client certificate": (["--tls-ca", str(f.pki / "ca.crt")], "wants a client certificate"),
    }
    for what, (flags, expected) in cases.items():
        env = {k: v for k, v in f.env("alice").items() if not k.startswith("FLEET_TLS_")}
        done = subprocess.run([sys.executable, "-m", "fleet", "models", "list", *flags], capture_output=True,
                              text=True, env=env, cwd=REPO, timeout=30)
        assert done.returncode == 1 and done.stderr.startswith("fleet: error: ") and expected in done.stderr, (
            what, done.stderr)
        assert done.stderr.count("\n") == 1, done.stderr


# --- desired states -----------------------------------------------------------------------------------


def test_an_unsigned_forged_or_replayed_desired_state_changes_nothing_and_the_next_real_one_is_acted_on(
        f, daemons, models, rolled_out, manager):
    version = acted(f, "cam-a")
    state = (f.bundle("cam-a") / "store" / "state.json").read_bytes()
    before = stats(f, "cam-a")["agent"]
    t = f.tls("fleet-2")
    thief = Raw(f, client_id="fleet-2", cert=t.cert, key=t.key)  # a manager's credential, not the signing key
    try:
        with f.client() as client:
            genuine = C.Desired.model_validate(client.call("devices.show", {"id": "cam-a"})["desired"])
        other = load_private_key(init_keys(f.root / "thief-keys")[0])
        huge = 10**15
        forged = {
            "unsigned": genuine.model_copy(update={"version": huge}),
            "signed by another key": sign(other, genuine.model_copy(update={"version": huge})),
            "a genuine signature over another version": genuine.model_copy(update={"version": huge,
                                                                                 "signature": sign(load_private_key(
                                                                                     f.keys / "fleet.key"),
                                                                                     genuine).signature}),
        }
        for body in forged.values():
            assert thief.pub(T.desired("cam-a"), C.encode(body), retain=True) in DELIVERED
        # a replay: the genuine, signed state the device acted on (and one for cam-b on cam-a's topic)
        signed = sign(load_private_key(f.keys / "fleet.key"), genuine)
        assert thief.pub(T.desired("cam-a"), C.encode(signed), retain=True) in DELIVERED
        signed_b = sign(load_private_key(f.keys / "fleet.key"), genuine.model_copy(update={"device": "cam-b"}))
        assert thief.pub(T.desired("cam-a"), C.encode(signed_b), retain=True) in DELIVERED
        wait_until(lambda: sum(stats(f, "cam-a")["agent"]["rejected"].values())
                   >= sum(before["rejected"].values()) + 4
                   and stats(f, "cam-a")["agent"]["stale"] > before["stale"], 15, "every forgery counted")
    finally:
        thief.close()
    after = stats(f, "cam-a")["agent"]
    grew = {k: v - before["rejected"].get(k, 0) for k, v in after["rejected"].items() if v != before["rejected"].get(k)}
    assert grew == {"unsigned": 1, "bad_signature": 2, "wrong_device": 1}
    assert acted(f, "cam-a") == version and (f.bundle("cam-a") / "store" / "state.json").read_bytes() == state
    # the real fleet's next state is acted on: cam-a goes back to the model it ran before
    with f.client() as client:
        client.call("rollouts.rollback", {"id": rolled_out, "device": "cam-a"})
    tiny = models[TINY]["sha256"]
    wait_until(lambda: acted(f, "cam-a") > version, 30, "cam-a to act on the fleet's next desired state")
    assert ModelStore(f.bundle("cam-a") / "store").load().slots[SLOT].active.sha256 == tiny


def test_an_artifact_signed_by_an_unpinned_key_is_refused_and_the_old_model_keeps_serving(f, daemons, models,
                                                                                           rolled_out):
    """The fleet's own signed desired state naming an artifact signed by a key the device
    does not pin: one it never had, or one retired from its public_keys."""
    name = "cam-b"
    serving = ModelStore(f.bundle(name) / "store").load().slots[SLOT].active.sha256
    other = load_private_key(init_keys(f.root / "retired-keys")[0])
    tiny = models[TINY]
    art = sign(other, C.Artifact(kind="model", name=tiny["name"], version="retired", sha256=tiny["sha256"],
                                 size=tiny["size"], manifest={}))
    doc = sign(load_private_key(f.keys / "fleet.key"), C.Desired(
        v=1, device=name, version=int(time.time() * 1000), at=time.time(),
        models={SLOT: C.Assignment(artifact=art, job="retired-key")}))
    t = f.tls("fleet-2")
    thief = Raw(f, client_id="fleet-2", cert=t.cert, key=t.key)
    try:
        assert thief.pub(T.desired(name), C.encode(doc)) in DELIVERED
    finally:
        thief.close()
    wait_until(lambda: stats(f, name)["agent"]["jobs"].get("failed", 0) >= 1, 15, "the job refused")
    assert ModelStore(f.bundle(name) / "store").load().slots[SLOT].active.sha256 == serving
    assert "bad_signature" in daemons[name].text() and daemons[name].proc.poll() is None


# --- artifacts --------------------------------------------------------------------------------------


def test_a_device_gets_no_artifact_its_desired_state_does_not_name(f, models, rolled_out, manager):
    sha = models[NEXT]["sha256"]  # assigned to cam-a and cam-b, never to cam-x
    with f.client() as client:
        before = client.call("stats")
    x = Raw.device(f, "cam-x")
    try:
        assert x.sub(T.artifacts("cam-x")) == "Granted QoS 1"
        request = C.ArtifactRequest(v=1, device="cam-x", sha256=sha, offset=0, length=C.MAX_CHUNK_BYTES,
                                    request="q1", response_topic=T.artifact("cam-x", sha))
        assert x.pub(T.artifact_get("cam-x"), C.encode(request)) in DELIVERED
        as_a = request.model_copy(update={"device": "cam-a", "response_topic": T.artifact("cam-a", sha)})
        assert x.pub(T.artifact_get("cam-a"), C.encode(as_a)) == "Not authorized", "it cannot ask as cam-a"
        wait_until(lambda: [m for m in x.messages if m.topic == T.artifact("cam-x", sha)], 10, "the refusal")
        header, data = C.decode_chunk(next(m.payload for m in x.messages if m.topic == T.artifact("cam-x", sha)))
        assert header.error == "not_assigned" and data == b""
    finally:
        x.close()
    with f.client() as client:
        after = client.call("stats")
    assert after["control_rejected"].get("not_assigned", 0) == before["control_rejected"].get("not_assigned", 0) + 1
    assert after["chunk_bytes"] == before["chunk_bytes"], "not a byte of it was sent"


# --- operators and controllers ------------------------------------------------------------------------


def test_an_operator_cannot_act_or_read_as_another_and_a_controller_reads_only_its_alerts(f, manager):
    t = f.tls("bob")
    bob = Raw(f, client_id="bob", cert=t.cert, key=t.key)
    try:
        request = C.encode(C.RpcRequest(v=1, id="x1", op="rollouts.abort", args={"id": "r0001"}))
        assert bob.pub(T.rpc("alice"), request) == "Not authorized"
        assert bob.sub(f"{P}/fleet/reply/alice/#") == "Not authorized"
        assert bob.sub(T.all_rpc()) == "Not authorized"
        assert bob.sub(T.all_status()) == "Not authorized"
    finally:
        bob.close()
    with f.client("bob") as client:
        assert client.call("ping")["identity"] == "bob", "an enrolled operator is one without --operator"
    t = f.tls("plc-x")
    plc = Raw(f, client_id="plc-x", cert=t.cert, key=t.key)
    x = Raw.device(f, "cam-x")
    try:
        assert plc.sub(f"{P}/alerts/plant-x/#") == "Granted QoS 1"
        for topic in (f"{P}/alerts/plant-a/#", f"{P}/alerts/#", T.all_status(), T.outbox("cam-x")):
            assert plc.sub(topic) == "Not authorized", topic
        assert plc.pub(T.alert("plant-x", "1", "c"), b"{}") == "Not authorized", "a controller only reads"
        assert x.pub(T.alert("plant-x", "1", "gate"), b'{"ok": 1}') in DELIVERED
        wait_until(lambda: [m for m in plc.messages if m.topic == T.alert("plant-x", "1", "gate")], 10,
                   "the alert at the controller")
    finally:
        plc.close()
        x.close()


def test_line_commands_and_sparkplug_reach_only_where_each_identity_belongs(f, broker):
    """Under the generated ACL a device is the Sparkplug edge node named by its id in the
    group named by its site; a site's controller is the Sparkplug host of that site; a
    line's controller steers that line only."""
    own, other = T.command("plant-x", "1", "cam-x"), T.command("plant-a", "3", "cam-a")
    mute = C.encode(C.Command(v=1, device="cam-x", camera="door", rule="zone", op="mute", minutes=5))
    x = Raw.device(f, "cam-x")  # plant-x, line 1
    site, line = (Raw(f, client_id=n, cert=f.tls(n).cert, key=f.tls(n).key) for n in ("plc-x", "plc-x1"))
    try:
        for topic in (own, "spBv1.0/plant-x/NCMD/cam-x", "spBv1.0/plant-x/DCMD/cam-x/+", "homeassistant/status"):
            assert x.sub(topic) == "Granted QoS 1", topic  # what its line link subscribes to
        for topic in (other, "spBv1.0/plant-x/NCMD/cam-p", "spBv1.0/plant-x/#", "homeassistant/#"):
            assert x.sub(topic) == "Not authorized", topic
        for topic in ("spBv1.0/plant-x/NBIRTH/cam-x", "spBv1.0/plant-x/DDATA/cam-x/door", f"{own}/result",
                      "homeassistant/device/cam-x/config"):
            assert x.pub(topic, b"{}") in DELIVERED, topic
        for topic in ("spBv1.0/plant-x/NBIRTH/cam-p", "spBv1.0/plant-a/NDATA/cam-x", "spBv1.0/plant-x/NCMD/cam-p",
                      "spBv1.0/STATE/plc-x", own, other, f"{other}/result", "homeassistant/device/cam-a/config"):
            assert x.pub(topic, b"{}") == "Not authorized", topic

        assert site.sub("spBv1.0/plant-x/#") == "Granted QoS 1"
        assert site.sub(f"{own}/result") == "Granted QoS 1"
        for topic in ("spBv1.0/#", "spBv1.0/plant-a/#", f"{other}/result"):
            assert site.sub(topic) == "Not authorized", topic
        assert site.pub(own, mute) in DELIVERED
        wait_until(lambda: any(m.topic == own and m.payload == mute for m in x.messages), 10, "the command at cam-x")
        for topic in ("spBv1.0/plant-x/DCMD/cam-x/door", "spBv1.0/plant-x/NCMD/cam-x", "spBv1.0/STATE/plc-x"):
            assert site.pub(topic, b"{}") in DELIVERED, topic
        for topic in (other, f"{own}/result", "spBv1.0/plant-a/NCMD/cam-a", "spBv1.0/plant-x/NBIRTH/cam-x",
                      "spBv1.0/STATE/plc-x1"):
            assert site.pub(topic, b"{}") == "Not authorized", topic

        assert line.pub(own, mute) in DELIVERED
        for topic in (T.command("plant-x", "2", "cam-y"), "spBv1.0/plant-x/DCMD/cam-x/door", f"{own}/result"):
            assert line.pub(topic, b"{}") == "Not authorized", topic
        assert line.sub(f"{own}/result") == "Granted QoS 1"
        for topic in ("spBv1.0/plant-x/#", T.command_result("plant-x", "2", "cam-y")):
            assert line.sub(topic) == "Not authorized", topic
    finally:
        for client in (x, site, line):
            client.close()


# --- snapshot review ------------------------------------------------------------------------------------


def _as(f: Fleet, name: str) -> Raw:
    t = f.tls(name)
    return Raw(f, client_id=name, cert=t.cert, key=t.key)


def test_only_an_operator_asks_a_device_for_a_snapshot_and_only_under_its_own_name(f, broker):
    ask = C.encode(C.ReviewRequest(v=1, device="cam-a", operator="alice", snapshot=new_id(), request="r1",
                                   reply_topic=T.review_reply("cam-a", "alice", "r1")))
    alice, bob, plc, thief, x = _as(f, "alice"), _as(f, "bob"), _as(f, "plc-x"), _as(f, "fleet-2"), Raw.device(f, "cam-x")
    try:
        assert alice.pub(T.review_get("cam-a", "alice"), ask) in DELIVERED
        assert bob.pub(T.review_get("cam-a", "bob"), ask) in DELIVERED, "bob asks as bob"
        assert bob.pub(T.review_get("cam-a", "alice"), ask) == "Not authorized", "not as alice"
        for who, client in (("a device", x), ("a controller", plc), ("a manager", thief)):
            for asker in ("alice", "cam-x", "plc-x", "fleet-2"):
                assert client.pub(T.review_get("cam-a", asker), ask) == "Not authorized", (who, asker)
        # nobody but the device reads what is asked of it
        for client in (bob, plc, thief, x):
            assert client.sub(T.review_gets("cam-a")) == "Not authorized"
        assert x.sub(T.review_gets("cam-x")) == "Granted QoS 1"
    finally:
        for client in (alice, bob, plc, thief, x):
            client.close()


def test_only_the_addressed_device_answers_and_only_the_asking_operator_reads_the_answer(f, broker):
    bob, plc, thief, x = _as(f, "bob"), _as(f, "plc-x"), _as(f, "fleet-2"), Raw.device(f, "cam-x")
    try:
        chunk = C.encode_chunk(C.ReviewChunk(v=1, device="cam-a", snapshot=new_id(), request="r1",
                                                    sha256="ab" * 32, total=3), b"\xff\xd8\xff")
        assert x.pub(T.review_reply("cam-a", "alice", "r1"), chunk) == "Not authorized", "an answer as cam-a"
        assert x.pub(T.review_reply("cam-x", "alice", "r1"), chunk) in DELIVERED, "its own answers only"
        for client in (bob, plc):
            assert client.pub(T.review_reply("cam-a", "alice", "r1"), chunk) == "Not authorized"
        for topic in (T.review_replies("alice"), T.review_reply("cam-a", "alice", "r1"), f"{P}/dev/+/review/reply/#",
                      f"{P}/dev/cam-a/review/#"):
            for client in (bob, plc, thief, x):
                assert client.sub(topic) == "Not authorized", topic
        assert bob.sub(T.review_replies("bob")) == "Granted QoS 1"
    finally:
        for client in (bob, plc, thief, x):
            client.close()


def test_a_fetch_goes_to_the_daemon_and_its_refusal_back_to_the_asker_alone_through_the_generated_acl(f, daemons):
    """cam-a runs with privacy.snapshot_export off (the default): alice's fetch reaches it
    and its answer reaches her, while bob, listening to all he may, hears nothing of it."""
    bob = _as(f, "bob")
    try:
        assert bob.sub(T.review_replies("bob")) == "Granted QoS 1"
        with f.client("alice") as client, pytest.raises(OpError, match="privacy.snapshot_export is off") as exc:
            client.fetch_snapshot("cam-a", new_id(), timeout=15)
        assert exc.value.code == "export_off"
        wait_until(lambda: stats(f, "cam-a")["sync"].get("review", {}).get("refused", {}).get("export_off"), 10,
                   "the refusal counted on cam-a")
        time.sleep(0.5)
        assert not [m for m in bob.messages if "/review/" in m.topic]
    finally:
        bob.close()


# --- several managers ---------------------------------------------------------------------------------


def test_a_second_manager_announces_its_ingest_takes_the_lease_and_no_one_else_can_use_its_client_ids(
        f, daemons, manager, start_standby):
    """Only a manager may say its ingest is online (else any client could make every device
    send its window again), every device hears it, and the client ids of each of a
    manager's links (NAME, NAME~jobs, NAME~ingest) are its alone."""
    x = Raw.device(f, "cam-x")
    try:
        assert x.sub(T.ingest_online()) == "Granted QoS 1", "every device hears the managers"
        heard = {n: stats(f, n)["sync"]["ingest_online"] for n in daemons}
        standby = start_standby()
        standby.wait_for("ingest subscribed")
        standby.wait_for("jobs subscribed")
        wait_until(lambda: all(stats(f, n)["sync"]["ingest_online"] > heard[n] for n in daemons), 15,
                   "both daemons to hear the second manager's ingest")
        said = wait_until(lambda: [m for m in x.messages if m.topic == T.ingest_online()], 10, "cam-x to hear it")
        assert [C.decode_ingest_online(m.payload).manager for m in said] == ["fleet-b~ingest"]
        forged = C.encode(C.IngestOnline(v=1, manager="fleet", at=time.time()))
        assert x.pub(T.ingest_online(), forged) == "Not authorized", "a device cannot make the fleet re-send"
        t = f.tls("bob")
        bob = Raw(f, client_id="bob", cert=t.cert, key=t.key)
        try:
            assert bob.pub(T.ingest_online(), forged) == "Not authorized", "nor can an operator"
        finally:
            bob.close()
        # another identity on a manager's link: a certificate names its own client id, and
        # a password is bound to its own
        assert x.sub(T.all_jobs()) == "Not authorized" and x.sub(T.shared_outbox()) == "Not authorized"
        for link in ("fleet-b", "fleet-b~jobs", "fleet-b~ingest"):
            p = Raw(f, client_id=link, username="cam-p", password=f.password("cam-p"), port=f.password_port)
            assert p.refused and p.connack == "Not authorized", link
            p.close()
    finally:
        x.close()
    assert [line.get("msg") for line in standby.lines].count("jobs subscribed") == 1, "its links were never taken over"
    assert not any(line.get("msg") == "lease acquired" for line in standby.lines), "one leader at a time"
    # the leader stops: the second manager takes the lease and runs the control link as itself
    acked = {n: stats(f, n)["sync"]["acked_batches"] for n in daemons}
    assert manager.stop() == 0
    standby.wait_for("lease acquired", timeout=15)
    standby.wait_for("control subscribed")
    with f.client() as client:
        assert client.call("stats")["pid"] == standby.proc.pid
        assert client.call("devices.show", {"id": "cam-a"})["reported"]["keys"]
    wait_until(lambda: all(stats(f, n)["sync"]["acked_batches"] > acked[n] for n in daemons), 20,
               "both daemons' batches acked by the second manager")


# --- revocation (last: it takes cam-b away) ------------------------------------------------------------


def test_a_revoked_device_is_refused_keeps_running_offline_and_says_why_and_its_data_stays(f, daemons, manager,
                                                                                           models):
    run = daemons["cam-b"]
    from fleet.store import Store
    store = Store.open_readonly(f.db)
    try:
        stored = store.count_events("cam-b")
    finally:
        store.close()
    assert stored > 0
    f.admin("devices", "revoke", "cam-b")
    wait_until(lambda: not stats(f, "cam-b").get("sync", {}).get("connected", True), 15, "cam-b disconnected")
    wait_until(lambda: any("refused the client certificate" in (line.get("error") or "")
                           for line in run.logged("mqtt connect failed")), 20, "the daemon saying why")
    assert run.proc.poll() is None, "it runs on offline"
    again = Raw.device(f, "cam-b")
    assert again.refused
    again.close()
    store = Store.open_readonly(f.db)
    try:
        assert store.count_events("cam-b") >= stored, "what it stored stays"
        (row,) = [i for i in store.identities("device") if i.name == "cam-b"]
        assert row.state == "revoked"
    finally:
        store.close()
    listed = subprocess.run([sys.executable, "-m", "fleet", "devices", "list", "--db", str(f.db), "--json"],
                            capture_output=True, text=True, cwd=REPO, timeout=30)
    enrolment = {d["id"]: d["enrolment"] for d in json.loads(listed.stdout)}
    assert (enrolment["cam-a"], enrolment["cam-b"]) == ("enrolled", "revoked")
    with f.client() as client, pytest.raises(OpError, match="revoked devices cannot take a rollout"):
        client.call("rollouts.start", {"kind": "model", "name": models[TINY]["name"], "version": models[TINY]["version"],
                                       "slot": SLOT, "target": {"ids": ["cam-a", "cam-b"]}})
