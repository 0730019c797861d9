"""REST endpoints: health, readiness, metrics, kiosks and readings history.

The GET resources answer with an ``ETag`` and honour ``If-None-Match``
(:mod:`api.etag`).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from api.auth import (
    ACK,
    ADMIN,
    METRICS_READ,
    PATIENT_READ,
    READ,
    AuthError,
    Principal,
)
from api.deps import BridgeDep
from api.etag import NOT_MODIFIED, conditional_json
from api.security import auditor, require
from bridge.errors import StoreError
from bridge.store.db import StoredReading, utc
from bridge.store.reads import Reads
from vitals_contract import Metric, ScanState, is_valid_kiosk_id

router = APIRouter()

MAX_PAGE = 1000
MAX_PATIENT_REF_CHARS = 128  # as the contract's ScanEvent.patient_ref
# The kiosk detail counts readings and dead letters of this recent window.
COUNT_WINDOW = timedelta(hours=24)
# The status looks for each metric's latest value this far before the newest one.
# TODO: a metric last sent longer before the kiosk's newest reading shows as absent;
# the bound keeps a metric the kiosk never sends from costing its whole history.
LATEST_LOOKBACK = timedelta(hours=24)
ACTIVE_SCAN_STATES = frozenset({ScanState.FACE_PRESENT, ScanState.SCANNING})


class CursorPage(BaseModel):
    """One page of a list; ``next_cursor`` continues after it.

    ``next_cursor`` is null only for an empty page; ``has_more`` says whether
    more items were already waiting.
    """

    model_config = ConfigDict(extra="forbid")

    items: list[dict[str, Any]]
    next_cursor: str | None
    has_more: bool


class ReadingsPage(CursorPage):
    """One page of readings in store order.

    ``next_cursor`` continues after this page (also for polling: readings stored
    later appear there).
    """


# The models below document the kiosk answers in OpenAPI; the tests check every
# answer against them, so the two cannot drift apart.


class LastReading(BaseModel):
    """Where and when a kiosk's newest reading is (not its value)."""

    model_config = ConfigDict(extra="forbid")

    id: int
    seq: int
    metric: Metric
    measured_at: AwareDatetime
    received_at: AwareDatetime


class KioskCounts(BaseModel):
    """Counts of a kiosk's recent activity."""

    model_config = ConfigDict(extra="forbid")

    window_hours: float
    readings_in_window: int
    dead_letters_in_window: int
    scans_by_state: dict[str, int]
    scans_total: int
    open_alerts: int


class KioskDetail(BaseModel):
    """A kiosk as the ``kiosks`` table holds it, plus counts for operators."""

    model_config = ConfigDict(extra="forbid")

    kiosk_id: str
    state: str = Field(description="online, offline, or unknown before any status")
    agent_version: str | None
    committed_through: int = Field(description="Highest seq delivered without gaps.")
    status_at: AwareDatetime | None
    last_seen_at: AwareDatetime | None
    last_reading: LastReading | None
    counts: KioskCounts


class KioskLiveStatus(BaseModel):
    """A kiosk's live status: freshness, current or last scan, latest values."""

    model_config = ConfigDict(extra="forbid")

    kiosk_id: str
    state: str
    agent_version: str | None
    committed_through: int
    status_at: AwareDatetime | None
    last_seen_at: AwareDatetime | None
    online: bool = Field(description="The kiosk's last status said online.")
    stale: bool = Field(description="No value newer than stale_seconds.")
    stale_seconds: float
    fresh_until: AwareDatetime | None = Field(
        description="When the newest value turns stale."
    )
    scan: dict[str, Any] | None = Field(
        description="The latest scan with ``active``; patient_ref needs the scope."
    )
    latest: list[dict[str, Any]] = Field(
        description="The latest reading of each metric, with its own ``stale``."
    )
    open_alerts: list[dict[str, Any]]


@router.get("/health", tags=["operations"])
def health() -> dict[str, str]:
    """Say the process is alive."""
    return {"status": "ok"}


@router.get("/ready", tags=["operations"])
def ready(bridge: BridgeDep, response: Response) -> dict[str, Any]:
    """Say whether the database answers and the broker is connected."""
    checks = {
        "database": True,
        "broker": bridge.ingest.connected.is_set(),
        "ingest": bridge.ingest.running,
    }
    try:
        bridge.store.ping()
    except StoreError:
        checks["database"] = False
    ok = all(checks.values())
    if not ok:
        response.status_code = 503
    return {"status": "ready" if ok else "not ready", "checks": checks}


ReadDep = Annotated[Principal, Depends(require(READ))]


@router.get("/metrics", tags=["operations"], response_class=Response)
def metrics(
    bridge: BridgeDep, _p: Annotated[Principal, Depends(require(METRICS_READ))]
) -> Response:
    """Expose Prometheus metrics."""
    bridge.metrics.ws_clients.set(len(bridge.hub))
    return Response(
        generate_latest(bridge.metrics.registry), media_type=CONTENT_TYPE_LATEST
    )


@router.get("/api/v1/dashboard/config", tags=["dashboard"])
def dashboard_config(bridge: BridgeDep, _p: ReadDep) -> dict[str, Any]:
    """Tell the dashboard its display settings."""
    return {"stale_seconds": bridge.settings.dashboard.stale_seconds}


@router.get(
    "/api/v1/kiosks",
    tags=["kiosks"],
    response_model=list[dict[str, Any]],
    responses=NOT_MODIFIED,
)
def list_kiosks(request: Request, bridge: BridgeDep, _p: ReadDep) -> Response:
    """List known kiosks with their state and delivery mark."""
    return conditional_json(request, bridge.store.kiosks())


def reads(bridge: BridgeDep) -> Reads:
    """Return the read queries of the bridge's store."""
    return Reads(bridge.store.engine)


ReadsDep = Annotated[Reads, Depends(reads)]


def known_kiosk(kiosk_id: str) -> str:
    """Admit a path's kiosk id; a malformed one names no kiosk (404)."""
    if not is_valid_kiosk_id(kiosk_id):
        raise HTTPException(404, "no such kiosk")
    return kiosk_id


KioskIdDep = Annotated[str, Depends(known_kiosk)]


def audit_read(
    request: Request, principal: Principal, resource: str, *, with_patient: bool
) -> None:
    """Record a read of patient-linked data, noting whether patient refs were shown."""
    detail = "patient refs shown" if with_patient else None
    auditor(request).record(principal.subject, "read", resource[:256], detail=detail)


@router.get(
    "/api/v1/kiosks/{kiosk_id}",
    tags=["kiosks"],
    response_model=KioskDetail,
    responses=NOT_MODIFIED,
)
def read_kiosk(
    request: Request,
    _p: ReadDep,
    bridge: BridgeDep,
    store: ReadsDep,
    kiosk_id: KioskIdDep,
) -> Response:
    """Describe one kiosk: state, delivery mark and counts of its recent activity."""
    now = datetime.now(UTC)
    kiosk = store.kiosk(kiosk_id)
    if kiosk is None:
        raise HTTPException(404, "no such kiosk")
    counts = store.kiosk_counts(kiosk_id, since=now - COUNT_WINDOW)
    open_alerts = bridge.alert_store.list(
        open_only=True, kiosk_id=kiosk_id, limit=len(Metric)
    )
    last = counts.last_reading
    body = kiosk.to_json() | {
        # Where and when, not what: values are patient-linked (see /status).
        "last_reading": None
        if last is None
        else {
            "id": last.id,
            "seq": last.seq,
            "metric": last.metric,
            "measured_at": last.measured_at.isoformat(),
            "received_at": last.received_at.isoformat(),
        },
        "counts": {
            "window_hours": COUNT_WINDOW.total_seconds() / 3600,
            "readings_in_window": counts.readings_recent,
            "dead_letters_in_window": counts.dead_letters_recent,
            "scans_by_state": counts.scans_by_state,
            "scans_total": sum(counts.scans_by_state.values()),
            "open_alerts": len(open_alerts),
        },
    }
    return conditional_json(request, body)


@router.get(
    "/api/v1/kiosks/{kiosk_id}/status",
    tags=["kiosks"],
    response_model=KioskLiveStatus,
    responses=NOT_MODIFIED,
)
def kiosk_status(
    request: Request,
    principal: ReadDep,
    bridge: BridgeDep,
    store: ReadsDep,
    kiosk_id: KioskIdDep,
) -> Response:
    """Tell a kiosk's live status: state, freshness, scan, latest values, alerts.

    ``stale`` follows the dashboard: true when the newest value is older than
    ``dashboard.stale_seconds`` (or there is none); ``fresh_until`` says when the
    newest value turns stale.
    """
    now = datetime.now(UTC)
    # TODO: read these in one snapshot; separate statements can straddle a commit
    # (the answer and its ETag still agree, and the next poll catches up).
    kiosk = store.kiosk(kiosk_id)
    if kiosk is None:
        raise HTTPException(404, "no such kiosk")
    latest = store.latest_readings(kiosk_id, LATEST_LOOKBACK)
    scan = store.latest_scan(kiosk_id)
    alerts = bridge.alert_store.list(
        open_only=True, kiosk_id=kiosk_id, limit=len(Metric)
    )
    with_patient = principal.allows(PATIENT_READ)
    audit_read(
        request, principal, f"kiosk:{kiosk_id}/status", with_patient=with_patient
    )

    window = timedelta(seconds=bridge.settings.dashboard.stale_seconds)
    newest = max((_fresh_at(r) for r in latest), default=None)
    fresh_until = None if newest is None else newest + window
    current = None
    if scan is not None:
        current = scan.to_json(with_patient=with_patient) | {
            "active": scan.state in ACTIVE_SCAN_STATES
        }
    body = kiosk.to_json() | {
        "online": kiosk.state == "online",
        "stale": fresh_until is None or now > fresh_until,
        "stale_seconds": window.total_seconds(),
        "fresh_until": None if fresh_until is None else fresh_until.isoformat(),
        "scan": current,
        "latest": [
            r.to_json() | {"stale": now > _fresh_at(r) + window} for r in latest
        ],
        "open_alerts": [a.to_json() for a in alerts],
    }
    return conditional_json(request, body)


def _fresh_at(reading: StoredReading) -> datetime:
    # As the dashboard does: a value is as fresh as its measurement, but a kiosk
    # clock running ahead cannot make it fresher than its arrival.
    return min(reading.measured_at, reading.received_at)


@router.get(
    "/api/v1/readings",
    tags=["readings"],
    response_model=ReadingsPage,
    responses=NOT_MODIFIED,
)
def list_readings(
    request: Request,
    bridge: BridgeDep,
    principal: ReadDep,
    kiosk_id: Annotated[
        list[str] | None, Query(description="Repeat to select several kiosks.")
    ] = None,
    metric: Annotated[list[Metric] | None, Query()] = None,
    patient: Annotated[
        list[str] | None,
        Query(
            description="Readings of scans bound to this patient reference; "
            "needs scope vitals.patient.read."
        ),
    ] = None,
    since: Annotated[
        AwareDatetime | None, Query(description="measured_at >= since")
    ] = None,
    until: Annotated[
        AwareDatetime | None, Query(description="measured_at < until")
    ] = None,
    cursor: Annotated[
        str | None, Query(pattern=r"^\d{1,19}$", description="next_cursor of a page")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
) -> Response:
    """Return readings in store order, filtered, one page at a time."""
    for k in kiosk_id or ():
        if not is_valid_kiosk_id(k):
            raise HTTPException(422, "invalid kiosk_id")
    if any(len(p) > MAX_PATIENT_REF_CHARS for p in patient or ()):
        raise HTTPException(422, "patient reference too long")
    if patient and not principal.allows(PATIENT_READ):
        raise AuthError(403, "insufficient_scope", f"requires scope {PATIENT_READ}")
    rows = bridge.store.readings(
        kiosk_ids=kiosk_id,
        metrics=[m.value for m in metric] if metric else None,
        # SQLite compares wall-clock text: bounds must be UTC like the rows.
        since=utc(since) if since else None,
        until=utc(until) if until else None,
        after_id=int(cursor) if cursor else None,
        patient_refs=patient,
        limit=limit + 1,  # one more tells whether more are waiting
    )
    auditor(request).record(
        principal.subject, "read", f"readings?{request.url.query}"[:256]
    )
    has_more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = str(rows[-1].id) if rows else None
    page = {
        "items": [r.to_json() for r in rows],
        "next_cursor": next_cursor,
        "has_more": has_more,
    }
    return conditional_json(request, page)


@router.get("/api/v1/alerts", tags=["alerts"])
def list_alerts(
    bridge: BridgeDep,
    _p: ReadDep,
    open_only: Annotated[bool, Query(alias="open")] = False,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
) -> list[dict[str, Any]]:
    """List alerts, newest first; ``open=true`` for episodes not yet cleared."""
    return [
        a.to_json() for a in bridge.alert_store.list(open_only=open_only, limit=limit)
    ]


@router.post("/api/v1/alerts/{alert_id}/ack", tags=["alerts"])
async def acknowledge_alert(
    alert_id: int,
    request: Request,
    bridge: BridgeDep,
    principal: Annotated[Principal, Depends(require(ACK))],
) -> dict[str, Any]:
    """Acknowledge an alert; it stays open until the values come back in range."""
    record = await bridge.acknowledge_alert(alert_id, actor=principal.subject)
    await auditor(request).arecord(principal.subject, "ack", f"alert:{alert_id}")
    if record is None:
        raise HTTPException(404, "no such alert")
    return record.to_json()


@router.get("/api/v1/audit", tags=["admin"])
def read_audit(
    request: Request,
    bridge: BridgeDep,
    _p: Annotated[Principal, Depends(require(ADMIN))],
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
) -> list[dict[str, Any]]:
    """Return the newest audit events: who read or changed what, when."""
    from sqlalchemy import select

    from bridge.store.models import AuditEvent

    query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
    auditor(request).sync()
    with bridge.store.engine.connect() as conn:
        return [
            {
                "id": e.id,
                "at": e.at.isoformat(),
                "actor": e.actor,
                "action": e.action,
                "resource": e.resource,
                "outcome": e.outcome,
            }
            for e in conn.execute(query)
        ]
