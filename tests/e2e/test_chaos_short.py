"""A short chaos run: kills, restarts, cuts, database faults and rogue messages.

Runs ``bench/chaos.py --quick`` (three simulated kiosks, one minute of faults, the
embedded broker and SQLite, about 90 s in all) as a subprocess and reads the JSON
line it ends with: nothing the kiosks issued may be lost or stored twice.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CHAOS = ROOT / "bench" / "chaos.py"
BUDGET_SECONDS = 150
COMMANDS = ("vitals-bridge", "kiosk-agent")


def test_chaos_short_run_loses_and_doubles_nothing() -> None:
    bin_dir = ROOT / ".venv" / "bin"
    missing = [
        name
        for name in COMMANDS
        if not (bin_dir / name).exists() and shutil.which(name) is None
    ]
    if missing:
        pytest.skip(f"commands not installed: {', '.join(missing)}")

    proc = subprocess.run(
        [sys.executable, str(CHAOS), "--quick", "--seed", "7"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=BUDGET_SECONDS,
        check=False,
    )

    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr[-3000:]
    summary = json.loads(lines[-1])
    report = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert summary["issued"] > 0, report
    assert summary["lost"] == 0, report
    assert summary["duplicated"] == 0, report
    assert summary["out_of_order"] == 0, report
    assert summary["dead_letters_kiosk_seq"] == 0, report
