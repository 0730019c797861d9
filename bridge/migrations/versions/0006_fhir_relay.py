"""fhir relay

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 17:45:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "fhir_relay",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("kiosk_id", sa.String(length=64), nullable=False),
        sa.Column("scan_id", sa.String(length=64), nullable=False),
        sa.Column("event_id", sa.BigInteger(), nullable=False),
        sa.Column("event_seq", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("next_attempt_at", _TS, nullable=False),
        sa.Column("lease_owner", sa.String(length=64), nullable=True),
        sa.Column("lease_until", _TS, nullable=True),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.String(length=500), nullable=True),
        sa.Column("observations", sa.Integer(), nullable=True),
        sa.Column("delivered_at", _TS, nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("kiosk_id", "scan_id", name="uq_fhir_relay_scan"),
    )
    op.create_index("ix_fhir_relay_due", "fhir_relay", ["state", "next_attempt_at"])
    op.create_index("ix_fhir_relay_event_id", "fhir_relay", ["event_id"])


def downgrade() -> None:
    op.drop_index("ix_fhir_relay_event_id", table_name="fhir_relay")
    op.drop_index("ix_fhir_relay_due", table_name="fhir_relay")
    op.drop_table("fhir_relay")
