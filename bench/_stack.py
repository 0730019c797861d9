"""Process-stack plumbing of the transport and chaos benchmarks.

Brokers, bridges and simulated kiosks run as their own processes, started with the
project's commands, each on a fixed free port so it can be killed and restarted in
place. A :class:`Relay` sits on a TCP path: it counts the bytes that cross it in
both directions and can cut the path like a pulled cable. Everything listens on
127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Final, Self

from bench._common import (
    HOST,
    JWT_SECRET,
    ROOT_DIR,
    VENV_BIN,
    free_port,
    stop_process,
    wait_port,
)

log = logging.getLogger(__name__)

READY_TIMEOUT_SECONDS: Final = 45.0
RELAY_CHUNK_BYTES: Final = 65536
ALL_SCOPES: Final = ["vitals.admin", "vitals.read", "vitals.metrics"]

MOSQUITTO_CONF: Final = """\
listener {port} 127.0.0.1
allow_anonymous true
persistence false
max_inflight_messages 2000
max_queued_messages 100000
log_dest stderr
log_type error
log_type warning
"""


def token(scopes: list[str] | None = None, ttl_seconds: int = 3600) -> str:
    """Sign an access token the bridges started here accept."""
    from api.auth import sign_token
    from bridge.config import AuthSettings

    settings = AuthSettings(jwt_secret=JWT_SECRET)
    return sign_token(settings, "bench", scopes or ALL_SCOPES, ttl_seconds)


def tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """Make a development CA and a server certificate for 127.0.0.1: (ca, cert, key)."""
    from bridge.devcerts import issue_server_cert, make_ca

    ca_cert, ca_key = make_ca(directory)
    cert, key = issue_server_cert([HOST, "localhost"], ca_cert, ca_key, directory)
    return ca_cert, cert, key


# -- processes --------------------------------------------------------------------


class Service:
    """One long-running command with its log in ``workdir``; restartable in place."""

    def __init__(
        self, name: str, cmd: list[str], env: dict[str, str], workdir: Path
    ) -> None:
        self.name = name
        self.cmd = cmd
        self.env = env
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> Self:
        """Start the command (appending to its log)."""
        with self.log_path.open("ab") as log_file:
            self.proc = subprocess.Popen(
                self.cmd,
                env={**os.environ, **self.env},
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=ROOT_DIR,
            )
        self.starts += 1
        return self

    @property
    def alive(self) -> bool:
        """Tell whether the process runs."""
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no clean-up, no goodbye."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period."""
        stop_process(self.proc)

    def cpu_seconds(self) -> float:
        """Return user + system CPU seconds of the process and its children."""
        import psutil

        if self.proc is None:
            return float("nan")
        try:
            p = psutil.Process(self.proc.pid)
            total = sum(p.cpu_times()[:2])
            for child in p.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    total += sum(child.cpu_times()[:2])
            return float(total)
        except psutil.Error:
            return float("nan")

    def log_tail(self, lines: int = 20) -> str:
        """Return the last lines of the log."""
        if not self.log_path.exists():
            return ""
        return "\n".join(
            self.log_path.read_text(errors="replace").splitlines()[-lines:]
        )


class BrokerService(Service):
    """Embedded amqtt (``vitals-bridge broker``) or a private Mosquitto, fixed port."""

    def __init__(self, kind: str, workdir: Path) -> None:
        self.kind = kind
        self.port = free_port()
        if kind == "amqtt":
            cmd = [
                str(VENV_BIN / "vitals-bridge"),
                "broker",
                "--host",
                HOST,
                "--port",
                str(self.port),
                "--log-level",
                "warning",
            ]
        elif kind == "mosquitto":
            conf = workdir / "mosquitto.conf"
            conf.write_text(MOSQUITTO_CONF.format(port=self.port))
            cmd = ["mosquitto", "-c", str(conf)]
        else:
            raise ValueError(f"unknown broker {kind!r}")
        super().__init__(f"broker-{kind}", cmd, {}, workdir)

    def start(self) -> Self:
        """Start and wait until the listener accepts connections."""
        super().start()
        wait_port(self.port, READY_TIMEOUT_SECONDS)
        return self


class BridgeService(Service):
    """``vitals-bridge run`` on a fixed HTTP port; HTTPS when given a certificate."""

    def __init__(
        self,
        broker_port: int,
        database_url: str,
        root: str,
        workdir: Path,
        *,
        name: str = "bridge",
        tls: tuple[Path, Path] | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.http_port = free_port()
        self.tls = tls
        env = {
            "VITALS_DATABASE_URL": database_url,
            "VITALS_MQTT__HOST": HOST,
            "VITALS_MQTT__PORT": str(broker_port),
            "VITALS_MQTT__ROOT_TOPIC": root,
            "VITALS_HTTP__HOST": HOST,
            "VITALS_HTTP__PORT": str(self.http_port),
            "VITALS_INGEST__CLIENT_ID": f"bench-{name}-{uuid.uuid4().hex[:8]}",
            "VITALS_AUTH__JWT_SECRET": JWT_SECRET,
            # Benchmark clients poll far faster than a person would.
            "VITALS_LIMITS__REQUESTS_PER_SECOND": "1000000",
            "VITALS_LIMITS__BURST": "1000000",
        }
        if tls is not None:
            env["VITALS_HTTP__TLS_CERT_FILE"] = str(tls[0])
            env["VITALS_HTTP__TLS_KEY_FILE"] = str(tls[1])
        env.update(extra_env or {})
        cmd = [str(VENV_BIN / "vitals-bridge"), "run", "--log-level", "warning"]
        super().__init__(name, cmd, env, workdir)

    @property
    def url(self) -> str:
        """Base URL of the API."""
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{HOST}:{self.http_port}"

    def start(self) -> Self:
        """Start without waiting; see :meth:`wait_ready`."""
        super().start()
        return self

    def ready(self) -> bool:
        """Tell whether /ready says ready (database and broker both up)."""
        import ssl

        context = ssl._create_unverified_context() if self.tls else None
        try:
            with urllib.request.urlopen(
                f"{self.url}/ready", timeout=2, context=context
            ) as resp:
                return bool(json.loads(resp.read()).get("status") == "ready")
        except (OSError, ValueError):
            return False

    def wait_ready(self, timeout: float = READY_TIMEOUT_SECONDS) -> float:
        """Wait until ready; return the seconds it took. Raise if it exits."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log_tail()}")
            if self.ready():
                return time.monotonic() - started
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} not ready:\n{self.log_tail()}")


class KioskService(Service):
    """``kiosk-agent simulate`` with its own outbox file, reaching the broker at a port."""

    def __init__(
        self,
        kiosk_id: str,
        mqtt_port: int,
        root: str,
        workdir: Path,
        *,
        messages: int,
        rate_hz: float,
        confirm_timeout_seconds: float = 5.0,
    ) -> None:
        self.kiosk_id = kiosk_id
        self.outbox = workdir / f"outbox-{kiosk_id}.db"
        env = {
            "KIOSK_KIOSK_ID": kiosk_id,
            "KIOSK_MQTT__HOST": HOST,
            "KIOSK_MQTT__PORT": str(mqtt_port),
            "KIOSK_MQTT__ROOT_TOPIC": root,
            "KIOSK_OUTBOX_PATH": str(self.outbox),
            "KIOSK_CONFIRM_TIMEOUT_SECONDS": str(confirm_timeout_seconds),
        }
        cmd = [
            str(VENV_BIN / "kiosk-agent"),
            "simulate",
            "--messages",
            str(messages),
            "--rate",
            str(rate_hz),
            "--log-level",
            "warning",
        ]
        super().__init__(f"kiosk-{kiosk_id}", cmd, env, workdir)

    def meta(self) -> dict[str, int]:
        """Read the outbox counters (``next_seq``, ``dropped``) and its depth."""
        import sqlite3

        empty = {"next_seq": 0, "dropped": 0, "depth": 0}
        for _ in range(20):  # the agent may be creating the file right now
            if not self.outbox.exists():
                return empty
            try:
                db = sqlite3.connect(f"file:{self.outbox}?mode=ro", uri=True, timeout=5)
                try:
                    out = {
                        k: int(v) for k, v in db.execute("SELECT key, value FROM meta")
                    }
                    (out["depth"],) = db.execute(
                        "SELECT COUNT(*) FROM outbox"
                    ).fetchone()
                    return {**empty, **out}
                finally:
                    db.close()
            except sqlite3.OperationalError:
                time.sleep(0.1)
        return empty


# -- a counting, cuttable TCP relay -------------------------------------------------


class Relay:
    """A loopback TCP relay that counts bytes both ways and can be cut and restored."""

    def __init__(self, target_port: int, name: str = "relay") -> None:
        self.target_port = target_port
        self.port = free_port()
        self.name = name
        self.bytes_up = 0  # client -> server
        self.bytes_down = 0  # server -> client
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"relay[{name}]", daemon=True
        )

    def start(self) -> Relay:
        """Start the relay's thread and listen."""
        self._thread.start()
        self.restore()
        return self

    @property
    def bytes_total(self) -> int:
        """Bytes relayed in both directions since the last reset."""
        return self.bytes_up + self.bytes_down

    def reset(self) -> None:
        """Zero the counters."""
        self.bytes_up = self.bytes_down = self.connections = 0

    def cut(self) -> None:
        """Drop every connection and refuse new ones."""
        asyncio.run_coroutine_threadsafe(self._cut(), self._loop).result(5)

    def restore(self) -> None:
        """Accept connections again."""
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(5)

    def close(self) -> None:
        """Cut and stop the thread."""
        self.cut()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._relay, HOST, self.port)

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
            up_reader, up_writer = await asyncio.open_connection(HOST, self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        self._writers.update((writer, up_writer))
        await asyncio.gather(
            self._pump(reader, up_writer, up=True),
            self._pump(up_reader, writer, up=False),
        )
        self._writers.difference_update((writer, up_writer))

    async def _pump(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, *, up: bool
    ) -> None:
        try:
            while data := await src.read(RELAY_CHUNK_BYTES):
                if up:
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            dst.transport.abort()


def fhir_available(base_url: str, ca_file: Path | None) -> bool:
    """Tell whether the bridge answers FHIR Observation searches (not 404)."""
    import httpx

    headers = {"Authorization": f"Bearer {token()}"}
    verify: Any = str(ca_file) if ca_file else True
    try:
        resp = httpx.get(
            f"{base_url}/fhir/Observation",
            params={"_count": "1"},
            headers=headers,
            verify=verify,
            timeout=5,
        )
    except httpx.HTTPError:
        return False
    return resp.status_code == 200


def post_endpoint(base_url: str, ca_file: Path | None) -> dict[str, str]:
    """Find reading-ingest POST routes in the OpenAPI document: {kind: path}."""
    import httpx

    verify: Any = str(ca_file) if ca_file else True
    try:
        doc = httpx.get(f"{base_url}/openapi.json", verify=verify, timeout=5).json()
    except (httpx.HTTPError, ValueError):
        return {}
    found = {}
    for path, ops in doc.get("paths", {}).items():
        if "post" not in ops:
            continue
        if path == "/api/v1/readings":
            found["single"] = path
        elif path.startswith("/api/v1/readings") and "batch" in path:
            found["batch"] = path
            found.setdefault("single", path)  # a batch of one reading
    return found
