"""The console's indexes: a device's newest events of one kind (its latest health
figures, its health series) and one kind's events in a time range (alerts in the last
hour) each read as a range of an index, not a scan of every event of that kind; the
devices counted by site, line and condition off an index that holds all four.

Revision ID: 0005
"""

from alembic import op

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    op.create_index("events_by_device_kind", "events", ["device", "kind", "id"])
    op.create_index("events_by_kind_time", "events", ["kind", "captured_at"])
    op.create_index("devices_by_condition", "devices", ["site", "line", "state", "last_seen"])


def downgrade() -> None:
    op.drop_index("devices_by_condition", "devices")
    op.drop_index("events_by_kind_time", "events")
    op.drop_index("events_by_device_kind", "events")
