"""Security rules, each with its denied and allowed case, on the real server."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from support import (
    BrokerEndpoint,
    ServerThread,
    bridge_settings,
)

from api.auth import hash_secret
from bridge.config import DEMO_JWT_SECRET, BridgeSettings

EHR_SECRET = "ehr-secret-for-tests"


@pytest.fixture
def server(amqtt_broker: BrokerEndpoint, sqlite_url: str) -> Iterator[ServerThread]:
    settings = bridge_settings(
        amqtt_broker,
        sqlite_url,
        limits={"requests_per_second": 5, "burst": 20, "max_body_bytes": 4096},
    )
    settings.auth.clients.append(_ehr_client())
    s = ServerThread(settings)
    s.start()
    yield s
    s.stop()


def _ehr_client() -> Any:
    from bridge.config import ApiClient

    return ApiClient(
        client_id="ehr-1",
        secret_hash=hash_secret(EHR_SECRET),
        scopes=["system/Observation.read", "system/Patient.read"],
    )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


PROTECTED = ["/api/v1/kiosks", "/api/v1/readings", "/api/v1/alerts", "/metrics"]


@pytest.mark.parametrize("path", PROTECTED)
def test_no_token_is_refused_with_a_challenge(server: ServerThread, path: str) -> None:
    response = httpx.get(server.base + path)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.json()["error"]["code"] == "invalid_token"


@pytest.mark.parametrize("path", ["/health", "/ready", "/", "/fhir/metadata"])
def test_open_endpoints_need_no_token(server: ServerThread, path: str) -> None:
    assert httpx.get(server.base + path).status_code in (200, 503)


def test_scopes_decide_who_may_do_what(server: ServerThread) -> None:
    reader = server.http(("vitals.read",))
    assert reader.get("/api/v1/kiosks").status_code == 200
    assert reader.get("/metrics").status_code == 403
    assert reader.post("/api/v1/alerts/1/ack").status_code == 403
    assert reader.get("/api/v1/audit").status_code == 403
    assert reader.get("/fhir/Observation").status_code == 403
    assert server.http(("vitals.metrics",)).get("/metrics").status_code == 200
    assert (
        server.http(("vitals.alerts.ack",)).post("/api/v1/alerts/1/ack").status_code
        == 404
    )
    assert server.http(("vitals.admin",)).get("/api/v1/audit").status_code == 200


def test_expired_tampered_and_foreign_tokens_are_refused(server: ServerThread) -> None:
    expired = server.token(("vitals.read",), ttl=1)
    time.sleep(1.1)
    response = httpx.get(server.base + "/api/v1/kiosks", headers=bearer(expired))
    assert response.status_code == 401
    assert response.json()["error"]["message"] == "token expired"

    good = server.token(("vitals.read",))
    head, body, sig = good.split(".")
    tampered = f"{head}.{body}.{sig[:-4]}AAAA"
    assert (
        httpx.get(server.base + "/api/v1/kiosks", headers=bearer(tampered)).status_code
        == 401
    )

    import jwt

    foreign = jwt.encode(
        {"sub": "x", "scope": "vitals.admin", "exp": time.time() + 60, "jti": "j"},
        "other-key-" * 4,
    )
    assert (
        httpx.get(server.base + "/api/v1/kiosks", headers=bearer(foreign)).status_code
        == 401
    )


def test_revoked_token_stops_working(server: ServerThread) -> None:
    victim = server.token(("vitals.read",))
    assert (
        httpx.get(server.base + "/api/v1/kiosks", headers=bearer(victim)).status_code
        == 200
    )
    reader = server.http(("vitals.read",))
    assert (
        reader.post("/api/v1/admin/revoke", json={"token": victim}).status_code == 403
    )
    admin = server.http(("vitals.admin",))
    assert admin.post("/api/v1/admin/revoke", json={"token": victim}).status_code == 200
    response = httpx.get(server.base + "/api/v1/kiosks", headers=bearer(victim))
    assert response.status_code == 401
    assert response.json()["error"]["message"] == "token revoked"


def test_client_credentials_grant(server: ServerThread) -> None:
    url = server.base + "/oauth/token"
    form = {"grant_type": "client_credentials", "client_id": "ehr-1"}
    assert httpx.post(url, data={**form, "client_secret": "wrong"}).status_code == 401
    assert (
        httpx.post(
            url, data={**form, "client_id": "nobody", "client_secret": EHR_SECRET}
        ).status_code
        == 401
    )
    escalate = httpx.post(
        url, data={**form, "client_secret": EHR_SECRET, "scope": "vitals.admin"}
    )
    assert escalate.json()["error"] == "invalid_scope"
    ok = httpx.post(
        url, auth=("ehr-1", EHR_SECRET), data={"grant_type": "client_credentials"}
    )
    assert ok.status_code == 200
    token = ok.json()["access_token"]
    assert ok.json()["scope"] == "system/Observation.read system/Patient.read"
    assert (
        httpx.get(server.base + "/fhir/Observation", headers=bearer(token)).status_code
        == 200
    )
    assert (
        httpx.get(server.base + "/api/v1/kiosks", headers=bearer(token)).status_code
        == 403
    )
    assert (
        httpx.get(server.base + "/fhir/Device", headers=bearer(token)).status_code
        == 403
    )


def test_oversize_body_is_refused_and_harms_nothing(server: ServerThread) -> None:
    admin = server.http(("vitals.admin",))
    big = admin.post(
        "/api/v1/admin/revoke",
        content=b"{" + b" " * 10_000 + b"}",
        headers={"Content-Type": "application/json"},
    )
    assert big.status_code == 413
    assert big.json()["error"]["code"] == "payload_too_large"
    assert admin.get("/api/v1/kiosks").status_code == 200


def test_rate_limit_per_client(server: ServerThread) -> None:
    greedy = server.http(("vitals.read",))
    codes = [greedy.get("/api/v1/kiosks").status_code for _ in range(40)]
    assert 429 in codes
    limited = greedy.get("/api/v1/kiosks")
    if limited.status_code == 429:
        assert int(limited.headers["retry-after"]) >= 1
    # Another client is not affected.
    other = httpx.Client(
        base_url=server.base,
        headers=bearer(server.app.state.tokens.issue("other", ["vitals.read"])),
    )
    assert other.get("/api/v1/kiosks").status_code == 200


def test_audit_records_reads_with_the_actor(server: ServerThread) -> None:
    server.http(("vitals.read",)).get("/api/v1/readings", params={"kiosk_id": "k9"})
    events = server.http(("vitals.admin",)).get("/api/v1/audit").json()
    assert any(
        e["actor"] == "test-user" and e["resource"].startswith("readings?kiosk_id=k9")
        for e in events
    )


def test_cors_is_closed_by_default(server: ServerThread) -> None:
    response = httpx.options(
        server.base + "/api/v1/kiosks",
        headers={
            "Origin": "https://evil.example",
            "Access-Control-Request-Method": "GET",
        },
    )
    assert "access-control-allow-origin" not in response.headers


def test_websocket_auth_at_handshake_refresh_and_expiry(server: ServerThread) -> None:
    from websockets.exceptions import ConnectionClosed

    with (
        server.ws(token="not-a-token") as ws,
        pytest.raises(ConnectionClosed) as closed,
    ):
        ws.recv(5)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 4401

    with (
        server.ws(("vitals.metrics",)) as ws,
        pytest.raises(ConnectionClosed) as closed,
    ):
        ws.recv(5)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 4403

    with server.ws(token=server.token(("vitals.read",), ttl=2)) as ws:
        assert ws.subprotocol == "vitals.v1"
        ws.send(json.dumps({"type": "subscribe"}))
        assert json.loads(ws.recv(5))["type"] == "subscribed"
        ws.send(
            json.dumps(
                {"type": "refresh", "token": server.token(("vitals.read",), ttl=3)}
            )
        )
        assert json.loads(ws.recv(5))["type"] == "refreshed"
        started = time.monotonic()
        assert close_code(ws) == 4401
        assert time.monotonic() - started > 1.5  # the refresh extended the session


def test_websocket_closes_when_its_token_is_revoked(server: ServerThread) -> None:

    token = server.token(("vitals.read",))
    with server.ws(token=token) as ws:
        ws.send(json.dumps({"type": "subscribe"}))
        assert json.loads(ws.recv(5))["type"] == "subscribed"
        server.http(("vitals.admin",)).post(
            "/api/v1/admin/revoke", json={"token": token}
        )
        assert close_code(ws) == 4401


def close_code(ws: Any, timeout: float = 15) -> int | None:
    """Read until the server closes; return its close code (None if data flows on)."""
    from websockets.exceptions import ConnectionClosed

    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ws.recv(timeout)
    except ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd else None
    return None


def test_default_secret_is_refused_outside_the_demo() -> None:
    with pytest.raises(ValueError, match="demo default"):
        BridgeSettings()
    with pytest.raises(ValueError, match="32"):
        BridgeSettings(auth={"jwt_secret": "short"})
    assert (
        BridgeSettings(environment="demo").auth.jwt_secret.get_secret_value()
        == DEMO_JWT_SECRET
    )


def test_audit_trail_as_fhir_auditevents_for_admins_only(server: ServerThread) -> None:
    from api.fhir.mapping import to_model

    server.http(("vitals.read",)).get("/api/v1/readings", params={"kiosk_id": "k7"})
    everything_fhir = server.http(("system/*.read",))
    assert everything_fhir.get("/fhir/AuditEvent").status_code == 403
    bundle = server.http(("vitals.admin",)).get(
        "/fhir/AuditEvent", params={"_count": 5}
    )
    assert bundle.status_code == 200
    assert bundle.headers["content-type"].startswith("application/fhir+json")
    to_model(bundle.json())
    events = [e["resource"] for e in bundle.json()["entry"]]
    for event in events:
        to_model(event)
    assert any(
        e["agent"][0]["who"]["display"] == "test-user"
        and e["entity"][0]["description"].startswith("readings?kiosk_id=k7")
        for e in events
    )
    bad = server.http(("vitals.admin",)).get("/fhir/AuditEvent", params={"_count": 0})
    assert bad.status_code == 400
    assert bad.json()["resourceType"] == "OperationOutcome"
