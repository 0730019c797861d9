"""The FastAPI application: health, readings history, the live socket and page."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse

from api import live, rest
from bridge.config import BridgeSettings
from bridge.service import BridgeService

STATIC_DIR = Path(__file__).resolve().parent / "static"


def create_app(settings: BridgeSettings) -> FastAPI:
    """Build the app; the bridge starts and stops with it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = BridgeService(settings)
        app.state.bridge = service
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="Kiosk vitals API",
        version="0.1.0",
        summary="Camera vital signs from clinic kiosks: history, live data, FHIR R4.",
        lifespan=lifespan,
    )
    app.include_router(rest.router)
    app.include_router(live.router)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    return app
