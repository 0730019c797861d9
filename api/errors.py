"""One error shape for the whole API, and the body-size limit.

Every non-FHIR error is ``{"error": {"code": ..., "message": ..., "details": [...]}}``
with a fitting status; under ``/fhir`` the same failures are FHIR OperationOutcomes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.auth import AuthError
from api.security import RateLimitError
from bridge.errors import StoreError

log = logging.getLogger(__name__)

FHIR_PREFIX = "/fhir"
_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "rate_limited",
    503: "unavailable",
}
_FHIR_ISSUE = {401: "login", 403: "forbidden", 413: "too-long", 429: "throttled"}


def error_body(
    code: str, message: str, details: list[Any] | None = None
) -> dict[str, Any]:
    """Build the API's one error shape."""
    return {"error": {"code": code, "message": message, "details": details or []}}


def _respond(
    request: Request,
    status: int,
    code: str,
    message: str,
    details: list[Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    if request.url.path.startswith(FHIR_PREFIX):
        outcome = {
            "resourceType": "OperationOutcome",
            "issue": [
                {
                    "severity": "error",
                    "code": _FHIR_ISSUE.get(status, "processing"),
                    "diagnostics": message,
                }
            ],
        }
        return JSONResponse(
            outcome, status, headers=headers, media_type="application/fhir+json"
        )
    return JSONResponse(error_body(code, message, details), status, headers=headers)


def install(app: FastAPI) -> None:
    """Register the handlers on ``app``."""

    @app.exception_handler(AuthError)
    async def _auth(request: Request, exc: AuthError) -> JSONResponse:
        log.warning("%s %s refused: %s", request.method, request.url.path, exc.message)
        challenge = f'Bearer error="{exc.code}"'
        return _respond(
            request,
            exc.status,
            exc.code,
            exc.message,
            headers={"WWW-Authenticate": challenge},
        )

    @app.exception_handler(RateLimitError)
    async def _rate(request: Request, exc: RateLimitError) -> JSONResponse:
        retry = str(max(1, round(exc.retry_after)))
        return _respond(
            request,
            429,
            "rate_limited",
            "too many requests",
            headers={"Retry-After": retry},
        )

    @app.exception_handler(StoreError)
    async def _store(request: Request, exc: StoreError) -> JSONResponse:
        # The route template, never the URL: paths and queries may name a patient.
        route = request.scope.get("route")
        where = getattr(route, "path", "?")
        log.warning("%s %s: %s", request.method, where, exc)
        return _respond(request, 503, "unavailable", "database unavailable")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "error")
        return _respond(
            request, exc.status_code, code, str(exc.detail), headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", "")}
            for e in exc.errors()
        ]
        log.info("%s %s: invalid request", request.method, request.url.path)
        return _respond(
            request, 422, "invalid_request", "request validation failed", details
        )


class BodyLimit:
    """ASGI middleware refusing request bodies over ``max_bytes`` with 413."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if (
            declared is not None
            and declared.isdigit()
            and int(declared) > self.max_bytes
        ):
            await self._refuse(scope, receive, send)
            return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLargeError
            return message

        try:
            await self.app(scope, counting_receive, send)
        except _BodyTooLargeError:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        log.warning(
            "refused a body over %d bytes on %s", self.max_bytes, scope.get("path")
        )
        request = Request(scope, receive)
        response = _respond(
            request, 413, "payload_too_large", f"body exceeds {self.max_bytes} bytes"
        )
        await response(scope, receive, send)


class _BodyTooLargeError(Exception):
    pass
