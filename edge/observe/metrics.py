"""``/metrics`` for Prometheus, through prometheus_client and a custom collector.

Nothing here is on the frame path. At scrape time the collector reads what the stages
already keep (capture and scheduler counters, the outbox, sync, alert and agent stats,
the observer's histograms and snapshot) and hands prometheus_client metric families;
the only per-frame cost of metrics is the observer's bucket increments. Names follow
Prometheus' conventions (``edgecam_`` prefix, ``_total`` counters, base units: seconds,
bytes). Labels are bounded: camera, task, model slot and version, stage, drop or skip
reason, rule, camera state, measure; never an event, alert or track id.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import start_http_server
from prometheus_client.process_collector import ProcessCollector

from edge import __version__
from edge.capture.thread import CaptureState
from edge.core.errors import ConfigError
from edge.core.logs import fields
from edge.schedule.scheduler import CameraRunner, Scheduler

from .histogram import Histogram
from .observer import STAGES, Observer

log = logging.getLogger("edge.observe")

Stats = Callable[[], Mapping[str, Any]]


@dataclass
class Sources:
    """What the collector reads, each a stage's own object or its stats callable (None: not running)."""

    device: Mapping[str, str]  # id, site, line
    cameras: list[CameraRunner]
    scheduler: Scheduler
    models: Callable[[], Mapping[str, tuple[str, str]]]  # slot -> (name, version)
    decisions: Stats
    observer: Observer | None = None
    outbox: Stats | None = None
    oldest_unsynced: Callable[[], float | None] | None = None  # time.time() of the oldest row
    sync: Stats | None = None
    alerts: Stats | None = None
    agent: Stats | None = None
    alert_states: Callable[[], Mapping[tuple[str, str], bool]] | None = None  # (camera, rule) -> on


Rows = Iterable[tuple[tuple[str, ...], float]]  # (label values, value) per series


def _filled(family: CounterMetricFamily | GaugeMetricFamily, rows: Rows) -> Metric:
    for values, value in rows:
        family.add_metric(list(values), value)
    return family


def _counter(name: str, doc: str, labels: Iterable[str], rows: Rows) -> Metric:
    return _filled(CounterMetricFamily(name, doc, labels=list(labels)), rows)


def _gauge(name: str, doc: str, labels: Iterable[str], rows: Rows) -> Metric:
    return _filled(GaugeMetricFamily(name, doc, labels=list(labels)), rows)


def _histogram(family: HistogramMetricFamily, labels: list[str], hist: Histogram) -> None:
    counts, total = hist.read()
    buckets, running = [], 0
    for bound, count in zip([*map(str, hist.bounds), "+Inf"], counts):
        running += count
        buckets.append((bound, running))
    family.add_metric(labels, buckets, total)


_CAMERA_SERIES = (  # key in the rows below, family, name, help, labels
    ("captured", _counter, "edgecam_frames_captured", "Frames the camera delivered", ("camera",)),
    ("processed", _counter, "edgecam_frames_processed", "Frames the scheduler ran the camera's plan on", ("camera",)),
    ("dropped", _counter, "edgecam_frames_dropped", "Frames never processed: superseded by a newer one, or too old",
     ("camera", "reason")),
    ("misses", _counter, "edgecam_deadline_misses", "Frames whose work ended past their deadline", ("camera",)),
    ("reopens", _counter, "edgecam_capture_reopens", "Attempts to open the camera again", ("camera",)),
    ("read_errors", _counter, "edgecam_capture_read_errors", "Failed reads from the camera", ("camera",)),
    ("state", _gauge, "edgecam_camera_state", "1 for the camera's capture state, 0 for the others",
     ("camera", "state")),
    ("budget", _gauge, "edgecam_frame_budget_seconds", "The camera's time budget per frame", ("camera",)),
    ("runs", _counter, "edgecam_task_runs", "Runs of a camera's task", ("camera", "task")),
    ("forced", _counter, "edgecam_task_forced_runs", "Runs forced after too many budget skips in a row",
     ("camera", "task")),
    ("skips", _counter, "edgecam_task_skips", "Frames a task did not run on, by reason", ("camera", "task", "reason")),
    ("estimate", _gauge, "edgecam_task_estimate_seconds", "The scheduler's cost estimate of a task's run",
     ("camera", "task")),
)


class Collector:
    """A prometheus_client custom collector over :class:`Sources`."""

    def __init__(self, sources: Sources) -> None:
        self.s = sources

    def describe(self) -> list[Metric]:
        return []  # families vary with what runs; prometheus_client then skips the up-front check

    def collect(self) -> Iterator[Metric]:
        s = self.s
        dev = s.device
        yield InfoMetricFamily("edgecam_device", "The device and the edgecam version it runs",
                               value={"device": dev["id"], "site": dev["site"], "line": dev["line"],
                                      "version": __version__})
        models = InfoMetricFamily("edgecam_model", "The model serving each slot", labels=["slot"])
        for slot, (name, version) in sorted(s.models().items()):
            models.add_metric([slot], {"name": name, "version": version})
        yield models
        yield from self._cameras()
        yield from self._histograms()
        yield _counter("edgecam_inference_errors", "Model runs that raised", [],
                       [((), s.scheduler.inference_errors)])
        yield _counter("edgecam_sink_errors", "Results a sink (decisions, outbox, results file) failed on", [],
                       [((), s.scheduler.sink_errors)])
        yield from self._decisions()
        if s.observer is not None:
            yield from self._observe(s.observer)
        if s.outbox is not None:
            yield from self._outbox()
        if s.sync is not None:
            yield from self._sync()
        if s.agent is not None:
            a = s.agent()
            yield _counter("edgecam_agent_job_steps", "Model and policy job steps reached, by state", ["state"],
                           [((state,), n) for state, n in sorted(a["jobs"].items())])
            yield _counter("edgecam_agent_desired_states", "Desired states received", [], [((), a["desired"])])
            yield _counter("edgecam_agent_rejected", "Agent messages refused, by reason", ["reason"],
                           [((reason,), n) for reason, n in sorted(a["rejected"].items())])

    def _cameras(self) -> Iterator[Metric]:
        rows: dict[str, list[tuple[tuple[str, ...], float]]] = {series[0]: [] for series in _CAMERA_SERIES}
        for cam in self.s.cameras:
            c = cam.cfg.id
            cap = cam.capture.stats()
            rows["captured"].append(((c,), cap.captured))
            rows["processed"].append(((c,), cam.processed))
            rows["dropped"].append(((c, "superseded"), cap.superseded))
            for reason, n in list(cam.dropped.items()):
                rows["dropped"].append(((c, reason), n))
            rows["misses"].append(((c,), cam.deadline_misses))
            rows["reopens"].append(((c,), cap.reopens))
            rows["read_errors"].append(((c,), cap.read_errors))
            rows["budget"].append(((c,), cam.budget_ms / 1e3))
            for state in CaptureState:
                rows["state"].append(((c, state.value), float(cap.state is state)))
            for task, k in cam.planner.counters().items():
                rows["runs"].append(((c, task), k.runs))
                rows["forced"].append(((c, task), k.forced))
                for reason, n in list(k.skips.items()):
                    rows["skips"].append(((c, task, reason), n))
                rows["estimate"].append(((c, task), cam.planner.costs.estimate(task) / 1e3))
        for key, make, name, doc, labels in _CAMERA_SERIES:
            yield make(name, doc, labels, rows[key])

    def _histograms(self) -> Iterator[Metric]:
        observer = self.s.observer
        if observer is None:
            return
        age = HistogramMetricFamily("edgecam_result_age_seconds", "Capture to result, per task result",
                                    labels=["camera", "task"])
        stage = HistogramMetricFamily("edgecam_stage_seconds", "Time in each stage of a model run",
                                      labels=["camera", "task", "stage"])
        for (camera, task), series in observer.series.items():
            _histogram(age, [camera, task], series.age)
            for name in STAGES:
                _histogram(stage, [camera, task, name], series.stages[name])
        yield age
        yield stage

    def _decisions(self) -> Iterator[Metric]:
        d = self.s.decisions()
        yield _counter("edgecam_alerts_raised", "Alerts decided, by rule", ["rule"],
                       [((rule,), n) for rule, n in sorted(d["alerts"].items())])
        yield _counter("edgecam_alert_cooldown_suppressed", "Alerts held back by a rule's cooldown", [],
                       [((), d["cooldown_suppressed"])])
        for key, doc in (("samples", "Frames kept as snapshots for review, by the sampler that wanted them"),
                         ("samples_capped", "Frames a sampler wanted but its hourly or daily cap refused"),
                         ("samples_skipped", "Frames a sampler wanted but the busy snapshot store refused")):
            yield _counter(f"edgecam_{key}", doc, ["reason"], [((r,), n) for r, n in sorted(d.get(key, {}).items())])
        outcomes = [((camera, outcome), n) for camera, by in sorted(d["outcomes"].items())
                    for outcome, n in by.items()]
        yield _counter("edgecam_outcomes", "Scored outputs by decision outcome", ["camera", "outcome"], outcomes)
        if self.s.alerts is not None:
            a = self.s.alerts()
            rules = sorted(a["by_rule"].items())
            for key, doc in (("published", "Alerts published to the broker"),
                             ("delayed", "Alerts published late, after the broker came back"),
                             ("dropped", "Alerts dropped from a full queue while the broker was away")):
                yield _counter(f"edgecam_alerts_{key}", f"{doc}, by rule", ["rule"],
                               [((rule,), c[key]) for rule, c in rules])
            yield _gauge("edgecam_alerts_pending", "Alerts waiting for the broker", [], [((), a["pending"])])
            yield _gauge("edgecam_alert_link_connected", "1 while the alert link is connected", [],
                         [((), float(a["connected"]))])
        if self.s.alert_states is not None:
            yield _gauge("edgecam_camera_alert_active", "1 while a device alert is on for the camera",
                         ["camera", "rule"],
                         [((camera, rule), float(on)) for (camera, rule), on in sorted(self.s.alert_states().items())])

    def _observe(self, observer: Observer) -> Iterator[Metric]:
        snap = observer.snapshot()
        quality: dict[str, list[tuple[tuple[str, ...], float]]] = {}
        drift: dict[str, list[tuple[tuple[str, ...], float]]] = {}
        for camera, obs in snap.cameras.items():
            if obs.quality is not None:
                for measure, value in obs.quality.values().items():
                    quality.setdefault(measure, []).append(((camera,), value))
            for task, r in obs.drift.items():
                labels = (camera, task, r.model_version)
                for key in ("psi", "class_shift", "detections_ratio", "detections_per_frame", "unsure_share"):
                    value = getattr(r, key)
                    if value is not None:
                        drift.setdefault(key, []).append((labels, value))
                drift.setdefault("windows", []).append((labels, r.window))
        docs = {"brightness": "Mean grey level (0-255) of the last measured frame",
                "contrast": "Standard deviation of the grey levels of the last measured frame",
                "sharpness": "Variance of the Laplacian of the last measured frame",
                "flat": "Share of the last measured frame in its most common grey level"}
        for measure, doc in docs.items():
            yield _gauge(f"edgecam_image_{measure}", doc, ["camera"], quality.get(measure, []))
        drift_docs = {"psi": "Population stability index of the last window's scores against the baseline",
                      "class_shift": "Cohen's w of the last window's class mix against the baseline",
                      "detections_ratio": "Detections per frame in the last window against the baseline's",
                      "detections_per_frame": "Detections per frame in the last window",
                      "unsure_share": "Share of the last window's outputs that were unsure"}
        for key, doc in drift_docs.items():
            yield _gauge(f"edgecam_drift_{key}", doc, ["camera", "task", "model_version"], drift.get(key, []))
        yield _counter("edgecam_drift_windows", "Drift windows closed for the model version",
                       ["camera", "task", "model_version"], drift.get("windows", []))

    def _outbox(self) -> Iterator[Metric]:
        o = self.s.outbox()
        yield _gauge("edgecam_outbox_rows", "Events stored, waiting for the fleet's ack", [], [((), o["rows"])])
        yield _gauge("edgecam_outbox_bytes", "Bytes of the stored events", [], [((), o["bytes"])])
        oldest = self.s.oldest_unsynced() if self.s.oldest_unsynced is not None else None
        yield _gauge("edgecam_outbox_oldest_unsynced_age_seconds", "Age of the oldest event not yet acked "
                     "(0 when none waits)", [], [((), max(0.0, time.time() - oldest) if oldest else 0.0)])
        for key, doc in (("committed", "Events committed to the outbox"),
                         ("dropped", "Events dropped before the outbox: its hand-off was full"),
                         ("evicted", "Events evicted from a full outbox"), ("deleted", "Events deleted on ack")):
            yield _counter(f"edgecam_outbox_{key}_events", doc, [], [((), o[key])])
        yield _counter("edgecam_outbox_evicted_bytes", "Bytes evicted from a full outbox", [],
                       [((), o["evicted_bytes"])])

    def _sync(self) -> Iterator[Metric]:
        y = self.s.sync()
        yield _gauge("edgecam_sync_connected", "1 while the sync link is connected", [],
                     [((), float(y["connected"]))])
        for key, doc in (("batches_sent", "Outbox batches published"), ("acked_batches", "Batches the fleet acked"),
                         ("events_sent", "Events published in batches"), ("resent", "Batches sent again")):
            yield _counter(f"edgecam_sync_{key}", doc, [], [((), y[key])])
        yield _gauge("edgecam_sync_inflight_batches", "Batches awaiting the fleet's ack", [], [((), y["inflight"])])
        review = y.get("review")
        if review is not None:  # snapshot fetches (edge/sync/review): the one way pixels leave
            yield _counter("edgecam_review_exported", "Snapshots sent to an operator who asked", [],
                           [((), review["exported"])])
            yield _counter("edgecam_review_exported_bytes", "Bytes of snapshots sent to operators", [],
                           [((), review["bytes"])])
            for key, doc in (("refused", "Snapshot fetches refused, by reason"),
                             ("rejected", "Snapshot fetch requests that broke the contract, by reason")):
                yield _counter(f"edgecam_review_{key}", doc, ["reason"],
                               [((reason,), n) for reason, n in sorted(review[key].items())])


class MetricsServer:
    """``/metrics`` on ``address``; bound at construction, so a taken port fails the start."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, process_cpu_seconds_total, ...
        host, port = address
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"metrics.listen: cannot serve {host}:{port}: {exc.strerror or exc}") from None
        self.port = self._server.server_address[1]
        self._collector: Collector | None = None
        self._lock = threading.Lock()
        log.info("metrics listening", extra=fields(address=f"{host}:{self.port}", path="/metrics"))

    def attach(self, sources: Sources) -> None:
        """Start exposing ``sources`` (until then only the process metrics)."""
        with self._lock:
            if self._collector is None:
                self._collector = Collector(sources)
                self.registry.register(self._collector)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(1.0)
