"""The demo: embedded broker, bridge with API on SQLite, one synthetic kiosk.

Each part runs as its own process, as in production, started with the same
commands a user would type. Ports fall back to free ones when the usual ones
(1883, 8000) are taken.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from pydantic import SecretStr

from api.auth import ACK, ADMIN, PATIENT_READ, READ, sign_token
from bridge.broker import free_port, port_is_free
from bridge.config import AuthSettings

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
READY_TIMEOUT_SECONDS = 60.0
DEMO_KIOSK = "demo-kiosk-1"
DEMO_SCOPES = [READ, ACK, PATIENT_READ, ADMIN]
DEMO_TOKEN_TTL_SECONDS = 8 * 3600


def _pick_port(preferred: int) -> int:
    return preferred if port_is_free(HOST, preferred) else free_port(HOST)


def _spawn(
    args: list[str], env: dict[str, str], log_file: Path
) -> subprocess.Popen[bytes]:
    out = log_file.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", *args], env={**os.environ, **env}, stdout=out, stderr=out
    )


def _wait_http(url: str, procs: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError(
                "a demo process exited early; see the logs in the workdir"
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 (our URL)
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not become ready in {READY_TIMEOUT_SECONDS:.0f} s")


def run_demo(workdir: Path, duration: float) -> int:
    """Run the demo stack; return a process exit code."""
    workdir.mkdir(parents=True, exist_ok=True)
    mqtt_port = _pick_port(1883)
    http_port = _pick_port(8000)
    # Security stays on in the demo: a fresh key per run, and a token to sign in with.
    auth = AuthSettings(jwt_secret=SecretStr(secrets.token_hex(32)))
    sign_in = sign_token(auth, "demo-user", DEMO_SCOPES, DEMO_TOKEN_TTL_SECONDS)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(
            _spawn(
                ["api.cli", "broker", "--port", str(mqtt_port)],
                {},
                workdir / "broker.log",
            )
        )
        procs.append(
            _spawn(
                ["api.cli", "run"],
                {
                    "VITALS_ENVIRONMENT": "demo",
                    "VITALS_AUTH__JWT_SECRET": auth.jwt_secret.get_secret_value(),
                    "VITALS_DATABASE_URL": f"sqlite:///{workdir / 'vitals.db'}",
                    "VITALS_MQTT__PORT": str(mqtt_port),
                    "VITALS_HTTP__PORT": str(http_port),
                },
                workdir / "bridge.log",
            )
        )
        base = f"http://{HOST}:{http_port}"
        _wait_http(f"{base}/ready", procs)
        procs.append(
            _spawn(
                ["kiosk_agent.cli", "run"],
                {
                    "KIOSK_KIOSK_ID": DEMO_KIOSK,
                    "KIOSK_CAMERA": "synthetic",
                    "KIOSK_MQTT__PORT": str(mqtt_port),
                    "KIOSK_OUTBOX_PATH": str(workdir / f"outbox-{DEMO_KIOSK}.db"),
                },
                workdir / "agent.log",
            )
        )
        print(f"broker  mqtt://{HOST}:{mqtt_port} (embedded amqtt)")
        print(f"api     {base}/docs")
        print(f"logs    {workdir}/")
        print(f"\nsign-in token (8 h): {sign_in}")
        # The token rides in the URL fragment, which browsers never send to servers.
        print(f"\nLive page: {base}/#token={sign_in}\n\nCtrl-C stops the demo.")
        sys.stdout.flush()
        deadline = time.monotonic() + duration if duration > 0 else None
        while deadline is None or time.monotonic() < deadline:
            if any(p.poll() is not None for p in procs):
                log.error("a demo process exited; see the logs in %s", workdir)
                return 1
            time.sleep(0.5)
        return 0
    except KeyboardInterrupt:
        return 0
    except RuntimeError as exc:
        log.error("%s", exc)
        return 1
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
