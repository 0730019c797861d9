"""indexes for the scans REST resources

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 19:20:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Pages of GET /api/v1/scans, in (started_at, kiosk_id, scan_id) order.
    op.create_index(
        "ix_scans_started", "scans", ["started_at", "kiosk_id", "scan_id"], unique=False
    )
    # One scan's events (GET /api/v1/scans/{kiosk}/{scan}).
    op.create_index(
        "ix_scan_events_scan", "scan_events", ["kiosk_id", "scan_id"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_scan_events_scan", table_name="scan_events")
    op.drop_index("ix_scans_started", table_name="scans")
