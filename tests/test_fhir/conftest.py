"""A running bridge + API with a known set of readings, per database, per module.

Starting a broker, a server and a database per test would dominate the run time,
so each test module shares one server per database; tests only read.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import (
    BrokerEndpoint,
    ServerThread,
    bridge_settings,
    embedded_amqtt,
    fresh_postgres,
)

from api.fhir import mapping
from bridge.store import Batch, Store
from vitals_contract import METRICS, Metric, Reading, ScanEvent, ScanState

T0 = datetime(2026, 11, 2, 8, 0, tzinfo=UTC)
HASHED_PATIENT = "MRN 0042/x"  # not a FHIR id: gets a hashed Patient id
HASHED_KIOSK = "k" + "_" * 40  # escapes to over 64 characters: a hashed Device id
SCANS = (
    # kiosk, scan, patient, start
    ("kiosk-a", "s1", "p-1", T0),
    ("kiosk-a", "s2", HASHED_PATIENT, T0 + timedelta(days=1)),
    ("kiosk_b.2", "s3", "p-1", T0 + timedelta(days=2)),
    ("kiosk_b.2", "s4", None, T0 + timedelta(days=3)),
)
READINGS_PER_METRIC = 3


@dataclass(frozen=True, slots=True)
class Expected:
    """What the test wrote for one reading."""

    kiosk_id: str
    seq: int
    scan_id: str | None
    patient_ref: str | None
    metric: Metric
    value: float
    quality: float
    measured_at: datetime

    @property
    def key(self) -> str:
        return f"{self.kiosk_id}:{self.seq}"


@dataclass(slots=True)
class FhirEnv:
    """The server under test, a client for it and the readings stored."""

    server: ServerThread
    client: httpx.Client
    readings: list[Expected]
    database: str

    @property
    def base(self) -> str:
        return f"{self.server.base}/fhir"

    def get(self, url: str, params: Any = None, **headers: str) -> httpx.Response:
        """GET ``url`` (relative to /fhir or absolute) and validate the body."""
        response = self.client.get(url, params=params, headers=headers)
        validated(response)
        return response

    def ok(self, url: str, params: Any = None, **headers: str) -> dict[str, Any]:
        """GET, expect 200 and return the validated resource."""
        response = self.get(url, params, **headers)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def error(self, url: str, status: int, params: Any = None) -> dict[str, Any]:
        """GET, expect ``status`` with an OperationOutcome and return it."""
        response = self.get(url, params)
        assert response.status_code == status, response.text
        body: dict[str, Any] = response.json()
        assert body["resourceType"] == "OperationOutcome"
        return body

    def by_key(self) -> dict[str, Expected]:
        return {e.key: e for e in self.readings}


def build_dataset() -> tuple[list[Batch], list[Expected]]:
    """Four scans (two patients, one hashed id, one anonymous) plus loose readings."""
    seqs: dict[str, int] = {}

    def next_seq(kiosk_id: str) -> int:
        seqs[kiosk_id] = seqs.get(kiosk_id, -1) + 1
        return seqs[kiosk_id]

    batches: list[Batch] = []
    expected: list[Expected] = []
    for kiosk_id, scan_id, patient_ref, start in SCANS:
        batch = Batch()
        batch.events.append(
            ScanEvent(
                kiosk_id=kiosk_id,
                seq=next_seq(kiosk_id),
                scan_id=scan_id,
                state=ScanState.SCANNING,
                at=start,
                patient_ref=patient_ref,
            )
        )
        for i in range(READINGS_PER_METRIC):
            for m_index, metric in enumerate(Metric):
                info = METRICS[metric]
                value = info.min_value + 1 + i + m_index
                when = start + timedelta(seconds=10 * i + m_index)
                seq = next_seq(kiosk_id)
                quality = round(0.5 + 0.1 * i, 2)
                batch.readings.append(
                    (
                        kiosk_id,
                        Reading(
                            seq=seq,
                            scan_id=scan_id,
                            metric=metric,
                            value=value,
                            unit=info.unit,
                            quality=quality,
                            measured_at=when,
                            final=i == READINGS_PER_METRIC - 1,
                        ),
                    )
                )
                expected.append(
                    Expected(
                        kiosk_id,
                        seq,
                        scan_id,
                        patient_ref,
                        metric,
                        value,
                        quality,
                        when,
                    )
                )
        batch.events.append(
            ScanEvent(
                kiosk_id=kiosk_id,
                seq=next_seq(kiosk_id),
                scan_id=scan_id,
                state=ScanState.COMPLETE,
                at=start + timedelta(minutes=1),
            )
        )
        batches.append(batch)

    # Two readings outside any scan: no patient.
    loose = Batch()
    for n, metric in enumerate((Metric.HEART_RATE, Metric.SPO2)):
        info = METRICS[metric]
        when = T0 + timedelta(days=4, seconds=n)
        seq = next_seq("kiosk-a")
        value = info.max_value - 1
        loose.readings.append(
            (
                "kiosk-a",
                Reading(
                    seq=seq,
                    metric=metric,
                    value=value,
                    unit=info.unit,
                    quality=0.8,
                    measured_at=when,
                ),
            )
        )
        expected.append(Expected("kiosk-a", seq, None, None, metric, value, 0.8, when))
    batches.append(loose)

    # A kiosk that has only announced a floor: a Device without Observations.
    quiet = Batch()
    quiet.note_floor(HASHED_KIOSK, 0)
    batches.append(quiet)
    return batches, expected


@pytest.fixture(scope="module")
def fhir_broker() -> Iterator[BrokerEndpoint]:
    """An embedded amqtt broker on a free port, shared by the module."""
    with embedded_amqtt() as broker:
        yield broker


@pytest.fixture(scope="module")
def fhir_sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    path: Path = tmp_path_factory.mktemp("fhir") / "vitals.db"
    return f"sqlite:///{path}"


@pytest.fixture(scope="module")
def fhir_postgres_url() -> Iterator[str]:
    with fresh_postgres("vitals_fhir") as url:
        yield url


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def fhir(
    request: pytest.FixtureRequest, fhir_broker: BrokerEndpoint
) -> Iterator[FhirEnv]:
    """The API on each database, migrated by its own start-up, with the dataset."""
    url: str = request.getfixturevalue(f"fhir_{request.param}_url")
    # Tests fire hundreds of requests a second; the rate limit is not under test.
    limits = {"requests_per_second": 1e6, "burst": 1_000_000}
    server = ServerThread(bridge_settings(fhir_broker, url, limits=limits))
    server.start()
    store = Store.from_url(url)
    batches, expected = build_dataset()
    try:
        for batch in batches:
            store.write_batch(batch)
    finally:
        store.close()
    client = httpx.Client(
        base_url=f"{server.base}/fhir",
        headers={"Authorization": f"Bearer {server.token()}"},
        timeout=10,
    )
    try:
        yield FhirEnv(server, client, expected, request.param)
    finally:
        client.close()
        server.stop()


def validated(response: httpx.Response) -> dict[str, Any]:
    """Check the media type, validate the resource (and bundle entries), return it."""
    assert response.headers["content-type"].startswith("application/fhir+json")
    body: dict[str, Any] = response.json()
    mapping.to_model(body)
    for e in body.get("entry", ()):
        mapping.to_model(e["resource"])
    return body
