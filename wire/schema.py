"""JSON Schema of every wire message, for clients written in other languages."""

from __future__ import annotations

import json
from pathlib import Path

from wire.models import MODELS


def schemas() -> dict[str, dict[str, object]]:
    return {channel: model.model_json_schema() for channel, model in MODELS.items()}


def export(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for channel, schema in schemas().items():
        path = directory / f"{channel}.schema.json"
        path.write_text(json.dumps(schema, indent=2) + "\n")
        written.append(path)
    return written
