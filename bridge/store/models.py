"""SQLAlchemy 2 models of the vitals store.

Readings are keyed by ``(kiosk_id, seq)``, the identity a reading keeps from the
kiosk to the EHR; ``id`` is the store's own ascending position, which WebSocket
clients use to resume after a disconnect.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# SQLite only auto-increments an INTEGER PRIMARY KEY.
BigIntId = BigInteger().with_variant(Integer, "sqlite")
Timestamp = DateTime(timezone=True)


class Base(DeclarativeBase):
    """Declarative base of all tables."""


class Kiosk(Base):
    """A kiosk the bridge has heard from, with its delivery high-water mark."""

    __tablename__ = "kiosks"

    kiosk_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    committed_through: Mapped[int] = mapped_column(BigInteger, default=-1)
    state: Mapped[str] = mapped_column(String(16), default="unknown")
    agent_version: Mapped[str | None] = mapped_column(String(32))
    status_at: Mapped[datetime | None] = mapped_column(Timestamp)
    last_seen_at: Mapped[datetime | None] = mapped_column(Timestamp)


class Scan(Base):
    """One face scan on one kiosk, optionally bound to a patient."""

    __tablename__ = "scans"
    __table_args__ = (
        # Pages of the scans list (migration 0008).
        Index("ix_scans_started", "started_at", "kiosk_id", "scan_id"),
    )

    kiosk_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    scan_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[str] = mapped_column(String(16))
    patient_ref: Mapped[str | None] = mapped_column(String(128), index=True)
    started_at: Mapped[datetime] = mapped_column(Timestamp)
    updated_at: Mapped[datetime] = mapped_column(Timestamp)
    reason: Mapped[str | None] = mapped_column(String(200))


class ScanEventRow(Base):
    """A scan state change as the kiosk sent it."""

    __tablename__ = "scan_events"
    __table_args__ = (
        UniqueConstraint("kiosk_id", "seq", name="uq_scan_events_seq"),
        Index("ix_scan_events_scan", "kiosk_id", "scan_id"),  # migration 0008
    )

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    kiosk_id: Mapped[str] = mapped_column(String(64))
    seq: Mapped[int] = mapped_column(BigInteger)
    scan_id: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    at: Mapped[datetime] = mapped_column(Timestamp)
    reason: Mapped[str | None] = mapped_column(String(200))


class ReadingRow(Base):
    """One stored vital-sign reading."""

    __tablename__ = "readings"
    __table_args__ = (
        UniqueConstraint("kiosk_id", "seq", name="uq_readings_kiosk_seq"),
        Index("ix_readings_kiosk_time", "kiosk_id", "measured_at"),
        # Keyset pages of the FHIR search (migration 0003); the second also
        # serves every (metric, measured_at) query (migration 0009 dropped that
        # index: each one is paid on every insert).
        Index("ix_readings_time_id", "measured_at", "id"),
        Index("ix_readings_metric_time_id", "metric", "measured_at", "id"),
        Index("ix_readings_scan", "kiosk_id", "scan_id"),
    )

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    kiosk_id: Mapped[str] = mapped_column(String(64))
    seq: Mapped[int] = mapped_column(BigInteger)
    scan_id: Mapped[str | None] = mapped_column(String(64))
    metric: Mapped[str] = mapped_column(String(32))
    value: Mapped[float] = mapped_column(Float)
    unit: Mapped[str] = mapped_column(String(16))
    quality: Mapped[float] = mapped_column(Float)
    final: Mapped[bool] = mapped_column(Boolean, default=False)
    measured_at: Mapped[datetime] = mapped_column(Timestamp)
    received_at: Mapped[datetime] = mapped_column(Timestamp)


class DeadLetter(Base):
    """A message or reading that failed validation, kept for inspection."""

    __tablename__ = "dead_letters"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    received_at: Mapped[datetime] = mapped_column(Timestamp, index=True)
    topic: Mapped[str] = mapped_column(String(256))
    kiosk_id: Mapped[str | None] = mapped_column(String(64))
    seq: Mapped[int | None] = mapped_column(BigInteger)
    reason: Mapped[str] = mapped_column(String(500))
    size_bytes: Mapped[int] = mapped_column(Integer)
    payload: Mapped[bytes] = mapped_column(LargeBinary)


class Alert(Base):
    """A threshold alert episode: raised, maybe acknowledged, then cleared."""

    __tablename__ = "alerts"
    __table_args__ = (
        # At most one open episode per kiosk and metric, whichever bridge raises it.
        Index(
            "uq_alerts_open",
            "kiosk_id",
            "metric",
            unique=True,
            sqlite_where=text("cleared_at IS NULL"),
            postgresql_where=text("cleared_at IS NULL"),
        ),
        Index("ix_alerts_raised", "raised_at"),
    )

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    kiosk_id: Mapped[str] = mapped_column(String(64))
    metric: Mapped[str] = mapped_column(String(32))
    severity: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16))
    value: Mapped[float] = mapped_column(Float)
    scan_id: Mapped[str | None] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(String(200))
    raised_at: Mapped[datetime] = mapped_column(Timestamp)
    updated_at: Mapped[datetime] = mapped_column(Timestamp)
    cleared_at: Mapped[datetime | None] = mapped_column(Timestamp)
    acknowledged_at: Mapped[datetime | None] = mapped_column(Timestamp)
    acknowledged_by: Mapped[str | None] = mapped_column(String(128))


class AuditEvent(Base):
    """Who read or changed what, when: reads of patient-linked data and admin acts."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(Timestamp, index=True)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(32))
    resource: Mapped[str] = mapped_column(String(256))
    outcome: Mapped[str] = mapped_column(String(16))
    detail: Mapped[str | None] = mapped_column(String(500))


class RevokedToken(Base):
    """An access token withdrawn before its expiry, by its ``jti``."""

    __tablename__ = "revoked_tokens"

    jti: Mapped[str] = mapped_column(String(64), primary_key=True)
    revoked_at: Mapped[datetime] = mapped_column(Timestamp)
    expires_at: Mapped[datetime] = mapped_column(Timestamp, index=True)


class FhirRelayEntry(Base):
    """A completed scan to push to the external FHIR server, with its delivery state.

    ``state`` is ``pending``, ``delivered``, ``failed`` (permanent, until an admin
    retries it) or ``skipped`` (no final readings to send). A worker owns a pending
    entry while ``lease_until`` lies ahead; ``event_id`` is the ``scan_events.id``
    of the completion, the relay's watermark.
    """

    __tablename__ = "fhir_relay"
    __table_args__ = (
        UniqueConstraint("kiosk_id", "scan_id", name="uq_fhir_relay_scan"),
        Index("ix_fhir_relay_due", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    kiosk_id: Mapped[str] = mapped_column(String(64))
    scan_id: Mapped[str] = mapped_column(String(64))
    event_id: Mapped[int] = mapped_column(BigInteger, index=True)
    event_seq: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(Timestamp)
    next_attempt_at: Mapped[datetime] = mapped_column(Timestamp)
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None] = mapped_column(Timestamp)
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(String(500))
    observations: Mapped[int | None] = mapped_column(Integer)
    delivered_at: Mapped[datetime | None] = mapped_column(Timestamp)


class FhirSubscription(Base):
    """A topic-based FHIR Subscription (R4 backport) and its event counter.

    ``events_since_start`` is the counter row: event numbers are taken from it in
    the transaction that logs the events, so they never repeat across processes.
    """

    __tablename__ = "fhir_subscriptions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    status: Mapped[str] = mapped_column(String(16))
    topic: Mapped[str] = mapped_column(String(256))
    filters: Mapped[str] = mapped_column(Text)  # JSON list of filter-criteria
    content: Mapped[str] = mapped_column(String(16))
    heartbeat_seconds: Mapped[int | None] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(String(500))
    end_at: Mapped[datetime | None] = mapped_column(Timestamp)
    created_at: Mapped[datetime] = mapped_column(Timestamp)
    events_since_start: Mapped[int] = mapped_column(BigInteger, default=0)
    error: Mapped[str | None] = mapped_column(String(200))


class FhirSubscriptionEvent(Base):
    """One numbered event of a Subscription: a reading that matched its filters."""

    __tablename__ = "fhir_subscription_events"
    __table_args__ = (
        # One event per reading per Subscription, whichever process logs it first.
        UniqueConstraint(
            "subscription_id", "kiosk_id", "seq", name="uq_fhir_sub_events_reading"
        ),
    )

    subscription_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    number: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    kiosk_id: Mapped[str] = mapped_column(String(64))
    seq: Mapped[int] = mapped_column(BigInteger)
    reading_id: Mapped[int] = mapped_column(BigInteger)
    at: Mapped[datetime] = mapped_column(Timestamp)


class FhirBindingToken(Base):
    """A single-use websocket binding token, stored by its SHA-256 only."""

    __tablename__ = "fhir_binding_tokens"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    subscription_id: Mapped[str] = mapped_column(String(64), index=True)
    subject: Mapped[str] = mapped_column(String(128))
    # Whether the access token that asked for it may read Observations.
    observations: Mapped[bool] = mapped_column(Boolean)
    access_jti: Mapped[str] = mapped_column(String(64))
    access_expires_at: Mapped[datetime] = mapped_column(Timestamp)
    expires_at: Mapped[datetime] = mapped_column(Timestamp, index=True)
    used_at: Mapped[datetime | None] = mapped_column(Timestamp)


class ExportJob(Base):
    """A FHIR Bulk Data ``$export`` job: who asked, for what, how far it got."""

    __tablename__ = "export_jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)  # token subject
    status: Mapped[str] = mapped_column(String(16))
    request_url: Mapped[str] = mapped_column(Text)
    parameters: Mapped[str] = mapped_column(Text)  # JSON, re-parsed by the worker
    transaction_time: Mapped[datetime] = mapped_column(Timestamp)
    created_at: Mapped[datetime] = mapped_column(Timestamp)
    # Touched while queued or running: a job left untouched lost its process.
    updated_at: Mapped[datetime] = mapped_column(Timestamp)
    expires_at: Mapped[datetime | None] = mapped_column(Timestamp, index=True)
    exported: Mapped[int] = mapped_column(BigInteger, default=0)
    total: Mapped[int | None] = mapped_column(BigInteger)
    output: Mapped[str | None] = mapped_column(Text)  # JSON list of files
    error: Mapped[str | None] = mapped_column(String(500))
