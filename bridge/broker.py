"""The embedded amqtt broker (MQTT 3.1.1), started by our own command.

Its configuration lives in ``broker_config/``; the listener address given on the
command line replaces the file's, so the demo can move off a port that is taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from pathlib import Path
from typing import Any

import yaml
from amqtt.broker import Broker

from vitals_contract import systemd

log = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT_SECONDS = 5.0

DEFAULT_CONFIG = (
    Path(__file__).resolve().parent.parent / "broker_config" / "amqtt-demo.yaml"
)


def port_is_free(host: str, port: int) -> bool:
    """Tell whether ``host:port`` can be bound right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """Ask the OS for a port that is free on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def load_config(
    path: Path, host: str | None = None, port: int | None = None
) -> dict[str, Any]:
    """Read an amqtt YAML config; ``host``/``port`` replace its default listener's."""
    with path.open() as fh:
        config: dict[str, Any] = yaml.safe_load(fh) or {}
    listeners = config.setdefault("listeners", {})
    default = listeners.setdefault("default", {"type": "tcp", "bind": "127.0.0.1:1883"})
    file_host, _, file_port = str(default.get("bind", "127.0.0.1:1883")).rpartition(":")
    default["bind"] = f"{host or file_host}:{port or file_port}"
    return config


async def serve(config: dict[str, Any], stop: asyncio.Event) -> None:
    """Run the broker until ``stop`` is set."""
    broker = Broker(config)
    await broker.start()
    systemd.notify("READY=1")
    log.info("amqtt broker listening on %s", config["listeners"]["default"]["bind"])
    try:
        await stop.wait()
    finally:
        # amqtt's shutdown can hang on a stuck client; never let it hold the stop.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(broker.shutdown(), SHUTDOWN_TIMEOUT_SECONDS)
        log.info("amqtt broker stopped")
