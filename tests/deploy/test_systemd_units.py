"""Check the systemd units in deploy/systemd.

``systemd-analyze verify`` (through deploy/verify-units.sh) catches syntax errors,
unknown keys and missing binaries; the other tests pin the choices the services rely
on, and run without systemd.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

REPO_DIR = Path(__file__).resolve().parents[2]
UNITS_DIR = REPO_DIR / "deploy" / "systemd"
VERIFY_SCRIPT = REPO_DIR / "deploy" / "verify-units.sh"
VERIFY_TIMEOUT_SECONDS = 120
INSTALLED_BIN = "/opt/kiosk-vitals/venv/bin/"

UnitFile = dict[str, dict[str, list[str]]]


def read_unit(name: str) -> UnitFile:
    """Parse a unit file into section -> key -> values (keys may repeat)."""
    sections: UnitFile = defaultdict(lambda: defaultdict(list))
    section = ""
    for raw_line in (UNITS_DIR / name).read_text().splitlines():
        line = raw_line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        sections[section][key.strip()].append(value.strip())
    return sections


def words(unit: UnitFile, section: str, key: str) -> set[str]:
    """Return every space-separated word given to ``key``."""
    return {word for value in unit[section][key] for word in value.split()}


def script_bin_dir() -> Path:
    """Find the directory holding the kiosk-agent and vitals-bridge scripts."""
    # The running interpreter's bin/ (not resolved: a venv's python is a symlink).
    candidate = Path(sys.executable).parent
    if (candidate / "kiosk-agent").exists() and (candidate / "vitals-bridge").exists():
        return candidate
    return REPO_DIR / ".venv" / "bin"


def test_units_pass_systemd_analyze_verify() -> None:
    """Run deploy/verify-units.sh and require a clean report."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed (Debian/Ubuntu package 'systemd')")

    result = subprocess.run(
        ["bash", str(VERIFY_SCRIPT)],
        capture_output=True,
        text=True,
        timeout=VERIFY_TIMEOUT_SECONDS,
        env={**os.environ, "VENV_BIN": str(script_bin_dir())},
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("name", "command"),
    [
        (
            "kiosk-agent.service",
            "kiosk-agent run --config /etc/kiosk-vitals/agent.toml",
        ),
        (
            "vitals-bridge.service",
            "vitals-bridge run --config /etc/kiosk-vitals/bridge.toml",
        ),
        (
            "vitals-migrate.service",
            "vitals-bridge migrate --config /etc/kiosk-vitals/bridge.toml",
        ),
        (
            "vitals-broker.service",
            "vitals-bridge broker --config /etc/kiosk-vitals/amqtt.yaml",
        ),
    ],
)
def test_unit_runs_installed_command(name: str, command: str) -> None:
    """Start the installed console script with the packaged config path."""
    unit = read_unit(name)

    assert unit["Service"]["ExecStart"] == [INSTALLED_BIN + command]


@pytest.mark.parametrize(
    "name", ["kiosk-agent.service", "vitals-bridge.service", "vitals-broker.service"]
)
def test_long_running_units_notify_readiness(name: str) -> None:
    """Wait for READY=1 from the main process and restart on failure."""
    service = read_unit(name)["Service"]

    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]
    assert service["Restart"] == ["on-failure"]


@pytest.mark.parametrize("name", ["kiosk-agent.service", "vitals-bridge.service"])
def test_agent_and_bridge_have_a_watchdog(name: str) -> None:
    """Restart the agent or bridge when it stops sending WATCHDOG=1 for 30 s."""
    assert read_unit(name)["Service"]["WatchdogSec"] == ["30"]


def test_bridge_requires_migration_first() -> None:
    """Never start the bridge before the schema migration has succeeded."""
    bridge = read_unit("vitals-bridge.service")
    migrate = read_unit("vitals-migrate.service")["Service"]

    assert "vitals-migrate.service" in words(bridge, "Unit", "Requires")
    assert "vitals-migrate.service" in words(bridge, "Unit", "After")
    assert migrate["Type"] == ["oneshot"]


def test_kiosk_agent_reaches_only_cameras() -> None:
    """Give the agent the video group and V4L2 devices, nothing else in /dev."""
    unit = read_unit("kiosk-agent.service")
    service = unit["Service"]

    assert service["User"] == ["kiosk"]
    assert "video" in words(unit, "Service", "SupplementaryGroups")
    assert service["DevicePolicy"] == ["closed"]
    assert service["DeviceAllow"] == ["char-video4linux rw"]
    assert service["StateDirectory"] == ["kiosk-agent"]


@pytest.mark.parametrize("name", sorted(p.name for p in UNITS_DIR.glob("*.service")))
def test_unit_is_hardened(name: str) -> None:
    """Apply the common sandbox to every unit."""
    unit = read_unit(name)
    service = unit["Service"]

    assert service["ProtectSystem"] == ["strict"]
    assert service["ProtectHome"] == ["yes"]
    assert service["PrivateTmp"] == ["yes"]
    assert service["NoNewPrivileges"] == ["yes"]
    assert words(unit, "Service", "RestrictAddressFamilies") == {
        "AF_INET",
        "AF_INET6",
        "AF_UNIX",
    }
    assert service["CapabilityBoundingSet"] == [""]
    assert "root" not in service["User"]
