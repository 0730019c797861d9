"""The live WebSocket: readings, kiosk status and alerts on one socket.

Protocol (JSON text frames):

* the client's first frame is a subscription::

      {"type": "subscribe", "kiosks": ["k1"] | null, "metrics": [...] | null,
       "status": true, "alerts": true, "since": 1234 | null}

* the server answers ``{"type": "subscribed"}``, then, when ``since`` is given,
  replays every stored reading with ``id > since`` that matches, then streams live
  ``reading``, ``status`` and ``alert`` messages. Each reading carries its ``id``; a
  client that reconnects passes the last one it saw as ``since`` and misses nothing.
  After a bridge failure a reading may arrive twice; drop repeats by ``id``.
* authentication happens at the handshake: the client offers the subprotocols
  ``vitals.v1`` and ``bearer.<access token>`` (scope ``vitals.read``); the server
  selects ``vitals.v1``. Before the token expires the client may send
  ``{"type": "refresh", "token": "..."}``; the server answers ``refreshed``.
* close codes: 4008 the client read too slowly and was cut off; 4400 bad
  subscription; 4401 token missing, invalid, expired or revoked (no data flows
  after it); 4403 token lacks the scope.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from api.auth import READ, AuthError, Principal
from api.deps import BridgeDep
from api.security import auditor, tokens
from bridge.hub import CLOSE_BAD_REQUEST, CLOSE_SLOW_CONSUMER, HubClient, Subscription
from bridge.service import BridgeService
from vitals_contract import Metric

log = logging.getLogger(__name__)
router = APIRouter()

SUBSCRIBE_TIMEOUT_SECONDS = 10.0
REVOCATION_CHECK_SECONDS = 5.0
SUBPROTOCOL = "vitals.v1"
BEARER_PREFIX = "bearer."
CLOSE_UNAUTHORIZED = 4401
CLOSE_FORBIDDEN = 4403


class RefreshRequest(BaseModel):
    """An in-band token refresh."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["refresh"]
    token: str = Field(min_length=1, max_length=8192)


class SubscribeRequest(BaseModel):
    """The first frame a client sends."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["subscribe"]
    kiosks: list[str] | None = Field(default=None, max_length=1000)
    metrics: list[Metric] | None = None
    status: bool = True
    alerts: bool = True
    since: int | None = Field(default=None, ge=0)

    def subscription(self) -> Subscription:
        """Turn the request into the hub's filter."""
        return Subscription(
            kiosks=frozenset(self.kiosks) if self.kiosks is not None else None,
            metrics=frozenset(m.value for m in self.metrics) if self.metrics else None,
            status=self.status,
            alerts=self.alerts,
        )


@router.websocket("/ws")
async def live_socket(ws: WebSocket, bridge: BridgeDep) -> None:
    """Stream live vitals to one client."""
    offered: list[str] = ws.scope.get("subprotocols", [])
    token = next(
        (p.removeprefix(BEARER_PREFIX) for p in offered if p.startswith(BEARER_PREFIX)),
        None,
    )
    await ws.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
    try:
        session = _Session(_authenticate(ws, token))
    except AuthError as exc:
        await ws.close(
            CLOSE_FORBIDDEN if exc.status == 403 else CLOSE_UNAUTHORIZED, exc.message
        )
        return
    try:
        raw = await asyncio.wait_for(ws.receive_text(), SUBSCRIBE_TIMEOUT_SECONDS)
        request = SubscribeRequest.model_validate_json(raw)
    except (TimeoutError, ValidationError):
        await ws.close(CLOSE_BAD_REQUEST, "expected a subscribe frame")
        return
    except WebSocketDisconnect:
        return
    await auditor(ws).arecord(session.principal.subject, "subscribe", "ws")

    client = bridge.hub.register()
    try:
        # Subscribe first so nothing committed during the replay is missed.
        bridge.hub.subscribe(client, request.subscription())
        await ws.send_json(
            {"type": "subscribed", "expires_at": session.principal.expires_at}
        )
        if request.since is not None:
            async for message in replay(bridge, client, request.since):
                await ws.send_json(message)
        await _stream(ws, client, session)
    except WebSocketDisconnect:
        pass
    finally:
        bridge.hub.unregister(client)


class _Session:
    """The principal behind one socket, replaced by in-band refreshes."""

    def __init__(self, principal: Principal) -> None:
        self.principal = principal
        self.changed = asyncio.Event()


def _authenticate(ws: WebSocket, token: str | None) -> Principal:
    if not token:
        raise AuthError(401, "invalid_token", "bearer token required")
    principal = tokens(ws).verify(token)
    if not principal.allows(READ):
        raise AuthError(403, "insufficient_scope", f"requires scope {READ}")
    return principal


async def replay(
    bridge: BridgeService, client: HubClient, since: int
) -> AsyncIterator[dict[str, Any]]:
    """Yield stored readings after ``since`` that match, page by page.

    The client must already be subscribed, so that live readings committed during
    the replay queue up; those the replay covered are skipped when streamed.
    """
    sub = client.subscription
    assert sub is not None
    after = since
    page = bridge.settings.hub.replay_page_size
    while True:
        rows = await asyncio.to_thread(
            bridge.store.readings,
            kiosk_ids=sorted(sub.kiosks) if sub.kiosks is not None else None,
            metrics=sorted(sub.metrics) if sub.metrics is not None else None,
            after_id=after,
            limit=page,
        )
        for r in rows:
            yield {"type": "reading", "replay": True, **r.to_json()}
        if rows:
            after = rows[-1].id
            client.replayed_through = after
        if len(rows) < page:
            return


def already_replayed(client: HubClient, message: dict[str, Any]) -> bool:
    """Tell whether a queued live reading was sent by the replay already."""
    return message.get("type") == "reading" and message["id"] <= client.replayed_through


async def _stream(ws: WebSocket, client: HubClient, session: _Session) -> None:
    """Forward queued messages until the client leaves, lags or loses its token."""
    name = f"ws[{client.number}]"
    dropped = asyncio.create_task(client.dropped.wait(), name=f"{name}drop")
    receiver = asyncio.create_task(_incoming(ws, session), name=f"{name}recv")
    watch = asyncio.create_task(_watch_token(ws, session), name=f"{name}auth")
    # One sender awaits the queue directly; the watchers end it. (A task per
    # message to wait on all four at once cost more than the send itself.)
    sender = asyncio.create_task(_send_queued(ws, client), name=f"{name}send")
    tasks = {sender, dropped, receiver, watch}
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if sender in done:
            sender.result()  # a send failed: the client has gone
        elif dropped in done:
            sender.cancel()
            await ws.close(CLOSE_SLOW_CONSUMER, "client too slow")
        else:
            sender.cancel()
            reason = (watch if watch in done else receiver).result()
            if reason:
                await ws.close(CLOSE_UNAUTHORIZED, reason)
    finally:
        for task in tasks:
            task.cancel()
        # Every task is awaited, whatever one of them raised on the way out.
        for outcome in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(outcome, Exception) and not isinstance(
                outcome, WebSocketDisconnect
            ):
                log.debug("ws[%d] task ended with %r", client.number, outcome)


async def _send_queued(ws: WebSocket, client: HubClient) -> None:
    """Forward the client's queue to its socket, forever."""
    while True:
        item = await client.queue.get()
        if not already_replayed(client, item.message):
            await ws.send_text(item.text)


async def _incoming(ws: WebSocket, session: _Session) -> str | None:
    """Handle client frames (token refresh); return a close reason, or None on leave."""
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return None
        try:
            frame = RefreshRequest.model_validate_json(message.get("text") or "")
            session.principal = _authenticate(ws, frame.token)
        except ValidationError:
            continue  # not a refresh: ignored, as documented
        except AuthError as exc:
            return f"refresh refused: {exc.message}"
        session.changed.set()
        await ws.send_json(
            {"type": "refreshed", "expires_at": session.principal.expires_at}
        )


async def _watch_token(ws: WebSocket, session: _Session) -> str:
    """Return when the current token has expired or been revoked."""
    while True:
        principal = session.principal
        if tokens(ws).is_revoked(principal.jti):
            return "token revoked"
        remaining = principal.expires_at - time.time()
        if remaining <= 0:
            return "token expired"
        session.changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                session.changed.wait(), min(remaining, REVOCATION_CHECK_SECONDS)
            )
