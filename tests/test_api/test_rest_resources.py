"""REST resources over a real server: kiosk detail and status, scans, ETags.

One server per database serves the module. Data reaches it the way it does in
production: a store on the same database commits batches of readings, scan events
and statuses (as ingest does), and HTTP uploads go through the bridge's ingest,
which also raises alerts. Each test reads its own kiosks, so the order of tests
does not matter.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from pydantic import BaseModel
from support import (
    BrokerEndpoint,
    ServerThread,
    bridge_settings,
    embedded_amqtt,
    fresh_postgres,
)

from api.rest import KioskDetail, KioskLiveStatus, ReadingsPage
from api.scans import ScanDetail, ScansPage
from bridge.store import Batch, DeadLetterIn, Store
from vitals_contract import (
    METRICS,
    KioskState,
    KioskStatus,
    Metric,
    Reading,
    ScanEvent,
    ScanState,
)

READ = ("vitals.read",)
PATIENT = ("vitals.read", "vitals.patient.read")
INGEST = ("vitals.ingest", "vitals.read")
STALE_SECONDS = 3600.0
NOW = datetime.now(UTC).replace(microsecond=0)
PATIENT_REF = "MRN-7/a"


@dataclass(slots=True)
class Env:
    """The server, a store writing to its database, and clients by scope."""

    server: ServerThread
    store: Store
    read: httpx.Client
    patient: httpx.Client
    ingest: httpx.Client


# -- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rest_broker() -> Iterator[BrokerEndpoint]:
    with embedded_amqtt() as broker:
        yield broker


@pytest.fixture(scope="module")
def rest_sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('rest') / 'vitals.db'}"


@pytest.fixture(scope="module")
def rest_postgres_url() -> Iterator[str]:
    with fresh_postgres("vitals_rest") as url:
        yield url


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def env(request: pytest.FixtureRequest, rest_broker: BrokerEndpoint) -> Iterator[Env]:
    """The API on each database, migrated by its own start-up."""
    url: str = request.getfixturevalue(f"rest_{request.param}_url")
    settings = bridge_settings(
        rest_broker,
        url,
        limits={"requests_per_second": 1e6, "burst": 1_000_000},
        dashboard={"stale_seconds": STALE_SECONDS},
    )
    server = ServerThread(settings)
    server.start()
    store = Store.from_url(url)
    clients = [server.http(scopes) for scopes in (READ, PATIENT, INGEST)]
    try:
        yield Env(server, store, *clients)
    finally:
        for c in clients:
            c.close()
        store.close()
        server.stop()


# -- data -----------------------------------------------------------------------------


class Kiosk:
    """Builds one kiosk's messages with consecutive seqs, as its outbox would."""

    def __init__(self, kiosk_id: str | None = None) -> None:
        self.kiosk_id = kiosk_id or f"rk-{uuid.uuid4().hex[:8]}"
        self._seq = -1

    def seq(self) -> int:
        self._seq += 1
        return self._seq

    def reading(
        self,
        metric: Metric,
        at: datetime,
        value: float | None = None,
        scan_id: str | None = None,
        quality: float = 0.8,
    ) -> Reading:
        info = METRICS[metric]
        return Reading(
            seq=self.seq(),
            scan_id=scan_id,
            metric=metric,
            value=info.min_value + 1 if value is None else value,
            unit=info.unit,
            quality=quality,
            measured_at=at,
        )

    def event(
        self,
        scan_id: str,
        state: ScanState,
        at: datetime,
        patient_ref: str | None = None,
        reason: str | None = None,
    ) -> ScanEvent:
        return ScanEvent(
            kiosk_id=self.kiosk_id,
            seq=self.seq(),
            scan_id=scan_id,
            state=state,
            at=at,
            patient_ref=patient_ref,
            reason=reason,
        )

    def status(self, state: KioskState, at: datetime) -> KioskStatus:
        return KioskStatus(
            kiosk_id=self.kiosk_id, state=state, at=at, agent_version="1.4.2"
        )


def commit(env: Env, kiosk: Kiosk, *items: Any) -> None:
    """Commit readings, events, statuses and dead letters in one batch."""
    batch = Batch()
    for item in items:
        if isinstance(item, Reading):
            batch.readings.append((kiosk.kiosk_id, item))
        elif isinstance(item, ScanEvent):
            batch.events.append(item)
        elif isinstance(item, KioskStatus):
            batch.statuses.append(item)
        else:
            batch.dead.append(item)
    env.store.write_batch(batch)


@dataclass(slots=True)
class ScannedKiosk:
    """A kiosk with one complete scan bound to a patient and one aborted scan."""

    kiosk: Kiosk
    status_at: datetime
    scan_readings: list[Reading]
    events: list[ScanEvent]
    loose: list[Reading]


def scanned_kiosk(env: Env) -> ScannedKiosk:
    k = Kiosk()
    t0 = NOW - timedelta(minutes=30)
    status = k.status(KioskState.ONLINE, t0)
    events = [
        k.event("s1", ScanState.FACE_PRESENT, t0, patient_ref=PATIENT_REF),
        k.event("s1", ScanState.SCANNING, t0 + timedelta(seconds=2)),
    ]
    readings = [
        k.reading(m, t0 + timedelta(seconds=3 + i), value=None, scan_id="s1")
        for i, m in enumerate(Metric)
    ] + [
        k.reading(m, t0 + timedelta(seconds=20 + i), scan_id="s1", quality=0.9)
        for i, m in enumerate((Metric.HEART_RATE, Metric.SPO2))
    ]
    events.append(k.event("s1", ScanState.COMPLETE, t0 + timedelta(seconds=32)))
    events.append(
        k.event("s2", ScanState.ABORTED, t0 + timedelta(minutes=5), reason="face lost")
    )
    loose = [k.reading(Metric.HEART_RATE, t0 + timedelta(minutes=6), value=88)]
    dead = DeadLetterIn(
        f"vitals/v1/kiosk/{k.kiosk_id}/readings", "bad", b"{}", k.kiosk_id, k.seq()
    )
    commit(env, k, status, events[0], events[1], *readings)
    commit(env, k, *events[2:], *loose, dead)
    return ScannedKiosk(k, t0, readings, events, loose)


# Every answer must fit the model that documents it in OpenAPI.
MODELS: list[tuple[str, type[BaseModel]]] = [
    (r"^/api/v1/kiosks/[^/]+$", KioskDetail),
    (r"^/api/v1/kiosks/[^/]+/status$", KioskLiveStatus),
    (r"^/api/v1/scans$", ScansPage),
    (r"^/api/v1/scans/[^/]+/[^/]+$", ScanDetail),
    (r"^/api/v1/readings$", ReadingsPage),
]


def ok(response: httpx.Response) -> Any:
    """Expect 200 and an answer that fits its documented model; return it."""
    assert response.status_code == 200, response.text
    body = response.json()
    path = response.request.url.path
    for pattern, model in MODELS:
        if response.request.method == "GET" and re.match(pattern, path):
            model.model_validate(body)
    return body


def not_found(response: httpx.Response) -> None:
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "not_found"


# -- kiosks ---------------------------------------------------------------------------


def test_kiosk_detail_matches_what_was_stored(env: Env) -> None:
    sk = scanned_kiosk(env)
    body = ok(env.read.get(f"/api/v1/kiosks/{sk.kiosk.kiosk_id}"))

    assert body["kiosk_id"] == sk.kiosk.kiosk_id
    assert body["state"] == "online"
    assert body["agent_version"] == "1.4.2"
    assert datetime.fromisoformat(body["status_at"]) == sk.status_at
    assert body["committed_through"] == sk.kiosk._seq
    assert body["last_seen_at"] is not None
    last = sk.loose[-1]
    assert (body["last_reading"]["seq"], body["last_reading"]["metric"]) == (
        last.seq,
        last.metric.value,
    )
    assert "value" not in body["last_reading"]
    assert body["counts"] == {
        "window_hours": 24.0,
        "readings_in_window": len(sk.scan_readings) + len(sk.loose),
        "dead_letters_in_window": 1,
        "scans_by_state": {"aborted": 1, "complete": 1},
        "scans_total": 2,
        "open_alerts": 0,
    }


@pytest.mark.parametrize("path", ["", "/status"])
@pytest.mark.parametrize("kiosk_id", ["never-heard-of", "-dash", "x" * 65, "a%20b"])
def test_unknown_or_invalid_kiosk_is_404(env: Env, kiosk_id: str, path: str) -> None:
    not_found(env.read.get(f"/api/v1/kiosks/{kiosk_id}{path}"))


def test_status_gives_latest_values_scan_and_open_alerts(env: Env) -> None:
    sk = scanned_kiosk(env)
    k = sk.kiosk.kiosk_id

    body = ok(env.read.get(f"/api/v1/kiosks/{k}/status"))
    assert (body["state"], body["online"], body["stale"]) == ("online", True, False)
    assert body["stale_seconds"] == STALE_SECONDS
    newest = max(r.measured_at for r in (*sk.scan_readings, *sk.loose))
    assert datetime.fromisoformat(body["fresh_until"]) == newest + timedelta(
        seconds=STALE_SECONDS
    )
    expected: dict[str, Reading] = {}
    for r in (*sk.scan_readings, *sk.loose):
        if r.metric not in expected or r.measured_at > expected[r.metric].measured_at:
            expected[r.metric] = r
    assert [
        (r["metric"], r["seq"], r["value"], r["quality"], r["stale"])
        for r in body["latest"]
    ] == [
        (m.value, expected[m].seq, expected[m].value, expected[m].quality, False)
        for m in Metric
    ]
    # The aborted scan started last; without the scope there is no patient_ref.
    assert body["scan"]["scan_id"] == "s2"
    assert body["scan"]["state"] == "aborted"
    assert body["scan"]["reason"] == "face lost"
    assert body["scan"]["active"] is False
    assert "patient_ref" not in body["scan"]
    assert body["open_alerts"] == []


def test_status_of_an_uploaded_scan_with_an_alert(env: Env) -> None:
    k = Kiosk()
    at = NOW - timedelta(minutes=1)
    scan = {
        "kiosk_id": k.kiosk_id,
        "seq": k.seq(),
        "scan_id": "up-1",
        "completed_at": at.isoformat(),
        "patient_ref": PATIENT_REF,
        "readings": [
            k.reading(Metric.RESPIRATORY_RATE, at).model_dump(mode="json"),
        ],
    }
    assert ok(env.ingest.post("/api/v1/scans", json=scan))["stored"] == 1
    # Heart rate of 150 for 10 s: over the high band for longer than it must hold.
    batch = [
        {"kiosk_id": k.kiosk_id}
        | k.reading(
            Metric.HEART_RATE, at + timedelta(seconds=s), value=150, quality=0.9
        ).model_dump(mode="json")
        for s in range(0, 11, 2)
    ]
    assert ok(env.ingest.post("/api/v1/readings/batch", json=batch))["stored"] == 6

    body = ok(env.patient.get(f"/api/v1/kiosks/{k.kiosk_id}/status"))
    assert body["state"] == "unknown"  # the kiosk never sent a status
    assert body["online"] is False
    assert body["scan"]["scan_id"] == "up-1"
    assert body["scan"]["state"] == "complete"
    assert body["scan"]["patient_ref"] == PATIENT_REF
    assert [a["metric"] for a in body["open_alerts"]] == ["heart_rate"]
    assert body["open_alerts"][0]["severity"] == "high"
    assert [r["metric"] for r in body["latest"]] == ["heart_rate", "respiratory_rate"]
    detail = ok(env.read.get(f"/api/v1/kiosks/{k.kiosk_id}"))
    assert detail["counts"]["open_alerts"] == 1


def test_status_turns_stale_with_old_values(env: Env) -> None:
    k = Kiosk()
    old = NOW - timedelta(hours=2)
    reading = k.reading(Metric.HEART_RATE, old)
    commit(env, k, k.status(KioskState.ONLINE, old), reading)

    body = ok(env.read.get(f"/api/v1/kiosks/{k.kiosk_id}/status"))
    assert (body["online"], body["stale"]) == (True, True)
    assert body["latest"][0]["stale"] is True
    assert datetime.fromisoformat(body["fresh_until"]) == old + timedelta(
        seconds=STALE_SECONDS
    )
    assert body["scan"] is None

    quiet = Kiosk()
    commit(env, quiet, quiet.status(KioskState.OFFLINE, old))
    body = ok(env.read.get(f"/api/v1/kiosks/{quiet.kiosk_id}/status"))
    assert (body["state"], body["online"], body["stale"]) == ("offline", False, True)
    assert (body["latest"], body["fresh_until"]) == ([], None)


# -- scans ----------------------------------------------------------------------------


def test_scan_detail_has_its_readings_and_events(env: Env) -> None:
    sk = scanned_kiosk(env)
    path = f"/api/v1/scans/{sk.kiosk.kiosk_id}/s1"

    body = ok(env.read.get(path))
    assert (body["kiosk_id"], body["scan_id"], body["state"]) == (
        sk.kiosk.kiosk_id,
        "s1",
        "complete",
    )
    # Started when scanning began, updated when it completed.
    assert datetime.fromisoformat(body["started_at"]) == sk.events[1].at
    assert datetime.fromisoformat(body["updated_at"]) == sk.events[2].at
    assert "patient_ref" not in body
    assert [(r["seq"], r["metric"], r["value"]) for r in body["readings"]] == [
        (r.seq, r.metric.value, r.value) for r in sk.scan_readings
    ]
    assert body["readings_truncated"] is False
    assert [(e["seq"], e["state"]) for e in body["events"]] == [
        (e.seq, e.state.value) for e in sk.events[:3]
    ]
    assert ok(env.patient.get(path))["patient_ref"] == PATIENT_REF

    not_found(env.read.get(f"/api/v1/scans/{sk.kiosk.kiosk_id}/nope"))
    not_found(env.read.get(f"/api/v1/scans/{sk.kiosk.kiosk_id}/bad%20id"))
    not_found(env.read.get("/api/v1/scans/-bad/s1"))


def test_scan_reads_are_audited(env: Env) -> None:
    sk = scanned_kiosk(env)
    k = sk.kiosk.kiosk_id
    ok(env.patient.get(f"/api/v1/scans/{k}/s1"))
    ok(env.read.get("/api/v1/scans", params={"kiosk_id": k}))
    ok(env.read.get(f"/api/v1/kiosks/{k}/status"))

    with env.server.http(("vitals.admin",)) as admin:
        audit = ok(admin.get("/api/v1/audit", params={"limit": 1000}))
    resources = {e["resource"] for e in audit if e["actor"] == "test-user"}
    assert {
        f"scan:{k}/s1",
        f"scans?kiosk_id={k}",
        f"kiosk:{k}/status",
    } <= resources


def test_scan_list_filters_and_patient_scope(env: Env) -> None:
    sk = scanned_kiosk(env)
    other = scanned_kiosk(env)
    k = sk.kiosk.kiosk_id

    def ids(client: httpx.Client, **params: Any) -> list[tuple[str, str]]:
        page = ok(client.get("/api/v1/scans", params=params))
        return [(s["kiosk_id"], s["scan_id"]) for s in page["items"]]

    assert ids(env.read, kiosk_id=k) == [(k, "s1"), (k, "s2")]
    # Both aborted scans started at the same instant: kiosk id breaks the tie.
    both = [k, other.kiosk.kiosk_id]
    assert ids(env.read, kiosk_id=both, state="aborted") == sorted(
        (kiosk_id, "s2") for kiosk_id in both
    )
    s2_start = sk.events[3].at
    assert ids(env.read, kiosk_id=k, since=s2_start.isoformat()) == [(k, "s2")]
    assert ids(env.read, kiosk_id=k, until=s2_start.isoformat()) == [(k, "s1")]
    # The same instant in another zone selects the same scans.
    local = s2_start.astimezone(timezone(timedelta(hours=-5)))
    assert ids(env.read, kiosk_id=k, since=local.isoformat()) == [(k, "s2")]

    # Patient refs: hidden without the scope, and filtering by patient needs it.
    items = ok(env.read.get("/api/v1/scans", params={"kiosk_id": k}))["items"]
    assert all("patient_ref" not in s for s in items)
    refused = env.read.get("/api/v1/scans", params={"patient": PATIENT_REF})
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "insufficient_scope"
    mine = ids(env.patient, patient=PATIENT_REF, kiosk_id=k)
    assert mine == [(k, "s1")]
    items = ok(env.patient.get("/api/v1/scans", params={"kiosk_id": k}))["items"]
    assert [s["patient_ref"] for s in items] == [PATIENT_REF, None]

    for bad in ({"kiosk_id": "bad id"}, {"cursor": "nope"}, {"state": "asleep"}):
        response = env.read.get("/api/v1/scans", params=bad)
        assert response.status_code == 422, bad
        assert response.json()["error"]["code"] == "invalid_request"


def test_readings_by_patient_need_the_scope(env: Env) -> None:
    sk = scanned_kiosk(env)
    k = sk.kiosk.kiosk_id
    params = {"kiosk_id": k, "patient": PATIENT_REF, "limit": 1000}
    refused = env.read.get("/api/v1/readings", params=params)
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "insufficient_scope"
    page = ok(env.patient.get("/api/v1/readings", params=params))
    # The scan bound to the patient, not the loose reading after it.
    assert [r["seq"] for r in page["items"]] == [r.seq for r in sk.scan_readings]
    other = ok(env.patient.get("/api/v1/readings", params={**params, "patient": "x"}))
    assert other["items"] == []
    too_long = env.patient.get("/api/v1/readings", params={"patient": "p" * 129})
    assert too_long.status_code == 422


@pytest.mark.parametrize("limit", [1, 4, 7, 100])
def test_scan_pages_lose_and_double_nothing(env: Env, limit: int) -> None:
    k = Kiosk()
    t0 = NOW - timedelta(hours=3)
    # 23 scans; some start at the same instant, so the tie-break is exercised.
    events = [
        k.event(f"p{n:02d}", ScanState.COMPLETE, t0 + timedelta(seconds=n // 3))
        for n in range(23)
    ]
    commit(env, k, *events)
    expected = sorted((e.at, e.scan_id) for e in events)

    seen: list[tuple[datetime, str]] = []
    params: dict[str, Any] = {"kiosk_id": k.kiosk_id, "limit": limit}
    while True:
        page = ok(env.read.get("/api/v1/scans", params=params))
        seen += [
            (datetime.fromisoformat(s["started_at"]), s["scan_id"])
            for s in page["items"]
        ]
        if not page["has_more"]:
            break
        params["cursor"] = page["next_cursor"]
    assert seen == expected
    # Polling past the end: an empty page, no cursor, nothing more.
    params["cursor"] = page["next_cursor"]
    last = ok(env.read.get("/api/v1/scans", params=params))
    assert last == {"items": [], "next_cursor": None, "has_more": False}


def test_readings_time_bounds_in_any_zone(env: Env) -> None:
    k = Kiosk()
    at = NOW - timedelta(minutes=10)
    commit(env, k, k.reading(Metric.HEART_RATE, at), k.reading(Metric.SPO2, NOW))
    zone = timezone(timedelta(hours=5, minutes=30))

    def seqs(**bounds: datetime) -> list[int]:
        params = {"kiosk_id": k.kiosk_id} | {
            name: value.astimezone(zone).isoformat() for name, value in bounds.items()
        }
        page = ok(env.read.get("/api/v1/readings", params=params))
        return [r["seq"] for r in page["items"]]

    assert seqs(since=at + timedelta(seconds=1)) == [1]
    assert seqs(until=at + timedelta(seconds=1)) == [0]
    assert seqs(since=at, until=NOW + timedelta(seconds=1)) == [0, 1]


# -- ETags ----------------------------------------------------------------------------


def conditional(
    client: httpx.Client, path: str, etag: str, **params: Any
) -> httpx.Response:
    return client.get(path, params=params, headers={"If-None-Match": etag})


def test_readings_etag_round_trip(env: Env) -> None:
    k = Kiosk()
    first = [{"kiosk_id": k.kiosk_id} | k.reading(Metric.SPO2, NOW).model_dump(
        mode="json"
    )]  # fmt: skip
    ok(env.ingest.post("/api/v1/readings/batch", json=first))
    params = {"kiosk_id": k.kiosk_id}

    response = env.read.get("/api/v1/readings", params=params)
    etag = response.headers["etag"]
    assert response.status_code == 200
    assert etag.startswith('"')
    assert response.headers["cache-control"] == "private, no-cache"

    again = conditional(env.read, "/api/v1/readings", etag, **params)
    assert again.status_code == 304
    assert again.content == b""
    assert again.headers["etag"] == etag
    # Weak comparison, lists, and "*" all match.
    for header in (f"W/{etag}", f'"x", {etag}', "*"):
        assert (
            conditional(env.read, "/api/v1/readings", header, **params).status_code
            == 304
        )
    assert conditional(env.read, "/api/v1/readings", '"x"', **params).status_code == 200

    second = [{"kiosk_id": k.kiosk_id} | k.reading(
        Metric.HEART_RATE, NOW
    ).model_dump(mode="json")]  # fmt: skip
    ok(env.ingest.post("/api/v1/readings/batch", json=second))
    changed = conditional(env.read, "/api/v1/readings", etag, **params)
    assert changed.status_code == 200
    assert changed.headers["etag"] != etag
    assert len(changed.json()["items"]) == 2


@pytest.mark.parametrize("path", ["", "/status"])
def test_kiosk_etag_changes_with_status(env: Env, path: str) -> None:
    k = Kiosk()
    t0 = NOW - timedelta(minutes=5)
    commit(env, k, k.status(KioskState.ONLINE, t0), k.reading(Metric.HEART_RATE, t0))
    url = f"/api/v1/kiosks/{k.kiosk_id}{path}"

    etag = env.read.get(url).headers["etag"]
    assert conditional(env.read, url, etag).status_code == 304
    commit(env, k, k.status(KioskState.OFFLINE, t0 + timedelta(minutes=1)))
    changed = conditional(env.read, url, etag)
    assert changed.status_code == 200
    assert changed.json()["state"] == "offline"
    assert changed.headers["etag"] != etag
    assert conditional(env.read, url, changed.headers["etag"]).status_code == 304


def test_scan_etags_depend_on_content_and_scope(env: Env) -> None:
    sk = scanned_kiosk(env)
    k = Kiosk()
    commit(env, k, k.event("live", ScanState.SCANNING, NOW))
    detail = f"/api/v1/scans/{k.kiosk_id}/live"
    params = {"kiosk_id": [sk.kiosk.kiosk_id, k.kiosk_id]}

    plain = env.read.get("/api/v1/scans", params=params).headers["etag"]
    scoped = env.patient.get("/api/v1/scans", params=params).headers["etag"]
    assert plain != scoped  # the scoped answer carries patient refs
    assert conditional(env.read, "/api/v1/scans", scoped, **params).status_code == 200
    assert conditional(env.read, "/api/v1/scans", plain, **params).status_code == 304

    scan_tag = env.read.get(detail).headers["etag"]
    assert conditional(env.read, detail, scan_tag).status_code == 304
    commit(env, k, k.event("live", ScanState.COMPLETE, NOW + timedelta(seconds=30)))
    assert conditional(env.read, detail, scan_tag).status_code == 200
    assert conditional(env.read, "/api/v1/scans", plain, **params).status_code == 200


def test_errors_ignore_if_none_match(env: Env) -> None:
    response = env.read.get(
        "/api/v1/kiosks/never-heard-of", headers={"If-None-Match": "*"}
    )
    not_found(response)
