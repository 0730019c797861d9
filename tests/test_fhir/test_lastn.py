"""Observation/$lastn: the latest N per code per patient (or device), in SQL."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import pytest
from test_fhir.conftest import Expected, FhirEnv

from api.fhir import mapping


def lastn_keys(fhir: FhirEnv, params: Any) -> list[str]:
    bundle = fhir.ok("/Observation/$lastn", params)
    assert bundle["type"] == "searchset"
    assert bundle["total"] == len(bundle["entry"])
    assert all(e["search"]["mode"] == "match" for e in bundle["entry"])
    return sorted(e["resource"]["identifier"][0]["value"] for e in bundle["entry"])


def reference(readings: list[Expected], max_n: int, keep: Any = bool) -> list[str]:
    """Compute $lastn in Python: group, sort by time, take the newest ``max_n``."""
    groups: dict[tuple[Any, ...], list[Expected]] = defaultdict(list)
    for e in readings:
        if keep(e):
            owner = (
                ("patient", e.patient_ref) if e.patient_ref else ("device", e.kiosk_id)
            )
            groups[(*owner, e.metric)].append(e)
    out: list[str] = []
    for group in groups.values():
        group.sort(key=lambda e: e.measured_at, reverse=True)
        out.extend(e.key for e in group[:max_n])
    return sorted(out)


def test_hand_computed_latest_per_code_for_one_patient(fhir: FhirEnv) -> None:
    # p-1's newest scan is s3 on kiosk_b.2: seqs 1-18 in rounds of six metrics.
    assert lastn_keys(fhir, {"patient": "p-1"}) == sorted(
        f"kiosk_b.2:{s}" for s in range(13, 19)
    )
    assert lastn_keys(fhir, {"patient": "p-1", "max": "2"}) == sorted(
        f"kiosk_b.2:{s}" for s in range(7, 19)
    )
    # max 5: all three rounds of s3, then the two newest of s1 (kiosk-a 7-18).
    assert lastn_keys(fhir, {"subject": "Patient/p-1", "max": "5"}) == sorted(
        [f"kiosk_b.2:{s}" for s in range(1, 19)]
        + [f"kiosk-a:{s}" for s in range(7, 19)]
    )


def test_hand_computed_across_patients_and_devices(fhir: FhirEnv) -> None:
    # Heart rate, newest per patient; readings without a patient group by kiosk.
    assert lastn_keys(fhir, {"code": "http://loinc.org|8867-4"}) == sorted(
        [
            "kiosk_b.2:13",  # p-1, scan s3
            "kiosk-a:33",  # MRN 0042/x, scan s2
            "kiosk_b.2:33",  # no patient, scan s4 on kiosk_b.2
            "kiosk-a:40",  # no patient, reading outside a scan on kiosk-a
        ]
    )


@pytest.mark.parametrize("max_n", [1, 2, 3, 4])
@pytest.mark.parametrize(
    "params",
    [
        {},
        {"patient": "p-1"},
        {"code": "8867-4,59408-5"},
        {"category": "vital-signs", "patient": "p-1,p-2"},
    ],
)
def test_matches_a_python_reference(
    fhir: FhirEnv, max_n: int, params: dict[str, str]
) -> None:
    codes = params.get("code")
    patients = params.get("patient")

    def keep(e: Expected) -> bool:
        if patients and e.patient_ref not in patients.split(","):
            return False
        if codes:
            wanted = set().union(
                *(mapping.metrics_for_token(None, c) for c in codes.split(","))
            )
            return e.metric in wanted
        return True

    got = lastn_keys(fhir, {**params, "max": str(max_n)})
    assert got == reference(fhir.readings, max_n, keep)


def test_no_match(fhir: FhirEnv) -> None:
    assert lastn_keys(fhir, {"category": "laboratory"}) == []
    assert lastn_keys(fhir, {"patient": "nobody"}) == []


@pytest.mark.parametrize(
    "params",
    [{"max": "0"}, {"max": "abc"}, {"max": "101"}, {"_count": "5"}, {"date": "2026"}],
)
def test_bad_parameters(fhir: FhirEnv, params: dict[str, str]) -> None:
    fhir.error("/Observation/$lastn", 400, params)
