"""OAuth2 bearer tokens: issue, verify, scope checks, revocation.

Tokens are JWTs signed with HS256 under ``auth.jwt_secret``. They reach us as
``Authorization: Bearer ...`` on HTTP, and on WebSockets as the subprotocol
``bearer.<token>`` offered beside ``vitals.v1`` (browsers cannot set headers on a
WebSocket, and a token in the URL would land in access logs).

Scopes:

==========================  ==================================================
``vitals.read``             kiosks, readings, alerts, the live feeds
``vitals.alerts.ack``       acknowledge alerts
``vitals.patient.read``     see patient references on scans
``vitals.metrics``          Prometheus metrics
``vitals.ingest``           upload readings and scans over HTTP
``vitals.admin``            audit log, token revocation, everything above
``system/<Type>.read``      FHIR reads (SMART backend services), or ``system/*.read``
``system/<Type>.write``     FHIR writes (Subscription), or ``system/*.write``
==========================  ==================================================
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import jwt
from pwdlib import PasswordHash
from sqlalchemy import Engine, delete, select
from sqlalchemy.exc import SQLAlchemyError

from bridge.config import AuthSettings
from bridge.store.db import dialect_insert
from bridge.store.models import RevokedToken

log = logging.getLogger(__name__)

ALGORITHM = "HS256"
ADMIN = "vitals.admin"
READ = "vitals.read"
ACK = "vitals.alerts.ack"
PATIENT_READ = "vitals.patient.read"
METRICS_READ = "vitals.metrics"
INGEST = "vitals.ingest"
ALL_SCOPES = (
    READ,
    ACK,
    PATIENT_READ,
    METRICS_READ,
    ADMIN,
    "system/*.read",
    "system/*.write",
)
REVOCATION_REFRESH_SECONDS = 5.0

_hasher = PasswordHash.recommended()


class AuthError(Exception):
    """A request without valid credentials (401) or without the scope (403)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, with what rights, until when."""

    subject: str
    scopes: frozenset[str]
    jti: str
    expires_at: float  # Unix seconds

    def allows(self, scope: str) -> bool:
        """Tell whether this principal holds ``scope`` (admins hold every scope)."""
        if ADMIN in self.scopes or scope in self.scopes:
            return True
        if scope.startswith("system/"):
            access = scope.rsplit(".", 1)[-1]
            return f"system/*.{access}" in self.scopes
        return False


def sign_token(
    settings: AuthSettings,
    subject: str,
    scopes: list[str],
    ttl_seconds: int | None = None,
) -> str:
    """Sign an access token with the configured key."""
    now = int(time.time())
    claims = {
        "iss": settings.issuer,
        "aud": settings.audience,
        "sub": subject,
        "scope": " ".join(sorted(set(scopes))),
        "iat": now,
        "exp": now + (ttl_seconds or settings.token_ttl_seconds),
        "jti": secrets.token_hex(16),
    }
    return jwt.encode(
        claims, settings.jwt_secret.get_secret_value(), algorithm=ALGORITHM
    )


def hash_secret(secret: str) -> str:
    """Hash a client secret for the settings file."""
    return _hasher.hash(secret)


class TokenService:
    """Issues and verifies tokens; keeps the revocation list in the database."""

    def __init__(self, settings: AuthSettings, engine: Engine) -> None:
        self._settings = settings
        self._engine = engine
        self._secret = settings.jwt_secret.get_secret_value()
        self._revoked: set[str] = set()
        self._revoked_loaded_at = 0.0
        self._lock = threading.Lock()

    # -- issue ---------------------------------------------------------------------

    def issue(
        self, subject: str, scopes: list[str], ttl_seconds: int | None = None
    ) -> str:
        """Sign a token for ``subject`` with ``scopes``."""
        return sign_token(self._settings, subject, scopes, ttl_seconds)

    def client_credentials(
        self, client_id: str, client_secret: str, requested: list[str] | None
    ) -> tuple[str, list[str]]:
        """Run the client-credentials grant; return the token and granted scopes."""
        client = next(
            (c for c in self._settings.clients if c.client_id == client_id), None
        )
        # Verify against a dummy hash when the client is unknown, to keep timing flat.
        known_hash = client.secret_hash if client else _DUMMY_HASH
        valid = _hasher.verify(client_secret, known_hash)
        if client is None or not valid:
            raise AuthError(401, "invalid_client", "unknown client or wrong secret")
        granted = requested if requested else list(client.scopes)
        if not set(granted) <= set(client.scopes):
            raise AuthError(
                400, "invalid_scope", "scope exceeds what the client may have"
            )
        return self.issue(client_id, granted), granted

    # -- verify ----------------------------------------------------------------------

    def verify(self, token: str) -> Principal:
        """Check signature, issuer, audience, expiry and revocation."""
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
                audience=self._settings.audience,
                issuer=self._settings.issuer,
                options={"require": ["exp", "sub", "jti"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise AuthError(401, "invalid_token", "token expired") from exc
        except jwt.PyJWTError as exc:
            raise AuthError(401, "invalid_token", "token invalid") from exc
        jti = str(claims["jti"])
        if self.is_revoked(jti):
            raise AuthError(401, "invalid_token", "token revoked")
        return Principal(
            subject=str(claims["sub"]),
            scopes=frozenset(str(claims.get("scope", "")).split()),
            jti=jti,
            expires_at=float(claims["exp"]),
        )

    # -- revocation --------------------------------------------------------------------

    def revoke(self, token_or_jti: str) -> str:
        """Revoke a token (given whole or by ``jti``); return the ``jti``."""
        jti, expires = token_or_jti, time.time() + self._settings.token_ttl_seconds
        if token_or_jti.count(".") == 2:
            claims = jwt.decode(token_or_jti, options={"verify_signature": False})
            jti, expires = str(claims["jti"]), float(claims["exp"])
        insert = dialect_insert(self._engine)
        row = {
            "jti": jti,
            "revoked_at": datetime.now(UTC),
            "expires_at": datetime.fromtimestamp(expires, UTC),
        }
        with self._engine.begin() as conn:
            conn.execute(insert(RevokedToken).values(row).on_conflict_do_nothing())
            conn.execute(
                delete(RevokedToken).where(RevokedToken.expires_at < datetime.now(UTC))
            )
        with self._lock:
            self._revoked.add(jti)
        log.info("token %s… revoked", jti[:8])
        return jti

    def is_revoked(self, jti: str) -> bool:
        """Tell whether ``jti`` is revoked; the list is re-read every few seconds."""
        now = time.monotonic()
        if now - self._revoked_loaded_at > REVOCATION_REFRESH_SECONDS:
            try:
                with self._engine.connect() as conn:
                    fresh = set(conn.execute(select(RevokedToken.jti)).scalars())
            except SQLAlchemyError:
                log.warning(
                    "could not refresh the revocation list; using the cached one"
                )
            else:
                with self._lock:
                    self._revoked = fresh
                    self._revoked_loaded_at = now
        with self._lock:
            return jti in self._revoked


_DUMMY_HASH = _hasher.hash(secrets.token_hex(16))
