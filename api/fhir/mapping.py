"""Pure mappings from stored rows to HL7 FHIR R4 resources.

The route handlers emit plain JSON-ready dicts: validating each resource with
``fhir.resources`` costs about 0.7 ms, which would dominate a page of 50. The
``*_model`` functions wrap the same dicts in ``fhir.resources`` R4B models (R4B
shares R4's Observation, Device, Patient, Bundle and OperationOutcome shapes); the
tests validate every response through them.

Identifiers (see docs/fhir.md):

- Observation ``id`` is the store position ``readings.id``; the business
  identifier ``urn:kiosk-vitals:reading|<kiosk_id>:<seq>`` never changes.
- Device and Patient ids encode the kiosk id / patient_ref reversibly with ``.``
  as escape character (``.`` -> ``..``, ``_`` -> ``.-``). Values that do not fit
  the FHIR id rules get ``-`` plus a SHA-256 prefix, resolved by lookup.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

from bridge.store.db import StoredReading
from vitals_contract import METRICS, Metric

JsonDict = dict[str, Any]

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
CATEGORY_SYSTEM = "http://terminology.hl7.org/CodeSystem/observation-category"
VITAL_SIGNS = "vital-signs"
LOCAL_BASE = "http://kiosk-vitals.example/fhir"
METRIC_SYSTEM = f"{LOCAL_BASE}/CodeSystem/metric"
QUALITY_EXTENSION = f"{LOCAL_BASE}/StructureDefinition/signal-quality"
ESTIMATE_EXTENSION = f"{LOCAL_BASE}/StructureDefinition/estimate"
READING_SYSTEM = "urn:kiosk-vitals:reading"
KIOSK_SYSTEM = "urn:kiosk-vitals:kiosk"
PATIENT_SYSTEM = "urn:kiosk-vitals:patient-ref"
ESTIMATE_NOTE = "Camera-based estimate; not a diagnostic measurement"

PROFILE_BASE = "http://hl7.org/fhir/StructureDefinition"
VITALSIGNS_PROFILE = f"{PROFILE_BASE}/vitalsigns"

FHIR_ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_ESCAPABLE_RE = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.\-]*$")
HASHED_ID_PREFIX = "-"
_HASH_HEX_CHARS = 40


@dataclass(frozen=True, slots=True)
class Coding:
    """One coding of an Observation code."""

    system: str
    code: str
    display: str


@dataclass(frozen=True, slots=True)
class MetricCoding:
    """How one metric appears in FHIR: codings, unit text and profiles."""

    codings: tuple[Coding, ...]
    unit_text: str
    specific_profile: str | None


# LOINC displays, plus codes METRICS cannot hold: SpO2 carries 2708-6 beside
# 59408-5 because the R4 oxygensat profile requires 2708-6.
_LOINC_DISPLAY = {
    "8867-4": "Heart rate",
    "9279-1": "Respiratory rate",
    "80404-7": "R-R interval.standard deviation (Heart rate variability)",
    "2708-6": "Oxygen saturation in Arterial blood",
    "59408-5": "Oxygen saturation in Arterial blood by Pulse oximetry",
}
_EXTRA_LOINC = {Metric.SPO2: ("2708-6",)}
_SPECIFIC_PROFILE = {
    Metric.HEART_RATE: f"{PROFILE_BASE}/heartrate",
    Metric.RESPIRATORY_RATE: f"{PROFILE_BASE}/resprate",
    Metric.SPO2: f"{PROFILE_BASE}/oxygensat",
}
_UNIT_TEXT = {
    Metric.HEART_RATE: "beats/minute",
    Metric.RESPIRATORY_RATE: "breaths/minute",
}


def _metric_coding(metric: Metric) -> MetricCoding:
    info = METRICS[metric]
    loinc = (*_EXTRA_LOINC.get(metric, ()), info.loinc) if info.loinc else ()
    codings = [Coding(LOINC, code, _LOINC_DISPLAY[code]) for code in loinc]
    codings.append(Coding(METRIC_SYSTEM, metric.value, info.display))
    return MetricCoding(
        codings=tuple(codings),
        unit_text=_UNIT_TEXT.get(metric, info.unit),
        specific_profile=_SPECIFIC_PROFILE.get(metric),
    )


METRIC_CODINGS: Mapping[Metric, MetricCoding] = {m: _metric_coding(m) for m in Metric}


def metrics_for_token(system: str | None, code: str | None) -> set[Metric]:
    """Return the metrics a ``code`` token matches; ``None`` means any part."""
    return {
        metric
        for metric, mc in METRIC_CODINGS.items()
        for c in mc.codings
        if (system is None or c.system == system) and (code is None or c.code == code)
    }


# -- ids --------------------------------------------------------------------


def encode_id(value: str) -> str:
    """Map a kiosk id or patient_ref to a FHIR id, reversibly where possible."""
    if _ESCAPABLE_RE.match(value):
        encoded = value.replace(".", "..").replace("_", ".-")
        if len(encoded) <= 64:
            return encoded
    digest = hashlib.sha256(value.encode()).hexdigest()[:_HASH_HEX_CHARS]
    return HASHED_ID_PREFIX + digest


def decode_id(fhir_id: str) -> str | None:
    """Invert :func:`encode_id`; ``None`` for hashed or malformed ids."""
    if not FHIR_ID_RE.match(fhir_id) or fhir_id.startswith(HASHED_ID_PREFIX):
        return None
    out: list[str] = []
    chars = iter(fhir_id)
    for ch in chars:
        if ch != ".":
            out.append(ch)
            continue
        nxt = next(chars, "")
        if nxt == ".":
            out.append(".")
        elif nxt == "-":
            out.append("_")
        else:
            return None
    return "".join(out)


def is_hashed_id(fhir_id: str) -> bool:
    """Tell whether ``fhir_id`` came from the hashing fallback of :func:`encode_id`."""
    return (
        fhir_id.startswith(HASHED_ID_PREFIX) and FHIR_ID_RE.match(fhir_id) is not None
    )


def is_decimal(text: str) -> bool:
    """Tell whether ``text`` is ASCII digits only (``str.isdigit`` takes "²")."""
    return text.isascii() and text.isdigit()


def reading_identifier(kiosk_id: str, seq: int) -> str:
    """Return the stable business identifier value of a reading."""
    return f"{kiosk_id}:{seq}"


def parse_reading_identifier(value: str) -> tuple[str, int] | None:
    """Split ``<kiosk_id>:<seq>``; ``None`` when malformed."""
    kiosk_id, sep, seq = value.rpartition(":")
    if not sep or not kiosk_id or not is_decimal(seq) or len(seq) > 18:
        return None
    return kiosk_id, int(seq)


# -- resources ----------------------------------------------------------------


def instant(value: datetime) -> str:
    """Render an aware datetime as a FHIR instant / dateTime."""
    return value.isoformat()


def _vital_signs_category() -> JsonDict:
    return {
        "coding": [
            {"system": CATEGORY_SYSTEM, "code": VITAL_SIGNS, "display": "Vital Signs"}
        ],
        "text": "Vital Signs",
    }


@dataclass(frozen=True, slots=True)
class _ObservationParts:
    """What every Observation of one metric shares, worked out once."""

    text: str
    codings: tuple[Coding, ...]
    unit: str  # UCUM code
    unit_text: str
    estimate: bool
    profiles: tuple[str, ...]  # claimed when the reading has a patient


def _observation_parts(metric: Metric) -> _ObservationParts:
    info = METRICS[metric]
    mc = METRIC_CODINGS[metric]
    profiles: tuple[str, ...] = ()
    if info.loinc:
        profiles = (VITALSIGNS_PROFILE,)
        if mc.specific_profile:
            profiles += (mc.specific_profile,)
    return _ObservationParts(
        info.display, mc.codings, info.unit, mc.unit_text, info.estimate, profiles
    )


# Keyed by the stored metric name: a page maps without an enum lookup per row.
_OBSERVATION_PARTS = {m.value: _observation_parts(m) for m in Metric}

# Pages repeat the same kiosks and patients: their ids are encoded once.
_reference_id = lru_cache(maxsize=4096)(encode_id)


def observation(reading: StoredReading, patient_ref: str | None) -> JsonDict:
    """Map one stored reading to an R4 vital-signs Observation.

    The vital-signs profiles are claimed only for LOINC-coded metrics with a
    patient: the profile requires a subject.
    """
    parts = _OBSERVATION_PARTS.get(reading.metric)
    if parts is None:
        raise ValueError(f"{reading.metric!r} is not a valid Metric")

    meta: JsonDict = {"lastUpdated": reading.received_at.isoformat()}
    if patient_ref is not None and parts.profiles:
        meta["profile"] = list(parts.profiles)
    extensions: list[JsonDict] = [
        {"url": QUALITY_EXTENSION, "valueDecimal": reading.quality}
    ]
    if parts.estimate:
        extensions.append({"url": ESTIMATE_EXTENSION, "valueBoolean": True})

    resource: JsonDict = {
        "resourceType": "Observation",
        "id": str(reading.id),
        "meta": meta,
        "extension": extensions,
        "identifier": [
            {
                "system": READING_SYSTEM,
                "value": reading_identifier(reading.kiosk_id, reading.seq),
            }
        ],
        "status": "final",
        "category": [_vital_signs_category()],
        "code": {
            "coding": [
                {"system": c.system, "code": c.code, "display": c.display}
                for c in parts.codings
            ],
            "text": parts.text,
        },
    }
    if patient_ref is not None:
        resource["subject"] = {"reference": f"Patient/{_reference_id(patient_ref)}"}
    resource["effectiveDateTime"] = reading.measured_at.isoformat()
    resource["valueQuantity"] = {
        "value": reading.value,
        "unit": parts.unit_text,
        "system": UCUM,
        "code": parts.unit,
    }
    if parts.estimate:
        resource["note"] = [{"text": ESTIMATE_NOTE}]
    resource["device"] = {"reference": f"Device/{_reference_id(reading.kiosk_id)}"}
    return resource


def device(
    kiosk_id: str, agent_version: str | None, last_seen_at: datetime | None
) -> JsonDict:
    """Map one kiosk to a Device."""
    resource: JsonDict = {
        "resourceType": "Device",
        "id": encode_id(kiosk_id),
        "identifier": [{"system": KIOSK_SYSTEM, "value": kiosk_id}],
        "status": "active",
        "deviceName": [{"name": kiosk_id, "type": "user-friendly-name"}],
        "type": {"text": "Camera vital-signs kiosk"},
    }
    if last_seen_at is not None:
        resource["meta"] = {"lastUpdated": instant(last_seen_at)}
    if agent_version:
        resource["version"] = [{"value": agent_version}]
    return resource


def patient(patient_ref: str) -> JsonDict:
    """Map a scan's patient_ref to a Patient that carries only the identifier."""
    return {
        "resourceType": "Patient",
        "id": encode_id(patient_ref),
        "identifier": [{"system": PATIENT_SYSTEM, "value": patient_ref}],
    }


def operation_outcome(code: str, diagnostics: str, severity: str = "error") -> JsonDict:
    """Build an OperationOutcome with one issue (``code`` from IssueType)."""
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}],
    }


def bundle(
    *,
    entries: list[JsonDict],
    links: list[tuple[str, str]],
    total: int | None,
    timestamp: datetime,
) -> JsonDict:
    """Build a searchset Bundle from ready entries and (relation, url) links."""
    resource: JsonDict = {
        "resourceType": "Bundle",
        "meta": {"lastUpdated": instant(timestamp)},
        "type": "searchset",
    }
    if total is not None:
        resource["total"] = total
    resource["link"] = [{"relation": rel, "url": url} for rel, url in links]
    resource["entry"] = entries
    return resource


def entry(full_url: str, resource: JsonDict, mode: str) -> JsonDict:
    """Build one Bundle entry with ``search.mode`` match, include or outcome."""
    return {"fullUrl": full_url, "resource": resource, "search": {"mode": mode}}


_MODELS = {
    "Observation": "fhir.resources.R4B.observation",
    "Device": "fhir.resources.R4B.device",
    "Patient": "fhir.resources.R4B.patient",
    "Bundle": "fhir.resources.R4B.bundle",
    "OperationOutcome": "fhir.resources.R4B.operationoutcome",
    "CapabilityStatement": "fhir.resources.R4B.capabilitystatement",
    "AuditEvent": "fhir.resources.R4B.auditevent",
}


def to_model(resource: Mapping[str, Any]) -> Any:
    """Validate a resource dict with its ``fhir.resources`` R4B model and return it."""
    import importlib

    kind = resource["resourceType"]
    module = importlib.import_module(_MODELS[kind])
    return getattr(module, kind).model_validate(dict(resource))
