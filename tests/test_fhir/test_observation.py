"""Observation read and search over real HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from test_fhir.conftest import HASHED_PATIENT, T0, Expected, FhirEnv

from api.fhir import mapping
from vitals_contract import METRICS, Metric

ALL = 74  # 4 scans x 6 metrics x 3 readings + 2 readings outside a scan


def keys(bundle: dict[str, Any], mode: str = "match") -> list[str]:
    """Return the reading identifiers of the bundle's entries in ``mode``."""
    return [
        e["resource"]["identifier"][0]["value"]
        for e in bundle["entry"]
        if e["search"]["mode"] == mode
    ]


def search(fhir: FhirEnv, **params: str) -> list[str]:
    """Run a search that fits one page and return the identifiers found."""
    bundle = fhir.ok("/Observation", {"_count": "200", **params})
    assert bundle["type"] == "searchset"
    assert "next" not in {link["relation"] for link in bundle["link"]}
    assert bundle["total"] == len(bundle["entry"])
    return sorted(keys(bundle))


def expect(fhir: FhirEnv, predicate: Any) -> list[str]:
    return sorted(e.key for e in fhir.readings if predicate(e))


def test_read_maps_every_field(fhir: FhirEnv) -> None:
    by_key = fhir.by_key()
    bundle = fhir.ok("/Observation", {"_count": "200"})
    assert len(bundle["entry"]) == ALL
    for entry in bundle["entry"]:
        listed = entry["resource"]
        assert entry["fullUrl"] == f"{fhir.base}/Observation/{listed['id']}"
        obs = fhir.ok(f"/Observation/{listed['id']}")
        assert obs == listed
        exp = by_key[obs["identifier"][0]["value"]]
        check_observation(obs, exp)


def check_observation(obs: dict[str, Any], exp: Expected) -> None:
    info = METRICS[exp.metric]
    assert obs["identifier"] == [
        {"system": "urn:kiosk-vitals:reading", "value": exp.key}
    ]
    assert obs["status"] == "final"
    assert obs["category"][0]["coding"][0] == {
        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
        "code": "vital-signs",
        "display": "Vital Signs",
    }
    codings = {(c["system"], c["code"]) for c in obs["code"]["coding"]}
    local = ("http://kiosk-vitals.example/fhir/CodeSystem/metric", exp.metric.value)
    assert local in codings
    loinc = {c for s, c in codings if s == "http://loinc.org"}
    assert (
        loinc
        == {
            Metric.HEART_RATE: {"8867-4"},
            Metric.RESPIRATORY_RATE: {"9279-1"},
            Metric.SPO2: {"2708-6", "59408-5"},
            Metric.HRV_SDNN: {"80404-7"},
            Metric.HRV_RMSSD: set(),
            Metric.STRESS_INDEX: set(),
        }[exp.metric]
    )
    quantity = obs["valueQuantity"]
    assert quantity["value"] == pytest.approx(exp.value)
    assert quantity["system"] == "http://unitsofmeasure.org"
    assert quantity["code"] == info.unit
    assert datetime.fromisoformat(obs["effectiveDateTime"]) == exp.measured_at
    assert obs["device"] == {"reference": f"Device/{mapping.encode_id(exp.kiosk_id)}"}

    profiles = set(obs["meta"].get("profile", ()))
    if exp.patient_ref is None:
        assert "subject" not in obs
        assert profiles == set()  # the vital-signs profile requires a subject
    else:
        assert obs["subject"] == {
            "reference": f"Patient/{mapping.encode_id(exp.patient_ref)}"
        }
        specific = {
            Metric.HEART_RATE: {"http://hl7.org/fhir/StructureDefinition/heartrate"},
            Metric.RESPIRATORY_RATE: {
                "http://hl7.org/fhir/StructureDefinition/resprate"
            },
            Metric.SPO2: {"http://hl7.org/fhir/StructureDefinition/oxygensat"},
        }.get(exp.metric, set())
        vs = {"http://hl7.org/fhir/StructureDefinition/vitalsigns"} if loinc else set()
        assert profiles == vs | specific

    extensions = {x["url"]: x for x in obs["extension"]}
    quality = extensions[mapping.QUALITY_EXTENSION]
    assert quality["valueDecimal"] == pytest.approx(exp.quality)
    if info.estimate:
        assert extensions[mapping.ESTIMATE_EXTENSION] == {
            "url": mapping.ESTIMATE_EXTENSION,
            "valueBoolean": True,
        }
        assert obs["note"] == [
            {"text": "Camera-based estimate; not a diagnostic measurement"}
        ]
    else:
        assert mapping.ESTIMATE_EXTENSION not in extensions
        assert "note" not in obs


def test_unknown_ids_are_404(fhir: FhirEnv) -> None:
    for rid in ("999999", "abc", "1.5", "0", "²", "9" * 30):
        body = fhir.error(f"/Observation/{rid}", 404)
        assert body["issue"][0]["code"] == "not-found"


@pytest.mark.parametrize("param", ["patient", "subject"])
def test_patient_and_subject(fhir: FhirEnv, param: str) -> None:
    p1 = expect(fhir, lambda e: e.patient_ref == "p-1")
    assert len(p1) == 36
    assert search(fhir, **{param: "p-1"}) == p1
    assert search(fhir, **{param: "Patient/p-1"}) == p1
    assert search(fhir, **{param: f"{fhir.base}/Patient/p-1"}) == p1

    hashed = expect(fhir, lambda e: e.patient_ref == HASHED_PATIENT)
    assert search(fhir, **{param: mapping.encode_id(HASHED_PATIENT)}) == hashed
    both = f"p-1,Patient/{mapping.encode_id(HASHED_PATIENT)}"
    assert search(fhir, **{param: both}) == sorted(p1 + hashed)
    assert search(fhir, **{param: "nobody"}) == []

    # Repeated parameters are ANDed, hashed ids included: one patient cannot be two.
    hashed_id = mapping.encode_id(HASHED_PATIENT)
    both_params = [(param, hashed_id), (param, "p-1"), ("_count", "200")]
    assert fhir.ok("/Observation", both_params)["entry"] == []
    same = [(param, hashed_id), (param, f"p-1,{hashed_id}"), ("_count", "200")]
    assert sorted(keys(fhir.ok("/Observation", same))) == hashed


def test_subject_of_another_type_is_refused(fhir: FhirEnv) -> None:
    fhir.error("/Observation", 400, {"subject": "Group/1"})


def test_device(fhir: FhirEnv) -> None:
    b2 = expect(fhir, lambda e: e.kiosk_id == "kiosk_b.2")
    device_id = mapping.encode_id("kiosk_b.2")
    assert device_id == "kiosk.-b..2"
    assert search(fhir, device=device_id) == b2
    assert search(fhir, device=f"Device/{device_id}") == b2
    assert search(fhir, device=f"{device_id},kiosk-a") == expect(fhir, bool)
    assert search(fhir, device="kiosk-zz") == []


@pytest.mark.parametrize(
    ("token", "metrics"),
    [
        ("8867-4", {Metric.HEART_RATE}),
        ("http://loinc.org|8867-4", {Metric.HEART_RATE}),
        ("http://loinc.org|9279-1", {Metric.RESPIRATORY_RATE}),
        ("http://loinc.org|2708-6", {Metric.SPO2}),
        ("http://loinc.org|59408-5", {Metric.SPO2}),
        ("http://loinc.org|80404-7", {Metric.HRV_SDNN}),
        (f"{mapping.METRIC_SYSTEM}|hrv_rmssd", {Metric.HRV_RMSSD}),
        ("stress_index", {Metric.STRESS_INDEX}),
        ("8867-4,stress_index", {Metric.HEART_RATE, Metric.STRESS_INDEX}),
        (
            "http://loinc.org|",
            {
                Metric.HEART_RATE,
                Metric.RESPIRATORY_RATE,
                Metric.SPO2,
                Metric.HRV_SDNN,
            },
        ),
        ("|8867-4", set()),  # explicitly no system
        ("http://snomed.info/sct|8867-4", set()),
        ("0000-0", set()),
    ],
)
def test_code(fhir: FhirEnv, token: str, metrics: set[Metric]) -> None:
    assert search(fhir, code=token) == expect(fhir, lambda e: e.metric in metrics)


def test_code_repeated_is_and(fhir: FhirEnv) -> None:
    found = fhir.ok(
        "/Observation",
        [("code", "8867-4,9279-1"), ("code", "9279-1"), ("_count", "200")],
    )
    assert sorted(keys(found)) == expect(
        fhir, lambda e: e.metric is Metric.RESPIRATORY_RATE
    )


@pytest.mark.parametrize(
    ("token", "matches"),
    [
        ("vital-signs", True),
        (
            "http://terminology.hl7.org/CodeSystem/observation-category|vital-signs",
            True,
        ),
        ("http://terminology.hl7.org/CodeSystem/observation-category|", True),
        ("laboratory", False),
        ("laboratory,vital-signs", True),
        ("http://example.org|vital-signs", False),
    ],
)
def test_category(fhir: FhirEnv, token: str, matches: bool) -> None:
    assert search(fhir, category=token) == (expect(fhir, bool) if matches else [])


def test_identifier(fhir: FhirEnv) -> None:
    assert search(fhir, identifier="urn:kiosk-vitals:reading|kiosk-a:3") == [
        "kiosk-a:3"
    ]
    assert search(fhir, identifier="kiosk_b.2:1,kiosk-a:2") == sorted(
        ["kiosk_b.2:1", "kiosk-a:2"]
    )
    assert search(fhir, identifier="urn:other|kiosk-a:3") == []
    assert search(fhir, identifier="kiosk-a") == []


def in_range(start: datetime, end: datetime) -> Any:
    return lambda e: start <= e.measured_at < end


@pytest.mark.parametrize(
    ("value", "count"),
    [
        # Hand-computed: 18 readings per scan on days 2, 3, 4, 5 (Nov 2-5) and two
        # loose readings on Nov 6.
        ("2026-11-03", 18),
        ("eq2026-11-03", 18),
        ("ne2026-11-03", 56),
        ("gt2026-11-03", 38),
        ("ge2026-11-03", 56),
        ("lt2026-11-03", 18),
        ("le2026-11-03", 36),
        ("2026-11", 74),
        ("2026", 74),
        ("ne2026", 0),
        ("gt2026-10", 74),
        ("lt2026-11-02T08:00:10Z", 6),  # seconds 0-5: scan s1's first round
        ("2026-11-02T08:00:10Z", 1),
        ("2026-11-02T08:00:10.000Z", 1),
        ("2026-11-02T09:00+01:00", 18),  # the first minute of s1, in UTC+1
        ("le2026-11-02T08:00:10Z", 7),
        ("gt2026-11-02T08:00:10Z", 11 + 56),
        ("ge2026-11-06T08:00:01Z", 1),
    ],
)
def test_date_prefixes(fhir: FhirEnv, value: str, count: int) -> None:
    assert len(search(fhir, date=value)) == count


def test_date_range_by_repetition(fhir: FhirEnv) -> None:
    found = fhir.ok(
        "/Observation",
        [("date", "ge2026-11-03"), ("date", "lt2026-11-05"), ("_count", "200")],
    )
    start = T0.replace(hour=0) + timedelta(days=1)
    assert sorted(keys(found)) == expect(
        fhir, in_range(start, start + timedelta(days=2))
    )


def test_last_updated(fhir: FhirEnv) -> None:
    yesterday = (datetime.now(UTC) - timedelta(days=1)).date().isoformat()
    assert len(search(fhir, _lastUpdated=f"gt{yesterday}")) == 74
    assert search(fhir, _lastUpdated="lt2020") == []


def test_combined_filters(fhir: FhirEnv) -> None:
    found = search(
        fhir,
        patient="p-1",
        code="http://loinc.org|8867-4",
        category="vital-signs",
        date="ge2026-11-04",
        device=mapping.encode_id("kiosk_b.2"),
    )
    assert found == expect(
        fhir,
        lambda e: (
            e.patient_ref == "p-1"
            and e.metric is Metric.HEART_RATE
            and e.measured_at >= T0.replace(hour=0) + timedelta(days=2)
            and e.kiosk_id == "kiosk_b.2"
        ),
    )
    assert len(found) == 3


@pytest.mark.parametrize("sort", [None, "date", "-date"])
@pytest.mark.parametrize("params", [{}, {"patient": "p-1"}, {"code": "8867-4"}])
def test_paging_through_next_links_yields_the_full_set(
    fhir: FhirEnv, sort: str | None, params: dict[str, str]
) -> None:
    query = {**params, "_count": "7"}
    if sort:
        query["_sort"] = sort
    everything = search(fhir, **params)

    collected: list[dict[str, Any]] = []
    url: str | None = "/Observation"
    first = True
    pages = 0
    while url is not None:
        bundle = fhir.ok(url, query if first else None)
        first = False
        pages += 1
        assert len(bundle["entry"]) <= 7
        collected.extend(e["resource"] for e in bundle["entry"])
        links = {link["relation"]: link["url"] for link in bundle["link"]}
        assert ("_cursor" in links["self"]) == (pages > 1)  # self: this very page
        url = links.get("next")
        assert pages <= len(everything) + 1, links
        if url is not None:
            assert url.startswith(fhir.base)
    found = [o["identifier"][0]["value"] for o in collected]
    assert len(found) == len(set(found))
    assert sorted(found) == everything
    assert pages == -(-len(everything) // 7)

    times = [(o["effectiveDateTime"], int(o["id"])) for o in collected]
    parsed = [(datetime.fromisoformat(t), i) for t, i in times]
    if sort == "date":
        assert parsed == sorted(parsed)
    elif sort == "-date":
        assert parsed == sorted(parsed, reverse=True)
    else:
        assert [i for _, i in parsed] == sorted(i for _, i in parsed)


def test_total_only_where_cheap_or_asked(fhir: FhirEnv) -> None:
    first = fhir.ok("/Observation", {"_count": "10"})
    assert "total" not in first
    counted = fhir.ok("/Observation", {"_count": "10", "_total": "accurate"})
    assert counted["total"] == ALL
    small = fhir.ok("/Observation", {"patient": "p-1", "code": "8867-4"})
    assert small["total"] == 6


def test_include_device_and_patient(fhir: FhirEnv) -> None:
    bundle = fhir.ok(
        "/Observation",
        [
            ("code", "8867-4"),
            ("_include", "Observation:device"),
            ("_include", "Observation:patient"),
            ("_count", "200"),
        ],
    )
    included = [e for e in bundle["entry"] if e["search"]["mode"] == "include"]
    by_type: dict[str, set[str]] = {}
    for e in included:
        r = e["resource"]
        by_type.setdefault(r["resourceType"], set()).add(r["id"])
        assert e["fullUrl"] == f"{fhir.base}/{r['resourceType']}/{r['id']}"
    assert by_type == {
        "Device": {"kiosk-a", "kiosk.-b..2"},
        "Patient": {"p-1", mapping.encode_id(HASHED_PATIENT)},
    }
    assert bundle["total"] == 13  # matches only, never the included

    # Every reference of a match resolves inside the bundle.
    present = {f"{t}/{i}" for t, ids in by_type.items() for i in ids}
    for e in bundle["entry"]:
        if e["search"]["mode"] == "match":
            assert e["resource"]["device"]["reference"] in present
            if "subject" in e["resource"]:
                assert e["resource"]["subject"]["reference"] in present


def test_include_patient_only_on_a_page_without_patients(fhir: FhirEnv) -> None:
    bundle = fhir.ok(
        "/Observation",
        {"identifier": "kiosk-a:0,kiosk-a:75", "_include": "Observation:patient"},
    )
    assert [e["search"]["mode"] for e in bundle["entry"]] == []
    loose = [e.key for e in fhir.readings if e.scan_id is None]
    bundle = fhir.ok(
        "/Observation",
        {"identifier": ",".join(loose), "_include": "Observation:device"},
    )
    modes = sorted(e["search"]["mode"] for e in bundle["entry"])
    assert modes == ["include", "match", "match"]


def test_post_search_matches_get(fhir: FhirEnv) -> None:
    response = fhir.client.post(
        "/Observation/_search",
        content="patient=p-1&code=8867-4",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 200
    assert sorted(keys(response.json())) == search(fhir, patient="p-1", code="8867-4")
    bad = fhir.client.post("/Observation/_search", json={"patient": "p-1"})
    assert bad.status_code == 415
    assert bad.json()["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize(
    ("params", "issue"),
    [
        ({"colour": "red"}, "unknown search parameter 'colour'"),
        ({"code:text": "heart"}, "modifier on 'code' is not supported"),
        ({"date": "2026-13-01"}, "invalid date '2026-13-01'"),
        ({"date": "yesterday"}, "invalid date"),
        ({"date": "sa2026"}, "unsupported date prefix 'sa'"),
        ({"_count": "abc"}, "_count must be a positive integer"),
        ({"_count": "0"}, "_count must be a positive integer"),
        ({"_count": "-5"}, "_count must be a positive integer"),
        ({"_sort": "value"}, "_sort must be one of"),
        ({"_include": "Observation:encounter"}, "unsupported _include"),
        ({"_cursor": "garbage!"}, "invalid _cursor"),
        ({"patient": ""}, "empty value"),
        ({"patient": "Patient/a b"}, "invalid Patient id"),
        ({"_total": "maybe"}, "_total must be"),
    ],
)
def test_bad_parameters_are_400_operation_outcomes(
    fhir: FhirEnv, params: dict[str, str], issue: str
) -> None:
    body = fhir.error("/Observation", 400, params)
    assert body["issue"][0]["severity"] == "error"
    assert issue in body["issue"][0]["diagnostics"]


def test_lenient_handling_ignores_unknown_parameters(fhir: FhirEnv) -> None:
    bundle = fhir.ok(
        "/Observation",
        {"colour": "red", "code": "8867-4", "_count": "200"},
        prefer="handling=lenient",
    )
    assert len(bundle["entry"]) == 13
    self_link = bundle["link"][0]["url"]
    assert "colour" not in self_link  # self shows what was applied
    fhir.error("/Observation", 400, {"date": "bad"})  # values are still checked


def test_count_is_capped(fhir: FhirEnv) -> None:
    bundle = fhir.ok("/Observation", {"_count": "100000"})
    assert len(bundle["entry"]) == ALL  # 74 < 200: capped, not refused


def test_cursor_from_another_sort_is_refused(fhir: FhirEnv) -> None:
    bundle = fhir.ok("/Observation", {"_count": "5", "_sort": "date"})
    next_url = next(x["url"] for x in bundle["link"] if x["relation"] == "next")
    fhir.error(next_url.replace("_sort=date", "_sort=-date"), 400)


def test_content_negotiation(fhir: FhirEnv) -> None:
    for accept in ("application/fhir+json", "application/json", "*/*"):
        response = fhir.client.get("/Observation", headers={"accept": accept})
        assert response.status_code == 200
    response = fhir.client.get("/Observation", headers={"accept": "application/xml"})
    assert response.status_code == 406
    assert response.headers["content-type"].startswith("application/fhir+json")
    assert response.json()["resourceType"] == "OperationOutcome"
    fhir.error("/Observation", 406, {"_format": "xml"})
    fhir.ok("/Observation", {"_format": "json", "_count": "1"})


def test_unknown_types_methods_and_no_fastapi_422(fhir: FhirEnv) -> None:
    assert fhir.error("/Encounter", 404)["issue"][0]["code"] == "not-found"
    assert fhir.error("/Observation/1/_history", 404)
    deleted = fhir.client.delete("/Observation/1")
    assert deleted.status_code == 405
    assert deleted.json()["resourceType"] == "OperationOutcome"
    put = fhir.client.put("/Patient/p-1", json={"resourceType": "Patient"})
    assert put.status_code == 405
