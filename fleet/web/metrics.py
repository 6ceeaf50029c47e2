"""``/metrics``: the manager's figures for Prometheus, made at each scrape.

A collector on a registry of its own (no process-wide state): the manager's counters
as counters (Prometheus takes the rates), the store's aggregates (devices and rollouts
by state, its size) from a ``GROUP BY`` each, and the ingest's ack-latency histogram.
The control link's counters exist only on the manager holding the lease; a manager
that takes it over starts them from zero, which Prometheus reads as a counter reset.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fleet.store import DatabaseError

from .queries import Queries

log = logging.getLogger("fleet.web")

# manager.stats() key -> (metric name, help)
COUNTERS = {
    "batches": ("fleet_ingest_batches", "Outbox batches stored and acked"),
    "events": ("fleet_ingest_events", "Events received in stored batches"),
    "stored": ("fleet_ingest_events_stored", "Events stored (not already there)"),
    "duplicates": ("fleet_ingest_events_duplicate", "Events received again and not stored twice"),
    "statuses": ("fleet_ingest_statuses", "Device statuses recorded"),
    "store_errors": ("fleet_ingest_store_errors", "Batches or statuses the store could not take (not acked)"),
    "jobs_stored": ("fleet_jobs_stored", "Job statuses stored"),
    "chunk_bytes": ("fleet_artifact_bytes_served", "Artifact bytes sent in chunks (by this manager while leading)"),
    "chunks": ("fleet_artifact_chunks_served", "Artifact chunks sent (by this manager while leading)"),
    "rpc": ("fleet_rpc_requests", "Operator requests handled (while leading)"),
    "rpc_errors": ("fleet_rpc_errors", "Operator requests refused or failed (while leading)"),
}


class FleetCollector(Collector):
    """Everything ``/metrics`` shows, read when scraped."""

    def __init__(self, queries: Queries, stats: Callable[[], dict[str, Any]], ack_latency: Histogram | None) -> None:
        self.queries = queries
        self.stats = stats
        self.ack_latency = ack_latency

    def collect(self) -> Iterator[Metric]:
        s = self.stats()
        for key, (name, doc) in COUNTERS.items():
            if key in s:
                yield CounterMetricFamily(name, doc, value=s[key])
        rejected = CounterMetricFamily("fleet_rejected_messages", "Messages refused, by reason", labels=["reason"])
        merged: dict[str, int] = {}
        for source in (s.get("rejected", {}), s.get("control_rejected", {})):
            for reason, n in source.items():
                merged[reason] = merged.get(reason, 0) + n
        for reason, n in sorted(merged.items()):
            rejected.add_metric([reason], n)
        yield rejected
        skipped = CounterMetricFamily("fleet_store_rows_skipped", "Unreadable store rows left out of reads "
                                      "(by the manager and by the console)", labels=["table"])
        tables: dict[str, int] = dict(s.get("store_skipped", {}))
        for table, n in dict(self.queries.store.skipped.counts).items():
            tables[table] = tables.get(table, 0) + n
        for table, n in sorted(tables.items()):
            skipped.add_metric([table], n)
        yield skipped
        yield GaugeMetricFamily("fleet_leader", "1 while this manager holds the lease and runs rollouts",
                                value=1 if s.get("leader") else 0)
        yield GaugeMetricFamily("fleet_transfers_active", "Artifact transfers being served",
                                value=s.get("transfers_active", 0))
        yield GaugeMetricFamily("fleet_transfers_waiting", "Artifact requests queued for a free transfer",
                                value=s.get("transfers_waiting", 0))
        if self.ack_latency is not None:
            yield from self.ack_latency.collect()
        yield from self._store()

    def _store(self) -> Iterator[Metric]:
        try:
            devices = self.queries.devices_by_state()
            rollouts = self.queries.rollouts_by_state()
            size = self.queries.store_bytes()
        except DatabaseError as exc:  # the scrape still answers; the gap shows in Prometheus
            log.warning("metrics: store unreadable", extra={"fields": {"error": str(exc).splitlines()[0]}})
            yield GaugeMetricFamily("fleet_store_up", "1 if the store answered this scrape", value=0)
            return
        yield GaugeMetricFamily("fleet_store_up", "1 if the store answered this scrape", value=1)
        by_state = GaugeMetricFamily("fleet_devices", "Devices in the registry, by state", labels=["state"])
        for state, n in sorted(devices.items()):
            by_state.add_metric([state], n)
        yield by_state
        r = GaugeMetricFamily("fleet_rollouts", "Rollouts, by state", labels=["state"])
        for state, n in sorted(rollouts.items()):
            r.add_metric([state], n)
        yield r
        if size is not None:
            yield GaugeMetricFamily("fleet_store_bytes", "The store's size on disk", value=size)


def registry(collector: FleetCollector) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    return reg
