"""The fleet store's tables, one definition for SQLite and PostgreSQL (SQLAlchemy Core).

The migrations in ``migrations/versions`` build exactly these; the store's queries are
written against them. Two dialect differences are spelled here once: the ordering column
``rowid`` (SQLite's own row id, an identity column on PostgreSQL) and the database's
clock (:class:`db_now`), which the lease reads so that managers on machines whose
clocks disagree still agree on when a lease ends.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import FunctionElement

metadata = sa.MetaData()

Id = sa.Text
Time = sa.Double
RowId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # INTEGER PRIMARY KEY is SQLite's rowid


def _rowid() -> sa.Column:
    # arrival order: `fleet events tail --follow` and the job inbox read on from the last row seen
    return sa.Column("rowid", RowId, primary_key=True, autoincrement=True)


events = sa.Table(
    "events", metadata,
    _rowid(),
    sa.Column("id", Id, nullable=False),
    sa.Column("device", Id, nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("camera", Id),
    sa.Column("captured_at", Time, nullable=False),
    sa.Column("recorded_at", Time, nullable=False),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("batch", Id, nullable=False),
    sa.Column("received_at", Time, nullable=False),
    sa.Index("events_by_id", "id", unique=True),  # an event is stored once, whichever manager gets it
    sa.Index("events_by_device", "device", "id"),
    sa.Index("events_by_kind", "kind", "id"),
    sa.Index("events_by_time", "captured_at"),
    sa.Index("events_by_device_kind", "device", "kind", "id"),  # a device's latest health, its series
    sa.Index("events_by_kind_time", "kind", "captured_at"),  # alerts in the last hour
)

devices = sa.Table(
    "devices", metadata,
    sa.Column("id", Id, primary_key=True),
    sa.Column("state", sa.Text),
    sa.Column("site", sa.Text),
    sa.Column("line", sa.Text),
    sa.Column("runtime", sa.Text),
    sa.Column("models", sa.Text),
    sa.Column("status_at", Time),
    sa.Column("first_seen", Time, nullable=False),
    sa.Column("last_seen", Time, nullable=False),
    sa.Column("events", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("state_since", Time),  # when the device last went online or offline
    sa.Column("clock_skew_s", sa.Double),  # its clock minus the manager's, at its last batch
    sa.Index("devices_by_tags", "site", "line"),
    sa.Index("devices_by_condition", "site", "line", "state", "last_seen"),  # the console's counts, index only
)

artifacts = sa.Table(
    "artifacts", metadata,
    sa.Column("kind", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("version", sa.Text, primary_key=True),
    sa.Column("sha256", sa.Text, nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("doc", sa.Text, nullable=False),
    sa.Column("pushed_at", Time, nullable=False),
    sa.Column("pushed_by", sa.Text),
    sa.Index("artifacts_by_sha", "sha256"),
)

desired = sa.Table(
    "desired", metadata,
    sa.Column("device", Id, primary_key=True),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("doc", sa.Text, nullable=False),
    sa.Column("updated_at", Time, nullable=False),
)

reported = sa.Table(
    "reported", metadata,
    sa.Column("device", Id, primary_key=True),
    sa.Column("doc", sa.Text, nullable=False),
    sa.Column("at", Time),
    sa.Column("received_at", Time, nullable=False),
)

rollouts = sa.Table(
    "rollouts", metadata,
    sa.Column("id", Id, primary_key=True),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("slot", sa.Text, nullable=False),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("stage", sa.Integer, nullable=False),
    sa.Column("spec", sa.Text, nullable=False),
    sa.Column("reason", sa.Text),
    sa.Column("created_by", sa.Text),
    sa.Column("created_at", Time, nullable=False),
    sa.Column("updated_at", Time, nullable=False),
)

executions = sa.Table(
    "executions", metadata,
    sa.Column("rollout", Id, primary_key=True),
    sa.Column("device", Id, primary_key=True),
    sa.Column("stage", sa.Integer, nullable=False),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("job_state", sa.Text),
    sa.Column("reason", sa.Text),
    sa.Column("previous", sa.Text),
    sa.Column("assigned_at", Time),
    sa.Column("assigned_version", sa.BigInteger),
    sa.Column("active_at", Time),
    sa.Column("finished_at", Time),
    sa.Column("revert", sa.Text),
    sa.Column("revert_reason", sa.Text),
    sa.Column("revert_version", sa.BigInteger),
    sa.Column("updated_at", Time, nullable=False),
    sa.Index("executions_by_device", "device"),  # a device's history, for `fleet devices show`
)

jobs = sa.Table(
    "jobs", metadata,
    _rowid(),
    sa.Column("device", Id, nullable=False),
    sa.Column("job", Id, nullable=False),
    sa.Column("slot", sa.Text),
    sa.Column("sha256", sa.Text),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("reason", sa.Text),
    sa.Column("at", Time),
    sa.Column("received_at", Time, nullable=False),
    # stored by every manager that hears it, judged once by the one running rollouts
    sa.Column("pending", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Index("jobs_by_device", "device", "job"),
    sa.Index("jobs_once", "device", "job", "state", "at", unique=True),
    sa.Index("jobs_pending", "job",  # the few statuses not yet judged (SQLite indexes no rowid)
              postgresql_where=sa.text("pending"), sqlite_where=sa.text("pending")),
)

leases = sa.Table(
    "leases", metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("holder", sa.Text, nullable=False),
    sa.Column("epoch", sa.BigInteger, nullable=False),  # grows at every change of holder: a fencing token
    sa.Column("acquired_at", Time, nullable=False),
    sa.Column("expires_at", Time, nullable=False),
)

answers = sa.Table(
    "answers", metadata,  # operator requests that changed something, so a re-sent request is not run twice
    sa.Column("identity", sa.Text, primary_key=True),
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("response", sa.Text, nullable=False),
    sa.Column("at", Time, nullable=False),
)

blobs = sa.Table(
    "blobs", metadata,  # artifact bytes, so that any manager that takes the lease can serve them
    sa.Column("sha256", sa.Text, primary_key=True),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("data", sa.LargeBinary, nullable=False),
)

identities = sa.Table(
    "identities", metadata,  # who may connect to the broker, as what, with which credential (fleet.identities)
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("role", sa.Text, nullable=False),
    sa.Column("site", sa.Text),
    sa.Column("line", sa.Text),
    sa.Column("tags", sa.Text, nullable=False),
    sa.Column("credential", sa.Text, nullable=False),
    sa.Column("serials", sa.Text, nullable=False),  # JSON: a certificate's serial per connection, for revocation
    sa.Column("retired_serials", sa.Text, nullable=False),  # JSON: of the name's earlier credentials
    sa.Column("password_hash", sa.Text),  # only the hash the broker's password file holds
    sa.Column("not_after", Time),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("created_at", Time, nullable=False),
    sa.Column("revoked_at", Time),
)

ROLLOUT_TABLES = {t.name: t for t in (desired, reported, rollouts, executions)}


class db_now(FunctionElement):
    """The database server's clock, in seconds since the epoch."""

    type = sa.Double()
    inherit_cache = True


@compiles(db_now, "postgresql")
def _pg_now(element, compiler, **kw) -> str:
    return "extract(epoch from clock_timestamp())::float8"


@compiles(db_now, "sqlite")
def _sqlite_now(element, compiler, **kw) -> str:
    return "((julianday('now') - 2440587.5) * 86400.0)"
