"""Agent settings: ``KIOSK_`` environment variables over a TOML file.

See ``deploy/agent.example.toml`` for every option with its default.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from vitals_contract import KIOSK_ID_PATTERN
from vitals_contract.settings import MqttSettings, TomlEnvSettings


class AgentSettings(TomlEnvSettings):
    """Everything the kiosk agent reads at start-up."""

    model_config = SettingsConfigDict(
        env_prefix="KIOSK_", env_nested_delimiter="__", extra="forbid"
    )

    kiosk_id: str = Field(default="kiosk-1", pattern=KIOSK_ID_PATTERN)
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    camera: str = Field(
        default="0",
        description=(
            "Camera index (0), video file path, rtsp:// or http:// URL, or "
            "'synthetic' for the built-in face with a known pulse."
        ),
    )
    camera_retry_max_seconds: float = Field(default=30.0, gt=0)
    outbox_path: Path = Path("var/outbox.db")
    outbox_max_messages: int = Field(default=100_000, ge=10)
    outbox_max_age_hours: float = Field(default=24 * 7, gt=0)
    confirm_timeout_seconds: float = Field(
        default=15.0,
        gt=0,
        description="Resend a published message not confirmed by the bridge by then.",
    )
    heartbeat_seconds: float = Field(default=10.0, gt=0)
    scan_seconds: float = Field(default=30.0, ge=5)
    reading_interval_seconds: float = Field(default=1.0, gt=0)
    auto_scan: bool = Field(
        default=True, description="Start a scan whenever a face appears."
    )
    auto_scan_cooldown_seconds: float = Field(default=5.0, ge=0)
    face_lost_abort_seconds: float = Field(default=3.0, gt=0)
    vitals_method: str = Field(default="pos", pattern="^(pos|chrom|green)$")
