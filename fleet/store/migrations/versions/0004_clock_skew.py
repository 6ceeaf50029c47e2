"""Each device's clock skew, measured at ingest from its batches' send times.

Revision ID: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    op.add_column("devices", sa.Column("clock_skew_s", sa.Double))


def downgrade() -> None:
    op.drop_column("devices", "clock_skew_s")
