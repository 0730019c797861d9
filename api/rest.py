"""REST endpoints: health, readiness, metrics, kiosks and readings history."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import AwareDatetime, BaseModel

from api.auth import ACK, ADMIN, METRICS_READ, READ, Principal
from api.deps import BridgeDep
from api.security import auditor, require
from bridge.errors import StoreError
from vitals_contract import Metric, is_valid_kiosk_id

router = APIRouter()

MAX_PAGE = 1000


class ReadingsPage(BaseModel):
    """One page of readings in store order.

    ``next_cursor`` continues after this page (also for polling: readings stored
    later appear there); it is null only for an empty page. ``has_more`` says
    whether more readings were already waiting.
    """

    items: list[dict[str, Any]]
    next_cursor: str | None
    has_more: bool


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


@router.get("/api/v1/kiosks", tags=["kiosks"])
def list_kiosks(bridge: BridgeDep, _p: ReadDep) -> list[dict[str, Any]]:
    """List known kiosks with their state and delivery mark."""
    try:
        return bridge.store.kiosks()
    except StoreError as exc:
        raise HTTPException(503, "database unavailable") from exc


@router.get("/api/v1/readings", tags=["readings"])
def list_readings(
    request: Request,
    bridge: BridgeDep,
    principal: ReadDep,
    kiosk_id: Annotated[
        list[str] | None, Query(description="Repeat to select several kiosks.")
    ] = None,
    metric: Annotated[list[Metric] | None, Query()] = None,
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
) -> ReadingsPage:
    """Return readings in store order, filtered, one page at a time."""
    for k in kiosk_id or ():
        if not is_valid_kiosk_id(k):
            raise HTTPException(422, "invalid kiosk_id")
    try:
        rows = bridge.store.readings(
            kiosk_ids=kiosk_id,
            metrics=[m.value for m in metric] if metric else None,
            since=since,
            until=until,
            after_id=int(cursor) if cursor else None,
            limit=limit + 1,  # one more tells whether more are waiting
        )
    except StoreError as exc:
        raise HTTPException(503, "database unavailable") from exc
    auditor(request).record(
        principal.subject, "read", f"readings?{request.url.query}"[:256]
    )
    has_more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = str(rows[-1].id) if rows else None
    return ReadingsPage(
        items=[r.to_json() for r in rows], next_cursor=next_cursor, has_more=has_more
    )


@router.get("/api/v1/alerts", tags=["alerts"])
def list_alerts(
    bridge: BridgeDep,
    _p: ReadDep,
    open_only: Annotated[bool, Query(alias="open")] = False,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
) -> list[dict[str, Any]]:
    """List alerts, newest first; ``open=true`` for episodes not yet cleared."""
    try:
        return [
            a.to_json()
            for a in bridge.alert_store.list(open_only=open_only, limit=limit)
        ]
    except StoreError as exc:
        raise HTTPException(503, "database unavailable") from exc


@router.post("/api/v1/alerts/{alert_id}/ack", tags=["alerts"])
async def acknowledge_alert(
    alert_id: int,
    request: Request,
    bridge: BridgeDep,
    principal: Annotated[Principal, Depends(require(ACK))],
) -> dict[str, Any]:
    """Acknowledge an alert; it stays open until the values come back in range."""
    try:
        record = await bridge.acknowledge_alert(alert_id, actor=principal.subject)
        await auditor(request).arecord(principal.subject, "ack", f"alert:{alert_id}")
    except StoreError as exc:
        raise HTTPException(503, "database unavailable") from exc
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
