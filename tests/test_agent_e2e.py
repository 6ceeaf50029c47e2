"""Model updates on a running `edge run`: real Mosquitto, real models, a contract peer as the fleet."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import conftest
import pytest
import yaml
from broker import wait_until
from conftest import REPO, manifest_for, shared_path
from fleet_peer import FleetPeer

from edge.core.contract import Artifact, Assignment
from edge.core.signing import init_keys, load_private_key, sign
from edge.inference.manifest import load_manifest
from edge.updates.modelstore import ModelStore

# the swap's gates (smoke test, health window) judge -b's latency on what the cores give
pytestmark = pytest.mark.alone

YOLO_A = "models/yolov8n_full_integer_quant-a.tflite"
YOLO_B = "models/yolov8n_full_integer_quant-b.tflite"
TINY = "models/mobilenet_v1_0.25_128_quant.tflite"
VIDEO = "media/pedestrians-360p10.avi"
DEVICE = "cam-agent"


@pytest.fixture
def keys(tmp_path):
    private, public = init_keys(tmp_path / "keys")
    return load_private_key(private), public


def artifact(model: str, key=None, *, manifest: dict | None = None, data: bytes | None = None) -> tuple[Artifact, bytes]:
    """A model from ../shared as the fleet would offer it, signed with ``key`` (None: unsigned)."""
    path = shared_path(model)
    data = data if data is not None else path.read_bytes()
    doc = manifest or load_manifest(manifest_for(model), model_dir=path.parent).model_dump()
    art = Artifact(kind="model", name=doc["name"], version=doc["version"], sha256=hashlib.sha256(data).hexdigest(),
                   size=len(data), manifest=doc)
    return (sign(key, art) if key is not None else art), data


def policy_artifact(key, text: str, version: str) -> tuple[Artifact, bytes]:
    data = text.encode()
    art = Artifact(kind="policy", name="line3", version=version, sha256=hashlib.sha256(data).hexdigest(),
                   size=len(data))
    return sign(key, art), data


def write_config(tmp_path: Path, broker, public_key: Path, *, cameras: list[dict] | None = None,
                 models: dict[str, str] | None = None, **agent) -> Path:
    video = str(shared_path(VIDEO))
    models = models or {"det": YOLO_A}
    cfg = {
        "device": {"id": DEVICE},
        "runtime": {"num_threads": 2, "stats_file": str(tmp_path / "stats.json")},
        "logging": {"format": "json", "stats_interval_s": 1},
        "models": {slot: {"path": str(shared_path(m)), "manifest": str(manifest_for(m))} for slot, m in models.items()},
        "cameras": cameras or [{"id": "door", "source": {"kind": "video", "path": video, "loop": True}, "model": "det"}],
        "mqtt": {"host": broker.host, "port": broker.port, "reconnect": {"initial_s": 0.2, "max_s": 1}},
        "outbox": {"path": str(tmp_path / "outbox.db")},
        # latency limits with room for a shared, busy test machine; the latency checks
        # themselves are tested on their own (test_agent_parts)
        "agent": {"public_key": str(public_key), "state_dir": str(tmp_path / "store"),
                  "smoke": {"latency_factor": 4},
                  "health": {"window_s": 3, "min_results": 10, "latency_factor": 4},
                  "download": {"chunk_timeout_s": 2, "backoff": {"initial_s": 0.2, "max_s": 1}}, **agent},
    }
    path = tmp_path / "cam.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class EdgeRun(conftest.EdgeRun):
    """`edge run` with its results in a file."""

    def __init__(self, config: Path, tmp_path: Path, name: str = "edge") -> None:
        self.results = tmp_path / f"{name}.results.jsonl"
        super().__init__(config, "--results", str(self.results), name=name)

    def rows(self) -> list[dict]:
        if not self.results.exists():
            return []
        return [json.loads(line) for line in self.results.read_text().splitlines() if line.endswith("}")]

    def models_seen(self) -> list[str]:
        return [r["model"] for r in self.rows()]


@pytest.fixture
def runs():
    started: list[EdgeRun] = []
    yield started
    for run in started:
        if run.proc.poll() is None:
            run.kill()


def agent_stats(tmp_path: Path) -> dict:
    """The agent's counters in the daemon's stats file ({} before the first one)."""
    try:
        return json.loads((tmp_path / "stats.json").read_text()).get("agent", {})
    except (OSError, ValueError):
        return {}


def serving(run: EdgeRun, model: str, n: int = 5, timeout: float = 60) -> None:
    wait_until(lambda: run.models_seen()[-n:] == [model] * n or run.proc.poll() is not None, timeout,
               f"{model} to serve")
    assert run.proc.poll() is None, run.log.read_text()[-2000:]


def final(peer: FleetPeer, job: str, timeout: float = 60):
    return wait_until(lambda: peer.final(job), timeout, f"job {job} to end")


def states(peer: FleetPeer, job: str) -> list[str]:
    return [s.state for s in peer.job(job)]


def test_yolov8n_a_to_b_on_a_running_edge_run_without_a_frame_gap(tmp_path, broker, keys, runs):
    key, public = keys
    config = write_config(tmp_path, broker, public)
    peer = FleetPeer(broker.host, broker.port, DEVICE, key)
    try:
        run = EdgeRun(config, tmp_path)
        runs.append(run)
        serving(run, "yolov8n@8.1.42-a")
        wait_until(lambda: peer.last_reported(), 20, "the device's reported state")
        art_b, data_b = artifact(YOLO_B, key)
        peer.blobs[art_b.sha256] = data_b
        peer.desire({"det": Assignment(artifact=art_b, job="roll-b")})
        done = final(peer, "roll-b")
        assert done.state == "committed", (done, states(peer, "roll-b"))
        seen = states(peer, "roll-b")
        assert seen[0] == "downloading" and seen[-4:] == ["verifying", "testing", "active", "committed"], seen
        serving(run, "yolov8n@8.1.42-b")

        # frames kept flowing through the swap: the wait between the last result of -a
        # and the first of -b is no longer than a usual frame interval plus one budget
        rows = run.rows()
        first_b = next(i for i, r in enumerate(rows) if r["model"].endswith("-b"))
        done_at = [r["captured_at"] + r["age_ms"] / 1e3 for r in rows]
        intervals = sorted(b - a for a, b in zip(done_at[:first_b - 1], done_at[1:first_b]))
        usual = intervals[len(intervals) // 2]
        gap = done_at[first_b] - done_at[first_b - 1]
        budget_s = 0.1  # 10 fps source
        assert gap <= usual + budget_s, (gap, usual)
        assert rows[first_b]["seq"] - rows[first_b - 1]["seq"] <= 2  # no run of frames lost at the swap
        m = done.metrics
        assert m["swap_gap_ms"] <= m["frame_interval_ms"] + m["budget_ms"], m
        print(f"\nswap: executor took the model in {m['swap_ms']:.3f} ms; result gap {m['swap_gap_ms']:.1f} ms "
              f"against a usual {m['frame_interval_ms']:.1f} ms (budget {m['budget_ms']:.0f} ms)")

        reported = wait_until(lambda: (r := peer.last_reported()) and r.models["det"].sha256 == art_b.sha256 and r,
                              10, "reported to name -b")
        assert reported.previous["det"].version == "8.1.42-a"
        assert reported.last_change.job == "roll-b"
        state = ModelStore(tmp_path / "store").load()
        assert state.slots["det"].active.sha256 == art_b.sha256 and state.slots["det"].active.committed
        assert (tmp_path / "store" / "objects" / f"{art_b.sha256}.tflite").is_file()

        # the technician's commands: list, and roll back by hand to -a, on the running daemon
        listed = subprocess.run([sys.executable, "-m", "edge", "models", "list", "--config", str(config), "--json"],
                                capture_output=True, text=True, cwd=REPO, timeout=30, check=True)
        assert [(r["slot"], r["role"], r["version"]) for r in json.loads(listed.stdout)] == [
            ("det", "active", "8.1.42-b"), ("det", "previous", "8.1.42-a")], listed
        subprocess.run([sys.executable, "-m", "edge", "models", "rollback", "det", "--config", str(config)],
                       capture_output=True, text=True, cwd=REPO, timeout=30, check=True)
        serving(run, "yolov8n@8.1.42-a")
        wait_until(lambda: (r := peer.last_reported()) and r.models["det"].version == "8.1.42-a"
                   and "local rollback" in r.last_change.reason, 20, "reported to say the local rollback")
        assert run.stop() == 0
        assert ModelStore(tmp_path / "store").load().slots["det"].active.version == "8.1.42-a"
    finally:
        peer.close()


@pytest.mark.runtime
def test_each_bad_model_is_refused_the_old_one_keeps_serving_and_the_reason_reaches_the_fleet(
        tmp_path, broker, keys, runs):
    key, public = keys
    video = str(shared_path(VIDEO))
    cameras = [
        {"id": "door", "source": {"kind": "video", "path": video, "loop": True}, "model": "det"},
        # a camera with a 2 ms budget: its tiny classifier fits, a detector is far too slow
        {"id": "gate", "source": {"kind": "video", "path": video, "loop": True}, "model": "cls", "budget_ms": 2},
    ]
    config = write_config(tmp_path, broker, public, cameras=cameras, models={"det": YOLO_A, "cls": TINY},
                          smoke={"latency_factor": 1})
    peer = FleetPeer(broker.host, broker.port, DEVICE, key)
    a_sha = artifact(YOLO_A)[0].sha256
    try:
        run = EdgeRun(config, tmp_path)
        runs.append(run)
        serving(run, "yolov8n@8.1.42-a")
        wait_until(lambda: peer.last_reported(), 20, "the device's reported state")

        peer.raw(peer.topics.desired(DEVICE), b"{not json")  # rejected and counted, nothing else
        art_b, data_b = artifact(YOLO_B, key)
        corrupted = bytearray(data_b)
        corrupted[len(corrupted) // 2] ^= 0xFF
        other_key = load_private_key(init_keys(tmp_path / "other")[0])
        broken, broken_data = artifact("models/broken/model_invoking_error.tflite", key,
                                       manifest={"name": "broken", "version": "1", "task": "classify"})
        tiny, tiny_data = artifact(TINY, key)
        # signed and intact in transit, but not models a runtime can read (1.4.0 crashes on the first)
        unreadable = {"truncated": data_b[:100_000], "garbage": random.Random(7).randbytes(4096),
                      "wrong-identifier": data_b[:4] + b"XXXX" + data_b[8:]}
        cases = [
            # (job, slot, artifact, bytes served, final state, reason)
            ("corrupt", "det", art_b, bytes(corrupted), "failed", "sha256"),
            ("forged", "det", sign(other_key, art_b.model_copy(update={"signature": None})), data_b, "failed",
             "bad_signature"),
            ("unsigned", "det", art_b.model_copy(update={"signature": None}), data_b, "failed", "unsigned"),
            ("broken", "det", broken, broken_data, "failed", "load_error"),
            *((name, "det", artifact(YOLO_B, key, data=data)[0], data, "failed", "load_error")
              for name, data in unreadable.items()),
            ("slow", "cls", art_b, data_b, "failed", "too_slow"),
            # a classifier in a detection slot passes its smoke test, then its outputs collapse
            ("collapse", "det", tiny, tiny_data, "rolled_back", ("unsure_rate", "confidence_drop", "detections_per_frame")),
        ]
        for job, slot, art, data, want_state, want_reason in cases:
            peer.blobs[art.sha256] = data
            peer.desire({slot: Assignment(artifact=art, job=job)})
            done = final(peer, job)
            assert done.state == want_state, (job, done)
            assert done.reason.startswith(want_reason), (job, done.reason)
            assert job not in unreadable or "not a valid TFLite model" in done.reason, done.reason
            serving(run, "yolov8n@8.1.42-a", n=3)
            reported = peer.last_reported()
            assert reported.models["det"].sha256 == a_sha and reported.models["cls"].name == "mobilenet_v1_0.25_128"
            peer.blobs.pop(art.sha256)
        seen = states(peer, "collapse")
        assert seen[-3:] == ["testing", "active", "rolled_back"], seen
        assert not any(s.state == "downloading" for j in ("forged", "unsigned") for s in peer.job(j))

        # policies travel the same way and go through the daemon's apply_policy
        good = policy_artifact(key, "version: 7\ndefault: {accept_at: 0.2, reject_at: 0.6}\n", "7")
        bad = policy_artifact(key, "version: 8\ndefault: {accept_at: 0.9, reject_at: 0.1}\n", "8")
        for job, (art, data), want in (("policy-7", good, "committed"), ("policy-8", bad, "failed")):
            peer.blobs[art.sha256] = data
            peer.desire({}, policy=Assignment(artifact=art, job=job))
            done = final(peer, job)
            assert done.state == want and done.slot == "policy", done
        assert done.reason.startswith("invalid_policy")
        reported = wait_until(lambda: (r := peer.last_reported()) and r.policy and r, 10, "the policy reported")
        assert reported.policy.version == "7"

        # an old desired state (a retained copy, a replay) is ignored
        peer.desire({"det": Assignment(artifact=art_b, job="replay")}, version=1)
        stats = wait_until(lambda: (s := agent_stats(tmp_path)).get("stale") and s,
                           10, "the stale desired state to be counted")
        assert stats["rejected"] == {"malformed_json": 1}
        assert not peer.job("replay")
        assert run.stop() == 0
        state = ModelStore(tmp_path / "store").load()
        assert state.desired_version == len(cases) + 2
        assert state.slots["det"].active.sha256 == a_sha  # the factory model, copied in for the trial
    finally:
        peer.close()


def objects_consistent(store_dir: Path) -> str | None:
    """The active model's sha256 per the state file (None: the config's), after checking its file."""
    from edge.core.signing import sha256_file

    state = ModelStore(store_dir).load()  # parses: never half a file
    active = state.slots["det"].active if "det" in state.slots else None
    if active is None:
        return None
    assert sha256_file(store_dir / "objects" / f"{active.sha256}.tflite") == active.sha256
    return active.sha256


def test_kill_9_during_download_resumes_and_during_the_swap_leaves_old_or_new(tmp_path, broker, keys, runs):
    key, public = keys
    config = write_config(tmp_path, broker, public)
    peer = FleetPeer(broker.host, broker.port, DEVICE, key, chunk_delay_s=0.1)
    store = tmp_path / "store"
    art_b, data_b = artifact(YOLO_B, key)
    a_sha = artifact(YOLO_A)[0].sha256
    peer.blobs[art_b.sha256] = data_b
    try:
        first = EdgeRun(config, tmp_path, "first")
        runs.append(first)
        serving(first, "yolov8n@8.1.42-a")
        peer.desire({"det": Assignment(artifact=art_b, job="resume")})
        wait_until(lambda: len(peer.requests) >= 8, 30, "a third of the download")
        first.kill()
        part = store / "staging" / f"{art_b.sha256}.part"
        have = part.stat().st_size
        assert 0 < have < art_b.size and data_b.startswith(part.read_bytes())
        asked_before = len(peer.requests)

        peer.chunk_delay_s = 0
        second = EdgeRun(config, tmp_path, "second")
        runs.append(second)
        wait_until(lambda: "testing" in states(peer, "resume"), 60, "the smoke test")
        # the download went on from where it stopped, not from the start
        offsets = [offset for _, offset in peer.requests[asked_before:]]
        assert offsets[0] == have and 0 not in offsets, offsets[:3]
        time.sleep(random.Random(3).uniform(0, 0.3))  # somewhere in smoke test, load, state write, swap
        second.kill()
        at_kill = objects_consistent(store)
        assert at_kill in (None, a_sha, art_b.sha256)

        actives = states(peer, "resume").count("active")
        third = EdgeRun(config, tmp_path, "third")
        runs.append(third)
        # it starts on exactly what the state file names, then finishes the job
        wait_until(lambda: third.models_seen(), 60, "the first result")
        assert third.models_seen()[0] == ("yolov8n@8.1.42-b" if at_kill == art_b.sha256 else "yolov8n@8.1.42-a")
        if at_kill != art_b.sha256:
            # the kill came before the state named -b, so the job runs again: kill it right
            # after this swap, and the restart must be on -b, still on trial
            wait_until(lambda: states(peer, "resume").count("active") > actives, 60, "the swap")
            third.kill()
            assert objects_consistent(store) == art_b.sha256
            assert not ModelStore(store).load().slots["det"].active.committed
            third = EdgeRun(config, tmp_path, "fourth")
            runs.append(third)
            wait_until(lambda: third.models_seen(), 60, "the first result")
            assert third.models_seen()[0] == "yolov8n@8.1.42-b"
        done = final(peer, "resume")
        assert done.state == "committed", done
        serving(third, "yolov8n@8.1.42-b", n=3)
        assert third.stop() == 0
        assert objects_consistent(store) == art_b.sha256
        assert not part.exists()
    finally:
        peer.close()


def test_a_crash_loop_after_activation_boots_the_previous_model_and_says_so(tmp_path, broker, keys, runs):
    key, public = keys
    config = write_config(tmp_path, broker, public, crash_loop={"restarts": 2, "minutes": 10},
                          health={"window_s": 120, "min_results": 10, "latency_factor": 4})
    peer = FleetPeer(broker.host, broker.port, DEVICE, key)
    art_b, data_b = artifact(YOLO_B, key)
    peer.blobs[art_b.sha256] = data_b
    try:
        run = EdgeRun(config, tmp_path, "activating")
        runs.append(run)
        serving(run, "yolov8n@8.1.42-a")
        peer.desire({"det": Assignment(artifact=art_b, job="crashy")})
        wait_until(lambda: "active" in states(peer, "crashy"), 60, "the swap")
        serving(run, "yolov8n@8.1.42-b", n=2)
        run.kill()  # the new model "crashes" the daemon
        again = EdgeRun(config, tmp_path, "restart-1")
        runs.append(again)
        serving(again, "yolov8n@8.1.42-b", n=2)  # one restart: still on trial
        again.kill()
        (tmp_path / "stats.json").unlink(missing_ok=True)
        last = EdgeRun(config, tmp_path, "restart-2")
        runs.append(last)
        serving(last, "yolov8n@8.1.42-a")  # two restarts within minutes: back on the previous
        assert set(last.models_seen()) == {"yolov8n@8.1.42-a"}
        done = final(peer, "crashy")
        assert done.state == "rolled_back" and done.reason.startswith("crash_loop"), done
        reported = wait_until(lambda: (r := peer.last_reported()) and r.models["det"].version == "8.1.42-a" and r,
                              20, "reported to name -a")
        assert reported.last_change.reason.startswith("crash_loop")
        # the retained desired state that asked for -b is answered: it is not tried again
        stats = wait_until(lambda: (s := agent_stats(tmp_path)).get("stale") and s,
                           20, "the retained desired state to arrive and be ignored")
        assert stats["desired"] == 1 and "downloading" not in stats["jobs"]
        assert last.stop() == 0
    finally:
        peer.close()


def test_a_rollout_from_the_real_fleet_manager_reaches_a_running_edge_run(tmp_path, broker, runs):
    from broker import FleetProcess

    def fleet(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fleet", *args, "--broker", f"{broker.host}:{broker.port}"],
                              capture_output=True, text=True, cwd=REPO, timeout=timeout, check=False)

    keys = tmp_path / "keys"
    made = subprocess.run([sys.executable, "-m", "fleet", "keys", "init", "--dir", str(keys)], capture_output=True,
                          text=True, cwd=REPO, timeout=30, check=False)
    assert made.returncode == 0, made.stderr
    manager = FleetProcess(tmp_path / "fleet.db", broker, "--keys", str(keys))
    try:
        manager.wait_for("control subscribed")
        config = write_config(tmp_path, broker, keys / "fleet.pub")
        run = EdgeRun(config, tmp_path)
        runs.append(run)
        serving(run, "yolov8n@8.1.42-a")
        pushed = fleet("models", "push", str(shared_path(YOLO_B)), "--manifest", str(manifest_for(YOLO_B)))
        assert pushed.returncode == 0, pushed.stderr
        started = fleet("rollout", "start", "yolov8n@8.1.42-b", "--slot", "det", "--target", DEVICE,
                        "--canary", "0", "--waves", "100%", "--health-window", "2s", "--json")
        assert started.returncode == 0, started.stderr
        watched = fleet("rollout", "watch", json.loads(started.stdout)["id"], timeout=120)
        assert watched.returncode == 0 and "COMPLETED" in watched.stdout, (watched.stdout, watched.stderr)
        serving(run, "yolov8n@8.1.42-b")
        assert run.stop() == 0
    finally:
        manager.stop()


def test_a_disk_that_fills_mid_download_fails_the_job_and_the_next_desired_state_gets_its_own(tmp_path, broker, keys):
    """A real full disk: the agent's state directory is a small tmpfs in the daemon's own mount
    namespace, filled by another writer once the download has begun."""
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs unshare -m (root, or a user namespace) for a private tmpfs")
    key, public = keys
    config = write_config(tmp_path, broker, public, models={"det": TINY},
                          download={"chunk_timeout_s": 2, "backoff": {"initial_s": 0.2, "max_s": 1}, "min_free_mb": 0})
    state, release = tmp_path / "store", tmp_path / "release"
    state.mkdir()
    script = (f'mount -t tmpfs -o size=5m tmpfs "{state}" && ('
              f'while ! ls "{state}"/staging/*.part >/dev/null 2>&1; do sleep 0.02; done; '
              f'dd if=/dev/zero of="{state}/filler" bs=64k 2>/dev/null; '
              f'while [ ! -e "{release}" ]; do sleep 0.05; done; rm -f "{state}/filler"; touch "{release}.done") & '
              f'exec "{sys.executable}" -m edge run --config "{config}"')
    log = open(tmp_path / "edge.log", "w")
    proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                            stdout=subprocess.DEVNULL, stderr=log, cwd=REPO)
    peer = FleetPeer(broker.host, broker.port, DEVICE, key)
    try:
        wait_until(lambda: peer.last_reported() or proc.poll() is not None, 60, "the device's reported state")
        assert proc.poll() is None, (tmp_path / "edge.log").read_text()[-2000:]
        art_b, data_b = artifact(YOLO_B, key)
        peer.blobs[art_b.sha256] = data_b
        peer.desire({"det": Assignment(artifact=art_b, job="full-disk")})
        failed = final(peer, "full-disk")
        assert failed.state == "failed" and failed.reason.startswith("disk_full"), failed
        assert "downloading" in states(peer, "full-disk")

        release.touch()  # space again; the agent is ready for the next desired state
        wait_until(lambda: release.with_suffix(".done").exists(), 10, "the filler removed")
        good = policy_artifact(key, "version: 9\ndefault: {accept_at: 0.2, reject_at: 0.6}\n", "9")
        peer.blobs[good[0].sha256] = good[1]
        peer.desire({}, policy=Assignment(artifact=good[0], job="after-full-disk"))
        done = final(peer, "after-full-disk")
        assert done.state == "committed", done
        assert proc.poll() is None
    finally:
        peer.close()
        proc.terminate()
        proc.wait(30)
        log.close()
