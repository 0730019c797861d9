"""The bridge's own MQTT client against real brokers: acknowledge-after-commit holds.

A message is acknowledged only when told, so what the bridge never acknowledged
comes back after a reconnect and what it did acknowledge does not; an id from an
earlier connection is never acknowledged on a new one; publishes wait out an
outage; the broker's Receive Maximum bounds what is in flight.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from support import BrokerEndpoint, TcpProxy

from bridge.mqtt import V5, V311, Delivery, MqttClient, Subscription
from vitals_contract.mqtt import JitteredBackoff
from vitals_contract.settings import MqttSettings


class Recorder:
    """Collects what a client hands over, and its connection state changes."""

    def __init__(self, *, ack_with: MqttClient | None = None) -> None:
        self.deliveries: list[Delivery] = []
        self.states: list[bool] = []
        self.ack_with = ack_with  # acknowledge on arrival, like a committed batch
        self.stale = 0  # acknowledgements refused as belonging to another connection

    def on_publishes(self, deliveries: list[Delivery]) -> None:
        self.deliveries.extend(deliveries)
        if self.ack_with is not None:
            self.stale += self.ack_with.ack(deliveries)

    def on_state(self, up: bool) -> None:
        self.states.append(up)

    def payloads(self) -> list[bytes]:
        return [d.payload for d in self.deliveries]


def version_for(broker: BrokerEndpoint) -> int:
    return V311 if broker.kind == "amqtt" else V5


def make_client(
    broker: BrokerEndpoint,
    recorder: Recorder,
    *,
    client_id: str,
    port: int | None = None,
    version: int | None = None,
    receive_maximum: int = 0,
    keepalive: int = 30,
    topic_filter: str | None = None,
) -> MqttClient:
    # model_copy skips validation: keepalive may go below the 5 s users may set.
    settings = MqttSettings(host=broker.host, port=port or broker.port).model_copy(
        update={"keepalive_seconds": keepalive}
    )
    return MqttClient(
        settings,
        client_id,
        version=version_for(broker) if version is None else version,
        session_expiry=300,
        receive_maximum=receive_maximum,
        subscriptions=[Subscription(topic_filter or f"{broker.root}/#")],
        on_publishes=recorder.on_publishes,
        on_state=recorder.on_state,
        backoff=JitteredBackoff(0.1, 0.3),
        connect_timeout=2.0,
    )


async def until(predicate: Callable[[], object], within: float = 10.0) -> None:
    """Let the event loop run until ``predicate`` holds; fail after ``within`` s."""
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110 - polls state, not an event
            await asyncio.sleep(0.02)


def publish_all(
    broker: BrokerEndpoint, topic: str, payloads: list[bytes], qos: int = 1
) -> None:
    """Publish with a real paho client and wait for every PUBACK."""
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"pub-{uuid.uuid4().hex[:8]}",
        protocol=MQTTProtocolVersion.MQTTv311,
    )
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        infos = [client.publish(topic, p, qos=qos) for p in payloads]
        for info in infos:
            info.wait_for_publish(10)
            assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.fixture
def client_id() -> str:
    return f"bridge-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def subscriber_ready() -> AsyncIterator[list[MqttClient]]:
    """Clients the test started; stopped at the end whatever happened."""
    started: list[MqttClient] = []
    yield started
    for c in started:
        await c.stop()


async def start(started: list[MqttClient], client: MqttClient) -> MqttClient:
    """Start ``client`` and wait until the broker has granted its subscription."""
    client.start()
    started.append(client)
    await until(lambda: client.is_subscribed)
    return client


async def test_delivers_what_the_broker_carries_and_acks_on_request(
    broker: BrokerEndpoint, client_id: str, subscriber_ready: list[MqttClient]
) -> None:
    rec = Recorder()
    client = make_client(broker, rec, client_id=client_id)
    # Mosquitto stops at 20 unacknowledged messages: more than that only arrive
    # because each read's messages are acknowledged as they come.
    rec.ack_with = client
    await start(subscriber_ready, client)
    payloads = [f"m{i}".encode() for i in range(200)]
    await asyncio.to_thread(publish_all, broker, f"{broker.root}/k1/r", payloads)
    await until(lambda: len(rec.deliveries) >= len(payloads))
    await asyncio.sleep(0.2)  # room for a redelivery, which would be one too many
    assert sorted(rec.payloads()) == sorted(payloads)
    assert rec.stale == 0
    assert {d.topic for d in rec.deliveries} == {f"{broker.root}/k1/r"}
    assert all(d.qos == 1 and d.generation == client.generation for d in rec.deliveries)
    assert rec.states == [True]


@pytest.mark.mosquitto
async def test_unacknowledged_messages_come_back_acknowledged_ones_do_not(
    mosquitto_broker: BrokerEndpoint,
    client_id: str,
    subscriber_ready: list[MqttClient],
) -> None:
    broker = mosquitto_broker
    rec = Recorder()
    first = await start(subscriber_ready, make_client(broker, rec, client_id=client_id))
    payloads = [f"m{i}".encode() for i in range(20)]
    await asyncio.to_thread(publish_all, broker, f"{broker.root}/k1/r", payloads)
    await until(lambda: len(rec.deliveries) == 20)
    committed = [d for d in rec.deliveries if int(d.payload[1:]) % 2 == 0]
    assert first.ack(committed) == 0
    await first.stop()

    rec2 = Recorder()
    second = make_client(broker, rec2, client_id=client_id)
    rec2.ack_with = second
    await start(subscriber_ready, second)
    odd = sorted(p for p in payloads if int(p[1:]) % 2)
    await until(lambda: len(rec2.deliveries) >= len(odd))
    await asyncio.sleep(0.3)  # anything acknowledged would have arrived by now
    assert sorted(rec2.payloads()) == odd
    # They may arrive in the very read that carries the CONNACK: they still
    # belong to the new connection, so their acknowledgements go out.
    assert rec2.stale == 0
    await second.stop()
    rec3 = Recorder()
    await start(subscriber_ready, make_client(broker, rec3, client_id=client_id))
    await asyncio.sleep(0.5)
    assert rec3.deliveries == []


@pytest.mark.mosquitto
async def test_ids_from_a_lost_connection_are_never_acknowledged_on_the_next(
    mosquitto_broker: BrokerEndpoint,
    client_id: str,
    subscriber_ready: list[MqttClient],
) -> None:
    proxy = TcpProxy(mosquitto_broker.port).start()
    try:
        rec = Recorder()
        client = await start(
            subscriber_ready,
            make_client(mosquitto_broker, rec, client_id=client_id, port=proxy.port),
        )
        payloads = [f"m{i}".encode() for i in range(10)]
        topic = f"{mosquitto_broker.root}/k1/r"
        await asyncio.to_thread(publish_all, mosquitto_broker, topic, payloads)
        await until(lambda: len(rec.deliveries) == 10)
        before = list(rec.deliveries)
        generation = client.generation

        await asyncio.to_thread(proxy.cut)
        await until(lambda: not client.is_connected)
        assert client.ack(before) == 10  # no connection: all stale
        await asyncio.to_thread(proxy.restore)
        await until(lambda: client.is_connected and client.generation > generation)
        # Same ids, new connection: still stale, and the broker sends them again.
        assert client.ack(before) == 10
        await until(lambda: len(rec.deliveries) >= 20)
        again = rec.deliveries[10:]
        assert sorted(d.payload for d in again) == sorted(payloads)
        assert all(d.generation == client.generation for d in again)
        assert client.ack(again) == 0
        await until(lambda: len(rec.states) >= 3)
        assert rec.states == [True, False, True]
    finally:
        proxy.close()


async def test_publishes_made_during_an_outage_arrive_after_it(
    broker: BrokerEndpoint, client_id: str, subscriber_ready: list[MqttClient]
) -> None:
    watch_rec = Recorder()
    watch_topic = f"{broker.root}/confirm/#"
    watcher = make_client(
        broker, watch_rec, client_id=f"{client_id}-watch", topic_filter=watch_topic
    )
    watch_rec.ack_with = watcher
    await start(subscriber_ready, watcher)
    proxy = TcpProxy(broker.port).start()
    try:
        rec = Recorder()
        sender = await start(
            subscriber_ready,
            make_client(
                broker,
                rec,
                client_id=client_id,
                port=proxy.port,
                topic_filter=f"{broker.root}/unused",
            ),
        )
        await asyncio.to_thread(proxy.cut)
        await until(lambda: not sender.is_connected)
        for i in range(30):
            sender.publish(f"{broker.root}/confirm/k{i % 3}", f"c{i}".encode())
        assert sender.unsent == 30
        await asyncio.to_thread(proxy.restore)
        await until(lambda: len(watch_rec.deliveries) >= 30)
        await until(lambda: sender.unsent == 0)
        assert sorted(watch_rec.payloads()) == sorted(
            f"c{i}".encode() for i in range(30)
        )
    finally:
        proxy.close()


@pytest.mark.mosquitto
async def test_broker_holds_back_beyond_our_receive_maximum(
    mosquitto_broker: BrokerEndpoint,
    client_id: str,
    subscriber_ready: list[MqttClient],
) -> None:
    rec = Recorder()
    client = await start(
        subscriber_ready,
        make_client(
            mosquitto_broker, rec, client_id=client_id, version=V5, receive_maximum=5
        ),
    )
    payloads = [f"m{i}".encode() for i in range(12)]
    topic = f"{mosquitto_broker.root}/k1/r"
    await asyncio.to_thread(publish_all, mosquitto_broker, topic, payloads)
    await until(lambda: len(rec.deliveries) >= 5)
    await asyncio.sleep(0.3)
    assert len(rec.deliveries) == 5  # nothing more until we acknowledge
    # Mosquitto 2.0.11 then sends the rest at once, past the window (seen here);
    # what we promise is only that it waits for our acknowledgements.
    client.ack(rec.deliveries)
    await until(lambda: len(rec.deliveries) >= 12)
    client.ack(rec.deliveries[5:])
    assert sorted(rec.payloads()) == sorted(payloads)


@pytest.mark.mosquitto
async def test_keepalive_holds_an_idle_connection_open(
    mosquitto_broker: BrokerEndpoint,
    client_id: str,
    subscriber_ready: list[MqttClient],
) -> None:
    rec = Recorder()
    client = await start(
        subscriber_ready,
        make_client(mosquitto_broker, rec, client_id=client_id, keepalive=1),
    )
    # Mosquitto drops a client silent for 1.5 keepalives; ours pings in time.
    await asyncio.sleep(3.5)
    assert client.is_connected
    assert rec.states == [True]


async def test_a_refusing_broker_is_retried_never_reported_up(
    amqtt_broker: BrokerEndpoint,
    client_id: str,
    subscriber_ready: list[MqttClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # amqtt speaks 3.1.1 only: it never answers our MQTT 5 CONNECT.
    rec = Recorder()
    client = make_client(amqtt_broker, rec, client_id=client_id, version=V5)
    client.start()
    subscriber_ready.append(client)
    await until(
        lambda: (
            sum("reconnecting to the broker" in r.message for r in caplog.records) >= 2
        )
    )
    assert not client.is_connected
    assert rec.states == []


async def test_a_broker_that_breaks_the_protocol_is_dropped(
    client_id: str, subscriber_ready: list[MqttClient]
) -> None:
    """A server that answers CONNECT with garbage: the client aborts and retries."""
    attempts = 0

    async def liar(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal attempts
        attempts += 1
        await reader.read(1024)
        writer.write(b"\xf0\x00")  # packet type 15 (AUTH) with no CONNACK before it
        await writer.drain()
        await reader.read(1024)  # until the client hangs up
        writer.close()

    server = await asyncio.start_server(liar, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        rec = Recorder()
        endpoint = BrokerEndpoint("127.0.0.1", port, "liar")
        client = make_client(endpoint, rec, client_id=client_id, version=V311)
        client.start()
        subscriber_ready.append(client)
        await until(lambda: attempts >= 2)
        assert not client.is_connected
        assert rec.states == []
    finally:
        server.close()
