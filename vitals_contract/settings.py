"""Settings plumbing both services share: a TOML file under environment variables.

Each service has one settings class with its own environment prefix. Values come,
highest priority first, from environment variables, then the TOML file, then the
class defaults.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, SecretStr
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

    model_config = ConfigDict(extra="forbid")

    host: str = Field(default="127.0.0.1", description="Broker host name or address.")
    port: int = Field(
        default=1883, ge=1, le=65535, description="Broker port (8883 for TLS)."
    )
    username: str | None = Field(
        default=None, description="MQTT user; a kiosk's is its kiosk id."
    )
    password: SecretStr | None = Field(
        default=None, description="MQTT password; never logged."
    )
    keepalive_seconds: int = Field(
        default=30, ge=5, le=3600, description="MQTT keep-alive interval."
    )
    protocol: str = Field(
        default="auto",
        pattern="^(auto|3.1.1|5)$",
        description="auto tries MQTT 5 and falls back to 3.1.1 (amqtt speaks 3.1.1).",
    )
    tls_ca_file: Path | None = Field(
        default=None, description="CA bundle; setting it turns TLS on."
    )
    tls_cert_file: Path | None = Field(default=None, description="Client certificate.")
    tls_key_file: Path | None = Field(
        default=None, description="Key of the client certificate."
    )
    root_topic: str = Field(
        default="vitals/v1", description="Topic root; change only to isolate tests."
    )


def render_example(settings_cls: type[BaseModel], env_prefix: str) -> str:
    """Render every option of ``settings_cls`` as a commented TOML file of defaults.

    The text comes from the fields' descriptions, so each option is documented once,
    in code, and the example files are regenerated from it.
    """
    lines: list[str] = []
    _render_model(settings_cls, env_prefix, [], lines)
    return "\n".join(lines).strip() + "\n"


def _render_model(
    model: type[BaseModel], env_prefix: str, path: list[str], lines: list[str]
) -> None:
    nested: list[tuple[str, type[BaseModel]]] = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            nested.append((name, annotation))
            continue
        env = env_prefix + "__".join([*path, name]).upper()
        if field.description:
            lines.append(f"# {field.description}")
        lines.append(f"# env: {env}")
        default = field.get_default(call_default_factory=True)
        if field.default_factory is not None and isinstance(default, str):
            lines.append(f"# {name} = (derived at start-up)")
        elif isinstance(default, SecretStr):
            lines.append(f'# {name} = "<secret: set it here or in {env}>"')
        elif default is None:
            lines.append(f"# {name} =")
        else:
            lines.append(f"{name} = {_toml_value(default)}")
        lines.append("")
    for name, sub in nested:
        lines.append(f"[{'.'.join([*path, name])}]")
        if sub.__doc__:
            lines.append(f"# {sub.__doc__.strip().splitlines()[0]}")
        lines.append("")
        _render_model(sub, env_prefix, [*path, name], lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'
