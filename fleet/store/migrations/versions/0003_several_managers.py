"""Several managers on one store: the lease that chooses the one running rollouts, job
statuses stored once by whichever managers hear them and judged once, the answers to
operator requests that changed something, artifact bytes any manager can serve, and
the indexes a console over 10,000
devices and a million events reads through.

Revision ID: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    # every status stored before this was judged by the one manager there was
    op.add_column("jobs", sa.Column("pending", sa.Boolean, nullable=False, server_default=sa.false()))
    # a status delivered twice (QoS 1) was kept twice; from now on the database keeps one
    op.execute("DELETE FROM jobs WHERE rowid NOT IN (SELECT min(rowid) FROM jobs GROUP BY device, job, state, at)")
    op.create_index("jobs_once", "jobs", ["device", "job", "state", "at"], unique=True)
    op.create_index("jobs_pending", "jobs", ["job"], postgresql_where=sa.text("pending"),
                    sqlite_where=sa.text("pending"))
    op.create_index("events_by_time", "events", ["captured_at"])
    op.create_index("devices_by_tags", "devices", ["site", "line"])
    op.create_index("executions_by_device", "executions", ["device"])
    op.create_table(
        "leases",
        sa.Column("name", sa.Text, primary_key=True), sa.Column("holder", sa.Text, nullable=False),
        sa.Column("epoch", sa.BigInteger, nullable=False), sa.Column("acquired_at", sa.Double, nullable=False),
        sa.Column("expires_at", sa.Double, nullable=False),
    )
    op.create_table(
        "answers",
        sa.Column("identity", sa.Text, primary_key=True), sa.Column("id", sa.Text, primary_key=True),
        sa.Column("response", sa.Text, nullable=False), sa.Column("at", sa.Double, nullable=False),
    )
    op.create_table(
        "blobs",
        sa.Column("sha256", sa.Text, primary_key=True), sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
    )
