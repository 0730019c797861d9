"""The SQL store on SQLite and PostgreSQL: idempotent batches, marks, queries."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select
from support import POSTGRES_ADMIN_URL

from bridge.errors import StoreError
from bridge.store import Batch, DeadLetterIn, Store, StoredReading
from bridge.store.db import IDLE_PING_SECONDS, utc
from bridge.store.migrate import upgrade
from bridge.store.models import DeadLetter, Kiosk, Scan
from vitals_contract import METRICS, Metric, Reading, ScanEvent, ScanState

T0 = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
ZERO = timedelta(0)


def make_reading(
    seq: int, metric: Metric = Metric.HEART_RATE, value: float = 72.0
) -> Reading:
    return Reading(
        seq=seq,
        scan_id="s1",
        metric=metric,
        value=value,
        unit=METRICS[metric].unit,
        quality=0.9,
        measured_at=T0 + timedelta(seconds=seq),
    )


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    upgrade(database_url)
    s = Store.from_url(database_url)
    yield s
    s.close()


def test_batch_is_stored_once_and_marks_contiguous_progress(store: Store) -> None:
    first = store.write_batch(
        Batch(readings=[("k1", make_reading(s)) for s in (0, 1, 3)])
    )
    assert [r.seq for r in first.new_readings] == [0, 1, 3]
    assert first.through == {"k1": 1}

    again = store.write_batch(
        Batch(readings=[("k1", make_reading(s)) for s in (1, 2, 3)])
    )
    assert [r.seq for r in again.new_readings] == [2]
    assert again.duplicates == 2
    assert again.through == {"k1": 3}

    rows = store.readings(kiosk_ids=["k1"], limit=100)
    assert [r.seq for r in rows] == [0, 1, 3, 2]  # store order is arrival order
    assert [r.id for r in rows] == sorted(r.id for r in rows)


def test_progress_survives_a_new_store_instance(
    store: Store, database_url: str
) -> None:
    store.write_batch(Batch(readings=[("k1", make_reading(s)) for s in (0, 2, 3)]))
    reopened = Store.from_url(database_url)
    try:
        result = reopened.write_batch(Batch(readings=[("k1", make_reading(1))]))
        assert result.through == {"k1": 3}
    finally:
        reopened.close()


def test_a_gap_another_bridge_filled_is_closed(store: Store, database_url: str) -> None:
    """Two bridges sharing the ingest each store part of one kiosk's seqs."""
    other = Store.from_url(database_url)
    try:
        assert store.write_batch(
            Batch(readings=[("k1", make_reading(s)) for s in (0, 1, 5, 6)])
        ).through == {"k1": 1}
        # The other bridge stores the first gap and part of the seqs after it.
        other.write_batch(Batch(readings=[("k1", make_reading(s)) for s in (2, 3, 4)]))
        result = store.write_batch(Batch(readings=[("k1", make_reading(7))]))
        assert result.through == {"k1": 7}
        # A gap nobody filled stays open, whatever is stored above it.
        other.write_batch(Batch(readings=[("k1", make_reading(s)) for s in (9, 10)]))
        result = store.write_batch(Batch(readings=[("k1", make_reading(11))]))
        assert result.through == {"k1": 7}
        # What another bridge settled without storing (a dead letter) closes it too.
        other.write_batch(
            Batch(dead=[DeadLetterIn("t", "bad value", b"{}", kiosk_id="k1", seq=8)])
        )
        result = store.write_batch(Batch(readings=[("k1", make_reading(12))]))
        assert result.through == {"k1": 12}
    finally:
        other.close()


def test_keys_another_bridge_stored_meanwhile_are_skipped(
    store: Store, database_url: str
) -> None:
    """A batch this store thinks wholly new, part of it stored by another bridge."""
    other = Store.from_url(database_url)
    try:
        store.write_batch(Batch(readings=[("k1", make_reading(s)) for s in range(5)]))
        other.write_batch(
            Batch(readings=[("k1", make_reading(s, value=50.0)) for s in range(5, 10)])
        )
        result = store.write_batch(
            Batch(readings=[("k1", make_reading(s)) for s in range(5, 12)])
        )
        assert [r.seq for r in result.new_readings] == [10, 11]
        assert [(r.seq, r.value) for r in result.redelivered] == [
            (s, 50.0) for s in range(5, 10)
        ]
        assert (result.duplicates, result.through) == (5, {"k1": 11})
        stored = store.readings(kiosk_ids=["k1"], limit=100)
        assert sorted(r.seq for r in stored) == list(range(12))
        # And the next batch, wholly new, is stored as usual.
        result = store.write_batch(Batch(readings=[("k1", make_reading(12))]))
        assert ([r.seq for r in result.new_readings], result.duplicates) == ([12], 0)
    finally:
        other.close()


def test_kiosks_are_independent(store: Store) -> None:
    result = store.write_batch(
        Batch(
            readings=[
                ("a", make_reading(0)),
                ("b", make_reading(5)),
                ("b", make_reading(0)),
            ]
        )
    )
    assert result.through == {"a": 0, "b": 0}
    assert {k["kiosk_id"]: k["committed_through"] for k in store.kiosks()} == {
        "a": 0,
        "b": 0,
    }


def test_floor_and_dead_letters_settle_seqs(store: Store) -> None:
    batch = Batch(
        readings=[("k1", make_reading(7))],
        dead=[DeadLetterIn("t", "value outside range", b"{}", "k1", 6)],
    )
    batch.note_floor("k1", 6)  # seqs below 6 were dropped by the kiosk
    result = store.write_batch(batch)
    assert result.through == {"k1": 7}
    with store.engine.connect() as conn:
        dead = conn.execute(select(DeadLetter)).one()
    assert (dead.kiosk_id, dead.seq, dead.reason) == ("k1", 6, "value outside range")


def test_dead_letter_payload_is_capped(store: Store) -> None:
    store.write_batch(Batch(dead=[DeadLetterIn("t", "too big", b"x" * 100_000)]))
    with store.engine.connect() as conn:
        size, stored = conn.execute(
            select(DeadLetter.size_bytes, func.length(DeadLetter.payload))
        ).one()
    assert size == 100_000
    assert stored == 4096


def test_scan_events_build_the_scan_record(store: Store) -> None:
    def event(seq: int, state: ScanState) -> ScanEvent:
        return ScanEvent(
            kiosk_id="k1",
            seq=seq,
            scan_id="s1",
            state=state,
            at=T0 + timedelta(seconds=seq),
            patient_ref="p-1" if seq == 0 else None,
        )

    store.write_batch(
        Batch(events=[event(0, ScanState.FACE_PRESENT), event(1, ScanState.SCANNING)])
    )
    result = store.write_batch(
        Batch(events=[event(1, ScanState.SCANNING), event(2, ScanState.COMPLETE)])
    )
    assert result.duplicates == 1
    assert result.through == {"k1": 2}
    with store.engine.connect() as conn:
        scan = conn.execute(select(Scan)).one()
        kiosk = conn.execute(select(Kiosk)).one()
    assert (scan.state, scan.patient_ref) == ("complete", "p-1")
    assert kiosk.committed_through == 2


def test_a_key_twice_in_one_batch_reports_what_was_stored(store: Store) -> None:
    result = store.write_batch(
        Batch(
            readings=[
                ("k1", make_reading(5, value=60.0)),
                ("k1", make_reading(5, value=99.0)),  # same key, other value
                ("k1", make_reading(6)),
            ]
        )
    )
    assert [(r.seq, r.value) for r in result.new_readings] == [(5, 60.0), (6, 72.0)]
    assert result.duplicates == 1
    [stored] = store.readings(kiosk_ids=["k1"], limit=1)
    assert (stored.id, stored.value) == (result.new_readings[0].id, 60.0)


def test_a_late_older_scan_event_does_not_undo_a_newer_one(store: Store) -> None:
    def event(seq: int, state: ScanState, patient: str | None = None) -> ScanEvent:
        return ScanEvent(
            kiosk_id="k1",
            seq=seq,
            scan_id="s1",
            state=state,
            at=T0 + timedelta(seconds=seq),
            patient_ref=patient,
        )

    store.write_batch(
        Batch(events=[event(0, ScanState.FACE_PRESENT), event(2, ScanState.COMPLETE)])
    )
    # The scanning event and the patient binding arrive last (a replay).
    store.write_batch(Batch(events=[event(1, ScanState.SCANNING, "p-7")]))
    with store.engine.connect() as conn:
        scan = conn.execute(select(Scan)).one()
    assert scan.state == "complete"
    assert utc(scan.updated_at) == T0 + timedelta(seconds=2)
    assert utc(scan.started_at) == T0 + timedelta(seconds=1)
    assert scan.patient_ref == "p-7"  # filled in, as nothing newer set one


def test_queries_filter_and_page(store: Store) -> None:
    metrics = [Metric.HEART_RATE, Metric.SPO2]
    store.write_batch(
        Batch(
            readings=[
                ("k1", make_reading(s, metrics[s % 2], 70 + s % 2 * 25))
                for s in range(10)
            ]
        )
    )
    spo2 = store.readings(metrics=["spo2"], limit=100)
    assert [r.seq for r in spo2] == [1, 3, 5, 7, 9]
    assert all(r.estimate for r in spo2)
    window = store.readings(
        since=T0 + timedelta(seconds=2), until=T0 + timedelta(seconds=5)
    )
    assert [r.seq for r in window] == [2, 3, 4]
    page1 = store.readings(limit=4)
    page2 = store.readings(limit=4, after_id=page1[-1].id)
    assert [r.seq for r in page1 + page2] == list(range(8))
    assert page1[0].measured_at.tzinfo is not None


def test_retention_purges_old_readings_only(store: Store) -> None:
    store.write_batch(Batch(readings=[("k1", make_reading(s)) for s in range(10)]))
    removed = store.purge_older_than(T0 + timedelta(seconds=4))
    assert removed == 4
    assert [r.seq for r in store.readings(limit=100)] == [4, 5, 6, 7, 8, 9]
    # The delivery mark is untouched: purged seqs are not asked for again.
    assert store.write_batch(Batch(readings=[("k1", make_reading(10))])).through == {
        "k1": 10
    }


_SCAN_IDS = st.one_of(st.none(), st.from_regex(r"[A-Za-z0-9_.-]{1,64}", fullmatch=True))
_OFFSETS = st.integers(-14 * 60, 14 * 60).map(lambda m: timezone(timedelta(minutes=m)))


@st.composite
def _readings(draw: st.DrawFn) -> list[Reading]:
    """Valid readings of any metric: values across each metric's range, odd times."""
    out = []
    for seq in sorted(draw(st.sets(st.integers(0, 2**62), min_size=1, max_size=40))):
        metric = draw(st.sampled_from(list(Metric)))
        info = METRICS[metric]
        out.append(
            Reading(
                seq=seq,
                scan_id=draw(_SCAN_IDS),
                metric=metric,
                value=draw(st.floats(info.min_value, info.max_value)),
                unit=info.unit,
                quality=draw(st.floats(0.0, 1.0)),
                final=draw(st.booleans()),
                measured_at=draw(
                    st.datetimes(
                        datetime(2000, 1, 1), datetime(2100, 1, 1), timezones=_OFFSETS
                    )
                ),
            )
        )
    return out


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(readings=_readings())
def test_readings_round_trip_exactly(store: Store, readings: list[Reading]) -> None:
    """What a batch reports as stored is what was sent, and what a query returns."""
    kiosk_id = f"rt-{uuid.uuid4().hex[:12]}"  # each example a kiosk of its own
    # The first batch of a kiosk the store does not know goes by INSERT ... ON
    # CONFLICT, the next (keys surely new) by COPY on PostgreSQL: test both.
    first = store.write_batch(Batch(readings=[(kiosk_id, readings[0])]))
    rest = store.write_batch(Batch(readings=[(kiosk_id, r) for r in readings[1:]]))
    new = first.new_readings + rest.new_readings

    sent = [
        (r.seq, r.scan_id, r.metric.value, r.value, r.unit, r.quality, r.final)
        for r in readings
    ]
    reported = [
        (s.seq, s.scan_id, s.metric, s.value, s.unit, s.quality, s.final) for s in new
    ]
    assert reported == sent
    assert [s.measured_at for s in new] == [r.measured_at for r in readings]
    stored = store.readings(kiosk_ids=[kiosk_id], limit=100)
    assert sorted(s.id for s in stored) == [s.id for s in new]
    by_seq = {s.seq: s for s in stored}
    for r in readings:
        s = by_seq[r.seq]
        assert (s.value, s.quality, s.final, s.scan_id) == (
            r.value,
            r.quality,
            r.final,
            r.scan_id,
        )
        assert s.measured_at == r.measured_at
        assert s.measured_at.utcoffset() == ZERO
        # The live form (orjson encodes the timestamps) says what the API says,
        # and hub listeners rebuild the reading from it as this bridge hands it
        # over and as another bridge's live topic carries it.
        live = s.live_message()
        assert orjson.loads(orjson.dumps(live)) == {"type": "reading", **s.to_json()}
        assert StoredReading.from_json(live) == s
        assert StoredReading.from_json(orjson.loads(orjson.dumps(live))) == s


@pytest.mark.parametrize("fault", ["lock_timeout", "backend_killed"])
def test_a_copy_that_fails_fails_the_batch_and_the_retry_stores_it(
    postgres_url: str, fault: str
) -> None:
    """The COPY path runs outside SQLAlchemy's execution: its faults must not leak.

    A COPY waiting for a table lock either gives up (``lock_timeout``: the
    connection survives) or loses its connection; either way the batch fails as a
    :class:`StoreError`, which ingest retries, and the retry stores it.
    """
    import psycopg

    upgrade(postgres_url)
    plain_url = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    database = postgres_url.rsplit("/", 1)[1]
    with psycopg.connect(plain_url, autocommit=True) as admin:
        if fault == "lock_timeout":
            admin.execute(f'ALTER DATABASE "{database}" SET lock_timeout = 300')
    store = Store.from_url(postgres_url)
    try:
        store.write_batch(Batch(readings=[("k1", make_reading(0))]))  # kiosk known
        batch = Batch(readings=[("k1", make_reading(s)) for s in (1, 2, 3)])
        failure: list[BaseException] = []

        def write() -> None:
            try:
                store.write_batch(batch)
            except BaseException as exc:  # handed to the test thread
                failure.append(exc)

        with (
            psycopg.connect(plain_url, autocommit=True) as admin,
            psycopg.connect(plain_url) as locker,
        ):
            locker.execute("LOCK TABLE readings IN ACCESS EXCLUSIVE MODE")
            writer = threading.Thread(target=write)
            writer.start()
            if fault == "backend_killed":
                # The batch's COPY waits for the lock; cut its connection there.
                deadline = time.monotonic() + 10
                pid = None
                while pid is None and time.monotonic() < deadline:
                    pid = admin.execute(
                        "SELECT pid FROM pg_stat_activity WHERE query LIKE 'COPY%%'"
                        " AND wait_event_type = 'Lock'"
                    ).fetchone()
                    time.sleep(0.02)
                assert pid is not None, "the batch never reached its COPY"
                admin.execute("SELECT pg_terminate_backend(%s)", pid)
            writer.join(10)
        assert [type(e) for e in failure] == [StoreError]
        result = store.write_batch(batch)
        assert [r.seq for r in result.new_readings] == [1, 2, 3]
        assert result.through == {"k1": 3}
    finally:
        store.close()


def test_only_idle_connections_are_pinged_and_a_dead_one_is_replaced(
    postgres_url: str,
) -> None:
    """A connection used a moment ago goes out as it is; an idle one is checked.

    The server drops the pooled connection while it idles; the next batch gets a
    fresh connection from the ping and never sees the dead one.
    """
    import psycopg

    upgrade(postgres_url)
    store = Store.from_url(postgres_url)
    dialect = store.engine.dialect
    real_ping = dialect.do_ping
    pings: list[int] = []

    def counted_ping(dbapi_conn: object) -> bool:
        pings.append(1)
        return bool(real_ping(dbapi_conn))

    dialect.do_ping = counted_ping  # type: ignore[method-assign]
    try:
        store.write_batch(Batch(readings=[("k1", make_reading(0))]))
        with store.engine.connect() as conn:
            pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        assert pings == []  # each checkout came straight after the last

        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        time.sleep(IDLE_PING_SECONDS + 0.2)  # the idling is what is under test

        result = store.write_batch(Batch(readings=[("k1", make_reading(1))]))
        assert [r.seq for r in result.new_readings] == [1]
        assert pings == [1]
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one() != pid
    finally:
        store.close()
