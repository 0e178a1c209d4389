"""pytest fixtures over simulator/ble.py: one private system bus with a mock BlueZ per test
module, reset to a single powered adapter (hci0) before each test.

Import the fixtures into a test module: `from tests.bluez_mock import bluez, bluez_bus`.
The test process's DBUS_SYSTEM_BUS_ADDRESS points at the private bus for the module's lifetime
(bleak reads it when it connects); it is restored afterwards.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest

from simulator.ble import BluezControl, PrivateBluez

ADAPTER = "hci0"


@pytest.fixture(scope="module")
def bluez_bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateBluez]:
    """dbus-daemon + `python -m dbusmock --system --template bluez5`, for the whole module."""
    bluez = PrivateBluez(tmp_path_factory.mktemp("bluez"))
    bluez.start()
    saved = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS")
    os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = bluez.address
    try:
        yield bluez
    finally:
        if saved is None:
            os.environ.pop("DBUS_SYSTEM_BUS_ADDRESS", None)
        else:
            os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = saved
        bluez.stop()


@pytest.fixture
async def bluez(bluez_bus: PrivateBluez) -> AsyncIterator[BluezControl]:
    """Control of the mock, reset to one powered adapter `hci0` and no device."""
    control = await BluezControl.connect(bluez_bus.address)
    try:
        await control.reset()
        await control.add_adapter(ADAPTER)
        yield control
    finally:
        await control.close()
