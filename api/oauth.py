"""The OAuth2 token endpoint (client-credentials grant, RFC 6749 section 4.4)."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any
from urllib.parse import parse_qs, unquote

from fastapi import APIRouter, Body, Depends, Header, Request
from fastapi.responses import JSONResponse

from api.auth import ADMIN, AuthError, Principal
from api.security import auditor, require, tokens

router = APIRouter(tags=["auth"])


def _basic(header: str | None) -> tuple[str, str] | None:
    if not header or not header.lower().startswith("basic "):
        return None
    try:
        raw = base64.b64decode(header[6:], validate=True).decode()
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise AuthError(401, "invalid_client", "malformed Basic credentials") from exc
    user, sep, secret = raw.partition(":")
    if not sep:
        raise AuthError(401, "invalid_client", "malformed Basic credentials")
    return unquote(user), unquote(secret)


@router.post("/oauth/token")
async def token(
    request: Request, authorization: Annotated[str | None, Header()] = None
) -> JSONResponse:
    """Issue an access token to a registered client (client-credentials grant)."""
    if not request.headers.get("content-type", "").startswith(
        "application/x-www-form-urlencoded"
    ):
        return _oauth_error(
            400, "invalid_request", "use application/x-www-form-urlencoded"
        )
    form = {
        k: v[0]
        for k, v in parse_qs((await request.body()).decode(errors="replace")).items()
    }
    if form.get("grant_type") != "client_credentials":
        return _oauth_error(400, "unsupported_grant_type", "only client_credentials")
    creds = _basic(authorization) or (
        form.get("client_id", ""),
        form.get("client_secret", ""),
    )
    requested = form["scope"].split() if form.get("scope") else None
    try:
        access, granted = tokens(request).client_credentials(
            creds[0], creds[1], requested
        )
    except AuthError as exc:
        await auditor(request).arecord(
            creds[0] or "?", "token", "/oauth/token", "denied"
        )
        return _oauth_error(exc.status, exc.code, exc.message)
    await auditor(request).arecord(creds[0], "token", "/oauth/token")
    ttl = request.app.state.bridge.settings.auth.token_ttl_seconds
    body = {
        "access_token": access,
        "token_type": "Bearer",
        "expires_in": ttl,
        "scope": " ".join(granted),
    }
    return JSONResponse(body, headers={"Cache-Control": "no-store"})


def _oauth_error(status: int, code: str, description: str) -> JSONResponse:
    # RFC 6749 section 5.2 fixes this shape for the token endpoint.
    return JSONResponse({"error": code, "error_description": description}, status)


@router.post("/api/v1/admin/revoke")
async def revoke(
    request: Request,
    principal: Annotated[Principal, Depends(require(ADMIN))],
    body: Annotated[dict[str, Any], Body(examples=[{"token": "eyJ..."}])],
) -> dict[str, str]:
    """Revoke an access token (by the token itself or its ``jti``)."""
    target = body.get("token") or body.get("jti")
    if not isinstance(target, str) or not target:
        raise AuthError(400, "invalid_request", "give `token` or `jti`")
    jti = tokens(request).revoke(target)
    await auditor(request).arecord(principal.subject, "revoke", f"token:{jti[:8]}")
    return {"revoked": jti}
