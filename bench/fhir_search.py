"""Benchmark the FHIR facade against the bare SQL that answers the same questions.

Loads readings into a fresh PostgreSQL database with COPY, starts the broker and
the bridge + API as separate processes (as deployed), then times, over HTTP:

- Observation search by patient, newest first, pages of 50 (page 1 and the next);
- Observation search by LOINC code in a one-day window, oldest first, pages of 50;
- Observation/$lastn for one patient (max 3);

each beside the same query run bare through psycopg, and beside that bare query
served over the same HTTP stack (``/bench/sql/...``, added to the bench's server
only: a sync handler, psycopg, orjson rows, no auth), which shows what HTTP, the
framework and the client cost without FHIR. Every HTTP time includes decoding the
JSON body. Prints a table, then one line of JSON. Targets: page p50 <= 15 ms,
$lastn p50 <= 25 ms, FHIR/SQL p50 <= 3x. It also times the facade in-process
(parse, SQLAlchemy, mapping, JSON; no HTTP, no auth) against the same bare SQL, to
show what the facade itself adds.

    .venv/bin/python bench/fhir_search.py            # 1,000,000 readings
    .venv/bin/python bench/fhir_search.py --quick    # 100,000 readings, < 1 min
    .venv/bin/python bench/fhir_search.py --database vitals_bench_1m  # load once
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
from fastapi import FastAPI

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bridge.store.migrate import upgrade  # noqa: E402
from vitals_contract import METRICS, Metric  # noqa: E402

ADMIN_URL = os.environ.get(
    "VITALS_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)
KIOSKS = 200
ROUNDS_PER_SCAN = 5
READINGS_PER_SCAN = ROUNDS_PER_SCAN * len(Metric)
SCANS_PER_PATIENT = 8
ANONYMOUS_SCAN_SHARE = 0.1
ROUND_SECONDS = 5
SCAN_SPACING_SECONDS = 600
T0 = datetime(2026, 1, 1, tzinfo=UTC)
PAGE = 50
LASTN_MAX = 3
TARGET_PAGE_P50_MS = 15.0
TARGET_LASTN_P50_MS = 25.0
TARGET_RATIO = 3.0

COLUMNS = (
    "r.id, r.kiosk_id, r.seq, r.scan_id, r.metric, r.value, r.unit, r.quality, "
    "r.final, r.measured_at, r.received_at, s.patient_ref"
)
JOIN = "readings r JOIN scans s ON s.kiosk_id = r.kiosk_id AND s.scan_id = r.scan_id"
SQL_PATIENT_FIRST = (
    f"SELECT {COLUMNS} FROM {JOIN} WHERE s.patient_ref = %s "
    "ORDER BY r.measured_at DESC, r.id DESC LIMIT %s"
)
SQL_PATIENT_NEXT = (
    f"SELECT {COLUMNS} FROM {JOIN} WHERE s.patient_ref = %s "
    "AND (r.measured_at, r.id) < (%s, %s) "
    "ORDER BY r.measured_at DESC, r.id DESC LIMIT %s"
)
SQL_CODE = (
    f"SELECT {COLUMNS} FROM readings r LEFT JOIN scans s "
    "ON s.kiosk_id = r.kiosk_id AND s.scan_id = r.scan_id "
    "WHERE r.metric = %s AND r.measured_at >= %s AND r.measured_at < %s "
    "ORDER BY r.measured_at, r.id LIMIT %s"
)
SQL_LASTN = (
    f"SELECT * FROM (SELECT {COLUMNS}, row_number() OVER (PARTITION BY "
    "s.patient_ref, r.metric ORDER BY r.measured_at DESC, r.id DESC) AS rank "
    f"FROM {JOIN} WHERE s.patient_ref = %s) ranked WHERE rank <= %s "
    "ORDER BY patient_ref, metric, measured_at DESC, id DESC"
)

SQL_READ = (
    f"SELECT {COLUMNS} FROM readings r LEFT JOIN scans s "
    "ON s.kiosk_id = r.kiosk_id AND s.scan_id = r.scan_id WHERE r.id = %s"
)
# The bare queries by name, for the bench server's /bench/sql endpoint.
BARE_SQL = {
    "patient_first": SQL_PATIENT_FIRST,
    "patient_next": SQL_PATIENT_NEXT,
    "code_day": SQL_CODE,
    "lastn": SQL_LASTN,
    "read": SQL_READ,
}


def free_port() -> int:
    """Return a TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def fresh_database() -> Iterator[tuple[str, str]]:
    """Create a database, yield (SQLAlchemy URL, psycopg URL), drop it afterwards."""
    name = f"vitals_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urls(name)
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def urls(name: str) -> tuple[str, str]:
    """Return the (SQLAlchemy URL, psycopg URL) of database ``name``."""
    plain = f"{ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    return plain.replace("postgresql://", "postgresql+psycopg://"), plain


def kept_database(name: str, rows: int) -> tuple[str, str, list[str], float]:
    """Reuse database ``name`` if a load of ``rows`` readings filled it, else load it.

    Returns both URLs, the patients and the load time (0 when reused). The
    database stays for the next run; drop it by hand when done.
    """
    sa_url, pg_url = urls(name)
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        exists = admin.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (name,)
        ).fetchone()
        if exists:
            with psycopg.connect(pg_url) as conn:
                found = conn.execute(
                    "SELECT to_regclass('readings') IS NOT NULL"
                ).fetchone()
                count = None
                if found and found[0]:
                    count = conn.execute("SELECT count(*) FROM readings").fetchone()
            loaded = max(1, rows // READINGS_PER_SCAN) * READINGS_PER_SCAN
            if count is not None and count[0] == loaded:
                upgrade(sa_url)  # tables of migrations added since the load
                with psycopg.connect(pg_url) as conn:
                    refs = conn.execute(
                        "SELECT DISTINCT patient_ref FROM scans "
                        "WHERE patient_ref IS NOT NULL ORDER BY 1"
                    ).fetchall()
                return sa_url, pg_url, [r[0] for r in refs], 0.0
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    started = time.perf_counter()
    upgrade(sa_url)
    patients = load(pg_url, rows)
    return sa_url, pg_url, patients, time.perf_counter() - started


def load(url: str, rows: int) -> list[str]:
    """COPY ``rows`` readings (30 per scan, 8 scans per patient); return patients."""
    scans = max(1, rows // READINGS_PER_SCAN)
    patients = max(1, scans // SCANS_PER_PATIENT)
    rng = random.Random(7)
    metrics = list(Metric)
    seqs = [0] * KIOSKS
    used: set[str] = set()
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        with cur.copy(
            "COPY kiosks (kiosk_id, committed_through, state, agent_version, "
            "status_at, last_seen_at) FROM STDIN"
        ) as copy:
            for k in range(KIOSKS):
                copy.write_row((f"kiosk-{k:03d}", 0, "online", "1.0.0", T0, T0))
        scan_copy_sql = (
            "COPY scans (kiosk_id, scan_id, state, patient_ref, started_at, "
            "updated_at) FROM STDIN"
        )
        reading_copy_sql = (
            "COPY readings (kiosk_id, seq, scan_id, metric, value, unit, quality, "
            "final, measured_at, received_at) FROM STDIN"
        )
        scan_rows: list[tuple[Any, ...]] = []
        with cur.copy(reading_copy_sql) as copy:
            for i in range(scans):
                k = i % KIOSKS
                kiosk_id = f"kiosk-{k:03d}"
                start = T0 + timedelta(seconds=(i // KIOSKS) * SCAN_SPACING_SECONDS + k)
                patient = None
                if rng.random() >= ANONYMOUS_SCAN_SHARE:
                    patient = f"P{rng.randrange(patients):07d}"
                    used.add(patient)
                scan_id = f"scan-{i}"
                scan_rows.append((kiosk_id, scan_id, "complete", patient, start, start))
                for r in range(ROUNDS_PER_SCAN):
                    for m, metric in enumerate(metrics):
                        info = METRICS[metric]
                        when = start + timedelta(seconds=r * ROUND_SECONDS + m)
                        value = rng.uniform(info.min_value, info.max_value)
                        copy.write_row(
                            (
                                kiosk_id,
                                seqs[k],
                                scan_id,
                                metric.value,
                                round(value, 2),
                                info.unit,
                                round(rng.uniform(0.3, 1.0), 3),
                                r == ROUNDS_PER_SCAN - 1,
                                when,
                                when + timedelta(seconds=2),
                            )
                        )
                        seqs[k] += 1
        with cur.copy(scan_copy_sql) as copy:
            for row in scan_rows:
                copy.write_row(row)
        conn.commit()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
    return sorted(used)


class Services:
    """The broker and the bridge + API, each its own process.

    ``guarded=False`` serves the same app with the FHIR auth dependency (token
    check, rate limit, audit write) replaced by a no-op, to show the facade's own
    cost apart from the per-request security work.
    """

    def __init__(self, database_url: str, *, guarded: bool) -> None:
        self.guarded = guarded
        self.secret = secrets.token_urlsafe(48)
        self.mqtt_port = free_port()
        self.http_port = free_port()
        self.database_url = database_url
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        py = sys.executable
        broker = ["api.cli", "broker", "--port", str(self.mqtt_port)]
        self.procs.append(self._spawn([py, "-m", *broker, "--log-level", "warning"]))
        env = {
            "VITALS_DATABASE_URL": self.database_url,
            "VITALS_AUTH__JWT_SECRET": self.secret,
            "VITALS_MQTT__PORT": str(self.mqtt_port),
            "VITALS_MQTT__ROOT_TOPIC": f"bench-{uuid.uuid4().hex[:6]}/v1",
            "VITALS_HTTP__PORT": str(self.http_port),
            "VITALS_INGEST__CLIENT_ID": f"bench-{uuid.uuid4().hex[:6]}",
            "VITALS_MIGRATE_ON_START": "false",
            "VITALS_LIMITS__REQUESTS_PER_SECOND": "1000000",
            "VITALS_LIMITS__BURST": "1000000",
        }
        if not self.guarded:
            env["BENCH_WITHOUT_GUARD"] = "1"
        api = [py, str(Path(__file__).resolve()), "--serve"]
        self.procs.append(self._spawn(api, env))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("API did not start")

    @staticmethod
    def _spawn(
        args: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        return subprocess.Popen(args, cwd=ROOT, env={**os.environ, **(env or {})})

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def token(self) -> str:
        """Sign a token the API accepts for every FHIR read."""
        from api.auth import sign_token
        from bridge.config import AuthSettings

        settings = AuthSettings(jwt_secret=self.secret)
        return sign_token(settings, "bench", ["system/*.read"], 3600)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def serve() -> None:
    """Run the bridge + API from ``VITALS_*`` variables (the bench's server process)."""
    import uvicorn

    from api.app import create_app
    from bridge.config import BridgeSettings

    settings = BridgeSettings()
    app = create_app(settings)
    if os.environ.get("BENCH_WITHOUT_GUARD") == "1":
        from api.fhir_guard import fhir_guard

        async def no_guard() -> None:
            return None

        app.dependency_overrides[fhir_guard] = no_guard
    add_bare_sql_route(app, settings.database_url.replace("+psycopg", ""))
    uvicorn.run(app, host="127.0.0.1", port=settings.http.port, log_level="warning")


def add_bare_sql_route(app: FastAPI, pg_url: str) -> None:
    """Serve the bare queries over the same HTTP stack, as JSON rows, unguarded.

    The baseline that shows what HTTP, the framework and the client cost without
    FHIR: a sync handler like the FHIR ones (same thread hop), psycopg, orjson.
    """
    import threading

    import orjson
    from starlette.responses import Response

    local = threading.local()

    @app.get("/bench/sql/{name}", include_in_schema=False)
    def bare_sql(name: str, args: str) -> Response:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = psycopg.connect(pg_url, autocommit=True)
        rows = conn.execute(BARE_SQL[name], json.loads(args)).fetchall()
        return Response(orjson.dumps(rows), media_type="application/json")


def timed(fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    """Call ``fn(*args)``; return the wall time in ms and the result."""
    start = time.perf_counter()
    result = fn(*args)
    return (time.perf_counter() - start) * 1000, result


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(
    fhir_ms: list[float], sql_ms: list[float], http_sql_ms: list[float] | None = None
) -> dict[str, float]:
    fhir_p50 = statistics.median(fhir_ms)
    sql_p50 = statistics.median(sql_ms)
    out = {
        "fhir_p50_ms": round(fhir_p50, 2),
        "fhir_p99_ms": round(percentile(fhir_ms, 0.99), 2),
        "sql_p50_ms": round(sql_p50, 3),
        "sql_p99_ms": round(percentile(sql_ms, 0.99), 3),
        "ratio_p50": round(fhir_p50 / sql_p50, 1),
        "samples": len(fhir_ms),
    }
    if http_sql_ms:
        http_sql_p50 = statistics.median(http_sql_ms)
        out["http_sql_p50_ms"] = round(http_sql_p50, 2)
        out["ratio_to_http_sql_p50"] = round(fhir_p50 / http_sql_p50, 1)
    return out


def run(
    client: httpx.Client, db: psycopg.Connection[Any], patients: list[str], n: int
) -> dict[str, dict[str, float]]:
    """Time every question ``n`` times over HTTP and over bare SQL."""
    rng = random.Random(11)
    questions = (
        "search_patient_page",
        "search_code_day_page",
        "lastn_patient",
        "read_by_id",
    )
    results: dict[str, tuple[list[float], list[float], list[float]]] = {
        name: ([], [], []) for name in questions
    }

    def get(url: str, params: Any = None) -> dict[str, Any]:
        response = client.get(url, params=params)
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    max_row = db.execute("SELECT max(id) FROM readings").fetchone()
    max_id = int(max_row[0]) if max_row else 1
    last_second = (len(patients) * SCANS_PER_PATIENT) // KIOSKS * SCAN_SPACING_SECONDS

    def sql(query: str, args: tuple[Any, ...]) -> list[Any]:
        return db.execute(query, args).fetchall()

    def both(name: str, url: str, params: Any, query: str, args: Any) -> Any:
        ms, body = timed(get, url, params)
        results[name][0].append(ms)
        ms, rows = timed(sql, BARE_SQL[query], args)
        results[name][1].append(ms)
        encoded = json.dumps(args, default=lambda d: d.isoformat())
        ms, _ = timed(get, f"/bench/sql/{query}", {"args": encoded})
        results[name][2].append(ms)
        return body, rows

    for _ in range(n):
        patient = rng.choice(patients)

        # Patient, newest first: page 1, then the page its next link points at.
        page1, rows = both(
            "search_patient_page",
            "/fhir/Observation",
            {"patient": patient, "_sort": "-date", "_count": str(PAGE)},
            "patient_first",
            (patient, PAGE + 1),
        )
        nxt = next((x["url"] for x in page1["link"] if x["relation"] == "next"), None)
        if nxt is not None and len(rows) > PAGE:
            last = rows[PAGE - 1]
            key = (patient, last[9], last[0], PAGE + 1)
            both("search_patient_page", nxt, None, "patient_next", key)

        # One LOINC code within one day, oldest first.
        day = T0 + timedelta(seconds=rng.randrange(max(1, last_second)))
        day = day.replace(hour=0, minute=0, second=0)
        params = [
            ("code", "http://loinc.org|8867-4"),
            ("date", f"ge{day.date().isoformat()}"),
            ("date", f"lt{(day + timedelta(days=1)).date().isoformat()}"),
            ("_sort", "date"),
            ("_count", str(PAGE)),
        ]
        sql_args = ("heart_rate", day, day + timedelta(days=1), PAGE + 1)
        both("search_code_day_page", "/fhir/Observation", params, "code_day", sql_args)

        # $lastn for one patient.
        both(
            "lastn_patient",
            "/fhir/Observation/$lastn",
            {"patient": patient, "max": str(LASTN_MAX)},
            "lastn",
            (patient, LASTN_MAX),
        )

        # Read by id: the fixed cost of any request (HTTP, auth, one PK lookup).
        reading_id = rng.randrange(1, max_id + 1)
        both(
            "read_by_id",
            f"/fhir/Observation/{reading_id}",
            None,
            "read",
            (reading_id,),
        )

    return {name: summary(f, s, h) for name, (f, s, h) in results.items()}


def measure(
    sa_url: str, pg_url: str, patients: list[str], iterations: int, *, guarded: bool
) -> dict[str, dict[str, float]]:
    """Start the services, warm up, time every question, stop the services."""
    services = Services(sa_url, guarded=guarded)
    services.start()
    try:
        headers = {"Authorization": f"Bearer {services.token()}"}
        with (
            httpx.Client(base_url=services.base, headers=headers) as client,
            psycopg.connect(pg_url, autocommit=True) as db,
        ):
            run(client, db, patients, max(10, iterations // 10))  # warm up
            return run(client, db, patients, iterations)
    finally:
        services.stop()


def in_process(
    sa_url: str, pg_url: str, patients: list[str], n: int
) -> dict[str, dict[str, float]]:
    """Time the facade without HTTP: parse, SQL via SQLAlchemy, map, encode JSON."""
    from api.fhir import mapping, search
    from api.fhir.queries import FhirQueries
    from api.fhir.routes import FhirResponse
    from bridge.store.db import make_engine

    engine = make_engine(sa_url)
    queries = FhirQueries(engine)
    rng = random.Random(13)
    page_ms: tuple[list[float], list[float]] = ([], [])
    lastn_ms: tuple[list[float], list[float]] = ([], [])

    def page(patient: str) -> bytes:
        parsed = search.parse_observation_search(
            [("patient", patient), ("_sort", "-date"), ("_count", str(PAGE))]
        )
        rows = queries.search_observations(parsed).rows
        resources = [mapping.observation(r.reading, r.patient_ref) for r in rows]
        return bytes(FhirResponse(resources).body)

    def lastn(patient: str) -> bytes:
        parsed, max_n = search.parse_lastn(
            [("patient", patient), ("max", str(LASTN_MAX))]
        )
        rows, _ = queries.lastn(parsed, max_n)
        resources = [mapping.observation(r.reading, r.patient_ref) for r in rows]
        return bytes(FhirResponse(resources).body)

    with psycopg.connect(pg_url, autocommit=True) as db:

        def sql(query: str, args: tuple[Any, ...]) -> list[Any]:
            return db.execute(query, args).fetchall()

        for i in range(n + n // 10):
            patient = rng.choice(patients)
            record = i >= n // 10  # the first tenth warms up
            for fn, query, args, out in (
                (page, SQL_PATIENT_FIRST, (patient, PAGE + 1), page_ms),
                (lastn, SQL_LASTN, (patient, LASTN_MAX), lastn_ms),
            ):
                fhir_time, _ = timed(fn, patient)
                sql_time, _ = timed(sql, query, args)
                if record:
                    out[0].append(fhir_time)
                    out[1].append(sql_time)
    engine.dispose()
    return {
        "search_patient_page": summary(*page_ms),
        "lastn_patient": summary(*lastn_ms),
    }


def verdict(results: dict[str, dict[str, float]]) -> dict[str, bool]:
    """Check the targets on one set of results."""
    # TODO: "ratio_le_3x" against bare psycopg cannot hold over HTTP here: the same
    # query served over the same HTTP stack already takes ~4x (http_sql_p50_ms).
    page_p50 = max(
        results["search_patient_page"]["fhir_p50_ms"],
        results["search_code_day_page"]["fhir_p50_ms"],
    )
    questions = ("search_patient_page", "search_code_day_page", "lastn_patient")
    return {
        "page_p50_le_15ms": page_p50 <= TARGET_PAGE_P50_MS,
        "lastn_p50_le_25ms": results["lastn_patient"]["fhir_p50_ms"]
        <= TARGET_LASTN_P50_MS,
        "ratio_le_3x": max(results[q]["ratio_p50"] for q in questions) <= TARGET_RATIO,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100k rows, < 1 min")
    parser.add_argument("--rows", type=int, help="readings to load")
    parser.add_argument("--iterations", type=int, help="timed rounds per question")
    parser.add_argument(
        "--database",
        metavar="NAME",
        help="keep the loaded data in database NAME and reuse it on the next run "
        "with the same --rows (default: a fresh database, dropped afterwards)",
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve()
        return
    rows = args.rows or (100_000 if args.quick else 1_000_000)
    iterations = args.iterations or (40 if args.quick else 400)

    with ExitStack() as stack:
        if args.database:
            sa_url, pg_url, patients, load_seconds = kept_database(args.database, rows)
        else:
            sa_url, pg_url = stack.enter_context(fresh_database())
            started = time.perf_counter()
            upgrade(sa_url)
            patients = load(pg_url, rows)
            load_seconds = time.perf_counter() - started
        verb = "loaded" if load_seconds else "reused"
        print(f"{verb} {rows:,} readings in {load_seconds:.1f} s", file=sys.stderr)
        runs = {
            "as_deployed": measure(sa_url, pg_url, patients, iterations, guarded=True),
            "without_auth_guard": measure(
                sa_url, pg_url, patients, iterations, guarded=False
            ),
        }
        without_http = in_process(sa_url, pg_url, patients, iterations)

    for label, results in (*runs.items(), ("in_process_no_http", without_http)):
        print(label, file=sys.stderr)
        for name, r in results.items():
            line = (
                f"  {name:20} FHIR p50 {r['fhir_p50_ms']:6.2f} ms"
                f"  p99 {r['fhir_p99_ms']:6.2f} ms | SQL p50 {r['sql_p50_ms']:6.3f} ms"
                f" | ratio {r['ratio_p50']:5.1f}x"
            )
            if "http_sql_p50_ms" in r:
                line += (
                    f" | SQL over HTTP p50 {r['http_sql_p50_ms']:6.2f} ms"
                    f" | ratio {r['ratio_to_http_sql_p50']:4.1f}x"
                )
            print(line, file=sys.stderr)
    print(
        json.dumps(
            {
                "bench": "fhir_search",
                "rows": rows,
                "load_seconds": round(load_seconds, 1),
                "page_size": PAGE,
                "lastn_max": LASTN_MAX,
                **{label: results for label, results in runs.items()},
                "in_process_no_http": without_http,
                "targets_met": {label: verdict(r) for label, r in runs.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
