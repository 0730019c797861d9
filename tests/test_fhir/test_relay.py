"""The outbound FHIR relay against a real FHIR transaction endpoint with faults.

The endpoint is a small HTTP server in a thread: it validates each transaction
Bundle with fhir.resources, emulates conditional create (``ifNoneExist`` on the
identifier: 201 for new, 200 for a match), resolves ``urn:uuid`` and conditional
Patient references, and injects timeouts, 500s, a 412, a 429 with Retry-After and
connection refusal (the server down, then up again) on demand.
"""

from __future__ import annotations

import base64
import email.utils
import itertools
import json
import re
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import (
    BrokerEndpoint,
    ServerThread,
    bridge_settings,
    embedded_amqtt,
    wait_for,
)

from api.fhir import mapping
from api.fhir.relay import (
    RelayScan,
    backoff_seconds,
    build_transaction,
    classify,
    parse_retry_after,
)
from bridge.broker import free_port
from bridge.config import RelaySettings
from bridge.store import Batch, Store
from bridge.store.db import StoredReading
from vitals_contract import METRICS, Metric, Reading, ScanEvent, ScanState

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
PATIENT = "MRN-SECRET-0042"  # must never show in stored errors
PATIENT_ID = f"{mapping.PATIENT_SYSTEM}|{PATIENT}"
CLIENT_TIMEOUT_SECONDS = 0.5


# -- the test FHIR server -------------------------------------------------------


@dataclass
class Seen:
    """One transaction request as the endpoint saw it."""

    at: float
    fault: str | None
    observations: list[str]
    authorization: str | None


@dataclass
class FhirEndpoint:
    """State of the fake FHIR server, shared across its restarts."""

    port: int = field(default_factory=free_port)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stored: dict[tuple[str, str], str] = field(default_factory=dict)
    creates: Counter[str] = field(default_factory=Counter)
    subjects: dict[str, str] = field(default_factory=dict)
    requests: list[Seen] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)
    faults: deque[str] = field(default_factory=deque)
    always: str | None = None
    delay_seconds: float = 0.0
    patients: dict[str, str] = field(default_factory=lambda: {PATIENT_ID: "Patient/7"})
    # OAuth2: when set, the endpoint wants this bearer; the token route issues it.
    client: tuple[str, str] | None = None
    token: str | None = None
    tokens_issued: int = 0
    _server: ThreadingHTTPServer | None = None
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    def start(self) -> None:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path == "/token":
                    endpoint.answer_token(self, body)
                else:
                    endpoint.answer_transaction(self, body)

        class Server(ThreadingHTTPServer):
            request_queue_size = 128  # a full batch connects at once
            daemon_threads = True

        server = Server(("127.0.0.1", self.port), Handler)
        self._server = server
        threading.Thread(
            target=server.serve_forever, name="fake-fhir", daemon=True
        ).start()

    def stop(self) -> None:
        """Stop listening: connections are refused until the next start."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # -- answers -------------------------------------------------------------

    def answer_token(self, h: BaseHTTPRequestHandler, body: bytes) -> None:
        assert self.client is not None
        expected = base64.b64encode(f"{self.client[0]}:{self.client[1]}".encode())
        form = parse_qs(body.decode())
        if h.headers.get("Authorization") != f"Basic {expected.decode()}" or form.get(
            "grant_type"
        ) != ["client_credentials"]:
            self.send(h, 401, {"error": "invalid_client"}, "application/json")
            return
        with self.lock:
            self.token = uuid.uuid4().hex
            self.tokens_issued += 1
            token = self.token
        answer = {"access_token": token, "token_type": "Bearer", "expires_in": 3600}
        self.send(h, 200, answer, "application/json")

    def answer_transaction(self, h: BaseHTTPRequestHandler, raw: bytes) -> None:
        try:
            bundle = json.loads(raw)
            observations = [
                e["resource"]["identifier"][0]["value"]
                for e in bundle["entry"]
                if e["resource"]["resourceType"] == "Observation"
            ]
        except (ValueError, KeyError, TypeError) as exc:
            self.invalid.append(f"unreadable: {exc}")
            self.send(h, 400, outcome("structure", "unreadable"))
            return
        auth = h.headers.get("Authorization")
        with self.lock:
            fault = self.faults.popleft() if self.faults else self.always
            self.requests.append(Seen(time.monotonic(), fault, observations, auth))
        if self.delay_seconds:
            time.sleep(self.delay_seconds)

        if self.token is not None and auth != f"Bearer {self.token}":
            self.send(h, 401, outcome("login", "token required"))
        elif fault == "500":
            self.send(h, 500, outcome("exception", "database on fire"))
        elif fault == "429":
            self.send(h, 429, outcome("throttled", "slow down"), retry_after="1")
        elif fault == "412":
            # Like HAPI: the diagnostics echo the search, patient identifier included.
            text = f"Multiple resources match Patient?identifier={PATIENT_ID}"
            self.send(h, 412, outcome("duplicate", text))
        else:
            status, answer = self.transact(bundle)
            if fault == "timeout":
                time.sleep(CLIENT_TIMEOUT_SECONDS * 3)  # committed, answer lost
            self.send(h, status, answer)

    def transact(self, bundle: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Apply a transaction all-or-nothing; validate it first."""
        problem = self.validate(bundle)
        if problem:
            self.invalid.append(problem)
            return 400, outcome("invalid", problem)
        with self.lock:
            new: dict[tuple[str, str], str] = {}
            resolved: dict[str, str] = {}
            statuses = []
            for e in bundle["entry"]:
                kind = e["resource"]["resourceType"]
                token = parse_qs(e["request"]["ifNoneExist"])["identifier"][0]
                key = (kind, token)
                location = self.stored.get(key) or new.get(key)
                if location is None:
                    location = new[key] = f"{kind}/{next(self._ids)}"
                    statuses.append("201 Created")
                else:
                    statuses.append("200 OK")
                resolved[e["fullUrl"]] = location
            for e in bundle["entry"]:
                resource = e["resource"]
                if resource["resourceType"] != "Observation":
                    continue
                if resource["device"]["reference"] not in resolved:
                    return 400, outcome("invalid", "unresolved device reference")
                subject = resource.get("subject", {}).get("reference")
                if subject is not None:
                    split = urlsplit(subject)
                    patient = parse_qs(split.query).get("identifier", [""])[0]
                    if split.path != "Patient" or patient not in self.patients:
                        return 400, outcome("not-found", "no such patient")
                    key = resource["identifier"][0]["value"]
                    self.subjects[key] = self.patients[patient]
            for (kind, token), _location in new.items():
                if kind == "Observation":
                    self.creates[token.split("|", 1)[1]] += 1
            self.stored.update(new)
        entries = [
            {"response": {"status": s, "location": resolved[e["fullUrl"]]}}
            for s, e in zip(statuses, bundle["entry"], strict=True)
        ]
        return 200, {
            "resourceType": "Bundle",
            "type": "transaction-response",
            "entry": entries,
        }

    @staticmethod
    def validate(bundle: dict[str, Any]) -> str | None:
        """Return what is wrong with a transaction Bundle, or None."""
        try:
            mapping.to_model(bundle)
            for e in bundle["entry"]:
                mapping.to_model(e["resource"])
        except ValueError as exc:
            return f"invalid resource: {exc}"
        if bundle.get("type") != "transaction":
            return "not a transaction"
        full_urls = [e["fullUrl"] for e in bundle["entry"]]
        if len(set(full_urls)) != len(full_urls):
            return "duplicate fullUrl"
        for e in bundle["entry"]:
            resource, request = e["resource"], e["request"]
            if not e["fullUrl"].startswith("urn:uuid:") or "id" in resource:
                return "a create carries an id or no urn:uuid fullUrl"
            if (
                request["method"] != "POST"
                or request["url"] != resource["resourceType"]
            ):
                return "not a create of its resource"
            ident = resource["identifier"][0]
            token = parse_qs(request["ifNoneExist"]).get("identifier")
            if token != [f"{ident['system']}|{ident['value']}"]:
                return "ifNoneExist does not match the identifier"
        return None

    @staticmethod
    def send(
        h: BaseHTTPRequestHandler,
        status: int,
        body: dict[str, Any],
        media_type: str = "application/fhir+json",
        retry_after: str | None = None,
    ) -> None:
        data = json.dumps(body).encode()
        try:
            h.send_response(status)
            h.send_header("Content-Type", media_type)
            h.send_header("Content-Length", str(len(data)))
            if retry_after is not None:
                h.send_header("Retry-After", retry_after)
            h.end_headers()
            h.wfile.write(data)
        except OSError:
            pass  # the client gave up (timeout): its loss


def outcome(code: str, diagnostics: str) -> dict[str, Any]:
    return mapping.operation_outcome(code, diagnostics)


# -- data -------------------------------------------------------------------


@dataclass
class Scans:
    """Scans written to the store and the final reading identifiers expected."""

    finals: set[str] = field(default_factory=set)
    others: set[str] = field(default_factory=set)
    complete: int = 0
    seqs: dict[str, int] = field(default_factory=dict)

    def next_seq(self, kiosk_id: str) -> int:
        self.seqs[kiosk_id] = self.seqs.get(kiosk_id, -1) + 1
        return self.seqs[kiosk_id]

    def scan(
        self,
        kiosk_id: str,
        scan_id: str,
        *,
        patient_ref: str | None = None,
        end: ScanState = ScanState.COMPLETE,
    ) -> Batch:
        """One scan: two estimates per metric, then the final ones, then its end."""
        batch = Batch()
        start = T0 + timedelta(minutes=len(self.finals) + len(self.others))
        event = ScanEvent(
            kiosk_id=kiosk_id,
            seq=self.next_seq(kiosk_id),
            scan_id=scan_id,
            state=ScanState.SCANNING,
            at=start,
            patient_ref=patient_ref,
        )
        batch.events.append(event)
        for final in (False, False, True):
            for metric in Metric:
                info = METRICS[metric]
                seq = self.next_seq(kiosk_id)
                reading = Reading(
                    seq=seq,
                    scan_id=scan_id,
                    metric=metric,
                    value=info.min_value + 1,
                    unit=info.unit,
                    quality=0.9,
                    measured_at=start + timedelta(seconds=seq),
                    final=final,
                )
                batch.readings.append((kiosk_id, reading))
                key = f"{kiosk_id}:{seq}"
                sent = final and end is ScanState.COMPLETE
                (self.finals if sent else self.others).add(key)
        end_event = ScanEvent(
            kiosk_id=kiosk_id,
            seq=self.next_seq(kiosk_id),
            scan_id=scan_id,
            state=end,
            at=start + timedelta(seconds=30),
        )
        batch.events.append(end_event)
        self.complete += end is ScanState.COMPLETE
        return batch


def write(url: str, *batches: Batch) -> None:
    store = Store.from_url(url)
    try:
        for batch in batches:
            store.write_batch(batch)
    finally:
        store.close()


# -- fixtures -----------------------------------------------------------------


@pytest.fixture(scope="module")
def relay_broker() -> Iterator[BrokerEndpoint]:
    with embedded_amqtt() as broker:
        yield broker


@pytest.fixture
def endpoint() -> Iterator[FhirEndpoint]:
    fake = FhirEndpoint()
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()


def relay_api(
    broker: BrokerEndpoint, url: str, fake: FhirEndpoint, **relay: Any
) -> ServerThread:
    """Start the API on ``url`` with the relay sending to ``fake``."""
    options: dict[str, Any] = {
        "enabled": True,
        "base_url": fake.base,
        "connect_timeout_seconds": CLIENT_TIMEOUT_SECONDS,
        "request_timeout_seconds": CLIENT_TIMEOUT_SECONDS,
        "backoff_initial_seconds": 0.05,
        "backoff_max_seconds": 0.2,
        "poll_interval_seconds": 0.05,
        "batch_size": 4,
        **relay,
    }
    server = ServerThread(bridge_settings(broker, url, relay=options))
    server.start()
    return server


def delivered_by(server: ServerThread) -> float:
    """Read the relay's delivered counter from the server's /metrics."""
    with server.http() as client:
        text = client.get("/metrics").text
    found = re.search(
        r'^vitals_fhir_relay_attempts_total\{outcome="delivered"\} (\S+)$', text, re.M
    )
    return float(found.group(1)) if found else 0.0


def admin(server: ServerThread, *states: str) -> dict[str, Any]:
    with server.http() as client:
        response = client.get("/api/v1/admin/relay", params={"state": list(states)})
    assert response.status_code == 200, response.text
    page: dict[str, Any] = response.json()
    return page


def settled(server: ServerThread, expected: int) -> bool:
    counts = admin(server)["counts"]
    return bool(counts["delivered"] == expected and counts["pending"] == 0)


def assert_exactly_once(fake: FhirEndpoint, scans: Scans) -> None:
    assert not fake.invalid, fake.invalid
    assert set(fake.creates) == scans.finals
    assert set(fake.creates.values()) == {1}
    sent = {o for r in fake.requests for o in r.observations}
    assert not sent & scans.others, "an estimate or an aborted scan was sent"


# -- end to end -----------------------------------------------------------------


def test_every_scan_arrives_exactly_once_through_transient_faults(
    relay_broker: BrokerEndpoint, database_url: str, endpoint: FhirEndpoint
) -> None:
    scans = Scans()
    endpoint.stop()  # connection refused first
    server = relay_api(relay_broker, database_url, endpoint)
    try:
        write(
            database_url,
            *(scans.scan("kiosk-r1", f"s{n}") for n in range(4)),
            scans.scan("kiosk-r2", "s9", patient_ref=PATIENT),
            scans.scan("kiosk-r2", "aborted", end=ScanState.ABORTED),
        )
        assert wait_for(
            lambda: any(
                "connection failed" in (e["last_error"] or "")
                for e in admin(server)["items"]
            )
        )
        endpoint.faults.extend(["timeout", "500", "429", "500", "timeout"])
        endpoint.start()
        assert wait_for(lambda: settled(server, scans.complete), timeout=20)

        assert_exactly_once(endpoint, scans)
        assert [r.fault for r in endpoint.requests[:5]] == [
            "timeout",
            "500",
            "429",
            "500",
            "timeout",
        ]
        # A timed-out transaction was committed; its resend matched, created nothing.
        timed_out = endpoint.requests[0].observations
        resent = [r for r in endpoint.requests[1:] if r.observations == timed_out]
        assert resent
        # Retry-After: 1 held back the throttled scan for at least that long.
        throttled = endpoint.requests[2]
        again = next(
            r for r in endpoint.requests[3:] if r.observations == throttled.observations
        )
        assert again.at - throttled.at >= 0.95
        assert endpoint.subjects == {
            k: "Patient/7" for k in scans.finals if k.startswith("kiosk-r2")
        }
        page = admin(server, "delivered", "skipped")
        assert {e["state"] for e in page["items"]} == {"delivered"}
        assert all(e["observations"] == len(Metric) for e in page["items"])
        assert delivered_by(server) == scans.complete
        with server.http() as client:
            assert (
                'vitals_fhir_relay_queue{state="pending"} 0.0'
                in client.get("/metrics").text
            )
    finally:
        server.stop()


def test_a_412_fails_permanently_until_an_admin_retries(
    relay_broker: BrokerEndpoint, sqlite_url: str, endpoint: FhirEndpoint
) -> None:
    scans = Scans()
    endpoint.faults.append("412")
    server = relay_api(relay_broker, sqlite_url, endpoint)
    try:
        write(sqlite_url, scans.scan("kiosk-p", "s1", patient_ref=PATIENT))

        def failed() -> list[dict[str, Any]]:
            items: list[dict[str, Any]] = admin(server, "failed")["items"]
            return items

        assert wait_for(failed)
        [entry] = failed()
        assert entry["last_status"] == 412
        assert entry["attempts"] == 1
        assert "SECRET" not in json.dumps(entry)
        time.sleep(0.5)  # many poll intervals: a permanent failure is not retried
        assert len(endpoint.requests) == 1
        assert admin(server)["counts"]["failed"] == 1

        with server.http(("vitals.read",)) as reader:
            denied = reader.post(f"/api/v1/admin/relay/{entry['id']}/retry")
        assert denied.status_code == 403
        with server.http() as client:
            assert client.post("/api/v1/admin/relay/999999/retry").status_code == 404
            retried = client.post(f"/api/v1/admin/relay/{entry['id']}/retry")
            assert retried.status_code == 200, retried.text
            assert retried.json()["state"] == "pending"
            assert wait_for(lambda: settled(server, 1))
            again = client.post(f"/api/v1/admin/relay/{entry['id']}/retry")
            assert again.status_code == 409
            assert again.json()["error"]["code"] == "conflict"
        assert_exactly_once(endpoint, scans)
        assert set(endpoint.subjects.values()) == {"Patient/7"}
    finally:
        server.stop()


def test_transient_failures_become_permanent_after_max_attempts(
    relay_broker: BrokerEndpoint, sqlite_url: str, endpoint: FhirEndpoint
) -> None:
    scans = Scans()
    endpoint.always = "500"
    server = relay_api(relay_broker, sqlite_url, endpoint, max_attempts=3)
    try:
        write(sqlite_url, scans.scan("kiosk-m", "s1"))
        assert wait_for(lambda: admin(server, "failed")["items"])
        [entry] = admin(server, "failed")["items"]
        assert (entry["attempts"], entry["last_status"]) == (3, 500)
        assert len(endpoint.requests) == 3
    finally:
        server.stop()


def test_a_new_kiosks_first_scan_goes_alone(
    relay_broker: BrokerEndpoint, sqlite_url: str, endpoint: FhirEndpoint
) -> None:
    # Concurrent conditional creates of one new Device could create it twice.
    scans = Scans()
    together = Batch()
    for n in range(4):
        batch = scans.scan("kiosk-new", f"s{n}")
        together.readings += batch.readings
        together.events += batch.events
    endpoint.delay_seconds = 0.3
    server = relay_api(relay_broker, sqlite_url, endpoint, request_timeout_seconds=5.0)
    try:
        write(sqlite_url, together)
        assert wait_for(lambda: settled(server, 4))
    finally:
        server.stop()
    assert_exactly_once(endpoint, scans)
    first, *others = sorted(endpoint.requests, key=lambda r: r.at)
    assert all(r.at - first.at >= 0.3 for r in others)
    assert max(r.at for r in others) - min(r.at for r in others) < 0.3  # together
    assert sum(1 for kind, _ in endpoint.stored if kind == "Device") == 1


def test_the_queue_survives_an_api_restart(
    relay_broker: BrokerEndpoint, sqlite_url: str, endpoint: FhirEndpoint
) -> None:
    scans = Scans()
    endpoint.always = "500"
    slow = {"backoff_initial_seconds": 2.0, "backoff_max_seconds": 2.0}
    server = relay_api(relay_broker, sqlite_url, endpoint, **slow)
    try:
        write(sqlite_url, *(scans.scan("kiosk-q", f"s{n}") for n in range(3)))
        assert wait_for(
            lambda: (
                len(admin(server)["items"]) == 3
                and all(e["attempts"] == 1 for e in admin(server)["items"])
            )
        )
    finally:
        server.stop()  # mid-backoff: every entry waits ~1-2 s for its retry
    assert not endpoint.creates

    # A scan completed while no API ran is found by the watermark after the restart.
    write(sqlite_url, scans.scan("kiosk-q", "while-down"))
    endpoint.always = None
    server = relay_api(relay_broker, sqlite_url, endpoint, **slow)
    try:
        assert wait_for(lambda: settled(server, 4), timeout=15)
        assert_exactly_once(endpoint, scans)
    finally:
        server.stop()


def test_two_relays_on_one_postgres_never_send_a_scan_twice(
    relay_broker: BrokerEndpoint, postgres_url: str, endpoint: FhirEndpoint
) -> None:
    scans = Scans()
    endpoint.delay_seconds = 0.02  # widen the window a double claim would need
    # No timeouts on a busy test machine: a resend after one is no double claim.
    calm = {"request_timeout_seconds": 10.0}
    first = relay_api(relay_broker, postgres_url, endpoint, **calm)
    second = relay_api(relay_broker, postgres_url, endpoint, **calm)
    try:
        write(
            postgres_url,
            *(scans.scan(f"kiosk-{k}", f"s{n}") for k in "abc" for n in range(8)),
        )
        assert wait_for(lambda: settled(first, scans.complete), timeout=20)
        assert delivered_by(first) > 0
        assert delivered_by(second) > 0
    finally:
        first.stop()
        second.stop()
    assert_exactly_once(endpoint, scans)
    sent = Counter(o for r in endpoint.requests for o in r.observations)
    assert set(sent.values()) == {1}, "some scan was sent twice"
    assert len(endpoint.requests) == scans.complete


def test_a_scan_waits_for_its_final_readings(
    relay_broker: BrokerEndpoint, sqlite_url: str, endpoint: FhirEndpoint
) -> None:
    scans = Scans()
    batch = scans.scan("kiosk-w", "s1")
    early = Batch(events=[batch.events[-1]])  # the completion outran the readings
    late = Batch(readings=batch.readings, events=batch.events[:1])
    server = relay_api(relay_broker, sqlite_url, endpoint)
    try:
        write(sqlite_url, early)
        assert wait_for(lambda: admin(server)["counts"]["pending"] == 1)
        time.sleep(0.3)
        assert not endpoint.requests
        write(sqlite_url, late)
        assert wait_for(lambda: settled(server, 1))
        assert_exactly_once(endpoint, scans)
    finally:
        server.stop()


def test_client_credentials_token_is_fetched_once_and_renewed_on_401(
    relay_broker: BrokerEndpoint, sqlite_url: str, endpoint: FhirEndpoint
) -> None:
    scans = Scans()
    endpoint.client = ("relay-1", "s3cret-" + uuid.uuid4().hex)
    endpoint.token = "nobody-has-this"
    oauth = {
        "token_url": f"http://127.0.0.1:{endpoint.port}/token",
        "client_id": endpoint.client[0],
        "client_secret": endpoint.client[1],
    }
    server = relay_api(relay_broker, sqlite_url, endpoint, **oauth)
    try:
        write(sqlite_url, *(scans.scan("kiosk-o", f"s{n}") for n in range(3)))
        assert wait_for(lambda: settled(server, 3))
        assert endpoint.tokens_issued == 1
        endpoint.token = "revoked-" + uuid.uuid4().hex  # the server forgets it
        write(sqlite_url, scans.scan("kiosk-o", "s3"))
        assert wait_for(lambda: settled(server, 4))
        assert endpoint.tokens_issued == 2
        assert_exactly_once(endpoint, scans)
    finally:
        server.stop()


# -- pure parts -------------------------------------------------------------------


def stored(kiosk_id: str, seq: int, metric: Metric) -> StoredReading:
    info = METRICS[metric]
    return StoredReading(
        id=seq + 100,
        kiosk_id=kiosk_id,
        seq=seq,
        scan_id="s1",
        metric=metric.value,
        value=info.min_value + 1,
        unit=info.unit,
        quality=0.7,
        final=True,
        measured_at=T0,
        received_at=T0,
    )


@pytest.mark.parametrize("patient_ref", [None, "MRN 0042/x&y|z"])
def test_the_transaction_is_valid_r4_with_resolvable_references(
    patient_ref: str | None,
) -> None:
    kiosk = "k" + "_" * 40  # a hashed Device id on our side: irrelevant here
    readings = [stored(kiosk, n, m) for n, m in enumerate(Metric)]
    scan = RelayScan(kiosk, "s1", patient_ref, readings, "1.2.3")
    bundle = build_transaction(scan, "https://ehr.example/mrn")

    assert FhirEndpoint.validate(bundle) is None
    assert bundle == build_transaction(scan, "https://ehr.example/mrn")  # stable
    device, *observations = bundle["entry"]
    assert device["request"]["ifNoneExist"] == (
        f"identifier={mapping.KIOSK_SYSTEM}%7C{kiosk}"
    )
    assert device["resource"]["version"] == [{"value": "1.2.3"}]
    for e in observations:
        resource = e["resource"]
        assert resource["device"] == {"reference": device["fullUrl"]}
        assert "lastUpdated" not in resource.get("meta", {})
        subject = resource.get("subject", {}).get("reference")
        if patient_ref is None:
            assert subject is None
        else:
            query = parse_qs(urlsplit(subject).query)
            assert query == {"identifier": [f"https://ehr.example/mrn|{patient_ref}"]}


@given(st.text(min_size=1, max_size=128))
def test_conditional_references_carry_any_patient_ref_intact(patient_ref: str) -> None:
    scan = RelayScan(
        "kiosk-a", "s1", patient_ref, [stored("kiosk-a", 1, Metric.SPO2)], None
    )
    observation = build_transaction(scan, "https://ehr.example/mrn")["entry"][1]
    subject = urlsplit(observation["resource"]["subject"]["reference"])
    assert subject.path == "Patient"
    assert parse_qs(subject.query, strict_parsing=True) == {
        "identifier": [f"https://ehr.example/mrn|{patient_ref}"]
    }


def response(
    status: int, body: Any = None, headers: dict[str, str] | None = None
) -> httpx.Response:
    return httpx.Response(status, json=body, headers=headers)


def transaction_response(*statuses: str) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "transaction-response",
        "entry": [{"response": {"status": s}} for s in statuses],
    }


@pytest.mark.parametrize(
    ("answer", "kind"),
    [
        (response(200, transaction_response("201 Created", "200 OK")), "delivered"),
        (response(200, transaction_response("201 Created")), "failed"),
        (response(200, transaction_response("201 Created", "400 Bad")), "failed"),
        (response(200, {"resourceType": "OperationOutcome"}), "failed"),
        (response(408), "retry"),
        (response(429, headers={"Retry-After": "7"}), "retry"),
        (response(500), "retry"),
        (response(503), "retry"),
        (response(400), "failed"),
        (response(401), "failed"),
        (response(404), "failed"),
        (response(412, outcome("duplicate", PATIENT)), "failed"),
        (response(422), "failed"),
        (response(302), "failed"),
        # Malformed answers fail cleanly instead of raising.
        (response(200, {"type": "transaction-response", "entry": ["x", 1]}), "failed"),
        (response(200, {"type": "transaction-response", "entry": 5}), "failed"),
        (response(500, {"resourceType": "OperationOutcome", "issue": 5}), "retry"),
        (response(400, {"issue": [1, {"code": "invalid"}]}), "failed"),
    ],
)
def test_answers_are_classified(answer: httpx.Response, kind: str) -> None:
    result = classify(answer, 2, T0)
    assert result.kind == kind
    assert PATIENT not in (result.error or "")


def test_retry_after_of_a_429_is_kept() -> None:
    result = classify(response(429, headers={"Retry-After": "7"}), 2, T0)
    assert result.retry_after_seconds == 7.0


@given(st.integers(min_value=0, max_value=10**6))
def test_retry_after_seconds_parse(seconds: int) -> None:
    assert parse_retry_after(str(seconds), T0) == min(seconds, 3600)


@given(st.integers(min_value=0, max_value=3600))
def test_retry_after_http_dates_parse(seconds: int) -> None:
    when = email.utils.format_datetime(T0 + timedelta(seconds=seconds), usegmt=True)
    assert parse_retry_after(when, T0) == seconds


@given(st.text(max_size=40))
def test_retry_after_garbage_is_ignored_or_bounded(value: str) -> None:
    parsed = parse_retry_after(value, T0)
    assert parsed is None or 0 <= parsed <= 3600


@given(
    st.integers(min_value=1, max_value=10_000),
    st.floats(min_value=0.01, max_value=100),
    st.floats(min_value=0.01, max_value=10_000),
)
def test_backoff_doubles_within_its_cap_with_jitter(
    attempts: int, initial: float, cap: float
) -> None:
    settings = RelaySettings(backoff_initial_seconds=initial, backoff_max_seconds=cap)
    ceiling = min(cap, initial * 2.0 ** min(attempts - 1, 60))
    assert 0.5 * ceiling <= backoff_seconds(attempts, settings) <= ceiling


def test_settings_refuse_incomplete_relay_configurations() -> None:
    with pytest.raises(ValueError, match="base_url"):
        RelaySettings(enabled=True)
    with pytest.raises(ValueError, match="client_id"):
        RelaySettings(token_url="https://idp.example/token")
    with pytest.raises(ValueError, match="not both"):
        RelaySettings(
            token_url="https://idp.example/token",
            client_id="a",
            client_secret="b",  # type: ignore[arg-type]
            bearer_token="c",  # type: ignore[arg-type]
        )
