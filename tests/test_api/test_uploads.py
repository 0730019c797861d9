"""Uploads over HTTP: idempotent on (kiosk, seq), per-item errors, good items kept."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from support import BrokerEndpoint, ServerThread, bridge_settings

AT = datetime(2026, 12, 3, 10, 0, tzinfo=UTC).isoformat()


@pytest.fixture
def server(amqtt_broker: BrokerEndpoint, database_url: str) -> Iterator[ServerThread]:
    s = ServerThread(bridge_settings(amqtt_broker, database_url))
    s.start()
    yield s
    s.stop()


def reading(kiosk: str, seq: int, **extra: Any) -> dict[str, Any]:
    return {"kiosk_id": kiosk, "seq": seq, "metric": "heart_rate", "value": 71.0,
            "unit": "/min", "quality": 0.8, "measured_at": AT, **extra}  # fmt: skip


def test_batch_keeps_good_items_and_names_bad_ones(server: ServerThread) -> None:
    client = server.http(("vitals.ingest", "vitals.read"))
    items = [
        reading("up-1", 0),
        reading("up-1", 1, value=999),
        "not an object",
        reading("bad/id", 2),
        reading("up-2", 0),
    ]
    body = client.post("/api/v1/readings/batch", json=items).json()
    assert (body["stored"], body["duplicates"], body["invalid"]) == (2, 0, 3)
    assert [i["status"] for i in body["items"]] == [
        "stored", "invalid", "invalid", "invalid", "stored",
    ]  # fmt: skip
    assert "outside" in body["items"][1]["error"]

    again = client.post("/api/v1/readings/batch", json=[reading("up-1", 0)]).json()
    assert again["items"][0]["status"] == "duplicate"
    stored = client.get(
        "/api/v1/readings", params={"kiosk_id": ["up-1", "up-2"]}
    ).json()
    assert sorted((r["kiosk_id"], r["seq"]) for r in stored["items"]) == [
        ("up-1", 0),
        ("up-2", 0),
    ]


def test_scan_upload_is_idempotent_and_needs_the_ingest_scope(
    server: ServerThread,
) -> None:
    scan = {
        "kiosk_id": "up-3",
        "seq": 10,
        "scan_id": "scan-a",
        "completed_at": AT,
        "patient_ref": "MRN-1",
        "readings": [
            {k: v for k, v in reading("up-3", 11).items() if k != "kiosk_id"},
            {**{k: v for k, v in reading("up-3", 12).items() if k != "kiosk_id"},
             "metric": "spo2", "unit": "%", "value": 97.0},
        ],
    }  # fmt: skip
    assert (
        server.http(("vitals.read",)).post("/api/v1/scans", json=scan).status_code
        == 403
    )
    client = server.http(("vitals.ingest", "vitals.read"))
    first = client.post("/api/v1/scans", json=scan).json()
    second = client.post("/api/v1/scans", json=scan).json()
    assert (first["stored"], second["duplicates"]) == (2, 2)
    rows = client.get("/api/v1/readings", params={"kiosk_id": "up-3"}).json()["items"]
    assert all(r["final"] and r["scan_id"] == "scan-a" for r in rows)
    assert (
        client.post("/api/v1/scans", json={**scan, "readings": []}).status_code == 422
    )
