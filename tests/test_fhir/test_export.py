"""Bulk Data $export over real HTTP, on SQLite and PostgreSQL.

One server per database writes the conftest dataset in two halves (so ``_since``
and ``_until`` have a boundary to find), pages of 5 readings and files of at most
7 resources, so every export crosses pages and files.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError
from sqlalchemy import select
from support import BrokerEndpoint, ServerThread, bridge_settings, wait_for
from test_fhir.conftest import Expected, build_dataset, validated

from api.fhir import mapping
from api.fhir.export import (
    ACCEPTED,
    RUNNING,
    ExportRequest,
    parse_instant,
    parse_kickoff,
)
from api.fhir.search import FhirError
from bridge.config import ExportSettings
from bridge.store import Store
from bridge.store.models import ExportJob, ReadingRow

PAGE_SIZE = 5
MAX_PER_FILE = 7
LIMITS = {"requests_per_second": 1e6, "burst": 1_000_000}
READ = "system/Observation.read"
ASYNC = {"Prefer": "respond-async"}


@dataclass(slots=True)
class ExportEnv:
    """A server, a client of subject ``exporter`` and what the store holds."""

    server: ServerThread
    client: httpx.Client
    url: str
    directory: Path
    readings: list[Expected]
    received: dict[int, datetime]  # reading id -> received_at, as stored
    boundary: datetime  # between the two halves' received_at

    def client_for(self, subject: str, *scopes: str) -> httpx.Client:
        token = self.server.app.state.tokens.issue(subject, list(scopes), None)
        return httpx.Client(
            base_url=f"{self.server.base}/fhir",
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )


def export_settings(directory: Path, **extra: Any) -> dict[str, Any]:
    return {
        "directory": directory,
        "page_size": PAGE_SIZE,
        "max_resources_per_file": MAX_PER_FILE,
        "sweep_interval_seconds": 0.2,
        "retry_after_seconds": 1,
        **extra,
    }


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def export(
    request: pytest.FixtureRequest,
    fhir_broker: BrokerEndpoint,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ExportEnv]:
    url: str = request.getfixturevalue(f"fhir_{request.param}_url")
    directory = tmp_path_factory.mktemp("exports")
    settings = bridge_settings(
        fhir_broker, url, limits=LIMITS, export=export_settings(directory)
    )
    server = ServerThread(settings)
    server.start()
    batches, expected = build_dataset()
    store = Store.from_url(url)
    try:
        for batch in batches[:2]:
            store.write_batch(batch)
        time.sleep(0.05)
        boundary = datetime.now(UTC)
        time.sleep(0.05)
        for batch in batches[2:]:
            store.write_batch(batch)
        with store.engine.connect() as conn:
            rows = conn.execute(select(ReadingRow.id, ReadingRow.received_at))
            received = {r.id: _utc(r.received_at) for r in rows}
    finally:
        store.close()
    env = ExportEnv(
        server, _client(server), url, directory, expected, received, boundary
    )
    try:
        yield env
    finally:
        env.client.close()
        server.stop()


def _client(server: ServerThread) -> httpx.Client:
    token = server.app.state.tokens.issue("exporter", [READ], None)
    return httpx.Client(
        base_url=f"{server.base}/fhir",
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _instant(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


# -- helpers -------------------------------------------------------------------


def kick_off(client: httpx.Client, params: Any = None, **headers: str) -> str:
    """Start an export; return its status URL."""
    response = client.get("/$export", params=params, headers={**ASYNC, **headers})
    assert response.status_code == 202, response.text
    validated(response)
    return response.headers["Content-Location"]


def finish(client: httpx.Client, status_url: str) -> httpx.Response:
    """Poll until the job is no longer in progress; return the last answer."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        response = client.get(status_url)
        if response.status_code != 202:
            return response
        assert response.headers["X-Progress"]
        assert len(response.headers["X-Progress"]) < 100
        assert int(response.headers["Retry-After"]) >= 1
        time.sleep(0.05)
    raise AssertionError("export did not finish in 20 s")


def manifest_of(client: httpx.Client, status_url: str) -> dict[str, Any]:
    response = finish(client, status_url)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert "Expires" in response.headers
    body: dict[str, Any] = response.json()
    return body


def download(client: httpx.Client, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fetch every file; validate each line; check counts and the size limit."""
    resources: list[dict[str, Any]] = []
    for item in items:
        response = client.get(item["url"])
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/fhir+ndjson"
        lines = response.text.splitlines()
        assert len(lines) == item["count"] <= MAX_PER_FILE
        for line in lines:
            resource = json.loads(line)
            assert resource["resourceType"] == item["type"]
            mapping.to_model(resource)
            resources.append(resource)
    return resources


def exported_ids(client: httpx.Client, params: Any = None) -> list[int]:
    manifest = manifest_of(client, kick_off(client, params))
    assert manifest["error"] == []
    return sorted(int(r["id"]) for r in download(client, manifest["output"]))


# -- the round trip ------------------------------------------------------------


def test_export_round_trip_returns_every_reading_once(export: ExportEnv) -> None:
    status_url = kick_off(export.client, {"_type": "Observation"})
    assert status_url.startswith(f"{export.server.base}/fhir/$export-status/")
    manifest = manifest_of(export.client, status_url)

    assert manifest["request"].endswith("/fhir/$export?_type=Observation")
    assert manifest["requiresAccessToken"] is True
    assert datetime.fromisoformat(manifest["transactionTime"]) > export.boundary
    assert manifest["error"] == []
    assert len(manifest["output"]) == -(-len(export.readings) // MAX_PER_FILE)
    resources = download(export.client, manifest["output"])

    ids = [int(r["id"]) for r in resources]
    assert len(ids) == len(set(ids)) == len(export.readings)
    assert sorted(ids) == sorted(export.received)
    keys = {r["identifier"][0]["value"] for r in resources}
    assert keys == {e.key for e in export.readings}
    # The very resources the search returns: one mapping, not a copy.
    bundle = export.client.get("/Observation", params={"_count": "200"})
    searched = {e["resource"]["id"]: e["resource"] for e in validated(bundle)["entry"]}
    assert {r["id"]: r for r in resources} == searched


def test_output_formats_are_all_ndjson(export: ExportEnv) -> None:
    for value in ("application/fhir+ndjson", "application/ndjson", "ndjson"):
        ids = exported_ids(export.client, {"_outputFormat": value})
        assert len(ids) == len(export.readings)
    # Unescaped "+" in the query reads as a space; still accepted.
    url = "/$export?_outputFormat=application/fhir+ndjson"
    response = export.client.get(url, headers=ASYNC)
    assert response.status_code == 202
    finish(export.client, response.headers["Content-Location"])


def test_since_and_until_select_by_last_updated(export: ExportEnv) -> None:
    late = sorted(i for i, at in export.received.items() if at > export.boundary)
    early = sorted(i for i, at in export.received.items() if at <= export.boundary)
    assert late
    assert early

    assert exported_ids(export.client, {"_since": _instant(export.boundary)}) == late
    assert exported_ids(export.client, {"_until": _instant(export.boundary)}) == early
    # A zone offset, written with an escaped "+".
    local = export.boundary.astimezone(timezone(timedelta(hours=5, minutes=30)))
    assert exported_ids(export.client, {"_until": local.isoformat()}) == early
    # (since, until] windows tile without gap or overlap.
    last = max(export.received.values())
    window = {"_since": _instant(export.boundary), "_until": _instant(last)}
    assert exported_ids(export.client, window) == late
    future = datetime.now(UTC) + timedelta(days=1)
    assert exported_ids(export.client, {"_since": _instant(future)}) == []


def test_type_filter_selects_a_measured_time_range(export: ExportEnv) -> None:
    start = min(e.measured_at for e in export.readings) + timedelta(days=1)
    end = start + timedelta(days=2)
    query = f"Observation?date=ge{_instant(start)}&date=lt{_instant(end)}"
    ids = exported_ids(export.client, {"_typeFilter": query})
    by_key = {e.key: e for e in export.readings}
    want = {k for k, e in by_key.items() if start <= e.measured_at < end}
    assert 0 < len(want) < len(by_key)
    bundle = export.client.get("/Observation", params={"_count": "200"})
    key_of = {
        int(e["resource"]["id"]): e["resource"]["identifier"][0]["value"]
        for e in validated(bundle)["entry"]
    }
    assert sorted(key_of[i] for i in ids) == sorted(want)

    # A comma inside the encoded query is a value list, not a second query.
    raw = "Observation%3Fcode%3D8867-4%2C9279-1%26patient%3Dp-1"
    response = export.client.get(f"/$export?_typeFilter={raw}", headers=ASYNC)
    assert response.status_code == 202, response.text
    manifest = manifest_of(export.client, response.headers["Content-Location"])
    resources = download(export.client, manifest["output"])
    codes = {r["code"]["coding"][0]["code"] for r in resources}
    assert codes == {"8867-4", "9279-1"}
    assert {r["subject"]["reference"] for r in resources} == {"Patient/p-1"}


# -- refusals ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "code", "words"),
    [
        ({"_type": "Patient"}, "not-supported", "only Observation"),
        ({"_type": "Observation,Device"}, "not-supported", "Device"),
        ({"_outputFormat": "application/fhir+json"}, "not-supported", "_outputFormat"),
        ({"_since": "yesterday"}, "invalid", "instant"),
        ({"_since": "2026-11-02"}, "invalid", "instant"),  # a date, not an instant
        ({"_since": "2026-13-02T00:00:00Z"}, "invalid", "invalid date"),
        ({"_until": "2026-11-02T08:00:00"}, "invalid", "instant"),  # no zone
        (
            {"_since": "2026-11-03T00:00:00Z", "_until": "2026-11-02T00:00:00Z"},
            "invalid",
            "later than",
        ),
        ({"_elements": "id"}, "not-supported", "_elements"),
        ({"_typeFilter": "Device?identifier=x"}, "not-supported", "Observation"),
        ({"_typeFilter": "Observation?_sort=date"}, "invalid", "_sort"),
        ({"_typeFilter": "Observation?date=soon"}, "invalid", "invalid date"),
    ],
)
def test_bad_kick_offs_get_an_operation_outcome(
    export: ExportEnv, params: dict[str, str], code: str, words: str
) -> None:
    response = export.client.get("/$export", params=params, headers=ASYNC)
    assert response.status_code == 400, response.text
    outcome = validated(response)
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["code"] == code
    assert words in outcome["issue"][0]["diagnostics"]


def test_kick_off_needs_prefer_respond_async(export: ExportEnv) -> None:
    response = export.client.get("/$export")
    assert response.status_code == 400
    assert "respond-async" in validated(response)["issue"][0]["diagnostics"]
    response = export.client.post("/$export", headers=ASYNC)
    assert response.status_code == 405
    assert validated(response)["resourceType"] == "OperationOutcome"


def test_lenient_kick_off_reports_what_it_ignored(export: ExportEnv) -> None:
    params = {"_type": "Observation,Device", "_elements": "id"}
    status_url = kick_off(
        export.client, params, Prefer="respond-async, handling=lenient"
    )
    manifest = manifest_of(export.client, status_url)
    assert len(download(export.client, manifest["output"])) == len(export.readings)
    [error_file] = manifest["error"]
    outcomes = download(export.client, [error_file])
    texts = sorted(o["issue"][0]["diagnostics"] for o in outcomes)
    assert len(texts) == 2
    assert "Device" in texts[0]
    assert "_elements" in texts[1]

    status_url = kick_off(
        export.client, {"_type": "Device"}, Prefer="respond-async;handling=lenient"
    )
    manifest = manifest_of(export.client, status_url)
    assert manifest["output"] == []
    assert len(manifest["error"]) == 1


def test_scope_and_ownership_are_checked(export: ExportEnv) -> None:
    status_url = kick_off(export.client)
    manifest = manifest_of(export.client, status_url)
    file_url = manifest["output"][0]["url"]

    with export.client_for("exporter", "vitals.read") as unscoped:
        for response in (
            unscoped.get("/$export", headers=ASYNC),
            unscoped.get(status_url),
            unscoped.get(file_url),
        ):
            assert response.status_code == 403
            assert validated(response)["resourceType"] == "OperationOutcome"
    with export.client_for("someone-else", READ) as other:
        for response in (
            other.get(status_url),
            other.get(file_url),
            other.delete(status_url),
        ):
            assert response.status_code == 404
            assert validated(response)["issue"][0]["code"] == "not-found"
    without_token = httpx.get(status_url)
    assert without_token.status_code == 401
    assert export.client.get(status_url).status_code == 200  # still there
    unknown = status_url.rsplit("/", 1)[0] + "/" + uuid.uuid4().hex
    assert export.client.get(unknown).status_code == 404
    assert export.client.get(file_url + "x").status_code == 404
    traversal = file_url.rsplit("/", 1)[0] + "/..%2F..%2Fvitals.db"
    assert export.client.get(traversal).status_code == 404


def test_delete_removes_the_job_and_its_files(export: ExportEnv) -> None:
    status_url = kick_off(export.client)
    manifest = manifest_of(export.client, status_url)
    job_id = status_url.rsplit("/", 1)[1]
    assert (export.directory / job_id).is_dir()

    response = export.client.delete(status_url)
    assert response.status_code == 202
    validated(response)
    assert not (export.directory / job_id).exists()
    assert export.client.get(status_url).status_code == 404
    assert export.client.get(manifest["output"][0]["url"]).status_code == 404
    assert export.client.delete(status_url).status_code == 404


def test_delete_right_after_kick_off_leaves_nothing(export: ExportEnv) -> None:
    # Queued, running or done by the time the DELETE lands: gone with its files.
    for _ in range(3):
        status_url = kick_off(export.client)
        job_dir = export.directory / status_url.rsplit("/", 1)[1]
        assert export.client.delete(status_url).status_code == 202
        assert export.client.get(status_url).status_code == 404
        assert wait_for(lambda: not job_dir.exists(), 5)  # noqa: B023


def _insert_job(url: str, owner: str, status: str, updated_at: datetime) -> str:
    """Write a job row as another API replica would have."""
    job_id = uuid.uuid4().hex
    store = Store.from_url(url)
    try:
        with store.engine.begin() as conn:
            conn.execute(
                ExportJob.__table__.insert().values(  # type: ignore[attr-defined]
                    id=job_id,
                    owner=owner,
                    status=status,
                    request_url="http://elsewhere/fhir/$export",
                    parameters=parse_kickoff([], "", lenient=False).to_json(),
                    transaction_time=updated_at,
                    created_at=updated_at,
                    updated_at=updated_at,
                    exported=0,
                )
            )
    finally:
        store.close()
    return job_id


def test_jobs_per_client_are_limited(export: ExportEnv) -> None:
    # Two jobs running on other replicas (recently touched) fill the quota.
    now = datetime.now(UTC)
    busy = [_insert_job(export.url, "busy-client", s, now) for s in (ACCEPTED, RUNNING)]
    with export.client_for("busy-client", READ) as busy_client:
        response = busy_client.get("/$export", headers=ASYNC)
        assert response.status_code == 429
        assert validated(response)["issue"][0]["code"] == "throttled"
        assert int(response.headers["Retry-After"]) >= 1
        # Another client is not affected.
        finish(export.client, kick_off(export.client))

        # Cancelling one (running elsewhere) frees a place.
        status_url = f"{export.server.base}/fhir/$export-status/{busy[1]}"
        progress = busy_client.get(status_url)
        assert progress.status_code == 202
        assert progress.headers["X-Progress"]
        assert busy_client.delete(status_url).status_code == 202
        assert busy_client.get(status_url).status_code == 404
        finish(busy_client, kick_off(busy_client))
        busy_client.delete(f"{export.server.base}/fhir/$export-status/{busy[0]}")


# -- restarts and expiry -------------------------------------------------------


def test_a_job_survives_a_restart_and_expires(
    export: ExportEnv,
    fhir_broker: BrokerEndpoint,
    tmp_path: Path,
) -> None:
    directory = tmp_path / "exports"

    def server(**extra: Any) -> ServerThread:
        settings = bridge_settings(
            fhir_broker,
            export.url,
            limits=LIMITS,
            export=export_settings(directory, stale_after_seconds=2, **extra),
        )
        started = ServerThread(settings)
        started.start()
        return started

    first = server()
    try:
        with _client(first) as client:
            status_url = kick_off(client)
            manifest = manifest_of(client, status_url)
    finally:
        first.stop()

    # Another process on the same database and directory (a restart, or a
    # replica); it keeps finished jobs for one second only.
    second = server(retention_seconds=1)
    try:
        moved = status_url.replace(first.base, second.base)
        with _client(second) as client:
            response = client.get(moved)
            assert response.status_code == 200
            counts = [item["count"] for item in response.json()["output"]]
            assert counts == [item["count"] for item in manifest["output"]]
            items = [
                {**item, "url": item["url"].replace(first.base, second.base)}
                for item in response.json()["output"]
            ]
            assert len(download(client, items)) == len(export.readings)

            # A job whose process died mid-way is reported failed.
            stale = datetime.now(UTC) - timedelta(minutes=5)
            dead = _insert_job(export.url, "exporter", RUNNING, stale)
            response = client.get(f"{second.base}/fhir/$export-status/{dead}")
            assert response.status_code == 500
            outcome = validated(response)
            assert "interrupted" in outcome["issue"][0]["diagnostics"]

            # Jobs this process finishes expire after retention_seconds.
            fresh = kick_off(client)
            manifest_of(client, fresh)
            fresh_dir = directory / fresh.rsplit("/", 1)[1]
            assert fresh_dir.is_dir()
            assert wait_for(lambda: client.get(fresh).status_code == 404, 10)
            assert wait_for(lambda: not fresh_dir.exists(), 5)
            assert client.get(moved).status_code == 200  # kept its own expiry
            client.delete(moved)
    finally:
        second.stop()


# -- parsers -------------------------------------------------------------------


def test_jobs_are_touched_well_within_the_stale_limit() -> None:
    with pytest.raises(ValidationError, match="stale_after_seconds"):
        ExportSettings(stale_after_seconds=10, sweep_interval_seconds=5)
    assert ExportSettings(stale_after_seconds=11, sweep_interval_seconds=5)


offsets = st.integers(min_value=-14 * 60, max_value=14 * 60).map(
    lambda m: timezone(timedelta(minutes=m))
)


@given(
    st.datetimes(
        min_value=datetime(1900, 1, 2),
        max_value=datetime(9998, 12, 30),
        timezones=offsets,
    )
)
def test_instants_round_trip(value: datetime) -> None:
    assert parse_instant("_since", value.isoformat()) == value.astimezone(UTC)
    text = value.isoformat(timespec="seconds")
    assert parse_instant("_since", text) == value.replace(microsecond=0)


@given(st.text(max_size=40))
def test_instant_parser_refuses_cleanly(text: str) -> None:
    try:
        parsed: datetime | None = parse_instant("_since", text)
    except FhirError as exc:
        refused, parsed = exc.status, None
    else:
        refused = None
    assert refused == 400 if parsed is None else parsed.tzinfo is not None


names = st.sampled_from(
    ["_type", "_since", "_until", "_outputFormat", "_typeFilter", "x"]
)


@given(st.lists(st.tuples(names, st.text(max_size=30)), max_size=5), st.booleans())
def test_kick_off_parser_only_raises_fhir_errors(
    pairs: list[tuple[str, str]], lenient: bool
) -> None:
    raw = "&".join(f"{n}={v}" for n, v in pairs)
    try:
        parsed: ExportRequest | None = parse_kickoff(pairs, raw, lenient=lenient)
    except FhirError as exc:
        refused, parsed = exc.status, None
    else:
        refused = None
    if parsed is None:
        assert refused == 400
    else:
        assert ExportRequest.from_json(parsed.to_json()) == parsed
