"""Ingest without a broker: the bridge's own CPU per message, parse to commit.

`bench/ingest.py` measures the whole path, and on a 2-core machine its figures mix
the bridge with the broker, the publishers and the database competing for the same
cores. This probe feeds pre-built MQTT deliveries straight into the bridge's batcher
(validation, batching, the commit, PUBACKs and confirmations handed to a client
that sends nothing) and reports the CPU the process spent per message and the wall
rate. It isolates what the bridge's own code costs, which is what changes when the
code does.

Usage: .venv/bin/python bench/ingest_probe.py [--quick] [--database sqlite,postgres]
The last line of output is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from api.cli import tune_runtime
from bench import _common as c
from bridge.alerts import AlertEvaluator, load_rules
from bridge.config import BridgeSettings
from bridge.hub import Hub
from bridge.ingest import Ingest
from bridge.metrics import BridgeMetrics
from bridge.mqtt import Delivery
from bridge.store import Store
from bridge.store.alert_store import AlertStore
from bridge.store.migrate import upgrade
from vitals_contract import Leaf, Metric, Reading, ReadingsMessage, kiosk_topic

KIOSKS: Final = 20
# Deliveries handed over per event-loop turn, as one socket read would.
FEED_CHUNK: Final = 200


class _SilentClient:
    """Takes PUBACKs and confirmations and sends nothing: no broker in this probe."""

    def ack(self, _deliveries: object) -> int:
        """Drop the PUBACKs; none is stale."""
        return 0

    def publish(self, *_args: Any, **_kwargs: Any) -> None:
        """Drop a confirmation or a live message."""


def _payloads(messages: int) -> list[tuple[str, bytes]]:
    seqs = dict.fromkeys((f"probe-{k}" for k in range(KIOSKS)), 0)
    out = []
    for i in range(messages):
        kiosk_id = f"probe-{i % KIOSKS}"
        first = seqs[kiosk_id]
        seqs[kiosk_id] = first + c.READINGS_PER_MESSAGE
        readings = [
            Reading(
                seq=first + j,
                metric=Metric.HEART_RATE,
                value=70.0 + j,
                unit="/min",
                quality=0.9,
                measured_at=datetime.now(UTC),
                scan_id="s1",
            )
            for j in range(c.READINGS_PER_MESSAGE)
        ]
        message = ReadingsMessage(
            kiosk_id=kiosk_id, sent_at=datetime.now(UTC), readings=readings
        )
        out.append((kiosk_topic(kiosk_id, Leaf.READINGS), message.to_bytes()))
    return out


async def _feed(
    ingest: Ingest, store: Store, payloads: list[tuple[str, bytes]]
) -> None:
    for i, (topic, payload) in enumerate(payloads):
        ingest._arrivals.append(
            Delivery(topic, payload, i % 65_535 + 1, 1, time.monotonic(), 0)
        )
        if i % FEED_CHUNK == FEED_CHUNK - 1:
            ingest._drain()
            await asyncio.sleep(0)
    ingest._drain()
    want = (len(payloads) // KIOSKS) * c.READINGS_PER_MESSAGE - 1
    kiosks = [f"probe-{k}" for k in range(KIOSKS)]
    # Done when every kiosk's last seq is committed (the store's thread moves it).
    while any((store.progress_of(k) or -1) < want for k in kiosks):  # noqa: ASYNC110
        await asyncio.sleep(0.005)


def run_one(url: str, messages: int) -> dict[str, Any]:
    """Push ``messages`` through one fresh store; return the figures."""
    upgrade(url)
    # The shipped defaults: on an MQTT 5 broker ingest is shared, so every commit
    # is also rendered and published on the live topic for the other bridges.
    settings = BridgeSettings(database_url=url, environment="demo")
    store = Store.from_url(url)
    ingest = Ingest(
        settings,
        store,
        Hub(settings.hub.client_queue_size),
        BridgeMetrics(),
        AlertEvaluator(load_rules(None)),
        AlertStore(store.engine),
    )
    payloads = _payloads(messages)
    tune_runtime()  # as `vitals-bridge run` does once started

    async def main() -> tuple[float, float]:
        ingest._loop = asyncio.get_running_loop()
        ingest._client = _SilentClient()  # type: ignore[assignment]
        ingest._shared = settings.ingest.shared_group is not None  # as start() on v5
        tasks = [
            asyncio.create_task(ingest._batcher()),
            asyncio.create_task(ingest._finisher()),
            asyncio.create_task(ingest._alerts_from_live()),
        ]
        wall0, cpu0 = time.perf_counter(), time.process_time()
        await _feed(ingest, store, payloads)
        await ingest._committed.join()  # live pushes, PUBACKs, confirmations
        while not ingest._live_readings.empty():  # noqa: ASYNC110 (alerts)
            await asyncio.sleep(0.001)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        for task in tasks:
            task.cancel()
        return wall, cpu

    try:
        wall, cpu = asyncio.run(main())
    finally:
        store.close()
    return {
        "messages": messages,
        "msgs_per_s": messages / wall,
        "readings_per_s": messages * c.READINGS_PER_MESSAGE / wall,
        "cpu_us_per_msg": 1e6 * cpu / messages,
    }


def main() -> None:
    """Run the probe on each database and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="5,000 messages")
    parser.add_argument("--database", default="sqlite,postgres")
    parser.add_argument("--messages", type=int, default=None)
    args = parser.parse_args()
    messages = args.messages or (5_000 if args.quick else 40_000)
    results = {}
    for kind in args.database.split(","):
        with c.database(kind) as url:
            results[kind] = run_one(url, messages)
    print(
        f"ingest probe (no broker): {messages} messages x {c.READINGS_PER_MESSAGE} "
        f"readings, {KIOSKS} kiosks; {c.machine()['date']}"
    )
    print(f"{'database':>9}  {'msg/s':>8}  {'readings/s':>10}  {'CPU us/msg':>10}")
    for kind, r in results.items():
        print(
            f"{kind:>9}  {r['msgs_per_s']:>8,.0f}  {r['readings_per_s']:>10,.0f}  "
            f"{r['cpu_us_per_msg']:>10.0f}"
        )
    c.emit_json(
        {
            "bench": "ingest_probe",
            "quick": args.quick,
            **results,
            "machine": c.machine(),
        }
    )


if __name__ == "__main__":
    main()
