"""Server-Sent Events: the live feed for networks that block WebSockets.

``GET /api/v1/stream?kiosk_id=..&metric=..`` streams ``event: reading|status|alert``
with ``data:`` JSON. Reading events carry ``id:`` (the store position); a client that
reconnects with ``Last-Event-ID`` (or ``?since=``) gets the gap replayed first. A
comment line every ``HEARTBEAT_SECONDS`` keeps proxies from closing the stream. A
client too slow to keep up is disconnected, and may resume the same way.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request
from fastapi.responses import StreamingResponse

from api.auth import READ, Principal
from api.deps import BridgeDep
from api.live import already_replayed, replay
from api.security import auditor, require, tokens
from bridge.hub import Subscription
from vitals_contract import Metric, is_valid_kiosk_id

router = APIRouter()

HEARTBEAT_SECONDS = 15.0


def _event(message: dict[str, Any], text: str | None = None) -> str:
    kind = message.get("type", "message")
    head = f"id: {message['id']}\n" if kind == "reading" else ""
    data = text if text is not None else json.dumps(message, separators=(",", ":"))
    return f"{head}event: {kind}\ndata: {data}\n\n"


@router.get("/api/v1/stream", tags=["live"])
async def stream(
    request: Request,
    bridge: BridgeDep,
    principal: Annotated[Principal, Depends(require(READ))],
    kiosk_id: Annotated[list[str] | None, Query()] = None,
    metric: Annotated[list[Metric] | None, Query()] = None,
    since: Annotated[int | None, Query(ge=0)] = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    """Stream live readings, status and alerts as Server-Sent Events."""
    for k in kiosk_id or ():
        if not is_valid_kiosk_id(k):
            raise HTTPException(422, "invalid kiosk_id")
    if last_event_id is not None:
        if not last_event_id.isdigit():
            raise HTTPException(422, "Last-Event-ID must be a reading id")
        since = int(last_event_id)
    await auditor(request).arecord(principal.subject, "subscribe", "stream")
    subscription = Subscription(
        kiosks=frozenset(kiosk_id) if kiosk_id else None,
        metrics=frozenset(m.value for m in metric) if metric else None,
    )
    return StreamingResponse(
        _events(request, bridge, subscription, since, principal),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


async def _events(
    request: Request,
    bridge: Any,
    subscription: Subscription,
    since: int | None,
    principal: Principal,
) -> AsyncIterator[str]:
    client = bridge.hub.register()
    bridge.hub.subscribe(client, subscription)
    try:
        yield "retry: 2000\n\n"
        if since is not None:
            async for message in replay(bridge, client, since):
                yield _event(message)
        while not client.dropped.is_set():
            if time.time() >= principal.expires_at or tokens(request).is_revoked(
                principal.jti
            ):
                yield 'event: auth\ndata: {"error":"token expired or revoked"}\n\n'
                return
            try:
                item = await asyncio.wait_for(client.queue.get(), HEARTBEAT_SECONDS)
            except TimeoutError:
                if await request.is_disconnected():
                    return
                yield ": keep-alive\n\n"
                continue
            if not already_replayed(client, item.message):
                yield _event(item.message, item.text)
    finally:
        bridge.hub.unregister(client)
