"""The example config files are generated from the settings classes and load back."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.config import BridgeSettings
from kiosk_agent.config import AgentSettings
from vitals_contract.settings import TomlEnvSettings, render_example

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


@pytest.mark.parametrize(
    ("path", "cls", "prefix", "command"),
    [
        ("agent.example.toml", AgentSettings, "KIOSK_", "kiosk-agent config-example"),
        (
            "bridge.example.toml",
            BridgeSettings,
            "VITALS_",
            "vitals-bridge config-example",
        ),
    ],
)
def test_example_is_current_and_loads_to_the_defaults(
    path: str, cls: type[TomlEnvSettings], prefix: str, command: str
) -> None:
    text = (DEPLOY / path).read_text()
    assert text == render_example(cls, prefix), (
        f"stale: run `{command} > deploy/{path}`"
    )
    # The demo environment accepts the built-in secret the example leaves unset.
    demo = {"environment": "demo"} if cls is BridgeSettings else {}
    assert cls.load(DEPLOY / path, **demo) == cls(**demo)


def test_environment_overrides_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        'kiosk_id = "from-file"\nscan_seconds = 20.0\n[mqtt]\nport = 1884\n'
    )
    monkeypatch.setenv("KIOSK_MQTT__PORT", "8883")
    settings = AgentSettings.load(config)
    assert (settings.kiosk_id, settings.scan_seconds, settings.mqtt.port) == (
        "from-file",
        20.0,
        8883,
    )


def test_unknown_options_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "bridge.toml"
    config.write_text('databse_url = "sqlite://"\n')
    with pytest.raises(ValueError, match="databse_url"):
        BridgeSettings.load(config)
