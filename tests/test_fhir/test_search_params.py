"""Pure tests of the search parameter parser and the id codec, with hypothesis."""

from __future__ import annotations

import contextlib
import re
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from api.fhir import mapping, search
from api.fhir.search import SearchError, Sort, Token
from vitals_contract import KIOSK_ID_PATTERN

PRECISIONS = ("year", "month", "day", "minute", "second", "fraction")

instants = st.datetimes(
    min_value=datetime(1971, 1, 1), max_value=datetime(2999, 12, 30)
).map(lambda d: d.replace(tzinfo=UTC))
offsets = st.integers(min_value=-14 * 4, max_value=14 * 4).map(
    lambda q: timezone(timedelta(minutes=15 * q))
)


def render(value: datetime, precision: str) -> str:
    """Write ``value`` (in its own zone) as a FHIR date at ``precision``."""
    zone = value.strftime("%z")
    zone = "Z" if zone in ("", "+0000") else f"{zone[:3]}:{zone[3:]}"
    match precision:
        case "year":
            return value.strftime("%Y")
        case "month":
            return value.strftime("%Y-%m")
        case "day":
            return value.strftime("%Y-%m-%d")
        case "minute":
            return value.strftime("%Y-%m-%dT%H:%M") + zone
        case "second":
            return value.strftime("%Y-%m-%dT%H:%M:%S") + zone
        case _:
            return value.strftime("%Y-%m-%dT%H:%M:%S.%f") + zone


def truncate(value: datetime, precision: str) -> datetime:
    fields = {
        "year": {"month": 1, "day": 1, "hour": 0, "minute": 0, "second": 0},
        "month": {"day": 1, "hour": 0, "minute": 0, "second": 0},
        "day": {"hour": 0, "minute": 0, "second": 0},
        "minute": {"second": 0},
        "second": {},
        "fraction": {},
    }[precision]
    micro = value.microsecond if precision == "fraction" else 0
    return value.replace(**fields, microsecond=micro)


@given(instants, offsets, st.sampled_from(PRECISIONS))
def test_partial_dates_cover_the_instant_they_were_cut_from(
    moment: datetime, zone: timezone, precision: str
) -> None:
    local = moment.astimezone(zone)
    if precision in ("year", "month", "day"):
        local = moment  # dates without a time are read as UTC
    text = render(local, precision)
    parsed = search.parse_date(text)
    assert parsed.start == truncate(local, precision).astimezone(UTC)
    assert parsed.start <= local < parsed.end
    assert parsed.start.tzinfo == UTC
    assert parsed.end.tzinfo == UTC


@given(instants, st.sampled_from(PRECISIONS), st.sampled_from(search.PREFIXES))
def test_prefixes_are_kept_and_eq_is_the_default(
    moment: datetime, precision: str, prefix: str
) -> None:
    text = render(moment, precision)
    with_prefix = search.parse_date_filter(prefix + text)
    assert with_prefix.prefix == prefix
    assert with_prefix.range == search.parse_date(text)
    assert search.parse_date_filter(text).prefix == "eq"


@given(st.text(max_size=30))
def test_date_parser_accepts_or_raises_search_error(text: str) -> None:
    with contextlib.suppress(SearchError):
        search.parse_date_filter(text)


@pytest.mark.parametrize(
    "text",
    [
        "2026-02-30",
        "2026-13",
        "2026-1-01",
        "26",
        "2026-01-01T25:00Z",
        "2026-01-01T10",
        "2026-01-01T10:00+15:00",
        "sa2026",
        "ap2026",
        "2026-01-01 10:00",
    ],
)
def test_bad_dates(text: str) -> None:
    with pytest.raises(SearchError):
        search.parse_date_filter(text)


def test_fractional_seconds_and_zones() -> None:
    r = search.parse_date("2026-12-03T10:00:00.5+01:00")
    assert r.start == datetime(2026, 12, 3, 9, 0, 0, 500000, tzinfo=UTC)
    assert r.end - r.start == timedelta(microseconds=1)
    year = search.parse_date("2026")
    assert (year.start, year.end) == (
        datetime(2026, 1, 1, tzinfo=UTC),
        datetime(2027, 1, 1, tzinfo=UTC),
    )
    december = search.parse_date("2026-12")
    assert december.end == datetime(2027, 1, 1, tzinfo=UTC)


no_bar = st.text(min_size=1, max_size=40).filter(lambda s: "|" not in s)


@given(no_bar, no_bar)
def test_token_forms(system: str, code: str) -> None:
    assert search.parse_token(f"{system}|{code}") == Token(system, code)
    assert search.parse_token(f"|{code}") == Token("", code)
    assert search.parse_token(f"{system}|") == Token(system, None)
    assert search.parse_token(code) == Token(None, code)


def test_empty_tokens_are_refused() -> None:
    for text in ("", "|"):
        with pytest.raises(SearchError):
            search.parse_token(text)


def test_codes_resolve_through_the_metric_table() -> None:
    assert mapping.metrics_for_token(mapping.LOINC, "2708-6") == {mapping.Metric.SPO2}
    assert mapping.metrics_for_token(mapping.LOINC, "59408-5") == {mapping.Metric.SPO2}
    assert mapping.metrics_for_token("", "8867-4") == set()
    assert len(mapping.metrics_for_token(mapping.METRIC_SYSTEM, None)) == 6


@given(st.from_regex(KIOSK_ID_PATTERN, fullmatch=True))
def test_kiosk_ids_map_to_valid_fhir_ids_and_back(kiosk_id: str) -> None:
    fhir_id = mapping.encode_id(kiosk_id)
    assert mapping.FHIR_ID_RE.match(fhir_id)
    if mapping.is_hashed_id(fhir_id):
        assert len(kiosk_id.replace(".", "..").replace("_", ".-")) > 64
    else:
        assert mapping.decode_id(fhir_id) == kiosk_id


@given(st.text(min_size=1, max_size=128), st.text(min_size=1, max_size=128))
def test_id_encoding_is_injective(a: str, b: str) -> None:
    assume(a != b)
    assert mapping.encode_id(a) != mapping.encode_id(b)
    assert mapping.FHIR_ID_RE.match(mapping.encode_id(a))


@given(
    st.sampled_from(list(Sort)),
    instants,
    st.integers(min_value=0, max_value=2**62),
)
def test_cursor_round_trip(sort: Sort, when: datetime, last_id: int) -> None:
    key = ("" if sort is Sort.STORE else when.isoformat(), last_id)
    token = search.encode_cursor(sort, key)
    assert re.fullmatch(r"[A-Za-z0-9_-]+", token)
    assert search.decode_cursor(token, sort) == key
    other = next(s for s in Sort if s is not sort)
    with pytest.raises(SearchError):
        search.decode_cursor(token, other)


@given(st.text(max_size=60))
def test_garbage_cursors_are_search_errors(token: str) -> None:
    with contextlib.suppress(SearchError):
        search.decode_cursor(token, Sort.DATE)


@given(st.text(max_size=10))
def test_count(text: str) -> None:
    if text.isascii() and text.isdigit() and int(text) >= 1:
        assert search.parse_count(text) == min(int(text), search.MAX_COUNT)
    else:
        with pytest.raises(SearchError):
            search.parse_count(text)


@given(st.text(max_size=40))
def test_garbage_key_cursors_are_search_errors(token: str) -> None:
    params = [("_cursor", token)]
    with contextlib.suppress(SearchError):
        search.parse_identifier_search(params, mapping.KIOSK_SYSTEM)


def test_cursor_ids_must_fit_a_bigint() -> None:
    token = search.encode_cursor(Sort.STORE, ("", 2**63))
    with pytest.raises(SearchError):
        search.decode_cursor(token, Sort.STORE)


def test_non_ascii_digits_are_refused() -> None:
    for text in ("²", "١٢"):
        with pytest.raises(SearchError):
            search.parse_count(text)
    assert mapping.parse_reading_identifier("kiosk-a:²") is None


def test_unknown_names_and_lenient_handling() -> None:
    params = [("code", "x"), ("colour", "red")]
    with pytest.raises(SearchError, match="unknown search parameter 'colour'"):
        search.check_names(params, ("code",), lenient=False)
    assert search.check_names(params, ("code",), lenient=True) == [("code", "x")]
    with pytest.raises(SearchError, match="modifier"):
        search.check_names([("code:not", "x")], ("code",), lenient=True)


def test_references() -> None:
    assert search.parse_reference("Patient/p-1", "Patient") == "p-1"
    assert search.parse_reference("http://h/fhir/Patient/p-1", "Patient") == "p-1"
    assert search.parse_reference("p-1", "Patient") == "p-1"
    for bad in ("Device/k", "Patient/a b", "Patient/"):
        with pytest.raises(SearchError):
            search.parse_reference(bad, "Patient")
