"""Persistence of alert episodes: raise, escalate, clear and acknowledge."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, select, true, update
from sqlalchemy.exc import SQLAlchemyError

from bridge.errors import StoreError
from bridge.store.db import dialect_insert, utc
from bridge.store.models import Alert
from vitals_contract import METRICS, AlertState, Metric

if TYPE_CHECKING:
    from bridge.alerts import AlertChange


@dataclass(frozen=True, slots=True)
class AlertRecord:
    """An alert as stored."""

    id: int
    kiosk_id: str
    metric: str
    severity: str
    state: str
    value: float
    scan_id: str | None
    message: str
    raised_at: datetime
    updated_at: datetime
    cleared_at: datetime | None
    acknowledged_at: datetime | None
    acknowledged_by: str | None

    @property
    def estimate(self) -> bool:
        """Whether the alert rests on an estimated metric."""
        return METRICS[Metric(self.metric)].estimate

    def to_json(self) -> dict[str, Any]:
        """Render for the API and the live socket (``acknowledged_by`` stays out)."""
        return {
            "alert_id": self.id,
            "kiosk_id": self.kiosk_id,
            "metric": self.metric,
            "severity": self.severity,
            "state": self.state,
            "value": self.value,
            "scan_id": self.scan_id,
            "message": self.message,
            "estimate": self.estimate,
            "raised_at": self.raised_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "cleared_at": _iso(self.cleared_at),
            "acknowledged_at": _iso(self.acknowledged_at),
        }


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _record(row: Any) -> AlertRecord:
    return AlertRecord(
        id=row.id,
        kiosk_id=row.kiosk_id,
        metric=row.metric,
        severity=row.severity,
        state=row.state,
        value=row.value,
        scan_id=row.scan_id,
        message=row.message,
        raised_at=utc(row.raised_at),
        updated_at=utc(row.updated_at),
        cleared_at=utc(row.cleared_at) if row.cleared_at else None,
        acknowledged_at=utc(row.acknowledged_at) if row.acknowledged_at else None,
        acknowledged_by=row.acknowledged_by,
    )


class AlertStore:
    """Alert rows; one open episode per kiosk and metric is enforced by the schema."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._insert = dialect_insert(engine)

    def apply(
        self, changes: Sequence[AlertChange]
    ) -> list[tuple[AlertChange, AlertRecord, bool]]:
        """Persist changes in one transaction.

        Returns each change with the resulting record and whether this call made the
        change (False when another bridge instance had already raised the episode).
        """
        from bridge.alerts import ChangeKind

        out: list[tuple[AlertChange, AlertRecord, bool]] = []
        try:
            with self.engine.begin() as conn:
                for c in changes:
                    if c.kind is ChangeKind.RAISE:
                        row, made = self._raise(conn, c)
                    else:
                        assert c.alert_id is not None
                        values: dict[str, Any] = {
                            "severity": c.severity.value,
                            "value": c.value,
                            "message": c.describe(),
                            "updated_at": c.at,
                        }
                        if c.kind is ChangeKind.CLEAR:
                            values |= {
                                "state": AlertState.CLEARED.value,
                                "cleared_at": c.at,
                            }
                        else:  # escalated: a person must look again
                            values |= {
                                "state": AlertState.RAISED.value,
                                "acknowledged_at": None,
                                "acknowledged_by": None,
                            }
                        # Only an open episode changes, and only once: with several
                        # bridges evaluating the same readings, one of them wins.
                        changed = conn.execute(
                            update(Alert)
                            .where(
                                Alert.id == c.alert_id,
                                Alert.cleared_at.is_(None),
                                Alert.severity != c.severity.value
                                if c.kind is ChangeKind.ESCALATE
                                else true(),
                            )
                            .values(values)
                        )
                        row = conn.execute(
                            select(Alert).where(Alert.id == c.alert_id)
                        ).one()
                        made = changed.rowcount > 0
                    out.append((c, _record(row), made))
        except SQLAlchemyError as exc:
            raise StoreError(f"alert update failed: {type(exc).__name__}") from exc
        return out

    def _raise(self, conn: Any, c: AlertChange) -> tuple[Any, bool]:
        stmt = (
            self._insert(Alert)
            .values(
                kiosk_id=c.kiosk_id,
                metric=c.metric.value,
                severity=c.severity.value,
                state=AlertState.RAISED.value,
                value=c.value,
                scan_id=c.scan_id,
                message=c.describe(),
                raised_at=c.at,
                updated_at=c.at,
            )
            .on_conflict_do_nothing()
            .returning(Alert.id)
        )
        new_id = conn.execute(stmt).scalar_one_or_none()
        open_row = select(Alert).where(
            Alert.kiosk_id == c.kiosk_id,
            Alert.metric == c.metric.value,
            Alert.cleared_at.is_(None),
        )
        return conn.execute(open_row).one(), new_id is not None

    def acknowledge(self, alert_id: int, actor: str) -> AlertRecord | None:
        """Mark an alert acknowledged; None when there is no such alert."""
        now = datetime.now(UTC)
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    update(Alert)
                    .where(Alert.id == alert_id, Alert.acknowledged_at.is_(None))
                    .values(
                        acknowledged_at=now,
                        acknowledged_by=actor[:128],
                        updated_at=now,
                        state=AlertState.ACKNOWLEDGED.value,
                    )
                    .where(Alert.cleared_at.is_(None))
                )
                row = conn.execute(
                    select(Alert).where(Alert.id == alert_id)
                ).one_or_none()
        except SQLAlchemyError as exc:
            raise StoreError(f"acknowledge failed: {type(exc).__name__}") from exc
        return None if row is None else _record(row)

    def list(
        self, *, open_only: bool = False, kiosk_id: str | None = None, limit: int = 100
    ) -> list[AlertRecord]:
        """Return alerts, newest first, of one kiosk or of all."""
        query = select(Alert).order_by(Alert.id.desc()).limit(limit)
        if open_only:
            query = query.where(Alert.cleared_at.is_(None))
        if kiosk_id is not None:
            query = query.where(Alert.kiosk_id == kiosk_id)
        try:
            with self.engine.connect() as conn:
                return [_record(row) for row in conn.execute(query)]
        except SQLAlchemyError as exc:
            raise StoreError(f"alerts query failed: {type(exc).__name__}") from exc
