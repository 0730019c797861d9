"""The hub's kiosk index delivers exactly what a full scan of every client would."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.hub import Hub, Subscription

KIOSKS = ("k1", "k2", "k3", "k4")
METRICS = ("heart_rate", "spo2")

subscriptions = st.builds(
    Subscription,
    kiosks=st.none() | st.frozensets(st.sampled_from(KIOSKS), max_size=3),
    metrics=st.none() | st.frozensets(st.sampled_from(METRICS), min_size=1),
    status=st.booleans(),
    alerts=st.booleans(),
)
messages = st.fixed_dictionaries(
    {
        "type": st.sampled_from(("reading", "status", "alert")),
        "kiosk_id": st.sampled_from(KIOSKS),
        "metric": st.sampled_from(METRICS),
    }
)


def expected(sub: Subscription, message: dict[str, str]) -> bool:
    """The documented filter, written out independently of the hub."""
    if sub.kiosks is not None and message["kiosk_id"] not in sub.kiosks:
        return False
    if message["type"] == "reading":
        return sub.metrics is None or message["metric"] in sub.metrics
    return sub.status if message["type"] == "status" else sub.alerts


@settings(max_examples=150, deadline=None)
@given(
    subs=st.lists(subscriptions, min_size=1, max_size=6),
    batches=st.lists(st.lists(messages, max_size=6), max_size=5),
    resubscribe=st.none() | st.tuples(st.integers(0, 5), subscriptions),
    leaver=st.none() | st.integers(0, 5),
)
def test_each_client_gets_its_messages_in_publish_order(
    subs: list[Subscription],
    batches: list[list[dict[str, str]]],
    resubscribe: tuple[int, Subscription] | None,
    leaver: int | None,
) -> None:
    async def run() -> None:
        hub = Hub(queue_size=1000)
        clients = [hub.register() for _ in subs]
        for client, sub in zip(clients, subs, strict=True):
            hub.subscribe(client, sub)
        if resubscribe is not None and resubscribe[0] < len(clients):
            hub.subscribe(clients[resubscribe[0]], resubscribe[1])
            subs[resubscribe[0]] = resubscribe[1]
        gone = clients[leaver] if leaver is not None and leaver < len(clients) else None
        if gone is not None:
            hub.unregister(gone)
        sent = []
        for i, batch in enumerate(batches):
            numbered = [{**m, "n": f"{i}.{j}"} for j, m in enumerate(batch)]
            hub.publish_messages(numbered)
            sent.extend(numbered)
        for client, sub in zip(clients, subs, strict=True):
            got = []
            while not client.queue.empty():
                got.append(client.queue.get_nowait().message["n"])
            want = [] if client is gone else [m["n"] for m in sent if expected(sub, m)]
            assert got == want

    asyncio.run(run())


def test_a_dropped_client_leaves_the_index() -> None:
    async def run() -> None:
        hub = Hub(queue_size=1)
        slow, other = hub.register(), hub.register()
        for client in (slow, other):
            hub.subscribe(client, Subscription(kiosks=frozenset({"k1"})))
        message = {"type": "status", "kiosk_id": "k1"}
        hub.publish_messages([message, message])  # the second overflows both
        assert slow.dropped.is_set()
        assert other.dropped.is_set()
        assert len(hub) == 0
        assert hub.dropped_clients == 2
        late = hub.register()
        hub.subscribe(late, Subscription(kiosks=frozenset({"k1"})))
        hub.publish_messages([message])
        assert late.queue.qsize() == 1
        assert slow.queue.qsize() == 1

    asyncio.run(run())


def test_a_listener_hears_only_while_it_wants_to() -> None:
    heard: list[list[dict[str, str]]] = []
    wanting = [False]
    hub = Hub(queue_size=10)
    hub.add_listener(heard.append, wanted=lambda: wanting[0])
    assert hub.idle
    hub.publish_messages([{"type": "status", "kiosk_id": "k1"}])
    assert heard == []
    wanting[0] = True
    assert not hub.idle
    hub.publish_messages([{"type": "status", "kiosk_id": "k2"}])
    assert heard == [[{"type": "status", "kiosk_id": "k2"}]]
