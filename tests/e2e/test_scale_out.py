"""Three bridges share ingest on an MQTT 5 broker; one is killed mid-run.

Mosquitto (a private instance) and PostgreSQL, 200 simulated kiosks. Every reading
must be stored exactly once, every WebSocket client on a surviving bridge must see
every reading of its subscription, and the survivors take over the killed share.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text
from support import ALL_TEST_SCOPES, TEST_JWT_SECRET, Proc, tcp_reachable, wait_for
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect
from websockets.typing import Subprotocol

from api.auth import sign_token
from bridge.broker import free_port
from bridge.config import AuthSettings

pytestmark = pytest.mark.e2e

KIOSKS = 200
MESSAGES = 12  # per kiosk, 5 readings each
RATE_HZ = 1.0
FLEETS = ("fleetA", "fleetB")  # paho's select() loop caps one process near 170 kiosks
WATCHED = ["fleetA-3", "fleetA-77", "fleetB-50"]


def test_three_bridges_share_ingest_and_survive_a_kill(
    tmp_path: Path, postgres_url: str
) -> None:
    if shutil.which("mosquitto") is None:
        pytest.skip("mosquitto binary not installed")
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "max_inflight_messages 2000\nmax_queued_messages 100000\n"
    )
    log = (tmp_path / "mosquitto.log").open("ab")
    mosquitto = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=log, stderr=log)
    root = f"scale-{uuid.uuid4().hex[:6]}/v1"
    token = sign_token(
        AuthSettings(jwt_secret=TEST_JWT_SECRET), "t", list(ALL_TEST_SCOPES)
    )
    bridges: list[tuple[Proc, int]] = []
    try:
        assert wait_for(lambda: tcp_reachable("127.0.0.1", port, 0.2), 10)
        for n in range(3):
            http_port = free_port()
            env = {
                "VITALS_DATABASE_URL": postgres_url,
                "VITALS_AUTH__JWT_SECRET": TEST_JWT_SECRET,
                "VITALS_MQTT__PORT": str(port),
                "VITALS_MQTT__ROOT_TOPIC": root,
                "VITALS_HTTP__PORT": str(http_port),
                "VITALS_INGEST__CLIENT_ID": f"bridge-{n}",
                "VITALS_MIGRATE_ON_START": "true" if n == 0 else "false",
            }
            proc = Proc(f"bridge{n}", ["api.cli", "run"], env, tmp_path).start()
            assert wait_for(lambda p=http_port: _ready(p), 40), proc.log_tail()
            bridges.append((proc, http_port))
        assert "sharing ingest" in bridges[1][0].log_tail(200)

        # WebSocket clients on the two bridges that will survive.
        seen: dict[int, list[dict[str, Any]]] = {}
        stop_clients = threading.Event()
        listeners = [
            threading.Thread(
                target=_listen, args=(p, token, seen, stop_clients), daemon=True
            )
            for _, p in bridges[1:]
        ]
        for t in listeners:
            t.start()
        assert wait_for(lambda: len(seen) == 2, 10)

        fleets = [
            Proc(
                name,
                [
                    "kiosk_agent.cli", "simulate", "--kiosks", str(KIOSKS // len(FLEETS)),
                    "--messages", str(MESSAGES), "--rate", str(RATE_HZ),
                ],
                {
                    "KIOSK_KIOSK_ID": name,
                    "KIOSK_MQTT__PORT": str(port),
                    "KIOSK_MQTT__ROOT_TOPIC": root,
                    "KIOSK_OUTBOX_PATH": str(tmp_path / "outboxes" / f"{name}.db"),
                    "KIOSK_CONFIRM_TIMEOUT_SECONDS": "5",
                    "KIOSK_MQTT__PROTOCOL": "5",
                },
                tmp_path,
            ).start()
            for name in FLEETS
        ]  # fmt: skip
        engine = create_engine(postgres_url)
        assert wait_for(lambda: _count(engine) >= KIOSKS * 5 * 3, 60), fleets[
            0
        ].log_tail()
        bridges[0][0].kill()
        killed_at = _count(engine)

        for fleet in fleets:
            assert fleet.wait(180) == 0, fleet.log_tail()
        expected = KIOSKS * MESSAGES * 5
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT kiosk_id, seq FROM readings")).all()
        assert len(rows) == expected
        assert len(set(rows)) == expected
        assert _count(engine) > killed_at  # the survivors carried on

        time.sleep(2)
        stop_clients.set()
        for t in listeners:
            t.join(5)
        for client_seen in seen.values():
            for kiosk in WATCHED:
                seqs = {m["seq"] for m in client_seen if m["kiosk_id"] == kiosk}
                assert seqs == set(range(MESSAGES * 5)), (
                    f"{kiosk}: client missed readings"
                )
        engine.dispose()
    finally:
        for proc, _ in bridges:
            proc.stop()
        mosquitto.terminate()
        mosquitto.wait(10)


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/ready").status_code == 200
    except httpx.HTTPError:
        return False


def _count(engine: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT COUNT(*) FROM readings")).scalar_one())


def _listen(
    port: int, token: str, seen: dict[int, list[dict[str, Any]]], stop: threading.Event
) -> None:
    protocols = [Subprotocol("vitals.v1"), Subprotocol(f"bearer.{token}")]
    got: list[dict[str, Any]] = []
    with connect(f"ws://127.0.0.1:{port}/ws", subprotocols=protocols) as ws:
        ws.send(json.dumps({"type": "subscribe", "kiosks": WATCHED, "status": False}))
        json.loads(ws.recv(5))
        seen[port] = got
        while not stop.is_set():
            try:
                message = json.loads(ws.recv(0.5))
            except TimeoutError:
                continue
            except ConnectionClosed:
                return  # the server shut down; the assertions tell what was seen
            if message["type"] == "reading":
                got.append(message)
