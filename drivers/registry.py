"""Connection types the agent config accepts, and the driver each one builds.

Each protocol package has a `driver` module with a `Pool` (what its drivers share: one Modbus
client per bus, one MQTT session per broker, one BLE scanner per adapter…; `async close()`) and
`build(profile, connection, pool) -> Driver`; a module that sets `POOL_TAKES_STATE_DIR = True`
gets `Pool(state_dir=…)`, the gateway's data directory (None: keep nothing on disk). Driver
modules are imported when a device first needs them, so a gateway without BLE sensors never
loads bleak.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from drivers.base import Driver
from drivers.ble.connection import BleConnection
from drivers.camera.connection import OnvifConnection
from drivers.modbus.driver import ModbusRtuConnection, ModbusTcpConnection
from drivers.mqtt.connection import MqttDeviceConnection
from drivers.pjlink.connection import PjlinkConnection
from drivers.profiles import AnyProfile

Connection = Annotated[
    ModbusTcpConnection
    | ModbusRtuConnection
    | PjlinkConnection
    | MqttDeviceConnection
    | OnvifConnection
    | BleConnection,
    Field(discriminator="type"),
]

#: connection type -> the `protocol:` of the profiles it can serve
PROTOCOL_OF_CONNECTION = {
    "modbus-tcp": "modbus",
    "modbus-rtu": "modbus",
    "pjlink": "pjlink",
    "mqtt": "mqtt",
    "onvif": "onvif",
    "ble": "ble",
}

_DRIVER_MODULES = {
    "modbus": "drivers.modbus.driver",
    "pjlink": "drivers.pjlink.driver",
    "mqtt": "drivers.mqtt.driver",
    "onvif": "drivers.camera.driver",
    "ble": "drivers.ble.driver",
}


class DriverFactory:
    """Builds drivers and owns what they share (one pool per protocol, made on first use)."""

    def __init__(self, state_dir: Path | None = None) -> None:
        self.state_dir = state_dir
        self._pools: dict[str, Any] = {}

    def build(self, profile: AnyProfile, connection: Any) -> Driver:
        protocol = PROTOCOL_OF_CONNECTION[connection.type]
        if protocol != profile.protocol:
            raise ValueError(
                f"profile {profile.id} speaks {profile.protocol}, connection is {connection.type}"
            )
        module = importlib.import_module(_DRIVER_MODULES[protocol])
        if protocol not in self._pools:
            if getattr(module, "POOL_TAKES_STATE_DIR", False):
                self._pools[protocol] = module.Pool(state_dir=self.state_dir)
            else:
                self._pools[protocol] = module.Pool()
        driver: Driver = module.build(profile, connection, self._pools[protocol])
        return driver

    async def close(self) -> None:
        pools, self._pools = self._pools, {}
        for pool in pools.values():
            await pool.close()
