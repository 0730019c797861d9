"""Topic-based Subscriptions (R4 backport) with the websocket channel, end to end.

One real server per database per module (uvicorn, amqtt, SQLite or PostgreSQL);
readings enter through the HTTP upload routes, the same commit-and-publish path
as MQTT ingest; a real websocket client binds with real binding tokens. Every
Subscription, Parameters and Bundle the server emits is validated with the
fhir.resources R4B models.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import BrokerEndpoint, ServerThread, bridge_settings, wait_for

from api.fhir import mapping
from api.fhir.subscriptions import criteria
from api.fhir.subscriptions.resources import Content
from api.fhir.subscriptions.store import Match, SubscriptionStore
from bridge.store.db import make_engine
from vitals_contract import METRICS, Metric

BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition"
OWNER_SCOPES = (
    "system/Subscription.read",
    "system/Subscription.write",
    "system/Observation.read",
    "vitals.ingest",
)
T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
RECV_TIMEOUT = 10.0


# -- validation helpers ----------------------------------------------------------


def fhir_model(resource: dict[str, Any]) -> Any:
    """Validate any resource we emit with its fhir.resources R4B model."""
    from fhir.resources.R4B.parameters import Parameters
    from fhir.resources.R4B.subscription import Subscription

    kind = resource["resourceType"]
    if kind == "Parameters":
        return Parameters.model_validate(resource)
    if kind == "Subscription":
        return Subscription.model_validate(resource)
    model = mapping.to_model(resource)
    for entry in resource.get("entry", ()):
        if "resource" in entry:
            fhir_model(entry["resource"])
    return model


def status_of(bundle: dict[str, Any]) -> dict[str, Any]:
    """Return the backport status Parameters of a notification as a dict."""
    first = bundle["entry"][0]
    params = first["resource"]
    assert params["resourceType"] == "Parameters"
    assert params["meta"]["profile"] == [f"{BACKPORT}/backport-subscription-status-r4"]
    out: dict[str, Any] = {"events": []}
    for p in params["parameter"]:
        if p["name"] == "notification-event":
            parts = {q["name"]: q for q in p["part"]}
            focus = parts.get("focus", {}).get("valueReference", {}).get("reference")
            out["events"].append((int(parts["event-number"]["valueString"]), focus))
        else:
            value = next(v for k, v in p.items() if k.startswith("value"))
            out[p["name"]] = value
    return out


@dataclass
class Env:
    """The server under test and how to talk to it."""

    server: ServerThread
    database: str

    def client(
        self,
        subject: str = "owner",
        scopes: tuple[str, ...] = OWNER_SCOPES,
        ttl: int | None = None,
    ) -> httpx.Client:
        token = self.server.app.state.tokens.issue(subject, list(scopes), ttl)
        return httpx.Client(
            base_url=self.server.base,
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.server.port}/fhir/ws"


def subscription_body(
    filters: list[str],
    content: str = "id-only",
    heartbeat: int | None = None,
    **changes: Any,
) -> dict[str, Any]:
    channel: dict[str, Any] = {
        "type": "websocket",
        "payload": "application/fhir+json",
        "_payload": {
            "extension": [
                {"url": f"{BACKPORT}/backport-payload-content", "valueCode": content}
            ]
        },
    }
    if heartbeat is not None:
        channel["extension"] = [
            {
                "url": f"{BACKPORT}/backport-heartbeat-period",
                "valueUnsignedInt": heartbeat,
            }
        ]
    body: dict[str, Any] = {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "test",
        "criteria": criteria.TOPIC_URL,
        "channel": channel,
    }
    if filters:
        body["_criteria"] = {
            "extension": [
                {"url": f"{BACKPORT}/backport-filter-criteria", "valueString": f}
                for f in filters
            ]
        }
    body.update(changes)
    return body


def create(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/fhir/Subscription", json=body)
    assert response.status_code == 201, response.text
    resource: dict[str, Any] = response.json()
    fhir_model(resource)
    assert response.headers["location"].endswith(f"/fhir/Subscription/{resource['id']}")
    return resource


def fhir_get(
    client: httpx.Client, url: str, expect: int = 200, **params: Any
) -> dict[str, Any]:
    response = client.get(url, params=params)
    assert response.status_code == expect, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    body: dict[str, Any] = response.json()
    fhir_model(body)
    return body


def binding_token(client: httpx.Client, sub_id: str) -> str:
    params = fhir_get(client, f"/fhir/Subscription/{sub_id}/$get-ws-binding-token")
    values = {
        p["name"]: next(v for k, v in p.items() if k.startswith("value"))
        for p in params["parameter"]
    }
    assert values["subscription"] == sub_id
    assert values["websocket-url"].endswith("/fhir/ws")
    assert datetime.fromisoformat(values["expiration"]) > datetime.now(UTC)
    token: str = values["token"]
    return token


def upload(
    client: httpx.Client, kiosk_id: str, seqs: range, metric: Metric = Metric.HEART_RATE
) -> None:
    info = METRICS[metric]
    items = [
        {
            "kiosk_id": kiosk_id,
            "seq": seq,
            "metric": metric.value,
            "value": info.min_value + 1,
            "unit": info.unit,
            "quality": 0.9,
            "measured_at": (T0 + timedelta(seconds=seq)).isoformat(),
        }
        for seq in seqs
    ]
    response = client.post("/api/v1/readings/batch", json=items)
    assert response.status_code == 200, response.text
    assert response.json()["stored"] == len(items)


def upload_scan(
    client: httpx.Client, kiosk_id: str, seq: int, patient: str, metrics: list[Metric]
) -> None:
    readings = []
    for i, metric in enumerate(metrics, start=1):
        info = METRICS[metric]
        readings.append(
            {
                "seq": seq + i,
                "metric": metric.value,
                "value": info.min_value + 1,
                "unit": info.unit,
                "quality": 0.8,
                "measured_at": T0.isoformat(),
            }
        )
    response = client.post(
        "/api/v1/scans",
        json={
            "kiosk_id": kiosk_id,
            "seq": seq,
            "scan_id": f"scan-{seq}",
            "completed_at": T0.isoformat(),
            "patient_ref": patient,
            "readings": readings,
        },
    )
    assert response.status_code == 200, response.text


def observation_keys(client: httpx.Client, refs: list[str | None]) -> list[str]:
    """Return the ``kiosk:seq`` identifiers of the Observations ``refs`` point at."""
    keys = []
    for ref in refs:
        assert ref is not None
        obs = fhir_get(client, ref)
        keys.append(obs["identifier"][0]["value"])
    return keys


def recv_bundle(ws: Any) -> dict[str, Any]:
    bundle: dict[str, Any] = json.loads(ws.recv(RECV_TIMEOUT))
    fhir_model(bundle)
    assert bundle["type"] == "history"
    return bundle


def bind(env: Env, token: str) -> Any:
    from websockets.sync.client import connect

    ws = connect(env.ws_url)
    ws.send(f"bind-with-token {token}")
    return ws


def events_of(client: httpx.Client, sub_id: str, **params: Any) -> dict[str, Any]:
    bundle = fhir_get(client, f"/fhir/Subscription/{sub_id}/$events", **params)
    assert bundle["type"] == "history"
    return bundle


def since_start(client: httpx.Client, sub_id: str) -> int:
    bundle = fhir_get(client, f"/fhir/Subscription/{sub_id}/$status")
    assert bundle["type"] == "searchset"
    return int(status_of(bundle)["events-since-subscription-start"])


# -- fixtures -----------------------------------------------------------------------


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def env(request: pytest.FixtureRequest, fhir_broker: BrokerEndpoint) -> Iterator[Env]:
    url: str = request.getfixturevalue(f"fhir_{request.param}_url")
    limits = {"requests_per_second": 1e6, "burst": 1_000_000}
    subs = {"reload_seconds": 0.5, "events_kept": 10}
    server = ServerThread(
        bridge_settings(fhir_broker, url, limits=limits, fhir_subscriptions=subs)
    )
    server.start()
    try:
        yield Env(server, request.param)
    finally:
        server.stop()


def kiosk() -> str:
    return f"k-{uuid.uuid4().hex[:8]}"


# -- the filter-criteria parser ----------------------------------------------------

_ids = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABC0123456789-.", min_size=1, max_size=20
).filter(lambda s: mapping.FHIR_ID_RE.match(s) is not None)
_id_sets = st.none() | st.frozensets(_ids, min_size=1, max_size=4)
_metric_sets = st.none() | st.frozensets(
    st.sampled_from([m.value for m in Metric]), min_size=1
)


@settings(max_examples=200, deadline=None)
@given(patients=_id_sets, metrics=_metric_sets, devices=_id_sets)
def test_filter_criteria_round_trip(
    patients: frozenset[str] | None,
    metrics: frozenset[str] | None,
    devices: frozenset[str] | None,
) -> None:
    f = criteria.Filter(patients=patients, metrics=metrics, devices=devices)
    assert criteria.parse_filter(criteria.render_filter(f)) == f


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.text(max_size=80)
        | st.from_regex(
            r"Observation\?[a-z]{1,8}=[^&]{0,20}(&[a-z]{1,8}=.{0,10})?", fullmatch=True
        ),
        max_size=3,
    )
)
def test_filter_criteria_parser_accepts_or_refuses_cleanly(texts: list[str]) -> None:
    # Anything else than FilterError escaping would fail the test.
    outcome: criteria.Filter | criteria.FilterError
    try:
        outcome = criteria.parse_filter(texts)
    except criteria.FilterError as exc:
        outcome = exc
    if isinstance(outcome, criteria.FilterError):
        assert str(outcome)
        return
    # What parses has one normal form, which parses back to the same filter.
    assert criteria.parse_filter(criteria.render_filter(outcome)) == outcome


def test_filter_criteria_semantics() -> None:
    f = criteria.parse_filter(
        [
            "Observation?patient=Patient/p-1,p-2&code=http://loinc.org|8867-4",
            "Observation?device=Device/kiosk-a",
        ]
    )
    assert f.matches("kiosk-a", "heart_rate", "p-2")
    assert not f.matches("kiosk-a", "heart_rate", None)
    assert not f.matches("kiosk-a", "spo2", "p-1")
    assert not f.matches("kiosk-b", "heart_rate", "p-1")
    for bad in (
        "Patient?name=x",
        "Observation?status=final",
        "Observation?code:not=8867-4",
        "Observation?code=http://loinc.org|0000-0",
        "Observation?patient=Device/x",
        "Observation?device=",
        "Observation?patient=p-1&patient=p-2",
    ):
        with pytest.raises(criteria.FilterError):
            criteria.parse_filter([bad])


# -- numbering across processes (store level, real databases) ----------------------


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_concurrent_numbering_never_repeats_or_skips(
    request: pytest.FixtureRequest, database: str
) -> None:
    from bridge.store.migrate import upgrade

    url: str = request.getfixturevalue(f"{database}_url")
    upgrade(url)
    store = SubscriptionStore(make_engine(url))
    other = SubscriptionStore(make_engine(url))  # a second process's pool
    from api.fhir.subscriptions.resources import SubscriptionRequest

    req = SubscriptionRequest([], Content.ID_ONLY, None, "t", None)
    store.create("s1", "owner", criteria.TOPIC_URL, req, T0, 10)
    # Both "processes" see the same 60 readings, in different batches and orders.
    matches = [Match("s1", "k", seq, seq, T0) for seq in range(60)]
    results: list[dict[str, list[tuple[Match, int]]]] = []
    lock = threading.Lock()

    def work(s: SubscriptionStore, chunks: list[list[Match]]) -> None:
        for chunk in chunks:
            out = s.append(chunk, keep=1_000)
            with lock:
                results.append(out)

    forward = [matches[i : i + 7] for i in range(0, 60, 7)]
    backward = [list(reversed(matches))[i : i + 5] for i in range(0, 60, 5)]
    threads = [
        threading.Thread(target=work, args=(store, forward)),
        threading.Thread(target=work, args=(other, backward)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)

    numbers: dict[int, int] = {}
    for out in results:
        for m, n in out.get("s1", []):
            assert numbers.setdefault(m.seq, n) == n  # both saw the same number
    assert sorted(numbers.values()) == list(range(1, 61))
    assert store.get("s1").events_since_start == 60  # type: ignore[union-attr]
    events, oldest = store.events("s1", 1, 60, 100, with_focus=False)
    assert [e.number for e in events] == list(range(1, 61))
    assert oldest == 1

    # Retention: keeping 10 purges the older ones; numbering goes on.
    store.append([Match("s1", "k", 99, 99, T0)], keep=10)
    events, oldest = store.events("s1", 1, 61, 100, with_focus=False)
    assert oldest == 52
    assert [e.number for e in events] == list(range(52, 62))
    store.engine.dispose()
    other.engine.dispose()


# -- HTTP: create, validate, own --------------------------------------------------------


def test_create_read_search_delete(env: Env) -> None:
    with env.client() as c:
        sub = create(
            c,
            subscription_body(
                ["Observation?device=Device/kiosk-a"], "full-resource", 30
            ),
        )
        assert sub["status"] == "requested"
        assert sub["meta"]["profile"] == [f"{BACKPORT}/backport-subscription"]
        assert (
            sub["channel"]["_payload"]["extension"][0]["valueCode"] == "full-resource"
        )
        assert fhir_get(c, f"/fhir/Subscription/{sub['id']}") == sub

        found = fhir_get(c, "/fhir/Subscription", status="requested")
        assert sub["id"] in {e["resource"]["id"] for e in found["entry"]}
        assert not fhir_get(c, "/fhir/Subscription", status="off")["entry"]

        status = status_of(fhir_get(c, f"/fhir/Subscription/{sub['id']}/$status"))
        assert status["type"] == "query-status"
        assert status["status"] == "requested"
        assert status["events-since-subscription-start"] == "0"

        assert c.delete(f"/fhir/Subscription/{sub['id']}").status_code == 204
        fhir_get(c, f"/fhir/Subscription/{sub['id']}", expect=404)


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (subscription_body([], criteria="http://example.org/topic/other"), 422),
        (subscription_body(["Observation?foo=bar"]), 422),
        (subscription_body(["Encounter?patient=Patient/1"]), 422),
        (subscription_body(["Observation?code=http://loinc.org|0000-0"]), 422),
        (subscription_body([], "everything"), 422),
        (subscription_body([], heartbeat=0), 422),
        (
            subscription_body(
                [],
                channel={
                    "type": "rest-hook",
                    "endpoint": "https://x.example",
                    "payload": "application/fhir+json",
                },
            ),
            422,
        ),
        (
            subscription_body(
                [], channel={"type": "websocket", "payload": "application/fhir+xml"}
            ),
            422,
        ),
        (subscription_body([], end="2020-01-01T00:00:00Z"), 422),
        (subscription_body([], status="bogus"), 400),
        ({"resourceType": "Patient"}, 400),
        ({k: v for k, v in subscription_body([]).items() if k != "reason"}, 400),
    ],
)
def test_bad_subscriptions_get_operation_outcomes(
    env: Env, body: dict[str, Any], status: int
) -> None:
    with env.client() as c:
        response = c.post("/fhir/Subscription", json=body)
        assert response.status_code == status, response.text
        outcome = response.json()
        mapping.to_model(outcome)
        assert outcome["resourceType"] == "OperationOutcome"
        response = c.post("/fhir/Subscription", content=b"{not json")
        assert response.status_code == 400


def test_scopes_and_ownership(env: Env) -> None:
    with env.client() as owner, env.client("intruder") as intruder:
        sub = create(owner, subscription_body([]))
        path = f"/fhir/Subscription/{sub['id']}"
        for url in (
            path,
            f"{path}/$status",
            f"{path}/$events",
            f"{path}/$get-ws-binding-token",
        ):
            fhir_get(intruder, url, expect=404)
        assert intruder.delete(path).status_code == 404
        assert sub["id"] not in {
            e["resource"]["id"]
            for e in fhir_get(intruder, "/fhir/Subscription")["entry"]
        }
        fhir_get(owner, path)  # still there
        owner.delete(path)

    read_only = ("system/Subscription.read", "system/Observation.read")
    with env.client() as owner, env.client(scopes=read_only) as c:
        assert (
            c.post("/fhir/Subscription", json=subscription_body([])).status_code == 403
        )
        # $events by POST only reads: the read scope is enough.
        sub = create(owner, subscription_body([]))
        response = c.post(
            f"/fhir/Subscription/{sub['id']}/$events",
            json={"resourceType": "Parameters", "parameter": []},
        )
        assert response.status_code == 200, response.text
        owner.delete(f"/fhir/Subscription/{sub['id']}")
    # Without Observation.read only empty notifications may be asked for.
    no_obs = ("system/Subscription.read", "system/Subscription.write")
    with env.client("blind", no_obs) as c:
        response = c.post("/fhir/Subscription", json=subscription_body([], "id-only"))
        assert response.status_code == 403
        assert response.json()["resourceType"] == "OperationOutcome"
        sub = create(c, subscription_body([], "empty"))
        c.delete(f"/fhir/Subscription/{sub['id']}")
        # Not even empty notifications about a named patient: they tell when.
        response = c.post(
            "/fhir/Subscription",
            json=subscription_body(["Observation?patient=Patient/p-1"], "empty"),
        )
        assert response.status_code == 403
        assert response.json()["resourceType"] == "OperationOutcome"

    # The owner's later token without Observation.read sees no Observation ids.
    k = kiosk()
    with env.client() as c, env.client(scopes=no_obs) as blind:
        sub = create(c, subscription_body([f"Observation?device=Device/{k}"]))
        upload(c, k, range(0, 1))
        assert wait_for(lambda: since_start(c, sub["id"]) == 1, 10)
        [(_, focus)] = status_of(events_of(c, sub["id"]))["events"]
        assert focus is not None
        bundle = events_of(blind, sub["id"], content="full-resource")
        assert status_of(bundle)["events"] == [(1, None)]
        assert len(bundle["entry"]) == 1
        # So does its socket: empty notifications (no topic, no focus).
        with bind(env, binding_token(blind, sub["id"])) as ws:
            assert "topic" not in status_of(recv_bundle(ws))
            upload(c, k, range(1, 2))
            assert status_of(recv_bundle(ws))["events"] == [(2, None)]
        c.delete(f"/fhir/Subscription/{sub['id']}")
        # A patient filter: that later token may not even bind.
        sub = create(c, subscription_body(["Observation?patient=Patient/p-1"]))
        token = blind.get(f"/fhir/Subscription/{sub['id']}/$get-ws-binding-token")
        assert token.status_code == 403
        c.delete(f"/fhir/Subscription/{sub['id']}")


# -- the websocket channel ---------------------------------------------------------------


def test_notifications_numbered_missed_and_resumed(env: Env) -> None:
    k = kiosk()
    with env.client() as c:
        sub = create(
            c, subscription_body([f"Observation?device=Device/{k}"], "full-resource")
        )
        sub_id = sub["id"]
        token = binding_token(c, sub_id)

        # Bind: a handshake first, reporting where numbering stands.
        with bind(env, token) as ws:
            hello = status_of(recv_bundle(ws))
            assert hello["type"] == "handshake"
            assert hello["events-since-subscription-start"] == "0"
            assert hello["subscription"]["reference"].endswith(
                f"/Subscription/{sub_id}"
            )

            upload(c, k, range(0, 3))
            upload(c, kiosk(), range(0, 2))  # another kiosk: filtered out
            got = []
            for _ in range(3):
                bundle = recv_bundle(ws)
                status = status_of(bundle)
                assert status["type"] == "event-notification"
                [(number, focus)] = status["events"]
                assert status["events-since-subscription-start"] == str(number)
                # full-resource: the Observation itself follows the status.
                assert bundle["entry"][1]["resource"]["resourceType"] == "Observation"
                assert bundle["entry"][1]["fullUrl"] == focus
                got.append((number, focus))
            assert [n for n, _ in got] == [1, 2, 3]
            assert observation_keys(c, [f for _, f in got]) == [
                f"{k}:{s}" for s in range(3)
            ]

        assert wait_for(
            lambda: (
                status_of(fhir_get(c, f"/fhir/Subscription/{sub_id}/$status"))["status"]
                == "active"
            ),
            5,
        )

        # Disconnected: two more events are numbered and logged, not lost.
        upload(c, k, range(3, 5))
        assert wait_for(lambda: since_start(c, sub_id) == 5, 10)
        missed = events_of(c, sub_id, eventsSinceNumber=4)
        status = status_of(missed)
        assert status["type"] == "query-event"
        assert [n for n, _ in status["events"]] == [4, 5]
        assert observation_keys(c, [f for _, f in status["events"]]) == [
            f"{k}:3",
            f"{k}:4",
        ]
        assert len(missed["entry"]) == 3  # status + two Observations
        window = status_of(
            events_of(
                c, sub_id, eventsSinceNumber=2, eventsUntilNumber=3, content="empty"
            )
        )
        assert window["events"] == [(2, None), (3, None)]
        assert "topic" not in window  # empty content names no topic
        assert [n for n, _ in status_of(events_of(c, sub_id))["events"]] == [
            1,
            2,
            3,
            4,
            5,
        ]

        # POST form of $events with a Parameters body.
        response = c.post(
            f"/fhir/Subscription/{sub_id}/$events",
            json={
                "resourceType": "Parameters",
                "parameter": [{"name": "eventsSinceNumber", "valueString": "5"}],
            },
        )
        assert response.status_code == 200, response.text
        fhir_model(response.json())
        assert [n for n, _ in status_of(response.json())["events"]] == [5]

        # The old token is spent; a new one resumes after 5, without gap or repeat.
        with bind(env, token) as ws:
            assert close_code(ws) == 4401
        with bind(env, binding_token(c, sub_id)) as ws:
            hello = status_of(recv_bundle(ws))
            assert hello["type"] == "handshake"
            assert hello["events-since-subscription-start"] == "5"
            upload(c, k, range(5, 7))
            numbers = [status_of(recv_bundle(ws))["events"][0][0] for _ in range(2)]
            assert numbers == [6, 7]

        bad = c.get(
            f"/fhir/Subscription/{sub_id}/$events",
            params={"eventsSinceNumber": "5", "eventsUntilNumber": "2"},
        )
        assert bad.status_code == 400
        assert (
            c.get(
                f"/fhir/Subscription/{sub_id}/$events", params={"content": "all"}
            ).status_code
            == 400
        )
        c.delete(f"/fhir/Subscription/{sub_id}")


def test_events_already_purged_are_reported(env: Env) -> None:
    k = kiosk()
    with env.client() as c:
        sub = create(c, subscription_body([f"Observation?device=Device/{k}"]))
        upload(c, k, range(0, 13))
        assert wait_for(lambda: since_start(c, sub["id"]) == 13, 10)
        # The server keeps the newest 10 (events_kept): 1..3 are gone.
        bundle = events_of(c, sub["id"], eventsSinceNumber=1, eventsUntilNumber=5)
        assert [n for n, _ in status_of(bundle)["events"]] == [4, 5]
        outcome = bundle["entry"][0]["response"]["outcome"]
        mapping.to_model(outcome)
        assert outcome["issue"][0]["severity"] == "warning"
        assert "1..3" in outcome["issue"][0]["diagnostics"]
        assert (
            "outcome"
            not in events_of(c, sub["id"], eventsSinceNumber=4)["entry"][0]["response"]
        )
        c.delete(f"/fhir/Subscription/{sub['id']}")


def test_filters_by_patient_code_and_device(env: Env) -> None:
    k1, k2 = kiosk(), kiosk()
    patient = f"p-{uuid.uuid4().hex[:6]}"
    with env.client() as c:
        by_patient = create(
            c, subscription_body([f"Observation?patient=Patient/{patient}"])
        )
        by_code = create(
            c,
            subscription_body(
                [f"Observation?code=http://loinc.org|8867-4&device={k1},{k2}"]
            ),
        )
        by_device = create(c, subscription_body([f"Observation?device=Device/{k2}"]))

        upload_scan(c, k1, 100, patient, [Metric.HEART_RATE, Metric.RESPIRATORY_RATE])
        upload(c, k1, range(0, 2), Metric.RESPIRATORY_RATE)
        upload(c, k2, range(0, 2), Metric.HEART_RATE)
        upload_scan(c, kiosk(), 100, "someone-else", [Metric.HEART_RATE])

        expected = {
            by_patient["id"]: [f"{k1}:101", f"{k1}:102"],
            by_code["id"]: [f"{k1}:101", f"{k2}:0", f"{k2}:1"],
            by_device["id"]: [f"{k2}:0", f"{k2}:1"],
        }
        for sub_id, keys in expected.items():
            count = len(keys)
            assert wait_for(lambda s=sub_id, n=count: since_start(c, s) == n, 10)
            status = status_of(events_of(c, sub_id))
            assert sorted(
                observation_keys(c, [f for _, f in status["events"]])
            ) == sorted(keys)
            assert [n for n, _ in status["events"]] == list(range(1, len(keys) + 1))
        time.sleep(1.0)  # nothing else trickles in later
        for sub_id, keys in expected.items():
            assert since_start(c, sub_id) == len(keys)
            c.delete(f"/fhir/Subscription/{sub_id}")


def test_heartbeats_arrive_at_the_period_until_access_ends(env: Env) -> None:
    # Three heartbeats take ~3 s after the handshake; the token's 7 s leave a loaded
    # CI machine room for the set-up (4 s did not, once).
    with env.client() as c, env.client(ttl=7) as short_lived:
        sub = create(
            c, subscription_body([f"Observation?device=Device/{kiosk()}"], heartbeat=1)
        )
        # The binding lives as long as the access token that asked for it.
        with bind(env, binding_token(short_lived, sub["id"])) as ws:
            assert status_of(recv_bundle(ws))["type"] == "handshake"
            times = []
            for _ in range(3):
                status = status_of(recv_bundle(ws))
                assert status["type"] == "heartbeat"
                assert status["events"] == []
                assert status["events-since-subscription-start"] == "0"
                times.append(time.monotonic())
            gaps = [b - a for a, b in itertools.pairwise(times)]
            assert all(0.7 <= g <= 2.0 for g in gaps), gaps
            assert close_code(ws) == 4401
        c.delete(f"/fhir/Subscription/{sub['id']}")


def close_code(ws: Any) -> int:
    """Read until the server closes the socket; return its close code."""
    from websockets.exceptions import ConnectionClosed

    deadline = time.monotonic() + RECV_TIMEOUT
    while time.monotonic() < deadline:
        try:
            ws.recv(RECV_TIMEOUT)
        except ConnectionClosed as exc:
            frame = exc.rcvd
            break
    else:
        raise AssertionError("the server did not close the socket")
    assert frame is not None, "closed without a close frame"
    return frame.code


def test_binding_token_misuse_is_refused(env: Env) -> None:
    from websockets.sync.client import connect

    with env.client() as c:
        sub = create(c, subscription_body([f"Observation?device=Device/{kiosk()}"]))
        with bind(env, "not-a-token") as ws:
            assert close_code(ws) == 4401
        # The access token itself is not a binding token.
        access = c.headers["authorization"].removeprefix("Bearer ")
        with bind(env, access) as ws:
            assert close_code(ws) == 4401
        with connect(env.ws_url) as ws:
            ws.send("hello")
            assert close_code(ws) == 4400

        # Expired: the server stores only the hash and the expiry; age the row.
        token = binding_token(c, sub["id"])
        engine = make_engine(env.server.app.state.bridge.settings.database_url)
        from sqlalchemy import update

        from bridge.store.models import FhirBindingToken

        with engine.begin() as conn:
            conn.execute(
                update(FhirBindingToken)
                .where(
                    FhirBindingToken.token_hash
                    == hashlib.sha256(token.encode()).hexdigest()
                )
                .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
            )
        engine.dispose()
        with bind(env, token) as ws:
            assert close_code(ws) == 4401

        # Deleting the Subscription closes its socket.
        with bind(env, binding_token(c, sub["id"])) as ws:
            assert status_of(recv_bundle(ws))["type"] == "handshake"
            assert c.delete(f"/fhir/Subscription/{sub['id']}").status_code == 204
            assert close_code(ws) == 4404


# -- several API processes behind one broker -------------------------------------------


def test_two_processes_number_once_and_the_socket_holder_sends(
    mosquitto_broker: BrokerEndpoint, database_url: str
) -> None:
    """Both processes see every reading (shared ingest, live topic) and log it.

    Then both stop, and a fresh process on the same database numbers on from
    where they left off.
    """

    def server() -> ServerThread:
        subs = {"reload_seconds": 0.5}
        return ServerThread(
            bridge_settings(mosquitto_broker, database_url, fhir_subscriptions=subs)
        )

    servers = [server(), server()]
    for s in servers:
        s.start()
    try:
        a, b = (Env(s, "shared") for s in servers)
        k = kiosk()
        with a.client() as ca, b.client() as cb:
            sub = create(ca, subscription_body([f"Observation?device=Device/{k}"]))
            # Created through A, bound through B (B learns of it on its reload).
            time.sleep(
                b.server.app.state.bridge.settings.fhir_subscriptions.reload_seconds
                * 2.5
            )
            with bind(b, binding_token(cb, sub["id"])) as ws:
                assert status_of(recv_bundle(ws))["type"] == "handshake"
                for start in range(0, 12, 3):
                    upload(ca, k, range(start, start + 3))
                numbers = [
                    status_of(recv_bundle(ws))["events"][0][0] for _ in range(12)
                ]
            assert numbers == list(range(1, 13))
            logged = status_of(events_of(ca, sub["id"]))["events"]
            assert [n for n, _ in logged] == list(range(1, 13))
            keys = observation_keys(ca, [f for _, f in logged])
            assert keys == [f"{k}:{seq}" for seq in range(12)]
            # Both numbered or confirmed the same events; neither made new ones.
            assert wait_for(
                lambda: all(
                    s.app.state.fhir_subscriptions.numbered >= 12 for s in servers
                ),
                5,
            )
    finally:
        for s in servers:
            s.stop()

    # A restart: numbers continue, never repeat.
    restarted = server()
    restarted.start()
    try:
        env = Env(restarted, "restarted")
        with env.client() as c, bind(env, binding_token(c, sub["id"])) as ws:
            hello = status_of(recv_bundle(ws))
            assert hello["events-since-subscription-start"] == "12"
            upload(c, k, range(12, 14))
            numbers = [status_of(recv_bundle(ws))["events"][0][0] for _ in range(2)]
            assert numbers == [13, 14]
    finally:
        restarted.stop()
