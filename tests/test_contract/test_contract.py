"""The MQTT contract: topics, payload validation and the exported schema."""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vitals_contract import (
    KIOSK_ID_PATTERN,
    METRICS,
    ContractError,
    Leaf,
    Metric,
    ReadingsMessage,
    kiosk_topic,
    parse_kiosk_topic,
    parse_payload,
    split_readings,
)
from vitals_contract.messages import MAX_PAYLOAD_BYTES
from vitals_contract.schema import render, schemas

DOCS_SCHEMA = Path(__file__).resolve().parents[2] / "docs" / "schema"
NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)

kiosk_ids = st.from_regex(KIOSK_ID_PATTERN, fullmatch=True)


def reading(
    seq: int, metric: Metric = Metric.HEART_RATE, **extra: Any
) -> dict[str, Any]:
    info = METRICS[metric]
    return {
        "seq": seq,
        "metric": metric.value,
        "value": (info.min_value + info.max_value) / 2,
        "unit": info.unit,
        "quality": 0.8,
        "measured_at": NOW.isoformat(),
        **extra,
    }


def readings_payload(kiosk: str, items: list[Any], **extra: Any) -> bytes:
    body = {
        "v": 1,
        "kind": "readings",
        "kiosk_id": kiosk,
        "sent_at": NOW.isoformat(),
        "readings": items,
        **extra,
    }
    return json.dumps(body).encode()


@given(kiosk_ids, st.sampled_from(list(Leaf)))
def test_topic_round_trip(kiosk: str, leaf: Leaf) -> None:
    parsed = parse_kiosk_topic(kiosk_topic(kiosk, leaf))
    assert parsed is not None
    assert (parsed.kiosk_id, parsed.leaf) == (kiosk, leaf)


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#", "a b", "-lead", "x" * 65, "ü"])
def test_unsafe_kiosk_ids_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid kiosk id"):
        kiosk_topic(bad, Leaf.READINGS)


@pytest.mark.parametrize(
    "topic",
    [
        "vitals/v1/kiosk/k1/unknown",
        "vitals/v1/kiosk/k1",
        "other/v1/kiosk/k1/readings",
        "vitals/v1/kiosk/k+/readings",
        "vitals/v1/kiosk/k1/readings/extra",
    ],
)
def test_foreign_topics_do_not_parse(topic: str) -> None:
    assert parse_kiosk_topic(topic) is None


def test_valid_readings_message_round_trips() -> None:
    items = [reading(5), reading(6, Metric.SPO2), reading(7, Metric.STRESS_INDEX)]
    message = parse_payload(Leaf.READINGS, readings_payload("k1", items), "k1")
    assert isinstance(message, ReadingsMessage)
    assert [r.seq for r in message.readings] == [5, 6, 7]
    assert [r.estimate for r in message.readings] == [False, True, True]
    again = parse_payload(Leaf.READINGS, message.to_bytes(), "k1")
    assert again == message


def test_timestamps_are_normalised_to_utc() -> None:
    plus_two = datetime(2026, 12, 3, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    payload = readings_payload("k1", [reading(1, measured_at=plus_two.isoformat())])
    message = parse_payload(Leaf.READINGS, payload, "k1")
    assert message.readings[0].measured_at == NOW
    assert message.readings[0].measured_at.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    ("item", "reason"),
    [
        (reading(1, unit="bpm"), "unit"),
        (reading(1, value=400), "outside"),
        (reading(1, quality=1.5), "quality"),
        (reading(1, measured_at="2026-12-03T12:00:00"), "timezone"),
        (reading(-1), "seq"),
        ({**reading(1), "metric": "blood_pressure"}, "metric"),
        ({**reading(1), "patient": "x"}, "Extra inputs"),
        ({k: v for k, v in reading(1).items() if k != "quality"}, "quality"),
    ],
)
def test_invalid_readings_are_refused_with_a_reason(
    item: dict[str, Any], reason: str
) -> None:
    with pytest.raises(ContractError, match=reason):
        parse_payload(Leaf.READINGS, readings_payload("k1", [item]), "k1")


def test_non_finite_values_are_refused() -> None:
    payload = readings_payload("k1", [reading(1)]).replace(
        b'"value": 135.0', b'"value": NaN'
    )
    with pytest.raises(ContractError):
        parse_payload(Leaf.READINGS, payload, "k1")


def test_seqs_must_increase_within_a_message() -> None:
    with pytest.raises(ContractError, match="increase"):
        parse_payload(
            Leaf.READINGS, readings_payload("k1", [reading(2), reading(2)]), "k1"
        )


def test_payload_naming_another_kiosk_is_refused() -> None:
    with pytest.raises(ContractError, match="does not match the topic"):
        parse_payload(Leaf.READINGS, readings_payload("k2", [reading(1)]), "k1")


def test_oversize_payload_is_refused_before_parsing() -> None:
    with pytest.raises(ContractError, match="exceeds"):
        parse_payload(Leaf.READINGS, b" " * (MAX_PAYLOAD_BYTES + 1), "k1")


def test_error_messages_do_not_echo_input_values() -> None:
    secret = "patient-4711"
    with pytest.raises(ContractError) as err:
        parse_payload(
            Leaf.READINGS, readings_payload("k1", [reading(1, unit=secret)]), "k1"
        )
    assert secret not in str(err.value)


@given(st.binary(max_size=2048), st.sampled_from(list(Leaf)))
def test_arbitrary_bytes_raise_only_contract_errors(payload: bytes, leaf: Leaf) -> None:
    with contextlib.suppress(ContractError):
        parse_payload(leaf, payload, "k1")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4)
    ),
    max_leaves=12,
)


@given(
    st.lists(
        st.one_of(json_values, st.builds(reading, st.integers(0, 10**6))),
        min_size=1,
        max_size=20,
    )
)
def test_split_keeps_every_valid_item_and_names_the_rest(items: list[Any]) -> None:
    split = split_readings(readings_payload("k1", items), "k1")
    assert len(split.good) + len(split.bad) == len(items)
    seqs = [r.seq for r in split.good]
    assert seqs == sorted(set(seqs))


def test_split_salvages_good_readings_around_a_bad_one() -> None:
    items = [reading(1), reading(2, value=-5), reading(3, Metric.RESPIRATORY_RATE)]
    split = split_readings(readings_payload("k1", items, floor=1), "k1")
    assert [r.seq for r in split.good] == [1, 3]
    assert [(b.seq, "outside" in b.reason) for b in split.bad] == [(2, True)]
    assert split.floor == 1


def test_split_refuses_a_broken_envelope() -> None:
    with pytest.raises(ContractError):
        split_readings(b'{"v": 2, "kind": "readings"}', "k1")


def test_exported_schema_in_docs_is_current() -> None:
    for stem, schema in schemas().items():
        path = DOCS_SCHEMA / f"{stem}.json"
        assert path.exists(), (
            f"run: python -m vitals_contract.schema docs/schema ({stem})"
        )
        assert path.read_text() == render(schema), f"{path.name} is stale; re-export it"


@given(st.floats(0.1, 5), st.floats(5, 120), st.integers(0, 40))
def test_backoff_stays_within_bounds_and_grows(low: float, high: float, n: int) -> None:
    from vitals_contract.mqtt import JitteredBackoff

    backoff = JitteredBackoff(low, high)
    delays = [backoff.next_delay() for _ in range(n + 1)]
    assert all(low <= d <= high for d in delays)
    ceiling = min(high, low * 2**n)
    assert delays[-1] <= ceiling
    backoff.reset()
    assert backoff.next_delay() <= low + 1e-9
