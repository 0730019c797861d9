"""The bridge as one unit: store, hub and ingest, started and stopped together."""

from __future__ import annotations

import asyncio
import logging

from bridge.config import BridgeSettings
from bridge.hub import Hub
from bridge.ingest import Ingest
from bridge.metrics import BridgeMetrics
from bridge.store import Store
from bridge.store.migrate import upgrade

log = logging.getLogger(__name__)


class BridgeService:
    """Owns every long-lived part of one bridge instance."""

    def __init__(self, settings: BridgeSettings) -> None:
        self.settings = settings
        self.metrics = BridgeMetrics()
        self.store = Store.from_url(settings.database_url)
        self.hub = Hub(settings.hub.client_queue_size)
        self.ingest = Ingest(settings, self.store, self.hub, self.metrics)

    async def start(self) -> None:
        """Migrate if configured, then start ingest."""
        path = self.settings.sqlite_path()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        if self.settings.migrate_on_start:
            await asyncio.to_thread(upgrade, self.settings.database_url)
        await self.ingest.start()
        log.info("bridge started")

    async def stop(self) -> None:
        """Stop ingest and release the database."""
        await self.ingest.stop()
        self.store.close()
        log.info("bridge stopped")
