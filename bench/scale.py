"""Ingest rate with 1, 2 and 3 bridge instances sharing one MQTT 5 broker.

The bridges join one shared-subscription group on a private Mosquitto and write to
one fresh PostgreSQL database; the same publisher ladder as ``bench/ingest.py``
runs against each fleet size, and once against a bare paho subscriber for the
broker's own ceiling on this machine.

Usage: .venv/bin/python bench/scale.py [--quick] [--instances 1,2,3]
The last line of output is JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _common as c
from bench import ingest


@contextlib.contextmanager
def _fleet(
    n: int, port: int, root: str, env: dict[str, str]
) -> Iterator[tuple[Callable[[], int], int, dict[str, Callable[[], list[int]]], Any]]:
    """Start ``n`` bridges on one database; yield what ``ingest._ladder`` needs."""
    with c.database("postgres") as url, contextlib.ExitStack() as stack:
        bridges = [
            stack.enter_context(
                c.bridge(
                    port,
                    url,
                    root,
                    VITALS_INGEST__CLIENT_ID=f"scale-{i}-{uuid.uuid4().hex[:6]}",
                    VITALS_MIGRATE_ON_START="true" if i == 0 else "false",
                    **env,
                )
            )
            for i in range(n)
        ]
        rows = c.RowCounter(url)
        pids = {"consumer": lambda: [b.proc.pid for b in bridges]}
        try:
            yield rows, c.READINGS_PER_MESSAGE, pids, lambda: {}
        finally:
            rows.close()


def main() -> None:
    """Run the ladder for each fleet size and the bare subscriber; print figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (< 1 min)")
    parser.add_argument("--instances", default="1,2,3")
    parser.add_argument("--kiosks", type=int, default=20)
    parser.add_argument("--publishers", type=int, default=2)
    args = parser.parse_args()
    # Up past where one bridge saturates, so the figures compare ceilings rather
    # than the ladder's top (a ladder stops after two steps short of its rate).
    ladder = [500.0, 1000.0, 2000.0, 3000.0, 4000.0, 6000.0, 8000.0, 10000.0, 12000.0]
    rates = [3000.0] if args.quick else ladder
    step_seconds = 3.5 if args.quick else 6.0
    kiosks = c.kiosk_ids(args.kiosks)
    sizes = [int(s) for s in args.instances.split(",")]

    best: dict[str, float] = {}
    with c.broker("mosquitto") as brk:
        subjects: list[tuple[str, Any]] = [("bare", None)] + [
            (f"{n} bridge{'s' if n > 1 else ''}", n) for n in sizes
        ]
        for name, n in subjects:
            root = c.new_root()
            consumer = (
                ingest._consumer("bare", brk.port, root, {})
                if n is None
                else _fleet(n, brk.port, root, c.kiosk_limit_env(rates, kiosks))
            )
            with consumer as (count, per, pids, probe):
                steps = ingest._ladder(
                    brk.port, root, kiosks, args.publishers, rates, step_seconds,
                    count, per, pids, probe,
                )  # fmt: skip
            best[name] = max((s["delivered_msgs"] for s in steps), default=0.0)
            print(f"# {name}: done", file=sys.stderr)

    info = c.machine()
    print(
        f"scale-out on a private Mosquitto + PostgreSQL, {args.kiosks} kiosks, "
        f"{c.READINGS_PER_MESSAGE} readings/message; {info['nproc']} cores "
        f"{info['cpu']}, {info['date']}"
    )
    bare = best.get("bare") or float("nan")
    rows = [
        [name, rate, rate * c.READINGS_PER_MESSAGE, rate / bare]
        for name, rate in best.items()
    ]
    print(c.table(["consumer", "max msg/s", "max readings/s", "vs bare"], rows))
    c.emit_json(
        {
            "bench": "scale",
            "quick": args.quick,
            "max_msgs_per_s": best,
            "machine": info,
        }
    )


if __name__ == "__main__":
    main()
