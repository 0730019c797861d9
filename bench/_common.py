"""Shared plumbing of the delivery-path benchmarks: brokers, databases, the bridge.

Everything listens on 127.0.0.1 only. Each run gets its own topic root, its own
PostgreSQL database (dropped afterwards) and, by default, its own Mosquitto process
on a free port with a large in-flight window (the bridge acknowledges only after
commit, so the broker's in-flight limit caps the batch size).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from bridge.config import IngestSettings

ROOT_DIR: Final = Path(__file__).resolve().parent.parent
VENV_BIN: Final = ROOT_DIR / ".venv" / "bin"
HOST: Final = "127.0.0.1"
PG_ADMIN_URL: Final = "postgresql://postgres@127.0.0.1:5432/test"
READINGS_PER_MESSAGE: Final = 5
# The bridge's default batch; brokers get twice that as their in-flight limit.
BRIDGE_BATCH: Final[int] = IngestSettings.model_fields["batch_max_messages"].default
READY_TIMEOUT_SECONDS: Final = 30.0
STOP_TIMEOUT_SECONDS: Final = 10.0
JWT_SECRET: Final = uuid.uuid4().hex + uuid.uuid4().hex  # per benchmark process

# A timestamp no real reading carries; the latency benchmarks overwrite it in the
# pre-built payload bytes with the publish time (same width, so no re-encoding).
SENTINEL_AT: Final = datetime(2001, 1, 1, 0, 0, 0, 1, tzinfo=UTC)
SENTINEL_BYTES: Final = b"2001-01-01T00:00:00.000001Z"

MOSQUITTO_CONF: Final = """\
listener {port} 127.0.0.1
allow_anonymous true
persistence false
max_inflight_messages {inflight}
max_queued_messages 100000
max_queued_bytes 0
log_dest none
set_tcp_nodelay {nodelay}
"""


def free_port() -> int:
    """Ask the OS for a free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = READY_TIMEOUT_SECONDS) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), 0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {HOST}:{port}")


def stop_process(proc: subprocess.Popen[Any] | None) -> None:
    """SIGTERM ``proc`` (only it), then SIGKILL it if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(STOP_TIMEOUT_SECONDS)


def new_root() -> str:
    """Return a unique topic root for one run."""
    return f"bench-{uuid.uuid4().hex[:10]}/v1"


# -- brokers ---------------------------------------------------------------------


@dataclass
class Broker:
    """A broker the benchmark talks to."""

    name: str
    port: int
    proc: subprocess.Popen[Any] | None = None
    workdir: Path | None = None

    def stop(self) -> None:
        """Stop the broker if this benchmark started it."""
        stop_process(self.proc)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


def kiosk_limit_env(rates: Sequence[float], kiosks: Sequence[str]) -> dict[str, str]:
    """Bridge environment that keeps the per-kiosk flood limit out of the way.

    A simulated kiosk here sends hundreds of messages a second, a real one a few per
    scan: at the default limit the bench would measure the limiter (and the gaps it
    leaves) instead of the ingest.
    """
    per_kiosk = 2 * max(rates) / len(kiosks)
    return {"VITALS_INGEST__KIOSK_MESSAGES_PER_SECOND": str(per_kiosk)}


@contextlib.contextmanager
def broker(kind: str, inflight: int = 2 * BRIDGE_BATCH) -> Iterator[Broker]:
    """Run a broker: ``mosquitto`` (private), ``mosquitto-system`` or ``amqtt``."""
    if kind == "mosquitto-system":
        yield Broker("mosquitto-system", 1883)
        return
    port = free_port()
    if kind == "mosquitto":
        workdir = Path(tempfile.mkdtemp(prefix="bench-mosq-"))
        conf = workdir / "mosquitto.conf"
        # Nagle off, as broker_config/mosquitto.conf ships it;
        # BENCH_MOSQUITTO_NODELAY=0 turns it back on (Mosquitto's own default).
        nodelay = (
            "false" if os.environ.get("BENCH_MOSQUITTO_NODELAY") == "0" else "true"
        )
        conf.write_text(
            MOSQUITTO_CONF.format(port=port, inflight=inflight, nodelay=nodelay)
        )
        cmd = ["mosquitto", "-c", str(conf)]
        b = Broker("mosquitto", port, workdir=workdir)
    elif kind == "amqtt":
        cmd = [
            str(VENV_BIN / "vitals-bridge"),
            "broker",
            "--host",
            HOST,
            "--port",
            str(port),
            "--log-level",
            "warning",
        ]
        b = Broker("amqtt", port)
    else:
        raise ValueError(f"unknown broker {kind!r}")
    b.proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT_DIR
    )
    try:
        wait_port(port)
        yield b
    finally:
        b.stop()


# -- databases -------------------------------------------------------------------


@contextlib.contextmanager
def database(kind: str) -> Iterator[str]:
    """Yield a fresh SQLAlchemy URL (``sqlite`` file or ``postgres`` database)."""
    if kind == "sqlite":
        (ROOT_DIR / "var").mkdir(exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix="bench-db-", dir=ROOT_DIR / "var"))
        try:
            yield f"sqlite:///{workdir / 'vitals.db'}"
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return
    if kind != "postgres":
        raise ValueError(f"unknown database {kind!r}")
    import psycopg

    name = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


class RowCounter:
    """Read the highest reading id, a cheap proxy for the committed row count."""

    def __init__(self, url: str) -> None:
        from sqlalchemy import create_engine, text

        self._engine = create_engine(url)
        self._query = text("SELECT COALESCE(MAX(id), 0) FROM readings")

    def __call__(self) -> int:
        """Return the highest committed reading id (ids start at 1, no gaps here)."""
        with self._engine.connect() as conn:
            return int(conn.execute(self._query).scalar_one())

    def exact(self) -> int:
        """Return ``COUNT(*)`` of readings."""
        from sqlalchemy import text

        with self._engine.connect() as conn:
            return int(conn.execute(text("SELECT COUNT(*) FROM readings")).scalar_one())

    def close(self) -> None:
        """Release the connection pool."""
        self._engine.dispose()


# -- the bridge ------------------------------------------------------------------


@dataclass
class Bridge:
    """A ``vitals-bridge run`` subprocess."""

    http_port: int
    proc: subprocess.Popen[Any]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """Base HTTP URL."""
        return f"http://{HOST}:{self.http_port}"

    def metrics(self) -> dict[str, float]:
        """Read every sample from ``/metrics``, keyed by name with labels."""
        request = urllib.request.Request(
            f"{self.url}/metrics",
            headers={"Authorization": f"Bearer {bearer_token(JWT_SECRET)}"},
        )
        out = {}
        with urllib.request.urlopen(request, timeout=5) as resp:
            for line in resp.read().decode().splitlines():
                if line and not line.startswith("#"):
                    key, _, value = line.rpartition(" ")
                    with contextlib.suppress(ValueError):
                        out[key] = float(value)
        return out

    def stop(self) -> None:
        """Stop the bridge."""
        stop_process(self.proc)


@contextlib.contextmanager
def bridge(
    broker_port: int, db_url: str, root: str, **extra_env: str
) -> Iterator[Bridge]:
    """Run ``vitals-bridge run`` against the broker and database; wait for /ready."""
    http_port = free_port()
    env = {
        **os.environ,
        "VITALS_DATABASE_URL": db_url,
        "VITALS_MQTT__HOST": HOST,
        "VITALS_MQTT__PORT": str(broker_port),
        "VITALS_MQTT__ROOT_TOPIC": root,
        "VITALS_HTTP__HOST": HOST,
        "VITALS_HTTP__PORT": str(http_port),
        "VITALS_INGEST__CLIENT_ID": f"bench-bridge-{uuid.uuid4().hex[:8]}",
        "VITALS_AUTH__JWT_SECRET": JWT_SECRET,
        # One benchmark subject opens up to 1,000 sockets at once.
        "VITALS_LIMITS__REQUESTS_PER_SECOND": "1000000",
        "VITALS_LIMITS__BURST": "1000000",
        **extra_env,
    }
    (ROOT_DIR / "var").mkdir(exist_ok=True)
    log_path = Path(tempfile.mkstemp(prefix="bench-bridge-", suffix=".log")[1])
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [str(VENV_BIN / "vitals-bridge"), "run", "--log-level", "warning"],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=ROOT_DIR,
        )
    b = Bridge(http_port, proc, log_path, {k: v for k, v in extra_env.items()})
    try:
        _wait_ready(b)
        yield b
    finally:
        b.stop()
        log_path.unlink(missing_ok=True)


def _wait_ready(b: Bridge) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if b.proc.poll() is not None:
            raise RuntimeError(f"bridge exited: {b.log_path.read_text()[-2000:]}")
        with (
            contextlib.suppress(OSError, ValueError),
            urllib.request.urlopen(f"{b.url}/ready", timeout=2) as resp,
        ):
            if json.loads(resp.read()).get("status") == "ready":
                return
        time.sleep(0.1)
    raise TimeoutError(f"bridge not ready: {b.log_path.read_text()[-2000:]}")


# -- payloads --------------------------------------------------------------------


def kiosk_ids(n: int, prefix: str = "k") -> list[str]:
    """Return ``n`` kiosk ids."""
    return [f"{prefix}{i:04d}" for i in range(n)]


def build_payloads(
    kiosk_id: str,
    count: int,
    *,
    first_seq: int = 0,
    at: datetime | None = None,
    per_message: int = READINGS_PER_MESSAGE,
) -> list[bytes]:
    """Build ``count`` readings messages with the contract models; seqs never repeat."""
    from vitals_contract import METRICS, Metric, Reading, ReadingsMessage

    at = at or datetime.now(UTC)
    metrics = list(Metric)
    base = {
        Metric.HEART_RATE: 70.0,
        Metric.RESPIRATORY_RATE: 15.0,
        Metric.HRV_SDNN: 45.0,
        Metric.SPO2: 97.0,
        Metric.STRESS_INDEX: 120.0,
    }
    out = []
    seq = first_seq
    for n in range(count):
        readings = []
        for i in range(per_message):
            metric = metrics[i % len(metrics)]
            readings.append(
                Reading(
                    seq=seq,
                    scan_id="bench",
                    metric=metric,
                    value=base.get(metric, METRICS[metric].min_value) + (n % 7) * 0.5,
                    unit=METRICS[metric].unit,
                    quality=0.9,
                    measured_at=at,
                )
            )
            seq += 1
        message = ReadingsMessage(kiosk_id=kiosk_id, sent_at=at, readings=readings)
        out.append(message.to_bytes())
    return out


def bearer_token(secret: str, ttl_seconds: int = 3600) -> str:
    """Sign an admin token the bridge accepts (issuer and audience defaults)."""
    import jwt

    now = int(time.time())
    claims = {
        "iss": "kiosk-vitals",
        "aud": "kiosk-vitals-api",
        "sub": "bench",
        "scope": "vitals.admin vitals.read vitals.metrics",
        "iat": now,
        "exp": now + ttl_seconds,
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode(claims, secret, algorithm="HS256")


def ws_subprotocols(secret: str) -> list[str]:
    """Return the subprotocols a live-socket client offers (with its token)."""
    return ["vitals.v1", f"bearer.{bearer_token(secret)}"]


def stamp(payload: bytes, now: float | None = None) -> bytes:
    """Put the current wall-clock time where the sentinel timestamp is."""
    now = time.time() if now is None else now
    iso = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return payload.replace(SENTINEL_BYTES, iso.encode())


def parse_iso(value: str) -> float:
    """Turn an ISO 8601 timestamp into seconds since the epoch."""
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def mqtt_client(client_id: str = "", *, clean: bool = True) -> Any:
    """Create a paho 2.x client (callback API 2, MQTT 3.1.1)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    return mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv311,
        clean_session=clean,
    )


# -- statistics and output -------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Return the ``q``-th percentile (0-100) by nearest rank; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Render a plain text table."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            if v != v:
                return "-"
            return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.2f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
        for i, h in enumerate(headers)
    ]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend(
        "  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells
    )
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    """Describe the machine: cores, CPU model, date."""
    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "python": sys.version.split()[0],
        # Other work on the machine skews every figure; say how busy it was.
        "loadavg_1m": os.getloadavg()[0],
    }


def emit_json(summary: dict[str, Any]) -> None:
    """Print the one-line JSON summary that ends every benchmark's output."""
    print(json.dumps(summary, separators=(",", ":"), default=_round))


def _round(value: Any) -> Any:
    return str(value)


def rounded(value: float, digits: int = 2) -> float | None:
    """Round for the JSON summary; NaN becomes None."""
    return None if value != value else round(value, digits)


# -- paced publisher and WebSocket clients (latency and fan-out) -------------------


def paced_publisher(
    port: int,
    root: str,
    kiosks: list[str],
    rate: float,
    seconds: float,
    ready: Any,
    start_at: Any,
) -> None:
    """Publish ``rate`` msgs/s round-robin over ``kiosks``, stamping measured_at."""
    import threading

    from vitals_contract import Leaf, kiosk_topic

    per_kiosk = math.ceil(rate * seconds / len(kiosks)) + 2
    payloads = {k: build_payloads(k, per_kiosk, at=SENTINEL_AT) for k in kiosks}
    topics = {k: kiosk_topic(k, Leaf.READINGS, root) for k in kiosks}
    cursor = dict.fromkeys(kiosks, 0)
    client = mqtt_client()
    client.max_inflight_messages_set(1000)
    connected = threading.Event()
    client.on_connect = lambda *_: connected.set()
    client.connect(HOST, port, keepalive=60)
    client.loop_start()
    connected.wait(10)
    ready.set()
    while start_at.value == 0.0:
        time.sleep(0.005)

    t0 = start_at.value
    sent = 0
    total = int(rate * seconds)
    while sent < total:
        now = time.time()
        due = min(total, int((now - t0) * rate) + 1)
        while sent < due:
            kiosk = kiosks[sent % len(kiosks)]
            n = cursor[kiosk]
            cursor[kiosk] = n + 1
            client.publish(topics[kiosk], stamp(payloads[kiosk][n]), qos=1)
            sent += 1
        next_at = t0 + sent / rate
        time.sleep(max(0.0, next_at - time.time()))
    time.sleep(0.5)
    client.loop_stop()
    client.disconnect()


def ws_clients(
    url: str,
    subprotocols: list[str],
    subscriptions: list[list[str] | None],
    ready: Any,
    stop: Any,
    results: Any,
    warmup_until: Any,
) -> None:
    """Open one WebSocket per subscription; record per-reading latency until stop.

    Puts ``{"latencies": [...], "ingest": [...], "received": n, "clients": n,
    "closed": n}`` on ``results``. Latencies after ``warmup_until`` only (seconds).
    """
    import asyncio
    import resource

    import websockets

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 4 * len(subscriptions) + 256))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    latencies: list[float] = []
    ingest: list[float] = []
    state = {"received": 0, "closed": 0, "connected": 0}

    async def one(kiosks: list[str] | None, gate: asyncio.Semaphore) -> None:
        async with gate:
            ws = await websockets.connect(
                url,
                subprotocols=subprotocols,
                max_queue=None,
                compression=None,
                open_timeout=60,
            )
            await ws.send(
                json.dumps(
                    {
                        "type": "subscribe",
                        "kiosks": kiosks,
                        "status": False,
                        "alerts": False,
                    }
                )
            )
            first = json.loads(await ws.recv())
            assert first["type"] == "subscribed", first
        state["connected"] += 1
        try:
            async for raw in ws:
                now = time.time()
                msg = json.loads(raw)
                if msg.get("type") != "reading":
                    continue
                state["received"] += 1
                if now < warmup_until.value or warmup_until.value == 0.0:
                    continue
                measured = parse_iso(msg["measured_at"])
                latencies.append(now - measured)
                ingest.append(parse_iso(msg["received_at"]) - measured)
        except websockets.ConnectionClosed:
            pass
        state["closed"] += 1

    cpu_window: dict[str, float] = {}

    async def main() -> None:
        gate = asyncio.Semaphore(50)
        tasks = [asyncio.create_task(one(s, gate)) for s in subscriptions]
        while state["connected"] < len(subscriptions):
            await asyncio.sleep(0.05)
            failed = [t for t in tasks if t.done() and t.exception()]
            if failed:
                raise failed[0].exception()  # type: ignore[misc]
        ready.set()
        while not stop.value:
            if warmup_until.value and "cpu0" not in cpu_window:
                cpu_window["cpu0"], cpu_window["t0"] = time.process_time(), time.time()
            await asyncio.sleep(0.05)
        if "cpu0" in cpu_window:
            cpu_window["cpu"] = (
                100
                * (time.process_time() - cpu_window["cpu0"])
                / (time.time() - cpu_window["t0"])
            )
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())
    results.put(
        {
            "latencies": latencies,
            "ingest": ingest,
            "received": state["received"],
            "clients": len(subscriptions),
            "closed": state["closed"],
            "cpu_percent": cpu_window.get("cpu", float("nan")),
        }
    )
