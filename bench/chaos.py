"""Chaos run: simulated kiosks against a real broker, bridge and database, under faults.

N ``kiosk-agent simulate`` processes, each with its own outbox and each reaching the
broker through its own cuttable TCP relay, publish for M minutes. At random moments
(seeded) one fault at a time is injected, and the next waits until the stack has
recovered:

* ``bridge_kill``: SIGKILL of the bridge, then an immediate restart;
* ``broker_restart``: the broker stopped (SIGTERM) and started again on its port;
* ``kiosk_cut``: one kiosk's path to the broker cut for a few seconds, then restored;
* ``db_fault``: PostgreSQL: the bridge's backends terminated and the database closed
  to new connections (``ALLOW_CONNECTIONS false``) for a few seconds; SQLite: an
  exclusive write lock held for a few seconds by another process.

A rogue publisher mixes malformed and oversize messages into the kiosks' topics
throughout (garbage bytes, truncated JSON, wrong schema, wrong kiosk id, invalid
items, payloads over the 64 KiB limit). They must end up as dead letters and never
hold good data back. Its invalid items carry seqs from ``ROGUE_SEQ_BASE`` up, far
above anything a kiosk issues.

Afterwards each kiosk's outbox counter (``meta.next_seq``) is checked against the
database: lost (issued, not stored), duplicated (same key twice, or the same reading
content under two seqs) and out of order (stored seqs not exactly ``0..issued-1``);
all three must be 0. Per fault it reports the seconds from the end of the fault
(restore or restart issued; for a kill, the kill) to the first new commit and to
"all kiosks confirmed": the bridge's contiguous mark covering the first seq each
kiosk issued after the fault ended, and so everything before it.

Usage: .venv/bin/python bench/chaos.py [--kiosks N] [--minutes M] [--seed S]
       [--quick] [--broker amqtt|mosquitto] [--postgres]
The last line of output is JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import random
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _common as c
from bench import _stack as s

FAULTS: Final = ("bridge_kill", "broker_restart", "kiosk_cut", "db_fault")
ROGUE_SEQ_BASE: Final = 10**12
ROGUE_MEAN_INTERVAL_SECONDS: Final = 0.7
OUTAGE_SECONDS: Final = (3.0, 7.0)  # cut and database faults last this long
RECOVERY_CAP_SECONDS: Final = 90.0
DRAIN_CAP_SECONDS: Final = 150.0
POLL_SECONDS: Final = 0.2


@dataclass
class FaultRecord:
    """One injected fault and how long the stack took to get over it."""

    kind: str
    at_s: float  # since the run started
    target: str
    outage_s: float
    ready_s: float | None = None  # bridge_kill: restarted bridge /ready
    first_commit_s: float | None = None
    all_confirmed_s: float | None = None
    note: str = ""


@dataclass
class KioskCheck:
    """What one kiosk issued against what the database holds."""

    kiosk_id: str
    issued: int
    stored: int
    lost: int
    duplicated: int
    content_duplicates: int
    extra: int
    out_of_order: bool
    reordered: int  # adjacent pairs whose store order differs from seq order
    outbox_dropped: int
    outbox_depth: int
    exit_code: int | None


# -- database views ----------------------------------------------------------------


class Db:
    """The chaos run's own reads of the bridge's database."""

    def __init__(self, url: str) -> None:
        from sqlalchemy import create_engine

        connect_args: dict[str, Any] = {}
        if url.startswith("postgresql"):
            connect_args = {"application_name": "chaos-monitor", "connect_timeout": 3}
        self.url = url
        self.engine = create_engine(url, connect_args=connect_args, pool_pre_ping=True)
        self.reasons: list[tuple[str, int, int, str]] = []

    def marks(self) -> tuple[dict[str, int], dict[str, int]] | None:
        """Return (rows per kiosk, committed_through per kiosk), or None on error."""
        from sqlalchemy import text
        from sqlalchemy.exc import SQLAlchemyError

        try:
            with self.engine.connect() as conn:
                rows: dict[Any, Any] = dict(
                    conn.execute(
                        text(
                            "SELECT kiosk_id, COUNT(*) FROM readings GROUP BY kiosk_id"
                        )
                    ).all()
                )
                through: dict[Any, Any] = dict(
                    conn.execute(
                        text("SELECT kiosk_id, committed_through FROM kiosks")
                    ).all()
                )
        except SQLAlchemyError:
            return None
        return {str(k): int(v) for k, v in rows.items()}, {
            str(k): int(v) for k, v in through.items()
        }

    def readings(self, kiosk_id: str) -> list[tuple[int, int, str, str, float]]:
        """Return (id, seq, metric, measured_at, value) of a kiosk's rows, by id."""
        from sqlalchemy import text

        query = text(
            "SELECT id, seq, metric, measured_at, value FROM readings "
            "WHERE kiosk_id = :k ORDER BY id"
        )
        with self.engine.connect() as conn:
            return [
                (int(r[0]), int(r[1]), str(r[2]), str(r[3]), float(r[4]))
                for r in conn.execute(query, {"k": kiosk_id})
            ]

    def dead_letters(self, kiosks: list[str]) -> dict[str, int]:
        """Count dead letters: total, with a rogue seq, with a kiosk seq (must be 0)."""
        from sqlalchemy import bindparam, text

        query = text(
            "SELECT COUNT(*), "
            "SUM(CASE WHEN seq >= :base THEN 1 ELSE 0 END), "
            "SUM(CASE WHEN seq < :base AND kiosk_id IN :ks THEN 1 ELSE 0 END) "
            "FROM dead_letters"
        ).bindparams(bindparam("ks", expanding=True))
        with self.engine.connect() as conn:
            total, rogue, good = conn.execute(
                query, {"base": ROGUE_SEQ_BASE, "ks": kiosks}
            ).one()
            reasons = conn.execute(
                text(
                    "SELECT reason, COUNT(*), MAX(size_bytes), MIN(topic) "
                    "FROM dead_letters GROUP BY reason ORDER BY COUNT(*) DESC"
                )
            ).all()
        self.reasons = [
            (str(r[0])[:60], int(r[1]), int(r[2]), str(r[3])) for r in reasons
        ]
        return {
            "total": int(total or 0),
            "rogue_seq": int(rogue or 0),
            "kiosk_seq": int(good or 0),
        }

    def close(self) -> None:
        """Release the pool."""
        self.engine.dispose()


# -- the rogue publisher -------------------------------------------------------------


class Rogue:
    """Publishes malformed and oversize messages to the kiosks' topics at random."""

    KINDS: Final = (
        "garbage",
        "truncated_json",
        "wrong_schema",
        "wrong_kiosk",
        "invalid_items",
        "oversize_70k",
        "oversize_1m",
        "garbage_event",
    )

    def __init__(
        self, port: int, root: str, kiosks: list[str], rng: random.Random
    ) -> None:
        self.port = port
        self.root = root
        self.kiosks = kiosks
        self.rng = rng
        self.sent: Counter[str] = Counter()
        self.failed = 0
        self._seq = ROGUE_SEQ_BASE
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rogue", daemon=True)

    def start(self) -> Rogue:
        """Connect (reconnecting by itself) and start publishing."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop publishing."""
        self._stop.set()
        self._thread.join(10)

    def payload(self, kind: str, kiosk: str) -> tuple[str, bytes]:
        """Build one rogue message: (leaf, payload)."""
        good = json.loads(c.build_payloads(kiosk, 1, first_seq=self._next_seqs())[0])
        if kind == "garbage":
            return "readings", self.rng.randbytes(self.rng.randint(1, 512))
        if kind == "garbage_event":
            return "events", self.rng.randbytes(self.rng.randint(1, 256))
        if kind == "truncated_json":
            raw = json.dumps(good).encode()
            return "readings", raw[: self.rng.randint(1, len(raw) - 1)]
        if kind == "wrong_schema":
            return "readings", json.dumps({**good, "readings": "none"}).encode()
        if kind == "wrong_kiosk":
            return "readings", json.dumps({**good, "kiosk_id": "rogue-kiosk"}).encode()
        if kind == "invalid_items":
            for item in good["readings"]:
                item["metric"] = "not_a_metric"
            return "readings", json.dumps(good).encode()
        size = 70 * 1024 if kind == "oversize_70k" else 1024 * 1024
        filler = {"pad": "x" * size}
        return "readings", json.dumps({**good, **filler}).encode()

    def _next_seqs(self) -> int:
        first = self._seq
        self._seq += c.READINGS_PER_MESSAGE
        return first

    def _run(self) -> None:
        from vitals_contract import Leaf, kiosk_topic

        client = c.mqtt_client(f"chaos-rogue-{self.rng.randrange(10**6)}")
        client.reconnect_delay_set(0.5, 2)
        client.connect_async(c.HOST, self.port, keepalive=30)
        client.loop_start()
        try:
            while not self._stop.wait(
                self.rng.expovariate(1 / ROGUE_MEAN_INTERVAL_SECONDS)
            ):
                kind = self.rng.choice(self.KINDS)
                kiosk = self.rng.choice(self.kiosks)
                leaf, payload = self.payload(kind, kiosk)
                topic = kiosk_topic(kiosk, Leaf(leaf), self.root)
                info = client.publish(topic, payload, qos=1)
                if info.rc == 0:
                    self.sent[kind] += 1
                else:
                    self.failed += 1
        finally:
            client.loop_stop()
            client.disconnect()


# -- faults ---------------------------------------------------------------------------


class Chaos:
    """The stack under test and the faults injected into it."""

    def __init__(self, args: argparse.Namespace, workdir: Path, url: str) -> None:
        self.args = args
        self.workdir = workdir
        self.url = url
        self.rng = random.Random(args.seed)
        self.root = c.new_root()
        self.kiosk_ids = [f"chaos-{i:02d}" for i in range(args.kiosks)]
        self.broker = s.BrokerService(args.broker, workdir)
        self.bridge = s.BridgeService(self.broker.port, url, self.root, workdir)
        self.relays: dict[str, s.Relay] = {}
        self.kiosks: dict[str, s.KioskService] = {}
        self.db = Db(url)
        self.t0 = time.monotonic()
        self.faults: list[FaultRecord] = []

    def start(self) -> None:
        """Start broker, bridge and kiosks."""
        self.broker.start()
        self.bridge.start().wait_ready()
        messages = int(self.args.rate * self.args.minutes * 60)
        for kiosk_id in self.kiosk_ids:
            relay = s.Relay(self.broker.port, kiosk_id).start()
            self.relays[kiosk_id] = relay
            self.kiosks[kiosk_id] = s.KioskService(
                kiosk_id,
                relay.port,
                self.root,
                self.workdir,
                messages=messages,
                rate_hz=self.args.rate,
            ).start()
        self.t0 = time.monotonic()

    def close(self) -> None:
        """Stop everything this run started."""
        for kiosk in self.kiosks.values():
            kiosk.stop()
        for relay in self.relays.values():
            relay.close()
        self.bridge.stop()
        self.broker.stop()
        self.db.close()

    def issued(self) -> dict[str, int]:
        """Return each kiosk's next_seq (what it has issued so far)."""
        return {k: ks.meta()["next_seq"] for k, ks in self.kiosks.items()}

    def inject(self, kind: str) -> FaultRecord:
        """Inject one fault, restore, and measure the recovery."""
        target = self.rng.choice(self.kiosk_ids) if kind == "kiosk_cut" else "-"
        started = time.monotonic()
        outage = self.rng.uniform(*OUTAGE_SECONDS)
        note = ""
        if kind == "bridge_kill":
            self.bridge.kill()
            self.bridge.start()
            outage = 0.0
        elif kind == "broker_restart":
            self.broker.stop()
            self.broker.start()
            outage = time.monotonic() - started
        elif kind == "kiosk_cut":
            self.relays[target].cut()
            time.sleep(outage)
            self.relays[target].restore()
        elif kind == "db_fault":
            note = self._db_fault(outage)
        else:
            raise ValueError(kind)
        ended = time.monotonic()
        record = FaultRecord(
            kind, round(started - self.t0, 1), target, round(outage, 1), note=note
        )
        self._measure(record, ended)
        return record

    def _db_fault(self, seconds: float) -> str:
        if self.url.startswith("postgresql"):
            return self._pg_fault(seconds)
        path = self.url.removeprefix("sqlite:///")
        lock = sqlite3.connect(path, timeout=10)
        try:
            lock.execute("BEGIN EXCLUSIVE")
            time.sleep(seconds)
            lock.rollback()
        finally:
            lock.close()
        return "sqlite exclusive lock"

    def _pg_fault(self, seconds: float) -> str:
        import psycopg

        name = self.url.rsplit("/", 1)[1]
        with psycopg.connect(c.PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
            killed = admin.execute(
                "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid() "
                "AND application_name <> 'chaos-monitor'",
                (name,),
            ).fetchone()
            time.sleep(seconds)
            admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
        return f"{killed[0] if killed else 0} backends terminated, closed"

    def _marks(self) -> tuple[dict[str, int], dict[str, int]] | None:
        return self.db.marks()

    def _measure(self, record: FaultRecord, ended: float) -> None:
        """Poll until a new commit lands and every kiosk is confirmed again.

        "Confirmed" means the bridge's contiguous mark covers the first seq each
        kiosk issued after the fault ended (and so everything before it). For a
        bridge kill it also notes when the restarted bridge said ready.
        """
        at_end = self.issued()
        targets: dict[str, int] = {}
        watch = [record.target] if record.kind == "kiosk_cut" else self.kiosk_ids
        marks = self._marks()
        start_rows = {k: (marks[0] if marks else {}).get(k, 0) for k in watch}
        deadline = ended + RECOVERY_CAP_SECONDS
        while time.monotonic() < deadline:
            waiting_ready = record.kind == "bridge_kill" and record.ready_s is None
            if waiting_ready and self.bridge.ready():
                record.ready_s = round(time.monotonic() - ended, 2)
            for k, n in self.issued().items():
                if k not in targets and (n > at_end[k] or self._finished(k)):
                    targets[k] = n - 1  # the last seq issued so far
            marks = self._marks()
            now = time.monotonic()
            if marks is not None:
                rows, through = marks
                if record.first_commit_s is None and any(
                    rows.get(k, 0) > start_rows[k] for k in watch
                ):
                    record.first_commit_s = round(now - ended, 2)
                if len(targets) == len(self.kiosks) and all(
                    through.get(k, -1) >= t for k, t in targets.items()
                ):
                    record.all_confirmed_s = round(now - ended, 2)
                    if record.first_commit_s is None:
                        record.first_commit_s = record.all_confirmed_s
                    return
            time.sleep(POLL_SECONDS)

    def _finished(self, kiosk_id: str) -> bool:
        proc = self.kiosks[kiosk_id].proc
        return proc is not None and proc.poll() is not None

    def run_faults(self) -> None:
        """Spread faults over the run, one per slot at a random moment in it."""
        total = self.args.minutes * 60
        kinds = list(FAULTS) * max(1, round(total / 60 / self.args.fault_minutes))
        self.rng.shuffle(kinds)
        slot = total / len(kinds)
        for i, kind in enumerate(kinds):
            at = i * slot + self.rng.uniform(0.15, 0.5) * slot
            delay = self.t0 + at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            record = self.inject(kind)
            self.faults.append(record)
            print(
                f"  {record.at_s:6.1f} s  {kind:<15} target={record.target:<9} "
                f"outage={record.outage_s:4.1f} s  first commit="
                f"{_fmt(record.first_commit_s)}  all confirmed="
                f"{_fmt(record.all_confirmed_s)}  "
                + (f"bridge ready={_fmt(record.ready_s)} " if record.ready_s else "")
                + record.note,
                flush=True,
            )

    def drain(self) -> float:
        """Wait for every kiosk to publish all and empty its outbox; return seconds."""
        started = time.monotonic()
        deadline = started + DRAIN_CAP_SECONDS
        for kiosk in self.kiosks.values():
            assert kiosk.proc is not None
            with contextlib.suppress(Exception):
                kiosk.proc.wait(max(0.1, deadline - time.monotonic()))
        return time.monotonic() - started

    def check(self) -> list[KioskCheck]:
        """Compare each kiosk's issued seqs with the database."""
        out = []
        for kiosk_id, kiosk in self.kiosks.items():
            meta = kiosk.meta()
            issued = meta["next_seq"]
            rows = self.db.readings(kiosk_id)
            seqs = [r[1] for r in rows]
            unique = set(seqs)
            content = Counter((r[2], r[3], r[4]) for r in rows)
            out.append(
                KioskCheck(
                    kiosk_id=kiosk_id,
                    issued=issued,
                    stored=len(rows),
                    lost=sum(1 for q in range(issued) if q not in unique),
                    duplicated=len(seqs) - len(unique),
                    content_duplicates=sum(n - 1 for n in content.values() if n > 1),
                    extra=sum(1 for q in unique if not 0 <= q < issued),
                    out_of_order=sorted(seqs) != list(range(issued)),
                    reordered=sum(1 for a, b in itertools.pairwise(seqs) if b < a),
                    outbox_dropped=meta.get("dropped", 0),
                    outbox_depth=meta.get("depth", -1),
                    exit_code=kiosk.proc.poll() if kiosk.proc else None,
                )
            )
        return out


def _fmt(value: float | None) -> str:
    return f"{value:5.1f} s" if value is not None else "  >cap"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _by_kind(faults: list[FaultRecord]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for kind in FAULTS:
        mine = [f for f in faults if f.kind == kind]
        if mine:
            out[kind] = {
                "n": len(mine),
                "outage_max_s": max(f.outage_s for f in mine),
                "first_commit_s": _summary([f.first_commit_s for f in mine]),
                "all_confirmed_s": _summary([f.all_confirmed_s for f in mine]),
            }
    return out


def _summary(values: list[float | None]) -> dict[str, float | None]:
    got = [v for v in values if v is not None]
    return {
        "median": c.rounded(c.percentile(got, 50)) if got else None,
        "max": c.rounded(max(got)) if got else None,
        "unrecovered": len(values) - len(got),
    }


# -- a forged floor (opt-in probe) ----------------------------------------------------

SPOOF_RATE_HZ: Final = 25.0
SPOOF_MESSAGES: Final = 600
SPOOF_CUT_SECONDS: Final = 15.0


def spoof_floor_probe(args: argparse.Namespace, workdir: Path) -> int:
    """Show what a forged ``floor`` on a kiosk's topic does to that kiosk's backlog.

    One kiosk publishes 25 msg/s; its path is cut for 15 s so a backlog builds in its
    outbox. Meanwhile another client publishes, on the kiosk's readings topic, an
    envelope with ``floor`` = the kiosk's next seq and only invalid items. If the
    bridge trusts that floor it confirms seqs it never stored, and the kiosk deletes
    them when its path comes back. Expected after a fix: lost == 0.
    """
    machine = c.machine()
    with c.database("postgres" if args.postgres else "sqlite") as url:
        chaos = Chaos(args, workdir, url)
        chaos.kiosk_ids = ["victim"]
        try:
            chaos.broker.start()
            chaos.bridge.start().wait_ready()
            relay = s.Relay(chaos.broker.port, "victim").start()
            chaos.relays["victim"] = relay
            kiosk = s.KioskService(
                "victim",
                relay.port,
                chaos.root,
                workdir,
                messages=SPOOF_MESSAGES,
                rate_hz=SPOOF_RATE_HZ,
            ).start()
            chaos.kiosks["victim"] = kiosk
            time.sleep(4)
            relay.cut()
            time.sleep(SPOOF_CUT_SECONDS)
            backlog = kiosk.meta()
            rogue = Rogue(chaos.broker.port, chaos.root, ["victim"], chaos.rng)
            _, payload = rogue.payload("invalid_items", "victim")
            forged = {**json.loads(payload), "floor": backlog["next_seq"]}
            _publish_once(chaos.broker.port, chaos.root, "victim", forged)
            time.sleep(1.5)
            relay.restore()
            chaos.drain()
            (check,) = chaos.check()
        finally:
            chaos.close()
    print(
        f"forged floor {backlog['next_seq']} while {backlog['depth']} messages "
        f"waited in the outbox: issued {check.issued}, stored {check.stored}, "
        f"lost {check.lost}, kiosk exit {check.exit_code}"
    )
    c.emit_json(
        {
            "bench": "chaos-spoof-floor",
            "ok": check.lost == 0,
            "backlog_messages": backlog["depth"],
            "issued": check.issued,
            "stored": check.stored,
            "lost": check.lost,
            "machine": machine,
        }
    )
    return 0 if check.lost == 0 else 1


def _publish_once(port: int, root: str, kiosk_id: str, body: dict[str, Any]) -> None:
    from vitals_contract import Leaf, kiosk_topic

    client = c.mqtt_client()
    client.connect(c.HOST, port)
    client.loop_start()
    info = client.publish(
        kiosk_topic(kiosk_id, Leaf.READINGS, root), json.dumps(body).encode(), qos=1
    )
    info.wait_for_publish(5)
    client.loop_stop()
    client.disconnect()


# -- main ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Read the command line; --quick shortens everything."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kiosks", type=int, default=None, help="default 5 (quick 3)")
    parser.add_argument("--minutes", type=float, default=None, help="default 5")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="about 2 minutes")
    parser.add_argument("--broker", choices=("amqtt", "mosquitto"), default="amqtt")
    parser.add_argument("--postgres", action="store_true", help="fresh db on :5432")
    parser.add_argument(
        "--rate", type=float, default=None, help="messages of 5 readings/s per kiosk"
    )
    parser.add_argument(
        "--fault-minutes",
        type=float,
        default=None,
        help="run minutes per round of the four faults (default 1.25; quick 1)",
    )
    parser.add_argument("--keep", action="store_true", help="keep logs and outboxes")
    parser.add_argument(
        "--spoof-floor-probe",
        action="store_true",
        help="instead: check a forged floor cannot make a kiosk's backlog vanish",
    )
    args = parser.parse_args(argv)
    args.kiosks = args.kiosks or (3 if args.quick else 5)
    args.minutes = args.minutes or (1.0 if args.quick else 5.0)
    args.rate = args.rate or (4.0 if args.quick else 2.0)
    args.fault_minutes = args.fault_minutes or (1.0 if args.quick else 1.25)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the stack, inject the faults, check, print; exit 1 on any loss."""
    args = parse_args(argv)
    if args.broker == "mosquitto" and shutil.which("mosquitto") is None:
        print("mosquitto binary not installed", file=sys.stderr)
        return 2
    (c.ROOT_DIR / "var").mkdir(exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-chaos-", dir=c.ROOT_DIR / "var"))
    if args.spoof_floor_probe:
        try:
            return spoof_floor_probe(args, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    machine = c.machine()
    print(
        f"chaos: {args.kiosks} kiosks x {args.rate:g} msg/s (5 readings each) for "
        f"{args.minutes:g} min, broker {args.broker}, "
        f"{'postgresql' if args.postgres else 'sqlite'}, seed {args.seed}"
    )
    print(f"machine: {machine['nproc']} cores, {machine['cpu']}, {machine['date']}")
    wall = time.monotonic()
    with c.database("postgres" if args.postgres else "sqlite") as url:
        chaos = Chaos(args, workdir, url)
        rogue: Rogue | None = None
        try:
            chaos.start()
            rogue = Rogue(
                chaos.broker.port, chaos.root, chaos.kiosk_ids, random.Random(args.seed)
            ).start()
            print("faults (seconds after start; recovery measured from fault end):")
            chaos.run_faults()
            drain_s = chaos.drain()
            rogue.stop()
            time.sleep(1.0)  # let the last rogue messages reach the store
            checks = chaos.check()
            dead = chaos.db.dead_letters(chaos.kiosk_ids)
            bridge_log = chaos.bridge.log_tail(400)
        finally:
            if rogue is not None:
                rogue.stop()
            chaos.close()
    wall_s = time.monotonic() - wall

    print()
    print(
        c.table(
            [
                "kiosk",
                "issued",
                "stored",
                "lost",
                "dup",
                "content dup",
                "out-of-order",
                "reordered",
                "dropped",
                "exit",
            ],
            [
                [
                    k.kiosk_id,
                    k.issued,
                    k.stored,
                    k.lost,
                    k.duplicated,
                    k.content_duplicates,
                    "yes" if k.out_of_order else "no",
                    k.reordered,
                    k.outbox_dropped,
                    "-" if k.exit_code is None else str(k.exit_code),
                ]
                for k in checks
            ],
        )
    )
    lost = sum(k.lost for k in checks)
    duplicated = sum(k.duplicated + k.content_duplicates for k in checks)
    out_of_order = sum(1 for k in checks if k.out_of_order)
    sent = dict(chaos_sent(rogue))
    print()
    print(
        f"rogue messages sent: {sum(sent.values())} ({sent}); dead letters stored: "
        f"{dead['total']}, dead letters with a kiosk's own seq: {dead['kiosk_seq']}"
    )
    for reason, count, size, topic in chaos.db.reasons[:10]:
        print(f"  {count:5d} x {reason}  (largest {size:,} B; e.g. {topic[-40:]})")
    by_kind = _by_kind(chaos.faults)
    print()
    print(
        c.table(
            [
                "fault",
                "n",
                "outage max s",
                "first commit p50/max s",
                "confirmed p50/max s",
            ],
            [
                [
                    kind,
                    v["n"],
                    v["outage_max_s"],
                    f"{_num(v['first_commit_s']['median'])} / "
                    f"{_num(v['first_commit_s']['max'])}",
                    f"{_num(v['all_confirmed_s']['median'])} / "
                    f"{_num(v['all_confirmed_s']['max'])}",
                ]
                for kind, v in by_kind.items()
            ],
        )
    )
    tracebacks = bridge_log.count("Traceback")
    print(f"drain after the last fault: {drain_s:.1f} s; wall {wall_s:.0f} s")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"logs and outboxes kept in {workdir}")
    ok = (
        lost == 0
        and duplicated == 0
        and out_of_order == 0
        and dead["kiosk_seq"] == 0
        and all(k.exit_code == 0 for k in checks)
    )
    c.emit_json(
        {
            "bench": "chaos",
            "ok": ok,
            "kiosks": args.kiosks,
            "minutes": args.minutes,
            "seed": args.seed,
            "rate_msgs_per_kiosk": args.rate,
            "broker": args.broker,
            "database": "postgresql" if args.postgres else "sqlite",
            "issued": sum(k.issued for k in checks),
            "stored": sum(k.stored for k in checks),
            "lost": lost,
            "duplicated": duplicated,
            "out_of_order": out_of_order,
            "reordered_pairs": sum(k.reordered for k in checks),
            "kiosks_drained": sum(1 for k in checks if k.exit_code == 0),
            "faults": [asdict(f) for f in chaos.faults],
            "by_kind": by_kind,
            "first_commit_s": _summary([f.first_commit_s for f in chaos.faults]),
            "all_confirmed_s": _summary([f.all_confirmed_s for f in chaos.faults]),
            "rogue_sent": sum(sent.values()),
            "dead_letters": dead["total"],
            "dead_letters_kiosk_seq": dead["kiosk_seq"],
            "bridge_tracebacks_last_400_lines": tracebacks,
            "drain_s": round(drain_s, 1),
            "wall_s": round(wall_s),
            "machine": machine,
        }
    )
    return 0 if ok else 1


def chaos_sent(rogue: Rogue | None) -> Counter[str]:
    """Return how many rogue messages of each kind were handed to the broker."""
    return rogue.sent if rogue is not None else Counter()


if __name__ == "__main__":
    raise SystemExit(main())
