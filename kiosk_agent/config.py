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

    kiosk_id: str = Field(
        default="kiosk-1",
        pattern=KIOSK_ID_PATTERN,
        description="This kiosk's id: a topic level and its MQTT user name.",
    )
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    camera: str = Field(
        default="0",
        description=(
            "Camera index (0), video file path, rtsp:// or http:// URL, or "
            "'synthetic' for the built-in face with a known pulse."
        ),
    )
    camera_retry_max_seconds: float = Field(
        default=30.0, gt=0, description="Longest back-off between camera reopen tries."
    )
    outbox_path: Path = Field(
        default=Path("var/outbox.db"),
        description="SQLite file holding unconfirmed messages and the seq counter.",
    )
    outbox_max_messages: int = Field(
        default=100_000,
        ge=10,
        description="Outbox bound; past it the oldest are dropped, logged and counted.",
    )
    outbox_max_age_hours: float = Field(
        default=24 * 7,
        gt=0,
        description="Outbox age bound; older messages are dropped, logged and counted.",
    )
    confirm_timeout_seconds: float = Field(
        default=15.0,
        gt=0,
        description="Resend a published message not confirmed by the bridge by then.",
    )
    heartbeat_seconds: float = Field(
        default=10.0, gt=0, description="Period of the heartbeat (QoS 0)."
    )
    scan_seconds: float = Field(default=30.0, ge=5, description="Length of one scan.")
    reading_interval_seconds: float = Field(
        default=1.0, gt=0, description="Period of partial readings during a scan."
    )
    auto_scan: bool = Field(
        default=True, description="Start a scan whenever a face appears."
    )
    auto_scan_cooldown_seconds: float = Field(
        default=5.0, ge=0, description="Pause after a scan before the next auto scan."
    )
    face_lost_abort_seconds: float = Field(
        default=3.0, gt=0, description="Abort a scan when the face is gone this long."
    )
    vitals_method: str = Field(
        default="pos",
        pattern="^(pos|chrom|green)$",
        description="rPPG method: pos (default), chrom or green.",
    )
