"""Sustained ingest rate of the bridge, against a bare subscriber on the same broker.

Publisher processes (paho 2.x, QoS 1) play N kiosks, each message holding 5
readings built with the contract models up front, seqs unique per kiosk. They offer
a rate that steps up; each step lasts ``--step-seconds``. The consumer is, in turn:

* ``bare``: a paho subscriber process (QoS 1) that only counts;
* ``sqlite`` / ``postgres``: ``vitals-bridge run`` (acknowledge after commit),
  counted by polling the highest committed reading id in the database.

Per step the delivered rate is measured after a warm-up; the ladder stops once two
steps in a row fall short of the offered rate (the consumer is saturated). The
figure reported per consumer is the highest delivered rate; a step can exceed its
consumer's capacity while it drains what the broker queued in the step before, so
the median over saturated steps is printed too. The ratio to the bare subscriber
is an upper bound when the bare one delivered every step (the default ladder runs
past the 11,700 msg/s Mosquitto carried to it when this bench was specified).

Usage: .venv/bin/python bench/ingest.py [--quick] [--broker mosquitto|mosquitto-system]
The last line of output is JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing as mp
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _common as c

WARMUP_SECONDS: Final = 1.5
SAMPLE_SECONDS: Final = 0.25
TICK_SECONDS: Final = 0.005
SHORTFALL: Final = 0.9  # delivered below this share of offered means saturated
TARGET_PG_MSGS: Final = 5_000
TARGET_RATIO: Final = 0.60


# -- processes -------------------------------------------------------------------


def _publisher(
    port: int,
    root: str,
    kiosks: list[str],
    rates: list[float],
    step_seconds: float,
    ready: Any,
    start_at: Any,
    stop: Any,
) -> None:
    """Publish the ladder of rates (this process's share) for ``kiosks``."""

    from vitals_contract import Leaf, kiosk_topic

    total = sum(rates) * step_seconds
    per_kiosk = math.ceil(total / len(kiosks)) + 10
    payloads = {k: c.build_payloads(k, per_kiosk) for k in kiosks}
    topics = {k: kiosk_topic(k, Leaf.READINGS, root) for k in kiosks}
    cursor = dict.fromkeys(kiosks, 0)

    client = c.mqtt_client()
    client.max_inflight_messages_set(200)
    connected = threading.Event()
    client.on_connect = lambda *_: connected.set()
    client.connect(c.HOST, port, keepalive=60)
    client.loop_start()
    connected.wait(10)
    ready.set()
    while start_at.value == 0.0:
        time.sleep(0.01)

    k_index = 0
    for i, rate in enumerate(rates):
        step_start = start_at.value + i * step_seconds
        step_end = step_start + step_seconds
        sent = 0
        while (now := time.time()) < step_end and not stop.value:
            if now < step_start:
                time.sleep(min(TICK_SECONDS, step_start - now))
                continue
            due = int((now - step_start) * rate) - sent
            for _ in range(due):
                kiosk = kiosks[k_index % len(kiosks)]
                k_index += 1
                n = cursor[kiosk]
                if n >= per_kiosk:
                    continue
                cursor[kiosk] = n + 1
                client.publish(topics[kiosk], payloads[kiosk][n], qos=1)
            sent += max(due, 0)
            time.sleep(TICK_SECONDS)
        if stop.value:
            break
    with contextlib.suppress(Exception):
        client.loop_stop()
        client.disconnect()


def _bare_subscriber(port: int, root: str, counter: Any, ready: Any) -> None:
    """Subscribe at QoS 1 to every kiosk's readings and count, nothing else."""
    from vitals_contract import Leaf, kiosk_filter

    client = c.mqtt_client(f"bench-bare-{root[:16]}")
    client.max_inflight_messages_set(1000)

    def on_connect(cl: Any, *_: Any) -> None:
        cl.subscribe(kiosk_filter(Leaf.READINGS, root), qos=1)

    def on_subscribe(*_: Any) -> None:
        ready.set()

    def on_message(*_: Any) -> None:
        counter.value += 1

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect(c.HOST, port, keepalive=60)
    client.loop_forever()


# -- CPU accounting --------------------------------------------------------------


def _cpu_seconds(pids: list[int]) -> float:
    tick = 100.0
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _postgres_pids(database: str) -> list[int]:
    """Return the PostgreSQL backends serving ``database`` (other tenants excluded)."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            with contextlib.suppress(OSError):
                cmdline = p.joinpath("cmdline").read_bytes()
                if cmdline.startswith(b"postgres:") and database.encode() in cmdline:
                    pids.append(int(p.name))
    return pids


# -- one consumer ----------------------------------------------------------------


def _ladder(
    port: int,
    root: str,
    kiosks: list[str],
    publishers: int,
    rates: list[float],
    step_seconds: float,
    count: Callable[[], int],
    per_count: int,
    cpu_pids: dict[str, Callable[[], list[int]]],
    probe: Callable[[], dict[str, float]],
) -> list[dict[str, Any]]:
    """Run the publishers through the rate ladder; return per-step figures."""
    ctx = mp.get_context("spawn")
    start_at = ctx.Value("d", 0.0, lock=False)
    stop = ctx.Value("b", 0, lock=False)
    procs = []
    readies = []
    for p in range(publishers):
        ready = ctx.Event()
        share = [r / publishers for r in rates]
        proc = ctx.Process(
            target=_publisher,
            args=(
                port,
                root,
                kiosks[p::publishers],
                share,
                step_seconds,
                ready,
                start_at,
                stop,
            ),
            daemon=True,
        )
        proc.start()
        procs.append(proc)
        readies.append(ready)
    for ready in readies:
        if not ready.wait(120):
            raise TimeoutError("publisher not ready")

    t0 = time.time() + 0.5
    start_at.value = t0
    steps: list[dict[str, Any]] = []
    saturated_in_a_row = 0
    try:
        for i, rate in enumerate(rates):
            step_start = t0 + i * step_seconds
            _sleep_until(step_start + WARMUP_SECONDS)
            n0, t_0 = count(), time.time()
            cpu0 = {k: _cpu_seconds(f()) for k, f in cpu_pids.items()}
            m0 = probe()
            _sleep_until(step_start + step_seconds)
            n1, t_1 = count(), time.time()
            cpu1 = {k: _cpu_seconds(f()) for k, f in cpu_pids.items()}
            m1 = probe()
            delivered = (n1 - n0) / per_count / (t_1 - t_0)
            batches = m1.get("batches", 0) - m0.get("batches", 0)
            step = {
                "offered_msgs": rate,
                "delivered_msgs": delivered,
                "batch_msgs": (m1.get("msgs", 0) - m0.get("msgs", 0)) / batches
                if batches
                else float("nan"),
                "commit_ms": 1000
                * (m1.get("commit_s", 0) - m0.get("commit_s", 0))
                / batches
                if batches
                else float("nan"),
                "commit_busy": 100
                * (m1.get("commit_s", 0) - m0.get("commit_s", 0))
                / (t_1 - t_0)
                if batches
                else float("nan"),
                **{f"cpu_{k}": 100 * (cpu1[k] - cpu0[k]) / (t_1 - t_0) for k in cpu0},
            }
            steps.append(step)
            if delivered < SHORTFALL * rate:
                saturated_in_a_row += 1
                if saturated_in_a_row >= 2:
                    break
            else:
                saturated_in_a_row = 0
    finally:
        stop.value = 1
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
    return steps


def _bridge_probe(b: c.Bridge) -> dict[str, float]:
    """Read batch count, commit seconds and messages from the bridge's /metrics."""
    with contextlib.suppress(OSError):
        m = b.metrics()
        return {
            "batches": m.get("vitals_ingest_batch_seconds_count", 0.0),
            "commit_s": m.get("vitals_ingest_batch_seconds_sum", 0.0),
            "msgs": m.get('vitals_ingest_messages_total{leaf="readings"}', 0.0),
        }
    return {}


def _saturated_median(steps: list[dict[str, Any]]) -> float:
    """Median delivered rate over the steps that fell short of their offered rate."""
    short = [
        s["delivered_msgs"]
        for s in steps
        if s["delivered_msgs"] < SHORTFALL * s["offered_msgs"]
    ]
    return statistics.median(short) if short else math.nan


def _cpu_per_msg(step: dict[str, Any]) -> float:
    """Return consumer CPU microseconds per delivered message (robust to noise)."""
    rate = step["delivered_msgs"]
    return 1e4 * step.get("cpu_consumer", float("nan")) / rate if rate else float("nan")


def _sleep_until(t: float) -> None:
    while (left := t - time.time()) > 0:
        time.sleep(min(left, SAMPLE_SECONDS))


@contextlib.contextmanager
def _consumer(
    kind: str, port: int, root: str, env: dict[str, str]
) -> Iterator[
    tuple[
        Callable[[], int],
        int,
        dict[str, Callable[[], list[int]]],
        Callable[[], dict[str, float]],
    ]
]:
    """Start a consumer; yield (counter, items per message, CPU pid sources)."""
    if kind == "bare":
        ctx = mp.get_context("spawn")
        counter = ctx.Value("q", 0, lock=False)
        ready = ctx.Event()
        proc = ctx.Process(target=_bare_subscriber, args=(port, root, counter, ready))
        proc.start()
        try:
            if not ready.wait(30):
                raise TimeoutError("bare subscriber did not subscribe")
            pid = proc.pid
            assert pid is not None
            yield (lambda: int(counter.value)), 1, {"consumer": lambda: [pid]}, dict
        finally:
            proc.kill()
            proc.join(5)
        return
    with c.database(kind) as url, c.bridge(port, url, root, **env) as b:
        rows = c.RowCounter(url)
        pids: dict[str, Callable[[], list[int]]] = {"consumer": lambda: [b.proc.pid]}
        if kind == "postgres":
            database = url.rsplit("/", 1)[1]
            pids["postgres"] = lambda: _postgres_pids(database)
        try:
            yield rows, c.READINGS_PER_MESSAGE, pids, lambda: _bridge_probe(b)
        finally:
            rows.close()


def main() -> None:
    """Run the ladder against each consumer and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (< 1 min)")
    parser.add_argument(
        "--broker", default="mosquitto", help="mosquitto | mosquitto-system | amqtt"
    )
    parser.add_argument("--kiosks", type=int, default=20)
    parser.add_argument("--publishers", type=int, default=2)
    parser.add_argument("--consumers", default="bare,sqlite,postgres")
    parser.add_argument("--rates", default=None, help="comma-separated msgs/s ladder")
    parser.add_argument("--step-seconds", type=float, default=None)
    parser.add_argument("--batch-max-messages", type=int, default=None)
    parser.add_argument("--batch-max-wait-ms", type=float, default=None)
    args = parser.parse_args()

    if args.rates:
        rates = [float(r) for r in args.rates.split(",")]
    elif args.quick:
        rates = [4000.0]
    else:
        rates = [1000.0, 2000.0, 3000.0, 4000.0, 5000.0, 6000.0, 7000.0, 8000.0]
        rates += [10000.0, 12000.0, 14000.0, 16000.0, 20000.0]
    step_seconds = args.step_seconds or (3.5 if args.quick else 6.0)
    kiosks = c.kiosk_ids(args.kiosks)
    env = c.kiosk_limit_env(rates, kiosks)
    if args.batch_max_messages:
        env["VITALS_INGEST__BATCH_MAX_MESSAGES"] = str(args.batch_max_messages)
    if args.batch_max_wait_ms is not None:
        env["VITALS_INGEST__BATCH_MAX_WAIT_MS"] = str(args.batch_max_wait_ms)
    consumers = args.consumers.split(",")

    results: dict[str, list[dict[str, Any]]] = {}
    # The in-flight limit the deployed configs use: twice the bridge's batch.
    inflight = 2 * (args.batch_max_messages or c.BRIDGE_BATCH)
    with c.broker(args.broker, inflight=inflight) as brk:
        for kind in consumers:
            root = c.new_root()
            with _consumer(kind, brk.port, root, env) as (count, per, pids, probe):
                results[kind] = _ladder(
                    brk.port,
                    root,
                    kiosks,
                    args.publishers,
                    rates,
                    step_seconds,
                    count,
                    per,
                    pids,
                    probe,
                )
            print(f"# {kind}: done", file=sys.stderr)

    info = c.machine()
    print(
        f"ingest on {brk.name}: {args.kiosks} kiosks, {args.publishers} publisher "
        f"processes, {c.READINGS_PER_MESSAGE} readings/message, steps of "
        f"{step_seconds:.0f} s ({WARMUP_SECONDS} s warm-up); {info['nproc']} cores "
        f"{info['cpu']}, {info['date']}"
    )
    rows = []
    for kind, steps in results.items():
        for s in steps:
            rows.append(
                [
                    kind,
                    int(s["offered_msgs"]),
                    s["delivered_msgs"],
                    s["delivered_msgs"] * c.READINGS_PER_MESSAGE,
                    s.get("cpu_consumer", float("nan")),
                    _cpu_per_msg(s),
                    s.get("cpu_postgres", float("nan")),
                    s["batch_msgs"],
                    s["commit_ms"],
                    s["commit_busy"],
                ]
            )
    print(
        c.table(
            [
                "consumer",
                "offered msg/s",
                "delivered msg/s",
                "readings/s",
                "consumer CPU %",
                "CPU us/msg",
                "postgres CPU %",
                "msgs/batch",
                "ms/commit",
                "commit busy %",
            ],
            rows,
        )
    )

    best = {
        k: max((s["delivered_msgs"] for s in v), default=0.0)
        for k, v in results.items()
    }
    saturated = {k: _saturated_median(v) for k, v in results.items()}
    bare = best.get("bare")
    bare_saturated = not math.isnan(saturated.get("bare", math.nan))
    print()
    summary_rows = []
    for kind, rate in best.items():
        ratio = rate / bare if bare and kind != "bare" else float("nan")
        summary_rows.append(
            [kind, rate, rate * c.READINGS_PER_MESSAGE, saturated[kind], ratio]
        )
    print(
        c.table(
            [
                "consumer",
                "max msg/s",
                "max readings/s",
                "saturated median msg/s",
                "vs bare",
            ],
            summary_rows,
        )
    )
    pg = best.get("postgres")
    met_rate = pg is not None and pg >= TARGET_PG_MSGS
    met_ratio = pg is not None and bool(bare) and pg / bare >= TARGET_RATIO
    if pg is not None:
        print(
            f"\ntarget PostgreSQL >= {TARGET_PG_MSGS:,} msg/s: "
            f"{'met' if met_rate else 'NOT met'} ({pg:,.0f}); "
            f">= {TARGET_RATIO:.0%} of bare: {'met' if met_ratio else 'NOT met'}"
        )
        if bare and not bare_saturated:
            print(
                "(the bare subscriber delivered every step: the ratio is an upper bound)"
            )
        if max(rates) <= pg / SHORTFALL:
            print("(the ladder's top rate was delivered; capacity may be higher)")
    c.emit_json(
        {
            "bench": "ingest",
            "broker": brk.name,
            "quick": args.quick,
            "kiosks": args.kiosks,
            "readings_per_message": c.READINGS_PER_MESSAGE,
            "max_msgs_per_s": {k: c.rounded(v, 0) for k, v in best.items()},
            "max_readings_per_s": {
                k: c.rounded(v * c.READINGS_PER_MESSAGE, 0) for k, v in best.items()
            },
            "ratio_vs_bare": {
                k: c.rounded(v / bare, 3)
                for k, v in best.items()
                if bare and k != "bare"
            },
            "saturated_median_msgs_per_s": {
                k: None if math.isnan(v) else c.rounded(v, 0)
                for k, v in saturated.items()
            },
            "bare_saturated": bare_saturated,
            "target_pg_5000_met": met_rate,
            "target_ratio_60_met": met_ratio,
            "consumer_cpu_us_per_msg_at_max": {
                k: c.rounded(_cpu_per_msg(max(v, key=lambda s: s["delivered_msgs"])), 0)
                for k, v in results.items()
                if v
            },
            "steps": {
                k: [[int(s["offered_msgs"]), round(s["delivered_msgs"])] for s in v]
                for k, v in results.items()
            },
            "machine": info,
        }
    )


if __name__ == "__main__":
    main()
