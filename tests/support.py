"""Helpers shared by the tests: brokers, servers and polling, all on free ports."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.typing import Subprotocol

from bridge.broker import DEFAULT_CONFIG, free_port, load_config
from bridge.config import BridgeSettings

MOSQUITTO_ADDRESS = ("127.0.0.1", 1883)
TEST_JWT_SECRET = "test-secret-" + uuid.uuid4().hex + uuid.uuid4().hex
ALL_TEST_SCOPES = ("vitals.read", "vitals.alerts.ack", "vitals.metrics", "vitals.admin")


def tcp_reachable(host: str, port: int, timeout: float = 1.0) -> bool:
    """Tell whether a TCP connection to host:port succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class BrokerEndpoint:
    """Where a test's broker listens, and a topic root private to the test."""

    def __init__(self, host: str, port: int, kind: str) -> None:
        self.host = host
        self.port = port
        self.kind = kind
        self.root = f"test-{uuid.uuid4().hex[:10]}/v1"


class EmbeddedBroker:
    """amqtt running on its own event loop in a background thread."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._config = load_config(DEFAULT_CONFIG, "127.0.0.1", port)
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start and wait until the listener accepts connections."""
        from bridge.broker import serve

        started = threading.Event()

        def main() -> None:
            asyncio.set_event_loop(self._loop)
            self._stop = asyncio.Event()
            self._loop.call_soon(started.set)
            self._loop.run_until_complete(serve(self._config, self._stop))

        self._thread = threading.Thread(target=main, name="amqtt", daemon=True)
        self._thread.start()
        started.wait(5)
        for _ in range(100):
            if tcp_reachable("127.0.0.1", self.port, 0.2):
                return
            threading.Event().wait(0.05)
        raise RuntimeError("embedded broker did not start")

    def stop(self) -> None:
        """Shut the broker down."""
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)


POSTGRES_ADMIN_URL = os.environ.get(
    "VITALS_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)


@contextlib.contextmanager
def embedded_amqtt() -> Iterator[BrokerEndpoint]:
    """Run an embedded amqtt broker on a free port for the ``with`` block."""
    broker = EmbeddedBroker(free_port())
    broker.start()
    try:
        yield BrokerEndpoint("127.0.0.1", broker.port, "amqtt")
    finally:
        broker.stop()


@contextlib.contextmanager
def fresh_postgres(prefix: str) -> Iterator[str]:
    """Create a PostgreSQL database for the ``with`` block; yield its URL.

    Skips the calling test (with the reason) when psycopg is missing or the
    server is unreachable, so the suite passes where PostgreSQL is absent.
    """
    try:
        import psycopg
    except ImportError:
        pytest.skip("psycopg not installed")
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError:
        pytest.skip("PostgreSQL not reachable at 127.0.0.1:5432 (database test)")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace(
        "postgresql://", "postgresql+psycopg://"
    )
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class ServerThread:
    """uvicorn serving the API in a background thread on a free port."""

    def __init__(
        self,
        settings: BridgeSettings,
        port: int | None = None,
        ssl: tuple[Path, Path] | None = None,
    ) -> None:
        import uvicorn

        from api.app import create_app

        self.port = port or free_port()
        self.app = create_app(settings)
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="on",
            timeout_graceful_shutdown=3,
            ssl_certfile=ssl[0] if ssl else None,
            ssl_keyfile=ssl[1] if ssl else None,
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self.server.run, name="uvicorn", daemon=True
        )

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def token(
        self, scopes: tuple[str, ...] = ALL_TEST_SCOPES, ttl: int | None = None
    ) -> str:
        """Mint an access token signed with the server's key."""
        issued: str = self.app.state.tokens.issue("test-user", list(scopes), ttl)
        return issued

    def http(self, scopes: tuple[str, ...] = ALL_TEST_SCOPES) -> httpx.Client:
        """An HTTP client authenticated with ``scopes``."""
        headers = {"Authorization": f"Bearer {self.token(scopes)}"}
        return httpx.Client(base_url=self.base, headers=headers, timeout=10)

    def ws(
        self, scopes: tuple[str, ...] = ALL_TEST_SCOPES, token: str | None = None
    ) -> Any:
        """Open the live WebSocket, authenticated at the handshake."""
        from websockets.sync.client import connect

        bearer = token or self.token(scopes)
        protocols = [Subprotocol("vitals.v1"), Subprotocol(f"bearer.{bearer}")]
        return connect(self.ws_url, subprotocols=protocols)

    def start(self) -> None:
        self._thread.start()
        for _ in range(400):
            if self.server.started:
                return
            if not self._thread.is_alive():
                raise RuntimeError("API server failed to start")
            threading.Event().wait(0.025)
        raise RuntimeError("API server did not start in 10 s")

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(15)


def bridge_settings(
    broker: BrokerEndpoint, database_url: str, **extra: Any
) -> BridgeSettings:
    """Settings for a bridge on ``broker`` and ``database_url`` with a private root."""
    ingest = {"client_id": f"bridge-{uuid.uuid4().hex[:8]}", **extra.pop("ingest", {})}
    return BridgeSettings(
        database_url=database_url,
        auth={"jwt_secret": TEST_JWT_SECRET},
        mqtt={"host": broker.host, "port": broker.port, "root_topic": broker.root},
        ingest=ingest,
        **extra,
    )


def wait_for(
    predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.05
) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; return the outcome."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


class Proc:
    """A project command run as its own process, as users run it."""

    def __init__(
        self, name: str, args: list[str], env: dict[str, str], log_dir: Path
    ) -> None:
        self.name = name
        self.args = args
        self.env = env
        self.log_path = log_dir / f"{name}.log"
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", *self.args],
                env={**os.environ, **self.env},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def kill(self) -> None:
        """SIGKILL: no clean-up, no goodbye."""
        assert self.popen is not None
        self.popen.kill()
        self.popen.wait(10)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period."""
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(15)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(10)

    def wait(self, timeout: float) -> int:
        assert self.popen is not None
        return self.popen.wait(timeout)

    def log_tail(self, lines: int = 30) -> str:
        text = (
            self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        )
        return "\n".join(text.splitlines()[-lines:])


class TcpProxy:
    """A loopback TCP relay whose path can be cut and restored, like a pulled cable."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="proxy", daemon=True
        )

    def start(self) -> TcpProxy:
        self._thread.start()
        self.restore()
        return self

    def cut(self) -> None:
        """Drop every connection and refuse new ones."""
        asyncio.run_coroutine_threadsafe(self._cut(), self._loop).result(5)

    def restore(self) -> None:
        """Accept connections again."""
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(5)

    def close(self) -> None:
        self.cut()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)

    async def _cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    async def _relay(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(
                "127.0.0.1", self.target_port
            )
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        self._writers.difference_update((writer, up_writer))
