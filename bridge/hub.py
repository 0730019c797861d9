"""Live fan-out of readings, kiosk status and alerts to WebSocket clients.

Each client has a bounded queue. When a client falls so far behind that its queue is
full, it is cut off with :data:`CLOSE_SLOW_CONSUMER` rather than slowing the others;
it may reconnect and resume from the last ``id`` it saw.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from bridge.store import StoredReading

log = logging.getLogger(__name__)

# WebSocket close codes (4000-4999 are free for applications).
CLOSE_SLOW_CONSUMER = 4008
CLOSE_BAD_REQUEST = 4400


Listener = tuple[Callable[[list[dict[str, Any]]], None], Callable[[], bool] | None]


@dataclass(slots=True)
class Subscription:
    """What a client wants; ``None`` means everything."""

    kiosks: frozenset[str] | None = None
    metrics: frozenset[str] | None = None
    status: bool = True
    alerts: bool = True

    def wants_kiosk(self, kiosk_id: str) -> bool:
        """Tell whether events of ``kiosk_id`` match."""
        return self.kiosks is None or kiosk_id in self.kiosks


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message for clients, with its JSON text encoded once for all of them."""

    message: dict[str, Any]
    text: str


@dataclass(eq=False, slots=True)
class HubClient:
    """One connected client: its filter, its queue and why it was dropped."""

    number: int
    queue: asyncio.Queue[Outgoing]
    subscription: Subscription | None = None
    dropped: asyncio.Event = field(default_factory=asyncio.Event)
    # Readings at or below this id were already sent by a replay.
    replayed_through: int = 0

    def offer(self, message: Outgoing) -> bool:
        """Queue ``message``; on overflow mark the client dropped and say False."""
        if self.dropped.is_set():
            return False
        try:
            self.queue.put_nowait(message)
        except asyncio.QueueFull:
            self.dropped.set()
            return False
        return True


class Hub:
    """Registry of live clients; every method runs on the event loop."""

    def __init__(self, queue_size: int) -> None:
        self._queue_size = queue_size
        self._clients: set[HubClient] = set()
        # Who wants which kiosk: a message is only matched against its kiosk's
        # clients and those following every kiosk, not against everyone.
        self._by_kiosk: dict[str, set[HubClient]] = {}
        self._all_kiosks: set[HubClient] = set()
        self._numbers = itertools.count(1)
        self._listeners: list[Listener] = []
        self.delivered = 0
        self.dropped_clients = 0

    def __len__(self) -> int:
        return len(self._clients)

    @property
    def idle(self) -> bool:
        """Tell whether nobody would receive a published message."""
        return not self._clients and not any(
            wanted is None or wanted() for _, wanted in self._listeners
        )

    def register(self) -> HubClient:
        """Add a client; it receives nothing until it subscribes."""
        client = HubClient(next(self._numbers), asyncio.Queue(self._queue_size))
        self._clients.add(client)
        log.info("ws client %d joined (%d connected)", client.number, len(self))
        return client

    def subscribe(self, client: HubClient, subscription: Subscription) -> None:
        """Set (or replace) what ``client`` receives from now on."""
        self._unindex(client)
        client.subscription = subscription
        if client not in self._clients:
            return  # already dropped
        if subscription.kiosks is None:
            self._all_kiosks.add(client)
        else:
            for kiosk_id in subscription.kiosks:
                self._by_kiosk.setdefault(kiosk_id, set()).add(client)

    def _unindex(self, client: HubClient) -> None:
        self._all_kiosks.discard(client)
        sub = client.subscription
        if sub is None or sub.kiosks is None:
            return
        for kiosk_id in sub.kiosks:
            followers = self._by_kiosk.get(kiosk_id)
            if followers is not None:
                followers.discard(client)
                if not followers:
                    del self._by_kiosk[kiosk_id]

    def _remove(self, client: HubClient) -> None:
        self._clients.discard(client)
        self._unindex(client)

    def unregister(self, client: HubClient) -> None:
        """Remove a client."""
        self._remove(client)
        log.info("ws client %d left (%d connected)", client.number, len(self))

    def add_listener(
        self,
        listener: Callable[[list[dict[str, Any]]], None],
        wanted: Callable[[], bool] | None = None,
    ) -> None:
        """Call ``listener`` on the event loop with every batch of messages published.

        For in-process consumers other than WebSocket clients (FHIR subscriptions):
        a listener must return quickly and must not raise; it gets the messages
        before they are encoded and must not change them. ``wanted`` says whether
        it listens at all right now; while nobody does, publishers may skip
        building messages (see :attr:`idle`).
        """
        self._listeners.append((listener, wanted))

    def publish_readings(self, readings: Iterable[StoredReading]) -> None:
        """Offer each reading to every subscribed client that wants it."""
        self.publish_messages([r.live_message() for r in readings])

    def publish_event(self, kind: str, kiosk_id: str, body: dict[str, Any]) -> None:
        """Offer a status or alert message about ``kiosk_id``."""
        self.publish_messages([{"type": kind, "kiosk_id": kiosk_id, **body}])

    def publish_messages(self, messages: list[dict[str, Any]]) -> None:
        """Offer messages (``reading``, ``status``, ``alert``) to clients.

        Each message is encoded to JSON once, however many clients receive it.
        """
        for listener, wanted in self._listeners:
            if wanted is not None and not wanted():
                continue
            try:
                listener(messages)
            except Exception:
                log.exception("hub listener failed")
        if not self._clients:
            return
        kiosks = {str(m.get("kiosk_id", "")) for m in messages}
        targets = set(self._all_kiosks)
        for kiosk_id in kiosks:
            targets.update(self._by_kiosk.get(kiosk_id, ()))
        if not targets:
            return
        outgoing = [Outgoing(m, orjson.dumps(m).decode()) for m in messages]
        # In publish order for every client: a client resumes from the last id
        # it saw, so it must never see a later id before an earlier one.
        for client in targets:
            sub = client.subscription
            if sub is None:
                continue
            for item in outgoing:
                if _wanted(sub, item.message) and not self._offer(client, item):
                    break

    def _offer(self, client: HubClient, message: Outgoing) -> bool:
        if client.offer(message):
            self.delivered += 1
            return True
        if client in self._clients:
            self.dropped_clients += 1
            log.warning("ws client %d too slow; disconnecting", client.number)
            self._remove(client)
        return False


def _wanted(sub: Subscription, message: dict[str, Any]) -> bool:
    kind = message.get("type")
    kiosk_id = str(message.get("kiosk_id", ""))
    if kind == "reading":
        return sub.wants_kiosk(kiosk_id) and (
            sub.metrics is None or message.get("metric") in sub.metrics
        )
    if kind == "status":
        return sub.status and sub.wants_kiosk(kiosk_id)
    if kind == "alert":
        return sub.alerts and sub.wants_kiosk(kiosk_id)
    return False
