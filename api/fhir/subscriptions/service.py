"""The running side of FHIR Subscriptions: matching, numbering, delivery.

Flow of one reading::

    hub listener (event loop, hot path)   match device + code against an index
        -> pending list                    no I/O; bounded
    numbering task (thread)               look up patients, match them, then
        -> SubscriptionStore.append        number + log in one transaction
    dispatch (event loop)                  hand numbered events to the sockets
        -> Session queue -> socket         bound in *this* process only

Every API process behind the broker sees every reading and logs it; the store
makes numbering idempotent, so whichever process holds a subscriber's socket
sends the events, and the others only log them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from api.fhir import mapping
from api.fhir.subscriptions import criteria
from api.fhir.subscriptions.resources import (
    Content,
    Event,
    NotificationType,
    Status,
    SubscriptionRecord,
    notification_bundle,
    now_utc,
)
from api.fhir.subscriptions.store import Binding, Match, SubscriptionStore
from api.security import tokens
from bridge.config import FhirSubscriptionSettings
from bridge.errors import StoreError
from bridge.store.db import StoredReading

log = logging.getLogger(__name__)

RETRY_SECONDS = 1.0
REVOCATION_CHECK_SECONDS = 5.0
# WebSocket close codes of /fhir/ws (documented in README and socket.py).
CLOSE_SLOW = 4008
CLOSE_BAD_REQUEST = 4400
CLOSE_UNAUTHORIZED = 4401
CLOSE_GONE = 4404
CLOSE_INTERNAL = 1011
SLOW_ERROR = "notifications fell behind; missed events are available from $events"


@functools.lru_cache(maxsize=4096)
def device_id(kiosk_id: str) -> str:
    """Return the FHIR Device id of a kiosk (cached: it is on the hot path)."""
    return mapping.encode_id(kiosk_id)


@dataclass(frozen=True, slots=True)
class _Candidate:
    """A live reading that passed the device and code filters of ``subs``."""

    message: dict[str, Any]
    subs: tuple[str, ...]


@dataclass(slots=True)
class _Bound:
    """One Subscription bound to a socket."""

    record: SubscriptionRecord
    content: Content
    sent_through: int
    access_jti: str
    access_expires_at: float  # Unix seconds
    last_sent: float = field(default_factory=time.monotonic)


class Session:
    """One ``/fhir/ws`` socket: its bindings and the one task that writes to it."""

    def __init__(self, service: SubscriptionService, ws: WebSocket, base: str) -> None:
        self.service = service
        self.ws = ws
        self.base = base
        self.bound: dict[str, _Bound] = {}
        self.queue: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue(
            service.settings.socket_queue_size
        )
        self.closed: tuple[int, str] | None = None
        self._checked_at = time.monotonic()

    def offer(self, item: tuple[Any, ...]) -> None:
        """Queue work for the sender; a full queue closes the socket as too slow."""
        if self.closed is not None:
            return
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.closed = (CLOSE_SLOW, "client too slow")
            log.warning("fhir ws client too slow; closing")
            for sub_id in self.bound:
                self.service.mark_error(sub_id, SLOW_ERROR)
            self._wake_sender()

    def _wake_sender(self) -> None:
        # Make room if need be, so the sender wakes up and sees ``closed``.
        if self.queue.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                self.queue.get_nowait()
        self.queue.put_nowait(("close",))

    def close(self, code: int, reason: str) -> None:
        """Ask the sender to close the socket."""
        if self.closed is None:
            self.closed = (code, reason)
            self._wake_sender()

    async def run_sender(self) -> None:
        """Send handshakes, events and heartbeats until the session closes."""
        try:
            await self._send_loop()
        except (WebSocketDisconnect, RuntimeError, OSError):
            log.debug("fhir ws client went away while we sent")
        except StoreError as exc:
            log.warning("%s; closing a fhir ws so its client reconnects", exc)
            self.closed = (CLOSE_INTERNAL, "database unavailable; reconnect")
            with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
                await self._close()

    async def _send_loop(self) -> None:
        while True:
            if self.closed is not None:
                await self._close()
                return
            timeout = self._next_deadline() - time.monotonic()
            if timeout <= 0:
                await self._tick()
                continue
            try:
                item = await asyncio.wait_for(self.queue.get(), timeout)
            except TimeoutError:
                continue
            kind = item[0]
            if kind == "bind":
                await self._bind(item[1])
            elif kind == "events":
                await self._events(item[1], item[2])

    def _next_deadline(self) -> float:
        deadline = self._checked_at + REVOCATION_CHECK_SECONDS
        for b in self.bound.values():
            if b.record.heartbeat_seconds is not None:
                deadline = min(deadline, b.last_sent + b.record.heartbeat_seconds)
        return deadline

    async def _tick(self) -> None:
        """Send due heartbeats; unbind what lost its access, close when none is left."""
        now = self._checked_at = time.monotonic()
        # TODO: is_revoked re-reads the revocation list on the event loop every few
        # seconds (as api/live.py does); move that refresh to a background task.
        for sub_id, b in list(self.bound.items()):
            if b.access_expires_at <= time.time() or tokens(self.ws).is_revoked(
                b.access_jti
            ):
                del self.bound[sub_id]
                self.service.detach(sub_id, self)
                if not self.bound:
                    self.closed = (
                        CLOSE_UNAUTHORIZED,
                        "access token expired or revoked",
                    )
                    return
        for b in self.bound.values():
            period = b.record.heartbeat_seconds
            if period is not None and now - b.last_sent >= period:
                await self._send(b, NotificationType.HEARTBEAT, [])

    async def _bind(self, binding: Binding) -> None:
        """Register, read the counter, then handshake (see ``SubscriptionService``)."""
        sub_id = binding.subscription_id
        self.service.attach(sub_id, self)
        record = await self.service.fresh(sub_id)
        if record is None or record.owner != binding.subject:
            self.service.detach(sub_id, self)
            self.closed = (CLOSE_GONE, "subscription not found")
            return
        content = record.content if binding.observations else Content.EMPTY
        previous = self.bound.get(sub_id)
        bound = _Bound(
            record=record,
            content=content,
            sent_through=(
                previous.sent_through if previous else record.events_since_start
            ),
            access_jti=binding.access_jti,
            access_expires_at=binding.access_expires_at.timestamp(),
        )
        self.bound[sub_id] = bound
        await self._send(bound, NotificationType.HANDSHAKE, [])
        if record.status in (Status.REQUESTED, Status.ERROR):
            await self.service.activate(sub_id)
            bound.record = await self.service.fresh(sub_id) or record

    async def _events(self, sub_id: str, events: list[Event]) -> None:
        """Send events after ``sent_through`` in order; fill a gap from the log."""
        bound = self.bound.get(sub_id)
        if bound is None:
            return
        new = [e for e in events if e.number > bound.sent_through]
        if not new:
            return
        if new[0].number != bound.sent_through + 1 or any(
            b.number != a.number + 1 for a, b in itertools.pairwise(new)
        ):
            new = await self.service.load_events(
                sub_id,
                bound.sent_through + 1,
                new[-1].number,
                bound.content is Content.FULL_RESOURCE,
            )
            if new and new[0].number > bound.sent_through + 1:
                # The missing ones were purged: go on from what is kept. The
                # client sees the jump in event numbers, and $events reports the
                # purged range.
                log.warning(
                    "subscription %s: events %d-%d purged before delivery",
                    sub_id,
                    bound.sent_through + 1,
                    new[0].number - 1,
                )
                bound.sent_through = new[0].number - 1
        for event in new:
            if event.number == bound.sent_through + 1:
                await self._send(bound, NotificationType.EVENT, [event])
                bound.sent_through = event.number

    async def _send(
        self, bound: _Bound, kind: NotificationType, events: list[Event]
    ) -> None:
        # A handshake reports the count the client starts after, a heartbeat
        # the count delivered so far; an event its own number.
        since = None if kind is NotificationType.EVENT else bound.sent_through
        bundle = notification_bundle(
            bound.record,
            kind,
            self.base,
            now_utc(),
            events,
            bound.content,
            since_start=since,
        )
        await self.ws.send_json(bundle)
        bound.last_sent = time.monotonic()

    async def _close(self) -> None:
        assert self.closed is not None
        code, reason = self.closed
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):
            await self.ws.close(code, reason)


class SubscriptionService:
    """Owns the in-memory index, the numbering task and this process's sockets."""

    def __init__(
        self, store: SubscriptionStore, settings: FhirSubscriptionSettings
    ) -> None:
        self.store = store
        self.settings = settings
        self._records: dict[str, SubscriptionRecord] = {}
        self._filters: dict[str, criteria.Filter] = {}
        # (device id | None, metric | None) -> Subscriptions; None means any.
        self._by_key: dict[tuple[str | None, str | None], tuple[str, ...]] = {}
        self._pending: list[_Candidate] = []
        self._wake = asyncio.Event()
        self._sessions: dict[str, set[Session]] = {}
        self._tasks: list[asyncio.Task[Any]] = []
        self._generation = 0  # bumped by local creates and deletes
        self.dropped = 0  # matches lost to a full pending list
        self.numbered = 0  # events this process numbered or confirmed

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """Load the Subscriptions and start numbering and reloading."""
        try:
            self._index(await asyncio.to_thread(self.store.records))
        except StoreError as exc:
            log.warning("%s; subscriptions load on the next reload", exc)
        self._tasks = [
            asyncio.create_task(self._number_loop(), name="fhir-subscriptions[number]"),
            asyncio.create_task(self._reload_loop(), name="fhir-subscriptions[reload]"),
        ]
        log.info("fhir subscriptions started (%d loaded)", len(self._records))

    async def stop(self) -> None:
        """Stop the tasks, numbering what is still pending once."""
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._pending:
            with contextlib.suppress(StoreError):
                await asyncio.to_thread(self._number, self._take())
        for sessions in self._sessions.values():
            for s in sessions:
                s.close(1001, "server shutting down")

    # -- index (event loop) ----------------------------------------------------

    def _index(self, records: Iterable[SubscriptionRecord]) -> None:
        now = now_utc()
        self._records = {r.id: r for r in records}
        self._filters = {}
        by_key: dict[tuple[str | None, str | None], list[str]] = {}
        for r in self._records.values():
            if r.effective_status(now) is Status.OFF:
                continue
            try:
                f = criteria.parse_filter(r.filters)
            except criteria.FilterError:
                log.warning("subscription %s has an unreadable filter; skipped", r.id)
                continue
            self._filters[r.id] = f
            # Each Subscription lies under exactly one key of any reading.
            devices: Iterable[str | None] = f.devices or (None,)
            for d in devices:
                for m in f.metrics or (None,):
                    by_key.setdefault((d, m), []).append(r.id)
        self._by_key = {k: tuple(v) for k, v in by_key.items()}
        # Sockets of Subscriptions deleted elsewhere end here.
        for sub_id, sessions in list(self._sessions.items()):
            if sub_id not in self._records:
                for s in list(sessions):
                    s.close(CLOSE_GONE, "subscription deleted")

    def added(self, record: SubscriptionRecord) -> None:
        """Start matching a Subscription created in this process."""
        self._generation += 1
        self._index([*self._records.values(), record])

    def removed(self, sub_id: str) -> None:
        """Stop matching a Subscription deleted in this process."""
        self._generation += 1
        self._index(r for r in self._records.values() if r.id != sub_id)

    def listening(self) -> bool:
        """Tell whether any Subscription could match a reading now."""
        return bool(self._filters)

    def on_messages(self, messages: list[dict[str, Any]]) -> None:
        """Hub listener: queue readings that pass a device and code filter."""
        if not self._filters:
            return
        for m in messages:
            if m.get("type") != "reading":
                continue
            kiosk_id, metric = m.get("kiosk_id"), m.get("metric")
            if not isinstance(kiosk_id, str) or not isinstance(metric, str):
                continue
            device = device_id(kiosk_id)
            index = self._by_key
            subs = (
                index.get((device, metric), ())
                + index.get((device, None), ())
                + index.get((None, metric), ())
                + index.get((None, None), ())
            )
            if not subs:
                continue
            if len(self._pending) >= self.settings.pending_max:
                self.dropped += 1
                # TODO: mark the affected Subscriptions as error once dropping
                # is observable; today a dropped match is never numbered.
                log.warning("fhir subscriptions behind; dropped a match (%s)", kiosk_id)
                continue
            self._pending.append(_Candidate(m, subs))
        if self._pending:
            self._wake.set()

    def _take(self) -> list[_Candidate]:
        batch, self._pending = self._pending, []
        return batch

    # -- numbering ---------------------------------------------------------------

    async def _number_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch = self._take()
            if not batch:
                continue
            try:
                numbered = await asyncio.to_thread(self._number, batch)
            except StoreError as exc:
                log.warning("%s; retrying %d matches", exc, len(batch))
                self._pending[:0] = batch
                await asyncio.sleep(RETRY_SECONDS)
                self._wake.set()
                continue
            for sub_id, events in numbered.items():
                self.numbered += len(events)
                for session in self._sessions.get(sub_id, ()):
                    session.offer(("events", sub_id, events))

    def _number(self, batch: list[_Candidate]) -> dict[str, list[Event]]:
        """Resolve patients, apply the patient filters, number and log (thread)."""
        readings: dict[tuple[str, int], StoredReading] = {}
        wanted: dict[tuple[str, int], tuple[str, ...]] = {}
        for c in batch:
            try:
                r = StoredReading.from_json(c.message)
            except (KeyError, TypeError, ValueError):
                log.warning("ignored a malformed live reading")
                continue
            readings[(r.kiosk_id, r.seq)] = r
            wanted[(r.kiosk_id, r.seq)] = c.subs
        # TODO: a reading stored before its scan names the patient (a late scan
        # event) never matches a patient filter; re-match when the scan changes.
        scans = {(r.kiosk_id, r.scan_id) for r in readings.values() if r.scan_id}
        patients = self.store.patients_of(scans) if scans else {}

        matches: list[Match] = []
        patient_of: dict[tuple[str, int], str | None] = {}
        for key, r in readings.items():
            ref = patients.get((r.kiosk_id, r.scan_id)) if r.scan_id else None
            patient_of[key] = ref
            patient = None if ref is None else mapping.encode_id(ref)
            device = device_id(r.kiosk_id)
            for sub_id in wanted[key]:
                f = self._filters.get(sub_id)
                if f is not None and f.matches(device, r.metric, patient):
                    matches.append(
                        Match(sub_id, r.kiosk_id, r.seq, r.id, r.received_at)
                    )
        if not matches:
            return {}

        logged = self.store.append(matches, self.settings.events_kept)
        return {
            sub_id: [
                Event(
                    number,
                    m.reading_id,
                    m.at,
                    readings[(m.kiosk_id, m.seq)],
                    patient_of[(m.kiosk_id, m.seq)],
                )
                for m, number in pairs
            ]
            for sub_id, pairs in logged.items()
        }

    async def _reload_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reload_seconds)
            generation = self._generation
            try:
                records = await asyncio.to_thread(self.store.records)
            except StoreError as exc:
                log.warning("%s; keeping the loaded subscriptions", exc)
                continue
            # A create or delete here while we read may be missing from what we
            # read: keep the index it made; the next reload sees it in the database.
            if generation == self._generation:
                self._index(records)

    # -- sockets and status ----------------------------------------------------------

    def attach(self, sub_id: str, session: Session) -> None:
        """Deliver ``sub_id``'s events to ``session`` from now on."""
        self._sessions.setdefault(sub_id, set()).add(session)

    def detach(self, sub_id: str, session: Session) -> None:
        """Stop delivering ``sub_id``'s events to ``session``."""
        sessions = self._sessions.get(sub_id)
        if sessions is not None:
            sessions.discard(session)
            if not sessions:
                del self._sessions[sub_id]

    def detach_all(self, session: Session) -> None:
        """Forget a closed session (also where a bind was cut short)."""
        for sub_id in [k for k, group in self._sessions.items() if session in group]:
            self.detach(sub_id, session)

    def close_sockets(self, sub_id: str, code: int, reason: str) -> None:
        """Close every socket of this process bound to ``sub_id``."""
        for s in list(self._sessions.get(sub_id, ())):
            s.close(code, reason)

    async def fresh(self, sub_id: str) -> SubscriptionRecord | None:
        """Read a Subscription from the database (its counter included)."""
        return await asyncio.to_thread(self.store.get, sub_id)

    async def activate(self, sub_id: str) -> None:
        """Mark a Subscription active after a handshake went out."""
        await asyncio.to_thread(self.store.set_status, sub_id, Status.ACTIVE, None)

    def mark_error(self, sub_id: str, reason: str) -> None:
        """Record, in the background, that delivery to ``sub_id`` failed."""
        task = asyncio.create_task(
            asyncio.to_thread(self.store.set_status, sub_id, Status.ERROR, reason),
            name=f"fhir-subscriptions[error {sub_id}]",
        )
        self._tasks.append(task)
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[Any]) -> None:
        with contextlib.suppress(ValueError):
            self._tasks.remove(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("could not record a subscription error: %s", task.exception())

    async def load_events(
        self, sub_id: str, since: int, until: int, with_focus: bool
    ) -> list[Event]:
        """Read events ``since..until`` from the log."""
        events: list[Event]
        events, _ = await asyncio.to_thread(
            self.store.events, sub_id, since, until, until - since + 1, with_focus
        )
        return events


@asynccontextmanager
async def lifespan(app: Any) -> AsyncIterator[None]:
    """Run the Subscription service beside the bridge (which migrated the database)."""
    bridge = app.state.bridge
    service = SubscriptionService(
        SubscriptionStore(bridge.store.engine), bridge.settings.fhir_subscriptions
    )
    app.state.fhir_subscriptions = service
    await service.start()
    # TODO: readings committed between the bridge's start and this line, or after
    # service.stop() below while the bridge still runs, are not numbered: the
    # router lifespan nests inside the app's. Register before the bridge starts
    # and number the remainder after it stops.
    bridge.hub.add_listener(service.on_messages, wanted=service.listening)
    try:
        yield
    finally:
        await service.stop()
