"""JSON Schema of every wire message, for clients written in other languages."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from wire.control import Ack, AlertMessage, CommandRequest, CommandResult, SignedDocument
from wire.models import MODELS

CONTROL_MODELS: dict[str, type[BaseModel]] = {
    "config": SignedDocument,
    "ack": Ack,
    "cmd": CommandRequest,
    "cmd-result": CommandResult,
    "alerts": AlertMessage,
}


def schemas() -> dict[str, dict[str, object]]:
    models = {**MODELS, **CONTROL_MODELS}
    return {channel: model.model_json_schema() for channel, model in models.items()}


def export(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for channel, schema in schemas().items():
        path = directory / f"{channel}.schema.json"
        path.write_text(json.dumps(schema, indent=2) + "\n")
        written.append(path)
    return written
