"""Benchmark the FHIR Bulk Data $export against a bare SQL dump of the same rows.

Loads readings into a fresh PostgreSQL database with COPY (the data of
bench/fhir_search.py), starts the broker and the bridge + API as separate
processes (as deployed), then:

- kicks off ``GET /fhir/$export``, polls the status URL until the manifest
  arrives and times that (the export rate, resources/s);
- downloads every file, counts the lines and checks the count;
- dumps the same rows, mapped columns joined with their scan's patient, with
  ``COPY (SELECT ...) TO STDOUT`` and with one streamed ``SELECT`` through psycopg,
  and reports export time / SQL time;
- reads the API process's peak resident memory (VmHWM), which stays flat as the
  export grows because the export works one page at a time.

Prints a table, then one line of JSON.

    .venv/bin/python bench/fhir_export.py            # 1,000,000 readings
    .venv/bin/python bench/fhir_export.py --quick    # 100,000 readings, < 1 min
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import emit_json, free_port, machine, table  # noqa: E402
from fhir_search import fresh_database, load  # noqa: E402

from bridge.store.migrate import upgrade  # noqa: E402

QUICK_ROWS = 100_000
FULL_ROWS = 1_000_000
POLL_SECONDS = 0.2
EXPORT_TIMEOUT_SECONDS = 1_800
SQL_COLUMNS = (
    "r.id, r.kiosk_id, r.seq, r.scan_id, r.metric, r.value, r.unit, r.quality, "
    "r.final, r.measured_at, r.received_at, s.patient_ref"
)
SQL_ROWS = (
    f"SELECT {SQL_COLUMNS} FROM readings r LEFT JOIN scans s "
    "ON s.kiosk_id = r.kiosk_id AND s.scan_id = r.scan_id ORDER BY r.id"
)


class Stack:
    """The broker and the bridge + API, each its own process."""

    def __init__(self, database_url: str, export_dir: Path, page_size: int) -> None:
        self.secret = secrets.token_urlsafe(48)
        self.mqtt_port = free_port()
        self.http_port = free_port()
        self.env = {
            "VITALS_DATABASE_URL": database_url,
            "VITALS_AUTH__JWT_SECRET": self.secret,
            "VITALS_MQTT__PORT": str(self.mqtt_port),
            "VITALS_MQTT__ROOT_TOPIC": f"bench-{uuid.uuid4().hex[:6]}/v1",
            "VITALS_HTTP__PORT": str(self.http_port),
            "VITALS_INGEST__CLIENT_ID": f"bench-{uuid.uuid4().hex[:6]}",
            "VITALS_MIGRATE_ON_START": "false",
            "VITALS_EXPORT__DIRECTORY": str(export_dir),
            "VITALS_EXPORT__PAGE_SIZE": str(page_size),
        }
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def api_pid(self) -> int:
        return self.procs[-1].pid

    def start(self) -> None:
        py = sys.executable
        broker = [py, "-m", "api.cli", "broker", "--port", str(self.mqtt_port)]
        self.procs.append(self._spawn([*broker, "--log-level", "warning"]))
        api = [py, "-m", "api.cli", "run", "--log-level", "warning"]
        self.procs.append(self._spawn(api, self.env))
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

    def token(self) -> str:
        """Sign a token the API accepts for the export."""
        from api.auth import sign_token
        from bridge.config import AuthSettings

        settings = AuthSettings(jwt_secret=self.secret)
        return sign_token(settings, "bench", ["system/Observation.read"], 3600)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def peak_rss_mb(pid: int) -> float:
    """Return a process's peak resident set size (VmHWM) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_export(client: httpx.Client) -> tuple[float, dict[str, Any]]:
    """Kick off an export and poll until done; return seconds and the manifest."""
    started = time.perf_counter()
    kick = client.get("/fhir/$export", headers={"Prefer": "respond-async"})
    kick.raise_for_status()
    status_url = kick.headers["Content-Location"]
    deadline = time.monotonic() + EXPORT_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        response = client.get(status_url)
        if response.status_code == 200:
            manifest: dict[str, Any] = response.json()
            return time.perf_counter() - started, manifest
        if response.status_code != 202:
            raise RuntimeError(f"export failed: {response.status_code} {response.text}")
        time.sleep(POLL_SECONDS)
    raise RuntimeError("export did not finish in time")


def download(client: httpx.Client, manifest: dict[str, Any]) -> tuple[float, int, int]:
    """Fetch every output file; return seconds, lines and bytes."""
    started = time.perf_counter()
    lines = size = 0
    for item in manifest["output"]:
        with client.stream("GET", item["url"]) as response:
            response.raise_for_status()
            for chunk in response.iter_bytes():
                lines += chunk.count(b"\n")
                size += len(chunk)
    return time.perf_counter() - started, lines, size


def sql_copy(pg_url: str) -> tuple[float, int]:
    """Dump the rows with COPY ... TO STDOUT; return seconds and bytes."""
    started = time.perf_counter()
    size = 0
    with (
        psycopg.connect(pg_url) as conn,
        conn.cursor() as cur,
        cur.copy(f"COPY ({SQL_ROWS}) TO STDOUT") as copy,
    ):
        for chunk in copy:
            size += len(chunk)
    return time.perf_counter() - started, size


def sql_select(pg_url: str) -> tuple[float, int]:
    """Stream the rows through a server-side cursor; return seconds and rows."""
    started = time.perf_counter()
    count = 0
    with psycopg.connect(pg_url) as conn, conn.cursor(name="bench") as cur:
        cur.itersize = 2_000
        cur.execute(SQL_ROWS)
        for _ in cur:
            count += 1
    return time.perf_counter() - started, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="100k rows, < 1 min")
    parser.add_argument("--rows", type=int, help="readings to load")
    parser.add_argument("--page-size", type=int, default=2_000, help="export page")
    args = parser.parse_args()
    rows = args.rows or (QUICK_ROWS if args.quick else FULL_ROWS)

    with fresh_database() as (sa_url, pg_url), tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        upgrade(sa_url)
        load(pg_url, rows)
        with psycopg.connect(pg_url) as conn:
            conn.execute("ANALYZE")
            stored = conn.execute("SELECT count(*) FROM readings").fetchone()
        loaded = stored[0] if stored else 0
        print(f"loaded {loaded} readings in {time.perf_counter() - started:.1f} s")

        stack = Stack(sa_url, Path(tmp), args.page_size)
        stack.start()
        try:
            rss_idle = peak_rss_mb(stack.api_pid)
            headers = {"Authorization": f"Bearer {stack.token()}"}
            with httpx.Client(base_url=stack.base, headers=headers, timeout=60) as c:
                export_s, manifest = run_export(c)
                rss_peak = peak_rss_mb(stack.api_pid)
                download_s, lines, size = download(c, manifest)
            copy_s, copy_bytes = sql_copy(pg_url)
            select_s, selected = sql_select(pg_url)
        finally:
            stack.stop()

    counted = sum(item["count"] for item in manifest["output"])
    if not lines == counted == loaded == selected:
        raise SystemExit(f"count mismatch: {lines=} {counted=} {loaded=} {selected=}")
    rate = loaded / export_s
    print(
        table(
            ["step", "seconds", "rows/s", "note"],
            [
                [
                    "$export (kick-off to manifest)",
                    export_s,
                    rate,
                    f"{len(manifest['output'])} files",
                ],
                [
                    "download all files",
                    download_s,
                    loaded / download_s,
                    f"{size / 2**20:.0f} MiB",
                ],
                [
                    "COPY (SELECT ...) TO STDOUT",
                    copy_s,
                    loaded / copy_s,
                    f"{copy_bytes / 2**20:.0f} MiB",
                ],
                [
                    "SELECT, server-side cursor",
                    select_s,
                    loaded / select_s,
                    "psycopg rows",
                ],
            ],
        )
    )
    print(f"API peak RSS: {rss_idle:.0f} MiB idle, {rss_peak:.0f} MiB after the export")
    emit_json(
        {
            "bench": "fhir_export",
            "rows": loaded,
            "page_size": args.page_size,
            "files": len(manifest["output"]),
            "export_seconds": round(export_s, 2),
            "export_resources_per_s": round(rate),
            "download_seconds": round(download_s, 2),
            "ndjson_mib": round(size / 2**20, 1),
            "copy_seconds": round(copy_s, 3),
            "select_seconds": round(select_s, 3),
            "export_vs_copy": round(export_s / copy_s, 1),
            "export_vs_select": round(export_s / select_s, 1),
            "api_rss_idle_mib": round(rss_idle),
            "api_rss_peak_mib": round(rss_peak),
            **machine(),
        }
    )


if __name__ == "__main__":
    main()
