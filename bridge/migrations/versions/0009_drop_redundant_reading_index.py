"""drop ix_readings_metric_time: ix_readings_metric_time_id serves its queries

Every insert maintains every index, and (metric, measured_at) is a prefix of
(metric, measured_at, id), so the shorter one only cost ingest time.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03 21:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_readings_metric_time", table_name="readings")


def downgrade() -> None:
    op.create_index(
        "ix_readings_metric_time", "readings", ["metric", "measured_at"], unique=False
    )
