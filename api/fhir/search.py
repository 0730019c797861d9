"""Parse FHIR search parameters into typed filters, independent of SQL and HTTP.

Every parser raises :class:`SearchError` with a message safe to show to the
client; routes turn it into a 400 OperationOutcome. Exceptions::

    FhirError          status + IssueType code + message, shown as an OperationOutcome
    └── SearchError    400 invalid: a parameter the server cannot honour
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from enum import StrEnum

from api.fhir import mapping
from vitals_contract import Metric


class FhirError(Exception):
    """Base of the facade's errors: the client sees an OperationOutcome."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code  # IssueType code
        self.message = message


class SearchError(FhirError):
    """A search parameter the server cannot honour (HTTP 400)."""

    def __init__(self, message: str) -> None:
        super().__init__(400, "invalid", message)


MAX_COUNT = 200
DEFAULT_COUNT = 50
LASTN_MAX = 100
PREFIXES = ("eq", "ne", "gt", "ge", "lt", "le")
UNSUPPORTED_PREFIXES = ("sa", "eb", "ap")
MAX_ZONE_OFFSET = timedelta(hours=14)
MAX_ID = 2**63 - 1  # BIGINT

# The parameters each search implements; the CapabilityStatement is built from
# these tables, so the two cannot drift.
OBSERVATION_PARAMS = {
    "patient": ("reference", "http://hl7.org/fhir/SearchParameter/clinical-patient"),
    "subject": ("reference", "http://hl7.org/fhir/SearchParameter/Observation-subject"),
    "code": ("token", "http://hl7.org/fhir/SearchParameter/clinical-code"),
    "category": ("token", "http://hl7.org/fhir/SearchParameter/Observation-category"),
    "date": ("date", "http://hl7.org/fhir/SearchParameter/clinical-date"),
    "device": ("reference", "http://hl7.org/fhir/SearchParameter/Observation-device"),
    "identifier": ("token", "http://hl7.org/fhir/SearchParameter/clinical-identifier"),
    "_lastUpdated": (
        "date",
        "http://hl7.org/fhir/SearchParameter/Resource-lastUpdated",
    ),
}
OBSERVATION_INCLUDES = ("Observation:device", "Observation:patient")
OBSERVATION_SORTS = ("date", "-date")
LASTN_PARAMS = ("max", "patient", "subject", "category", "code")
DEVICE_PARAMS = {
    "identifier": ("token", "http://hl7.org/fhir/SearchParameter/Device-identifier"),
}
PATIENT_PARAMS = {
    "identifier": ("token", "http://hl7.org/fhir/SearchParameter/Patient-identifier"),
}
# Result parameters every search takes, besides the resource's own.
RESULT_PARAMS = ("_count", "_cursor", "_format")
OBSERVATION_RESULT_PARAMS = (*RESULT_PARAMS, "_sort", "_include", "_total")
JSON_FORMATS = ("json", "application/json", "application/fhir+json")

_DATE_RE = re.compile(
    r"^(?P<year>\d{4})"
    r"(?:-(?P<month>\d{2})"
    r"(?:-(?P<day>\d{2})"
    r"(?:T(?P<hour>\d{2}):(?P<minute>\d{2})"
    r"(?::(?P<second>\d{2})(?:\.(?P<fraction>\d{1,9}))?)?"
    r"(?P<tz>Z|[+-]\d{2}:\d{2})?"
    r")?)?)?$"
)


class Sort(StrEnum):
    """Result order; ``STORE`` (ascending store id) when no ``_sort`` is given."""

    STORE = "store"
    DATE = "date"
    DATE_DESC = "-date"


@dataclass(frozen=True, slots=True)
class DateRange:
    """The half-open UTC interval ``[start, end)`` a partial date stands for."""

    start: datetime
    end: datetime


@dataclass(frozen=True, slots=True)
class DateFilter:
    """One ``date`` / ``_lastUpdated`` value: prefix and range."""

    prefix: str
    range: DateRange


@dataclass(frozen=True, slots=True)
class Token:
    """A token: ``system|code``, ``|code`` (no system), ``code`` or ``system|``."""

    system: str | None  # None: any system; "": no system
    code: str | None  # None: any code


@dataclass(frozen=True, slots=True)
class IdSet:
    """One reference parameter's values (ORed): decoded keys and hashed ids."""

    keys: frozenset[str]
    hashed: frozenset[str]  # ids from the hashing fallback, resolved by lookup


@dataclass(slots=True)
class ObservationSearch:
    """A parsed Observation search; lists of sets are ANDed, each set is ORed."""

    metrics: set[Metric] | None = None  # None: any
    patients: list[IdSet] = field(default_factory=list)
    devices: list[IdSet] = field(default_factory=list)
    readings: list[set[tuple[str, int]]] = field(default_factory=list)
    dates: list[DateFilter] = field(default_factory=list)
    last_updated: list[DateFilter] = field(default_factory=list)
    sort: Sort = Sort.STORE
    count: int = DEFAULT_COUNT
    total: bool = False
    include_device: bool = False
    include_patient: bool = False
    cursor: tuple[str, int] | None = None  # (measured_at ISO or "", id)
    empty: bool = False  # a filter that no reading can match


def parse_date(text: str) -> DateRange:
    """Parse a FHIR date/dateTime, possibly partial, into the UTC range it covers.

    Values without a time zone are read as UTC.
    """
    m = _DATE_RE.match(text)
    if m is None:
        raise SearchError(f"invalid date {text!r}")
    try:
        return _range(m.groupdict())
    except (ValueError, OverflowError) as exc:
        raise SearchError(f"invalid date {text!r}") from exc


def _range(parts: dict[str, str | None]) -> DateRange:
    """Build the range of a matched date; ValueError/OverflowError when impossible."""
    tz: timezone = UTC
    zone = parts["tz"]
    if zone and zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        hh, mm = zone[1:].split(":")
        offset = timedelta(hours=int(hh), minutes=int(mm))
        if offset > MAX_ZONE_OFFSET:
            raise ValueError("time zone offset out of range")
        tz = timezone(sign * offset)
    fraction = parts["fraction"]
    start = datetime(
        int(parts["year"] or 0),
        int(parts["month"] or 1),
        int(parts["day"] or 1),
        int(parts["hour"] or 0),
        int(parts["minute"] or 0),
        int(parts["second"] or 0),
        int((fraction or "0")[:6].ljust(6, "0")),
        tzinfo=tz,
    )

    if parts["month"] is None:
        end = _add_months(start, 12)
    elif parts["day"] is None:
        end = _add_months(start, 1)
    elif parts["hour"] is None:
        end = start + timedelta(days=1)
    elif parts["second"] is None:
        end = start + timedelta(minutes=1)
    elif fraction is None:
        end = start + timedelta(seconds=1)
    else:
        end = start + timedelta(microseconds=1)
    return DateRange(start.astimezone(UTC), end.astimezone(UTC))


def _add_months(value: datetime, months: int) -> datetime:
    total = value.year * 12 + value.month - 1 + months
    return value.replace(year=total // 12, month=total % 12 + 1)


def parse_date_filter(text: str) -> DateFilter:
    """Parse ``[prefix]date``; prefixes eq ne gt ge lt le, default eq."""
    prefix = "eq"
    if text[:2].isalpha():
        prefix, text = text[:2], text[2:]
        if prefix in UNSUPPORTED_PREFIXES:
            raise SearchError(f"unsupported date prefix {prefix!r}")
        if prefix not in PREFIXES:
            raise SearchError(f"invalid date {prefix + text!r}")
    return DateFilter(prefix, parse_date(text))


def parse_token(text: str) -> Token:
    """Parse a token value: ``system|code``, ``|code``, ``system|`` or ``code``."""
    if not text:
        raise SearchError("empty token")
    if "|" not in text:
        return Token(None, text)
    system, _, code = text.partition("|")
    if not system and not code:
        raise SearchError("empty token")
    return Token(system, code or None)


def parse_reference(text: str, resource_type: str) -> str:
    """Return the FHIR id in ``Type/id`` or ``id``; other types are an error."""
    if "/" in text:
        kind, _, rid = text.rpartition("/")
        kind = kind.rsplit("/", 1)[-1]  # tolerate absolute URLs
        if kind != resource_type:
            raise SearchError(f"only {resource_type} references are supported")
        text = rid
    if not mapping.FHIR_ID_RE.match(text):
        raise SearchError(f"invalid {resource_type} id")
    return text


def parse_count(text: str) -> int:
    """Parse ``_count``: a positive integer, capped at :data:`MAX_COUNT`."""
    if not mapping.is_decimal(text) or int(text) < 1:
        raise SearchError("_count must be a positive integer")
    return min(int(text), MAX_COUNT)


def encode_cursor(sort: Sort, key: tuple[str, int]) -> str:
    """Make the opaque token the ``next`` link carries."""
    raw = json.dumps([1, sort.value, key[0], key[1]], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(token: str, sort: Sort) -> tuple[str, int]:
    """Read a ``_cursor`` made by :func:`encode_cursor` for the same sort."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        version, sort_value, when, last_id = json.loads(raw)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise SearchError("invalid _cursor") from exc
    if version != 1 or sort_value != sort.value:
        raise SearchError("_cursor does not belong to this search")
    if not isinstance(when, str) or type(last_id) is not int:
        raise SearchError("invalid _cursor")
    if not 0 <= last_id <= MAX_ID:
        raise SearchError("invalid _cursor")
    if (sort is Sort.STORE) != (when == ""):
        raise SearchError("invalid _cursor")
    if when:
        try:
            datetime.fromisoformat(when)
        except ValueError as exc:
            raise SearchError("invalid _cursor") from exc
    return when, last_id


def _category_matches(values: list[str]) -> bool:
    for v in values:
        token = parse_token(v)
        system_ok = token.system in (None, mapping.CATEGORY_SYSTEM)
        if system_ok and token.code in (None, mapping.VITAL_SIGNS):
            return True
    return False


def _metrics_for(values: list[str]) -> set[Metric]:
    found: set[Metric] = set()
    for v in values:
        token = parse_token(v)
        system = None if token.system is None else token.system or ""
        found |= mapping.metrics_for_token(system, token.code)
    return found


def _reading_keys(values: list[str]) -> set[tuple[str, int]]:
    keys: set[tuple[str, int]] = set()
    for v in values:
        token = parse_token(v)
        if token.system not in (None, mapping.READING_SYSTEM) or token.code is None:
            continue
        key = mapping.parse_reading_identifier(token.code)
        if key is not None:
            keys.add(key)
    return keys


def _ids(values: list[str], resource_type: str) -> IdSet:
    """Decode reference values to natural keys; keep hashed ids apart."""
    keys: set[str] = set()
    hashed: set[str] = set()
    for v in values:
        fhir_id = parse_reference(v, resource_type)
        if mapping.is_hashed_id(fhir_id):
            hashed.add(fhir_id)
            continue
        key = mapping.decode_id(fhir_id)
        if key is not None:
            keys.add(key)
    return IdSet(frozenset(keys), frozenset(hashed))


def check_names(
    params: Sequence[tuple[str, str]], allowed: Sequence[str], *, lenient: bool
) -> list[tuple[str, str]]:
    """Reject unknown or modified parameters, or drop unknown ones when lenient."""
    kept: list[tuple[str, str]] = []
    for name, value in params:
        base, colon, _modifier = name.partition(":")
        if base in allowed and colon:
            raise SearchError(f"modifier on {base!r} is not supported")
        if name not in allowed:
            if lenient:
                continue
            raise SearchError(f"unknown search parameter {name!r}")
        kept.append((name, value))
    return kept


def _single(params: Sequence[tuple[str, str]], name: str) -> str | None:
    values = [v for n, v in params if n == name]
    if len(values) > 1:
        raise SearchError(f"{name} may be given once")
    return values[0] if values else None


def parse_observation_search(params: Sequence[tuple[str, str]]) -> ObservationSearch:
    """Turn checked ``(name, value)`` pairs into an :class:`ObservationSearch`."""
    search = ObservationSearch()
    for name, value in params:
        if name not in OBSERVATION_RESULT_PARAMS and value == "":
            raise SearchError(f"empty value for {name!r}")
    _apply_filters(search, params)

    sort = _single(params, "_sort")
    if sort is not None:
        if sort not in OBSERVATION_SORTS:
            raise SearchError(f"_sort must be one of {', '.join(OBSERVATION_SORTS)}")
        search.sort = Sort(sort)
    count = _single(params, "_count")
    if count is not None:
        search.count = parse_count(count)
    total = _single(params, "_total")
    if total is not None:
        if total not in ("none", "estimate", "accurate"):
            raise SearchError("_total must be none, estimate or accurate")
        search.total = total == "accurate"
    for name, value in params:
        if name != "_include":
            continue
        for inc in value.split(","):
            if inc == "Observation:device":
                search.include_device = True
            elif inc == "Observation:patient":
                search.include_patient = True
            else:
                raise SearchError(f"unsupported _include {inc!r}")
    cursor = _single(params, "_cursor")
    if cursor is not None:
        search.cursor = decode_cursor(cursor, search.sort)
    return search


def _apply_filters(
    search: ObservationSearch, params: Sequence[tuple[str, str]]
) -> None:
    for name, value in params:
        values = value.split(",")
        if name in ("patient", "subject"):
            search.patients.append(_ids(values, "Patient"))
        elif name == "device":
            search.devices.append(_ids(values, "Device"))
        elif name == "code":
            metrics = _metrics_for(values)
            search.metrics = (
                metrics if search.metrics is None else search.metrics & metrics
            )
        elif name == "category":
            if not _category_matches(values):
                search.empty = True
        elif name == "identifier":
            search.readings.append(_reading_keys(values))
        elif name == "date":
            search.dates.append(parse_date_filter(value))
        elif name == "_lastUpdated":
            search.last_updated.append(parse_date_filter(value))
    if search.metrics is not None and not search.metrics:
        search.empty = True


def parse_lastn(params: Sequence[tuple[str, str]]) -> tuple[ObservationSearch, int]:
    """Parse ``$lastn`` parameters; return the filters and ``max``."""
    for name, value in params:
        if value == "":
            raise SearchError(f"empty value for {name!r}")
    search = ObservationSearch()
    _apply_filters(search, [(n, v) for n, v in params if n != "max"])
    max_text = _single(params, "max")
    max_n = 1
    if max_text is not None:
        if not mapping.is_decimal(max_text) or not 1 <= int(max_text) <= LASTN_MAX:
            raise SearchError(f"max must be an integer from 1 to {LASTN_MAX}")
        max_n = int(max_text)
    return search, max_n


def parse_identifier_search(
    params: Sequence[tuple[str, str]], system: str
) -> tuple[list[set[str]], int, str | None]:
    """Parse a Device or Patient search: identifier sets, ``_count``, cursor."""
    sets: list[set[str]] = []
    for name, value in params:
        if name != "identifier":
            continue
        if value == "":
            raise SearchError("empty value for 'identifier'")
        keys: set[str] = set()
        for v in value.split(","):
            token = parse_token(v)
            if token.system in (None, system) and token.code is not None:
                keys.add(token.code)
        sets.append(keys)
    count_text = _single(params, "_count")
    count = DEFAULT_COUNT if count_text is None else parse_count(count_text)
    cursor = _single(params, "_cursor")
    if cursor is not None:
        try:
            after = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        except ValueError as exc:  # binascii.Error, UnicodeDecodeError, non-ASCII
            raise SearchError("invalid _cursor") from exc
        return sets, count, after
    return sets, count, None


def encode_key_cursor(key: str) -> str:
    """Make the opaque cursor of a Device or Patient page."""
    return base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")
