"""Live fan-out: many WebSocket clients on one bridge, each following one kiosk.

50 kiosks each publish one message of 5 readings per second (a publisher process,
QoS 1, ``measured_at`` stamped at publish). 1,000 WebSocket clients, split over two
client processes (asyncio + ``websockets``), subscribe to one kiosk each, 20 per
kiosk, so the bridge delivers 1,000 x 5 = 5,000 readings/s. Reported: delivered
rate, latency (receipt minus ``measured_at``) p50/p99/max, clients cut off.

Usage: .venv/bin/python bench/fanout.py [--quick] [--clients N] [--database sqlite]
The last line of output is JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Final

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _common as c

KIOSKS: Final = 50
MESSAGES_PER_KIOSK_PER_SECOND: Final = 1.0
CLIENT_PROCESSES: Final = 2
WARMUP_SECONDS: Final = 3.0
TARGET_P99_MS: Final = 100.0


def _cpu_seconds(pid: int) -> float:
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / 100.0
    return float("nan")


def main() -> None:
    """Connect the clients, publish, measure, print."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (< 1 min)")
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--database", default="sqlite")
    parser.add_argument("--broker", default="mosquitto")
    parser.add_argument("--seconds", type=float, default=None)
    args = parser.parse_args()
    seconds = args.seconds or (8.0 if args.quick else 60.0)
    kiosks = c.kiosk_ids(KIOSKS)
    subs: list[list[str] | None] = [[kiosks[i % KIOSKS]] for i in range(args.clients)]
    rate = KIOSKS * MESSAGES_PER_KIOSK_PER_SECOND

    ctx = mp.get_context("spawn")
    root = c.new_root()
    with (
        c.broker(args.broker) as brk,
        c.database(args.database) as url,
        c.bridge(brk.port, url, root) as b,
    ):
        stop = ctx.Value("b", 0, lock=False)
        start_at = ctx.Value("d", 0.0, lock=False)
        warm = ctx.Value("d", 0.0, lock=False)
        results = ctx.Queue()
        readies = []
        procs = []
        t_connect = time.monotonic()
        for p in range(CLIENT_PROCESSES):
            ready = ctx.Event()
            proc = ctx.Process(
                target=c.ws_clients,
                args=(
                    f"ws://{c.HOST}:{b.http_port}/ws",
                    c.ws_subprotocols(c.JWT_SECRET),
                    subs[p::CLIENT_PROCESSES],
                    ready,
                    stop,
                    results,
                    warm,
                ),
            )
            proc.start()
            procs.append(proc)
            readies.append(ready)
        for ready in readies:
            if not ready.wait(180):
                raise TimeoutError("WebSocket clients not connected")
        connect_seconds = time.monotonic() - t_connect

        pub_ready = ctx.Event()
        pub = ctx.Process(
            target=c.paced_publisher,
            args=(brk.port, root, kiosks, rate, seconds, pub_ready, start_at),
        )
        pub.start()
        if not pub_ready.wait(60):
            raise TimeoutError("publisher not ready")
        t0 = time.time() + 0.3
        warm.value = t0 + WARMUP_SECONDS
        cpu0 = _cpu_seconds(b.proc.pid)
        start_at.value = t0
        pub.join(seconds + 30)
        cpu1 = _cpu_seconds(b.proc.pid)
        time.sleep(2.0)
        stop.value = 1
        outs = [results.get(timeout=60) for _ in procs]
        for proc in procs:
            proc.join(10)
        metrics = {}
        with contextlib.suppress(OSError):
            metrics = b.metrics()

    lat = [x * 1000 for o in outs for x in o["latencies"]]
    received = sum(o["received"] for o in outs)
    closed = sum(o["closed"] for o in outs)
    expected = int(rate * seconds) * c.READINGS_PER_MESSAGE * (args.clients // KIOSKS)
    measured_seconds = seconds - WARMUP_SECONDS
    delivered_rate = len(lat) / measured_seconds
    p99 = c.percentile(lat, 99)
    bridge_cpu = 100 * (cpu1 - cpu0) / seconds
    # CPU per delivered reading holds even when other work starves the bridge.
    cpu_us_per_reading = (
        1e4 * bridge_cpu / (received / seconds) if received else float("nan")
    )
    info = c.machine()
    print(
        f"fan-out on {brk.name} + {args.database}: {args.clients} WebSocket clients "
        f"({CLIENT_PROCESSES} processes), {KIOSKS} kiosks x "
        f"{MESSAGES_PER_KIOSK_PER_SECOND:.0f} msg/s x {c.READINGS_PER_MESSAGE} readings, "
        f"{seconds:.0f} s ({WARMUP_SECONDS:.0f} s warm-up); {info['nproc']} cores "
        f"{info['cpu']}, {info['date']}"
    )
    print(
        c.table(
            [
                "clients",
                "connect s",
                "offered readings/s",
                "delivered readings/s",
                "received/expected",
                "p50 ms",
                "p99 ms",
                "max ms",
                "cut off",
                "bridge CPU %",
                "bridge CPU us/reading",
                "client procs CPU %",
            ],
            [
                [
                    args.clients,
                    connect_seconds,
                    args.clients
                    * MESSAGES_PER_KIOSK_PER_SECOND
                    * c.READINGS_PER_MESSAGE,
                    delivered_rate,
                    f"{received}/{expected}",
                    c.percentile(lat, 50),
                    p99,
                    max(lat, default=float("nan")),
                    closed,
                    bridge_cpu,
                    cpu_us_per_reading,
                    " + ".join(f"{o['cpu_percent']:.0f}" for o in outs),
                ]
            ],
        )
    )
    met = p99 <= TARGET_P99_MS and closed == 0 and received >= 0.99 * expected
    print(
        f"\ntarget p99 <= {TARGET_P99_MS:.0f} ms with every reading delivered: "
        f"{'met' if met else 'NOT met'}"
    )
    c.emit_json(
        {
            "bench": "fanout",
            "quick": args.quick,
            "broker": brk.name,
            "database": args.database,
            "clients": args.clients,
            "offered_readings_per_s": args.clients
            * MESSAGES_PER_KIOSK_PER_SECOND
            * c.READINGS_PER_MESSAGE,
            "delivered_readings_per_s": c.rounded(delivered_rate, 0),
            "received": received,
            "expected": expected,
            "p50_ms": c.rounded(c.percentile(lat, 50)),
            "p99_ms": c.rounded(p99),
            "max_ms": c.rounded(max(lat, default=float("nan"))),
            "clients_cut_off": closed,
            "hub_dropped_clients": metrics.get("vitals_ws_dropped_clients_total"),
            "bridge_cpu_percent": c.rounded(bridge_cpu, 1),
            "bridge_cpu_us_per_reading": c.rounded(cpu_us_per_reading, 0),
            "client_process_cpu_percent": [
                c.rounded(o["cpu_percent"], 1) for o in outs
            ],
            "target_p99_100ms_met": met,
            "machine": info,
        }
    )


if __name__ == "__main__":
    main()
