"""The FastAPI application: REST, live feeds, FHIR R4 and the dashboard."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from api import errors, live, oauth, rest, scans, stream, uploads
from api.auth import TokenService
from api.fhir import router as fhir_router
from api.fhir.relay import FhirRelay
from api.fhir.relay import admin_router as relay_admin_router
from api.fhir.subscriptions import ws_router as fhir_ws_router
from api.fhir_guard import fhir_guard
from api.security import Auditor
from bridge.config import BridgeSettings
from bridge.ratelimit import RateLimiter
from bridge.service import BridgeService

STATIC_DIR = Path(__file__).resolve().parent / "static"


def create_app(settings: BridgeSettings) -> FastAPI:
    """Build the app; the bridge starts and stops with it."""
    service = BridgeService(settings)
    relay = (
        FhirRelay(settings.relay, service.store.engine, service.metrics.registry)
        if settings.relay.enabled
        else None
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        if relay is not None:
            await relay.start()
        try:
            yield
        finally:
            if relay is not None:
                await relay.stop()
            await service.stop()
            auditor.flush()

    app = FastAPI(
        title="Kiosk vitals API",
        version="0.1.0",
        summary="Camera vital signs from clinic kiosks: history, live data, FHIR R4.",
        lifespan=lifespan,
    )
    app.state.bridge = service
    app.state.relay = relay
    app.state.tokens = TokenService(settings.auth, service.store.engine)
    app.state.auditor = auditor = Auditor(service.store.engine)
    app.state.limiter = RateLimiter(
        settings.limits.requests_per_second, settings.limits.burst
    )

    errors.install(app)
    app.add_middleware(errors.BodyLimit, max_bytes=settings.limits.max_body_bytes)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.auth.cors_origins,
        allow_methods=["GET", "POST"],
        allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
    )

    app.include_router(oauth.router)
    app.include_router(rest.router)
    app.include_router(scans.router)
    app.include_router(uploads.router)
    app.include_router(live.router)
    app.include_router(stream.router)
    app.include_router(relay_admin_router)
    # The FHIR websocket's credential is its binding token, not the HTTP guard.
    app.include_router(fhir_ws_router)
    app.include_router(fhir_router, dependencies=[Depends(fhir_guard)])

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    return app
