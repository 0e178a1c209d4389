"""Scenario files: which simulated devices to serve, where, how their values behave, and what
faults they show: Modbus devices (`devices`), PJLink displays (`projectors`), ONVIF/RTSP cameras
(`cameras`), MQTT e-class boards (`boards`) and BLE sensors (`ble_sensors`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from drivers.modbus.profile import ModbusProfile
from drivers.profiles import ProfileLibrary
from simulator.ble import SimulatedBleSensor
from simulator.board import SimulatedBoard
from simulator.camera_server import SimulatedCamera
from simulator.pjlink_server import SimulatedProjector
from wire.documents import line_of, read_yaml, validate_document
from wire.errors import DocumentError, Problem
from wire.models import Id


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FaultSpec(_Strict):
    kind: Literal[
        "none", "offline", "slow", "exception", "stuck", "noisy", "wrong_unit", "garbled"
    ] = "none"
    delay_s: Annotated[float, Field(ge=0, le=60)] = 0.5
    code: Literal[1, 2, 3, 4, 5, 6, 8, 10, 11] = Field(4, description="Modbus exception code")
    spread: Annotated[float, Field(ge=0, le=10)] = 0.3


class RtuBus(_Strict):
    """A simulated RS-485 line: a socat pty pair; the agent opens `link`."""

    name: Id
    link: Path
    baudrate: Literal[1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200] = 9600


class SimulatedDevice(_Strict):
    id: Id
    profile: str
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] | None = Field(None, description="Modbus TCP")
    bus: Id | None = Field(None, description="name of an rtu_buses entry")
    unit: Annotated[int, Field(ge=0, le=255, description="0 answers every unit id (TCP)")] = 1
    seed: int = 0
    base_temperature: float = 21.0
    base_humidity: float = 45.0
    fault: FaultSpec = FaultSpec()
    values: dict[str, float | int | bool | str] = Field(
        default_factory=dict, description="fixed values for some points, e.g. {co2: 1800}"
    )

    @model_validator(mode="after")
    def _one_transport(self) -> SimulatedDevice:
        if (self.port is None) == (self.bus is None):
            raise ValueError("a device has either 'port' (Modbus TCP) or 'bus' (Modbus RTU)")
        if self.bus is not None and not 1 <= self.unit <= 247:
            raise ValueError(f"an RTU unit id is 1..247, not {self.unit}")
        return self

    @property
    def endpoint(self) -> str:
        return f"rtu:{self.bus}" if self.bus is not None else f"tcp:{self.host}:{self.port}"


class Scenario(_Strict):
    name: str = "classroom"
    time_scale: Annotated[float, Field(gt=0, le=10_000)] = 1.0
    start_time_of_day: Annotated[str, Field(pattern=r"^\d{2}:\d{2}$")] | None = None
    profiles_dir: Path | None = None
    rtu_buses: list[RtuBus] = []
    devices: list[SimulatedDevice] = Field(default_factory=list, description="Modbus devices")
    projectors: list[SimulatedProjector] = Field(
        default_factory=list, description="PJLink projectors and flat panels"
    )
    cameras: list[SimulatedCamera] = Field(
        default_factory=list, description="cameras: ONVIF device service and RTSP"
    )
    boards: list[SimulatedBoard] = Field(
        default_factory=list, description="e-class boards publishing on an MQTT broker"
    )
    ble_sensors: list[SimulatedBleSensor] = Field(
        default_factory=list, description="BLE sensors advertising on a private mock BlueZ"
    )
    ble_workdir: Path | None = Field(
        None,
        description="where the mock BlueZ's bus socket goes (short path); default: a temp dir",
    )

    @property
    def ids(self) -> list[str]:
        return [
            *(d.id for d in self.devices),
            *(p.id for p in self.projectors),
            *(c.id for c in self.cameras),
            *(b.id for b in self.boards),
            *(s.id for s in self.ble_sensors),
        ]

    @model_validator(mode="after")
    def _something_to_serve(self) -> Scenario:
        if not self.ids:
            raise ValueError(
                "a scenario needs at least one device, projector, camera, board or BLE sensor"
            )
        seen: set[str] = set()
        for device_id in self.ids:
            if device_id in seen:
                raise ValueError(f"device id {device_id!r} is used twice")
            seen.add(device_id)
        return self

    @model_validator(mode="after")
    def _endpoints(self) -> Scenario:
        buses = {bus.name for bus in self.rtu_buses}
        seen: set[tuple[str, int]] = set()
        for device in self.devices:
            if device.bus is not None and device.bus not in buses:
                raise ValueError(f"device {device.id!r}: no rtu_buses entry named {device.bus!r}")
            key = (device.endpoint, device.unit)
            if key in seen:
                raise ValueError(f"two devices answer unit {device.unit} on {device.endpoint}")
            seen.add(key)
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
    for i, d in enumerate(scenario.devices):
        if d.profile not in library.profiles:
            continue
        profile = library.get(d.profile)
        if not isinstance(profile, ModbusProfile):
            problems.append(
                Problem(
                    f"devices.{i}.profile",
                    f"{d.profile} speaks {profile.protocol}: 'devices' are Modbus devices",
                    line_of(root, ("devices", i, "profile")),
                )
            )
            continue
        names = {point.name for point in profile.points}
        problems.extend(
            Problem(
                f"devices.{i}.values.{name}",
                f"{d.profile} has no point {name!r}",
                line_of(root, ("devices", i, "values", name)),
            )
            for name in d.values
            if name not in names
        )
        bits = {p.name for p in profile.points if p.table.is_bits}
        problems.extend(
            Problem(
                f"devices.{i}.values.{name}",
                "coils and discrete inputs keep what was written, not fixed values",
                line_of(root, ("devices", i, "values", name)),
            )
            for name in d.values
            if name in bits
        )
    if problems:
        raise DocumentError(str(path), problems)
    return scenario, library
