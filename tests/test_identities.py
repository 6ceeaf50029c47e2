"""Enrolment, the CA, the broker's rights and the signing keyring, without a broker
(tests/test_security.py tries every rule against a real one)."""

from __future__ import annotations

import json
import os
import stat
import time

import pytest
from cryptography import x509

from edge.core import contract as C
from edge.core.errors import UsageError
from edge.core.signing import init_keys
from fleet.brokerconf import Plan, rights
from fleet.bundles import read_credentials, write_bundle
from fleet.ca import FleetCA
from fleet.identities import connections, enrol, password_hash, revoke, revoked_serials
from fleet.keyring import Keyring
from fleet.store import Store

T = C.Topics()


@pytest.fixture
def store(tmp_path):
    s = Store.open(tmp_path / "fleet.db")
    yield s
    s.close()


@pytest.fixture
def ca(tmp_path):
    return FleetCA.open(tmp_path / "pki", create=True)


def test_the_ca_key_is_private_never_overwritten_and_refused_when_others_can_read_it(tmp_path, ca):
    assert stat.S_IMODE(os.stat(tmp_path / "pki" / "ca.key").st_mode) == 0o600
    again = FleetCA.open(tmp_path / "pki", create=True)
    assert again.cert == ca.cert, "opened, not made again"
    os.chmod(tmp_path / "pki" / "ca.key", 0o640)
    with pytest.raises(Exception, match="chmod 600"):
        FleetCA.open(tmp_path / "pki")


def test_a_device_gets_one_certificate_per_connection_named_for_it_on_one_key(store, ca):
    issued = enrol(store, ca, "cam-1", "device", site="plant-a", line="3", now=time.time())
    assert list(issued.certs) == ["cam-1", "cam-1~agent", "cam-1~alerts"] == connections(issued.identity)
    for name, cert in issued.certs.items():
        assert cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value == name
        assert cert.public_key() == issued.key.public_key()
        cert.verify_directly_issued_by(ca.cert)
    assert issued.identity.password_hash is None and len(issued.identity.serials) == 3


def test_a_password_is_kept_only_as_the_hash_mosquitto_passwd_writes(store, ca):
    issued = enrol(store, ca, "cam-2", "device", password=True, now=time.time())
    h = issued.identity.password_hash
    kind, iterations, salt, digest = h.split("$")[1:]
    assert (kind, iterations) == ("7", "101") and issued.password not in h
    assert password_hash(issued.password, salt=__import__("base64").b64decode(salt)) == h
    assert not issued.certs and issued.key is None


def test_names_roles_and_places_are_checked_and_an_enrolled_name_is_not_enrolled_twice(store, ca):
    now = time.time()
    for name, role, kw in (("bad name", "device", {}), ("cam-1", "root", {}), ("plc", "controller", {}),
                           ("plc", "controller", {"line": "3"}), ("cam-1", "device", {"site": "a/b"})):
        with pytest.raises(UsageError):
            enrol(store, ca, name, role, now=now, **kw)
    store.put_identities([enrol(store, ca, "cam-1", "device", now=now).identity])
    with pytest.raises(UsageError, match="enrolled already"):
        enrol(store, ca, "cam-1", "device", now=now)
    revoked = revoke(store, "cam-1", now=now + 1)
    again = enrol(store, ca, "cam-1", "device", now=now + 2)  # a replaced camera, same name
    assert again.identity.retired_serials == revoked.serials, "the old certificates stay revoked"
    store.put_identities([again.identity])
    assert {s for s, _ in revoked_serials(store.identities())} == set(revoked.serials)


def test_each_crl_is_dated_after_the_last_so_the_broker_takes_the_newest(ca):
    first = x509.load_pem_x509_crl(ca.write_crl([]).read_bytes())
    second = x509.load_pem_x509_crl(ca.write_crl([("abc", time.time())]).read_bytes())
    assert second.last_update_utc > first.last_update_utc
    assert second.next_update_utc == ca.cert.not_valid_after_utc, "never expires before the CA"
    assert second.get_revoked_certificate_by_serial_number(0xABC) is not None


def test_rights_are_exactly_what_each_role_needs(store, ca):
    now = time.time()
    dev = enrol(store, ca, "cam-1", "device", site="plant-a", line="3", now=now).identity
    mgr = enrol(store, ca, "fleet", "manager", now=now).identity
    op = enrol(store, ca, "alice", "operator", now=now).identity
    plc = enrol(store, ca, "plc", "controller", site="plant-a", line="3", now=now).identity

    def acl(identity, kind):
        return sorted(a["topic"] for a in rights(identity, T) if a["acltype"] == kind)

    p = T.prefix
    node = "spBv1.0/plant-a/{}/cam-1"
    assert acl(dev, "publishClientSend") == sorted([
        f"{p}/dev/cam-1/status", f"{p}/dev/cam-1/outbox", f"{p}/dev/cam-1/reported", f"{p}/dev/cam-1/job/+",
        f"{p}/dev/cam-1/artifact/get", f"{p}/alerts/plant-a/3/#", f"{p}/commands/plant-a/3/cam-1/result",
        f"{p}/dev/cam-1/review/reply/+/+", *(node.format(v) for v in ("NBIRTH", "NDATA", "NDEATH")),
        *(node.format(v) + "/+" for v in ("DBIRTH", "DDATA", "DDEATH")), "homeassistant/device/cam-1/config"])
    assert acl(dev, "subscribePattern") == acl(dev, "publishClientReceive") == sorted(
        [f"{p}/dev/cam-1/desired", f"{p}/dev/cam-1/ack", f"{p}/dev/cam-1/artifact/+", T.review_gets("cam-1"),
         T.ingest_online(),
         f"{p}/commands/plant-a/3/cam-1", node.format("NCMD"), node.format("DCMD") + "/+", "homeassistant/status"])
    assert acl(dev, "subscribeLiteral") == []
    assert T.shared_outbox() in acl(mgr, "subscribeLiteral") and T.all_jobs() in acl(mgr, "subscribeLiteral")
    assert T.ingest_online() in acl(mgr, "publishClientSend"), "only a manager announces its ingest"
    assert connections(mgr) == ["fleet", "fleet~jobs", "fleet~ingest"], "one client id per link of a manager"
    assert acl(op, "publishClientSend") == sorted([T.rpc("alice"), f"{p}/dev/+/review/get/alice"])
    assert acl(op, "subscribePattern") == sorted([f"{p}/fleet/reply/alice/#", T.review_replies("alice")])
    assert not [a for a in rights(mgr, T) if "/review/" in a["topic"]], "a manager may neither ask nor read a fetch"
    assert acl(plc, "publishClientSend") == sorted([f"{p}/commands/plant-a/3/+", "homeassistant/status"])
    assert acl(plc, "subscribePattern") == sorted([f"{p}/alerts/plant-a/3/#", f"{p}/commands/plant-a/3/+/result",
                                                   "homeassistant/device/+/config"]), "a line's: no Sparkplug"


def test_the_plan_turns_what_the_broker_holds_into_the_registry_with_the_fewest_commands(store, ca):
    now = time.time()
    rows = [enrol(store, ca, n, "device", now=now).identity for n in ("cam-1", "cam-2")]
    plan = Plan.of(rows, T)
    assert set(plan.clients) == {"cam-1", "cam-1~agent", "cam-1~alerts", "cam-2", "cam-2~agent", "cam-2~alerts"}
    assert all(c["clientid"] == u for u, c in plan.clients.items()), "every user bound to its own client id"
    assert [c["command"] for c in plan.commands(plan.roles, plan.clients)] == ["setDefaultACLAccess"]
    held_roles = {**plan.roles, "device/gone": [], "device/cam-2": []}
    held_clients = {k: v for k, v in plan.clients.items() if k != "cam-1~alerts"} | {"gone": {"roles": []}}
    commands = [(c["command"], c.get("username") or c.get("rolename")) for c in plan.commands(held_roles, held_clients)]
    assert commands == [("setDefaultACLAccess", None), ("modifyRole", "device/cam-2"), ("deleteClient", "gone"),
                        ("createClient", "cam-1~alerts"), ("deleteRole", "device/gone")]
    revoked = rows[1].model_copy(update={"state": "revoked"})
    assert "cam-2" not in Plan.of([rows[0], revoked], T).clients, "a revoked identity has no client"
    assert json.loads(json.dumps(plan.dynsec()))["defaultACLAccess"]["subscribe"] is False


def test_a_bundle_is_written_once_mode_600_and_reads_back(tmp_path, store, ca):
    init_keys(tmp_path / "keys")
    issued = enrol(store, ca, "cam-1", "device", site="plant-a", line="3", now=time.time())
    where = write_bundle(tmp_path / "bundles", issued, host="broker", port=8883, ca_pem=ca.pem,
                         keys=Keyring(tmp_path / "keys").pinned())
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in where.iterdir())
    cred = read_credentials(where)
    assert cred.username == "cam-1" and cred.cert_file == str(where / "cam-1.crt") and cred.password is None
    assert sorted(p.name for p in where.iterdir()) == ["ca.crt", "cam-1.crt", "cam-1.key", "cam-1~agent.crt",
                                                       "cam-1~alerts.crt", "edgecam.yaml", "fleet.pub"]
    with pytest.raises(UsageError, match="written once"):
        write_bundle(tmp_path / "bundles", issued, host="broker", port=8883, ca_pem=ca.pem, keys=[])


def test_the_keyring_rotates_in_three_steps_and_never_skips_one(tmp_path):
    init_keys(tmp_path)
    ring = Keyring(tmp_path)
    assert [(k.name, k.state) for k in ring.keys] == [("fleet", "active")]
    with pytest.raises(UsageError, match="no next key"):
        ring.switch()
    new = ring.rotate()
    with pytest.raises(UsageError, match="exists already"):
        ring.rotate()
    assert ring.active.name == "fleet" and [k.name for k in ring.pinned()] == ["fleet", "fleet-2"]
    with pytest.raises(UsageError, match="only the previous"):
        ring.retire("fleet")
    ring.switch()
    assert ring.active.name == new.name and ring.get("fleet").state == "previous" and ring.previous()
    ring.rotate()  # the next one may be made already: devices pin at most three
    with pytest.raises(UsageError, match="retire fleet first"):
        ring.switch()
    ring.retire("fleet")
    assert not (tmp_path / "fleet.key").exists()
    assert [k.name for k in Keyring(tmp_path).pinned()] == ["fleet-2", "fleet-3"]
    assert Keyring(tmp_path).signing_key().public_key() == new.public
