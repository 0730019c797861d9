"""Bridge and API settings: ``VITALS_`` environment variables over a TOML file."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field
from pydantic_settings import SettingsConfigDict

from vitals_contract.settings import MqttSettings, TomlEnvSettings


class IngestSettings(BaseModel):
    """How the bridge batches MQTT messages into database commits."""

    client_id: str = Field(
        default="vitals-bridge",
        description="MQTT client id; keep it stable so the broker keeps the session.",
    )
    batch_max_messages: int = Field(
        default=500, ge=1, le=10_000, description="Most messages in one commit."
    )
    batch_max_wait_ms: float = Field(
        default=20.0,
        ge=0,
        le=5_000,
        description="Longest a message waits for its batch to fill before commit.",
    )
    retry_max_seconds: float = Field(
        default=10.0, ge=0.1, description="Longest back-off between failed commits."
    )


class HttpSettings(BaseModel):
    """Where the API listens."""

    host: str = Field(default="127.0.0.1", description="Address the API binds.")
    port: int = Field(default=8000, ge=0, le=65535, description="Port the API binds.")


class HubSettings(BaseModel):
    """Live WebSocket fan-out."""

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

    stale_seconds: float = Field(
        default=30.0,
        gt=0,
        description="Mark a kiosk's values stale after this long without a reading.",
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
    alert_rules_file: Path | None = Field(
        default=None,
        description="TOML alert rules; unset uses the packaged adult NEWS2-based rules.",
    )
    migrate_on_start: bool = Field(
        default=True,
        description="Apply migrations at start-up; production runs them separately.",
    )

    def sqlite_path(self) -> Path | None:
        """Return the SQLite file path, or None for other databases."""
        prefix = "sqlite:///"
        if self.database_url.startswith(prefix):
            return Path(self.database_url[len(prefix) :])
        return None
