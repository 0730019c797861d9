"""The foundation path, as users run it: broker, bridge and a camera kiosk as
separate processes; readings reach SQL, REST and a WebSocket client in order."""

from __future__ import annotations

import json
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text
from support import (
    ALL_TEST_SCOPES,
    MOSQUITTO_ADDRESS,
    TEST_JWT_SECRET,
    Proc,
    tcp_reachable,
    wait_for,
)
from websockets.sync.client import connect
from websockets.typing import Subprotocol

from api.auth import sign_token
from bridge.broker import free_port
from bridge.config import AuthSettings

pytestmark = pytest.mark.e2e


def outbox_state(path: Path) -> tuple[int, int]:
    """Return (next seq, messages still waiting) of a kiosk's outbox file."""
    with sqlite3.connect(path) as db:
        (next_seq,) = db.execute(
            "SELECT value FROM meta WHERE key='next_seq'"
        ).fetchone()
        (waiting,) = db.execute("SELECT COUNT(*) FROM outbox").fetchone()
    return int(next_seq), int(waiting)


@pytest.fixture(params=["amqtt+sqlite", "mosquitto+postgres"])
def services(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[dict[str, Any]]:
    if request.param == "mosquitto+postgres":
        if not tcp_reachable(*MOSQUITTO_ADDRESS):
            pytest.skip("Mosquitto not reachable on 127.0.0.1:1883")
        url: str = request.getfixturevalue("postgres_url")
        yield {"mqtt_port": MOSQUITTO_ADDRESS[1], "db": url}
        return
    port = free_port()
    broker = Proc("broker", ["api.cli", "broker", "--port", str(port)], {}, tmp_path)
    broker.start()
    try:
        assert wait_for(lambda: tcp_reachable("127.0.0.1", port, 0.2), 15)
        yield {"mqtt_port": port, "db": f"sqlite:///{tmp_path / 'vitals.db'}"}
    finally:
        broker.stop()


def test_camera_kiosk_to_sql_rest_and_websocket(
    services: dict[str, Any], tmp_path: Path
) -> None:
    root = f"e2e-{uuid.uuid4().hex[:8]}/v1"
    http_port = free_port()
    bridge = Proc(
        "bridge",
        ["api.cli", "run"],
        {
            "VITALS_DATABASE_URL": services["db"],
            "VITALS_AUTH__JWT_SECRET": TEST_JWT_SECRET,
            "VITALS_MQTT__PORT": str(services["mqtt_port"]),
            "VITALS_MQTT__ROOT_TOPIC": root,
            "VITALS_HTTP__PORT": str(http_port),
            "VITALS_INGEST__CLIENT_ID": f"bridge-{uuid.uuid4().hex[:6]}",
        },
        tmp_path,
    ).start()
    base = f"http://127.0.0.1:{http_port}"
    token = sign_token(
        AuthSettings(jwt_secret=TEST_JWT_SECRET), "e2e", list(ALL_TEST_SCOPES)
    )
    headers = {"Authorization": f"Bearer {token}"}
    kiosk_id = "cam-kiosk"
    outbox = tmp_path / "outbox.db"
    try:
        assert wait_for(lambda: _ok(f"{base}/ready"), 30), bridge.log_tail()

        received: list[dict[str, Any]] = []
        listening = threading.Event()
        done = threading.Event()

        def listen() -> None:
            protocols = [Subprotocol("vitals.v1"), Subprotocol(f"bearer.{token}")]
            with connect(
                f"ws://127.0.0.1:{http_port}/ws", subprotocols=protocols
            ) as ws:
                ws.send(json.dumps({"type": "subscribe", "kiosks": [kiosk_id]}))
                listening.set()
                while not done.is_set():
                    try:
                        message = json.loads(ws.recv(0.5))
                    except TimeoutError:
                        continue
                    if message["type"] == "reading":
                        received.append(message)

        listener = threading.Thread(target=listen, daemon=True)
        listener.start()
        assert listening.wait(10)

        agent = Proc(
            "agent",
            ["kiosk_agent.cli", "run"],
            {
                "KIOSK_KIOSK_ID": kiosk_id,
                "KIOSK_CAMERA": "synthetic",
                "KIOSK_MQTT__PORT": str(services["mqtt_port"]),
                "KIOSK_MQTT__ROOT_TOPIC": root,
                "KIOSK_OUTBOX_PATH": str(outbox),
                "KIOSK_SCAN_SECONDS": "10",
            },
            tmp_path,
        ).start()
        try:
            # A whole scan: partial readings every second, then the final summary.
            assert wait_for(lambda: any(r["final"] for r in received), 60), (
                agent.log_tail()
            )
            assert wait_for(lambda: outbox_state(outbox)[1] == 0, 20)
        finally:
            agent.stop()
        done.set()
        listener.join(5)

        issued, waiting = outbox_state(outbox)
        engine = create_engine(services["db"])
        with engine.connect() as conn:
            stored = conn.execute(
                text("SELECT seq, metric FROM readings WHERE kiosk_id=:k ORDER BY id"),
                {"k": kiosk_id},
            ).all()
            events = conn.execute(
                text("SELECT seq, state FROM scan_events WHERE kiosk_id=:k"),
                {"k": kiosk_id},
            ).all()
        engine.dispose()
        seqs = sorted([s for s, _ in stored] + [s for s, _ in events])
        assert waiting == 0
        assert seqs == list(range(issued)), "lost or doubled"
        assert {state for _, state in events} >= {
            "face_present",
            "scanning",
            "complete",
        }
        # Respiration needs a longer window than this short scan; it may be refused.
        assert {m for _, m in stored} >= {"heart_rate", "spo2"}

        live = [r["seq"] for r in received]
        assert live == sorted(live)
        assert len(live) == len(set(live))
        assert set(live) <= {s for s, _ in stored}
        page = httpx.get(
            f"{base}/api/v1/readings",
            params={"kiosk_id": kiosk_id, "limit": 1000},
            headers=headers,
        ).json()
        assert [r["seq"] for r in page["items"]] == [s for s, _ in stored]
        assert all(0 <= r["quality"] <= 1 for r in page["items"])
        hr = [
            r["value"]
            for r in page["items"]
            if r["metric"] == "heart_rate" and r["final"]
        ]
        assert hr, "no final heart rate"
    finally:
        bridge.stop()


def _ok(url: str) -> bool:
    try:
        return httpx.get(url).status_code == 200
    except httpx.HTTPError:
        return False
