"""Transport comparison: the ways a reading reaches a client, side by side.

Loopback, our own services (``vitals-bridge run`` and a broker, as processes) and
real clients. A publisher process sends readings at QoS 1 (messages of 5, built with
the contract models, ``measured_at`` written in just before each publish) to 20
kiosk topics; one client process receives them over one path:

* ``ws`` / ``ws-plain``: kiosk -> MQTT -> bridge -> WebSocket (``/ws``,
  subprotocols ``vitals.v1`` + ``bearer.<token>``) with permessage-deflate (what
  browsers offer) / without it;
* ``sse``: Server-Sent Events (``/api/v1/stream``);
* ``rest-1s`` / ``rest-100ms``: polling ``/api/v1/readings`` with a cursor (the
  last item's id; ``next_cursor`` only while pages are full) every 1 s / 100 ms;
* ``fhir-1s``: polling ``/fhir/Observation?_sort=-date&_count=50`` every 1 s,
  following ``next`` links until a page holds a resource already seen (skipped when
  the endpoint answers 404);
* ``post-1`` / ``post-batch``: the kiosk POSTing each reading / batches of 50 over
  HTTP: reported "not available" while the API has no POST route for readings.

Per path: bytes on the wire per delivered reading, counted at the socket by a TCP
relay between client and bridge (both directions, headers, handshakes and TLS
records included); latency from ``measured_at`` to client receipt (p50/p99/max);
bridge CPU seconds (psutil, user+system) per 1,000 readings published, ingest
included (the ``ingest only`` row has no client); and the knee: the offered rate
is stepped up (each run waits until the bridge has stored the previous one and is
idle) and the knee is the highest rate whose p99 stays within 2x the base-rate
p99 (or +250 ms, whichever is larger) with at least 97 % of the base-rate share
delivered by the end of the run. The ``mqtt publish`` row counts the kiosk->broker
leg the same way. TLS on: the bridge serves HTTPS/WSS with a development CA's
certificate (``bridge.devcerts``).

Usage: .venv/bin/python bench/transport.py [--quick] [--broker mosquitto|amqtt]
       [--tls off|on|both] [--paths ws,sse,...] [--rate N] [--seconds S]
The last line of output is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import shutil
import ssl
import sys
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _common as c
from bench import _stack as s

KIOSKS: Final = 20
BASE_RATE: Final = 200.0  # readings/s for the per-path figures (~40 kiosks)
KNEE_RATES: Final = (500.0, 1_000.0, 2_000.0, 4_000.0)
QUICK_TLS_PATHS: Final = ("ws", "rest-1s")
POST_BATCH_READINGS: Final = 50
DRAIN_CAP_SECONDS: Final = 60.0
QUIET_CPU_SHARE: Final = 0.3  # bridge CPU (of one core) below which a run starts
QUIET_CAP_SECONDS: Final = 10.0
REST_PAGE: Final = 1000
FHIR_MAX_PAGES: Final = 20
KNEE_P99_FACTOR: Final = 2.0
KNEE_P99_SLACK_SECONDS: Final = 0.25
KNEE_DELIVERED_SHARE: Final = 0.97
PATHS: Final = (
    "ingest",
    "ws",
    "ws-plain",
    "sse",
    "rest-1s",
    "rest-100ms",
    "fhir-1s",
    "post-1",
    "post-batch",
)
LABELS: Final = {
    "ingest": "ingest only (no client)",
    "mqtt": "mqtt publish kiosk->broker",
    "ws": "WebSocket /ws (deflate)",
    "ws-plain": "WebSocket /ws (no deflate)",
    "sse": "SSE /api/v1/stream",
    "rest-1s": "REST poll 1 s",
    "rest-100ms": "REST poll 100 ms",
    "fhir-1s": "FHIR search poll 1 s",
    "post-1": "REST POST per reading",
    "post-batch": f"REST POST batch of {POST_BATCH_READINGS}",
}
POLL_SECONDS: Final = {"rest-1s": 1.0, "rest-100ms": 0.1, "fhir-1s": 1.0}


# -- worker processes (publisher, client) --------------------------------------------


class Channel:
    """The worker's end of the pipe: says ready once, then takes the go value."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.went = False

    def ready(self) -> Any:
        """Tell the parent the job is set up; wait for its go value (a time)."""
        self.conn.send(("ready", None))
        self.went = True
        return self.conn.recv()


def worker(conn: Connection) -> None:
    """Serve ``(job, params)`` requests: ``publish`` or ``client``; ``None`` ends."""
    while (request := conn.recv()) is not None:
        job, params = request
        channel = Channel(conn)
        try:
            if job == "publish":
                result = publish_job(channel, params)
            else:
                result = client_job(channel, params)
        except Exception as exc:  # reported to the parent, which prints it
            result = {"error": f"{type(exc).__name__}: {exc}"}
            if not channel.went:
                channel.ready()
        conn.send(("result", result))


def publish_job(conn: Channel, p: dict[str, Any]) -> dict[str, Any]:
    """Publish ``rate`` readings/s for ``seconds`` once told to go."""
    import threading

    from vitals_contract import Leaf, kiosk_topic

    messages_per_second = p["rate"] / c.READINGS_PER_MESSAGE
    total = int(messages_per_second * p["seconds"])
    kiosks = p["kiosks"]
    per_kiosk = total // len(kiosks) + 2
    payloads = {
        k: c.build_payloads(k, per_kiosk, at=c.SENTINEL_AT, first_seq=p["first_seq"])
        for k in kiosks
    }
    topics = {k: kiosk_topic(k, Leaf.READINGS, p["root"]) for k in kiosks}
    client = c.mqtt_client()
    client.max_inflight_messages_set(1000)
    connected = threading.Event()
    client.on_connect = lambda *_: connected.set()
    client.connect(c.HOST, p["port"], keepalive=60)
    client.loop_start()
    connected.wait(10)
    t0 = conn.ready()
    sent = 0
    while sent < total:
        due = min(total, int((time.time() - t0) * messages_per_second) + 1)
        while sent < due:
            kiosk = kiosks[sent % len(kiosks)]
            body = c.stamp(payloads[kiosk][sent // len(kiosks)])
            client.publish(topics[kiosk], body, qos=1)
            sent += 1
        time.sleep(max(0.0, t0 + sent / messages_per_second - time.time()))
    time.sleep(0.3)
    client.loop_stop()
    client.disconnect()
    return {"sent_readings": sent * c.READINGS_PER_MESSAGE}


@dataclass
class Receipts:
    """First receipt of each reading: latency per (kiosk, seq)."""

    kiosks: frozenset[str]
    latencies: dict[tuple[str, int], float] = field(default_factory=dict)
    copies: int = 0
    note: str = ""

    def add(self, kiosk: str, seq: int, measured_at: str, now: float) -> bool:
        """Record one reading; tell whether it was new."""
        if kiosk not in self.kiosks:
            return False
        self.copies += 1
        key = (kiosk, seq)
        if key in self.latencies:
            return False
        self.latencies[key] = now - c.parse_iso(measured_at)
        return True

    def result(self) -> dict[str, Any]:
        """Summarise for the parent."""
        values = list(self.latencies.values())
        return {
            "received": len(values),
            "copies": self.copies,
            "p50": c.percentile(values, 50),
            "p99": c.percentile(values, 99),
            "max": max(values) if values else float("nan"),
            "note": self.note,
        }


def client_job(conn: Channel, p: dict[str, Any]) -> dict[str, Any]:
    """Receive readings over one path until ``end_at`` (wall clock)."""
    receipts = Receipts(frozenset(p["kiosks"]))
    path = p["path"]
    if path == "ingest":
        time.sleep(max(0.0, conn.ready() - time.time()))
        return receipts.result()
    runner = {
        "ws": _ws_client,
        "ws-plain": _ws_client,
        "sse": _sse_client,
        "rest-1s": _poll_client,
        "rest-100ms": _poll_client,
        "fhir-1s": _fhir_client,
        "post-1": _post_client,
        "post-batch": _post_client,
    }[path]
    asyncio.run(runner(conn, p, receipts))
    return receipts.result()


def _ssl(p: dict[str, Any]) -> ssl.SSLContext | None:
    return ssl.create_default_context(cafile=p["ca"]) if p["ca"] else None


def _http(p: dict[str, Any]) -> Any:
    import httpx

    return httpx.AsyncClient(
        base_url=p["base"],
        headers={"Authorization": f"Bearer {p['token']}"},
        verify=_ssl(p) or True,
        timeout=30,
    )


async def _until(conn: Channel, receive: Any) -> None:
    """Run ``receive`` until the parent's end time (sent after ready)."""
    end_at = await asyncio.to_thread(conn.ready)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(receive(), max(0.1, end_at - time.time()))


async def _ws_client(conn: Channel, p: dict[str, Any], r: Receipts) -> None:
    import websockets
    from websockets.typing import Subprotocol

    url = p["base"].replace("http", "ws", 1) + "/ws"
    async with websockets.connect(
        url,
        subprotocols=[Subprotocol("vitals.v1"), Subprotocol(f"bearer.{p['token']}")],
        ssl=_ssl(p),
        max_queue=None,
        compression=None if p["path"] == "ws-plain" else "deflate",
    ) as ws:
        subscribe = {"type": "subscribe", "kiosks": p["kiosks"]}
        await ws.send(json.dumps({**subscribe, "status": False, "alerts": False}))
        first = json.loads(await ws.recv())
        assert first["type"] == "subscribed", first

        async def receive() -> None:
            try:
                async for raw in ws:
                    now = time.time()
                    msg = json.loads(raw)
                    if msg.get("type") == "reading":
                        r.add(msg["kiosk_id"], msg["seq"], msg["measured_at"], now)
            except websockets.ConnectionClosed as exc:
                r.note = f"closed {exc.code}"

        await _until(conn, receive)


async def _sse_client(conn: Channel, p: dict[str, Any], r: Receipts) -> None:
    params = [("kiosk_id", k) for k in p["kiosks"]]
    async with (
        _http(p) as http,
        http.stream("GET", "/api/v1/stream", params=params) as resp,
    ):
        resp.raise_for_status()
        lines = resp.aiter_lines()

        async def receive() -> None:
            async for line in lines:
                if line.startswith("data: {"):
                    now = time.time()
                    msg = json.loads(line[6:])
                    if msg.get("type") == "reading":
                        r.add(msg["kiosk_id"], msg["seq"], msg["measured_at"], now)

        await _until(conn, receive)


async def _poll_client(conn: Channel, p: dict[str, Any], r: Receipts) -> None:
    interval = POLL_SECONDS[p["path"]]
    kiosk_params = [("kiosk_id", k) for k in p["kiosks"]]
    async with _http(p) as http:
        cursor: str | None = None

        async def poll() -> None:
            nonlocal cursor
            while True:
                params = [*kiosk_params, ("limit", str(REST_PAGE))]
                if cursor:
                    params.append(("cursor", cursor))
                resp = await http.get("/api/v1/readings", params=params)
                resp.raise_for_status()
                now = time.time()
                items = resp.json()["items"]
                for it in items:
                    r.add(it["kiosk_id"], it["seq"], it["measured_at"], now)
                if items:
                    cursor = str(items[-1]["id"])
                if len(items) < REST_PAGE:
                    return

        async def receive() -> None:
            while True:
                started = time.monotonic()
                await poll()
                await asyncio.sleep(max(0.0, started + interval - time.monotonic()))

        await _until(conn, receive)


async def _fhir_client(conn: Channel, p: dict[str, Any], r: Receipts) -> None:
    query = {"_sort": "-date", "_count": "50"}
    async with _http(p) as http:

        async def poll() -> None:
            url: str | None = "/fhir/Observation"
            params: dict[str, str] | None = query
            for _ in range(FHIR_MAX_PAGES):
                if url is None:
                    return
                resp = await http.get(url, params=params)
                resp.raise_for_status()
                now = time.time()
                bundle = resp.json()
                fresh = 0
                for entry in bundle.get("entry", []):
                    res = entry.get("resource", {})
                    ident = next(
                        (
                            i["value"]
                            for i in res.get("identifier", [])
                            if ":" in i.get("value", "")
                        ),
                        None,
                    )
                    if ident is None or "effectiveDateTime" not in res:
                        continue
                    kiosk, _, seq = ident.rpartition(":")
                    if r.add(kiosk, int(seq), res["effectiveDateTime"], now):
                        fresh += 1
                if fresh < len(bundle.get("entry", [])):
                    return  # reached what an earlier poll saw
                url = next(
                    (
                        link["url"]
                        for link in bundle.get("link", [])
                        if link.get("relation") == "next"
                    ),
                    None,
                )
                params = None

        async def receive() -> None:
            while True:
                started = time.monotonic()
                await poll()
                await asyncio.sleep(max(0.0, started + 1.0 - time.monotonic()))

        await _until(conn, receive)


async def _post_client(conn: Channel, p: dict[str, Any], r: Receipts) -> None:
    """POST readings at the offered rate; receipt = the response to the POST."""
    per_request = 1 if p["path"] == "post-1" else POST_BATCH_READINGS
    kiosk = p["kiosks"][0]
    total = int(p["rate"] * p["seconds"]) // per_request
    bodies = c.build_payloads(
        kiosk, total, at=c.SENTINEL_AT, per_message=per_request, first_seq=0
    )
    async with _http(p) as http:

        async def send() -> None:
            t0 = time.time()
            for n, body in enumerate(bodies):
                readings = json.loads(c.stamp(body))["readings"]
                items = [{**item, "kiosk_id": kiosk} for item in readings]
                resp = await http.post(p["post_path"], json=items)
                now = time.time()
                if resp.status_code >= 300:
                    r.note = f"HTTP {resp.status_code}"
                    return
                for item in readings:
                    r.add(kiosk, item["seq"], item["measured_at"], now)
                due = t0 + (n + 1) * p["seconds"] / total
                await asyncio.sleep(max(0.0, due - time.time()))

        await _until(conn, send)


# -- the parent -----------------------------------------------------------------------


@dataclass
class Run:
    """One measurement: one path at one rate."""

    path: str
    tls: bool
    rate: float
    published: int = 0
    received: int = 0
    bytes_total: int = 0
    mqtt_bytes: int = 0
    cpu_seconds: float = float("nan")
    p50: float = float("nan")
    p99: float = float("nan")
    max: float = float("nan")
    note: str = ""

    @property
    def delivered(self) -> float:
        """Share of published readings the client got."""
        return self.received / self.published if self.published else float("nan")

    @property
    def bytes_per_reading(self) -> float:
        """Client-leg bytes per delivered reading."""
        return self.bytes_total / self.received if self.received else float("nan")

    @property
    def cpu_per_1k(self) -> float:
        """Bridge CPU seconds per 1,000 published readings."""
        return 1000 * self.cpu_seconds / self.published if self.published else 0.0


class Bench:
    """Broker, bridge, relays and the two worker processes."""

    def __init__(
        self, args: argparse.Namespace, workdir: Path, url: str, tls: bool
    ) -> None:
        self.args = args
        self.tls = tls
        self.root = c.new_root()
        self.ca: Path | None = None
        cert = None
        if tls:
            self.ca, cert_file, key_file = s.tls_files(workdir / "tls")
            cert = (cert_file, key_file)
        self.broker = s.BrokerService(args.broker, workdir)
        self.bridge = s.BridgeService(
            self.broker.port,
            url,
            self.root,
            workdir,
            name=f"bridge-tls-{'on' if tls else 'off'}",
            tls=cert,
        )
        self.token = s.token()
        self.rows = c.RowCounter(url)
        self.expected_rows = 0
        self.runs = 0
        self.post_paths: dict[str, str] = {}
        self.fhir = False

    def __enter__(self) -> Bench:
        self.broker.start()
        self.bridge.start().wait_ready()
        self.http_relay = s.Relay(self.bridge.http_port, "http").start()
        self.mqtt_relay = s.Relay(self.broker.port, "mqtt").start()
        ctx = mp.get_context("spawn")
        self.pub, pub_child = ctx.Pipe()
        self.cli, cli_child = ctx.Pipe()
        self.procs = [
            ctx.Process(target=worker, args=(pub_child,), daemon=True),
            ctx.Process(target=worker, args=(cli_child,), daemon=True),
        ]
        for proc in self.procs:
            proc.start()
        self.post_paths = s.post_endpoint(self.bridge.url, self.ca)
        self.fhir = s.fhir_available(self.bridge.url, self.ca)
        return self

    def __exit__(self, *_: object) -> None:
        for conn in (self.pub, self.cli):
            conn.send(None)
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        self.http_relay.close()
        self.mqtt_relay.close()
        self.rows.close()
        self.bridge.stop()
        self.broker.stop()

    def drain(self) -> bool:
        """Wait (bounded) until the bridge has stored all that was published."""
        deadline = time.monotonic() + DRAIN_CAP_SECONDS
        while time.monotonic() < deadline and self.rows() < self.expected_rows:
            time.sleep(0.1)
        return self.rows() >= self.expected_rows

    def settle(self) -> None:
        """Wait (bounded) until the bridge is nearly idle, so runs do not overlap."""
        deadline = time.monotonic() + QUIET_CAP_SECONDS
        while time.monotonic() < deadline:
            before = self.bridge.cpu_seconds()
            time.sleep(0.5)
            if self.bridge.cpu_seconds() - before < 0.5 * QUIET_CPU_SHARE:
                return

    def available(self, path: str) -> str:
        """Return "" when the path can be measured, else why not."""
        if path == "fhir-1s" and not self.fhir:
            return "not available (/fhir/Observation 404 or failing)"
        if path.startswith("post-"):
            kind = "single" if path == "post-1" else "batch"
            if kind not in self.post_paths:
                return "not available (no POST route for readings)"
        return ""

    def measure(self, path: str, rate: float, seconds: float) -> Run:
        """Publish at ``rate`` readings/s for ``seconds``; the client follows."""
        self.runs += 1
        kiosks = c.kiosk_ids(KIOSKS, prefix=f"t{self.runs:03d}-")
        base = f"{'https' if self.tls else 'http'}://{c.HOST}:{self.http_relay.port}"
        poll = POLL_SECONDS.get(path, 0.0)
        tail = max(1.0, 1.5 * poll)
        params = {
            "path": path,
            "kiosks": kiosks,
            "base": base,
            "ca": str(self.ca) if self.ca else None,
            "token": self.token,
            "rate": rate,
            "seconds": seconds,
            "post_path": self.post_paths.get("single" if path == "post-1" else "batch"),
        }
        run = Run(path, self.tls, rate)
        self.settle()
        self.http_relay.reset()
        self.cli.send(("client", params))
        self._expect(self.cli, "ready")
        posting = path.startswith("post-")
        if not posting:
            self.pub.send(
                (
                    "publish",
                    {
                        "port": self.mqtt_relay.port,
                        "root": self.root,
                        "kiosks": kiosks,
                        "rate": rate,
                        "seconds": seconds,
                        "first_seq": 0,
                    },
                )
            )
            self._expect(self.pub, "ready")
        self.mqtt_relay.reset()
        cpu0 = self.bridge.cpu_seconds()
        t0 = time.time() + 0.2
        self.cli.send(t0 + seconds + tail if not posting else t0 + seconds + 5)
        if not posting:
            self.pub.send(t0)
            published = self._expect(self.pub, "result")
            run.published = published.get("sent_readings", 0)
        result = self._expect(self.cli, "result")
        self.expected_rows += 0 if posting else run.published
        if not self.drain():
            run.note = "bridge backlog not drained in 60 s"
        run.cpu_seconds = self.bridge.cpu_seconds() - cpu0
        run.mqtt_bytes = self.mqtt_relay.bytes_total
        run.bytes_total = self.http_relay.bytes_total
        if posting:
            run.published = int(rate * seconds)
        if "error" in result:
            run.note = result["error"]
            return run
        run.received = result["received"]
        run.p50, run.p99, run.max = result["p50"], result["p99"], result["max"]
        run.note = " ".join(n for n in (run.note, result["note"]) if n)
        return run

    @staticmethod
    def _expect(conn: Connection, kind: str) -> Any:
        if not conn.poll(120):
            raise TimeoutError(f"worker gave no {kind}")
        got, value = conn.recv()
        if got != kind:
            raise RuntimeError(f"worker sent {got}, expected {kind}")
        return value


def knee(
    bench: Bench, path: str, base: Run, rates: tuple[float, ...], sec: float
) -> str:
    """Step the offered rate until latency or delivery degrades; describe the knee."""
    if base.received == 0:
        return "-"
    limit = max(base.p99 * KNEE_P99_FACTOR, base.p99 + KNEE_P99_SLACK_SECONDS)
    share = min(base.delivered, 1.0) * KNEE_DELIVERED_SHARE
    good = base.rate
    for rate in rates:
        run = bench.measure(path, rate, sec)
        ok = run.p99 <= limit and run.delivered >= share
        print(
            f"    knee {LABELS[path]:<24} {rate:>7,.0f}/s  p99 {_ms(run.p99):>8}  "
            f"delivered {run.delivered:6.1%}  {'ok' if ok else 'degraded'} "
            f"{run.note}",
            flush=True,
        )
        if not ok:
            return f"{good:,.0f}/s (degraded at {rate:,.0f})"
        good = rate
    return f">= {good:,.0f}/s"


def _ms(seconds: float) -> str:
    return "-" if seconds != seconds else f"{seconds * 1000:,.0f} ms"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Read the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="under a minute: 1.5 s each, TLS on for 2 paths only, no knee",
    )
    parser.add_argument(
        "--broker",
        choices=("mosquitto", "amqtt"),
        default="mosquitto" if shutil.which("mosquitto") else "amqtt",
    )
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--tls", choices=("off", "on", "both"), default="both")
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--rate", type=float, default=BASE_RATE, help="readings/s")
    parser.add_argument("--seconds", type=float, default=None, help="per measurement")
    parser.add_argument("--no-knee", action="store_true", help="skip rate stepping")
    args = parser.parse_args(argv)
    args.seconds = args.seconds or (1.5 if args.quick else 10.0)
    args.paths = [p for p in args.paths.split(",") if p]
    unknown = set(args.paths) - set(PATHS)
    if unknown:
        parser.error(f"unknown paths: {sorted(unknown)}")
    return args


def main(argv: list[str] | None = None) -> None:
    """Measure every path with TLS off and on; print the table and one JSON line."""
    args = parse_args(argv)
    machine = c.machine()
    print(
        f"transport: {args.rate:,.0f} readings/s base, {args.seconds:g} s each, "
        f"broker {args.broker}, {args.database}, {KIOSKS} kiosks"
    )
    print(f"machine: {machine['nproc']} cores, {machine['cpu']}, {machine['date']}")
    tls_modes = {"off": [False], "on": [True], "both": [False, True]}[args.tls]
    (c.ROOT_DIR / "var").mkdir(exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-transport-", dir=c.ROOT_DIR / "var"))
    rows: list[dict[str, Any]] = []
    knee_rates = () if args.quick or args.no_knee else KNEE_RATES
    knee_seconds = 6.0
    try:
        for tls in tls_modes:
            with c.database(args.database) as url, Bench(args, workdir, url, tls) as b:
                print(f"  TLS {'on' if tls else 'off'}: bridge at {b.bridge.url}")
                rows.extend(_measure_all(b, args, knee_rates, knee_seconds, tls))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print()
    headers = [
        "transport",
        "TLS",
        "bytes/reading",
        "p50",
        "p99",
        "max",
        "delivered",
        "CPU s/1k",
        "knee rate",
    ]
    print(c.table(headers, [_cells(r) for r in rows]))
    print(
        "bytes/reading: client<->bridge socket, both directions; CPU: bridge process "
        "per 1,000 readings published (ingest included); knee: readings/s"
    )
    c.emit_json(
        {
            "bench": "transport",
            "broker": args.broker,
            "database": args.database,
            "base_rate": args.rate,
            "seconds": args.seconds,
            "rows": rows,
            "machine": machine,
        }
    )


def _measure_all(
    b: Bench,
    args: argparse.Namespace,
    knee_rates: tuple[float, ...],
    knee_seconds: float,
    tls: bool,
) -> list[dict[str, Any]]:
    rows = []
    for path in args.paths:
        if tls and args.quick and path not in QUICK_TLS_PATHS:
            continue
        why = b.available(path)
        if why:
            print(f"    {LABELS[path]:<28} {why}")
            rows.append(_row(path, tls, None, why))
            continue
        run = b.measure(path, args.rate, args.seconds)
        print(
            f"    {LABELS[path]:<28} {run.bytes_per_reading:8.1f} B/reading  "
            f"p50 {_ms(run.p50)}  p99 {_ms(run.p99)}  delivered {run.delivered:.1%}  "
            f"CPU {run.cpu_per_1k:.3f} s/1k {run.note}",
            flush=True,
        )
        if path == "ingest" and not tls:
            mqtt = Run("mqtt", tls, run.rate, published=run.published)
            mqtt.received = run.published
            mqtt.bytes_total = run.mqtt_bytes
            rows.append(_row("mqtt", tls, mqtt, "QoS 1, 5 readings per message"))
        k = "-"
        if not tls and path != "ingest" and knee_rates:
            k = knee(b, path, run, knee_rates, knee_seconds)
        rows.append(_row(path, tls, run, run.note, k))
    return rows


def _row(
    path: str, tls: bool, run: Run | None, note: str, knee_rate: str = "-"
) -> dict[str, Any]:
    if run is None:
        return {"path": path, "tls": tls, "available": False, "note": note}
    return {
        "path": path,
        "tls": tls,
        "available": True,
        "bytes_per_reading": c.rounded(run.bytes_per_reading, 1),
        "p50_ms": c.rounded(run.p50 * 1000, 1),
        "p99_ms": c.rounded(run.p99 * 1000, 1),
        "max_ms": c.rounded(run.max * 1000, 1),
        "delivered": c.rounded(run.delivered, 4),
        "cpu_s_per_1k": c.rounded(run.cpu_per_1k, 3) if path != "mqtt" else None,
        "knee": knee_rate,
        "note": note,
    }


def _cells(r: dict[str, Any]) -> list[Any]:
    label = LABELS[r["path"]]
    tls = "on" if r["tls"] else "off"
    if not r["available"]:
        return [label, tls, r["note"], "", "", "", "", "", ""]
    lat = [
        "-" if r[k] is None or r["path"] in ("ingest", "mqtt") else f"{r[k]:,.0f} ms"
        for k in ("p50_ms", "p99_ms", "max_ms")
    ]
    delivered = r["delivered"]
    cpu = r["cpu_s_per_1k"]
    size = r["bytes_per_reading"]
    return [
        label,
        tls,
        "-" if size is None or r["path"] == "ingest" else f"{size:,.0f}",
        *lat,
        "-" if delivered is None or r["path"] == "ingest" else f"{delivered:.1%}",
        "-" if cpu is None else f"{cpu:.3f}",
        r["knee"],
    ]


if __name__ == "__main__":
    main()
