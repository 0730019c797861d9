"""The bridge as one unit: store, hub and ingest, started and stopped together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime, timedelta

from bridge.alerts import AlertEvaluator, load_rules
from bridge.config import BridgeSettings
from bridge.errors import StoreError
from bridge.hub import Hub
from bridge.ingest import Ingest
from bridge.metrics import BridgeMetrics
from bridge.store import Store
from bridge.store.alert_store import AlertRecord, AlertStore
from bridge.store.migrate import upgrade
from vitals_contract import systemd

log = logging.getLogger(__name__)

RETENTION_PERIOD_SECONDS = 3600


class BridgeService:
    """Owns every long-lived part of one bridge instance."""

    def __init__(self, settings: BridgeSettings) -> None:
        self.settings = settings
        self.metrics = BridgeMetrics()
        self.store = Store.from_url(settings.database_url)
        self.hub = Hub(settings.hub.client_queue_size)
        self.alert_store = AlertStore(self.store.engine)
        self.alerts = AlertEvaluator(load_rules(settings.alert_rules_file))
        self.ingest = Ingest(
            settings, self.store, self.hub, self.metrics, self.alerts, self.alert_store
        )
        self._watchdog: asyncio.Task[None] | None = None
        self._retention: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Migrate if configured, then start ingest."""
        path = self.settings.sqlite_path()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        if self.settings.migrate_on_start:
            await asyncio.to_thread(upgrade, self.settings.database_url)
        for alert in await asyncio.to_thread(self.alert_store.list, open_only=True):
            self.alerts.restore(alert.kiosk_id, alert.metric, alert.id, alert.severity)
        await self.ingest.start()
        if self.settings.retention_days is not None:
            self._retention = asyncio.create_task(
                self._purge_periodically(self.settings.retention_days),
                name="bridge[retention]",
            )
        systemd.notify("READY=1")
        interval = systemd.watchdog_interval_seconds()
        if interval is not None:
            self._watchdog = asyncio.create_task(
                self._pet_watchdog(interval), name="bridge[watchdog]"
            )
        log.info("bridge started")

    async def _purge_periodically(self, days: float) -> None:
        """Apply the retention setting now and then every hour."""
        while True:
            cutoff = datetime.now(UTC) - timedelta(days=days)
            try:
                removed = await asyncio.to_thread(self.store.purge_older_than, cutoff)
            except StoreError as exc:
                log.warning("%s; will retry", exc)
            else:
                log.info(
                    "retention: removed %d readings older than %s", removed, cutoff
                )
            await asyncio.sleep(RETENTION_PERIOD_SECONDS)

    async def _pet_watchdog(self, interval: float) -> None:
        """Tell systemd we are alive while the event loop keeps turning."""
        while True:
            systemd.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def acknowledge_alert(self, alert_id: int, actor: str) -> AlertRecord | None:
        """Acknowledge an alert and tell every listener; None when it does not exist."""
        record = await asyncio.to_thread(self.alert_store.acknowledge, alert_id, actor)
        if record is not None:
            self.ingest.publish_alert(record)
        return record

    async def stop(self) -> None:
        """Stop ingest and release the database."""
        systemd.notify("STOPPING=1")
        for task in (self._watchdog, self._retention):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.ingest.stop()
        self.store.close()
        log.info("bridge stopped")
