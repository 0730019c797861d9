"""Read queries behind the REST resources: kiosk detail and status, scans.

Everything here only reads, on SQLite and PostgreSQL alike, through the indexes
the schema has: ``readings (kiosk_id, measured_at)``, ``(kiosk_id, seq)`` and
``(kiosk_id, scan_id)``, the scans' primary key ``(kiosk_id, scan_id)`` and
``scans.patient_ref``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, func, select, tuple_, union_all
from sqlalchemy.exc import SQLAlchemyError

from bridge.errors import StoreError
from bridge.store.db import StoredReading, reading_from_row, utc
from bridge.store.models import DeadLetter, Kiosk, ReadingRow, Scan, ScanEventRow
from vitals_contract import Metric

_r = ReadingRow.__table__
_s = Scan.__table__
_k = Kiosk.__table__
_e = ScanEventRow.__table__
_d = DeadLetter.__table__


def _iso(value: datetime | None) -> str | None:
    return None if value is None else utc(value).isoformat()


@dataclass(frozen=True, slots=True)
class KioskRecord:
    """A kiosk as the ``kiosks`` table holds it."""

    kiosk_id: str
    state: str
    agent_version: str | None
    committed_through: int
    status_at: datetime | None
    last_seen_at: datetime | None

    def to_json(self) -> dict[str, Any]:
        """Render for the API."""
        return {
            "kiosk_id": self.kiosk_id,
            "state": self.state,
            "agent_version": self.agent_version,
            "committed_through": self.committed_through,
            "status_at": _iso(self.status_at),
            "last_seen_at": _iso(self.last_seen_at),
        }


@dataclass(frozen=True, slots=True)
class KioskCounts:
    """Counts an operator looks at to judge a kiosk's delivery."""

    readings_recent: int  # readings measured since the window's start
    dead_letters_recent: int  # rejected messages received since then
    scans_by_state: dict[str, int]  # all scans ever stored, by current state
    last_reading: StoredReading | None  # the kiosk's highest seq


@dataclass(frozen=True, slots=True)
class ScanRecord:
    """A scan as the ``scans`` table holds it."""

    kiosk_id: str
    scan_id: str
    state: str
    patient_ref: str | None
    started_at: datetime
    updated_at: datetime
    reason: str | None

    @property
    def key(self) -> ScanKey:
        """The scan's position in list order."""
        return ScanKey(self.started_at, self.kiosk_id, self.scan_id)

    def to_json(self, *, with_patient: bool) -> dict[str, Any]:
        """Render for the API; ``patient_ref`` only for callers allowed to see it."""
        body: dict[str, Any] = {
            "kiosk_id": self.kiosk_id,
            "scan_id": self.scan_id,
            "state": self.state,
            "started_at": self.started_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "reason": self.reason,
        }
        if with_patient:
            body["patient_ref"] = self.patient_ref
        return body


@dataclass(frozen=True, slots=True)
class ScanKey:
    """Where a scan sits in list order: start time, then kiosk and scan id."""

    started_at: datetime
    kiosk_id: str
    scan_id: str


@dataclass(frozen=True, slots=True)
class ScanEventRecord:
    """One scan state change as the kiosk sent it."""

    seq: int
    state: str
    at: datetime
    reason: str | None

    def to_json(self) -> dict[str, Any]:
        """Render for the API."""
        return {
            "seq": self.seq,
            "state": self.state,
            "at": self.at.isoformat(),
            "reason": self.reason,
        }


def _scan(row: Any) -> ScanRecord:
    return ScanRecord(
        kiosk_id=row.kiosk_id,
        scan_id=row.scan_id,
        state=row.state,
        patient_ref=row.patient_ref,
        started_at=utc(row.started_at),
        updated_at=utc(row.updated_at),
        reason=row.reason,
    )


class Reads:
    """Read-only queries of kiosks and scans; errors surface as :class:`StoreError`."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @contextmanager
    def _connect(self, what: str) -> Iterator[Connection]:
        try:
            with self.engine.connect() as conn:
                yield conn
        except SQLAlchemyError as exc:
            raise StoreError(f"{what} query failed: {type(exc).__name__}") from exc

    # -- kiosks ----------------------------------------------------------------------

    def kiosk(self, kiosk_id: str) -> KioskRecord | None:
        """Return one kiosk, or None when the bridge never heard from it."""
        query = select(_k).where(_k.c.kiosk_id == kiosk_id)
        with self._connect("kiosk") as conn:
            row = conn.execute(query).one_or_none()
        if row is None:
            return None
        return KioskRecord(
            kiosk_id=row.kiosk_id,
            state=row.state,
            agent_version=row.agent_version,
            committed_through=row.committed_through,
            status_at=utc(row.status_at) if row.status_at else None,
            last_seen_at=utc(row.last_seen_at) if row.last_seen_at else None,
        )

    def kiosk_counts(self, kiosk_id: str, since: datetime) -> KioskCounts:
        """Count a kiosk's readings and dead letters since ``since``, and its scans."""
        since = utc(since)
        readings = select(func.count()).where(
            _r.c.kiosk_id == kiosk_id, _r.c.measured_at >= since
        )
        # The received_at index bounds this; dead letters have no kiosk index.
        dead = select(func.count()).where(
            _d.c.received_at >= since, _d.c.kiosk_id == kiosk_id
        )
        scans = (
            select(_s.c.state, func.count())
            .where(_s.c.kiosk_id == kiosk_id)
            .group_by(_s.c.state)
        )
        # The highest seq is the kiosk's newest reading in its own order.
        last = (
            select(_r)
            .where(_r.c.kiosk_id == kiosk_id)
            .order_by(_r.c.seq.desc())
            .limit(1)
        )
        with self._connect("kiosk counts") as conn:
            n_readings = conn.execute(readings).scalar_one()
            n_dead = conn.execute(dead).scalar_one()
            by_state = {state: n for state, n in conn.execute(scans)}
            last_row = conn.execute(last).one_or_none()
        return KioskCounts(
            readings_recent=int(n_readings),
            dead_letters_recent=int(n_dead),
            scans_by_state=dict(sorted(by_state.items())),
            last_reading=reading_from_row(last_row) if last_row else None,
        )

    def latest_readings(
        self, kiosk_id: str, lookback: timedelta
    ) -> list[StoredReading]:
        """Return the latest reading of each metric, in metric order.

        "Latest" is by measurement time (then store order). Only readings measured
        within ``lookback`` before the kiosk's newest one are considered, so a metric
        the kiosk never reports costs an index range, not the kiosk's whole history.
        """
        newest = select(func.max(_r.c.measured_at)).where(_r.c.kiosk_id == kiosk_id)
        with self._connect("latest readings") as conn:
            newest_at = conn.execute(newest).scalar_one_or_none()
            if newest_at is None:
                return []
            floor = utc(newest_at) - lookback
            per_metric = [
                select(_r)
                .where(
                    _r.c.kiosk_id == kiosk_id,
                    _r.c.measured_at >= floor,
                    _r.c.metric == metric.value,
                )
                .order_by(_r.c.measured_at.desc(), _r.c.id.desc())
                .limit(1)
                .subquery()
                for metric in Metric
            ]
            query = union_all(*(select(sub) for sub in per_metric))
            rows = [reading_from_row(row) for row in conn.execute(query)]
        order = {m.value: i for i, m in enumerate(Metric)}
        return sorted(rows, key=lambda r: order[r.metric])

    def latest_scan(self, kiosk_id: str) -> ScanRecord | None:
        """Return the kiosk's most recently started scan."""
        query = (
            select(_s)
            .where(_s.c.kiosk_id == kiosk_id)
            .order_by(_s.c.started_at.desc(), _s.c.updated_at.desc(), _s.c.scan_id)
            .limit(1)
        )
        with self._connect("latest scan") as conn:
            row = conn.execute(query).one_or_none()
        return None if row is None else _scan(row)

    # -- scans -----------------------------------------------------------------------

    def scans(
        self,
        *,
        kiosk_ids: Sequence[str] | None = None,
        patient_refs: Sequence[str] | None = None,
        states: Sequence[str] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        after: ScanKey | None = None,
        limit: int = 100,
    ) -> list[ScanRecord]:
        """Return scans in ``(started_at, kiosk_id, scan_id)`` order, filtered."""
        position = tuple_(_s.c.started_at, _s.c.kiosk_id, _s.c.scan_id)
        query = select(_s).order_by(*position.clauses).limit(limit)
        if kiosk_ids:
            query = query.where(_s.c.kiosk_id.in_(kiosk_ids))
        if patient_refs:
            query = query.where(_s.c.patient_ref.in_(patient_refs))
        if states:
            query = query.where(_s.c.state.in_(states))
        if since is not None:
            query = query.where(_s.c.started_at >= utc(since))
        if until is not None:
            query = query.where(_s.c.started_at < utc(until))
        if after is not None:
            key = (utc(after.started_at), after.kiosk_id, after.scan_id)
            query = query.where(position > tuple_(*key))
        with self._connect("scans") as conn:
            return [_scan(row) for row in conn.execute(query)]

    def scan(self, kiosk_id: str, scan_id: str) -> ScanRecord | None:
        """Return one scan, or None."""
        query = select(_s).where(_s.c.kiosk_id == kiosk_id, _s.c.scan_id == scan_id)
        with self._connect("scan") as conn:
            row = conn.execute(query).one_or_none()
        return None if row is None else _scan(row)

    def scan_readings(
        self, kiosk_id: str, scan_id: str, limit: int
    ) -> list[StoredReading]:
        """Return up to ``limit`` readings of one scan in store order."""
        query = (
            select(_r)
            .where(_r.c.kiosk_id == kiosk_id, _r.c.scan_id == scan_id)
            .order_by(_r.c.id)
            .limit(limit)
        )
        with self._connect("scan readings") as conn:
            return [reading_from_row(row) for row in conn.execute(query)]

    def scan_events(self, kiosk_id: str, scan_id: str) -> list[ScanEventRecord]:
        """Return one scan's state changes in the kiosk's order."""
        query = (
            select(_e)
            .where(_e.c.kiosk_id == kiosk_id, _e.c.scan_id == scan_id)
            .order_by(_e.c.seq)
        )
        with self._connect("scan events") as conn:
            return [
                ScanEventRecord(row.seq, row.state, utc(row.at), row.reason)
                for row in conn.execute(query)
            ]
