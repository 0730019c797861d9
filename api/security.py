"""Request guards: bearer-token scopes, per-client rate limits, audit records."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine, insert
from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import HTTPConnection

from api.auth import AuthError, Principal, TokenService
from bridge.store.models import AuditEvent

log = logging.getLogger(__name__)

bearer = HTTPBearer(auto_error=False, description="OAuth2 access token (JWT)")


class RateLimitError(Exception):
    """Too many requests from one client."""

    def __init__(self, retry_after: float) -> None:
        super().__init__("rate limit exceeded")
        self.retry_after = retry_after


class Auditor:
    """Writes who read or changed what; failures are logged, never raised."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def record(
        self,
        actor: str,
        action: str,
        resource: str,
        outcome: str = "ok",
        detail: str | None = None,
    ) -> None:
        """Append one audit event."""
        row = {
            "at": datetime.now(UTC),
            "actor": actor[:128],
            "action": action[:32],
            "resource": resource[:256],
            "outcome": outcome[:16],
            "detail": detail[:500] if detail else None,
        }
        try:
            with self._engine.begin() as conn:
                conn.execute(insert(AuditEvent), [row])
        except SQLAlchemyError as exc:
            log.error(
                "audit write failed (%s): %s %s", type(exc).__name__, action, resource
            )

    async def arecord(
        self, actor: str, action: str, resource: str, outcome: str = "ok"
    ) -> None:
        """Append one audit event from async code."""
        await asyncio.to_thread(self.record, actor, action, resource, outcome)


def tokens(conn: HTTPConnection) -> TokenService:
    """Return the app's token service."""
    service: TokenService = conn.app.state.tokens
    return service


def auditor(conn: HTTPConnection) -> Auditor:
    """Return the app's auditor."""
    audit: Auditor = conn.app.state.auditor
    return audit


def require(scope: str) -> Callable[..., Awaitable[Principal]]:
    """Build a dependency admitting only bearers of ``scope`` (and admins)."""

    async def guard(
        conn: HTTPConnection,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> Principal:
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise AuthError(401, "invalid_token", "bearer token required")
        principal = tokens(conn).verify(credentials.credentials)
        if not principal.allows(scope):
            raise AuthError(403, "insufficient_scope", f"requires scope {scope}")
        wait = conn.app.state.limiter.delay(principal.subject)
        if wait:
            raise RateLimitError(wait)
        return principal

    guard.__name__ = f"require_{scope.replace('.', '_').replace('/', '_')}"
    return guard
