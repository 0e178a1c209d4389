"""Connection types the agent config accepts, and the driver each one builds."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from drivers.base import Driver
from drivers.modbus.driver import (
    ModbusDriver,
    ModbusPool,
    ModbusRtuConnection,
    ModbusTcpConnection,
)
from drivers.profiles import Profile

Connection = Annotated[ModbusTcpConnection | ModbusRtuConnection, Field(discriminator="type")]

PROTOCOL_OF_CONNECTION = {"modbus-tcp": "modbus", "modbus-rtu": "modbus"}


class DriverFactory:
    """Builds drivers and owns what they share (connection pools)."""

    def __init__(self) -> None:
        self._modbus = ModbusPool()

    def build(self, profile: Profile, connection: Connection) -> Driver:
        return ModbusDriver(profile, connection, self._modbus)

    async def close(self) -> None:
        await self._modbus.close()
