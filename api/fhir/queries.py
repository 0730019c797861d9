"""SQLAlchemy Core queries behind the FHIR facade, on SQLite and PostgreSQL.

Pages are keyset pages: ``(measured_at, id)`` for date order, ``id`` otherwise, so
a page costs the same wherever it falls. ``$lastn`` ranks readings with
``row_number()`` in SQL (SQLite >= 3.25, PostgreSQL).

Statements are built once per *shape* of search (which filters, how many of each,
which order) with bound parameters, and reused: building a Core select and its
cache key anew for every request cost more than PostgreSQL took to answer it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime
from functools import lru_cache
from typing import Any, NamedTuple

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Select,
    and_,
    bindparam,
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


class _Fetched(NamedTuple):
    """One result row of :data:`_COLUMNS`, read by name at tuple speed.

    SQLAlchemy's ``Row`` resolves each attribute by key; converting a page of 50
    from it cost about a third of the bare query's time.
    """

    id: int
    kiosk_id: str
    seq: int
    scan_id: str | None
    metric: str
    value: float
    unit: str
    quality: float
    final: bool
    measured_at: datetime
    received_at: datetime
    patient_ref: str | None


_COLUMNS = (*(_r.c[name] for name in _Fetched._fields[:-1]), _s.c.patient_ref)


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
    fetched = _Fetched._make(row)
    return Row(reading_from_row(fetched), fetched.patient_ref)


@dataclass(frozen=True, slots=True)
class _Shape:
    """What a statement's text depends on; the values travel as bound parameters."""

    empty: bool = False
    metrics: bool = False
    patients: int = 0
    devices: int = 0
    readings: tuple[int, ...] = ()  # pairs per identifier parameter
    dates: tuple[str, ...] = ()  # prefix per date parameter
    last_updated: tuple[str, ...] = ()
    sort: Sort = Sort.STORE
    cursor: bool = False


# Statements kept per shape; a search repeats a parameter rarely, so few shapes
# are ever seen, and the bound keeps a hostile client from growing the cache.
_STATEMENT_CACHE_SIZE = 256


def _date_clause(column: Any, prefix: str, name: str) -> ColumnElement[bool]:
    start = bindparam(f"{name}_start", type_=column.type)
    end = bindparam(f"{name}_end", type_=column.type)
    match prefix:
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


def _date_values(f: DateFilter, name: str) -> dict[str, datetime]:
    """Bind only the ends :func:`_date_clause` uses for this prefix."""
    values = {}
    if f.prefix in ("eq", "ne", "ge", "lt"):
        values[f"{name}_start"] = f.range.start
    if f.prefix in ("eq", "ne", "gt", "le"):
        values[f"{name}_end"] = f.range.end
    return values


def _where(shape: _Shape) -> list[ColumnElement[bool]]:
    """Build the filters of ``shape`` over bound parameters named as in ``_values``."""
    if shape.empty:
        return [false()]
    clauses: list[ColumnElement[bool]] = []
    if shape.metrics:
        clauses.append(_r.c.metric.in_(bindparam("metrics", expanding=True)))
    for i in range(shape.patients):
        refs: Any = bindparam(f"patients_{i}", expanding=True)
        clauses.append(_s.c.patient_ref.in_(refs))
    for i in range(shape.devices):
        clauses.append(_r.c.kiosk_id.in_(bindparam(f"devices_{i}", expanding=True)))
    for i, pairs in enumerate(shape.readings):
        clauses.append(
            or_(
                false(),
                *(
                    and_(
                        _r.c.kiosk_id == bindparam(f"reading_{i}_{j}_kiosk"),
                        _r.c.seq == bindparam(f"reading_{i}_{j}_seq"),
                    )
                    for j in range(pairs)
                ),
            )
        )
    clauses.extend(
        _date_clause(_r.c.measured_at, prefix, f"date_{i}")
        for i, prefix in enumerate(shape.dates)
    )
    clauses.extend(
        _date_clause(_r.c.received_at, prefix, f"updated_{i}")
        for i, prefix in enumerate(shape.last_updated)
    )
    return clauses


def _source(shape: _Shape) -> Any:
    on = and_(_s.c.kiosk_id == _r.c.kiosk_id, _s.c.scan_id == _r.c.scan_id)
    return _r.join(_s, on) if shape.patients else _r.outerjoin(_s, on)


@lru_cache(maxsize=_STATEMENT_CACHE_SIZE)
def _page_statement(shape: _Shape) -> Select[Any]:
    query: Select[Any] = (
        select(*_COLUMNS)
        .select_from(_source(shape))
        .where(*_where(shape))
        .limit(bindparam("limit"))
    )
    return _ordered(query, shape)


@lru_cache(maxsize=_STATEMENT_CACHE_SIZE)
def _count_statement(shape: _Shape) -> Select[Any]:
    return select(func.count()).select_from(_source(shape)).where(*_where(shape))


@lru_cache(maxsize=_STATEMENT_CACHE_SIZE)
def _lastn_statement(shape: _Shape) -> Select[Any]:
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
    ranked = (
        select(*_COLUMNS, rank)
        .select_from(_source(shape))
        .where(*_where(shape))
        .subquery("ranked")
    )
    return (
        select(*(ranked.c[c.name] for c in _COLUMNS))
        .where(ranked.c.rank <= bindparam("max_n"))
        .order_by(
            ranked.c.patient_ref,
            ranked.c.kiosk_id,
            ranked.c.metric,
            ranked.c.measured_at.desc(),
            ranked.c.id.desc(),
        )
        .limit(bindparam("limit"))
    )


_READ_STATEMENT = (
    select(*_COLUMNS)
    .select_from(_source(_Shape()))
    .where(_r.c.id == bindparam("reading_id"))
)


class FhirQueries:
    """Read-only queries for the FHIR routes; SQL errors become :class:`StoreError`."""

    def __init__(self, engine: Engine) -> None:
        # Reads only: autocommit spares the BEGIN and ROLLBACK round trips (and
        # make_engine pings only connections that sat idle).
        self.engine = engine.execution_options(isolation_level="AUTOCOMMIT")

    # -- Observation -------------------------------------------------------

    def _bind(
        self, conn: Connection, search: ObservationSearch
    ) -> tuple[_Shape, dict[str, Any]]:
        """Return the shape of ``search`` and the values of its bound parameters."""
        if search.empty:
            return _Shape(empty=True, sort=search.sort), {}
        values: dict[str, Any] = {}
        if search.metrics is not None:
            values["metrics"] = sorted(m.value for m in search.metrics)
        for i, ids in enumerate(search.patients):
            refs = ids.keys | self._resolve_patients(conn, ids.hashed)
            values[f"patients_{i}"] = sorted(refs)
        for i, ids in enumerate(search.devices):
            kiosks = ids.keys | self._resolve_kiosks(conn, ids.hashed)
            values[f"devices_{i}"] = sorted(kiosks)
        for i, pairs in enumerate(search.readings):
            for j, (kiosk_id, seq) in enumerate(sorted(pairs)):
                values[f"reading_{i}_{j}_kiosk"] = kiosk_id
                values[f"reading_{i}_{j}_seq"] = seq
        for i, f in enumerate(search.dates):
            values.update(_date_values(f, f"date_{i}"))
        for i, f in enumerate(search.last_updated):
            values.update(_date_values(f, f"updated_{i}"))
        cursor = search.cursor
        if cursor is not None:
            values["cursor_id"] = cursor[1]
            if search.sort is not Sort.STORE:
                values["cursor_at"] = _cursor_time(cursor)
        shape = _Shape(
            metrics=search.metrics is not None,
            patients=len(search.patients),
            devices=len(search.devices),
            readings=tuple(len(pairs) for pairs in search.readings),
            dates=tuple(f.prefix for f in search.dates),
            last_updated=tuple(f.prefix for f in search.last_updated),
            sort=search.sort,
            cursor=cursor is not None,
        )
        return shape, values

    def search_observations(self, search: ObservationSearch) -> Page:
        """Return one page of readings matching ``search``."""
        try:
            with self.engine.connect() as conn:
                shape, values = self._bind(conn, search)
                values["limit"] = search.count + 1
                result = conn.execute(_page_statement(shape), values).all()
                rows = [_row(r) for r in result[: search.count]]
                more = len(result) > search.count
                total = None
                if search.cursor is None and not more:
                    total = len(rows)
                elif search.total:
                    counting = replace(shape, sort=Sort.STORE, cursor=False)
                    values.pop("cursor_id", None)
                    values.pop("cursor_at", None)
                    values.pop("limit")
                    total = conn.execute(
                        _count_statement(counting), values
                    ).scalar_one()
                return Page(rows, more, total)
        except SQLAlchemyError as exc:
            raise StoreError(
                f"observation search failed: {type(exc).__name__}"
            ) from exc

    def read_observation(self, reading_id: int) -> Row | None:
        """Return the reading stored at ``reading_id``."""
        try:
            with self.engine.connect() as conn:
                row = conn.execute(_READ_STATEMENT, {"reading_id": reading_id}).first()
        except SQLAlchemyError as exc:
            raise StoreError(f"observation read failed: {type(exc).__name__}") from exc
        return None if row is None else _row(row)

    def lastn(self, search: ObservationSearch, max_n: int) -> tuple[list[Row], bool]:
        """Return the ``max_n`` latest readings per code per patient (or device).

        Readings without a patient are grouped by kiosk. At most
        :data:`LASTN_MAX_RESULTS` rows come back; the flag says whether more matched.
        """
        try:
            with self.engine.connect() as conn:
                shape, values = self._bind(conn, search)
                shape = replace(shape, sort=Sort.STORE, cursor=False)
                values.pop("cursor_id", None)
                values.pop("cursor_at", None)
                values["max_n"] = max_n
                values["limit"] = LASTN_MAX_RESULTS + 1
                result = conn.execute(_lastn_statement(shape), values).all()
        except SQLAlchemyError as exc:
            raise StoreError(f"lastn failed: {type(exc).__name__}") from exc
        rows = [_row(r) for r in result[:LASTN_MAX_RESULTS]]
        return rows, len(result) > LASTN_MAX_RESULTS

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


def _ordered(query: Select[Any], shape: _Shape) -> Select[Any]:
    match shape.sort:
        case Sort.STORE:
            if shape.cursor:
                query = query.where(_r.c.id > bindparam("cursor_id"))
            return query.order_by(_r.c.id)
        case Sort.DATE:
            if shape.cursor:
                query = query.where(_keyset() > _cursor_key())
            return query.order_by(_r.c.measured_at, _r.c.id)
        case _:
            if shape.cursor:
                query = query.where(_keyset() < _cursor_key())
            return query.order_by(_r.c.measured_at.desc(), _r.c.id.desc())


def _keyset() -> Any:
    return tuple_(_r.c.measured_at, _r.c.id)


def _cursor_key() -> Any:
    at = bindparam("cursor_at", type_=_r.c.measured_at.type)
    return tuple_(at, bindparam("cursor_id", type_=_r.c.id.type))


def _cursor_time(cursor: tuple[str, int]) -> datetime:
    return utc(datetime.fromisoformat(cursor[0]))


def cursor_key(row: Row, sort: Sort) -> tuple[str, int]:
    """Return the keyset position after ``row`` for ``sort``."""
    if sort is Sort.STORE:
        return "", row.reading.id
    return row.reading.measured_at.isoformat(), row.reading.id


__all__ = ["FhirQueries", "KioskRow", "Page", "Row", "cursor_key"]
