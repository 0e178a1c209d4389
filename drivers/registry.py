"""Connection types the agent config accepts, and the driver each one builds."""

from __future__ import annotations

from drivers.base import Driver
from drivers.modbus.driver import ModbusTcpConnection, ModbusTcpDriver, ModbusTcpPool
from drivers.profiles import Profile

# Becomes a discriminated union on `type` when a second transport arrives.
Connection = ModbusTcpConnection

PROTOCOL_OF_CONNECTION = {"modbus-tcp": "modbus"}


class DriverFactory:
    """Builds drivers and owns what they share (connection pools)."""

    def __init__(self) -> None:
        self._modbus_tcp = ModbusTcpPool()

    def build(self, profile: Profile, connection: Connection) -> Driver:
        return ModbusTcpDriver(profile, connection, self._modbus_tcp)

    async def close(self) -> None:
        await self._modbus_tcp.close()
