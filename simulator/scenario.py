"""Scenario files: which simulated devices to serve, where, and how their values behave."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from drivers.profiles import ProfileLibrary
from wire.documents import line_of, read_yaml, validate_document
from wire.errors import DocumentError
from wire.models import Id


class SimulatedDevice(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: Id
    profile: str
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)]
    unit: Annotated[int, Field(ge=0, le=255, description="0 answers every unit id")] = 1
    seed: int = 0
    base_temperature: float = 21.0
    base_humidity: float = 45.0


class Scenario(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = "classroom"
    time_scale: Annotated[float, Field(gt=0, le=10_000)] = 1.0
    start_time_of_day: Annotated[str, Field(pattern=r"^\d{2}:\d{2}$")] | None = None
    profiles_dir: Path | None = None
    devices: Annotated[list[SimulatedDevice], Field(min_length=1)]

    @model_validator(mode="after")
    def _distinct_endpoints(self) -> Scenario:
        seen: set[tuple[str, int]] = set()
        for device in self.devices:
            if (device.host, device.port) in seen:
                raise ValueError(f"two devices listen on {device.host}:{device.port}")
            seen.add((device.host, device.port))
        return self


def load_scenario(path: Path) -> tuple[Scenario, ProfileLibrary]:
    data, root = read_yaml(path)
    scenario = validate_document(Scenario, data, str(path), root)
    library = ProfileLibrary.for_document(scenario.profiles_dir, path)
    problems = [
        problem
        for i, d in enumerate(scenario.devices)
        if (
            problem := library.unknown(
                d.profile, f"devices.{i}.profile", line_of(root, ("devices", i, "profile"))
            )
        )
    ]
    if problems:
        raise DocumentError(str(path), problems)
    return scenario, library
