"""The websocket channel of FHIR Subscriptions: ``/fhir/ws``.

Protocol (backport IG, websocket channel):

* the client connects, then sends the text frame ``bind-with-token <token>`` with
  a token from ``GET /fhir/Subscription/{id}/$get-ws-binding-token``; it may bind
  more Subscriptions, or the same one with a fresh token, on the same socket;
* the server answers each bind with a ``handshake`` Bundle, then sends an
  ``event-notification`` Bundle per event (numbers strictly increasing, without
  gaps, starting after the count the handshake reports) and a ``heartbeat``
  Bundle whenever a Subscription's heartbeat period passes without a message;
* close codes: 4400 no bind frame within 10 s, or a frame that is not a bind;
  4401 binding token unknown, expired or already used, or the access token
  behind every binding expired or was revoked; 4404 the Subscription was
  deleted; 4008 the client read too slowly (the Subscription turns ``error``;
  fetch what was missed with ``$events``); 1001 server shutting down; 1011 the
  database failed (reconnect and bind again).

The binding token is the credential: this route sits outside the FHIR HTTP guard.
Tokens are single use and short-lived; the access token that asked for one is
watched for revocation and expiry while the socket is open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from api.fhir.subscriptions.resources import now_utc
from api.fhir.subscriptions.service import (
    CLOSE_BAD_REQUEST,
    CLOSE_INTERNAL,
    CLOSE_UNAUTHORIZED,
    Session,
    SubscriptionService,
    lifespan,
)
from api.security import auditor, tokens
from bridge.errors import StoreError

log = logging.getLogger(__name__)
# The service starts and stops with the app (merged by include_router).
router = APIRouter(lifespan=lifespan)

BIND_TIMEOUT_SECONDS = 10.0
BIND_PREFIX = "bind-with-token "
MAX_FRAME_CHARS = 512


def _service(ws: WebSocket) -> SubscriptionService:
    service: SubscriptionService = ws.app.state.fhir_subscriptions
    return service


def _base(ws: WebSocket) -> str:
    scheme = "https" if ws.url.scheme == "wss" else "http"
    host = ws.headers.get("host", ws.url.netloc)
    return f"{scheme}://{host}/fhir"


@router.websocket("/fhir/ws")
async def subscription_socket(ws: WebSocket) -> None:
    """Deliver notifications of the Subscriptions bound to this socket."""
    service = _service(ws)
    await ws.accept()
    session = Session(service, ws, _base(ws))
    sender = asyncio.create_task(session.run_sender(), name="fhir-ws[send]")
    try:
        await _receive(ws, session, service)
    except WebSocketDisconnect:
        pass
    finally:
        if not sender.done():
            if session.closed is None:
                sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect):
                await sender
        service.detach_all(session)


async def _receive(
    ws: WebSocket, session: Session, service: SubscriptionService
) -> None:
    """Read bind frames until the client leaves or the session is closed."""
    first = True
    while session.closed is None:
        try:
            message = await asyncio.wait_for(
                ws.receive(), BIND_TIMEOUT_SECONDS if first else None
            )
        except TimeoutError:
            session.close(CLOSE_BAD_REQUEST, "expected bind-with-token")
            return
        if message["type"] == "websocket.disconnect":
            return
        text = message.get("text") or ""
        if len(text) > MAX_FRAME_CHARS or not text.startswith(BIND_PREFIX):
            session.close(CLOSE_BAD_REQUEST, "expected bind-with-token <token>")
            return
        token = text.removeprefix(BIND_PREFIX).strip()
        try:
            binding = await asyncio.to_thread(
                service.store.redeem_token, token, now_utc()
            )
        except StoreError:
            log.warning("fhir ws: database unavailable while binding")
            session.close(CLOSE_INTERNAL, "database unavailable; reconnect")
            return
        if binding is None or tokens(ws).is_revoked(binding.access_jti):
            session.close(CLOSE_UNAUTHORIZED, "binding token invalid, expired or used")
            return
        await auditor(ws).arecord(
            binding.subject, "subscribe", f"fhir/Subscription/{binding.subscription_id}"
        )
        session.offer(("bind", binding))
        first = False
