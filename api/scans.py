"""Scans over REST: a filtered list in pages, and one scan with readings and events.

A scan's ``patient_ref`` is shown only to callers holding ``vitals.patient.read``,
and only they may filter by patient; every read is written to the audit log.

The list is in ``(started_at, kiosk_id, scan_id)`` order. A scan's start moves only
forward in its normal life (``face_present`` then ``scanning``), so a client paging
with ``next_cursor`` misses no scan that existed when it started; a scan that
started again after the client passed it can show up once more, in its new state.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from pydantic import AwareDatetime, BaseModel, ConfigDict

from api.auth import PATIENT_READ, READ, AuthError, Principal
from api.etag import NOT_MODIFIED, conditional_json
from api.rest import (
    MAX_PAGE,
    MAX_PATIENT_REF_CHARS,
    CursorPage,
    ReadsDep,
    audit_read,
)
from api.security import require
from bridge.store.db import utc
from bridge.store.reads import ScanKey
from vitals_contract import ScanState, is_valid_kiosk_id

router = APIRouter(tags=["scans"])

MAX_SCAN_READINGS = 5000
MAX_CURSOR_CHARS = 400
_SCAN_ID_CHARS = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-"
)

ReadDep = Annotated[Principal, Depends(require(READ))]


class ScansPage(CursorPage):
    """One page of scans in list order.

    ``next_cursor`` continues after this page (scans started later appear there).
    ``patient_ref`` appears only with ``vitals.patient.read``.
    """


class ScanDetail(BaseModel):
    """One scan, its readings in store order and its state changes in seq order."""

    model_config = ConfigDict(extra="forbid")

    kiosk_id: str
    scan_id: str
    state: ScanState
    started_at: AwareDatetime
    updated_at: AwareDatetime
    reason: str | None
    patient_ref: str | None = None
    readings: list[dict[str, Any]]
    readings_truncated: bool
    events: list[dict[str, Any]]


def encode_cursor(key: ScanKey) -> str:
    """Turn a list position into an opaque cursor."""
    raw = json.dumps([key.started_at.isoformat(), key.kiosk_id, key.scan_id])
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> ScanKey:
    """Read a cursor back; ``ValueError`` when it is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        started, kiosk_id, scan_id = json.loads(raw)
        started_at = datetime.fromisoformat(started)
    except (binascii.Error, UnicodeDecodeError, TypeError, ValueError) as exc:
        raise ValueError("invalid cursor") from exc
    if (
        started_at.tzinfo is None
        or not isinstance(kiosk_id, str)
        or not is_valid_kiosk_id(kiosk_id)
        or not _valid_scan_id(scan_id)
    ):
        raise ValueError("invalid cursor")
    return ScanKey(utc(started_at), kiosk_id, scan_id)


def _valid_scan_id(scan_id: object) -> bool:
    return (
        isinstance(scan_id, str)
        and 0 < len(scan_id) <= 64
        and set(scan_id) <= _SCAN_ID_CHARS
    )


@router.get("/api/v1/scans", response_model=ScansPage, responses=NOT_MODIFIED)
def list_scans(
    request: Request,
    principal: ReadDep,
    store: ReadsDep,
    kiosk_id: Annotated[
        list[str] | None, Query(description="Repeat to select several kiosks.")
    ] = None,
    patient: Annotated[
        list[str] | None,
        Query(description="Patient reference; needs scope vitals.patient.read."),
    ] = None,
    state: Annotated[list[ScanState] | None, Query()] = None,
    since: Annotated[
        AwareDatetime | None, Query(description="started_at >= since")
    ] = None,
    until: Annotated[
        AwareDatetime | None, Query(description="started_at < until")
    ] = None,
    cursor: Annotated[
        str | None,
        Query(max_length=MAX_CURSOR_CHARS, description="next_cursor of a page"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
) -> Response:
    """Return scans in start order, filtered, one page at a time."""
    # TODO: a scan delivered late (a kiosk's offline backlog) starts behind a polling
    # cursor; poll the readings or the live feed for new data until scans get a
    # store position column like readings' id.
    for k in kiosk_id or ():
        if not is_valid_kiosk_id(k):
            raise HTTPException(422, "invalid kiosk_id")
    if any(len(p) > MAX_PATIENT_REF_CHARS for p in patient or ()):
        raise HTTPException(422, "patient reference too long")
    with_patient = principal.allows(PATIENT_READ)
    if patient and not with_patient:
        raise AuthError(403, "insufficient_scope", f"requires scope {PATIENT_READ}")
    try:
        after = decode_cursor(cursor) if cursor else None
    except ValueError as exc:
        raise HTTPException(422, "invalid cursor") from exc

    rows = store.scans(
        kiosk_ids=kiosk_id,
        patient_refs=patient,
        states=[s.value for s in state] if state else None,
        since=since,
        until=until,
        after=after,
        limit=limit + 1,  # one more tells whether more are waiting
    )
    audit_read(
        request,
        principal,
        f"scans?{request.url.query}",
        with_patient=with_patient,
    )

    has_more = len(rows) > limit
    rows = rows[:limit]
    page = {
        "items": [r.to_json(with_patient=with_patient) for r in rows],
        "next_cursor": encode_cursor(rows[-1].key) if rows else None,
        "has_more": has_more,
    }
    return conditional_json(request, page)


@router.get(
    "/api/v1/scans/{kiosk_id}/{scan_id}",
    response_model=ScanDetail,
    responses=NOT_MODIFIED,
)
def read_scan(
    kiosk_id: str,
    scan_id: str,
    request: Request,
    principal: ReadDep,
    store: ReadsDep,
) -> Response:
    """Return one scan with its readings and its state changes."""
    if not is_valid_kiosk_id(kiosk_id) or not _valid_scan_id(scan_id):
        raise HTTPException(404, "no such scan")
    scan = store.scan(kiosk_id, scan_id)
    if scan is None:
        raise HTTPException(404, "no such scan")
    readings = store.scan_readings(kiosk_id, scan_id, MAX_SCAN_READINGS + 1)
    events = store.scan_events(kiosk_id, scan_id)
    with_patient = principal.allows(PATIENT_READ)
    audit_read(
        request, principal, f"scan:{kiosk_id}/{scan_id}", with_patient=with_patient
    )

    # TODO: page a scan's readings if kiosks ever send more than fit one answer;
    # a 30 s scan sends a few hundred.
    body = scan.to_json(with_patient=with_patient) | {
        "readings": [r.to_json() for r in readings[:MAX_SCAN_READINGS]],
        "readings_truncated": len(readings) > MAX_SCAN_READINGS,
        "events": [e.to_json() for e in events],
    }
    return conditional_json(request, body)
