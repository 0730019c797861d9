"""Bridge and API settings: ``VITALS_`` environment variables over a TOML file."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from vitals_contract.settings import MqttSettings, TomlEnvSettings


class IngestSettings(BaseModel):
    """How the bridge batches MQTT messages into database commits."""

    model_config = ConfigDict(extra="forbid")

    client_id: str = Field(
        default_factory=lambda: f"vitals-bridge-{socket.gethostname()}",
        description="MQTT client id, unique per bridge and stable across restarts so "
        "the broker keeps its session; defaults to one derived from the host name.",
    )
    batch_max_messages: int = Field(
        default=500, ge=1, le=10_000, description="Most messages in one commit."
    )
    batch_max_wait_ms: float = Field(
        default=2.0,
        ge=0,
        le=5_000,
        description="Longest a message waits for its batch to fill before commit.",
    )
    kiosk_messages_per_second: float = Field(
        default=200.0,
        gt=0,
        description="Per-kiosk ingest rate; excess messages are acknowledged but not "
        "stored, so the kiosk resends them after its confirmation timeout.",
    )
    kiosk_burst: int = Field(default=2_000, ge=1, description="Per-kiosk burst.")
    shared_group: str | None = Field(
        default="bridges",
        pattern=r"^[A-Za-z0-9_-]+$",
        description="Shared-subscription group for several bridges on an MQTT 5 "
        "broker; unset, or a 3.1.1 broker, means one bridge takes all.",
    )
    retry_max_seconds: float = Field(
        default=10.0, ge=0.1, description="Longest back-off between failed commits."
    )


class HttpSettings(BaseModel):
    """Where the API listens."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field(default="127.0.0.1", description="Address the API binds.")
    port: int = Field(default=8000, ge=0, le=65535, description="Port the API binds.")
    tls_cert_file: Path | None = Field(
        default=None,
        description="Certificate (PEM) for HTTPS and WSS; unset: plain HTTP.",
    )
    tls_key_file: Path | None = Field(
        default=None, description="Key of that certificate."
    )


class HubSettings(BaseModel):
    """Live WebSocket fan-out."""

    model_config = ConfigDict(extra="forbid")

    client_queue_size: int = Field(
        default=2_000,
        ge=10,
        description="Messages buffered per client before it is cut off as too slow.",
    )
    replay_page_size: int = Field(
        default=1_000,
        ge=10,
        le=10_000,
        description="Readings per database page when replaying a resumed client.",
    )


class DashboardSettings(BaseModel):
    """What the browser dashboard is told at start-up."""

    model_config = ConfigDict(extra="forbid")

    stale_seconds: float = Field(
        default=30.0,
        gt=0,
        description="Mark a kiosk's values stale after this long without a reading.",
    )


DEMO_JWT_SECRET = "demo-only-secret-change-me-0123456789abcdef"  # noqa: S105
MIN_SECRET_LENGTH = 32


class ApiClient(BaseModel):
    """A machine client (EHR, integration) allowed the client-credentials grant."""

    model_config = ConfigDict(extra="forbid")

    client_id: str = Field(min_length=1, max_length=128)
    secret_hash: str = Field(
        description="Argon2 hash of the client secret: `vitals-bridge hash-secret`."
    )
    scopes: list[str] = Field(default_factory=list)


class AuthSettings(BaseModel):
    """OAuth2 bearer tokens (JWT, HS256) for every data endpoint."""

    model_config = ConfigDict(extra="forbid")

    jwt_secret: SecretStr = Field(
        default=SecretStr(DEMO_JWT_SECRET),
        description="HMAC key for tokens; at least 32 characters; never the default "
        "outside the demo.",
    )
    issuer: str = Field(default="kiosk-vitals", description="Token `iss` claim.")
    audience: str = Field(default="kiosk-vitals-api", description="Token `aud` claim.")
    token_ttl_seconds: int = Field(
        default=900, ge=60, le=86_400, description="Lifetime of issued tokens."
    )
    clients: list[ApiClient] = Field(
        default_factory=list, description="Clients of the client-credentials grant."
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Browser origins allowed cross-origin; empty allows none.",
    )


class LimitSettings(BaseModel):
    """Input limits of the HTTP API."""

    model_config = ConfigDict(extra="forbid")

    max_body_bytes: int = Field(
        default=1_048_576, ge=1024, description="Largest accepted request body."
    )
    requests_per_second: float = Field(
        default=50.0, gt=0, description="Sustained request rate per client."
    )
    burst: int = Field(default=200, ge=1, description="Requests a client may burst.")


class ExportSettings(BaseModel):
    """FHIR Bulk Data ``$export``: background jobs writing NDJSON files."""

    model_config = ConfigDict(extra="forbid")

    directory: Path = Field(
        default=Path("var/exports"),
        description="Where export files are written, one sub-directory per job. "
        "Several API replicas must share it (e.g. a shared volume): any replica "
        "may answer a status or file request.",
    )
    max_resources_per_file: int = Field(
        default=100_000,
        ge=1,
        description="Most resources in one NDJSON file; larger exports are split.",
    )
    page_size: int = Field(
        default=2_000,
        ge=1,
        le=50_000,
        description="Readings read from the database per page (bounds memory).",
    )
    retention_seconds: float = Field(
        default=3_600.0,
        gt=0,
        description="How long a finished (or failed) job and its files are kept; "
        "then both are deleted.",
    )
    max_jobs_per_client: int = Field(
        default=2,
        ge=1,
        description="Queued or running jobs one client may have; more get 429.",
    )
    max_running_jobs: int = Field(
        default=2,
        ge=1,
        description="Jobs one API process runs at once; the rest wait queued.",
    )
    retry_after_seconds: int = Field(
        default=2,
        ge=1,
        description="Retry-After a status request answers while a job runs.",
    )
    stale_after_seconds: float = Field(
        default=60.0,
        gt=0,
        description="A queued or running job not touched for this long (its "
        "process died or restarted) is marked failed.",
    )
    sweep_interval_seconds: float = Field(
        default=10.0,
        gt=0,
        description="How often each process touches its jobs, fails stale ones "
        "and deletes expired ones.",
    )


class BridgeSettings(TomlEnvSettings):
    """Everything the bridge and the API read at start-up."""

    model_config = SettingsConfigDict(
        env_prefix="VITALS_", env_nested_delimiter="__", extra="forbid"
    )

    database_url: str = Field(
        default="sqlite:///var/vitals.db",
        description="SQLAlchemy URL: sqlite:///path or postgresql+psycopg://...",
    )
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    hub: HubSettings = Field(default_factory=HubSettings)
    dashboard: DashboardSettings = Field(default_factory=DashboardSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    export: ExportSettings = Field(default_factory=ExportSettings)
    environment: Literal["demo", "production"] = Field(
        default="production",
        description="`demo` accepts the built-in demo secret; `production` refuses it.",
    )
    retention_days: float | None = Field(
        default=None,
        gt=0,
        description="Delete readings, scan events and dead letters older than this; "
        "unset keeps everything. Alerts and the audit log are kept.",
    )
    alert_rules_file: Path | None = Field(
        default=None,
        description="TOML alert rules; unset uses the packaged adult NEWS2 rules.",
    )
    migrate_on_start: bool = Field(
        default=True,
        description="Apply migrations at start-up; production runs them separately.",
    )

    @model_validator(mode="after")
    def _refuse_default_secrets(self) -> Self:
        secret = self.auth.jwt_secret.get_secret_value()
        if self.environment != "demo" and secret == DEMO_JWT_SECRET:
            raise ValueError(
                "auth.jwt_secret is the demo default; set VITALS_AUTH__JWT_SECRET"
            )
        if len(secret) < MIN_SECRET_LENGTH:
            raise ValueError(f"auth.jwt_secret needs {MIN_SECRET_LENGTH}+ characters")
        return self

    def sqlite_path(self) -> Path | None:
        """Return the SQLite file path, or None for other databases."""
        prefix = "sqlite:///"
        if self.database_url.startswith(prefix):
            return Path(self.database_url[len(prefix) :])
        return None
