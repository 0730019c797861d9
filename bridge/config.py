"""Bridge and API settings: ``VITALS_`` environment variables over a TOML file."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Literal, Self

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    model_validator,
)
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
        default=1000,
        ge=1,
        le=10_000,
        description="Most messages in one commit. The broker's in-flight limit for "
        "the bridge should be at least twice this, so the next batch fills while "
        "one commits.",
    )
    batch_max_wait_ms: float = Field(
        default=0.0,
        ge=0,
        le=5_000,
        description=(
            "Longest a batch waits for more messages after its first. 0 commits "
            "what has arrived at once; batches still grow while a commit runs."
        ),
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


class RelaySettings(BaseModel):
    """Outbound FHIR relay: completed scans pushed to an external FHIR R4 server."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        default=False,
        description="Push every completed scan to `base_url` as a transaction Bundle.",
    )
    base_url: str | None = Field(
        default=None,
        pattern=r"^https?://\S+$",
        description="FHIR base of the receiving server (the transaction is POSTed "
        "there), e.g. https://ehr.example/fhir; required when enabled.",
    )
    bearer_token: SecretStr | None = Field(
        default=None,
        description="Static bearer token for the receiving server; unset sends none "
        "(or uses the client-credentials grant below). Never logged.",
    )
    token_url: str | None = Field(
        default=None,
        pattern=r"^https?://\S+$",
        description="OAuth2 token endpoint for the client-credentials grant; set it "
        "with client_id and client_secret instead of bearer_token.",
    )
    client_id: str | None = Field(
        default=None, description="OAuth2 client id of the client-credentials grant."
    )
    client_secret: SecretStr | None = Field(
        default=None,
        description="OAuth2 client secret (sent as HTTP Basic); never logged.",
    )
    scope: str | None = Field(
        default=None,
        description="Scope requested with the grant, e.g. `system/Observation.write "
        "system/Device.write`; unset requests none.",
    )
    ca_file: Path | None = Field(
        default=None,
        description="CA bundle (PEM) that signs the server's certificate; unset uses "
        "the system's trust store.",
    )
    connect_timeout_seconds: float = Field(
        default=5.0, gt=0, le=300, description="Longest wait to open a connection."
    )
    request_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        le=600,
        description="Longest wait for one whole request (token or transaction); "
        "past it the attempt counts as failed and is retried.",
    )
    backoff_initial_seconds: float = Field(
        default=2.0,
        gt=0,
        description="Delay before the first retry; it doubles with each failed "
        "attempt, randomised to 50-100 % of its value (jitter).",
    )
    backoff_max_seconds: float = Field(
        default=600.0, gt=0, description="Cap of the retry delay."
    )
    max_attempts: int | None = Field(
        default=None,
        ge=1,
        description="Attempts after which a transient failure becomes permanent; "
        "unset retries for ever (at most every backoff_max_seconds).",
    )
    batch_size: int = Field(
        default=10,
        ge=1,
        le=500,
        description="Scans one worker claims per poll and sends concurrently.",
    )
    poll_interval_seconds: float = Field(
        default=2.0,
        gt=0,
        le=3_600,
        description="How often a worker looks for newly completed scans and due "
        "retries when it is idle.",
    )
    settle_timeout_seconds: float = Field(
        default=300.0,
        ge=0,
        description="How long a completed scan waits for its kiosk's earlier "
        "messages (its final readings) to be stored; after that it is sent with "
        "what has arrived.",
    )
    since: AwareDatetime | None = Field(
        default=None,
        description="Relay only scans completed at or after this instant (kiosk "
        "clock); unset relays every completed scan still stored.",
    )
    patient_identifier_system: str | None = Field(
        default=None,
        description="Identifier system under which the receiving server knows the "
        "scan's patient_ref (Observation.subject is the conditional reference "
        "Patient?identifier=<system>|<patient_ref>); unset uses "
        "urn:kiosk-vitals:patient-ref.",
    )

    @model_validator(mode="after")
    def _check_complete(self) -> Self:
        if self.enabled and self.base_url is None:
            raise ValueError("relay.enabled needs relay.base_url")
        if self.token_url is not None:
            if self.client_id is None or self.client_secret is None:
                raise ValueError("relay.token_url needs client_id and client_secret")
            if self.bearer_token is not None:
                raise ValueError("set relay.bearer_token or relay.token_url, not both")
        return self


class FhirSubscriptionSettings(BaseModel):
    """Topic-based FHIR Subscriptions (R4 backport) with the websocket channel."""

    model_config = ConfigDict(extra="forbid")

    binding_token_ttl_seconds: int = Field(
        default=120,
        ge=5,
        le=3_600,
        description="Lifetime of a $get-ws-binding-token token; each token binds "
        "one socket once.",
    )
    heartbeat_min_seconds: int = Field(
        default=1,
        ge=1,
        description="Shortest heartbeat period a Subscription may ask for.",
    )
    heartbeat_max_seconds: int = Field(
        default=3_600,
        ge=1,
        description="Longest heartbeat period a Subscription may ask for.",
    )
    max_per_owner: int = Field(
        default=50,
        ge=1,
        le=10_000,
        description="Most Subscriptions one client (token subject) may hold.",
    )
    events_kept: int = Field(
        default=10_000,
        ge=10,
        description="Events kept per Subscription for $events; older ones are "
        "purged as new ones are numbered.",
    )
    events_page_max: int = Field(
        default=1_000,
        ge=1,
        le=10_000,
        description="Most events one $events call returns.",
    )
    pending_max: int = Field(
        default=100_000,
        ge=100,
        description="Matched readings waiting to be numbered before new matches are "
        "dropped (and logged).",
    )
    reload_seconds: float = Field(
        default=2.0,
        gt=0,
        le=300,
        description="How often each API process re-reads the Subscriptions, so those "
        "created or deleted through another process take effect.",
    )
    socket_queue_size: int = Field(
        default=1_000,
        ge=10,
        description="Notifications buffered per socket before it is closed as too "
        "slow (the events stay available to $events).",
    )


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

    @model_validator(mode="after")
    def _touch_more_often_than_stale(self) -> Self:
        if self.stale_after_seconds <= 2 * self.sweep_interval_seconds:
            raise ValueError(
                "export.stale_after_seconds must exceed twice "
                "export.sweep_interval_seconds, or live jobs look dead"
            )
        return self


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
    relay: RelaySettings = Field(default_factory=RelaySettings)
    fhir_subscriptions: FhirSubscriptionSettings = Field(
        default_factory=FhirSubscriptionSettings
    )
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
