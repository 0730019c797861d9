"""Settings plumbing both services share: a TOML file under environment variables.

Each service has one settings class with its own environment prefix. Values come,
highest priority first, from environment variables, then the TOML file, then the
class defaults.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Self

from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource


class TomlEnvSettings(BaseSettings):
    """Base for service settings loaded from a TOML file plus the environment."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file arrives as init arguments; the environment overrides it.
        return env_settings, init_settings, file_secret_settings

    @classmethod
    def load(cls, toml_file: Path | None = None, **overrides: Any) -> Self:
        """Read ``toml_file`` (if any), apply ``overrides``, then the environment."""
        values: dict[str, Any] = {}
        if toml_file is not None:
            with toml_file.open("rb") as fh:
                values = tomllib.load(fh)
        values.update(overrides)
        return cls(**values)


class MqttSettings(BaseModel):
    """How to reach the MQTT broker."""

    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    username: str | None = None
    password: SecretStr | None = None
    keepalive_seconds: int = Field(default=30, ge=5, le=3600)
    protocol: str = Field(
        default="auto",
        pattern="^(auto|3.1.1|5)$",
        description="auto tries MQTT 5 and falls back to 3.1.1 (amqtt speaks 3.1.1).",
    )
    tls_ca_file: Path | None = Field(
        default=None, description="CA bundle; setting it turns TLS on."
    )
    tls_cert_file: Path | None = Field(default=None, description="Client certificate.")
    tls_key_file: Path | None = None
    root_topic: str = "vitals/v1"
