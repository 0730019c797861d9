"""Turning raw MQTT messages into a batch: what is kept, refused and settled."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from bridge.ingest import add_to_batch
from bridge.store import Batch

ROOT = "vitals/v1"
TOPIC = f"{ROOT}/kiosk/k1/readings"
AT = datetime(2026, 12, 3, tzinfo=UTC).isoformat()


def item(seq: int, value: float = 70) -> dict[str, object]:
    return {"seq": seq, "metric": "heart_rate", "value": value, "unit": "/min",
            "quality": 0.9, "measured_at": AT}  # fmt: skip


def message(items: list[dict[str, object]], floor: int = 0) -> bytes:
    return json.dumps(
        {
            "v": 1,
            "kind": "readings",
            "kiosk_id": "k1",
            "sent_at": AT,
            "floor": floor,
            "readings": items,
        }
    ).encode()


def test_a_forged_floor_cannot_release_a_backlog() -> None:
    batch = Batch()
    add_to_batch(batch, TOPIC, message([item(5000, value=-1)], floor=5000), ROOT)
    assert batch.floors == {}
    assert [d.seq for d in batch.dead] == [5000]

    batch = Batch()
    add_to_batch(batch, TOPIC, message([item(7), item(8)], floor=100), ROOT)
    assert batch.floors == {"k1": 7}


def test_confirmations_echoed_by_the_broker_are_ignored() -> None:
    batch = Batch()
    add_to_batch(batch, f"{ROOT}/kiosk/k1/confirm", b'{"through": 3}', ROOT)
    assert len(batch) == 0


def test_foreign_topics_become_dead_letters() -> None:
    batch = Batch()
    add_to_batch(batch, "elsewhere/x", b"{}", ROOT)
    assert [d.reason for d in batch.dead] == ["not a kiosk data topic"]


@given(st.binary(max_size=512))
def test_any_bytes_end_up_kept_or_dead_never_raised(payload: bytes) -> None:
    batch = Batch()
    add_to_batch(batch, TOPIC, payload, ROOT)
    assert len(batch.readings) + len(batch.dead) >= 1
