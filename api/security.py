"""Request guards: bearer-token scopes, per-client rate limits, audit records."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine, insert
from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import HTTPConnection

from api.auth import AuthError, Principal, TokenService
from bridge.store.models import AuditEvent

log = logging.getLogger(__name__)

AUDIT_BATCH = 500
bearer = HTTPBearer(auto_error=False, description="OAuth2 access token (JWT)")


class RateLimitError(Exception):
    """Too many requests from one client."""

    def __init__(self, retry_after: float) -> None:
        super().__init__("rate limit exceeded")
        self.retry_after = retry_after


class Auditor:
    """Writes who read or changed what, in the background, in batches.

    A request only queues its event; a writer thread inserts what has queued up in
    one transaction, so auditing costs a request microseconds, not a commit. Events
    still queued when the process is killed are lost (those of the last few
    milliseconds); a clean shutdown flushes them.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._queue: queue.SimpleQueue[dict[str, Any] | threading.Event | None] = (
            queue.SimpleQueue()
        )
        self._thread = threading.Thread(
            target=self._write_loop, name="audit", daemon=True
        )
        self._thread.start()

    def record(
        self,
        actor: str,
        action: str,
        resource: str,
        outcome: str = "ok",
        detail: str | None = None,
    ) -> None:
        """Queue one audit event."""
        self._queue.put(
            {
                "at": datetime.now(UTC),
                "actor": actor[:128],
                "action": action[:32],
                "resource": resource[:256],
                "outcome": outcome[:16],
                "detail": detail[:500] if detail else None,
            }
        )

    async def arecord(
        self, actor: str, action: str, resource: str, outcome: str = "ok"
    ) -> None:
        """Queue one audit event from async code."""
        self.record(actor, action, resource, outcome)

    def sync(self, timeout: float = 5.0) -> None:
        """Wait until everything queued so far is written (for readers of the log)."""
        written = threading.Event()
        self._queue.put(written)
        written.wait(timeout)

    def flush(self, timeout: float = 5.0) -> None:
        """Write everything queued so far and stop the writer."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _write_loop(self) -> None:
        while True:
            first = self._queue.get()
            rows = [first]
            while len(rows) < AUDIT_BATCH:
                try:
                    rows.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            events = [r for r in rows if isinstance(r, dict)]
            if events:
                self._insert(events)
            for r in rows:
                if isinstance(r, threading.Event):
                    r.set()
            if None in rows:
                return

    def _insert(self, events: list[dict[str, Any]]) -> None:
        try:
            with self._engine.begin() as conn:
                conn.execute(insert(AuditEvent), events)
        except SQLAlchemyError as exc:
            log.error(
                "audit write of %d events failed: %s", len(events), type(exc).__name__
            )


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
