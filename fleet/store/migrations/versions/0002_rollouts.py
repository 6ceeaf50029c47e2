"""Rollouts: signed artifacts, per-device desired and reported state, rollouts and their
executions, and every job status a device sent (a SQLite store's ``user_version`` 2).

Revision ID: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
RowId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.add_column("devices", sa.Column("state_since", sa.Double))
    op.create_table(
        "artifacts",
        sa.Column("kind", sa.Text, primary_key=True), sa.Column("name", sa.Text, primary_key=True),
        sa.Column("version", sa.Text, primary_key=True), sa.Column("sha256", sa.Text, nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False), sa.Column("doc", sa.Text, nullable=False),
        sa.Column("pushed_at", sa.Double, nullable=False), sa.Column("pushed_by", sa.Text),
    )
    op.create_index("artifacts_by_sha", "artifacts", ["sha256"])
    op.create_table(
        "desired",
        sa.Column("device", sa.Text, primary_key=True), sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("doc", sa.Text, nullable=False), sa.Column("updated_at", sa.Double, nullable=False),
    )
    op.create_table(
        "reported",
        sa.Column("device", sa.Text, primary_key=True), sa.Column("doc", sa.Text, nullable=False),
        sa.Column("at", sa.Double), sa.Column("received_at", sa.Double, nullable=False),
    )
    op.create_table(
        "rollouts",
        sa.Column("id", sa.Text, primary_key=True), sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("kind", sa.Text, nullable=False), sa.Column("slot", sa.Text, nullable=False),
        sa.Column("state", sa.Text, nullable=False), sa.Column("stage", sa.Integer, nullable=False),
        sa.Column("spec", sa.Text, nullable=False), sa.Column("reason", sa.Text), sa.Column("created_by", sa.Text),
        sa.Column("created_at", sa.Double, nullable=False), sa.Column("updated_at", sa.Double, nullable=False),
    )
    op.create_table(
        "executions",
        sa.Column("rollout", sa.Text, primary_key=True), sa.Column("device", sa.Text, primary_key=True),
        sa.Column("stage", sa.Integer, nullable=False), sa.Column("state", sa.Text, nullable=False),
        sa.Column("job_state", sa.Text), sa.Column("reason", sa.Text), sa.Column("previous", sa.Text),
        sa.Column("assigned_at", sa.Double), sa.Column("assigned_version", sa.BigInteger),
        sa.Column("active_at", sa.Double), sa.Column("finished_at", sa.Double), sa.Column("revert", sa.Text),
        sa.Column("revert_reason", sa.Text), sa.Column("revert_version", sa.BigInteger),
        sa.Column("updated_at", sa.Double, nullable=False),
    )
    op.create_table(
        "jobs",
        sa.Column("rowid", RowId, primary_key=True, autoincrement=True),
        sa.Column("device", sa.Text, nullable=False), sa.Column("job", sa.Text, nullable=False),
        sa.Column("slot", sa.Text), sa.Column("sha256", sa.Text), sa.Column("state", sa.Text, nullable=False),
        sa.Column("reason", sa.Text), sa.Column("at", sa.Double), sa.Column("received_at", sa.Double, nullable=False),
    )
    op.create_index("jobs_by_device", "jobs", ["device", "job"])
