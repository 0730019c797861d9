"""SQLAlchemy Core queries behind the FHIR facade, on SQLite and PostgreSQL.

Pages are keyset pages: ``(measured_at, id)`` for date order, ``id`` otherwise, so
a page costs the same wherever it falls. ``$lastn`` ranks readings with
``row_number()`` in SQL (SQLite >= 3.25, PostgreSQL).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Select,
    and_,
    case,
    false,
    func,
    or_,
    select,
    tuple_,
)
from sqlalchemy.exc import SQLAlchemyError

from api.fhir import mapping
from api.fhir.search import DateFilter, ObservationSearch, Sort
from bridge.errors import StoreError
from bridge.store.db import StoredReading, reading_from_row, utc
from bridge.store.models import Kiosk, ReadingRow, Scan

log = logging.getLogger(__name__)

LASTN_MAX_RESULTS = 1000

_r = ReadingRow.__table__
_s = Scan.__table__
_k = Kiosk.__table__

_COLUMNS = (
    _r.c.id,
    _r.c.kiosk_id,
    _r.c.seq,
    _r.c.scan_id,
    _r.c.metric,
    _r.c.value,
    _r.c.unit,
    _r.c.quality,
    _r.c.final,
    _r.c.measured_at,
    _r.c.received_at,
    _s.c.patient_ref,
)


@dataclass(frozen=True, slots=True)
class Row:
    """A reading with the patient its scan is bound to, if any."""

    reading: StoredReading
    patient_ref: str | None


@dataclass(frozen=True, slots=True)
class KioskRow:
    """The kiosk columns a Device needs."""

    kiosk_id: str
    agent_version: str | None
    last_seen_at: datetime | None


@dataclass(frozen=True, slots=True)
class Page:
    """One page of rows, whether more follow, and the total if it was counted."""

    rows: list[Row]
    more: bool
    total: int | None


def _row(row: Any) -> Row:
    reading = reading_from_row(row)
    return Row(reading, row.patient_ref)


def _date_clause(column: Any, f: DateFilter) -> ColumnElement[bool]:
    start, end = f.range.start, f.range.end
    match f.prefix:
        case "eq":
            return and_(column >= start, column < end)
        case "ne":
            return or_(column < start, column >= end)
        case "gt":
            return column >= end  # type: ignore[no-any-return]
        case "ge":
            return column >= start  # type: ignore[no-any-return]
        case "lt":
            return column < start  # type: ignore[no-any-return]
        case _:  # "le"
            return column < end  # type: ignore[no-any-return]


class FhirQueries:
    """Read-only queries for the FHIR routes; SQL errors become :class:`StoreError`."""

    def __init__(self, engine: Engine) -> None:
        # Reads only: autocommit spares the BEGIN and ROLLBACK round trips.
        self.engine = engine.execution_options(isolation_level="AUTOCOMMIT")

    # -- Observation -------------------------------------------------------

    def _filters(
        self, conn: Connection, search: ObservationSearch
    ) -> list[ColumnElement[bool]]:
        if search.empty:
            return [false()]
        clauses: list[ColumnElement[bool]] = []
        if search.metrics is not None:
            clauses.append(_r.c.metric.in_(sorted(m.value for m in search.metrics)))
        for ids in search.patients:
            refs = ids.keys | self._resolve_patients(conn, ids.hashed)
            clauses.append(_s.c.patient_ref.in_(sorted(refs)))
        for ids in search.devices:
            kiosks = ids.keys | self._resolve_kiosks(conn, ids.hashed)
            clauses.append(_r.c.kiosk_id.in_(sorted(kiosks)))
        for pairs in search.readings:
            clauses.append(
                or_(
                    false(),
                    *(
                        and_(_r.c.kiosk_id == k, _r.c.seq == q)
                        for k, q in sorted(pairs)
                    ),
                )
            )
        clauses.extend(_date_clause(_r.c.measured_at, f) for f in search.dates)
        clauses.extend(_date_clause(_r.c.received_at, f) for f in search.last_updated)
        return clauses

    @staticmethod
    def _source(search: ObservationSearch) -> Any:
        on = and_(_s.c.kiosk_id == _r.c.kiosk_id, _s.c.scan_id == _r.c.scan_id)
        return _r.join(_s, on) if search.patients else _r.outerjoin(_s, on)

    def search_observations(self, search: ObservationSearch) -> Page:
        """Return one page of readings matching ``search``."""
        try:
            with self.engine.connect() as conn:
                filters = self._filters(conn, search)
                query: Select[Any] = (
                    select(*_COLUMNS)
                    .select_from(self._source(search))
                    .where(*filters)
                    .limit(search.count + 1)
                )
                query = _ordered(query, search)
                rows = [_row(r) for r in conn.execute(query)]
                more = len(rows) > search.count
                rows = rows[: search.count]
                total = None
                if search.cursor is None and not more:
                    total = len(rows)
                elif search.total:
                    total = self._count(conn, search, filters)
                return Page(rows, more, total)
        except SQLAlchemyError as exc:
            raise StoreError(
                f"observation search failed: {type(exc).__name__}"
            ) from exc

    def _count(
        self,
        conn: Connection,
        search: ObservationSearch,
        filters: list[ColumnElement[bool]],
    ) -> int:
        query = select(func.count()).select_from(self._source(search)).where(*filters)
        return int(conn.execute(query).scalar_one())

    def read_observation(self, reading_id: int) -> Row | None:
        """Return the reading stored at ``reading_id``."""
        search = ObservationSearch()
        query = (
            select(*_COLUMNS)
            .select_from(self._source(search))
            .where(_r.c.id == reading_id)
        )
        try:
            with self.engine.connect() as conn:
                row = conn.execute(query).first()
        except SQLAlchemyError as exc:
            raise StoreError(f"observation read failed: {type(exc).__name__}") from exc
        return None if row is None else _row(row)

    def lastn(self, search: ObservationSearch, max_n: int) -> tuple[list[Row], bool]:
        """Return the ``max_n`` latest readings per code per patient (or device).

        Readings without a patient are grouped by kiosk. At most
        :data:`LASTN_MAX_RESULTS` rows come back; the flag says whether more matched.
        """
        partition = (
            _s.c.patient_ref,
            case((_s.c.patient_ref.is_(None), _r.c.kiosk_id)),
            _r.c.metric,
        )
        rank = (
            func.row_number()
            .over(
                partition_by=partition,
                order_by=(_r.c.measured_at.desc(), _r.c.id.desc()),
            )
            .label("rank")
        )
        try:
            with self.engine.connect() as conn:
                ranked = (
                    select(*_COLUMNS, rank)
                    .select_from(self._source(search))
                    .where(*self._filters(conn, search))
                    .subquery("ranked")
                )
                query = (
                    select(*(ranked.c[c.name] for c in _COLUMNS))
                    .where(ranked.c.rank <= max_n)
                    .order_by(
                        ranked.c.patient_ref,
                        ranked.c.kiosk_id,
                        ranked.c.metric,
                        ranked.c.measured_at.desc(),
                        ranked.c.id.desc(),
                    )
                    .limit(LASTN_MAX_RESULTS + 1)
                )
                rows = [_row(r) for r in conn.execute(query)]
        except SQLAlchemyError as exc:
            raise StoreError(f"lastn failed: {type(exc).__name__}") from exc
        return rows[:LASTN_MAX_RESULTS], len(rows) > LASTN_MAX_RESULTS

    # -- Device and Patient --------------------------------------------------

    def kiosks(
        self,
        keys: list[set[str]] | None = None,
        after: str | None = None,
        limit: int | None = None,
    ) -> list[KioskRow]:
        """Return kiosks in id order, filtered by ANDed sets of ids."""
        query = select(_k.c.kiosk_id, _k.c.agent_version, _k.c.last_seen_at).order_by(
            _k.c.kiosk_id
        )
        for key_set in keys or ():
            query = query.where(_k.c.kiosk_id.in_(sorted(key_set)))
        if after is not None:
            query = query.where(_k.c.kiosk_id > after)
        if limit is not None:
            query = query.limit(limit)
        try:
            with self.engine.connect() as conn:
                return [
                    KioskRow(
                        r.kiosk_id,
                        r.agent_version,
                        None if r.last_seen_at is None else utc(r.last_seen_at),
                    )
                    for r in conn.execute(query)
                ]
        except SQLAlchemyError as exc:
            raise StoreError(f"kiosk query failed: {type(exc).__name__}") from exc

    def kiosk_for_id(self, fhir_id: str) -> KioskRow | None:
        """Return the kiosk a Device id names."""
        if mapping.is_hashed_id(fhir_id):
            with self._connect() as conn:
                keys = self._resolve_kiosks(conn, [fhir_id])
        else:
            key = mapping.decode_id(fhir_id)
            keys = set() if key is None else {key}
        if not keys:
            return None
        found = self.kiosks([keys])
        return found[0] if found else None

    def patients(
        self,
        keys: list[set[str]] | None = None,
        after: str | None = None,
        limit: int | None = None,
    ) -> list[str]:
        """Return distinct patient_refs in order, filtered by ANDed sets of refs."""
        query = (
            select(_s.c.patient_ref)
            .where(_s.c.patient_ref.is_not(None))
            .group_by(_s.c.patient_ref)
            .order_by(_s.c.patient_ref)
        )
        for key_set in keys or ():
            query = query.where(_s.c.patient_ref.in_(sorted(key_set)))
        if after is not None:
            query = query.where(_s.c.patient_ref > after)
        if limit is not None:
            query = query.limit(limit)
        try:
            with self.engine.connect() as conn:
                return [r.patient_ref for r in conn.execute(query)]
        except SQLAlchemyError as exc:
            raise StoreError(f"patient query failed: {type(exc).__name__}") from exc

    def patient_for_id(self, fhir_id: str) -> str | None:
        """Return the patient_ref a Patient id names, if any scan carries it."""
        if mapping.is_hashed_id(fhir_id):
            with self._connect() as conn:
                keys = self._resolve_patients(conn, [fhir_id])
        else:
            key = mapping.decode_id(fhir_id)
            keys = set() if key is None else {key}
        if not keys:
            return None
        found = self.patients([keys])
        return found[0] if found else None

    # -- hashed ids --------------------------------------------------------

    def _connect(self) -> Connection:
        try:
            return self.engine.connect()
        except SQLAlchemyError as exc:
            raise StoreError(f"connect failed: {type(exc).__name__}") from exc

    # TODO: keep a hash column if long or exotic patient_refs become common; until
    # then a hashed id costs one scan of the distinct values.
    @staticmethod
    def _resolve_patients(conn: Connection, hashed: Iterable[str]) -> set[str]:
        wanted = set(hashed)
        if not wanted:
            return set()
        query = select(_s.c.patient_ref).where(_s.c.patient_ref.is_not(None)).distinct()
        try:
            refs = conn.execute(query).scalars()
            return {ref for ref in refs if mapping.encode_id(ref) in wanted}
        except SQLAlchemyError as exc:
            raise StoreError(f"patient lookup failed: {type(exc).__name__}") from exc

    @staticmethod
    def _resolve_kiosks(conn: Connection, hashed: Iterable[str]) -> set[str]:
        wanted = set(hashed)
        if not wanted:
            return set()
        try:
            ids = conn.execute(select(_k.c.kiosk_id)).scalars()
            return {k for k in ids if mapping.encode_id(k) in wanted}
        except SQLAlchemyError as exc:
            raise StoreError(f"kiosk lookup failed: {type(exc).__name__}") from exc


def _ordered(query: Select[Any], search: ObservationSearch) -> Select[Any]:
    cursor = search.cursor
    match search.sort:
        case Sort.STORE:
            if cursor is not None:
                query = query.where(_r.c.id > cursor[1])
            return query.order_by(_r.c.id)
        case Sort.DATE:
            if cursor is not None:
                key = tuple_(_r.c.measured_at, _r.c.id)
                query = query.where(key > tuple_(_cursor_time(cursor), cursor[1]))
            return query.order_by(_r.c.measured_at, _r.c.id)
        case _:
            if cursor is not None:
                key = tuple_(_r.c.measured_at, _r.c.id)
                query = query.where(key < tuple_(_cursor_time(cursor), cursor[1]))
            return query.order_by(_r.c.measured_at.desc(), _r.c.id.desc())


def _cursor_time(cursor: tuple[str, int]) -> datetime:
    return utc(datetime.fromisoformat(cursor[0]))


def cursor_key(row: Row, sort: Sort) -> tuple[str, int]:
    """Return the keyset position after ``row`` for ``sort``."""
    if sort is Sort.STORE:
        return "", row.reading.id
    return row.reading.measured_at.isoformat(), row.reading.id


__all__ = ["FhirQueries", "KioskRow", "Page", "Row", "cursor_key"]
