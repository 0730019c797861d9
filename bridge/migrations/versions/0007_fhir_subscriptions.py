"""fhir subscriptions

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 17:45:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "fhir_subscriptions",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("owner", sa.String(length=128), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("topic", sa.String(length=256), nullable=False),
        sa.Column("filters", sa.Text(), nullable=False),
        sa.Column("content", sa.String(length=16), nullable=False),
        sa.Column("heartbeat_seconds", sa.Integer(), nullable=True),
        sa.Column("reason", sa.String(length=500), nullable=False),
        sa.Column("end_at", _TS, nullable=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("events_since_start", sa.BigInteger(), nullable=False),
        sa.Column("error", sa.String(length=200), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_fhir_subscriptions_owner", "fhir_subscriptions", ["owner"], unique=False
    )
    op.create_table(
        "fhir_subscription_events",
        sa.Column("subscription_id", sa.String(length=64), nullable=False),
        sa.Column("number", sa.BigInteger(), nullable=False),
        sa.Column("kiosk_id", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("reading_id", sa.BigInteger(), nullable=False),
        sa.Column("at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("subscription_id", "number"),
        sa.UniqueConstraint(
            "subscription_id", "kiosk_id", "seq", name="uq_fhir_sub_events_reading"
        ),
    )
    op.create_table(
        "fhir_binding_tokens",
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("subscription_id", sa.String(length=64), nullable=False),
        sa.Column("subject", sa.String(length=128), nullable=False),
        sa.Column("observations", sa.Boolean(), nullable=False),
        sa.Column("access_jti", sa.String(length=64), nullable=False),
        sa.Column("access_expires_at", _TS, nullable=False),
        sa.Column("expires_at", _TS, nullable=False),
        sa.Column("used_at", _TS, nullable=True),
        sa.PrimaryKeyConstraint("token_hash"),
    )
    op.create_index(
        "ix_fhir_binding_tokens_subscription_id",
        "fhir_binding_tokens",
        ["subscription_id"],
        unique=False,
    )
    op.create_index(
        "ix_fhir_binding_tokens_expires_at",
        "fhir_binding_tokens",
        ["expires_at"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index("ix_fhir_binding_tokens_expires_at", table_name="fhir_binding_tokens")
    op.drop_index(
        "ix_fhir_binding_tokens_subscription_id", table_name="fhir_binding_tokens"
    )
    op.drop_table("fhir_binding_tokens")
    op.drop_table("fhir_subscription_events")
    op.drop_index("ix_fhir_subscriptions_owner", table_name="fhir_subscriptions")
    op.drop_table("fhir_subscriptions")
