"""The kiosk outbox: persisted rate, delivered rate and publish latency.

Three measurements, each message holding 5 readings:

1. append only: ``Outbox.add_readings`` as fast as it goes (SQLite WAL,
   ``synchronous=FULL``), rate and per-append latency, early and late in the run
   (the outbox grows, nothing is released);
2. outbox + ``MqttLink`` to a private Mosquitto, with a consumer process that
   confirms every message (as the bridge would, retained, on the kiosk's confirm
   topic): the persisted rate, the rate at which confirmations release messages,
   and, at a paced rate, latency from append to on-wire (consumer receipt) and to
   the confirmation reaching the kiosk;
3. the reference: raw paho publish at QoS 1 of pre-built payloads, no outbox:
   rate to PUBACK, and publish-to-PUBACK and publish-to-receipt latency.

Usage: .venv/bin/python bench/outbox.py [--quick]. The last line of output is JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _common as c

KIOSK: Final = "bench-kiosk"
PACED_RATE: Final = 50.0  # msgs/s for the latency runs (a kiosk sends ~1/s)
CHUNK: Final = 500


def _readings() -> list[dict[str, Any]]:
    from kiosk_agent.simulate import synthetic_readings

    return synthetic_readings(0, "bench")


# -- the confirming consumer (its own process) -------------------------------------


def _consumer(
    port: int, root: str, ready: Any, stop: Any, results: Any, confirm: bool
) -> None:
    """Receive readings; record receipt time per first seq; confirm if asked."""
    from vitals_contract import (
        CommitConfirmation,
        Leaf,
        kiosk_filter,
        kiosk_topic,
        utc_now,
    )

    received: dict[int, float] = {}
    through = {"v": -1}
    client = c.mqtt_client(f"bench-confirmer-{root[:12]}")
    client.max_inflight_messages_set(1000)

    def on_connect(cl: Any, *_: Any) -> None:
        cl.subscribe(kiosk_filter(Leaf.READINGS, root), qos=1)

    def on_message(cl: Any, _u: Any, msg: Any) -> None:
        now = time.time()
        body = json.loads(msg.payload)
        seqs = [r["seq"] for r in body["readings"]]
        received.setdefault(seqs[0], now)
        if confirm and seqs[0] <= through["v"] + 1 and seqs[-1] > through["v"]:
            through["v"] = seqs[-1]
            conf = CommitConfirmation(
                kiosk_id=body["kiosk_id"], through=through["v"], at=utc_now()
            )
            cl.publish(
                kiosk_topic(body["kiosk_id"], Leaf.CONFIRM, root),
                conf.to_bytes(),
                qos=1,
                retain=True,
            )

    client.on_connect = on_connect
    client.on_subscribe = lambda *_: ready.set()
    client.on_message = on_message
    client.connect(c.HOST, port, keepalive=60)
    client.loop_start()
    while not stop.value:
        time.sleep(0.02)
    client.loop_stop()
    client.disconnect()
    results.put(received)


@contextlib.contextmanager
def _consuming(port: int, root: str, confirm: bool) -> Any:
    ctx = mp.get_context("spawn")
    ready, stop, results = ctx.Event(), ctx.Value("b", 0, lock=False), ctx.Queue()
    proc = ctx.Process(
        target=_consumer, args=(port, root, ready, stop, results, confirm)
    )
    proc.start()
    if not ready.wait(30):
        raise TimeoutError("consumer not subscribed")
    box: dict[str, Any] = {}
    try:
        yield box
    finally:
        stop.value = 1
        box["received"] = results.get(timeout=30)
        proc.join(10)


# -- 1. append only ---------------------------------------------------------------------


def append_only(workdir: Path, count: int) -> dict[str, Any]:
    """Append ``count`` messages to a fresh outbox; nothing is released."""
    from kiosk_agent.outbox import Outbox

    box = Outbox(workdir / "append.db")
    readings = _readings()
    lat: list[float] = []
    chunk_rates = []
    t_start = time.perf_counter()
    t_chunk = t_start
    for i in range(count):
        t = time.perf_counter()
        box.add_readings(readings)
        lat.append(time.perf_counter() - t)
        if (i + 1) % CHUNK == 0:
            now = time.perf_counter()
            chunk_rates.append(CHUNK / (now - t_chunk))
            t_chunk = now
    total = time.perf_counter() - t_start
    box.close()
    lat_ms = [x * 1000 for x in lat]
    return {
        "messages": count,
        "rate": count / total,
        "first_chunk_rate": chunk_rates[0] if chunk_rates else float("nan"),
        "last_chunk_rate": chunk_rates[-1] if chunk_rates else float("nan"),
        "p50_ms": c.percentile(lat_ms, 50),
        "p99_ms": c.percentile(lat_ms, 99),
        "first_chunk_p50_ms": c.percentile(lat_ms[:CHUNK], 50),
        "last_chunk_p50_ms": c.percentile(lat_ms[-CHUNK:], 50),
    }


# -- 2. outbox + link -------------------------------------------------------------------


def _link(workdir: Path, port: int, root: str, name: str) -> Any:
    from kiosk_agent.config import AgentSettings
    from kiosk_agent.link import MqttLink
    from kiosk_agent.outbox import Outbox
    from vitals_contract.settings import MqttSettings

    settings = AgentSettings(
        kiosk_id=KIOSK,
        mqtt=MqttSettings(host=c.HOST, port=port, root_topic=root),
        outbox_path=workdir / f"{name}.db",
        confirm_timeout_seconds=120.0,
    )
    box = Outbox(settings.outbox_path)
    link = MqttLink(settings, box, lambda _cmd: "no commands")
    link.start()
    deadline = time.monotonic() + 15
    while not link.connected and time.monotonic() < deadline:
        time.sleep(0.01)
    return box, link


def outbox_throughput(
    workdir: Path, port: int, count: int, timeout: float
) -> dict[str, Any]:
    """Append ``count`` messages flat out; time persistence and full confirmation."""
    root = c.new_root()
    readings = _readings()
    with _consuming(port, root, confirm=True) as got:
        box, link = _link(workdir, port, root, "throughput")
        try:
            t0 = time.perf_counter()
            for _ in range(count):
                box.add_readings(readings)
                link.wake()
            t_appended = time.perf_counter() - t0
            deadline = time.monotonic() + timeout
            last = (count - 1) * c.READINGS_PER_MESSAGE
            while link.confirmed_through < last + c.READINGS_PER_MESSAGE - 1:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.002)
            t_confirmed = time.perf_counter() - t0
            depth = box.depth()
        finally:
            link.stop()
            box.close()
    confirmed_msgs = (link.confirmed_through + 1) // c.READINGS_PER_MESSAGE
    return {
        "messages": count,
        "persisted_rate": count / t_appended,
        "confirmed_rate": confirmed_msgs / t_confirmed,
        "confirmed": confirmed_msgs,
        "left_in_outbox": depth,
        "received_by_consumer": len(got["received"]),
    }


def outbox_latency(workdir: Path, port: int, seconds: float) -> dict[str, Any]:
    """Append at a paced rate; latency to consumer receipt and to confirmation."""
    root = c.new_root()
    readings = _readings()
    appended: dict[int, float] = {}
    confirmed_at: dict[int, float] = {}
    n = int(PACED_RATE * seconds)
    with _consuming(port, root, confirm=True) as got:
        box, link = _link(workdir, port, root, "latency")
        done = threading.Event()

        def watch() -> None:
            seen = -1
            while not done.is_set():
                through = link.confirmed_through
                if through > seen:
                    now = time.time()
                    for first in range(seen + 1, through + 1, c.READINGS_PER_MESSAGE):
                        confirmed_at[first] = now
                    seen = through
                time.sleep(0.0005)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            t0 = time.time()
            for i in range(n):
                time.sleep(max(0.0, t0 + i / PACED_RATE - time.time()))
                now = time.time()
                seqs = box.add_readings(readings)
                appended[seqs[0]] = now
                link.wake()
            deadline = time.monotonic() + 10
            while len(confirmed_at) < n and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            done.set()
            watcher.join(2)
            link.stop()
            box.close()
    wire = [
        1000 * (got["received"][s] - t)
        for s, t in appended.items()
        if s in got["received"]
    ]
    conf = [
        1000 * (confirmed_at[s] - t) for s, t in appended.items() if s in confirmed_at
    ]
    return {
        "rate": PACED_RATE,
        "messages": n,
        "wire_p50_ms": c.percentile(wire, 50),
        "wire_p99_ms": c.percentile(wire, 99),
        "wire_max_ms": max(wire, default=float("nan")),
        "confirm_p50_ms": c.percentile(conf, 50),
        "confirm_p99_ms": c.percentile(conf, 99),
        "confirmed": len(conf),
    }


# -- 3. raw paho reference ----------------------------------------------------------------


def _raw_client(port: int) -> tuple[Any, dict[int, float]]:
    acked: dict[int, float] = {}
    client = c.mqtt_client()
    client.max_inflight_messages_set(1000)
    connected = threading.Event()
    client.on_connect = lambda *_: connected.set()

    def on_publish(_c: Any, _u: Any, mid: int, *_: Any) -> None:
        acked[mid] = time.time()

    client.on_publish = on_publish
    client.connect(c.HOST, port, keepalive=60)
    client.loop_start()
    connected.wait(10)
    return client, acked


def raw_throughput(port: int, count: int) -> dict[str, Any]:
    """Publish ``count`` pre-built payloads flat out; rate to the last PUBACK."""
    from vitals_contract import Leaf, kiosk_topic

    root = c.new_root()
    payloads = c.build_payloads(KIOSK, count)
    topic = kiosk_topic(KIOSK, Leaf.READINGS, root)
    with _consuming(port, root, confirm=False) as got:
        client, acked = _raw_client(port)
        t0 = time.perf_counter()
        infos = [client.publish(topic, p, qos=1) for p in payloads]
        t_handed = time.perf_counter() - t0
        infos[-1].wait_for_publish(60)
        while len(acked) < count and time.perf_counter() - t0 < 60:
            time.sleep(0.001)
        t_acked = time.perf_counter() - t0
        time.sleep(0.5)
        client.loop_stop()
        client.disconnect()
    return {
        "messages": count,
        "handed_rate": count / t_handed,
        "acked_rate": len(acked) / t_acked,
        "received_by_consumer": len(got["received"]),
    }


def raw_latency(port: int, seconds: float) -> dict[str, Any]:
    """Publish at the paced rate; publish-to-PUBACK and publish-to-receipt."""
    from vitals_contract import Leaf, kiosk_topic

    root = c.new_root()
    n = int(PACED_RATE * seconds)
    payloads = c.build_payloads(KIOSK, n)
    topic = kiosk_topic(KIOSK, Leaf.READINGS, root)
    sent: dict[int, tuple[int, float]] = {}
    with _consuming(port, root, confirm=False) as got:
        client, acked = _raw_client(port)
        t0 = time.time()
        for i, p in enumerate(payloads):
            time.sleep(max(0.0, t0 + i / PACED_RATE - time.time()))
            now = time.time()
            info = client.publish(topic, p, qos=1)
            sent[i * c.READINGS_PER_MESSAGE] = (info.mid, now)
        time.sleep(1.0)
        client.loop_stop()
        client.disconnect()
    puback = [1000 * (acked[mid] - t) for mid, t in sent.values() if mid in acked]
    wire = [
        1000 * (got["received"][s] - t)
        for s, (_, t) in sent.items()
        if s in got["received"]
    ]
    return {
        "rate": PACED_RATE,
        "messages": n,
        "puback_p50_ms": c.percentile(puback, 50),
        "puback_p99_ms": c.percentile(puback, 99),
        "wire_p50_ms": c.percentile(wire, 50),
        "wire_p99_ms": c.percentile(wire, 99),
        "wire_max_ms": max(wire, default=float("nan")),
    }


def main() -> None:
    """Run the three measurements and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (< 1 min)")
    parser.add_argument("--broker", default="mosquitto")
    args = parser.parse_args()
    append_n = 2_000 if args.quick else 10_000
    flow_n = 1_000 if args.quick else 5_000
    seconds = 5.0 if args.quick else 20.0

    (c.ROOT_DIR / "var").mkdir(exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-outbox-", dir=c.ROOT_DIR / "var"))
    try:
        append = append_only(workdir, append_n)
        print("# append only: done", file=sys.stderr)
        with c.broker(args.broker) as brk:
            flow = outbox_throughput(workdir, brk.port, flow_n, timeout=120)
            print("# outbox + link throughput: done", file=sys.stderr)
            lat = outbox_latency(workdir, brk.port, seconds)
            print("# outbox + link latency: done", file=sys.stderr)
            raw = raw_throughput(brk.port, flow_n)
            raw_lat = raw_latency(brk.port, seconds)
            print("# raw paho: done", file=sys.stderr)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    info = c.machine()
    print(
        f"outbox on {brk.name}, {c.READINGS_PER_MESSAGE} readings/message, disk under "
        f"{c.ROOT_DIR / 'var'}; {info['nproc']} cores {info['cpu']}, {info['date']}"
    )
    print(
        c.table(
            ["path", "messages", "msg/s", "note"],
            [
                [
                    "append only (fsync per append)",
                    append["messages"],
                    append["rate"],
                    f"first {CHUNK}: {append['first_chunk_rate']:.0f}/s, last {CHUNK}: "
                    f"{append['last_chunk_rate']:.0f}/s",
                ],
                [
                    "outbox + link: persisted",
                    flow["messages"],
                    flow["persisted_rate"],
                    "append while the link publishes",
                ],
                [
                    "outbox + link: confirmed",
                    flow["confirmed"],
                    flow["confirmed_rate"],
                    f"released by confirmations; {flow['left_in_outbox']} left",
                ],
                [
                    "raw paho QoS 1: PUBACKed",
                    raw["messages"],
                    raw["acked_rate"],
                    f"publish() calls alone: {raw['handed_rate']:.0f}/s",
                ],
            ],
        )
    )
    print()
    print(
        c.table(
            ["latency at 50 msg/s", "p50 ms", "p99 ms", "max ms"],
            [
                [
                    "append (fsync), empty outbox",
                    append["first_chunk_p50_ms"],
                    append["p99_ms"],
                    float("nan"),
                ],
                [
                    "outbox: append -> on wire",
                    lat["wire_p50_ms"],
                    lat["wire_p99_ms"],
                    lat["wire_max_ms"],
                ],
                [
                    "outbox: append -> confirmed",
                    lat["confirm_p50_ms"],
                    lat["confirm_p99_ms"],
                    float("nan"),
                ],
                [
                    "raw: publish -> PUBACK",
                    raw_lat["puback_p50_ms"],
                    raw_lat["puback_p99_ms"],
                    float("nan"),
                ],
                [
                    "raw: publish -> on wire",
                    raw_lat["wire_p50_ms"],
                    raw_lat["wire_p99_ms"],
                    raw_lat["wire_max_ms"],
                ],
            ],
        )
    )
    ratio = (
        flow["confirmed_rate"] / raw["acked_rate"]
        if raw["acked_rate"]
        else float("nan")
    )
    print(f"\noutbox delivered rate / raw paho rate: {ratio:.3f}")
    c.emit_json(
        {
            "bench": "outbox",
            "quick": args.quick,
            "broker": brk.name,
            "append_msgs_per_s": c.rounded(append["rate"], 0),
            "append_first_last_chunk_msgs_per_s": [
                c.rounded(append["first_chunk_rate"], 0),
                c.rounded(append["last_chunk_rate"], 0),
            ],
            "append_p50_p99_ms": [
                c.rounded(append["p50_ms"]),
                c.rounded(append["p99_ms"]),
            ],
            "link_persisted_msgs_per_s": c.rounded(flow["persisted_rate"], 0),
            "link_confirmed_msgs_per_s": c.rounded(flow["confirmed_rate"], 0),
            "raw_paho_acked_msgs_per_s": c.rounded(raw["acked_rate"], 0),
            "ratio_outbox_vs_raw": c.rounded(ratio, 3),
            "outbox_wire_p50_p99_ms": [
                c.rounded(lat["wire_p50_ms"]),
                c.rounded(lat["wire_p99_ms"]),
            ],
            "outbox_confirm_p50_p99_ms": [
                c.rounded(lat["confirm_p50_ms"]),
                c.rounded(lat["confirm_p99_ms"]),
            ],
            "raw_puback_p50_p99_ms": [
                c.rounded(raw_lat["puback_p50_ms"]),
                c.rounded(raw_lat["puback_p99_ms"]),
            ],
            "raw_wire_p50_p99_ms": [
                c.rounded(raw_lat["wire_p50_ms"]),
                c.rounded(raw_lat["wire_p99_ms"]),
            ],
            "machine": info,
        }
    )


if __name__ == "__main__":
    main()
