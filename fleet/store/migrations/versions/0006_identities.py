"""Broker identities: who may connect (devices, managers, operators, controllers, the
administrator), with what credential, and whether it is revoked. A password is kept
only as the hash the broker's password file holds; a certificate by its serial numbers
(one per connection of the identity), for the revocation list.

Revision ID: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"


def upgrade() -> None:
    op.create_table(
        "identities",
        sa.Column("name", sa.Text, primary_key=True), sa.Column("role", sa.Text, nullable=False),
        sa.Column("site", sa.Text), sa.Column("line", sa.Text), sa.Column("tags", sa.Text, nullable=False),
        sa.Column("credential", sa.Text, nullable=False), sa.Column("serials", sa.Text, nullable=False),
        sa.Column("retired_serials", sa.Text, nullable=False), sa.Column("password_hash", sa.Text),
        sa.Column("not_after", sa.Double), sa.Column("state", sa.Text, nullable=False),
        sa.Column("created_at", sa.Double, nullable=False), sa.Column("revoked_at", sa.Double),
    )
