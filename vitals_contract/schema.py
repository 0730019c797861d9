"""Export the payload JSON Schemas: ``python -m vitals_contract.schema docs/schema``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from vitals_contract.messages import (
    SCHEMA_VERSION,
    AlertMessage,
    Command,
    CommandResult,
    CommitConfirmation,
    Heartbeat,
    KioskStatus,
    Message,
    ReadingsMessage,
    ScanEvent,
)

EXPORTED: dict[str, type[Message]] = {
    "readings": ReadingsMessage,
    "scan_event": ScanEvent,
    "status": KioskStatus,
    "heartbeat": Heartbeat,
    "command": Command,
    "command_result": CommandResult,
    "confirm": CommitConfirmation,
    "alert": AlertMessage,
}


def schemas() -> dict[str, dict[str, Any]]:
    """Return each payload's JSON Schema by file stem."""
    out = {}
    for name, model in EXPORTED.items():
        schema = model.model_json_schema()
        schema["$id"] = (
            f"https://kiosk-vitals.example/schema/v{SCHEMA_VERSION}/{name}.json"
        )
        out[f"{name}.v{SCHEMA_VERSION}"] = schema
    return out


def render(schema: dict[str, Any]) -> str:
    """Serialise a schema the way it is stored in the docs."""
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def export(directory: Path) -> list[Path]:
    """Write every schema into ``directory``; return the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, schema in schemas().items():
        path = directory / f"{stem}.json"
        path.write_text(render(schema))
        paths.append(path)
    return paths


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/schema")
    for p in export(target):
        print(p)
