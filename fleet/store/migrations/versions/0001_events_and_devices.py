"""Events keyed by id, and the device registry (a SQLite store's ``user_version`` 1).

Revision ID: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
RowId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column("rowid", RowId, primary_key=True, autoincrement=True),
        sa.Column("id", sa.Text, nullable=False), sa.Column("device", sa.Text, nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False), sa.Column("kind", sa.Text, nullable=False),
        sa.Column("camera", sa.Text), sa.Column("captured_at", sa.Double, nullable=False),
        sa.Column("recorded_at", sa.Double, nullable=False), sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("payload", sa.Text, nullable=False), sa.Column("batch", sa.Text, nullable=False),
        sa.Column("received_at", sa.Double, nullable=False),
    )
    op.create_index("events_by_id", "events", ["id"], unique=True)
    op.create_index("events_by_device", "events", ["device", "id"])
    op.create_index("events_by_kind", "events", ["kind", "id"])
    op.create_table(
        "devices",
        sa.Column("id", sa.Text, primary_key=True), sa.Column("state", sa.Text), sa.Column("site", sa.Text),
        sa.Column("line", sa.Text), sa.Column("runtime", sa.Text), sa.Column("models", sa.Text),
        sa.Column("status_at", sa.Double), sa.Column("first_seen", sa.Double, nullable=False),
        sa.Column("last_seen", sa.Double, nullable=False),
        sa.Column("events", sa.BigInteger, nullable=False, server_default="0"),
    )
