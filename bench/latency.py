"""Publish-to-WebSocket latency of live readings at 1,000 readings/s.

A publisher process sends 200 messages/s of 5 readings (QoS 1, payloads built with
the contract models up front); just before each publish it writes the wall-clock
time into the readings' ``measured_at``. A WebSocket client process, subscribed to
every kiosk, takes ``time.time()`` at receipt minus ``measured_at`` per reading
(same machine, same clock). The bridge stamps ``received_at`` at commit, which
splits the figure into publish-to-commit and commit-to-socket.

Usage: .venv/bin/python bench/latency.py [--quick] [--configs mosquitto:sqlite,...]
A config is ``broker:database[:wait_ms]``; ``wait_ms`` overrides the bridge's
``ingest.batch_max_wait_ms``. The last line of output is JSON.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _common as c
from bridge.config import IngestSettings

MESSAGES_PER_SECOND: Final = 200
KIOSKS: Final = 10
WARMUP_SECONDS: Final = 2.0
TARGET_P99_MS: Final = 25.0


def run_one(
    broker_kind: str, db_kind: str, wait_ms: str | None, seconds: float
) -> dict[str, Any]:
    """Measure one broker/database pair; return the figures."""
    ctx = mp.get_context("spawn")
    env = {} if wait_ms is None else {"VITALS_INGEST__BATCH_MAX_WAIT_MS": wait_ms}
    root = c.new_root()
    kiosks = c.kiosk_ids(KIOSKS)
    with (
        c.broker(broker_kind) as brk,
        c.database(db_kind) as url,
        c.bridge(brk.port, url, root, **env) as b,
    ):
        ws_ready, pub_ready = ctx.Event(), ctx.Event()
        stop = ctx.Value("b", 0, lock=False)
        start_at = ctx.Value("d", 0.0, lock=False)
        warm = ctx.Value("d", 0.0, lock=False)
        results = ctx.Queue()
        ws = ctx.Process(
            target=c.ws_clients,
            args=(
                f"ws://{c.HOST}:{b.http_port}/ws",
                c.ws_subprotocols(c.JWT_SECRET),
                [None],
                ws_ready,
                stop,
                results,
                warm,
            ),
        )
        pub = ctx.Process(
            target=c.paced_publisher,
            args=(
                brk.port,
                root,
                kiosks,
                MESSAGES_PER_SECOND,
                seconds,
                pub_ready,
                start_at,
            ),
        )
        ws.start()
        pub.start()
        if not (ws_ready.wait(60) and pub_ready.wait(60)):
            raise TimeoutError("clients not ready")
        t0 = time.time() + 0.3
        warm.value = t0 + WARMUP_SECONDS
        start_at.value = t0
        pub.join(seconds + 30)
        time.sleep(1.0)
        stop.value = 1
        out = results.get(timeout=30)
        ws.join(10)
        if pub.is_alive():
            pub.kill()
    lat = [x * 1000 for x in out["latencies"]]
    ing = [x * 1000 for x in out["ingest"]]
    expected = int(MESSAGES_PER_SECOND * seconds) * c.READINGS_PER_MESSAGE
    return {
        "broker": brk.name,
        "database": db_kind,
        "batch_wait_ms": wait_ms
        or f"default ({IngestSettings.model_fields['batch_max_wait_ms'].default:g})",
        "readings_expected": expected,
        "readings_received": out["received"],
        "samples": len(lat),
        "p50_ms": c.percentile(lat, 50),
        "p99_ms": c.percentile(lat, 99),
        "max_ms": max(lat, default=float("nan")),
        "commit_p50_ms": c.percentile(ing, 50),
        "commit_p99_ms": c.percentile(ing, 99),
    }


def main() -> None:
    """Run each configuration and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (< 1 min)")
    parser.add_argument("--configs", default=None)
    parser.add_argument("--seconds", type=float, default=None)
    args = parser.parse_args()
    if args.configs:
        configs = args.configs.split(",")
    elif args.quick:
        configs = ["mosquitto:sqlite", "amqtt:sqlite"]
    else:
        configs = [
            "mosquitto:sqlite",
            "mosquitto:postgres",
            "amqtt:sqlite",
            "amqtt:postgres",
            "mosquitto:sqlite:0",
            "mosquitto:postgres:0",
        ]
    seconds = args.seconds or (10.0 if args.quick else 30.0)

    rows = []
    for config in configs:
        parts = config.split(":")
        wait = parts[2] if len(parts) > 2 else None
        rows.append(run_one(parts[0], parts[1], wait, seconds))
        print(f"# {config}: done", file=sys.stderr)

    info = c.machine()
    print(
        f"publish -> WebSocket latency at {MESSAGES_PER_SECOND} msg/s x "
        f"{c.READINGS_PER_MESSAGE} readings, {KIOSKS} kiosks, {seconds:.0f} s "
        f"({WARMUP_SECONDS:.0f} s warm-up dropped); {info['nproc']} cores {info['cpu']}, "
        f"{info['date']}"
    )
    print(
        c.table(
            [
                "broker",
                "database",
                "batch wait ms",
                "received",
                "p50 ms",
                "p99 ms",
                "max ms",
                "to commit p50",
                "to commit p99",
            ],
            [
                [
                    r["broker"],
                    r["database"],
                    r["batch_wait_ms"],
                    f"{r['readings_received']}/{r['readings_expected']}",
                    r["p50_ms"],
                    r["p99_ms"],
                    r["max_ms"],
                    r["commit_p50_ms"],
                    r["commit_p99_ms"],
                ]
                for r in rows
            ],
        )
    )
    default_mosq = [
        r
        for r in rows
        if r["broker"] == "mosquitto" and "default" in str(r["batch_wait_ms"])
    ]
    met = bool(default_mosq) and all(r["p99_ms"] <= TARGET_P99_MS for r in default_mosq)
    print(
        f"\ntarget p99 <= {TARGET_P99_MS:.0f} ms on Mosquitto (default settings): "
        f"{'met' if met else 'NOT met'}"
    )
    c.emit_json(
        {
            "bench": "latency",
            "quick": args.quick,
            "rate_readings_per_s": MESSAGES_PER_SECOND * c.READINGS_PER_MESSAGE,
            "results": [
                {
                    "config": f"{r['broker']}:{r['database']}:{r['batch_wait_ms']}",
                    "received": r["readings_received"],
                    "expected": r["readings_expected"],
                    "p50_ms": c.rounded(r["p50_ms"]),
                    "p99_ms": c.rounded(r["p99_ms"]),
                    "max_ms": c.rounded(r["max_ms"]),
                    "commit_p99_ms": c.rounded(r["commit_p99_ms"]),
                }
                for r in rows
            ],
            "target_p99_25ms_mosquitto_met": met,
            "machine": info,
        }
    )


if __name__ == "__main__":
    main()
