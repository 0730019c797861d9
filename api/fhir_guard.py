"""Authorisation for the FHIR facade: SMART-style ``system/<Type>.read`` scopes.

``/fhir/metadata`` stays open, as FHIR clients need it to discover how to sign in.
Every read of a resource is written to the audit log.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials

from api.auth import ADMIN, AuthError, Principal
from api.security import RateLimitError, auditor, bearer, tokens

OPEN_PATHS = frozenset({"/fhir/metadata"})
_READ_METHODS = frozenset({"GET", "HEAD"})
# POSTs that only read: a search, and fetching a subscription's missed events.
_READ_ONLY_POSTS = ("/_search", "/$events")


def required_scope(resource_type: str, method: str, path: str = "") -> str:
    """Name the scope a request on ``resource_type`` needs: ``.read`` or ``.write``."""
    # The audit trail is for administrators, not for every FHIR reader.
    if resource_type == "AuditEvent":
        return ADMIN
    reads = method in _READ_METHODS or (
        method == "POST" and path.endswith(_READ_ONLY_POSTS)
    )
    access = "read" if reads else "write"
    return f"system/{resource_type}.{access}"


async def fhir_guard(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal | None:
    """Admit a caller holding ``system/<Type>.read`` for the requested type."""
    path = request.url.path.rstrip("/")
    if path in OPEN_PATHS:
        return None
    if credentials is None:
        raise AuthError(401, "invalid_token", "bearer token required")
    principal = tokens(request).verify(credentials.credentials)
    resource_type = path.removeprefix("/fhir/").split("/", 1)[0] or "*"
    # System-level operations ($export, ...) name no type in the path: their
    # handlers check the scopes of the types they touch.
    if not resource_type.startswith("$"):
        scope = required_scope(resource_type, request.method, path)
        if not principal.allows(scope):
            raise AuthError(403, "insufficient_scope", f"requires scope {scope}")
    wait = request.app.state.limiter.delay(principal.subject)
    if wait:
        raise RateLimitError(wait)
    await auditor(request).arecord(
        principal.subject, "fhir.read", str(request.url.path)
    )
    return principal
