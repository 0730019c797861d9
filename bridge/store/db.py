"""Batched, idempotent writes and the queries the API and the hub need."""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from operator import itemgetter
from typing import Any, cast

import orjson
from sqlalchemy import (
    BigInteger,
    Connection,
    Engine,
    bindparam,
    case,
    create_engine,
    delete,
    event,
    func,
    select,
    tuple_,
    union,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DisconnectionError, SQLAlchemyError

from bridge.errors import StoreError
from bridge.store.models import DeadLetter, Kiosk, ReadingRow, Scan, ScanEventRow
from bridge.store.progress import Progress
from vitals_contract import (
    METRICS,
    Heartbeat,
    KioskStatus,
    Reading,
    ScanEvent,
    ScanState,
)

log = logging.getLogger(__name__)

MAX_DEAD_LETTER_BYTES = 4096
SQLITE_BUSY_TIMEOUT_MS = 10_000


# A pooled connection idle for longer than this is pinged before it is handed out.
IDLE_PING_SECONDS = 1.0


def make_engine(url: str) -> Engine:
    """Create an engine; SQLite files get WAL, ``synchronous=FULL`` and a timeout."""
    # hide_parameters: a database error's message must not carry row values
    # (readings, patient references) into the logs.
    engine = create_engine(url, hide_parameters=True)
    _ping_when_idle(engine)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            # FULL: a confirmed batch lets kiosks delete their copy, so the commit
            # must survive power loss, not only a crash of the process.
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cur.close()

    return engine


def _ping_when_idle(engine: Engine) -> None:
    """Ping a pooled connection before use only when it sat idle a while.

    ``pool_pre_ping`` pings at every checkout: a round trip per ingest batch and per
    API query (~0.14 ms of a 0.49 ms checkout-and-query on PostgreSQL here). A
    connection used within the last second is handed out as it is; if the server
    dropped it meanwhile, the statement fails like any database fault (ingest
    retries the batch, the API answers 503) and the pool replaces it.
    """

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_conn: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.pop("idle_since", None)
        if idle_since is None or time.monotonic() - idle_since < IDLE_PING_SECONDS:
            return  # new, or used a moment ago
        try:
            engine.dialect.do_ping(dbapi_conn)
        except engine.dialect.loaded_dbapi.Error as exc:
            # The pool discards this connection and hands out a fresh one.
            raise DisconnectionError("pooled connection is gone") from exc


def utc(value: datetime) -> datetime:
    """Return ``value`` as aware UTC; SQLite hands back naive datetimes."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def dialect_insert(engine: Engine) -> Any:
    """Return the dialect's ``insert`` (with ``on_conflict_*``) for ``engine``."""
    dialect = engine.dialect.name
    if dialect == "postgresql":
        return postgresql.insert
    if dialect == "sqlite":
        return sqlite.insert
    raise StoreError(f"unsupported database dialect {dialect!r}")


# By plain name: the enum lookup cost more than the rest of rendering a reading.
_ESTIMATES = {metric.value: info.estimate for metric, info in METRICS.items()}


def _as_datetime(value: Any) -> datetime:
    """Take a ``datetime`` as it is and parse an ISO 8601 string."""
    return value if isinstance(value, datetime) else datetime.fromisoformat(value)


# Not frozen: a frozen dataclass sets each field through object.__setattr__, which
# made building one six times slower, and every commit builds thousands.
@dataclass(slots=True)
class StoredReading:
    """A reading as stored, with its store position ``id``."""

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

    @property
    def estimate(self) -> bool:
        """Whether the metric is only an estimate."""
        return _ESTIMATES[self.metric]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StoredReading:
        """Rebuild a reading from :meth:`to_json` or :meth:`live_message` output.

        Hub listeners get both: this bridge's own commits as live messages (the
        timestamps still ``datetime``), other bridges' from the live topic
        (ISO 8601 strings).
        """
        return cls(
            id=int(data["id"]),
            kiosk_id=str(data["kiosk_id"]),
            seq=int(data["seq"]),
            scan_id=data.get("scan_id"),
            metric=str(data["metric"]),
            value=float(data["value"]),
            unit=str(data["unit"]),
            quality=float(data["quality"]),
            final=bool(data["final"]),
            measured_at=_as_datetime(data["measured_at"]),
            received_at=_as_datetime(data["received_at"]),
        )

    def to_json(self) -> dict[str, Any]:
        """Render as the JSON object the API and WebSocket clients receive."""
        body = self.live_message()
        del body["type"]
        body["measured_at"] = self.measured_at.isoformat()
        body["received_at"] = self.received_at.isoformat()
        return body

    def live_message(self) -> dict[str, Any]:
        """Render as a live ``reading`` message, for orjson to encode.

        The timestamps stay ``datetime`` objects: orjson writes them in the same
        ISO 8601 form as :meth:`to_json`, in C, which matters on the ingest path
        (every stored reading is rendered once).
        """
        return {
            "type": "reading",
            "id": self.id,
            "kiosk_id": self.kiosk_id,
            "seq": self.seq,
            "scan_id": self.scan_id,
            "metric": self.metric,
            "value": self.value,
            "unit": self.unit,
            "quality": self.quality,
            "estimate": _ESTIMATES[self.metric],
            "final": self.final,
            "measured_at": self.measured_at,
            "received_at": self.received_at,
        }


@dataclass(frozen=True, slots=True)
class DeadLetterIn:
    """A rejected message or reading to keep, with the reason."""

    topic: str
    reason: str
    payload: bytes
    kiosk_id: str | None = None
    seq: int | None = None


@dataclass(slots=True)
class Batch:
    """Everything one ingest step commits together."""

    readings: list[tuple[str, Reading]] = field(default_factory=list)
    events: list[ScanEvent] = field(default_factory=list)
    statuses: list[KioskStatus | Heartbeat] = field(default_factory=list)
    dead: list[DeadLetterIn] = field(default_factory=list)
    floors: dict[str, int] = field(default_factory=dict)

    def note_floor(self, kiosk_id: str, floor: int) -> None:
        """Remember the highest floor a kiosk announced in this batch."""
        self.floors[kiosk_id] = max(floor, self.floors.get(kiosk_id, 0))

    def __len__(self) -> int:
        return (
            len(self.readings) + len(self.events) + len(self.statuses) + len(self.dead)
        )


@dataclass(frozen=True, slots=True)
class BatchResult:
    """What a committed batch changed."""

    new_readings: list[StoredReading]
    # Readings that were already stored: a redelivery after some fault. Their live
    # push may have been lost with the bridge that first stored them, so they are
    # pushed again; clients drop repeats by ``id``.
    redelivered: list[StoredReading]
    duplicates: int
    through: dict[str, int]  # committed high-water mark of every kiosk in the batch
    status_changed: list[str]


_READING_COLUMNS = (
    ReadingRow.id,
    ReadingRow.kiosk_id,
    ReadingRow.seq,
    ReadingRow.scan_id,
    ReadingRow.metric,
    ReadingRow.value,
    ReadingRow.unit,
    ReadingRow.quality,
    ReadingRow.final,
    ReadingRow.measured_at,
    ReadingRow.received_at,
)


def reading_from_row(row: Any) -> StoredReading:
    """Build a :class:`StoredReading` from a row holding the readings columns."""
    return StoredReading(
        id=row.id,
        kiosk_id=row.kiosk_id,
        seq=row.seq,
        scan_id=row.scan_id,
        metric=row.metric,
        value=row.value,
        unit=row.unit,
        quality=row.quality,
        final=row.final,
        measured_at=utc(row.measured_at),
        received_at=utc(row.received_at),
    )


# PostgreSQL's fast path: one fixed statement over all rows, sent as one JSON array
# of row arrays that orjson encodes in C. psycopg's binary arrays cost ~19 ms of
# Python per 5,000 rows to encode (an element at a time), this ~8 ms; the server
# spends no measurable extra time parsing. A multi-row VALUES list would be a new
# statement text per batch size, which psycopg re-parses in Python every time.
# Only the key columns come back: the rest of each stored reading is what was sent.
_PG_INSERT_READINGS = (
    "INSERT INTO readings (kiosk_id, seq, scan_id, metric, value, unit, quality,"
    " final, measured_at, received_at)"
    " SELECT r->>0, (r->>1)::bigint, r->>2, r->>3, (r->>4)::float8, r->>5,"
    "  (r->>6)::float8, (r->>7)::boolean, (r->>8)::timestamptz, %(received_at)s"
    " FROM jsonb_array_elements(%(rows)s::jsonb) AS r"
    " ON CONFLICT (kiosk_id, seq) DO NOTHING"
    " RETURNING id, kiosk_id, seq"
)
# When no key in a batch can be stored yet (see Store._copy_new_readings).
_PG_ID_SEQUENCE = "SELECT pg_get_serial_sequence('readings', 'id')"
_PG_NEXT_IDS = "SELECT nextval(%s::regclass) FROM generate_series(1, %s)"
_PG_COPY_READINGS = (
    "COPY readings (id, kiosk_id, seq, scan_id, metric, value, unit, quality, final,"
    " measured_at, received_at) FROM STDIN (FORMAT BINARY)"
)
_PG_COPY_TYPES = [
    "int8",
    "varchar",
    "int8",
    "varchar",
    "varchar",
    "float8",
    "varchar",
    "float8",
    "bool",
    "timestamptz",
    "timestamptz",
]


class _KeyTakenError(Exception):
    """A plain insert found a reading's key already stored; redo the batch."""


_SQLITE_INSERT_READINGS = (
    "INSERT INTO readings (kiosk_id, seq, scan_id, metric, value, unit, quality,"
    " final, measured_at, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (kiosk_id, seq) DO NOTHING"
)


def _sqlite_datetime(conn: Connection) -> Callable[[datetime], Any]:
    """Return the function SQLAlchemy stores a timestamp column with on SQLite."""
    column_type = ReadingRow.__table__.c.measured_at.type
    process = column_type.dialect_impl(conn.dialect).bind_processor(conn.dialect)
    assert process is not None
    return process


def _pg_rows(readings: Sequence[tuple[str, Reading]], now: datetime) -> dict[str, Any]:
    # Strings, floats and timestamps round-trip exactly: orjson writes the shortest
    # repr of a float and RFC 3339 with microseconds; the contract admits no NUL
    # (which jsonb refuses) in any of these strings.
    rows = [
        (
            k,
            r.seq,
            r.scan_id,
            r.metric,
            r.value,
            r.unit,
            r.quality,
            r.final,
            r.measured_at,
        )
        for k, r in readings
    ]
    return {"rows": orjson.dumps(rows).decode(), "received_at": now}


class Store:
    """Idempotent batched writes keyed by ``(kiosk_id, seq)``, plus queries."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._progress: dict[str, Progress] = {}
        self._insert = dialect_insert(engine)
        # MQTT and HTTP batches commit from different threads; the in-memory
        # progress must move one batch at a time.
        self._write_lock = threading.Lock()
        self._id_sequence: str | None = None  # PostgreSQL: the readings id sequence

    @classmethod
    def from_url(cls, url: str) -> Store:
        """Open the store at ``url``."""
        return cls(make_engine(url))

    def close(self) -> None:
        """Release pooled connections."""
        self.engine.dispose()

    def progress_of(self, kiosk_id: str) -> int | None:
        """Return the contiguous seq this store has committed for ``kiosk_id``.

        ``None`` until this process has written for the kiosk.
        """
        progress = self._progress.get(kiosk_id)
        return None if progress is None else progress.through

    # -- writes ---------------------------------------------------------------

    def write_batch(self, batch: Batch) -> BatchResult:
        """Commit ``batch`` in one transaction; duplicates are skipped, not errors."""
        now = datetime.now(UTC)
        with self._write_lock:
            if self._all_unseen(batch.readings):
                try:
                    return self._write_batch(batch, now, plain=True)
                except _KeyTakenError:
                    # Another bridge stored some of them (or this one before a
                    # restart): the transaction rolled back; skip them by key.
                    log.debug("a batch thought new held a stored key; redoing it")
            return self._write_batch(batch, now, plain=False)

    def _all_unseen(self, readings: Sequence[tuple[str, Reading]]) -> bool:
        """Tell whether no reading's key is one this store knows to be stored.

        Then PostgreSQL can take the readings by ``COPY`` (see
        :meth:`_copy_new_readings`); a key stored by another bridge still fails the
        unique index, and the batch is redone with ``ON CONFLICT``.
        """
        progress = self._progress
        for kiosk_id, r in readings:
            p = progress.get(kiosk_id)
            if p is None or r.seq <= p.through or r.seq in p.above:
                return False
        return True

    def _write_batch(self, batch: Batch, now: datetime, *, plain: bool) -> BatchResult:
        try:
            with self.engine.begin() as conn:
                kiosks = self._touched_kiosks(batch)
                self._ensure_kiosks(conn, kiosks)
                new = self._insert_readings(conn, batch.readings, now, plain=plain)
                redelivered = self._redelivered(conn, batch.readings, new)
                new_event_seqs = self._insert_events(conn, batch.events)
                status_changed = self._apply_statuses(conn, batch.statuses)
                self._insert_dead(conn, batch.dead, now)
                progress = self._advance(conn, batch, kiosks)
                self._touch_kiosks(conn, progress, batch, now)
        except SQLAlchemyError as exc:
            raise StoreError(f"batch commit failed: {type(exc).__name__}") from exc

        # Only a committed transaction may move the in-memory marks.
        self._progress.update(progress)
        stored = len(new) + len(new_event_seqs)
        sent = len(batch.readings) + len(batch.events)
        return BatchResult(
            new_readings=new,
            redelivered=redelivered,
            duplicates=sent - stored,
            through={k: p.through for k, p in progress.items()},
            status_changed=status_changed,
        )

    @staticmethod
    def _touched_kiosks(batch: Batch) -> set[str]:
        kiosks = {k for k, _ in batch.readings}
        kiosks.update(e.kiosk_id for e in batch.events)
        kiosks.update(s.kiosk_id for s in batch.statuses)
        kiosks.update(batch.floors)
        kiosks.update(
            d.kiosk_id for d in batch.dead if d.kiosk_id and d.seq is not None
        )
        return kiosks

    def _ensure_kiosks(self, conn: Connection, kiosks: Iterable[str]) -> None:
        # Kiosks this store already loaded progress for exist; skip their insert.
        rows = [
            {"kiosk_id": k, "committed_through": -1}
            for k in sorted(kiosks)
            if k not in self._progress
        ]
        if rows:
            stmt = self._insert(Kiosk).on_conflict_do_nothing(
                index_elements=["kiosk_id"]
            )
            conn.execute(stmt, rows)

    def _insert_readings(
        self,
        conn: Connection,
        readings: Sequence[tuple[str, Reading]],
        now: datetime,
        *,
        plain: bool = False,
    ) -> list[StoredReading]:
        if not readings:
            return []
        # One row per key, the first as the database would keep it: what is
        # reported as stored must be what was stored.
        sent: dict[tuple[str, int], Reading] = {}
        for k, r in readings:
            sent.setdefault((k, r.seq), r)
        if len(sent) < len(readings):
            readings = [(k, r) for (k, _), r in sent.items()]
        if conn.dialect.name == "postgresql":
            keys: Sequence[tuple[int, str, int]]
            if plain:
                keys = self._copy_new_readings(conn, readings, now)
            else:
                result = conn.exec_driver_sql(
                    _PG_INSERT_READINGS, _pg_rows(readings, now)
                )
                keys = result.cursor.fetchall()  # plain tuples, without Row objects
        else:
            keys = self._insert_readings_sqlite(conn, readings, now)
        stored = []
        for row_id, kiosk_id, seq in sorted(keys, key=itemgetter(0)):
            r = sent[kiosk_id, seq]
            stored.append(
                StoredReading(
                    row_id,
                    kiosk_id,
                    seq,
                    r.scan_id,
                    r.metric.value,
                    r.value,
                    r.unit,
                    r.quality,
                    r.final,
                    r.measured_at,
                    now,
                )
            )
        return stored

    def _copy_new_readings(
        self, conn: Connection, readings: Sequence[tuple[str, Reading]], now: datetime
    ) -> list[tuple[int, str, int]]:
        """PostgreSQL's fastest path, for readings whose keys cannot be stored yet.

        Binary ``COPY`` with ids drawn from the table's sequence beforehand: no
        per-row executor, JSON or conflict check on the server (~20 % less of its
        CPU than the ``INSERT`` above). A key stored after all (by another bridge)
        fails the unique index and the whole batch is redone with ``ON CONFLICT``.
        """
        import psycopg  # the PostgreSQL extra; SQLite-only installs lack it

        if self._id_sequence is None:
            self._id_sequence = conn.exec_driver_sql(_PG_ID_SEQUENCE).scalar_one()
        ids = sorted(
            row_id
            for (row_id,) in conn.exec_driver_sql(
                _PG_NEXT_IDS, (self._id_sequence, len(readings))
            ).cursor.fetchall()
        )
        raw = cast("psycopg.Connection[Any]", conn.connection.dbapi_connection)
        try:
            with raw.cursor() as cursor, cursor.copy(_PG_COPY_READINGS) as copy:
                copy.set_types(_PG_COPY_TYPES)
                for row_id, (kiosk_id, r) in zip(ids, readings, strict=True):
                    copy.write_row(
                        (
                            row_id,
                            kiosk_id,
                            r.seq,
                            r.scan_id,
                            r.metric.value,
                            r.value,
                            r.unit,
                            r.quality,
                            r.final,
                            r.measured_at,
                            now,
                        )
                    )
        except psycopg.errors.UniqueViolation as exc:
            raise _KeyTakenError from exc
        except psycopg.Error as exc:
            # Outside SQLAlchemy's own execution: tell it when the connection broke,
            # so the pool drops it, and fail the batch as any store error does.
            if raw.closed or raw.broken:
                conn.invalidate(exc)
            raise StoreError(f"batch commit failed: {type(exc).__name__}") from exc
        return [
            (row_id, k, r.seq) for row_id, (k, r) in zip(ids, readings, strict=True)
        ]

    @staticmethod
    def _insert_readings_sqlite(
        conn: Connection, readings: Sequence[tuple[str, Reading]], now: datetime
    ) -> list[tuple[int, str, int]]:
        """SQLite's fast path: one prepared statement run over all rows.

        SQLite has no RETURNING for ``executemany``. It needs none: the write lock
        is held from the first insert to the commit and rowids are handed out in
        order, so the rows this call inserted are the last ``rowcount`` ids.
        """
        stamp = _sqlite_datetime(conn)
        received = stamp(now)
        result = conn.exec_driver_sql(
            _SQLITE_INSERT_READINGS,
            [
                (
                    kiosk_id,
                    r.seq,
                    r.scan_id,
                    r.metric.value,
                    r.value,
                    r.unit,
                    r.quality,
                    r.final,
                    stamp(r.measured_at),
                    received,
                )
                for kiosk_id, r in readings
            ],
        )
        inserted = result.rowcount
        if inserted <= 0:
            return []
        last = conn.exec_driver_sql("SELECT last_insert_rowid()").scalar_one()
        rows = conn.exec_driver_sql(
            "SELECT id, kiosk_id, seq FROM readings WHERE id > ? AND id <= ?",
            (last - inserted, last),
        )
        return [(row_id, kiosk_id, seq) for row_id, kiosk_id, seq in rows]

    @staticmethod
    def _redelivered(
        conn: Connection,
        readings: Sequence[tuple[str, Reading]],
        new: Sequence[StoredReading],
    ) -> list[StoredReading]:
        if len(new) == len(readings):
            return []  # the usual case: nothing was stored before
        inserted = {(r.kiosk_id, r.seq) for r in new}
        repeats = [(k, r.seq) for k, r in readings if (k, r.seq) not in inserted]
        if not repeats:
            return []
        query = (
            select(*_READING_COLUMNS)
            .where(tuple_(ReadingRow.kiosk_id, ReadingRow.seq).in_(repeats))
            .order_by(ReadingRow.id)
        )
        return [reading_from_row(row) for row in conn.execute(query)]

    def _insert_events(self, conn: Connection, events: Sequence[ScanEvent]) -> set[int]:
        if not events:
            return set()
        rows = [
            {
                "kiosk_id": e.kiosk_id,
                "seq": e.seq,
                "scan_id": e.scan_id,
                "state": e.state.value,
                "at": e.at,
                "reason": e.reason,
            }
            for e in events
        ]
        stmt = (
            self._insert(ScanEventRow)
            .on_conflict_do_nothing(index_elements=["kiosk_id", "seq"])
            .returning(ScanEventRow.seq)
        )
        new_seqs = {row.seq for row in conn.execute(stmt, rows)}
        for e in sorted(events, key=lambda e: e.seq):
            if e.seq in new_seqs:
                self._upsert_scan(conn, e)
        return new_seqs

    def _upsert_scan(self, conn: Connection, e: ScanEvent) -> None:
        values = {
            "kiosk_id": e.kiosk_id,
            "scan_id": e.scan_id,
            "state": e.state.value,
            "patient_ref": e.patient_ref,
            "started_at": e.at,
            "updated_at": e.at,
            "reason": e.reason,
        }
        stmt = self._insert(Scan).values(values)
        # Events can arrive out of order (a replay after an outage): an older
        # event never overwrites what a newer one set, but may fill in a patient.
        newer = Scan.updated_at <= e.at

        def if_newer(column: Any, value: Any) -> Any:
            return case((newer, value), else_=column)

        changes: dict[str, Any] = {
            "state": if_newer(Scan.state, e.state.value),
            "updated_at": if_newer(Scan.updated_at, e.at),
            "reason": if_newer(Scan.reason, e.reason),
        }
        if e.patient_ref is not None:
            changes["patient_ref"] = if_newer(
                func.coalesce(Scan.patient_ref, e.patient_ref), e.patient_ref
            )
        if e.state is ScanState.SCANNING:
            changes["started_at"] = e.at  # when the scan began, however late
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=["kiosk_id", "scan_id"], set_=changes
            )
        )

    def _apply_statuses(
        self, conn: Connection, statuses: Sequence[KioskStatus | Heartbeat]
    ) -> list[str]:
        changed: list[str] = []
        for s in statuses:
            if isinstance(s, KioskStatus):
                conn.execute(
                    update(Kiosk)
                    .where(Kiosk.kiosk_id == s.kiosk_id)
                    .values(
                        state=s.state.value,
                        agent_version=s.agent_version,
                        status_at=s.at,
                    )
                )
                changed.append(s.kiosk_id)
        return changed

    def _insert_dead(
        self, conn: Connection, dead: Sequence[DeadLetterIn], now: datetime
    ) -> None:
        if not dead:
            return
        rows = [
            {
                "received_at": now,
                "topic": d.topic[:256],
                "kiosk_id": d.kiosk_id,
                "seq": d.seq,
                "reason": d.reason[:500],
                "size_bytes": len(d.payload),
                "payload": d.payload[:MAX_DEAD_LETTER_BYTES],
            }
            for d in dead
        ]
        conn.execute(self._insert(DeadLetter), rows)

    def _advance(
        self, conn: Connection, batch: Batch, kiosks: set[str]
    ) -> dict[str, Progress]:
        seqs: dict[str, list[int]] = defaultdict(list)
        for kiosk_id, r in batch.readings:
            seqs[kiosk_id].append(r.seq)
        for e in batch.events:
            seqs[e.kiosk_id].append(e.seq)
        for d in batch.dead:
            # A rejected reading is settled too: resending it would not help.
            if d.kiosk_id is not None and d.seq is not None:
                seqs[d.kiosk_id].append(d.seq)
        progress: dict[str, Progress] = {}
        for kiosk_id in kiosks:
            if kiosk_id not in seqs and kiosk_id not in batch.floors:
                continue
            current = self._progress.get(kiosk_id) or self._load_progress(
                conn, kiosk_id
            )
            after = current.advanced(
                seqs.get(kiosk_id, ()), batch.floors.get(kiosk_id, 0)
            )
            if after.above:
                after = self._fill_gap(conn, kiosk_id, after)
            progress[kiosk_id] = after
        return progress

    @classmethod
    def _fill_gap(cls, conn: Connection, kiosk_id: str, progress: Progress) -> Progress:
        """Close what another bridge sharing the ingest stored in the first gap.

        Only the gap is read, never the seqs above it: a kiosk whose gap stays open
        (over its rate, or dropping messages) would otherwise make every batch read
        its whole backlog again. The kiosk row's mark covers what others settled
        without storing it (dead letters, floors).
        """
        in_gap = cls._stored_seqs(conn, kiosk_id, progress.through, min(progress.above))
        floor = cls._committed_through(conn, kiosk_id) + 1
        return progress.advanced(in_gap, floor=floor)

    @classmethod
    def _load_progress(cls, conn: Connection, kiosk_id: str) -> Progress:
        through = cls._committed_through(conn, kiosk_id)
        return Progress(through, set(cls._stored_seqs(conn, kiosk_id, through)))

    @staticmethod
    def _committed_through(conn: Connection, kiosk_id: str) -> int:
        mark: int = conn.execute(
            select(Kiosk.committed_through).where(Kiosk.kiosk_id == kiosk_id)
        ).scalar_one()
        return mark

    @staticmethod
    def _stored_seqs(
        conn: Connection, kiosk_id: str, above: int, below: int | None = None
    ) -> list[int]:
        """Seqs of ``kiosk_id`` stored as readings or scan events in (above, below)."""
        rows = []
        for table in (ReadingRow, ScanEventRow):
            cond = [table.kiosk_id == kiosk_id, table.seq > above]
            if below is not None:
                cond.append(table.seq < below)
            rows.append(select(table.seq).where(*cond))
        return list(conn.execute(union(*rows)).scalars())

    @staticmethod
    def _touch_kiosks(
        conn: Connection,
        progress: dict[str, Progress],
        batch: Batch,
        now: datetime,
    ) -> None:
        if not progress:
            return
        # Never lower the mark: another bridge may have moved it further.
        through = bindparam("through", type_=BigInteger)
        mark = case(
            (Kiosk.committed_through > through, Kiosk.committed_through),
            else_=through,
        )
        stmt = (
            update(Kiosk)
            .where(Kiosk.kiosk_id == bindparam("kiosk"))
            .values(committed_through=mark, last_seen_at=now)
        )
        # One statement, executed per kiosk in one lock order for all bridges
        # (psycopg pipelines the executions into one round trip).
        conn.execute(
            stmt,
            [{"kiosk": k, "through": p.through} for k, p in sorted(progress.items())],
        )

    # -- reads ----------------------------------------------------------------

    def readings(
        self,
        *,
        kiosk_ids: Sequence[str] | None = None,
        metrics: Sequence[str] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        after_id: int | None = None,
        patient_refs: Sequence[str] | None = None,
        limit: int = 100,
    ) -> list[StoredReading]:
        """Return stored readings in store order (ascending ``id``).

        ``patient_refs`` keeps readings of scans bound to one of those patients.
        """
        query = select(*_READING_COLUMNS).order_by(ReadingRow.id).limit(limit)
        if patient_refs:
            query = query.join(
                Scan,
                (Scan.kiosk_id == ReadingRow.kiosk_id)
                & (Scan.scan_id == ReadingRow.scan_id),
            ).where(Scan.patient_ref.in_(patient_refs))
        if kiosk_ids:
            query = query.where(ReadingRow.kiosk_id.in_(kiosk_ids))
        if metrics:
            query = query.where(ReadingRow.metric.in_(metrics))
        if since is not None:
            query = query.where(ReadingRow.measured_at >= since)
        if until is not None:
            query = query.where(ReadingRow.measured_at < until)
        if after_id is not None:
            query = query.where(ReadingRow.id > after_id)
        try:
            with self.engine.connect() as conn:
                return [reading_from_row(row) for row in conn.execute(query)]
        except SQLAlchemyError as exc:
            raise StoreError(f"readings query failed: {type(exc).__name__}") from exc

    def kiosks(self) -> list[dict[str, Any]]:
        """Return every known kiosk with its state and delivery mark."""
        query = select(Kiosk).order_by(Kiosk.kiosk_id)
        try:
            with self.engine.connect() as conn:
                return [
                    {
                        "kiosk_id": k.kiosk_id,
                        "state": k.state,
                        "agent_version": k.agent_version,
                        "committed_through": k.committed_through,
                        "status_at": _iso(k.status_at),
                        "last_seen_at": _iso(k.last_seen_at),
                    }
                    for k in conn.execute(query)
                ]
        except SQLAlchemyError as exc:
            raise StoreError(f"kiosks query failed: {type(exc).__name__}") from exc

    def purge_older_than(self, cutoff: datetime) -> int:
        """Delete readings, scan events and dead letters before ``cutoff``."""
        try:
            with self.engine.begin() as conn:
                removed = conn.execute(
                    delete(ReadingRow).where(ReadingRow.measured_at < cutoff)
                ).rowcount
                conn.execute(delete(ScanEventRow).where(ScanEventRow.at < cutoff))
                conn.execute(delete(DeadLetter).where(DeadLetter.received_at < cutoff))
        except SQLAlchemyError as exc:
            raise StoreError(f"retention purge failed: {type(exc).__name__}") from exc
        return int(removed)

    def ping(self) -> None:
        """Run a trivial query; raise :class:`StoreError` when the database is down."""
        try:
            with self.engine.connect() as conn:
                conn.execute(select(1))
        except SQLAlchemyError as exc:
            raise StoreError(f"database unreachable: {type(exc).__name__}") from exc


def _iso(value: datetime | None) -> str | None:
    return None if value is None else utc(value).isoformat()
