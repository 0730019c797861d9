"""indexes for the FHIR facade's keyset pages

Observation searches page on ``(measured_at, id)``, optionally within one metric;
these indexes let both databases read a page straight off an index.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03 15:30:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("readings", schema=None) as batch_op:
        batch_op.create_index("ix_readings_time_id", ["measured_at", "id"])
        batch_op.create_index(
            "ix_readings_metric_time_id", ["metric", "measured_at", "id"]
        )


def downgrade() -> None:
    with op.batch_alter_table("readings", schema=None) as batch_op:
        batch_op.drop_index("ix_readings_metric_time_id")
        batch_op.drop_index("ix_readings_time_id")
