"""Failures inside FHIR routes become OperationOutcomes that leak nothing."""

from __future__ import annotations

import httpx
import pytest
from fastapi import APIRouter, FastAPI

from api.fhir import mapping
from api.fhir.routes import FhirRoute
from bridge.errors import StoreError

SECRET = "postgresql://admin:hunter2@db/vitals"


def app_raising(exc: Exception) -> FastAPI:
    router = APIRouter(prefix="/fhir", route_class=FhirRoute)

    @router.get("/boom")
    def boom() -> None:
        raise exc

    app = FastAPI()
    app.include_router(router)
    return app


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (RuntimeError(SECRET), 500, "exception"),
        (KeyError(SECRET), 500, "exception"),
        (StoreError(SECRET), 503, "transient"),
    ],
)
async def test_internal_errors_do_not_leak(
    exc: Exception, status: int, code: str
) -> None:
    transport = httpx.ASGITransport(app=app_raising(exc), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/fhir/boom")
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/fhir+json")
    assert "hunter2" not in response.text
    body = response.json()
    mapping.to_model(body)
    assert body["issue"][0]["code"] == code
