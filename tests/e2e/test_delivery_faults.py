"""Nothing lost, nothing doubled: the delivery path under kills, outages and cuts.

Broker, bridge and kiosk run as separate processes, started with the project's
own commands. The kiosk is ``kiosk-agent simulate``: the real outbox and MQTT link
with generated readings. After each fault the database must hold every sequence
number the kiosk issued, exactly once.
"""

from __future__ import annotations

import shutil
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text
from support import TEST_JWT_SECRET, Proc, TcpProxy, tcp_reachable, wait_for

from bridge.broker import free_port

pytestmark = pytest.mark.e2e

OUTAGE_SECONDS = 30.0


class BrokerProc:
    """A broker we may stop and restart: embedded amqtt or a private Mosquitto."""

    def __init__(self, kind: str, workdir: Path) -> None:
        self.kind = kind
        self.port = free_port()
        self.workdir = workdir
        self.proc: Proc | None = None

    def start(self) -> None:
        if self.kind == "amqtt":
            self.proc = Proc(
                "broker",
                ["api.cli", "broker", "--port", str(self.port)],
                {},
                self.workdir,
            )
            self.proc.start()
        else:
            conf = self.workdir / "mosquitto.conf"
            conf.write_text(
                f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
                "persistence false\nmax_inflight_messages 2000\n"
            )
            self.proc = MosquittoProc(conf, self.workdir).start()
        assert wait_for(lambda: tcp_reachable("127.0.0.1", self.port, 0.2), 15)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


class MosquittoProc(Proc):
    def __init__(self, conf: Path, log_dir: Path) -> None:
        super().__init__("mosquitto", [], {}, log_dir)
        self.conf = conf

    def start(self) -> MosquittoProc:
        import subprocess

        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                ["mosquitto", "-c", str(self.conf)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self


class Stack:
    """Broker, bridge and kiosk processes sharing one working directory."""

    def __init__(self, workdir: Path, broker_kind: str, database_url: str) -> None:
        self.workdir = workdir
        self.broker = BrokerProc(broker_kind, workdir)
        self.database_url = database_url
        self.http_port = free_port()
        self.root = f"e2e-{uuid.uuid4().hex[:8]}/v1"
        self.kiosk_id = "kiosk-e2e"
        self.outbox = workdir / "outbox.db"
        self.bridge: Proc | None = None
        self.kiosk: Proc | None = None
        self._mqtt_port = self.broker.port

    def start_bridge(self) -> None:
        env = {
            "VITALS_DATABASE_URL": self.database_url,
            "VITALS_AUTH__JWT_SECRET": TEST_JWT_SECRET,
            "VITALS_MQTT__PORT": str(self.broker.port),
            "VITALS_MQTT__ROOT_TOPIC": self.root,
            "VITALS_HTTP__PORT": str(self.http_port),
            "VITALS_INGEST__CLIENT_ID": "e2e-bridge",
        }
        self.bridge = Proc("bridge", ["api.cli", "run"], env, self.workdir).start()
        assert wait_for(self._ready, 30), self.bridge.log_tail()

    def _ready(self) -> bool:
        try:
            return (
                httpx.get(f"http://127.0.0.1:{self.http_port}/ready").status_code == 200
            )
        except httpx.HTTPError:
            return False

    def start_kiosk(
        self, messages: int, rate: float, mqtt_port: int | None = None
    ) -> Proc:
        env = {
            "KIOSK_KIOSK_ID": self.kiosk_id,
            "KIOSK_MQTT__PORT": str(mqtt_port or self.broker.port),
            "KIOSK_MQTT__ROOT_TOPIC": self.root,
            "KIOSK_OUTBOX_PATH": str(self.outbox),
            "KIOSK_CONFIRM_TIMEOUT_SECONDS": "5",
        }
        args = [
            "kiosk_agent.cli",
            "simulate",
            "--messages",
            str(messages),
            "--rate",
            str(rate),
        ]
        self.kiosk = Proc("kiosk", args, env, self.workdir).start()
        return self.kiosk

    def issued_seqs(self) -> int:
        with sqlite3.connect(self.outbox) as db:
            (next_seq,) = db.execute(
                "SELECT value FROM meta WHERE key='next_seq'"
            ).fetchone()
        return int(next_seq)

    def stored_seqs(self) -> list[int]:
        engine = create_engine(self.database_url)
        try:
            with engine.connect() as conn:
                rows = conn.execute(
                    text("SELECT seq FROM readings WHERE kiosk_id = :k ORDER BY seq"),
                    {"k": self.kiosk_id},
                )
                return [r.seq for r in rows]
        finally:
            engine.dispose()

    def assert_exactly_once(self, kiosk: Proc) -> None:
        code = kiosk.wait(120)
        assert code == 0, kiosk.log_tail()
        issued = self.issued_seqs()
        assert issued > 0
        assert self.stored_seqs() == list(range(issued)), "lost or doubled readings"

    def close(self) -> None:
        for proc in (self.kiosk, self.bridge):
            if proc is not None:
                proc.stop()
        self.broker.stop()


@pytest.fixture(params=["amqtt", "mosquitto"])
def stack(
    request: pytest.FixtureRequest, tmp_path: Path, sqlite_url: str
) -> Iterator[Stack]:
    if request.param == "mosquitto" and shutil.which("mosquitto") is None:
        pytest.skip("mosquitto binary not installed")
    s = Stack(tmp_path, request.param, sqlite_url)
    s.broker.start()
    s.start_bridge()
    try:
        yield s
    finally:
        s.close()


def test_broker_outage_during_a_scan(stack: Stack) -> None:
    kiosk = stack.start_kiosk(messages=60, rate=4)
    assert wait_for(lambda: len(stack.stored_seqs()) >= 25, 20)
    stack.broker.stop()
    time.sleep(OUTAGE_SECONDS)
    stack.broker.start()
    stack.assert_exactly_once(kiosk)


def test_kiosk_killed_mid_scan_then_restarted(stack: Stack) -> None:
    first = stack.start_kiosk(messages=400, rate=20)
    assert wait_for(lambda: len(stack.stored_seqs()) >= 100, 20)
    first.kill()
    second = stack.start_kiosk(messages=20, rate=20)
    stack.assert_exactly_once(second)


def test_bridge_killed_mid_run_then_restarted(stack: Stack) -> None:
    kill_and_restart_bridge(stack)


def test_bridge_on_postgres_killed_mid_run_then_restarted(
    tmp_path: Path, postgres_url: str
) -> None:
    s = Stack(tmp_path, "amqtt", postgres_url)
    s.broker.start()
    s.start_bridge()
    try:
        kill_and_restart_bridge(s)
    finally:
        s.close()


def kill_and_restart_bridge(stack: Stack) -> None:
    kiosk = stack.start_kiosk(messages=200, rate=20)
    assert wait_for(lambda: len(stack.stored_seqs()) >= 100, 20)
    assert stack.bridge is not None
    stack.bridge.kill()
    time.sleep(2)
    stack.start_bridge()
    stack.assert_exactly_once(kiosk)


def test_network_path_cut_then_restored(stack: Stack) -> None:
    proxy = TcpProxy(stack.broker.port).start()
    try:
        kiosk = stack.start_kiosk(messages=100, rate=10, mqtt_port=proxy.port)
        assert wait_for(lambda: len(stack.stored_seqs()) >= 100, 20)
        proxy.cut()
        cut_at = len(stack.stored_seqs())
        time.sleep(8)
        assert len(stack.stored_seqs()) == cut_at, "data crossed a cut path"
        proxy.restore()
        stack.assert_exactly_once(kiosk)
    finally:
        proxy.close()
