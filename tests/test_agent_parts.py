"""The agent's parts on their own: chunked download, smoke test, health verdicts."""

from __future__ import annotations

import hashlib
import threading
import time

import numpy as np
import pytest
from conftest import manifest_for, shared_path

from edge.capture.thread import Frame
from edge.core.contract import MAX_CHUNK_BYTES, Artifact, ChunkHeader, Topics, decode_artifact_request
from edge.inference.adapters import Detection, Prediction
from edge.inference.manifest import Manifest, load_manifest
from edge.inference.model import StageTimes
from edge.schedule.scheduler import Result
from edge.updates.download import Downloader, DownloadError, DownloadSettings
from edge.updates.health import HealthLimits, HealthWatch, band_outcome
from edge.updates.smoke import RuntimeOptions, SmokeError, smoke_test

YOLO = "models/yolov8n_full_integer_quant-b.tflite"
TINY = "models/mobilenet_v1_0.25_128_quant.tflite"


class Server:
    """Answers chunk requests from ``data`` on another thread, skipping the ones ``drop`` says."""

    def __init__(self, data: bytes, drop=lambda offset, n: False) -> None:
        self.data, self.drop = data, drop
        self.offsets: list[int] = []
        self.downloader: Downloader | None = None

    def send(self, topic: str, body: bytes) -> None:
        assert topic == Topics().artifact_get("cam")
        req = decode_artifact_request(body, Topics(), device="cam")
        self.offsets.append(req.offset)
        if self.drop(req.offset, self.offsets.count(req.offset)):
            return
        header = ChunkHeader(v=1, sha256=req.sha256, offset=req.offset, total=len(self.data), request=req.request)
        chunk = self.data[req.offset:req.offset + req.length]
        threading.Thread(target=self.downloader.deliver, args=(header, chunk)).start()


def download(tmp_path, data: bytes, server: Server, **settings) -> tuple[Downloader, Artifact]:
    art = Artifact(kind="model", name="m", version="1", sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    dl = Downloader("cam", Topics(), server.send, DownloadSettings(
        chunk_timeout_s=0.3, backoff_initial_s=0.01, backoff_max_s=0.05, **settings), threading.Event())
    server.downloader = dl
    return dl, art


def test_a_download_resumes_from_what_the_staging_file_holds(tmp_path):
    data = np.random.default_rng(1).bytes(3 * MAX_CHUNK_BYTES + 77)
    server = Server(data)
    dl, art = download(tmp_path, data, server)
    part = tmp_path / "x.part"
    part.write_bytes(data[:MAX_CHUNK_BYTES + 5])  # what a killed process left
    seen = []
    dl.fetch(art, part, seen.append)
    assert part.read_bytes() == data
    assert server.offsets == [MAX_CHUNK_BYTES + 5, 2 * MAX_CHUNK_BYTES + 5, 3 * MAX_CHUNK_BYTES + 5]
    assert seen[-1] == 1.0 and dl.counters["resumed_bytes"] == MAX_CHUNK_BYTES + 5


def test_an_unanswered_request_is_retried_with_backoff_then_given_up(tmp_path):
    data = b"x" * 1000
    flaky = Server(data, drop=lambda offset, n: n <= 2)  # the first two requests get no answer
    dl, art = download(tmp_path, data, flaky, retries=3)
    dl.fetch(art, tmp_path / "a.part")
    assert flaky.offsets == [0, 0, 0] and dl.counters["retries"] == 2
    dead = Server(data, drop=lambda offset, n: True)
    dl, art = download(tmp_path, data, dead, retries=3)
    with pytest.raises(DownloadError) as err:
        dl.fetch(art, tmp_path / "b.part")
    assert err.value.reason == "no_answer" and len(dead.offsets) == 4


def test_a_download_that_would_fill_the_disk_is_refused_before_asking(tmp_path):
    server = Server(b"x" * 1000)
    dl, art = download(tmp_path, b"x" * 1000, server, min_free_bytes=1 << 60)
    with pytest.raises(DownloadError) as err:
        dl.fetch(art, tmp_path / "c.part")
    assert err.value.reason == "disk_full" and server.offsets == []


def manifest(model: str) -> Manifest:
    return load_manifest(manifest_for(model), model_dir=shared_path(model).parent)


FRAME = np.full((360, 640, 3), 90, np.uint8)
RT = RuntimeOptions(num_threads=2)


@pytest.mark.runtime
def test_smoke_test_passes_a_good_model_and_names_what_is_wrong_with_bad_ones():
    ok = smoke_test(shared_path(YOLO), manifest(YOLO), FRAME, budget_ms=5000, factor=1, invokes=2, rt=RT)
    assert ok.invokes == 2 and 0 < ok.latency_ms < ok.limit_ms
    cases = [
        (YOLO, manifest(YOLO), 1.0, "too_slow"),  # a detector against a 1 ms budget
        (TINY, manifest(YOLO), 5000, "manifest_mismatch"),  # a classifier's tensors, a detector's manifest
        ("models/broken/model_invoking_error.tflite", Manifest(name="b", version="1", task="classify"), 5000,
         "load_error"),
    ]
    for model, spec, budget, reason in cases:
        with pytest.raises(SmokeError) as err:
            smoke_test(shared_path(model), spec, FRAME, budget_ms=budget, factor=1, invokes=2, rt=RT)
        assert err.value.reason == reason, err.value


def feed(watch: HealthWatch, model: str, scores: list[float], n: int, latency_ms: float = 5.0) -> None:
    frame = Frame("door", 0, FRAME, time.time(), time.monotonic())
    dets = tuple(Detection(0, "person", s, (0, 0, 10, 10)) for s in scores)
    for _ in range(n):
        watch(Result(frame, "det", model, Prediction("yolov8", detections=dets), StageTimes(1, latency_ms - 2, 1),
                     time.monotonic()))


LIMITS = HealthLimits(window_s=0, min_results=10, max_unsure_rate=0.3, max_unsure_increase=0.15)


def test_thresholds_that_make_most_outputs_unsure_fail_the_health_window():
    watch = HealthWatch({("door", "det"): "det"}, band_outcome(0.25, 0.5))
    feed(watch, "old@1", [0.9, 0.8, 0.3], 30)  # a third unsure
    window = watch.begin("det", "new@2", "old@1", budget_ms=100, baseline_s=60)
    feed(watch, "new@2", [0.3, 0.35, 0.4, 0.9], 30)  # three quarters unsure
    verdict = watch.evaluate(window, LIMITS)
    assert not verdict.healthy and verdict.reason.startswith("unsure_rate"), verdict
    assert verdict.metrics["baseline_unsure_rate"] == pytest.approx(1 / 3, abs=1e-3)


def test_a_model_as_good_as_the_old_one_passes_and_errors_fail_it():
    watch = HealthWatch({("door", "det"): "det"}, band_outcome(0.25, 0.5))
    feed(watch, "old@1", [0.9, 0.8, 0.3], 30)
    window = watch.begin("det", "new@2", "old@1", budget_ms=100, baseline_s=60)
    assert watch.evaluate(window, LIMITS) is None  # nothing seen yet: keep watching
    feed(watch, "new@2", [0.85, 0.8, 0.35], 30)
    verdict = watch.evaluate(window, LIMITS)
    assert verdict.healthy, verdict
    for _ in range(5):
        watch.error("door", "det", "new@2")
    verdict = watch.evaluate(window, LIMITS)
    assert not verdict.healthy and verdict.reason.startswith("error_rate")


def test_latency_over_budget_fails_only_when_the_old_model_was_faster():
    watch = HealthWatch({("door", "det"): "det"}, band_outcome(0.25, 0.5))
    feed(watch, "old@1", [0.9], 30, latency_ms=90)  # a loaded device: the old one is slow too
    window = watch.begin("det", "new@2", "old@1", budget_ms=50, baseline_s=60)
    feed(watch, "new@2", [0.9], 30, latency_ms=95)
    assert watch.evaluate(window, LIMITS).healthy
    watch = HealthWatch({("door", "det"): "det"}, band_outcome(0.25, 0.5))
    feed(watch, "old@1", [0.9], 30, latency_ms=20)
    window = watch.begin("det", "new@2", "old@1", budget_ms=50, baseline_s=60)
    feed(watch, "new@2", [0.9], 30, latency_ms=95)
    verdict = watch.evaluate(window, LIMITS)
    assert not verdict.healthy and verdict.reason.startswith("latency")


def test_a_missing_public_key_is_a_config_error_naming_the_key(tmp_path):
    import subprocess
    import sys

    import yaml
    from conftest import REPO

    cfg = {"device": {"id": "cam"}, "models": {"det": {"path": str(shared_path(TINY)),
                                                        "manifest": str(manifest_for(TINY))}},
           "cameras": [{"id": "door", "source": {"kind": "pattern"}, "model": "det"}],
           "mqtt": {"port": 1}, "outbox": {"path": str(tmp_path / "o.db")},
           "agent": {"public_key": str(tmp_path / "nope.pub"), "state_dir": str(tmp_path / "store")}}
    path = tmp_path / "cam.yaml"
    path.write_text(yaml.safe_dump(cfg))
    for command in (["config", "check", str(path)], ["run", "--config", str(path)]):
        done = subprocess.run([sys.executable, "-m", "edge", *command], capture_output=True, text=True, cwd=REPO,
                              timeout=60, check=False)
        assert done.returncode == 2 and "agent.public_key" in done.stderr, done.stderr
    cfg.pop("mqtt")
    path.write_text(yaml.safe_dump(cfg))
    done = subprocess.run([sys.executable, "-m", "edge", "config", "check", str(path)], capture_output=True,
                          text=True, cwd=REPO, timeout=60, check=False)
    assert done.returncode == 2 and "agent: needs `mqtt`" in done.stderr, done.stderr
