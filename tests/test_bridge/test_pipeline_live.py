"""Bridge and API against real brokers and databases: ingest, confirm, REST, WS."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from support import BrokerEndpoint, ServerThread, bridge_settings, wait_for

from kiosk_agent.config import AgentSettings
from kiosk_agent.simulate import SimulatedKiosk
from vitals_contract import (
    METRICS,
    Leaf,
    Metric,
    Reading,
    ReadingsMessage,
    alert_topic,
    kiosk_topic,
)

NOW = datetime.now(UTC)


class Kiosk:
    """A bare paho client speaking the contract, to script exact messages."""

    def __init__(self, broker: BrokerEndpoint, kiosk_id: str) -> None:
        self.broker = broker
        self.kiosk_id = kiosk_id
        self.confirmed: list[int] = []
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:8]}"
        )
        self.client.on_message = self._on_message
        self._subscribed = threading.Event()
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.client.subscribe(self.topic(Leaf.CONFIRM), qos=1)
        assert self._subscribed.wait(5)

    def topic(self, leaf: Leaf) -> str:
        return kiosk_topic(self.kiosk_id, leaf, self.broker.root)

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        self.confirmed.append(json.loads(msg.payload)["through"])

    def send(
        self,
        seqs: list[int],
        floor: int = 0,
        value: Callable[[int], float] | None = None,
    ) -> None:
        readings = [
            Reading(
                seq=s,
                scan_id="scan1",
                metric=Metric.HEART_RATE,
                value=value(s) if value else 60 + s % 30,
                unit=METRICS[Metric.HEART_RATE].unit,
                quality=0.9,
                measured_at=NOW + timedelta(seconds=s),
            )
            for s in seqs
        ]
        message = ReadingsMessage(
            kiosk_id=self.kiosk_id, sent_at=NOW, floor=floor, readings=readings
        )
        self.raw(message.to_bytes())

    def raw(self, payload: bytes, leaf: Leaf = Leaf.READINGS) -> None:
        self.client.publish(self.topic(leaf), payload, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def get_readings(server: ServerThread, **params: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        query = {**params, "limit": 50, **({"cursor": cursor} if cursor else {})}
        page = server.http().get("/api/v1/readings", params=query).json()
        items.extend(page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            return items


@pytest.fixture
def kiosk(broker: BrokerEndpoint, bridge_server: ServerThread) -> Any:
    k = Kiosk(broker, f"k-{uuid.uuid4().hex[:6]}")
    assert wait_for(lambda: httpx.get(f"{bridge_server.base}/ready").status_code == 200)
    yield k
    k.close()


def test_readings_flow_to_sql_rest_and_websocket_once_and_in_order(
    bridge_server: ServerThread, kiosk: Kiosk
) -> None:
    with bridge_server.ws() as ws:
        ws.send(json.dumps({"type": "subscribe", "kiosks": [kiosk.kiosk_id]}))
        assert json.loads(ws.recv(5))["type"] == "subscribed"

        for start in range(0, 100, 5):
            kiosk.send(list(range(start, start + 5)))
        kiosk.send([10, 11, 12])  # a redelivery: must not be stored or pushed twice

        live = []
        while len(live) < 100:
            message = json.loads(ws.recv(10))
            if message["type"] == "reading":
                live.append(message["seq"])
    assert live == list(range(100))

    stored = get_readings(bridge_server, kiosk_id=kiosk.kiosk_id)
    assert [r["seq"] for r in stored] == list(range(100))
    assert wait_for(lambda: kiosk.confirmed and kiosk.confirmed[-1] == 99)
    assert kiosk.confirmed == sorted(kiosk.confirmed)


def test_bad_messages_become_dead_letters_and_spare_the_good(
    bridge_server: ServerThread, kiosk: Kiosk
) -> None:
    kiosk.send([0, 1])
    kiosk.raw(b"\xff not json")
    kiosk.raw(b'{"v": 1, "kind": "readings"}')
    good = ReadingsMessage(
        kiosk_id=kiosk.kiosk_id,
        sent_at=NOW,
        readings=[
            Reading(
                seq=2,
                metric=Metric.SPO2,
                value=97,
                unit="%",
                quality=0.6,
                measured_at=NOW,
            )
        ],
    )
    mixed = json.loads(good.to_bytes())
    mixed["readings"].append({**mixed["readings"][0], "seq": 3, "value": 250})
    kiosk.raw(json.dumps(mixed).encode())
    kiosk.send([4])

    assert wait_for(lambda: kiosk.confirmed and kiosk.confirmed[-1] == 4)
    stored = get_readings(bridge_server, kiosk_id=kiosk.kiosk_id)
    assert [r["seq"] for r in stored] == [0, 1, 2, 4]
    assert stored[2]["estimate"] is True
    metrics = bridge_server.http().get("/metrics").text
    assert "vitals_ingest_dead_letters_total 3.0" in metrics


def test_websocket_resume_replays_the_gap(
    bridge_server: ServerThread, kiosk: Kiosk
) -> None:
    kiosk.send(list(range(0, 10)))
    assert wait_for(
        lambda: len(get_readings(bridge_server, kiosk_id=kiosk.kiosk_id)) == 10
    )
    seen = get_readings(bridge_server, kiosk_id=kiosk.kiosk_id)[:4]

    with bridge_server.ws() as ws:
        ws.send(
            json.dumps(
                {
                    "type": "subscribe",
                    "kiosks": [kiosk.kiosk_id],
                    "since": seen[-1]["id"],
                }
            )
        )
        assert json.loads(ws.recv(5))["type"] == "subscribed"
        kiosk.send(list(range(10, 15)))
        got = []
        while len(got) < 11:
            message = json.loads(ws.recv(10))
            if message["type"] == "reading":
                got.append(message["seq"])
    assert got == list(range(4, 15))


def test_bad_requests_get_precise_errors(bridge_server: ServerThread) -> None:
    bad = [
        {"cursor": "abc"},
        {"metric": "blood_pressure"},
        {"since": "yesterday"},
        {"since": "2026-12-03T10:00:00"},  # no timezone
        {"limit": 0},
        {"kiosk_id": "a/b"},
    ]
    for params in bad:
        response = bridge_server.http().get("/api/v1/readings", params=params)
        assert response.status_code == 422, params
    with bridge_server.ws() as ws:
        ws.send('{"type": "hello"}')
        with pytest.raises(Exception, match="4400"):
            ws.recv(5)


def test_alert_is_raised_once_pushed_acknowledged_and_cleared(
    broker: BrokerEndpoint, bridge_server: ServerThread, kiosk: Kiosk
) -> None:
    heard: list[dict[str, Any]] = []
    listener = mqtt.Client(CallbackAPIVersion.VERSION2)
    listener.on_message = lambda _c, _u, m: heard.append(json.loads(m.payload))
    listener.connect(broker.host, broker.port)
    listener.subscribe(alert_topic(kiosk.kiosk_id, broker.root), qos=1)
    listener.loop_start()

    def next_alert(ws: Any) -> dict[str, Any]:
        while True:
            message = json.loads(ws.recv(10))
            if message["type"] == "alert":
                return message

    try:
        with bridge_server.ws() as ws:
            ws.send(json.dumps({"type": "subscribe", "kiosks": [kiosk.kiosk_id]}))
            # 20 s of tachycardia at 150/min, one reading per second, in two messages.
            kiosk.send(list(range(10)), value=lambda s: 150)
            kiosk.send(list(range(10, 20)), value=lambda s: 150)
            raised = next_alert(ws)
            assert (raised["state"], raised["severity"], raised["metric"]) == (
                "raised",
                "high",
                "heart_rate",
            )
            alert_id = raised["alert_id"]

            client = bridge_server.http()
            assert client.post(f"/api/v1/alerts/{alert_id}/ack").status_code == 200
            assert next_alert(ws)["state"] == "acknowledged"
            assert client.post("/api/v1/alerts/999999/ack").status_code == 404

            kiosk.send(list(range(20, 40)), value=lambda s: 72)
            cleared = next_alert(ws)
            assert (cleared["alert_id"], cleared["state"]) == (alert_id, "cleared")

        alerts = bridge_server.http().get("/api/v1/alerts").json()
        assert [a["alert_id"] for a in alerts] == [alert_id]
        assert wait_for(
            lambda: [h["state"] for h in heard] == ["raised", "acknowledged", "cleared"]
        )
        assert all(h["kiosk_id"] == kiosk.kiosk_id for h in heard)
    finally:
        listener.disconnect()
        listener.loop_stop()


def test_server_sent_events_resume_from_last_event_id(
    bridge_server: ServerThread, kiosk: Kiosk
) -> None:
    kiosk.send(list(range(6)))
    assert wait_for(
        lambda: len(get_readings(bridge_server, kiosk_id=kiosk.kiosk_id)) == 6
    )
    third = get_readings(bridge_server, kiosk_id=kiosk.kiosk_id)[2]

    client = bridge_server.http()
    headers = {"Last-Event-ID": str(third["id"])}
    seqs: list[int] = []
    with client.stream(
        "GET", "/api/v1/stream", params={"kiosk_id": kiosk.kiosk_id}, headers=headers
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line[len("event: ") :]
            elif line.startswith("data: ") and event == "reading":
                seqs.append(json.loads(line[len("data: ") :])["seq"])
                if len(seqs) == 3:
                    kiosk.send([6, 7])
                if len(seqs) == 5:
                    break
    assert seqs == [3, 4, 5, 6, 7]
    bad = client.get("/api/v1/stream", headers={"Last-Event-ID": "abc"})
    assert bad.status_code == 422


def test_flooding_kiosk_is_slowed_down_without_losing_data(
    amqtt_broker: BrokerEndpoint, sqlite_url: str, tmp_path: Path
) -> None:
    settings = bridge_settings(
        amqtt_broker,
        sqlite_url,
        ingest={"kiosk_messages_per_second": 20, "kiosk_burst": 10},
    )
    server = ServerThread(settings)
    server.start()
    try:
        kiosk = SimulatedKiosk(
            AgentSettings(
                kiosk_id="flood",
                mqtt={"port": amqtt_broker.port, "root_topic": amqtt_broker.root},
                outbox_path=tmp_path / "outbox.db",
                confirm_timeout_seconds=1,
            )
        )
        stop = threading.Event()
        runner = threading.Thread(target=kiosk.run, args=(60, 500.0, stop))
        runner.start()
        runner.join(60)
        stop.set()
        assert not runner.is_alive()
        seqs = [r["seq"] for r in get_readings(server, kiosk_id="flood")]
        assert sorted(seqs) == list(range(300))
        metrics = server.http().get("/metrics").text
        deferred = next(
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith("vitals_ingest_rate_limited_total")
        )
        assert deferred > 0
    finally:
        server.stop()
