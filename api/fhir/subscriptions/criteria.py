"""The one SubscriptionTopic we serve and its filter criteria, free of SQL and HTTP.

FHIR R4 has no SubscriptionTopic resource; per the backport IG (STU 1.1) an R4
server names its topics by canonical URL and advertises them in the
CapabilityStatement (extension ``capabilitystatement-subscriptiontopic-canonical``).
Our topic fires when a new vital-sign reading is stored: its focus is the
Observation of that reading.

Filters arrive in ``backport-filter-criteria`` extensions as search-style strings,
``Observation?patient=Patient/p-1&code=http://loinc.org|8867-4,9279-1``. Values
of one parameter are ORed (comma), parameters and extensions are ANDed.
Supported: ``patient`` (``subject`` is an alias), ``code``, ``device``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import parse_qsl

from api.fhir import mapping, search
from vitals_contract import Metric

TOPIC_URL = f"{mapping.LOCAL_BASE}/SubscriptionTopic/vital-signs-observation"
TOPIC_TITLE = "New vital-signs Observation"
TOPIC_RESOURCE = "Observation"
FILTER_PARAMS = ("patient", "subject", "code", "device")
MAX_FILTER_CHARS = 2_000
MAX_VALUES = 100


class FilterError(ValueError):
    """A filter-criteria string we cannot honour; the message is safe to show."""


@dataclass(frozen=True, slots=True)
class Filter:
    """What a Subscription wants; ``None`` means any value.

    Patients and devices are FHIR ids (as ``mapping.encode_id`` makes them), so
    hashed ids match like readable ones.
    """

    patients: frozenset[str] | None = None
    metrics: frozenset[str] | None = None  # Metric values
    devices: frozenset[str] | None = None

    def prematch(self, device_id: str, metric: str) -> bool:
        """Check the device and code conditions (the patient needs a look-up)."""
        if self.devices is not None and device_id not in self.devices:
            return False
        return self.metrics is None or metric in self.metrics

    def matches(self, device_id: str, metric: str, patient_id: str | None) -> bool:
        """Tell whether a reading of ``metric`` on ``device_id`` for a patient fits."""
        if not self.prematch(device_id, metric):
            return False
        return self.patients is None or patient_id in self.patients


def _intersect(
    current: frozenset[str] | None, new: Iterable[str]
) -> frozenset[str] | None:
    values = frozenset(new)
    return values if current is None else current & values


def _values(name: str, raw: str) -> list[str]:
    values = raw.split(",")
    if len(values) > MAX_VALUES:
        raise FilterError(f"{name}: at most {MAX_VALUES} values")
    if any(not v for v in values):
        raise FilterError(f"{name}: empty value")
    return values


def _references(name: str, raw: str, resource_type: str) -> list[str]:
    try:
        return [search.parse_reference(v, resource_type) for v in _values(name, raw)]
    except search.SearchError as exc:
        raise FilterError(f"{name}: {exc.message}") from exc


def _metrics(raw: str) -> set[Metric]:
    found: set[Metric] = set()
    for value in _values("code", raw):
        try:
            token = search.parse_token(value)
        except search.SearchError as exc:
            raise FilterError(f"code: {exc.message}") from exc
        system = None if token.system is None else token.system or ""
        matched = mapping.metrics_for_token(system, token.code)
        if not matched:
            raise FilterError("code: no vital sign of this server has that code")
        found |= matched
    return found


def parse_filter(criteria: Iterable[str]) -> Filter:
    """Parse filter-criteria strings (ANDed) into one :class:`Filter`."""
    patients: frozenset[str] | None = None
    metrics: frozenset[str] | None = None
    devices: frozenset[str] | None = None
    for text in criteria:
        if len(text) > MAX_FILTER_CHARS:
            raise FilterError(f"filter longer than {MAX_FILTER_CHARS} characters")
        resource, mark, query = text.partition("?")
        if not mark or resource != TOPIC_RESOURCE:
            raise FilterError(f"filters must read '{TOPIC_RESOURCE}?name=value&...'")
        try:
            pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
        except ValueError as exc:
            raise FilterError("filter is not a valid query string") from exc
        for name, raw in pairs:
            if name in ("patient", "subject"):
                patients = _intersect(patients, _references(name, raw, "Patient"))
            elif name == "device":
                devices = _intersect(devices, _references(name, raw, "Device"))
            elif name == "code":
                metrics = _intersect(metrics, (m.value for m in _metrics(raw)))
            else:
                shown = name[:40]
                raise FilterError(
                    f"unsupported filter {shown!r}; use {', '.join(FILTER_PARAMS)}"
                )
    for label, values in (
        ("patient", patients),
        ("code", metrics),
        ("device", devices),
    ):
        if values is not None and not values:
            raise FilterError(f"the {label} filters exclude each other")
    return Filter(patients=patients, metrics=metrics, devices=devices)


def render_filter(f: Filter) -> list[str]:
    """Write ``f`` as filter-criteria strings (one per condition) that parse back."""
    out: list[str] = []
    if f.patients is not None:
        refs = ",".join(f"Patient/{p}" for p in sorted(f.patients))
        out.append(f"{TOPIC_RESOURCE}?patient={refs}")
    if f.metrics is not None:
        codes = ",".join(f"{mapping.METRIC_SYSTEM}|{m}" for m in sorted(f.metrics))
        out.append(f"{TOPIC_RESOURCE}?code={codes}")
    if f.devices is not None:
        refs = ",".join(f"Device/{d}" for d in sorted(f.devices))
        out.append(f"{TOPIC_RESOURCE}?device={refs}")
    return out
