"""MQTT ingest: validate, commit in batches, then acknowledge and confirm.

Messages are validated as they arrive, while the previous batch commits, so the
event loop parses during the database's round trip. Batches are written by one
writer thread, in order; a full batch waits behind the one being written, so the
writer starts it the moment the other commits, without a round through the event
loop. The order inside one step is the delivery guarantee:

1. messages are validated; bad ones become dead letters in the same batch;
2. the batch is committed in one transaction (duplicates are skipped by key);
3. new readings and status changes go to the live hub (and, when bridges share
   ingest, to the live topic the other bridges feed their clients from);
4. only then is each message's PUBACK sent (one write for the batch);
5. each kiosk in the batch gets one retained confirmation of its contiguous
   high-water mark, which lets its outbox release what is stored.

A failed commit is retried with back-off and nothing is acknowledged meanwhile, so
the broker redelivers whatever a crash leaves unacknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import orjson
from paho.mqtt.enums import MQTTProtocolVersion

from bridge.alerts import AlertEvaluator, ChangeKind
from bridge.config import BridgeSettings
from bridge.errors import StoreError
from bridge.hub import Hub
from bridge.metrics import BridgeMetrics
from bridge.mqtt import V5, V311, Delivery, MqttClient, Subscription
from bridge.ratelimit import RateLimiter
from bridge.store import Batch, BatchResult, DeadLetterIn, Store, StoredReading
from bridge.store.alert_store import AlertRecord, AlertStore
from vitals_contract import (
    AlertMessage,
    AlertSeverity,
    AlertState,
    CommitConfirmation,
    ContractError,
    Heartbeat,
    KioskStatus,
    Leaf,
    Metric,
    ParsedTopic,
    ScanEvent,
    alert_topic,
    kiosk_filter,
    kiosk_topic,
    parse_kiosk_topic,
    parse_payload,
    split_readings,
    utc_now,
)
from vitals_contract.mqtt import (
    SESSION_EXPIRY_SECONDS,
    JitteredBackoff,
    choose_protocol,
)

log = logging.getLogger(__name__)

SHARED_SESSION_EXPIRY_SECONDS = 10
LIVE_LEVEL = "live"  # {root}/live/{kiosk_id}: committed data for every bridge's clients
SUBSCRIBED_LEAVES = (Leaf.READINGS, Leaf.EVENTS, Leaf.STATUS, Leaf.HEARTBEAT)
RECONNECT_MIN_SECONDS = 1
RECONNECT_MAX_SECONDS = 10
# Batches handed to the writer at once: one being written, one waiting behind it.
WRITER_DEPTH = 2


@dataclass(slots=True)
class Pending:
    """The batch being filled while the previous one commits."""

    batch: Batch = field(default_factory=Batch)
    deliveries: list[Delivery] = field(default_factory=list)
    leaves: Counter[str] = field(default_factory=Counter)
    first_at: float = 0.0  # monotonic arrival of its first message


def add_to_batch(batch: Batch, topic: str, payload: bytes, root: str) -> None:
    """Validate one message into ``batch``; anything invalid becomes a dead letter."""
    add_parsed(batch, parse_kiosk_topic(topic, root), topic, payload)


def add_parsed(
    batch: Batch, parsed: ParsedTopic | None, topic: str, payload: bytes
) -> None:
    """Like :func:`add_to_batch`, for a topic the caller has already split."""
    if parsed is not None and parsed.leaf not in SUBSCRIBED_LEAVES:
        # amqtt now and then hands a subscriber retained messages of other leaves
        # (our own confirmations); they are not data and not an error.
        log.debug("ignored a message on %s", topic)
        return
    if parsed is None:
        batch.dead.append(DeadLetterIn(topic, "not a kiosk data topic", payload))
        return
    kiosk_id = parsed.kiosk_id
    try:
        if parsed.leaf is Leaf.READINGS:
            split = split_readings(payload, kiosk_id)
            batch.readings.extend((kiosk_id, r) for r in split.good)
            batch.dead.extend(
                DeadLetterIn(topic, bad.reason, payload, kiosk_id, bad.seq)
                for bad in split.bad
            )
            # A floor settles seqs the kiosk says it dropped; it can never be above
            # what the same message carries, or a forged message could release
            # a kiosk's unsent backlog.
            if split.good:
                batch.note_floor(kiosk_id, min(split.floor, split.good[0].seq))
            return
        message = parse_payload(parsed.leaf, payload, kiosk_id)
    except ContractError as exc:
        batch.dead.append(DeadLetterIn(topic, str(exc), payload, kiosk_id))
        return
    if isinstance(message, ScanEvent):
        batch.events.append(message)
        batch.note_floor(kiosk_id, min(message.floor, message.seq))
    elif isinstance(message, KioskStatus | Heartbeat):
        batch.statuses.append(message)


class Ingest:
    """Subscribes to every kiosk and commits what arrives; runs on one event loop."""

    def __init__(
        self,
        settings: BridgeSettings,
        store: Store,
        hub: Hub,
        metrics: BridgeMetrics,
        alerts: AlertEvaluator,
        alert_store: AlertStore,
    ) -> None:
        self._settings = settings
        self._store = store
        self._hub = hub
        self._metrics = metrics
        self._alerts = alerts
        self._alert_store = alert_store
        # Unbounded here, bounded in fact: with manual acknowledgement the broker
        # stops sending QoS 1 messages once its in-flight window is unacknowledged.
        self._arrivals: deque[Delivery] = deque()
        self._pending = Pending()
        # Set when the pending batch gets its first message or fills up, and when
        # the writer finishes a batch: what the batcher waits for.
        self._wake = asyncio.Event()
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="ingest-writer")
        self._writing = 0  # batches handed to the writer and not yet written
        self._stopping = threading.Event()
        self._client: MqttClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._finish_task: asyncio.Task[None] | None = None
        # Batches handed to the writer, in order, waiting for their commit, then
        # their PUBACKs, confirmations and live pushes; bounded by the broker's
        # in-flight window like the arrivals.
        self._committed: asyncio.Queue[tuple[Pending, asyncio.Future[BatchResult]]] = (
            asyncio.Queue()
        )
        self.connected = asyncio.Event()
        self._shared = False
        self._alert_task: asyncio.Task[None] | None = None
        # Bounded by the broker like the inbox; one entry per live message.
        self._live_readings: asyncio.Queue[list[StoredReading]] = asyncio.Queue()
        self._live_prefix = f"{settings.mqtt.root_topic}/{LIVE_LEVEL}/"
        self._kiosk_limiter = RateLimiter(
            settings.ingest.kiosk_messages_per_second, settings.ingest.kiosk_burst
        )

    async def start(self) -> None:
        """Connect to the broker (in the background) and start the batcher."""
        self._loop = asyncio.get_running_loop()
        mqtt_settings = self._settings.mqtt
        protocol = await asyncio.to_thread(choose_protocol, mqtt_settings)
        v5 = protocol is MQTTProtocolVersion.MQTTv5
        # Shared subscriptions only on MQTT 5: amqtt (3.1.1) grants `$share/...`
        # subscriptions and then delivers nothing to them.
        group = self._settings.ingest.shared_group
        self._shared = bool(group and v5)
        root = mqtt_settings.root_topic
        filters = [kiosk_filter(leaf, root) for leaf in SUBSCRIBED_LEAVES]
        if self._shared:
            log.info("sharing ingest with group %s", group)
            subscriptions = [
                # Other bridges' commits; our own we hand to our clients directly.
                Subscription(f"{root}/{LIVE_LEVEL}/+", no_local=True),
                *(Subscription(f"$share/{group}/{f}") for f in filters),
            ]
        else:
            subscriptions = [Subscription(f) for f in filters]
        # A bridge that shares ingest keeps a short session: the broker goes on
        # handing a dead member its share until the session expires, and kiosks
        # only resend to the living once it has.
        expiry = (
            SHARED_SESSION_EXPIRY_SECONDS if self._shared else SESSION_EXPIRY_SECONDS
        )
        self._client = MqttClient(
            mqtt_settings,
            self._settings.ingest.client_id,
            version=V5 if v5 else V311,
            session_expiry=expiry,
            # One batch committing and the next filling: the broker holds back the
            # rest, so a slow database never turns into a growing queue in memory
            # (MQTT 5; on 3.1.1 the broker's own in-flight limit does this).
            receive_maximum=2 * self._settings.ingest.batch_max_messages,
            subscriptions=subscriptions,
            on_publishes=self._on_publishes,
            on_state=self._on_state,
            backoff=JitteredBackoff(RECONNECT_MIN_SECONDS, RECONNECT_MAX_SECONDS),
        )
        self._client.start()
        self._task = asyncio.create_task(self._batcher(), name="ingest[batcher]")
        self._task.add_done_callback(self._batcher_done)
        self._finish_task = asyncio.create_task(
            self._finisher(), name="ingest[finisher]"
        )
        self._finish_task.add_done_callback(self._batcher_done)
        if self._shared:
            self._alert_task = asyncio.create_task(
                self._alerts_from_live(), name="ingest[alerts]"
            )

    @property
    def running(self) -> bool:
        """Tell whether the batcher and the finisher are alive."""
        return all(
            task is not None and not task.done()
            for task in (self._task, self._finish_task)
        )

    @staticmethod
    def _batcher_done(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("ingest stopped: %r", task.exception())

    async def stop(self) -> None:
        """Stop the batcher and disconnect; unacknowledged messages are redelivered."""
        self._stopping.set()  # a write retrying a failed commit gives up
        for task in (self._task, self._finish_task, self._alert_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        # A write under way finishes (unacknowledged: the broker redelivers it).
        await asyncio.to_thread(self._writer.shutdown, cancel_futures=True)
        if self._client is not None:
            await self._client.stop()

    # -- the broker connection (event loop) -------------------------------------

    def _on_state(self, up: bool) -> None:
        self._metrics.mqtt_connected.set(1 if up else 0)
        if up:
            self.connected.set()
        else:
            self.connected.clear()

    def _on_publishes(self, deliveries: list[Delivery]) -> None:
        """Take what one read from the broker held; validate up to the batch bound."""
        if self._shared:
            live: list[Delivery] = []
            data: list[Delivery] = []
            for d in deliveries:
                (live if d.topic.startswith(self._live_prefix) else data).append(d)
            if live:
                for d in live:
                    self._on_live(d.payload)
                assert self._client is not None
                self._client.ack(live)
            deliveries = data
        self._arrivals.extend(deliveries)
        self._drain()

    # -- batcher (event loop) -------------------------------------------------

    def _drain(self) -> None:
        """Validate arrivals into the pending batch, up to its bound."""
        pending = self._pending
        limit = self._settings.ingest.batch_max_messages
        root = self._settings.mqtt.root_topic
        arrivals = self._arrivals
        while arrivals and len(pending.deliveries) < limit:
            d = arrivals.popleft()
            if not pending.deliveries:
                pending.first_at = d.received_monotonic
            pending.deliveries.append(d)
            parsed = parse_kiosk_topic(d.topic, root)
            pending.leaves[parsed.leaf.value if parsed else "other"] += 1
            if parsed is not None and self._over_rate(parsed.kiosk_id):
                continue
            try:
                add_parsed(pending.batch, parsed, d.topic, d.payload)
            except Exception:  # a bug in validation must not ack a message unkept
                log.exception("validating a message on %s failed", d.topic)
                pending.batch.dead.append(
                    DeadLetterIn(d.topic, "internal validation error", d.payload)
                )
        if pending.deliveries:
            self._wake.set()

    async def _next_batch(self) -> Pending:
        """Wait until the pending batch may go to the writer, and take it.

        A full batch goes at once, to wait behind the one being written; a partial
        one only once it is old enough and the writer is idle, so batches grow
        while the database is busy.
        """
        limit = self._settings.ingest.batch_max_messages
        max_wait = self._settings.ingest.batch_max_wait_ms / 1000
        while True:
            self._wake.clear()
            pending = self._pending
            timeout: float | None = None
            if len(pending.deliveries) >= limit:
                if self._writing < WRITER_DEPTH:
                    break
            elif pending.deliveries and not self._writing:
                timeout = pending.first_at + max_wait - time.monotonic()
                if timeout <= 0:
                    break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
        self._pending = Pending()
        return pending

    async def _batcher(self) -> None:
        while True:
            pending = await self._next_batch()
            for leaf, count in pending.leaves.items():
                self._metrics.messages.labels(leaf).inc(count)
            # The rest happens in the finisher, in commit order, while the next
            # batch commits: the database need not wait for our PUBACKs.
            self._committed.put_nowait((pending, self._submit(pending.batch)))
            # Whatever the size bound left behind starts the next batch, validated
            # while this one is written.
            self._drain()

    async def _finisher(self) -> None:
        while True:
            pending, written = await self._committed.get()
            result = await written
            self._count(pending.batch, result)
            # Live data goes out before the confirmation, on the same connection:
            # a bridge killed in between has not confirmed, so the kiosk resends,
            # and the redelivery is pushed live again by whoever stores it.
            self._publish_live(pending.batch, result)
            self._acknowledge(pending.deliveries)
            self._confirm(result)
            if not self._shared:
                await self._alert_step(result.new_readings)
            self._committed.task_done()

    async def commit_from_http(self, batch: Batch) -> BatchResult:
        """Commit readings that arrived over HTTP and treat them like MQTT ones.

        They are stored under the same ``(kiosk_id, seq)`` key, confirmed to the
        kiosk, pushed live and evaluated for alerts.
        """
        result = await self._submit(batch)
        self._count(batch, result)
        self._publish_live(batch, result)
        if self._client is not None:
            self._confirm(result)
        if not self._shared:
            await self._alert_step(result.new_readings)
        return result

    def _over_rate(self, kiosk_id: str) -> bool:
        """Tell whether ``kiosk_id`` is over its message rate.

        Such a message is acknowledged but neither stored nor confirmed, so the
        kiosk's outbox sends it again later: a flood is slowed down, nothing is lost.
        """
        if self._kiosk_limiter.delay(kiosk_id) == 0.0:
            return False
        self._metrics.rate_limited.inc()
        log.debug("kiosk %s over its ingest rate; message deferred", kiosk_id)
        return True

    def _submit(self, batch: Batch) -> asyncio.Future[BatchResult]:
        """Hand ``batch`` to the writer; the future resolves once it is committed."""
        self._writing += 1
        written = asyncio.wrap_future(self._writer.submit(self._write, batch))
        written.add_done_callback(self._written)
        return written

    def _written(self, _written: asyncio.Future[BatchResult]) -> None:
        self._writing -= 1
        self._wake.set()

    def _write(self, batch: Batch) -> BatchResult:
        """Commit ``batch``, retrying with back-off until the database takes it.

        Runs in the writer thread, one batch after the other.
        """
        delay = 0.1
        while True:
            started = time.perf_counter()
            try:
                result = self._store.write_batch(batch)
            except StoreError as exc:
                self._metrics.commit_failures.inc()
                log.warning("commit failed (%s); retrying in %.1f s", exc, delay)
                if self._stopping.wait(delay):
                    raise
                delay = min(delay * 2, self._settings.ingest.retry_max_seconds)
                continue
            self._metrics.batch_seconds.observe(time.perf_counter() - started)
            return result

    def _count(self, batch: Batch, result: BatchResult) -> None:
        """Count and log what a committed batch stored and rejected."""
        self._metrics.readings_stored.inc(len(result.new_readings))
        self._metrics.duplicates.inc(result.duplicates)
        if batch.dead:
            self._metrics.dead_letters.inc(len(batch.dead))
            for d in batch.dead:
                log.warning(
                    "dead letter on %s (kiosk %s, seq %s, %d bytes): %s",
                    d.topic,
                    d.kiosk_id,
                    d.seq,
                    len(d.payload),
                    d.reason,
                )
        log.debug(
            "committed %d items (%d new readings)",
            len(batch),
            len(result.new_readings),
        )

    async def _alert_step(self, readings: Sequence[StoredReading]) -> None:
        try:
            await self._evaluate_alerts(readings)
        except Exception:  # a rule bug must not stop ingest
            log.exception("alert evaluation failed; readings are stored")

    async def _alerts_from_live(self) -> None:
        """Shared ingest: evaluate every bridge's readings, in live-topic order.

        Each bridge commits only a share, but every bridge sees every committed
        reading on the live topic, so durations and hysteresis see the whole
        series; the store lets exactly one bridge raise, escalate or clear.
        """
        while True:
            await self._alert_step(await self._live_readings.get())

    async def _evaluate_alerts(self, readings: Sequence[StoredReading]) -> None:
        """Evaluate new readings, persist alert changes, then publish them."""
        changes = [c for r in readings if (c := self._alerts.observe(r))]
        if not changes:
            return
        delay = 0.1
        while True:
            try:
                applied = await asyncio.to_thread(self._alert_store.apply, changes)
                break
            except StoreError as exc:
                log.warning("alert update failed (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._settings.ingest.retry_max_seconds)
        for change, record, made in applied:
            if change.kind is ChangeKind.RAISE:
                self._alerts.bind(change, record.id)
            if made:
                self._metrics.alerts.labels(
                    change.kind.value, change.severity.value
                ).inc()
                self.publish_alert(record)

    def publish_alert(self, record: AlertRecord) -> None:
        """Push an alert's current state to live clients and the MQTT alerts topic."""
        self._fan_out([{"type": "alert", **record.to_json()}])
        if self._client is None:
            return
        message = AlertMessage(
            alert_id=record.id,
            kiosk_id=record.kiosk_id,
            metric=Metric(record.metric),
            severity=AlertSeverity(record.severity),
            state=AlertState(record.state),
            value=record.value,
            at=record.updated_at,
            scan_id=record.scan_id,
            estimate=record.estimate,
            message=record.message,
        )
        topic = alert_topic(record.kiosk_id, self._settings.mqtt.root_topic)
        self._client.publish(topic, message.to_bytes(), qos=1)

    def _acknowledge(self, deliveries: list[Delivery]) -> None:
        assert self._client is not None
        now = time.monotonic()
        # A delivery from an earlier connection is not acknowledged: the broker
        # redelivers it on the new one, and its old id may now name another message.
        stale = self._client.ack(deliveries)
        for d in deliveries:
            self._metrics.lag_seconds.observe(now - d.received_monotonic)
        if stale:
            log.info("skipped %d acknowledgements from a previous connection", stale)

    def _confirm(self, result: BatchResult) -> None:
        assert self._client is not None
        root = self._settings.mqtt.root_topic
        at = utc_now()
        for kiosk_id, through in result.through.items():
            confirmation = CommitConfirmation(kiosk_id=kiosk_id, through=through, at=at)
            self._client.publish(
                kiosk_topic(kiosk_id, Leaf.CONFIRM, root),
                confirmation.to_bytes(),
                qos=1,
                retain=True,
            )

    def _publish_live(self, batch: Batch, result: BatchResult) -> None:
        if self._shared and (result.new_readings or result.redelivered):
            # Alerts see every bridge's readings in one stream (others' arrive
            # on the live topic).
            self._live_readings.put_nowait([*result.new_readings, *result.redelivered])
        if not self._shared and self._hub.idle:
            return  # nobody to tell: skip rendering the messages
        messages = [r.live_message() for r in result.new_readings]
        messages.extend(r.live_message() for r in result.redelivered)
        for status in batch.statuses:
            body = status.model_dump(mode="json", exclude={"v", "kind"})
            kind = "status" if isinstance(status, KioskStatus) else "heartbeat"
            messages.append({"type": "status", "kind": kind, **body})
        for event in batch.events:
            body = event.model_dump(
                mode="json", exclude={"v", "kind", "patient_ref", "floor"}
            )
            messages.append({"type": "status", "kind": "scan", **body})
        self._fan_out(messages)

    def _fan_out(self, messages: list[dict[str, Any]]) -> None:
        """Send live messages to this bridge's clients, or to every bridge's.

        With a shared subscription each bridge ingests a share of the traffic, so
        committed data also goes out on the live topic that every other bridge
        subscribes to (with No Local: a bridge does not hear its own), and each
        feeds its own WebSocket clients from there.
        """
        if not messages:
            return
        self._hub.publish_messages(messages)
        if not self._shared or self._client is None:
            return
        root = self._settings.mqtt.root_topic
        by_kiosk: dict[str, list[dict[str, Any]]] = {}
        for m in messages:
            by_kiosk.setdefault(str(m["kiosk_id"]), []).append(m)
        for kiosk_id, chunk in by_kiosk.items():
            payload = orjson.dumps(chunk)
            self._client.publish(f"{root}/{LIVE_LEVEL}/{kiosk_id}", payload, qos=1)

    def _on_live(self, payload: bytes) -> None:
        """Feed this bridge's clients from another bridge's commit."""
        try:
            messages = orjson.loads(payload)
        except orjson.JSONDecodeError:
            log.warning("ignored a malformed live message (%d bytes)", len(payload))
            return
        if not isinstance(messages, list):
            return
        messages = [m for m in messages if isinstance(m, dict)]
        self._hub.publish_messages(messages)
        readings = []
        for m in messages:
            if m.get("type") == "reading":
                try:
                    readings.append(StoredReading.from_json(m))
                except (KeyError, TypeError, ValueError):
                    log.warning("ignored a malformed live reading")
        if readings:
            self._live_readings.put_nowait(readings)
