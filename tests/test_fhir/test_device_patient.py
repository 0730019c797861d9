"""Device (one per kiosk) and Patient (one per patient_ref): read and search."""

from __future__ import annotations

from typing import Any

import pytest
from test_fhir.conftest import HASHED_KIOSK, HASHED_PATIENT, FhirEnv

from api.fhir import mapping


def identifiers(bundle: dict[str, Any]) -> list[str]:
    return sorted(e["resource"]["identifier"][0]["value"] for e in bundle["entry"])


@pytest.mark.parametrize("kiosk_id", ["kiosk-a", "kiosk_b.2", HASHED_KIOSK])
def test_read_device(fhir: FhirEnv, kiosk_id: str) -> None:
    device_id = mapping.encode_id(kiosk_id)
    assert mapping.FHIR_ID_RE.match(device_id)
    device = fhir.ok(f"/Device/{device_id}")
    assert device["id"] == device_id
    assert device["identifier"] == [
        {"system": "urn:kiosk-vitals:kiosk", "value": kiosk_id}
    ]
    assert device["deviceName"][0]["name"] == kiosk_id


def test_device_ids_are_reversible_unless_hashed() -> None:
    assert mapping.encode_id("kiosk_b.2") == "kiosk.-b..2"
    assert mapping.decode_id("kiosk.-b..2") == "kiosk_b.2"
    assert mapping.encode_id(HASHED_KIOSK).startswith("-")


@pytest.mark.parametrize("device_id", ["kiosk-zz", "kiosk.x", "-" + "0" * 40, "a_b"])
def test_unknown_device_is_404(fhir: FhirEnv, device_id: str) -> None:
    body = fhir.error(f"/Device/{device_id}", 404)
    assert body["issue"][0]["code"] == "not-found"


def test_search_devices(fhir: FhirEnv) -> None:
    everything = fhir.ok("/Device")
    assert identifiers(everything) == sorted(["kiosk-a", "kiosk_b.2", HASHED_KIOSK])
    assert everything["total"] == 3
    assert identifiers(fhir.ok("/Device", {"identifier": "kiosk_b.2"})) == ["kiosk_b.2"]
    found = fhir.ok("/Device", {"identifier": "urn:kiosk-vitals:kiosk|kiosk-a"})
    assert identifiers(found) == ["kiosk-a"]
    assert fhir.ok("/Device", {"identifier": "urn:other|kiosk-a"})["entry"] == []
    both = fhir.ok("/Device", {"identifier": "kiosk-a,kiosk_b.2"})
    assert identifiers(both) == ["kiosk-a", "kiosk_b.2"]


def test_device_pages(fhir: FhirEnv) -> None:
    seen: list[str] = []
    url: str | None = "/Device?_count=1"
    while url is not None:
        bundle = fhir.ok(url)
        seen.extend(identifiers(bundle))
        url = next((x["url"] for x in bundle["link"] if x["relation"] == "next"), None)
    assert sorted(seen) == sorted(["kiosk-a", "kiosk_b.2", HASHED_KIOSK])


@pytest.mark.parametrize("ref", ["p-1", HASHED_PATIENT])
def test_read_patient(fhir: FhirEnv, ref: str) -> None:
    patient_id = mapping.encode_id(ref)
    patient = fhir.ok(f"/Patient/{patient_id}")
    assert patient == {
        "resourceType": "Patient",
        "id": patient_id,
        "identifier": [{"system": "urn:kiosk-vitals:patient-ref", "value": ref}],
    }


@pytest.mark.parametrize("patient_id", ["nobody", "-" + "f" * 40, "p.x"])
def test_unknown_patient_is_404(fhir: FhirEnv, patient_id: str) -> None:
    fhir.error(f"/Patient/{patient_id}", 404)


def test_search_patients(fhir: FhirEnv) -> None:
    everything = fhir.ok("/Patient")
    assert identifiers(everything) == sorted(["p-1", HASHED_PATIENT])
    hashed = fhir.ok("/Patient", {"identifier": HASHED_PATIENT})
    assert [e["resource"]["id"] for e in hashed["entry"]] == [
        mapping.encode_id(HASHED_PATIENT)
    ]
    system = fhir.ok("/Patient", {"identifier": "urn:kiosk-vitals:patient-ref|p-1"})
    assert identifiers(system) == ["p-1"]
    assert fhir.ok("/Patient", {"identifier": "p-2"})["entry"] == []

    pages = fhir.ok("/Patient", {"_count": "1"})
    next_url = next(x["url"] for x in pages["link"] if x["relation"] == "next")
    assert identifiers(fhir.ok(next_url)) == [max("p-1", HASHED_PATIENT)]


@pytest.mark.parametrize("path", ["/Device", "/Patient"])
@pytest.mark.parametrize(
    "params", [{"name": "x"}, {"_count": "x"}, {"identifier": ""}, {"_sort": "date"}]
)
def test_bad_parameters(fhir: FhirEnv, path: str, params: dict[str, str]) -> None:
    fhir.error(path, 400, params)
