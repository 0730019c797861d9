"""The bridge's MQTT connection: an asyncio client built for acknowledge-after-commit.

paho runs its own network thread and reads each packet with several small socket
reads; at thousands of messages a second that thread and the event loop fight over
the GIL, and waking the loop once per burst costs a pipe write. This client runs
on the event loop itself: one ``data_received`` splits a whole chunk into packets
and hands every PUBLISH in it to the ingest at once, and the PUBACKs for a
committed batch leave in one write.

Scope, deliberately small: one persistent session (clean start off), QoS 0/1
subscriptions, manual PUBACK tied to the connection that delivered the message,
QoS 1 publishes kept until the broker acknowledges them (resent with DUP after a
reconnect, within the broker's Receive Maximum), keepalive, TLS and credentials,
reconnects with jittered back-off. MQTT 3.1.1 and 5.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from bridge.mqtt import codec
from bridge.mqtt.codec import PacketType, ProtocolError, Subscription
from vitals_contract.mqtt import JitteredBackoff
from vitals_contract.settings import MqttSettings

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_SECONDS: Final = 10.0
CLOSE_TIMEOUT_SECONDS: Final = 2.0  # for the broker to read our DISCONNECT and hang up
DEFAULT_SEND_QUOTA: Final = 100  # 3.1.1 has no Receive Maximum; paho's default is 20
_MAX_MID: Final = 0xFFFF


@dataclass(slots=True)  # one per message: frozen would cost 5x to build
class Delivery:
    """One received message, as the ingest batches it."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    received_monotonic: float
    generation: int  # which connection delivered it; mids restart per connection


class BrokerRefusedError(ConnectionError):
    """CONNACK carried a failure code."""


@dataclass(slots=True)
class _Outgoing:
    topic: str
    payload: bytes
    qos: int
    retain: bool


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection; hands parsed packets to the client."""

    def __init__(self, client: MqttClient) -> None:
        self._client = client
        self._reader = codec.PacketReader()
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[Exception | None] = (
            asyncio.get_running_loop().create_future()
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self._client.handle(self._reader.feed(data))
        except ProtocolError as exc:
            log.warning("broker broke the protocol (%s); reconnecting", exc)
            assert self.transport is not None
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


class MqttClient:
    """A persistent-session subscriber that acknowledges when told to."""

    def __init__(
        self,
        settings: MqttSettings,
        client_id: str,
        *,
        version: int,
        session_expiry: int,
        receive_maximum: int = 0,
        subscriptions: Sequence[Subscription],
        on_publishes: Callable[[list[Delivery]], None],
        on_state: Callable[[bool], None],
        backoff: JitteredBackoff,
        connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
    ) -> None:
        self._settings = settings
        self._client_id = client_id
        self.version = version
        self._session_expiry = session_expiry
        self._receive_maximum = receive_maximum
        self._subscriptions = list(subscriptions)
        self._on_publishes = on_publishes
        self._on_state = on_state
        self._backoff = backoff
        self._connect_timeout = connect_timeout
        self._ssl = _tls_context(settings)
        self.generation = 0
        self._conn: _Connection | None = None  # set once the CONNACK accepts us
        self._connecting: _Connection | None = None
        self._connack: asyncio.Future[codec.Connack] | None = None
        self._subscribe_mid = 0
        self._subscribed_generation = 0  # the connection whose SUBACK arrived
        self._mid = 0
        self._inflight: dict[int, bytes] = {}  # sent QoS 1 publishes, by mid
        self._queue: deque[_Outgoing] = deque()  # waiting for a connection or quota
        self._quota = DEFAULT_SEND_QUOTA
        self._last_sent = self._last_received = 0.0
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background, and keep reconnecting until stopped."""
        self._task = asyncio.create_task(self._run(), name="mqtt[bridge]")

    async def stop(self) -> None:
        """Disconnect cleanly; the broker keeps the session and what is unacked."""
        self._stopping = True
        conn = self._conn
        if conn is not None and conn.transport is not None:
            conn.transport.write(codec.DISCONNECT)
            # The broker closes the connection once it has read the DISCONNECT,
            # so everything before it (the last PUBACKs) has been acted on. Closing
            # first lost them: Mosquitto dropped what it had not read yet.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(conn.lost), CLOSE_TIMEOUT_SECONDS)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @property
    def is_connected(self) -> bool:
        """Tell whether a session is up (CONNACK received, not lost since)."""
        return self._conn is not None

    @property
    def is_subscribed(self) -> bool:
        """Tell whether the broker has answered this connection's SUBSCRIBE."""
        return self.is_connected and self._subscribed_generation == self.generation

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self._session()
            except (OSError, ssl.SSLError, ProtocolError, TimeoutError) as exc:
                if self._stopping:
                    return
                log.warning(
                    "broker connection failed: %s", str(exc) or type(exc).__name__
                )
            if self._stopping:
                return
            delay = self._backoff.next_delay()
            log.warning("reconnecting to the broker in %.1f s", delay)
            await asyncio.sleep(delay)

    async def _session(self) -> None:
        settings = self._settings
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._connect_timeout):
            _, conn = await loop.create_connection(
                lambda: _Connection(self),
                settings.host,
                settings.port,
                ssl=self._ssl,
                server_hostname=settings.host if self._ssl else None,
            )
        transport = conn.transport
        assert transport is not None
        self._connecting = conn
        try:
            connack = await self._handshake(conn)
            keepalive = connack.properties.get(
                codec.Prop.SERVER_KEEP_ALIVE, settings.keepalive_seconds
            )
            quota = connack.properties.get(codec.Prop.RECEIVE_MAXIMUM)
            self._quota = quota if isinstance(quota, int) else DEFAULT_SEND_QUOTA
            self._subscribe_mid = self._next_mid()
            self._write(
                codec.subscribe(
                    self._subscribe_mid, self._subscriptions, version=self.version
                )
            )
            # What the broker never acknowledged goes again, in order, flagged DUP.
            for packet in self._inflight.values():
                self._write(codec.with_dup(packet))
            self._pump()
            self._backoff.reset()
            log.info(
                "connected to broker %s:%d (MQTT %s, session %s), subscribed",
                settings.host,
                settings.port,
                "5" if self.version == codec.V5 else "3.1.1",
                "resumed" if connack.session_present else "new",
            )
            self._on_state(True)
            await self._watch(conn, int(keepalive))
            if not self._stopping:
                log.warning("broker connection lost")
        finally:
            was_up = self._conn is conn
            self._conn = self._connecting = None
            transport.abort()
            if was_up:
                self._on_state(False)

    async def _handshake(self, conn: _Connection) -> codec.Connack:
        settings = self._settings
        password = settings.password.get_secret_value() if settings.password else None
        self._connack = asyncio.get_running_loop().create_future()
        assert conn.transport is not None
        conn.transport.write(
            codec.connect(
                self._client_id,
                version=self.version,
                keepalive=settings.keepalive_seconds,
                clean_start=False,
                username=settings.username,
                password=password,
                session_expiry=self._session_expiry,
                receive_maximum=self._receive_maximum,
            )
        )
        done, _ = await asyncio.wait(
            (self._connack, conn.lost),
            timeout=self._connect_timeout,
            return_when=asyncio.FIRST_COMPLETED,
        )
        if not done:
            # amqtt, for one, never answers an MQTT 5 CONNECT that has properties.
            raise TimeoutError(f"no CONNACK within {self._connect_timeout:.0f} s")
        if self._connack not in done:
            raise ConnectionError("connection closed before CONNACK")
        connack = self._connack.result()
        if connack.code:
            raise BrokerRefusedError(
                f"broker refused the connection (code {connack.code})"
            )
        return connack

    async def _watch(self, conn: _Connection, keepalive: int) -> None:
        """Wait for the connection to end, pinging while it is quiet."""
        if keepalive <= 0:
            await conn.lost
            return
        half = keepalive / 2
        while not conn.lost.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(conn.lost), half)
            if conn.lost.done():
                return
            now = time.monotonic()
            if now - self._last_received > 1.5 * keepalive:
                log.warning("no answer from the broker for %.0f s", 1.5 * keepalive)
                assert conn.transport is not None
                conn.transport.abort()
                await conn.lost
                return
            if now - self._last_sent >= half or now - self._last_received >= half:
                self._write(codec.PINGREQ)

    # -- incoming ----------------------------------------------------------------

    def handle(self, packets: list[tuple[int, bytes]]) -> None:
        """Act on packets from the broker; every PUBLISH goes out in one call."""
        now = self._last_received = time.monotonic()
        deliveries: list[Delivery] = []
        generation = self.generation
        version = self.version
        for first, body in packets:
            kind = first >> 4
            if kind == PacketType.PUBLISH:
                p = codec.decode_publish(first, body, version=version)
                if p.qos > 1:
                    raise ProtocolError("QoS 2 delivery on a QoS 1 subscription")
                deliveries.append(
                    Delivery(p.topic, p.payload, p.mid, p.qos, now, generation)
                )
            elif kind == PacketType.PUBACK:
                mid, _reason = codec.decode_ack(body)
                if self._inflight.pop(mid, None) is not None and self._queue:
                    self._pump()
            elif kind == PacketType.CONNACK:
                if self._connack is None or self._connack.done():
                    raise ProtocolError("unexpected CONNACK")
                connack = codec.decode_connack(body, version=version)
                if not connack.code:
                    # A resumed session's stored messages may follow in this very
                    # read: they belong to the new connection, and so do their ids.
                    self.generation += 1
                    generation = self.generation
                    self._conn = self._connecting
                self._connack.set_result(connack)
            elif kind == PacketType.SUBACK:
                self._on_suback(body)
            elif kind == PacketType.DISCONNECT and version == codec.V5:
                code, reason = codec.decode_disconnect(body)
                log.warning("broker disconnected us: 0x%02x %s", code, reason or "")
            elif kind != PacketType.PINGRESP:
                raise ProtocolError(f"unexpected packet type {kind}")
        if deliveries:
            self._on_publishes(deliveries)

    def _on_suback(self, body: bytes) -> None:
        mid, codes = codec.decode_suback(body, version=self.version)
        if mid != self._subscribe_mid:
            return
        self._subscribed_generation = self.generation
        refused = [
            sub.topic_filter
            for sub, code in zip(self._subscriptions, codes, strict=False)
            if code >= 0x80
        ]
        if refused:
            log.error("broker refused subscriptions: %s", ", ".join(refused))

    # -- outgoing ----------------------------------------------------------------

    def ack(self, deliveries: Iterable[Delivery]) -> int:
        """Send the PUBACKs of committed QoS 1 deliveries in one write.

        A delivery from an earlier connection is skipped: its id means nothing
        now and the broker redelivers it on this one. Return how many were.
        """
        generation = self.generation
        connected = self._conn is not None
        packets = []
        stale = 0
        for d in deliveries:
            if not d.qos:
                continue
            if d.generation != generation or not connected:
                stale += 1
            else:
                packets.append(codec.puback(d.mid))
        if packets:
            self._write(b"".join(packets))
        return stale

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None:
        """Send now, or as soon as the connection and the broker's quota allow."""
        self._queue.append(_Outgoing(topic, payload, qos, retain))
        if self._conn is not None:
            self._pump()

    @property
    def unsent(self) -> int:
        """Publishes not yet acknowledged by the broker (in flight or queued)."""
        return len(self._inflight) + len(self._queue)

    def _pump(self) -> None:
        chunks = []
        while self._queue and len(self._inflight) < self._quota:
            out = self._queue.popleft()
            mid = self._next_mid() if out.qos else 0
            packet = codec.publish(
                out.topic,
                out.payload,
                qos=out.qos,
                retain=out.retain,
                mid=mid,
                version=self.version,
            )
            if out.qos:
                self._inflight[mid] = packet
            chunks.append(packet)
        if chunks:
            self._write(b"".join(chunks))

    def _next_mid(self) -> int:
        for _ in range(_MAX_MID):
            self._mid = self._mid % _MAX_MID + 1
            if self._mid not in self._inflight and self._mid != self._subscribe_mid:
                return self._mid
        raise RuntimeError("every packet identifier is in flight")

    def _write(self, data: bytes) -> None:
        conn = self._conn
        if conn is None or conn.transport is None or conn.transport.is_closing():
            return
        conn.transport.write(data)
        self._last_sent = time.monotonic()


def _tls_context(settings: MqttSettings) -> ssl.SSLContext | None:
    """Verify the broker against the configured CA; present a client cert if set."""
    if settings.tls_ca_file is None:
        return None
    context = ssl.create_default_context(cafile=str(settings.tls_ca_file))
    if settings.tls_cert_file is not None:
        context.load_cert_chain(
            str(settings.tls_cert_file),
            str(settings.tls_key_file) if settings.tls_key_file else None,
        )
    return context
