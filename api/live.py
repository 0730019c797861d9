"""The live WebSocket: readings, kiosk status and alerts on one socket.

Protocol (JSON text frames):

* the client's first frame is a subscription::

      {"type": "subscribe", "kiosks": ["k1"] | null, "metrics": [...] | null,
       "status": true, "alerts": true, "since": 1234 | null}

* the server answers ``{"type": "subscribed"}``, then, when ``since`` is given,
  replays every stored reading with ``id > since`` that matches, then streams live
  ``reading``, ``status`` and ``alert`` messages. Each reading carries its ``id``; a
  client that reconnects passes the last one it saw as ``since`` and misses nothing.
* close codes: 4008 the client read too slowly and was cut off; 4400 bad subscription.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from api.deps import BridgeDep
from bridge.hub import CLOSE_BAD_REQUEST, CLOSE_SLOW_CONSUMER, HubClient, Subscription
from bridge.service import BridgeService
from vitals_contract import Metric

log = logging.getLogger(__name__)
router = APIRouter()

SUBSCRIBE_TIMEOUT_SECONDS = 10.0


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
    await ws.accept()
    try:
        raw = await asyncio.wait_for(ws.receive_text(), SUBSCRIBE_TIMEOUT_SECONDS)
        request = SubscribeRequest.model_validate_json(raw)
    except (TimeoutError, ValidationError):
        await ws.close(CLOSE_BAD_REQUEST, "expected a subscribe frame")
        return
    except WebSocketDisconnect:
        return

    client = bridge.hub.register()
    try:
        # Subscribe first so nothing committed during the replay is missed.
        client.subscription = request.subscription()
        await ws.send_json({"type": "subscribed"})
        if request.since is not None:
            async for message in replay(bridge, client, request.since):
                await ws.send_json(message)
        await _stream(ws, client)
    except WebSocketDisconnect:
        pass
    finally:
        bridge.hub.unregister(client)


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


async def _stream(ws: WebSocket, client: HubClient) -> None:
    """Forward queued messages until the client leaves or falls too far behind."""
    dropped = asyncio.create_task(
        client.dropped.wait(), name=f"ws[{client.number}]drop"
    )
    receiver = asyncio.create_task(_drain_incoming(ws), name=f"ws[{client.number}]recv")
    try:
        while True:
            getter = asyncio.create_task(client.queue.get())
            done, _ = await asyncio.wait(
                {getter, dropped, receiver}, return_when=asyncio.FIRST_COMPLETED
            )
            if getter not in done:
                getter.cancel()
                if dropped in done:
                    await ws.close(CLOSE_SLOW_CONSUMER, "client too slow")
                return
            message = getter.result()
            if already_replayed(client, message):
                continue
            await ws.send_json(message)
    finally:
        for task in (dropped, receiver):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect):
                await task


async def _drain_incoming(ws: WebSocket) -> None:
    """Read and ignore further client frames; return when the client goes away."""
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return
