"""Outbound relay: each completed scan pushed to an external FHIR R4 server.

A worker in every API process that enables ``relay`` does three things per poll:

1. **Enqueue.** Completion events (``scan_events.state = 'complete'``) not yet in
   the ``fhir_relay`` table become ``pending`` entries, found by a watermark on
   ``scan_events.id`` (with a look-back window, because concurrent ingest commits
   make ids visible slightly out of order). Nothing depends on the ingest path.
2. **Claim.** Due pending entries get a lease with one conditional ``UPDATE``
   (``FOR UPDATE SKIP LOCKED`` on PostgreSQL): several processes on one database
   never send the same entry at once. An entry whose kiosk has not yet stored
   every message before the completion (its contiguous ``committed_through`` is
   below the event's seq: a final reading may still be on its way through another
   bridge) waits, up to ``settle_timeout_seconds``.
3. **Send.** One ``transaction`` Bundle per scan: the kiosk's Device and the scan's
   *final* Observations (the scan's result; the running estimates before it are
   not the EHR's business), each a conditional create (``ifNoneExist`` on its
   business identifier), so a retry after a lost response creates nothing twice.
   Observations point at the Device by its ``urn:uuid`` fullUrl, which the server
   resolves to the created or matched Device. A scan with a patient refers to it
   with the conditional reference ``Patient?identifier=<system>|<patient_ref>``:
   the EHR owns its patients, the relay never creates one; an unknown patient is a
   permanent failure an admin can retry once the EHR knows the patient.

Outcomes: a 2xx transaction-response whose entries are all 2xx -> ``delivered``;
408, 429, 5xx, timeouts and connection errors -> retried with capped exponential
backoff and jitter, never sooner than ``Retry-After``; 412 (an ``ifNoneExist``
matched several) and every other 4xx or malformed answer -> ``failed``, listed by
``GET /api/v1/admin/relay`` and sent again after ``POST .../{id}/retry``. A
complete scan without final readings is ``skipped``. Stored errors and logs carry
status codes and issue codes only, never the server's diagnostics (they may echo
patient identifiers) nor tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import os
import random
import socket
import ssl
import time
import uuid
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal
from urllib.parse import quote

import httpx
from fastapi import APIRouter, Depends, HTTPException, Query, Request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import BaseModel
from sqlalchemy import Engine, exists, func, literal, or_, select, update
from sqlalchemy.exc import SQLAlchemyError

from api.auth import ADMIN, Principal
from api.deps import BridgeDep
from api.fhir import mapping
from api.security import auditor, require
from bridge.config import RelaySettings
from bridge.errors import StoreError
from bridge.store.db import StoredReading, dialect_insert, reading_from_row, utc
from bridge.store.models import FhirRelayEntry, Kiosk, ReadingRow, Scan, ScanEventRow
from vitals_contract import ScanState

log = logging.getLogger(__name__)

PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"
SKIPPED = "skipped"
RelayState = Literal["pending", "delivered", "failed", "skipped"]

# Completion events up to this many ids behind the newest enqueued one are looked at
# again: a batch committed late by a slower bridge gets ids below ones already seen.
LOOKBACK_EVENT_IDS = 10_000
LEASE_MARGIN_SECONDS = 30.0
RETRY_AFTER_MAX_SECONDS = 3_600.0
TOKEN_EXPIRY_MARGIN_SECONDS = 30.0
TOKEN_DEFAULT_TTL_SECONDS = 300.0
ERROR_MAX_CHARS = 500
FHIR_JSON = "application/fhir+json"
RETRYABLE_STATUSES = frozenset({408, 429})
# fullUrls are name-based UUIDs: the same scan always yields the same Bundle.
_FULL_URL_NAMESPACE = uuid.UUID("6f0e5a52-1d6b-4c1e-9a53-3b8f0f5d7c21")

JsonDict = dict[str, Any]


class RelayError(Exception):
    """A delivery attempt failed before an answer could be classified."""


# -- the Bundle ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RelayScan:
    """What one transaction carries: a scan, its final readings and its kiosk."""

    kiosk_id: str
    scan_id: str
    patient_ref: str | None
    readings: Sequence[StoredReading]
    agent_version: str | None


def _search_token(system: str, value: str) -> str:
    """Render ``identifier=<system>|<value>`` with the value percent-encoded.

    R4 wants ``ifNoneExist`` as the query part only. Some HAPI versions wanted the
    ``Type?`` prefix for chained parameters (hapifhir/hapi-fhir#2842); a plain
    identifier token is not affected.
    """
    return "identifier=" + quote(f"{system}|{value}", safe=":/")


def _full_url(kind: str, key: str) -> str:
    return f"urn:uuid:{uuid.uuid5(_FULL_URL_NAMESPACE, f'{kind}/{key}')}"


def _for_create(resource: JsonDict) -> JsonDict:
    """Drop what the receiving server owns: our ids and lastUpdated."""
    out = {k: v for k, v in resource.items() if k != "id"}
    meta = {k: v for k, v in out.pop("meta", {}).items() if k != "lastUpdated"}
    if meta:
        out["meta"] = meta
    return out


def build_transaction(scan: RelayScan, patient_system: str) -> JsonDict:
    """Build the transaction Bundle of one scan: its Device and final Observations."""
    # TODO: a conditional create leaves an existing Device as it is, so a new agent
    # version never reaches the EHR; a conditional update would, at the cost of a
    # write per scan.
    device = _for_create(mapping.device(scan.kiosk_id, scan.agent_version, None))
    device_url = _full_url("Device", scan.kiosk_id)
    entries: list[JsonDict] = [
        {
            "fullUrl": device_url,
            "resource": device,
            "request": {
                "method": "POST",
                "url": "Device",
                "ifNoneExist": _search_token(mapping.KIOSK_SYSTEM, scan.kiosk_id),
            },
        }
    ]
    subject = (
        None
        if scan.patient_ref is None
        else f"Patient?{_search_token(patient_system, scan.patient_ref)}"
    )

    for reading in scan.readings:
        observation = _for_create(mapping.observation(reading, scan.patient_ref))
        observation["device"] = {"reference": device_url}
        if subject is not None:
            observation["subject"] = {"reference": subject}
        identifier = mapping.reading_identifier(reading.kiosk_id, reading.seq)
        entries.append(
            {
                "fullUrl": _full_url("Observation", identifier),
                "resource": observation,
                "request": {
                    "method": "POST",
                    "url": "Observation",
                    "ifNoneExist": _search_token(mapping.READING_SYSTEM, identifier),
                },
            }
        )
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


# -- outcomes -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one attempt ended: ``delivered``, ``retry`` or ``failed``."""

    kind: Literal["delivered", "retry", "failed"]
    status: int | None
    error: str | None = None
    retry_after_seconds: float | None = None


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Read a ``Retry-After`` header (seconds or HTTP-date) as seconds from ``now``."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return min(float(value), RETRY_AFTER_MAX_SECONDS)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return min(max((when - now).total_seconds(), 0.0), RETRY_AFTER_MAX_SECONDS)


def _issue_codes(response: httpx.Response) -> str:
    """Name the OperationOutcome issue codes of ``response``, never diagnostics."""
    try:
        body = response.json()
        issues = body.get("issue") if isinstance(body, dict) else None
        if not isinstance(issues, list):
            issues = []
        codes = sorted({str(i.get("code")) for i in issues if isinstance(i, dict)})
    except ValueError:
        return ""
    return f" (issues: {', '.join(codes)})" if codes else ""


def classify(response: httpx.Response, sent_entries: int, now: datetime) -> Outcome:
    """Classify the server's answer to one transaction."""
    status = response.status_code
    if 200 <= status < 300:
        return _check_transaction_response(response, sent_entries)
    error = f"HTTP {status}{_issue_codes(response)}"
    if status in RETRYABLE_STATUSES or status >= 500:
        wait = parse_retry_after(response.headers.get("Retry-After"), now)
        return Outcome("retry", status, error, wait)
    return Outcome("failed", status, error)


def _check_transaction_response(response: httpx.Response, sent: int) -> Outcome:
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        return Outcome("failed", status, f"HTTP {status} without a JSON body")
    if not isinstance(body, dict) or body.get("type") != "transaction-response":
        return Outcome(
            "failed", status, f"HTTP {status} without a transaction-response"
        )
    entries = body.get("entry") or []
    if not isinstance(entries, list):
        return Outcome("failed", status, f"HTTP {status} with a malformed entry list")
    if len(entries) != sent:
        return Outcome(
            "failed",
            status,
            f"transaction-response has {len(entries)} of {sent} entries",
        )
    for n, entry in enumerate(entries):
        answer = entry.get("response") if isinstance(entry, dict) else None
        entry_status = str(answer.get("status", "")) if isinstance(answer, dict) else ""
        if not entry_status.startswith("2"):
            return Outcome(
                "failed", status, f"entry {n} answered {entry_status[:40]!r}"
            )
    return Outcome("delivered", status)


def backoff_seconds(attempts: int, settings: RelaySettings) -> float:
    """Return the delay before retry number ``attempts``: doubling, capped, jittered."""
    exponent = min(max(attempts - 1, 0), 60)
    delay = min(
        settings.backoff_max_seconds, settings.backoff_initial_seconds * 2.0**exponent
    )
    return delay * random.uniform(0.5, 1.0)


# -- authentication -----------------------------------------------------------


class ClientCredentialsAuth(httpx.Auth):
    """OAuth2 client-credentials grant: fetch a token, reuse it, renew it on 401."""

    def __init__(self, settings: RelaySettings) -> None:
        assert settings.token_url is not None
        assert settings.client_id is not None
        assert settings.client_secret is not None
        self._token_url = settings.token_url
        self._client_id = settings.client_id
        self._secret = settings.client_secret
        self._scope = settings.scope
        self._token: str | None = None
        self._expires_at = 0.0
        self._lock = asyncio.Lock()

    def _token_request(self) -> httpx.Request:
        form = {"grant_type": "client_credentials"}
        if self._scope:
            form["scope"] = self._scope
        basic = httpx.BasicAuth(self._client_id, self._secret.get_secret_value())
        request = httpx.Request("POST", self._token_url, data=form)
        return next(basic.auth_flow(request))

    def _store(self, response: httpx.Response) -> None:
        if response.status_code != 200:
            raise RelayError(f"token endpoint answered HTTP {response.status_code}")
        try:
            body = response.json()
            token = str(body["access_token"])
            ttl = float(body.get("expires_in") or TOKEN_DEFAULT_TTL_SECONDS)
        except (ValueError, KeyError, TypeError) as exc:
            raise RelayError("token endpoint answered without access_token") from exc
        self._token = token
        self._expires_at = time.monotonic() + ttl - TOKEN_EXPIRY_MARGIN_SECONDS

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        """Attach a valid token; on a 401, renew it once and send again."""
        fresh = False
        async with self._lock:
            if self._token is None or time.monotonic() >= self._expires_at:
                token_response = yield self._token_request()
                await token_response.aread()
                self._store(token_response)
                fresh = True
        request.headers["Authorization"] = f"Bearer {self._token}"
        response = yield request
        if response.status_code == 401 and not fresh:
            async with self._lock:
                token_response = yield self._token_request()
                await token_response.aread()
                self._store(token_response)
            request.headers["Authorization"] = f"Bearer {self._token}"
            yield request


def make_client(settings: RelaySettings) -> httpx.AsyncClient:
    """Build the HTTP client of the relay: timeouts, TLS trust and authentication."""
    headers = {"Accept": FHIR_JSON}
    auth: httpx.Auth | None = None
    if settings.bearer_token is not None:
        headers["Authorization"] = f"Bearer {settings.bearer_token.get_secret_value()}"
    elif settings.token_url is not None:
        auth = ClientCredentialsAuth(settings)
    verify: ssl.SSLContext | bool = True
    if settings.ca_file is not None:
        verify = ssl.create_default_context(cafile=str(settings.ca_file))
    timeout = httpx.Timeout(
        settings.request_timeout_seconds, connect=settings.connect_timeout_seconds
    )
    return httpx.AsyncClient(
        headers=headers,
        auth=auth,
        timeout=timeout,
        verify=verify,
        follow_redirects=False,
    )


# -- the queue ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Claimed:
    """A pending entry this worker holds the lease of."""

    id: int
    kiosk_id: str
    scan_id: str
    event_seq: int
    attempts: int
    created_at: datetime


class RelayQueue:
    """The ``fhir_relay`` table: enqueue, claim, settle and list entries.

    Every write is one statement, so SQLite never has to upgrade a read snapshot to
    a write lock (which fails at once instead of waiting for a concurrent writer).
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._insert = dialect_insert(engine)

    def enqueue_completed(
        self, after_event_id: int, since: datetime | None, limit: int, now: datetime
    ) -> list[int]:
        """Add completed scans with ``scan_events.id > after_event_id``; return ids."""
        e = FhirRelayEntry
        queued = exists().where(
            e.kiosk_id == ScanEventRow.kiosk_id, e.scan_id == ScanEventRow.scan_id
        )
        found = (
            select(
                ScanEventRow.kiosk_id,
                ScanEventRow.scan_id,
                ScanEventRow.id,
                ScanEventRow.seq,
                literal(PENDING, e.state.type),
                literal(0, e.attempts.type),
                literal(now, e.created_at.type),
                literal(now, e.next_attempt_at.type),
            )
            .where(
                ScanEventRow.id > after_event_id,
                ScanEventRow.state == ScanState.COMPLETE.value,
                ~queued,
            )
            .order_by(ScanEventRow.id)
            .limit(limit)
        )
        if since is not None:
            found = found.where(ScanEventRow.at >= since)
        stmt = (
            self._insert(e)
            .from_select(
                [
                    "kiosk_id",
                    "scan_id",
                    "event_id",
                    "event_seq",
                    "state",
                    "attempts",
                    "created_at",
                    "next_attempt_at",
                ],
                found,
            )
            .on_conflict_do_nothing(index_elements=["kiosk_id", "scan_id"])
            .returning(e.event_id)
        )
        with self._begin("enqueue") as conn:
            return [int(row.event_id) for row in conn.execute(stmt)]

    # TODO: delivered entries stay for ever (one small row per scan) because the
    # watermark is their newest event_id; prune old ones with the retention purge
    # while keeping the newest.
    def head_event_id(self) -> int:
        """Return the newest completion event id enqueued so far (0 when none)."""
        with self._connect("watermark") as conn:
            value = conn.execute(select(func.max(FhirRelayEntry.event_id))).scalar()
        return int(value or 0)

    def claim(
        self, owner: str, now: datetime, lease_seconds: float, limit: int
    ) -> list[Claimed]:
        """Lease up to ``limit`` due pending entries to ``owner``."""
        # TODO: leases compare each process's own clock; take the database's clock
        # if hosts may drift by more than LEASE_MARGIN_SECONDS.
        e = FhirRelayEntry
        free = or_(e.lease_until.is_(None), e.lease_until < now)
        due = (
            select(e.id)
            .where(e.state == PENDING, e.next_attempt_at <= now, free)
            .order_by(e.next_attempt_at, e.id)
            .limit(limit)
        )
        if self.engine.dialect.name == "postgresql":
            due = due.with_for_update(skip_locked=True)
        stmt = (
            update(e)
            .where(e.id.in_(due.scalar_subquery()), e.state == PENDING, free)
            .values(
                lease_owner=owner, lease_until=now + timedelta(seconds=lease_seconds)
            )
            .returning(
                e.id, e.kiosk_id, e.scan_id, e.event_seq, e.attempts, e.created_at
            )
        )
        with self._begin("claim") as conn:
            rows = conn.execute(stmt).all()
        return [
            Claimed(
                r.id, r.kiosk_id, r.scan_id, r.event_seq, r.attempts, utc(r.created_at)
            )
            for r in sorted(rows, key=lambda r: r.id)
        ]

    def load(self, entry: Claimed) -> tuple[RelayScan, int]:
        """Return the scan to send and its kiosk's contiguous committed seq."""
        # TODO: readings the retention purge removed before delivery are missing
        # here (a scan may end up skipped); retention should wait for the relay.
        scan_q = select(Scan.patient_ref).where(
            Scan.kiosk_id == entry.kiosk_id, Scan.scan_id == entry.scan_id
        )
        kiosk_q = select(Kiosk.committed_through, Kiosk.agent_version).where(
            Kiosk.kiosk_id == entry.kiosk_id
        )
        readings_q = (
            select(ReadingRow.__table__)
            .where(
                ReadingRow.kiosk_id == entry.kiosk_id,
                ReadingRow.scan_id == entry.scan_id,
                ReadingRow.final.is_(True),
            )
            .order_by(ReadingRow.id)
        )
        with self._connect("load") as conn:
            patient_ref = conn.execute(scan_q).scalar()
            kiosk = conn.execute(kiosk_q).first()
            readings = [reading_from_row(r) for r in conn.execute(readings_q)]
        through = -1 if kiosk is None else int(kiosk.committed_through)
        scan = RelayScan(
            kiosk_id=entry.kiosk_id,
            scan_id=entry.scan_id,
            patient_ref=patient_ref,
            readings=readings,
            agent_version=None if kiosk is None else kiosk.agent_version,
        )
        return scan, through

    def settle(
        self, owner: str, results: Sequence[tuple[int, dict[str, Any]]]
    ) -> list[int]:
        """Write attempts' results and drop their leases in one transaction.

        Return the ids whose lease ``owner`` had lost (their results are dropped).
        """
        e = FhirRelayEntry
        lost: list[int] = []
        with self._begin("settle") as conn:
            for entry_id, values in results:
                stmt = (
                    update(e)
                    .where(e.id == entry_id, e.lease_owner == owner)
                    .values(lease_owner=None, lease_until=None, **values)
                )
                if not conn.execute(stmt).rowcount:
                    lost.append(entry_id)
        return lost

    def release(self, owner: str) -> int:
        """Drop every lease ``owner`` still holds (at shutdown)."""
        e = FhirRelayEntry
        stmt = (
            update(e)
            .where(e.lease_owner == owner)
            .values(lease_owner=None, lease_until=None)
        )
        with self._begin("release") as conn:
            return int(conn.execute(stmt).rowcount)

    def counts(self, states: Sequence[str] | None = None) -> dict[str, int]:
        """Count entries per state (only ``states`` when given)."""
        e = FhirRelayEntry
        query = select(e.state, func.count()).group_by(e.state)
        if states is not None:
            query = query.where(e.state.in_(states))
        with self._connect("count") as conn:
            found = {row[0]: int(row[1]) for row in conn.execute(query)}
        return {
            s: found.get(s, 0) for s in states or (PENDING, DELIVERED, FAILED, SKIPPED)
        }

    def entries(
        self, states: Sequence[str], after_id: int | None, limit: int
    ) -> list[FhirRelayEntry]:
        """Return entries in ``states`` in id order, after ``after_id``."""
        e = FhirRelayEntry
        query = select(e).where(e.state.in_(states)).order_by(e.id).limit(limit)
        if after_id is not None:
            query = query.where(e.id > after_id)
        with self._connect("list") as conn:
            return [_entry_from_row(r) for r in conn.execute(query)]

    def retry(self, entry_id: int, now: datetime) -> FhirRelayEntry | None:
        """Make a failed (or pending) entry due now, with its attempts reset."""
        e = FhirRelayEntry
        stmt = (
            update(e)
            .where(e.id == entry_id, e.state.in_((FAILED, PENDING)))
            .values(state=PENDING, next_attempt_at=now, attempts=0)
        )
        with self._begin("retry") as conn:
            conn.execute(stmt)
            row = conn.execute(select(e).where(e.id == entry_id)).first()
        return None if row is None else _entry_from_row(row)

    @contextlib.contextmanager
    def _begin(self, what: str) -> Any:
        try:
            with self.engine.begin() as conn:
                yield conn
        except SQLAlchemyError as exc:
            raise StoreError(f"relay {what} failed: {type(exc).__name__}") from exc

    @contextlib.contextmanager
    def _connect(self, what: str) -> Any:
        try:
            with self.engine.connect() as conn:
                yield conn
        except SQLAlchemyError as exc:
            raise StoreError(f"relay {what} failed: {type(exc).__name__}") from exc


def _entry_from_row(row: Any) -> FhirRelayEntry:
    values = {c.key: getattr(row, c.key) for c in FhirRelayEntry.__table__.columns}
    return FhirRelayEntry(**values)


# -- the worker ---------------------------------------------------------------


class RelayMetrics:
    """Relay counters and gauges on the service's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.attempts = Counter(
            "vitals_fhir_relay_attempts",
            "Delivery attempts by outcome: delivered, retried, failed, skipped",
            ["outcome"],
            registry=r,
        )
        self.enqueued = Counter(
            "vitals_fhir_relay_enqueued",
            "Completed scans added to the queue",
            registry=r,
        )
        self.queue = Gauge(
            "vitals_fhir_relay_queue",
            "Entries waiting (pending) or failed",
            ["state"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "vitals_fhir_relay_request_seconds",
            "Duration of one transaction request",
            registry=r,
        )


class FhirRelay:
    """The relay worker of one API process."""

    def __init__(
        self, settings: RelaySettings, engine: Engine, registry: CollectorRegistry
    ) -> None:
        assert settings.base_url is not None
        self.settings = settings
        self.queue = RelayQueue(engine)
        self.metrics = RelayMetrics(registry)
        self.owner = f"{socket.gethostname()[:32]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._url = settings.base_url.rstrip("/")
        self._patient_system = (
            settings.patient_identifier_system or mapping.PATIENT_SYSTEM
        )
        self._lease_seconds = (
            2 * settings.request_timeout_seconds + LEASE_MARGIN_SECONDS
        )
        self._cursor = 0  # the first pass sweeps every completion event
        self._known_devices: set[str] = set()  # kiosks whose Device we delivered
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the worker task."""
        s = self.settings
        credentials = s.bearer_token is not None or s.token_url is not None
        if credentials and not self._url.startswith("https://"):
            log.warning("FHIR relay sends credentials to a plain-HTTP base_url")
        self._client = make_client(self.settings)
        self._task = asyncio.create_task(self._run(), name="fhir-relay[worker]")
        log.info("FHIR relay started as %s", self.owner)

    async def stop(self) -> None:
        """Stop the worker and hand back the leases it holds."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._client is not None:
            await self._client.aclose()
        try:
            released = await asyncio.to_thread(self.queue.release, self.owner)
        except StoreError as exc:
            log.warning("%s; leases expire by themselves", exc)
        else:
            if released:
                log.info("FHIR relay released %d leases", released)
        log.info("FHIR relay stopped")

    async def _run(self) -> None:
        while True:
            try:
                busy = await self.run_once()
            except StoreError as exc:
                log.warning("%s; will retry", exc)
                busy = False
            except Exception:
                log.exception("FHIR relay pass failed; will retry")
                busy = False
            if not busy:
                await asyncio.sleep(self.settings.poll_interval_seconds)

    async def run_once(self) -> bool:
        """Enqueue, claim and send one batch; tell whether there was work."""
        now = datetime.now(UTC)
        await self._enqueue(now)
        claimed = await asyncio.to_thread(
            self.queue.claim,
            self.owner,
            now,
            self._lease_seconds,
            self.settings.batch_size,
        )
        results = await self._deliver_in_waves(claimed)

        # One commit for the whole batch: on SQLite (synchronous=FULL) a commit
        # per scan would bound the relay to a few dozen scans a second.
        settled: list[tuple[int, dict[str, Any]]] = []
        for entry in claimed:
            result = results.get(entry.id, {})  # {}: not sent, just released
            # A failed entry keeps its lease until it runs out, then is taken again.
            if isinstance(result, StoreError):
                log.warning("scan %s/%s: %s", entry.kiosk_id, entry.scan_id, result)
            elif isinstance(result, BaseException):
                log.error(
                    "scan %s/%s: delivery crashed",
                    entry.kiosk_id,
                    entry.scan_id,
                    exc_info=result,
                )
            else:
                settled.append((entry.id, result))
        if settled:
            lost = await asyncio.to_thread(self.queue.settle, self.owner, settled)
            if lost:
                log.warning("relay leases lost before settling entries %s", lost)
        counts = await asyncio.to_thread(self.queue.counts, (PENDING, FAILED))
        for state, n in counts.items():
            self.metrics.queue.labels(state).set(n)
        return bool(claimed)

    async def _deliver_in_waves(
        self, claimed: Sequence[Claimed]
    ) -> dict[int, dict[str, Any] | BaseException]:
        """Send a kiosk's first scan alone, then the rest of the batch concurrently.

        Concurrent transactions that conditionally create the same new Device may
        both create it, and every later ``ifNoneExist`` on it would then match two
        (412). Once this process delivered a kiosk's Device, its scans go in
        parallel; a kiosk whose first scan failed waits for the next pass.
        """
        # TODO: two API processes can still race on a kiosk's very first Device;
        # servers that serialise conditional creates (HAPI's search-URL table) are
        # immune.
        first: dict[str, Claimed] = {}
        for entry in claimed:
            if entry.kiosk_id not in self._known_devices:
                first.setdefault(entry.kiosk_id, entry)
        results: dict[int, dict[str, Any] | BaseException] = {}
        wave: list[Claimed] = list(first.values())
        for final in (False, True):
            done = await asyncio.gather(
                *(self._deliver(e) for e in wave), return_exceptions=True
            )
            results.update(zip((e.id for e in wave), done, strict=True))
            if final:
                break
            wave = [
                e
                for e in claimed
                if e.id not in results and e.kiosk_id in self._known_devices
            ]
        return results

    async def _enqueue(self, now: datetime) -> None:
        limit = self.settings.batch_size * 10
        added = await asyncio.to_thread(
            self.queue.enqueue_completed, self._cursor, self.settings.since, limit, now
        )
        if added:
            self.metrics.enqueued.inc(len(added))
            log.debug("FHIR relay enqueued %d completed scans", len(added))
        if len(added) >= limit:
            self._cursor = max(added)
        else:
            head = await asyncio.to_thread(self.queue.head_event_id)
            self._cursor = max(0, head - LOOKBACK_EVENT_IDS)

    async def _deliver(self, entry: Claimed) -> dict[str, Any]:
        """Send one claimed scan; return the entry's new column values."""
        scan, through = await asyncio.to_thread(self.queue.load, entry)
        now = datetime.now(UTC)

        # The final readings precede the completion event in the kiosk's seq order:
        # wait until the kiosk's contiguous mark covers it, or until settled anyway.
        waited = (now - entry.created_at).total_seconds()
        if through < entry.event_seq and waited < self.settings.settle_timeout_seconds:
            retry_at = now + timedelta(seconds=self.settings.poll_interval_seconds)
            return {"next_attempt_at": retry_at}
        if not scan.readings:
            log.info(
                "scan %s/%s has no final readings; skipped",
                entry.kiosk_id,
                entry.scan_id,
            )
            self.metrics.attempts.labels("skipped").inc()
            return {"state": SKIPPED, "observations": 0}

        bundle = build_transaction(scan, self._patient_system)
        outcome = await self._send(bundle)
        return self._outcome_values(entry, outcome, len(scan.readings))

    async def _send(self, bundle: JsonDict) -> Outcome:
        """POST one transaction and classify what came back."""
        assert self._client is not None
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.settings.request_timeout_seconds):
                response = await self._client.post(
                    self._url, json=bundle, headers={"Content-Type": FHIR_JSON}
                )
        except (TimeoutError, httpx.TimeoutException):
            return Outcome("retry", None, "timeout")
        except httpx.TransportError as exc:
            return Outcome("retry", None, f"connection failed: {type(exc).__name__}")
        except RelayError as exc:
            return Outcome("retry", None, str(exc))
        finally:
            self.metrics.request_seconds.observe(time.perf_counter() - started)
        return classify(response, len(bundle["entry"]), datetime.now(UTC))

    def _outcome_values(
        self, entry: Claimed, outcome: Outcome, observations: int
    ) -> dict[str, Any]:
        """Count and log an attempt; return its columns (a retry's next time)."""
        now = datetime.now(UTC)
        attempts = entry.attempts + 1
        values: dict[str, Any] = {
            "attempts": attempts,
            "last_status": outcome.status,
            "last_error": outcome.error[:ERROR_MAX_CHARS] if outcome.error else None,
        }
        kind = outcome.kind
        limit = self.settings.max_attempts
        if kind == "retry" and limit is not None and attempts >= limit:
            kind = "failed"
        where = f"scan {entry.kiosk_id}/{entry.scan_id}"

        if kind == "delivered":
            values |= {
                "state": DELIVERED,
                "delivered_at": now,
                "observations": observations,
            }
            self.metrics.attempts.labels("delivered").inc()
            self._known_devices.add(entry.kiosk_id)
            log.debug(
                "%s delivered (%d observations, attempt %d)",
                where,
                observations,
                attempts,
            )
        elif kind == "retry":
            delay = backoff_seconds(attempts, self.settings)
            delay = max(delay, outcome.retry_after_seconds or 0.0)
            values["next_attempt_at"] = now + timedelta(seconds=delay)
            self.metrics.attempts.labels("retried").inc()
            log.warning(
                "%s attempt %d: %s; retry in %.2f s",
                where,
                attempts,
                outcome.error,
                delay,
            )
        else:
            values["state"] = FAILED
            self.metrics.attempts.labels("failed").inc()
            log.error("%s failed permanently: %s", where, outcome.error)
        return values


# -- admin endpoints ----------------------------------------------------------


class RelayEntryOut(BaseModel):
    """One relay queue entry, without patient data."""

    id: int
    kiosk_id: str
    scan_id: str
    state: str
    attempts: int
    created_at: datetime
    next_attempt_at: datetime
    last_status: int | None
    last_error: str | None
    observations: int | None
    delivered_at: datetime | None


class RelayPage(BaseModel):
    """Entries of the relay queue, counts per state and the next page's cursor."""

    counts: dict[str, int]
    items: list[RelayEntryOut]
    next_cursor: str | None


def _entry_out(e: FhirRelayEntry) -> RelayEntryOut:
    return RelayEntryOut(
        id=e.id,
        kiosk_id=e.kiosk_id,
        scan_id=e.scan_id,
        state=e.state,
        attempts=e.attempts,
        created_at=utc(e.created_at),
        next_attempt_at=utc(e.next_attempt_at),
        last_status=e.last_status,
        last_error=e.last_error,
        observations=e.observations,
        delivered_at=None if e.delivered_at is None else utc(e.delivered_at),
    )


admin_router = APIRouter(prefix="/api/v1/admin/relay", tags=["admin"])
AdminDep = Annotated[Principal, Depends(require(ADMIN))]


@admin_router.get("")
def list_relay(
    bridge: BridgeDep,
    _p: AdminDep,
    state: Annotated[
        list[RelayState] | None,
        Query(description="Repeat for several; default pending and failed."),
    ] = None,
    cursor: Annotated[str | None, Query(pattern=r"^\d{1,19}$")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> RelayPage:
    """List outbound FHIR relay entries with the counts per state."""
    queue = RelayQueue(bridge.store.engine)
    items = queue.entries(
        state or [PENDING, FAILED], int(cursor) if cursor else None, limit
    )
    counts = queue.counts()
    next_cursor = str(items[-1].id) if len(items) == limit else None
    return RelayPage(
        counts=counts, items=[_entry_out(e) for e in items], next_cursor=next_cursor
    )


@admin_router.post("/{entry_id}/retry")
def retry_relay(
    entry_id: int, request: Request, bridge: BridgeDep, principal: AdminDep
) -> RelayEntryOut:
    """Send a failed entry again now (a pending one becomes due now)."""
    queue = RelayQueue(bridge.store.engine)
    entry = queue.retry(entry_id, datetime.now(UTC))
    if entry is None:
        raise HTTPException(404, "no such relay entry")
    if entry.state != PENDING:
        raise HTTPException(409, f"entry is {entry.state}, not failed or pending")
    auditor(request).record(principal.subject, "relay-retry", f"fhir_relay:{entry_id}")
    return _entry_out(entry)
