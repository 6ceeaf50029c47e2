"""The fleet store on both engines: migrations (a store made by the SQLite-only code
upgrades in place), `fleet db upgrade|current|copy`, and what it refuses at start."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from broker import REPO
from conftest import both_engines, db_rows

from edge.core.contract import OutboxBatch, Status, WireEvent
from edge.core.ids import new_id
from fleet.cli import main as fleet_main
from fleet.store import IdentityRow, SchemaTooNew, Store, StoreError
from fleet.store import schema as S
from fleet.store.engine import head
from fleet.store.lease import Lease

SCHEMA_2 = Path(__file__).parent / "data" / "fleet-store-schema2.sql"


def fleet(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fleet", *args], capture_output=True, text=True, timeout=60, cwd=REPO)


def old_store(path: Path) -> Path:
    """A fleet.db exactly as the SQLite-only store (schema version 2) left it."""
    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA_2.read_text())
    conn.close()
    return path


def some_events(store: Store, device: str, n: int) -> list[str]:
    now = time.time()
    events = [WireEvent(id=new_id(), seq=i + 1, kind="health", device=device, captured_at=now, recorded_at=now,
                        priority=1, payload={"i": i}) for i in range(n)]
    store.add_batch(OutboxBatch(v=1, device=device, batch=new_id(), sent_at=now, events=events), now)
    return [e.id for e in events]


def test_a_store_made_by_the_sqlite_only_code_upgrades_in_place_and_keeps_every_row(tmp_path):
    db = old_store(tmp_path / "fleet.db")
    before = {t: db_rows(str(db), f"SELECT count(*) FROM {t}")[0][0]
              for t in ("events", "devices", "artifacts", "desired", "reported", "rollouts", "executions", "jobs")}
    current = fleet("db", "current", "--db", str(db))
    assert current.returncode == 0 and "schema 0002 (older than this code's" in current.stdout, current.stderr
    up = fleet("db", "upgrade", "--db", str(db))
    assert up.returncode == 0 and up.stdout.strip() == f"{db}: schema 0002 -> {head()}", up.stdout + up.stderr
    assert fleet("db", "upgrade", "--db", str(db)).stdout.strip() == f"{db}: schema {head()}, up to date"
    after = {t: db_rows(str(db), f"SELECT count(*) FROM {t}")[0][0] for t in before}
    assert after == before
    store = Store.open(db)
    try:
        from fleet.rollouts import Execution, Rollout
        (rollout,) = store.load("rollouts", Rollout.from_row)
        assert rollout.state == "running" and len(store.load("executions", Execution.from_row)) == 2
        assert [j["state"] for j in store.jobs()] == ["downloading", "active"]
        assert store.pending_jobs() == [], "what the old manager stored, it had judged"
        ids = some_events(store, "cam-1", 3)
        assert store.count_events() == 13 and store.events_after(0, limit=100)[0][-1]["id"] == ids[-1]
        assert store.stats() == {"skipped": {}, "refused": {}}
    finally:
        store.close()


@both_engines
def test_a_schema_newer_than_the_code_is_refused_naming_both_versions(fleet_db, tmp_path):
    Store.open(fleet_db).close()
    engine = sa.create_engine(fleet_db.replace("postgresql://", "postgresql+psycopg://")
                              if "://" in fleet_db else f"sqlite:///{fleet_db}")
    with engine.begin() as c:
        c.execute(sa.text("UPDATE alembic_version SET version_num = '0042'"))
    engine.dispose()
    with pytest.raises(SchemaTooNew) as err:
        Store.open(fleet_db)
    assert "version 0042" in str(err.value) and f"newest is {head()}" in str(err.value)
    out = fleet("serve", "--db", fleet_db, "--broker", "127.0.0.1:1")
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "0042" in out.stderr and head() in out.stderr
    old = tmp_path / "future.db"
    sqlite3.connect(old).execute("PRAGMA user_version = 3").connection.close()
    with pytest.raises(SchemaTooNew) as legacy:
        Store.open(old)
    assert "user_version 3" in str(legacy.value)


def test_a_wrong_or_unreachable_database_is_one_line_and_exit_1(tmp_path, postgres, capsys):
    cases = {
        f"postgresql://postgres@127.0.0.1:{postgres.port}/nosuchdb": 'database "nosuchdb" does not exist',
        "postgresql://postgres@127.0.0.1:1/fleet": "Connection refused",
        "mysql://fleet@db/fleet": "the fleet store is SQLite",
        str(tmp_path / "a-file" / "fleet.db"): "cannot open the fleet store",
    }
    (tmp_path / "a-file").write_text("not a directory")
    for url, why in cases.items():
        assert fleet_main(["db", "upgrade", "--db", url]) == 1, url
        err = capsys.readouterr().err
        assert err.startswith("fleet: error: ") and err.count("\n") == 1 and why in err, err
    out = fleet("serve", "--db", f"postgresql://fleet:hunter2@127.0.0.1:{postgres.port}/nosuchdb")
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "does not exist" in out.stderr, out.stderr
    assert "hunter2" not in out.stderr and "***" in out.stderr


def test_copy_moves_a_sites_store_to_postgresql_without_losing_an_event(tmp_path, postgres):
    db = old_store(tmp_path / "fleet.db")
    store = Store.open(db)
    sent = {d: some_events(store, d, 700) for d in ("cam-1", "cam-2", "cam-3")}  # more than one chunk
    store.set_status(Status(v=1, device="cam-3", state="online", at=time.time(), site="plant-b"), time.time())
    store.put_identities([_identity("cam-1", serials=["0a1b"])])
    store.close()
    artifacts = tmp_path / "fleet.db.artifacts"
    artifacts.mkdir()
    blob = b"model bytes"
    (artifacts / "9cb7487000bc86ac36ce83c4acfabe8878552be99572a6770f65ab1d048a5c48").write_bytes(blob)
    url = postgres.new_database()
    out = fleet("db", "copy", "--from", str(db), "--to", url)
    assert out.returncode == 0, out.stderr
    assert "events: 2110 in the source, 2110 in the target" in out.stdout
    target = Store.open(url)
    try:
        assert sorted(target.event_ids()) == sorted(Store.open_readonly(db).event_ids())
        for device, ids in sent.items():
            tail, _ = target.events_after(0, device=device, limit=1000)
            assert [e["id"] for e in tail][-700:] == ids, "in the order they arrived"
        assert {d["id"]: d["events"] for d in target.devices()} == {"cam-1": 705, "cam-2": 705, "cam-3": 700}
        assert target.find_artifact("model", "yolov8n", "8.1.42-b") is not None
        assert target.blob("9cb7487000bc86ac36ce83c4acfabe8878552be99572a6770f65ab1d048a5c48") == blob
        assert target.identity("cam-1") == _identity("cam-1", serials=["0a1b"]), "enrolments move with the store"
    finally:
        target.close()
    again = fleet("db", "copy", "--from", str(db), "--to", url)  # run again: nothing twice
    assert again.returncode == 0 and "2110 in the target" in again.stdout
    current = json.loads(fleet("db", "current", "--db", url, "--json").stdout)
    assert current["schema"] == head() and current["up_to_date"] and current["leader"] is None


def _identity(name: str, **kw) -> IdentityRow:
    return IdentityRow(**{"name": name, "role": "device", "site": "plant-a", "line": "3", "tags": {"cell": "weld"},
                          "credential": "certificate", "serials": [], "password_hash": None, "not_after": None,
                          "state": "enrolled", "created_at": 1000.0, "revoked_at": None, **kw})


@both_engines
def test_identities_are_kept_revoked_and_listed_with_the_devices_on_either_engine(fleet_db):
    store = Store.open(fleet_db)
    try:
        some_events(store, "cam-1", 1)  # seen and enrolled
        store.put_identities([_identity("cam-1", serials=["01", "02"]), _identity("cam-2"),
                              _identity("alice", role="operator", site=None, line=None, tags={},
                                        credential="password", password_hash="$7$101$c2FsdA==$aGFzaA==")])
        store.put_identities([_identity("cam-2", state="revoked", revoked_at=2000.0, retired_serials=["ff"])])
        assert [i.name for i in store.identities()] == ["alice", "cam-1", "cam-2"]
        assert [i.name for i in store.identities("device")] == ["cam-1", "cam-2"]
        assert store.identity("cam-2").state == "revoked" and store.identity("cam-2").retired_serials == ["ff"]
        assert store.identity("cam-1").serials == ["01", "02"] and store.identity("nobody") is None
        listed = {d["id"]: (d["enrolment"], d["events"]) for d in store.devices()}
        assert listed == {"cam-1": ("enrolled", 1), "cam-2": ("revoked", 0)}, "enrolled but never seen is listed"
    finally:
        store.close()
    reader = Store.open_readonly(fleet_db)
    try:
        assert reader.identity("alice").password_hash == "$7$101$c2FsdA==$aGFzaA=="
    finally:
        reader.close()


def test_a_store_read_before_its_identities_migration_has_no_identities(tmp_path):
    db = old_store(tmp_path / "fleet.db")  # schema 0002, opened read-only: not migrated
    reader = Store.open_readonly(db)
    try:
        assert reader.identities() == [] and reader.identity("cam-1") is None
    finally:
        reader.close()


@both_engines
def test_one_lease_holder_at_a_time_and_a_fenced_commit_after_a_takeover(fleet_db):
    from fleet.store import Fence, LeaseLost

    store = Store.open(fleet_db)
    try:
        a, b = Lease(store, "a", duration_s=0.5), Lease(store, "b", duration_s=0.5)
        fence_a = a.acquire()
        assert fence_a is not None and b.acquire() is None
        assert a.renew(fence_a)
        time.sleep(0.6)  # a lease is a span of time: a paused holder lets it run out
        fence_b = b.acquire()
        assert fence_b is not None and fence_b.epoch == fence_a.epoch + 1
        assert not a.renew(fence_a), "the old holder learns it lost the lease"
        with pytest.raises(LeaseLost):
            store.commit({"rollouts": []}, {"rollouts": dict}, judged=[1], fence=fence_a)
        store.commit({}, {}, judged=[], answers=[{"identity": "op", "id": "x", "response": "{}", "at": 1.0}],
                     fence=fence_b)
        assert store.answer("op", "x") == "{}"
        b.release(fence_b)
        assert a.acquire() == Fence("control", "a", fence_b.epoch + 1), "released: free at once"
    finally:
        store.close()


def test_readers_refuse_what_is_not_a_fleet_store(tmp_path, postgres):
    with pytest.raises(StoreError, match="no schema"):
        Store.open_readonly(postgres.new_database())


def test_device_states_of_some_ids_reads_those_only_in_slices(tmp_path):
    store = Store.open(tmp_path / "fleet.db")
    try:
        ids = [f"cam-{i:05d}" for i in range(2500)]
        now = time.time()
        with store.engine.begin() as c:  # one transaction: set_status would commit (and sync) 2,500 times
            c.execute(sa.insert(S.devices), [{"id": d, "state": "online" if i % 2 else "offline", "site": "plant-a",
                                              "line": "1", "first_seen": now, "last_seen": now, "state_since": now}
                                             for i, d in enumerate(ids)])
        wanted = ids[::2][:1200] + ids[1::2][:300] + ["cam-unknown"]  # more ids than one slice holds
        states = store.device_states(wanted)
        assert sorted(states) == sorted(wanted[:-1])
        assert sum(s["state"] == "online" for s in states.values()) == 300
        assert len(store.device_states()) == 2500
    finally:
        store.close()
