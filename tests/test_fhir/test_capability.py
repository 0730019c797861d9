"""The CapabilityStatement claims exactly what the router implements."""

from __future__ import annotations

import httpx
from starlette.routing import Route
from test_fhir.conftest import FhirEnv

from api.fhir import router, search
from api.fhir.routes import BULK_DATA_CAPABILITY, EXPORT_DEFINITION
from api.fhir.subscriptions import capability as subscriptions
from api.fhir.subscriptions.criteria import TOPIC_URL


def test_capability_statement_matches_the_implementation(fhir: FhirEnv) -> None:
    cs = fhir.ok("/metadata")
    assert cs["fhirVersion"] == "4.0.1"
    assert cs["kind"] == "instance"
    assert "application/fhir+json" in cs["format"]
    [rest] = cs["rest"]
    assert "interaction" not in rest  # no system-wide history, transaction, ...
    # Bulk Data: the system-level $export, as the IG's server statement asks.
    assert BULK_DATA_CAPABILITY in cs["instantiates"]
    operations = {op["name"]: op["definition"] for op in rest["operation"]}
    assert operations["export"] == EXPORT_DEFINITION
    resources = {r["type"]: r for r in rest["resource"]}
    assert set(resources) == {
        "Observation",
        "Device",
        "Patient",
        "AuditEvent",
        "Subscription",
    }
    # Subscriptions: the backport IG's R4 server statement, topic and websocket.
    assert subscriptions.INSTANTIATES in cs["instantiates"]
    [websocket] = rest["extension"]
    assert websocket["url"] == subscriptions.WEBSOCKET_EXTENSION
    assert websocket["valueUri"] == f"ws://127.0.0.1:{fhir.server.port}/fhir/ws"
    sub = resources.pop("Subscription")
    assert sub["extension"] == [
        {"url": subscriptions.TOPIC_EXTENSION, "valueCanonical": TOPIC_URL}
    ]
    assert [i["code"] for i in sub["interaction"]] == [
        "read",
        "create",
        "delete",
        "search-type",
    ]
    assert {op["name"]: op["definition"] for op in sub["operation"]} == (
        subscriptions.OPERATIONS
    )
    for name, r in resources.items():
        expected = ["search-type"] if name == "AuditEvent" else ["read", "search-type"]
        assert [i["code"] for i in r["interaction"]] == expected

    obs = resources["Observation"]
    assert {p["name"] for p in obs["searchParam"]} == set(search.OBSERVATION_PARAMS)
    assert obs["searchInclude"] == list(search.OBSERVATION_INCLUDES)
    assert [op["name"] for op in obs["operation"]] == ["lastn"]
    for name, kind in (
        ("Device", search.DEVICE_PARAMS),
        ("Patient", search.PATIENT_PARAMS),
    ):
        assert {p["name"] for p in resources[name]["searchParam"]} == set(kind)
        assert "operation" not in resources[name]


def test_every_route_is_declared_and_every_declared_param_works(fhir: FhirEnv) -> None:
    paths = {r.path for r in router.routes if isinstance(r, Route)}
    assert paths == {
        "/fhir/metadata",
        "/fhir/Observation",
        "/fhir/Observation/_search",
        "/fhir/Observation/$lastn",
        "/fhir/Observation/{resource_id}",
        "/fhir/Device",
        "/fhir/Device/{resource_id}",
        "/fhir/Patient",
        "/fhir/Patient/{resource_id}",
        "/fhir/AuditEvent",
        "/fhir/$export",
        "/fhir/$export-status/{job_id}",  # GET polls, DELETE cancels
        "/fhir/$export-file/{job_id}/{name}",
        "/fhir/Subscription",  # GET searches, POST creates
        "/fhir/Subscription/{sub_id}",  # GET reads, DELETE deletes
        "/fhir/Subscription/{sub_id}/$status",
        "/fhir/Subscription/{sub_id}/$events",  # GET and POST
        "/fhir/Subscription/{sub_id}/$get-ws-binding-token",
        "/fhir/{path:path}",  # the OperationOutcome 404/405 for everything else
    }
    samples = {
        "patient": "p-1",
        "subject": "Patient/p-1",
        "code": "8867-4",
        "category": "vital-signs",
        "date": "ge2026",
        "device": "kiosk-a",
        "identifier": "kiosk-a:1",
        "_lastUpdated": "ge2026",
        "status": "active",
    }
    cs = fhir.ok("/metadata")
    for resource in cs["rest"][0]["resource"]:
        for param in resource.get("searchParam", ()):
            value = samples[param["name"]]
            fhir.ok(f"/{resource['type']}", {param["name"]: value})
        for include in resource.get("searchInclude", ()):
            fhir.ok(f"/{resource['type']}", {"_include": include})


def test_metadata_needs_no_token(fhir: FhirEnv) -> None:
    response = httpx.get(f"{fhir.base}/metadata")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/fhir+json")


def test_requests_without_a_token_get_an_operation_outcome(fhir: FhirEnv) -> None:
    response = httpx.get(f"{fhir.base}/Observation")
    assert response.status_code == 401
    assert response.headers["content-type"].startswith("application/fhir+json")
    assert response.json()["resourceType"] == "OperationOutcome"
