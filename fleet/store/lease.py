"""The lease that chooses the one manager running rollouts, transfers and operator
requests: a row in the store with a holder, an epoch and an expiry on the database's
clock.

A manager takes the lease when it is free or expired, and renews it well before it
expires; one that cannot renew in time stops acting as the leader on its own. The epoch
grows at every change of holder and fences the leader's writes (:class:`~.store.Fence`):
a manager that lost the lease while paused or cut off cannot commit anything after
another has taken it. A row, not a PostgreSQL advisory lock, so that the same code runs
on SQLite and the expiry (hence the failover time) is ours to bound: an advisory lock
lives as long as its session, and a half-open connection can keep one for minutes.
"""

from __future__ import annotations

import sqlalchemy as sa

from . import schema as S
from .store import Fence, Store

CONTROL = "control"


class Lease:
    """One named lease in ``store``, taken and renewed for ``holder``."""

    def __init__(self, store: Store, holder: str, *, duration_s: float, name: str = CONTROL) -> None:
        self.store = store
        self.holder = holder
        self.duration_s = duration_s
        self.name = name

    def acquire(self) -> Fence | None:
        """Take the lease if nobody holds it (or its holder let it expire); the fence, or None."""
        t = S.leases
        now = S.db_now()
        with self.store.engine.begin() as c:
            taken = c.execute(self.store._insert(t).values(
                name=self.name, holder=self.holder, epoch=1, acquired_at=now, expires_at=now + self.duration_s,
            ).on_conflict_do_nothing().returning(t.c.epoch)).scalar()
            if taken is None:
                taken = c.execute(sa.update(t).where(t.c.name == self.name, t.c.expires_at <= now).values(
                    holder=self.holder, epoch=t.c.epoch + 1, acquired_at=now, expires_at=now + self.duration_s,
                ).returning(t.c.epoch)).scalar()
        return Fence(self.name, self.holder, taken) if taken is not None else None

    def renew(self, fence: Fence) -> bool:
        """Extend a lease still held; False if it was lost (expired, or taken over)."""
        t = S.leases
        now = S.db_now()
        with self.store.engine.begin() as c:
            kept = c.execute(sa.update(t).where(
                t.c.name == fence.name, t.c.holder == fence.holder, t.c.epoch == fence.epoch, t.c.expires_at > now,
            ).values(expires_at=now + self.duration_s).returning(t.c.epoch)).scalar()
        return kept is not None

    def release(self, fence: Fence) -> None:
        """Give the lease up at once (a clean stop): another manager need not wait for it to expire."""
        t = S.leases
        with self.store.engine.begin() as c:
            c.execute(sa.update(t).where(t.c.name == fence.name, t.c.holder == fence.holder,
                                         t.c.epoch == fence.epoch).values(expires_at=S.db_now()))

    def state(self) -> dict | None:
        """Who holds the lease, since when and until when (database clock), or None."""
        t = S.leases
        with self.store.engine.connect() as c:
            row = c.execute(sa.select(t.c.holder, t.c.epoch, t.c.acquired_at, t.c.expires_at,
                                      S.db_now().label("now")).where(t.c.name == self.name)).mappings().first()
        return dict(row) if row else None
