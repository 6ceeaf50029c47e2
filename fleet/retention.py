"""Event retention: events older than a kind's limit deleted in small batches.

``fleet serve --retain-events 30d --retain-events alert=90d``: each kind with a limit of
its own keeps its events that long, every other kind the default ("*"). Only the manager
holding the lease purges (several managers would only race each other for the same
rows). Each batch is one short transaction of at most :data:`BATCH` rows, with a pause
after it, so the ingest's writes never wait behind a long delete.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Mapping

from edge.core.logs import fields

from .store import DatabaseError, Store

log = logging.getLogger("fleet.retention")

EVERY_KIND = "*"
BATCH = 1000
PAUSE_S = 0.05  # between batches: the ingest's turn
INTERVAL_S = 60.0


class Retention:
    """Purges on its own thread while ``leading()``, every ``interval_s``, until :meth:`stop`."""

    def __init__(self, store: Store, keep_s: Mapping[str, float], leading: Callable[[], bool], *,
                 interval_s: float = INTERVAL_S, batch: int = BATCH) -> None:
        self.store = store
        self.keep_s = dict(keep_s)
        self.leading = leading
        self.interval_s = interval_s
        self.batch = batch
        self.purged = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="retention", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self.interval_s)):
            if not self.leading():
                continue
            try:
                self.purge(time.time())
            except DatabaseError as exc:
                log.warning("retention: store unavailable; trying again later",
                            extra=fields(error=str(getattr(exc, "orig", exc)).splitlines()[0][:200]))
            self._stop.wait(self.interval_s)

    def purge(self, now: float) -> int:
        """Every event past its kind's limit, a batch at a time; returns how many went."""
        own = [k for k in self.keep_s if k != EVERY_KIND]
        done = 0
        for kind, keep in self.keep_s.items():
            while not self._stop.is_set():
                n = self.store.purge_events(now - keep, kind=None if kind == EVERY_KIND else kind,
                                            keep_kinds=own if kind == EVERY_KIND else (), limit=self.batch)
                done += n
                if n < self.batch:
                    break
                self._stop.wait(PAUSE_S)
        if done:
            self.purged += done
            log.info("events purged", extra=fields(events=done, kept_s=self.keep_s))
        return done


def parse_rules(values: list[str], duration: Callable[[str], float]) -> dict[str, float]:
    """``30d`` (every kind) and ``KIND=90d`` into kind -> seconds; ValueError naming the bad one."""
    rules: dict[str, float] = {}
    for value in values:
        kind, _, keep = value.rpartition("=")
        seconds = duration(keep)
        if seconds <= 0:
            raise ValueError(f"--retain-events {value}: keep events for more than 0 s")
        rules[kind or EVERY_KIND] = seconds
    return rules
