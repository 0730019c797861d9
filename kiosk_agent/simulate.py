"""A simulated kiosk: synthetic readings through the real outbox and MQTT link.

It skips the camera and the vitals engine, and is meant for load tests, fault tests
and benchmarks of the delivery path, where what matters is what gets through.
"""

from __future__ import annotations

import logging
import resource
import threading
import time
from datetime import UTC, datetime

from kiosk_agent.config import AgentSettings
from kiosk_agent.link import MqttLink
from kiosk_agent.outbox import Outbox
from vitals_contract import METRICS, Command, Metric

log = logging.getLogger(__name__)

# Plausible resting values, one per metric, nudged by the message number.
_BASE = {
    Metric.HEART_RATE: 70.0,
    Metric.RESPIRATORY_RATE: 15.0,
    Metric.HRV_SDNN: 45.0,
    Metric.SPO2: 97.0,
    Metric.STRESS_INDEX: 120.0,
}


def synthetic_readings(n: int, scan_id: str) -> list[dict[str, object]]:
    """Return the ``n``-th message's readings: one per metric, deterministic."""
    at = datetime.now(UTC).isoformat()
    return [
        {
            "scan_id": scan_id,
            "metric": metric.value,
            "value": round(base + (n % 7) * 0.5, 2),
            "unit": METRICS[metric].unit,
            "quality": 0.9,
            "measured_at": at,
        }
        for metric, base in _BASE.items()
    ]


def _refuse(_command: Command) -> str:
    return "simulated kiosk takes no commands"


class SimulatedKiosk:
    """Publishes ``messages`` readings messages at ``rate_hz`` through the outbox."""

    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.outbox = Outbox(settings.outbox_path)
        self.link = MqttLink(settings, self.outbox, _refuse)

    def run(self, messages: int, rate_hz: float, stop: threading.Event) -> None:
        """Generate the messages, then keep the link up until the outbox drains."""
        self.link.start()
        scan_id = f"sim{int(time.time())}"
        period = 1.0 / rate_hz
        next_at = time.monotonic()
        try:
            for n in range(messages):
                if stop.is_set():
                    return
                self.outbox.add_readings(synthetic_readings(n, scan_id))
                self.link.wake()
                next_at += period
                stop.wait(max(0.0, next_at - time.monotonic()))
            while not stop.is_set() and self.outbox.depth() > 0:
                stop.wait(0.1)
            if not stop.is_set():
                log.info("simulated kiosk %s drained", self.settings.kiosk_id)
        finally:
            self.link.stop()
            self.outbox.close()


# A kiosk holds its MQTT socket, paho's wake-up socket pair and the outbox's
# database, WAL and shared-memory files, plus some slack.
FDS_PER_KIOSK = 6
SELECT_FD_LIMIT = 1024


def _raise_fd_limit(needed: int) -> None:
    """Lift the soft open-files limit towards ``needed`` (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = needed + 64
    if soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < wanted:
            log.warning("open-files limit %d is too low for this fleet", new)


def _run_one(
    settings: AgentSettings, messages: int, rate_hz: float, stop: threading.Event
) -> None:
    # Opening the outbox syncs to disk; doing it in the kiosk's own thread lets a
    # large fleet come up in parallel rather than one kiosk at a time.
    SimulatedKiosk(settings).run(messages, rate_hz, stop)


def run_fleet(
    settings: AgentSettings,
    kiosks: int,
    messages: int,
    rate_hz: float,
    stop: threading.Event,
) -> None:
    """Run ``kiosks`` simulated kiosks in threads, ids ``<kiosk_id>-<n>``.

    Each has its own outbox next to ``settings.outbox_path``; returns when all drained.
    """
    _raise_fd_limit(kiosks * FDS_PER_KIOSK)
    if kiosks * FDS_PER_KIOSK > SELECT_FD_LIMIT:
        # paho's network loop uses select(), which cannot watch descriptors past
        # FD_SETSIZE; kiosks beyond that never connect. Run several processes.
        log.warning("%d kiosks in one process exceed what paho can poll", kiosks)
    threads = []
    for n in range(kiosks):
        kiosk_id = f"{settings.kiosk_id}-{n}"
        own = settings.model_copy(
            update={
                "kiosk_id": kiosk_id,
                "outbox_path": settings.outbox_path.with_name(f"{kiosk_id}.db"),
            }
        )
        thread = threading.Thread(
            target=_run_one,
            args=(own, messages, rate_hz, stop),
            name=f"sim[{kiosk_id}]",
        )
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
