"""BLE driver through bleak's real BlueZ D-Bus backend, against python-dbusmock's bluez5 template on
a private system bus (no radio): BTHome adverts (plain, encrypted, replayed, malformed), GATT reads
(refused, hanging, dropped mid-read, bounded concurrency), the adapter powered off and removed,
silence, and the simulator's sensors. The GATT codec is checked byte for byte."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import yaml

from drivers.base import PollResult
from drivers.ble import bthome, gatt
from drivers.ble.connection import BleConnection
from drivers.ble.driver import BthomeDriver, GattDriver, Pool, build
from drivers.ble.profile import BleProfile
from drivers.ble.scanner import Scanner
from drivers.errors import DeviceUnreachable, DriverError
from drivers.profiles import ProfileLibrary, default_profiles_dir, load_profile
from drivers.registry import DriverFactory
from simulator.ble import (
    ENVIRONMENTAL_SENSING,
    BleSimulation,
    BluezControl,
    PrivateBluez,
    SimulatedBleSensor,
    serve,
)
from tests.bluez_mock import ADAPTER, bluez, bluez_bus
from wire.errors import DocumentError

__all__ = ["bluez", "bluez_bus"]  # fixtures used by name

THERMO = "A4:C1:38:3E:B3:93"
CO2 = "A4:C1:38:00:00:02"
ESS = "C0:FF:EE:00:00:01"
KEY = "231d39c1d7cc1ab1aee224cd096db932"
OTHER_KEY = "00112233445566778899aabbccddeeff"
# A real pvvx LYWSD03MMC advert (JsBergbau/MiTemperature2 issue 154): packet id 27, battery 100 %,
# 22.48 °C, 67.64 %RH.
FIELD_ADVERT = bytes.fromhex("40001b016402c808036c1a")

LIBRARY = ProfileLibrary.load()


def profile(profile_id: str) -> BleProfile:
    found = LIBRARY.get(profile_id)
    assert isinstance(found, BleProfile)
    return found


def connection(address: str = THERMO, **fields: object) -> BleConnection:
    return BleConnection.model_validate({"type": "ble", "address": address, **fields})


async def until(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def holds(driver: BthomeDriver, name: str, value: object) -> Callable[[], bool]:
    return lambda: driver.values.get(name) == value


def scanned(scanner: Scanner, *addresses: str) -> Callable[[], bool]:
    return lambda: set(addresses) <= set(scanner.devices)


def values(result: PollResult) -> dict[str, object]:
    return dict(result.values)


@pytest.fixture
async def pool() -> AsyncIterator[Pool]:
    shared = Pool(retry_delay_s=0.02)
    yield shared
    await shared.close()


def bthome_driver(
    pool: Pool, profile_id: str = "bthome-lywsd03mmc", *, address: str = THERMO, **fields: object
) -> BthomeDriver:
    driver = build(profile(profile_id), connection(address, **fields), pool)
    assert isinstance(driver, BthomeDriver)
    return driver


async def advertise(
    bluez: BluezControl,
    driver: BthomeDriver,
    data: bytes,
    *,
    address: str = THERMO,
    rssi: int = -60,
) -> None:
    """One advert from `address`, waited for until the driver has handled it."""
    heard = driver.counters.adverts
    path = f"/org/bluez/{ADAPTER}/dev_{address.replace(':', '_')}"
    if path not in await bluez.objects():
        await bluez.add_device(ADAPTER, address, rssi=rssi, service_data={bthome.BTHOME_UUID: data})
    else:
        await bluez.advertise(ADAPTER, address, service_data={bthome.BTHOME_UUID: data}, rssi=rssi)
    await until(lambda: driver.counters.adverts > heard)


# --- BTHome ---------------------------------------------------------------------------------------


async def test_plain_adverts_become_readings_through_the_factory(bluez: BluezControl) -> None:
    factory = DriverFactory()
    try:
        driver = factory.build(profile("bthome-lywsd03mmc"), connection())
        assert isinstance(driver, BthomeDriver)
        assert driver.bus == f"ble://hci0/{THERMO}"
        assert await driver.read() == PollResult()  # scanning just began: nothing due yet
        assert driver.scanner.mode == "passive"

        await advertise(bluez, driver, FIELD_ADVERT, rssi=-54)
        result = await driver.read()
        got = values(result)
        assert got["temperature"] == 22.48
        assert got["humidity"] == 67.64
        assert got["battery"] == 100
        assert got["rssi"] == -54
        assert isinstance(got["last_seen_s"], float) and 0 <= got["last_seen_s"] < 2
        assert "battery_voltage" not in got and result.rejected == []  # in the other packet

        # the alternating packet adds the voltage and keeps the rest
        await advertise(bluez, driver, bthome.encode([("voltage", 3.014)], packet_id=28))
        got = values(await driver.read())
        assert got["battery_voltage"] == 3.014 and got["temperature"] == 22.48

        # the same packet id again (new bytes) is a repeat, not a new measurement
        repeat = bthome.encode([("temperature", 30.0)], packet_id=28)
        await advertise(bluez, driver, repeat)
        assert values(await driver.read())["temperature"] == 22.48
        # and the same bytes again (BlueZ re-reports them with each RSSI) as well
        await bluez.advertise(ADAPTER, THERMO, rssi=-70)
        await until(lambda: driver.counters.adverts == 4)
        assert driver.counters.duplicates == 2 and driver.counters.accepted == 2
        assert values(await driver.read())["rssi"] == -70
    finally:
        await factory.close()


async def test_encrypted_adverts_with_the_right_key(bluez: BluezControl, pool: Pool) -> None:
    driver = bthome_driver(pool, bind_key=KEY)
    await driver.scan()
    data = bthome.encode(
        [("temperature", 21.5), ("humidity", 40.0)],
        packet_id=1,
        mac=THERMO,
        bind_key=KEY,
        counter=7,
    )
    await advertise(bluez, driver, data)
    got = values(await driver.read())
    assert got["temperature"] == 21.5 and got["humidity"] == 40.0

    # a plain advert for a sensor with a key is a spoof: refused, nothing changes
    await advertise(bluez, driver, bthome.encode([("temperature", 99.0)], packet_id=2))
    assert driver.counters.malformed == 1
    assert values(await driver.read())["temperature"] == 21.5


async def test_wrong_key_is_counted_and_gives_no_values(bluez: BluezControl, pool: Pool) -> None:
    driver = bthome_driver(pool, bind_key=OTHER_KEY)
    await driver.scan()
    for counter in (1, 2):
        data = bthome.encode(
            [("temperature", 21.5)], packet_id=counter, mac=THERMO, bind_key=KEY, counter=counter
        )
        await advertise(bluez, driver, data)
    assert driver.counters.malformed == 2 and driver.counters.accepted == 0
    assert driver.values == {}
    with pytest.raises(DriverError, match=r"adverts heard but refused .* MIC check failed"):
        await driver.read()


async def test_replayed_advert_is_refused(bluez: BluezControl, pool: Pool) -> None:
    driver = bthome_driver(pool, bind_key=KEY)
    await driver.scan()
    old = bthome.encode([("temperature", 20.0)], packet_id=1, mac=THERMO, bind_key=KEY, counter=10)
    new = bthome.encode([("temperature", 21.0)], packet_id=2, mac=THERMO, bind_key=KEY, counter=11)
    await advertise(bluez, driver, old)
    await advertise(bluez, driver, new)
    await advertise(bluez, driver, old)  # recorded and sent again by someone else
    assert driver.counters.replayed == 1 and driver.counters.accepted == 2
    assert "counter 10 ≤ 11" in (driver.problem or "")
    assert values(await driver.read())["temperature"] == 21.0


async def test_counter_restart_is_accepted_after_silence(bluez: BluezControl, pool: Pool) -> None:
    """A sensor whose counter began again (battery change) is taken back once it has been silent
    for its offline window and keeps counting up from its new start."""
    driver = bthome_driver(pool, bind_key=KEY, advert_interval_s=0.05)  # window 6 × 0.05 s
    await driver.scan()
    first = bthome.encode([("temperature", 20.0)], mac=THERMO, bind_key=KEY, counter=500)
    await advertise(bluez, driver, first)
    await asyncio.sleep(0.35)
    for counter in range(1, 7):
        data = bthome.encode([("temperature", 22.0)], mac=THERMO, bind_key=KEY, counter=counter)
        await advertise(bluez, driver, data)
    assert driver.counters.replayed == 6
    assert values(await driver.read())["temperature"] == 22.0


# --- replay counters across restarts ---------------------------------------------------------


def encrypted(counter: int, temperature: float = 21.0, key: str = KEY) -> bytes:
    return bthome.encode([("temperature", temperature)], mac=THERMO, bind_key=key, counter=counter)


def matching(folder: Path, pattern: str) -> list[Path]:
    return list(folder.glob(pattern))


def saved_counters(state_dir: Path) -> dict[str, object]:
    data = json.loads((state_dir / "ble-counters.json").read_text())
    return {name: entry["counter"] for name, entry in data["counters"].items()}


async def test_counters_survive_an_agent_restart(bluez: BluezControl, tmp_path: Path) -> None:
    factory = DriverFactory(state_dir=tmp_path)  # what the agent makes from buffer.path's folder
    try:
        first = factory.build(profile("bthome-lywsd03mmc"), connection(bind_key=KEY))
        assert isinstance(first, BthomeDriver)
        await first.scan()
        await advertise(bluez, first, encrypted(10, 20.0))
        await advertise(bluez, first, encrypted(11, 21.0))
    finally:
        await factory.close()  # the agent stops: the pool saves
    assert saved_counters(tmp_path) == {f"hci0/{THERMO}": 11}
    assert matching(tmp_path, "*.tmp") == []

    restarted = Pool(state_dir=tmp_path)
    try:
        driver = bthome_driver(restarted, bind_key=KEY)
        await driver.scan()
        await advertise(bluez, driver, encrypted(10, 20.0))  # recorded before the restart
        assert driver.counters.replayed == 1 and driver.counters.accepted == 0
        assert driver.problem == "replayed advert refused (counter 10 ≤ 11)"
        with pytest.raises(DriverError, match=r"adverts heard but refused \(0 malformed, 1 re"):
            await driver.read()  # nothing taken from it
        await advertise(bluez, driver, encrypted(12, 22.0))
        assert values(await driver.read())["temperature"] == 22.0
    finally:
        await restarted.close()
    assert saved_counters(tmp_path) == {f"hci0/{THERMO}": 12}


async def test_a_replaced_driver_keeps_the_counter_in_memory(
    bluez: BluezControl, pool: Pool
) -> None:
    """A pushed config rebuilds the device's driver in the same pool: no gap for a replay, and
    nothing on disk without a state directory (tests, `campus-agent probe`)."""
    old = bthome_driver(pool, bind_key=KEY)
    await old.scan()
    await advertise(bluez, old, encrypted(10))
    await advertise(bluez, old, encrypted(11))
    await old.close()
    new = bthome_driver(pool, bind_key=KEY, advert_interval_s=20)
    await new.scan()
    await advertise(bluez, new, encrypted(10))
    assert new.counters.replayed == 1 and new.counters.accepted == 0
    assert pool.counters.path is None and pool.counters.writes == 0

    # another bind key: the old key's counter proves nothing about the new one's adverts
    rekeyed = bthome_driver(pool, bind_key=OTHER_KEY)
    await rekeyed.scan()
    await advertise(bluez, rekeyed, encrypted(1, 19.0, key=OTHER_KEY))
    assert rekeyed.counters.accepted == 1 and rekeyed.counters.replayed == 0


async def test_counter_saves_are_throttled(bluez: BluezControl, tmp_path: Path) -> None:
    pool = Pool(state_dir=tmp_path, save_interval_s=0.4)
    try:
        driver = bthome_driver(pool, bind_key=KEY)
        await driver.scan()
        started = time.monotonic()
        for counter in range(1, 6):
            await advertise(bluez, driver, encrypted(counter))
        assert time.monotonic() - started < 0.4, "adverts too slow for this test's interval"
        await until(lambda: pool.counters.writes == 1)  # the first change is saved at once
        assert saved_counters(tmp_path)[f"hci0/{THERMO}"] in range(1, 6)
        await until(lambda: pool.counters.writes == 2, timeout=1.0)  # the rest, one interval on
        assert saved_counters(tmp_path) == {f"hci0/{THERMO}": 5}
        await advertise(bluez, driver, encrypted(5))  # a repeat changes nothing: no write
        await asyncio.sleep(0.5)
        assert pool.counters.writes == 2
        await advertise(bluez, driver, encrypted(6))
        assert pool.counters.writes == 2  # due in the next interval…
    finally:
        await pool.close()
    assert pool.counters.writes == 3  # …or on close
    assert saved_counters(tmp_path) == {f"hci0/{THERMO}": 6}


async def test_a_damaged_counter_file_is_set_aside(
    bluez: BluezControl, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "ble-counters.json"
    path.write_text('{"format": 1, "counters": {"hci0/A4:C1:38:3E:B3:93": {"counter": -')
    caplog.set_level("WARNING", logger="drivers.ble.counters")
    pool = Pool(state_dir=tmp_path)
    try:
        (aside,) = matching(tmp_path, "ble-counters.json.bad-*")
        assert aside.read_text().endswith('"counter": -')
        assert not path.exists()
        assert f"{path} is damaged" in caplog.text and aside.name in caplog.text
        driver = bthome_driver(pool, bind_key=KEY)
        await driver.scan()
        await advertise(bluez, driver, encrypted(3, 23.5))  # no floor: read as a first advert
        assert values(await driver.read())["temperature"] == 23.5
    finally:
        await pool.close()
    assert saved_counters(tmp_path) == {f"hci0/{THERMO}": 3}


async def test_counter_restart_rule_across_an_agent_restart(
    bluez: BluezControl, tmp_path: Path
) -> None:
    """After a restart the saved counter holds for one offline window of listening; then a
    sensor that restarted its own counter is taken back as before."""
    before = Pool(state_dir=tmp_path)
    try:
        driver = bthome_driver(before, bind_key=KEY)
        await driver.scan()
        await advertise(bluez, driver, encrypted(500, 20.0))
    finally:
        await before.close()

    after = Pool(state_dir=tmp_path)
    try:
        driver = bthome_driver(after, bind_key=KEY, advert_interval_s=0.1)  # window 6 × 0.1 s
        await driver.scan()
        started = time.monotonic()
        for counter in range(1, 7):  # a recorded run, played back at once after the restart
            await advertise(bluez, driver, encrypted(counter, 5.0))
        assert time.monotonic() - started < 0.6, "adverts too slow for this test's window"
        assert driver.counters.replayed == 6 and driver.counters.accepted == 0

        await asyncio.sleep(0.65)  # a window with nothing accepted: the sensor did restart
        await advertise(bluez, driver, encrypted(7, 22.0))
        assert driver.counters.accepted == 1
        assert values(await driver.read())["temperature"] == 22.0
    finally:
        await after.close()
    assert saved_counters(tmp_path) == {f"hci0/{THERMO}": 7}


async def test_malformed_service_data_is_counted_not_fatal(bluez: BluezControl, pool: Pool) -> None:
    driver = bthome_driver(pool)
    await driver.scan()
    await advertise(bluez, driver, FIELD_ADVERT)
    for bad in (
        bytes.fromhex("4002c8"),  # temperature cut short
        bytes.fromhex("4002c808a001"),  # object 0xa0 does not exist
        bytes.fromhex("20"),  # BTHome v1 device byte
        b"",
    ):
        await advertise(bluez, driver, bad)
    assert driver.counters.malformed == 4 and driver.counters.accepted == 1
    assert str(driver.problem).startswith("malformed advert")
    got = values(await driver.read())  # the last good advert still stands
    assert got["temperature"] == 22.48 and got["humidity"] == 67.64

    await advertise(bluez, driver, bthome.encode([("temperature", 23.0)], packet_id=99))
    assert values(await driver.read())["temperature"] == 23.0
    assert driver.problem is None


async def test_unknown_object_leaves_the_points_untouched(bluez: BluezControl, pool: Pool) -> None:
    driver = bthome_driver(pool)
    await driver.scan()
    await advertise(bluez, driver, FIELD_ADVERT)
    # 28.72 °C decodes before the unknown object 0xa0, but the advert is refused whole
    await advertise(bluez, driver, bytes.fromhex("40000202380ba001"))
    assert driver.counters.malformed == 1
    assert driver.problem == "advert with unknown BTHome object 0xa0 ignored"
    assert values(await driver.read())["temperature"] == 22.48


async def test_offline_after_silence(bluez: BluezControl, pool: Pool) -> None:
    driver = bthome_driver(pool, advert_interval_s=0.05)  # down after 6 × 0.05 s
    await driver.scan()
    await advertise(bluez, driver, FIELD_ADVERT)
    assert values(await driver.read())["temperature"] == 22.48
    await asyncio.sleep(0.4)
    with pytest.raises(DeviceUnreachable, match=r"no advert for 0 s \(expected every 0.05 s"):
        await driver.read()
    await advertise(bluez, driver, bthome.encode([("temperature", 19.0)], packet_id=50))
    assert values(await driver.read())["temperature"] == 19.0


async def test_a_sensor_never_heard_goes_down_after_the_window(
    bluez: BluezControl, pool: Pool
) -> None:
    driver = bthome_driver(pool, advert_interval_s=0.05)
    assert await driver.read() == PollResult()
    await asyncio.sleep(0.35)
    with pytest.raises(DeviceUnreachable, match=f"{THERMO}: no advert for 0 s"):
        await driver.read()


async def test_open_waits_for_the_first_advert(bluez: BluezControl, pool: Pool) -> None:
    """What `campus-agent probe` relies on: values in the first read after `open()`."""
    driver = bthome_driver(pool, advert_interval_s=5)
    started = time.monotonic()
    opening = asyncio.create_task(driver.open())
    await until(lambda: driver.scanner.started_at is not None)
    await asyncio.sleep(0.2)
    assert not opening.done()
    await advertise(bluez, driver, FIELD_ADVERT)
    await asyncio.wait_for(opening, 1)
    assert time.monotonic() - started < 2
    assert values(await driver.read())["temperature"] == 22.48

    # heard within its offline window: a second open does not wait
    started = time.monotonic()
    await driver.open()
    assert time.monotonic() - started < 0.5


async def test_open_fails_when_no_advert_comes(bluez: BluezControl, pool: Pool) -> None:
    driver = bthome_driver(pool, advert_interval_s=0.4)
    started = time.monotonic()
    with pytest.raises(DriverError) as caught:
        await driver.open()
    assert 0.4 <= time.monotonic() - started < 1.5
    assert str(caught.value).startswith(f"no advert from {THERMO} within 0.4 s on hci0: ")

    named = bthome_driver(pool, address=CO2, advert_interval_s=0.2, local_name="CO2_ROOM_4")
    with pytest.raises(DriverError, match=rf"^no advert from {CO2} \(named 'CO2_ROOM_4'\)"):
        await named.open()


async def test_open_names_why_the_adverts_heard_were_refused(
    bluez: BluezControl, pool: Pool
) -> None:
    driver = bthome_driver(pool, bind_key=OTHER_KEY, advert_interval_s=0.5)
    opening = asyncio.create_task(driver.open())
    await until(lambda: driver.scanner.started_at is not None)
    data = bthome.encode([("temperature", 21.5)], packet_id=1, mac=THERMO, bind_key=KEY, counter=1)
    await advertise(bluez, driver, data)
    with pytest.raises(DriverError, match=r"adverts heard but refused \(1 malformed.*MIC check"):
        await opening


async def test_rotating_address_matched_by_name(bluez: BluezControl, pool: Pool) -> None:
    driver = bthome_driver(pool, local_name="ATC_ROOM12")
    await driver.scan()
    for address, temperature in (("5E:11:22:33:44:55", 20.5), ("6F:66:77:88:99:AA", 20.75)):
        await bluez.add_device(
            ADAPTER,
            address,
            name="ATC_ROOM12",
            service_data={bthome.BTHOME_UUID: bthome.encode([("temperature", temperature)])},
        )
        await until(holds(driver, "temperature", temperature))
    await bluez.add_device(
        ADAPTER,
        "7A:00:00:00:00:01",
        name="SOMEONE_ELSE",
        service_data={bthome.BTHOME_UUID: bthome.encode([("temperature", 5.0)])},
    )
    await asyncio.sleep(0.05)
    assert values(await driver.read())["temperature"] == 20.75


async def test_adapter_powered_off_then_on(bluez: BluezControl, pool: Pool) -> None:
    driver = bthome_driver(pool)
    other = bthome_driver(pool, "bthome-co2-sensor", address=CO2)
    await driver.scan()
    await advertise(bluez, driver, FIELD_ADVERT)
    assert values(await driver.read())["temperature"] == 22.48
    started = driver.scanner.started_at

    await bluez.set_powered(ADAPTER, False)
    await until(lambda: driver.scanner.watch.problem is not None)
    for each in (driver, other):
        with pytest.raises(DriverError, match=r"^hci0 is powered off$"):
            await each.read()

    await bluez.set_powered(ADAPTER, True)
    await until(lambda: driver.scanner.started_at not in (None, started))  # restarted by itself
    await advertise(bluez, driver, bthome.encode([("temperature", 24.0)], packet_id=77))
    assert values(await driver.read())["temperature"] == 24.0


async def test_adapter_removed_and_back(bluez: BluezControl, pool: Pool) -> None:
    driver = bthome_driver(pool)
    await driver.scan()
    await advertise(bluez, driver, FIELD_ADVERT)
    await bluez.remove_adapter(ADAPTER)
    await until(lambda: driver.scanner.watch.problem is not None)
    with pytest.raises(DriverError, match=r"^Bluetooth adapter hci0 not found$"):
        await driver.read()

    await bluez.add_adapter(ADAPTER)
    await until(lambda: driver.scanner.started_at is not None)
    await advertise(bluez, driver, bthome.encode([("temperature", 18.0)], packet_id=3))
    assert values(await driver.read())["temperature"] == 18.0


async def test_a_missing_adapter_fails_only_its_devices(bluez: BluezControl, pool: Pool) -> None:
    missing = bthome_driver(pool, adapter="hci1", address=CO2)
    with pytest.raises(DriverError, match=r"^Bluetooth adapter hci1 not found$"):
        await missing.read()
    driver = bthome_driver(pool)
    await driver.scan()
    await advertise(bluez, driver, FIELD_ADVERT)
    assert values(await driver.read())["temperature"] == 22.48


@contextlib.contextmanager
def system_bus(address: str) -> Iterator[None]:
    """DBUS_SYSTEM_BUS_ADDRESS for one test (bleak and the driver read it when they connect)."""
    saved = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS")
    os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = address
    try:
        yield
    finally:
        os.environ.pop("DBUS_SYSTEM_BUS_ADDRESS")
        if saved is not None:
            os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = saved


async def test_bluetoothd_stopped_then_started(tmp_path: Path) -> None:
    with PrivateBluez(tmp_path / "b") as own, system_bus(own.address):
        pool = Pool()
        control = await BluezControl.connect(own.address)
        try:
            await control.add_adapter(ADAPTER)
            driver = bthome_driver(pool)
            await driver.scan()
            await advertise(control, driver, FIELD_ADVERT)
            assert values(await driver.read())["temperature"] == 22.48

            own.stop_bluetoothd()
            await until(lambda: driver.scanner.watch.problem is not None)
            with pytest.raises(DriverError, match=r"^BlueZ \(bluetoothd\) is not running$"):
                await driver.read()

            await asyncio.to_thread(own.start_bluetoothd)
            await control.add_adapter(ADAPTER)
            await until(lambda: driver.scanner.started_at is not None)
            await advertise(control, driver, bthome.encode([("temperature", 17.5)], packet_id=9))
            assert values(await driver.read())["temperature"] == 17.5
        finally:
            await control.close()
            await pool.close()


async def test_no_system_bus(tmp_path: Path) -> None:
    with system_bus(f"unix:path={tmp_path}/nothing-here"):
        pool = Pool()
        try:
            driver = bthome_driver(pool)
            with pytest.raises(DriverError, match="hci0: cannot reach the system D-Bus at unix:"):
                await driver.read()
        finally:
            await pool.close()


async def test_a_dropped_driver_stops_listening(bluez: BluezControl, pool: Pool) -> None:
    """The agent does not close a replaced driver whose bus key lives on in its successor."""
    old = bthome_driver(pool)
    new = bthome_driver(pool)
    await new.scan()
    del old
    gc.collect()
    await advertise(bluez, new, FIELD_ADVERT)
    assert len(pool.scanner(ADAPTER).registrations) == 1
    assert values(await new.read())["temperature"] == 22.48


async def test_pool_close_stops_the_scan(bluez: BluezControl) -> None:
    pool = Pool()
    driver = bthome_driver(pool)
    await driver.scan()
    adapter = f"/org/bluez/{ADAPTER}"
    assert (await bluez.method_calls(adapter))[-1] == "RegisterMonitor"
    await driver.close()
    await pool.close()
    assert (await bluez.method_calls(adapter))[-1] == "UnregisterMonitor"
    assert driver.scanner.started_at is None


async def test_active_scanning_when_bluez_refuses_passive(tmp_path: Path) -> None:
    """A bluetoothd without the advertisement monitor API (no --experimental)."""
    parameters = {"enable_monitor_api": False}
    with PrivateBluez(tmp_path / "b", parameters) as own, system_bus(own.address):
        pool = Pool()
        control = await BluezControl.connect(own.address)
        try:
            await control.add_adapter(ADAPTER)
            driver = bthome_driver(pool)
            await driver.scan()
            assert driver.scanner.mode == "active"
            assert driver.scanner.passive_refused
            await advertise(control, driver, FIELD_ADVERT)
            assert values(await driver.read())["humidity"] == 67.64
        finally:
            await control.close()
            await pool.close()


async def test_a_device_asking_for_active_scanning(bluez: BluezControl, pool: Pool) -> None:
    passive = bthome_driver(pool)
    await passive.scan()
    assert pool.scanner(ADAPTER).mode == "passive"
    active = bthome_driver(pool, address=CO2, scan="active")
    await active.scan()
    assert pool.scanner(ADAPTER).mode == "active"
    await advertise(bluez, passive, FIELD_ADVERT)
    assert values(await passive.read())["temperature"] == 22.48


# --- GATT -----------------------------------------------------------------------------------------

ESS_VALUES = {
    "2a6e": gatt.encode("2a6e", 21.37),
    "2a6f": gatt.encode("2a6f", 48.5),
    "2a6d": gatt.encode("2a6d", 101325.0),
}


async def ess_device(bluez: BluezControl, address: str = ESS) -> dict[str, str]:
    await bluez.add_device(ADAPTER, address, name="ESS", uuids=[ENVIRONMENTAL_SENSING])
    paths = await bluez.add_gatt_service(ADAPTER, address, ENVIRONMENTAL_SENSING, ESS_VALUES)
    paths |= await bluez.add_gatt_service(ADAPTER, address, "180f", {"2a19": b"\x57"})
    return paths


def gatt_driver(pool: Pool, address: str = ESS, **fields: object) -> GattDriver:
    driver = build(profile("gatt-environmental-sensor"), connection(address, **fields), pool)
    assert isinstance(driver, GattDriver)
    return driver


async def test_gatt_reads_the_characteristics(bluez: BluezControl, pool: Pool) -> None:
    driver = gatt_driver(pool, timeout_s=2)
    await driver.open()  # GATT: only starts the scan
    await ess_device(bluez)
    await bluez.advertise(ADAPTER, ESS, rssi=-70)  # the scanner hands over its BLEDevice
    await until(lambda: ESS in driver.scanner.devices)
    result = await driver.read()
    assert values(result) == {
        "temperature": 21.37,
        "humidity": 48.5,
        "pressure": 101325.0,
        "battery": 87,
    }
    assert result.rejected == []
    path = f"/org/bluez/{ADAPTER}/dev_{ESS.replace(':', '_')}"
    assert (await bluez.method_calls(path))[-2:] == ["Connect", "Disconnect"]
    assert not await bluez.connected(ADAPTER, ESS)
    assert driver.counters.connections == 1


async def test_gatt_without_a_scanned_device_connects_by_address(
    bluez: BluezControl, pool: Pool
) -> None:
    """Not heard by the shared scanner (e.g. passive scanning on a real adapter): bleak scans
    for the address itself; the sensor keeps advertising meanwhile."""
    driver = gatt_driver(pool, timeout_s=2)
    await ess_device(bluez)
    await driver.scan()
    assert ESS not in driver.scanner.devices

    async def keep_advertising() -> None:
        while True:
            await asyncio.sleep(0.05)
            await bluez.advertise(ADAPTER, ESS, rssi=-71)

    task = asyncio.create_task(keep_advertising())
    try:
        assert values(await driver.read())["humidity"] == 48.5
    finally:
        task.cancel()


async def test_gatt_refused_connection(bluez: BluezControl, pool: Pool) -> None:
    driver = gatt_driver(pool, timeout_s=2)
    await driver.scan()
    await ess_device(bluez)
    await bluez.set_connect(ADAPTER, ESS, "refuse")
    await bluez.advertise(ADAPTER, ESS, rssi=-70)
    await until(lambda: ESS in driver.scanner.devices)
    with pytest.raises(DeviceUnreachable) as caught:
        await driver.read()
    assert str(caught.value) == (
        f"{ESS}: connection refused (org.bluez.Error.Failed: le-connection-abort-by-remote "
        "(simulated: the device refuses)) (2 attempts)"
    )
    assert driver.counters.failed_attempts == 2
    path = f"/org/bluez/{ADAPTER}/dev_{ESS.replace(':', '_')}"
    assert (await bluez.method_calls(path)).count("Connect") == 2

    await bluez.set_connect(ADAPTER, ESS, "ok")
    assert values(await driver.read())["battery"] == 87


async def test_gatt_connection_that_hangs_is_bounded(bluez: BluezControl, pool: Pool) -> None:
    driver = gatt_driver(pool, timeout_s=0.2)
    await driver.scan()
    await ess_device(bluez)
    await bluez.set_connect(ADAPTER, ESS, "no-services")
    await bluez.advertise(ADAPTER, ESS, rssi=-70)
    await until(lambda: ESS in driver.scanner.devices)
    started = time.monotonic()
    with pytest.raises(DeviceUnreachable, match=r"no connection within 0.2 s \(2 attempts\)"):
        await driver.read()
    assert time.monotonic() - started < 1.5
    assert not await bluez.connected(ADAPTER, ESS)  # each attempt was cancelled cleanly


async def test_gatt_disconnect_mid_read(bluez: BluezControl, pool: Pool) -> None:
    driver = gatt_driver(pool, timeout_s=2)
    await driver.scan()
    chars = await ess_device(bluez)
    await bluez.advertise(ADAPTER, ESS, rssi=-70)
    await until(lambda: ESS in driver.scanner.devices)
    await bluez.set_read(chars["2a6f"], "disconnect")
    with pytest.raises(DriverError, match=f"{ESS}: disconnected while reading humidity"):
        await driver.read()
    assert driver.counters.dropped == 1

    await bluez.set_read(chars["2a6f"], "ok")
    await bluez.advertise(ADAPTER, ESS, rssi=-69)
    assert values(await driver.read())["humidity"] == 48.5  # the next poll connects again


async def test_gatt_refused_read_rejects_one_point(bluez: BluezControl, pool: Pool) -> None:
    driver = gatt_driver(pool, timeout_s=2)
    await driver.scan()
    chars = await ess_device(bluez)
    await bluez.set_read(chars["2a6d"], "error")
    await bluez.set_value(chars["2a6e"], gatt.encode("2a6e", None))
    await bluez.set_value(chars["2a19"], b"\x00\x01")  # two bytes: not a battery level
    await bluez.advertise(ADAPTER, ESS, rssi=-70)
    await until(lambda: ESS in driver.scanner.devices)
    result = await driver.read()
    assert values(result) == {"humidity": 48.5}
    rejected = dict(result.rejected)
    assert rejected["pressure"] == (
        "characteristic 2a6d unreadable: GATT Protocol Error: Read Not Permitted"
    )
    assert rejected["temperature"] == "the device reports 'value is not known'"
    assert rejected["battery"] == "characteristic 2a19 (battery_level) is 1 bytes, got 2: 0001"


async def test_gatt_connections_per_adapter_are_bounded(bluez: BluezControl) -> None:
    second = "C0:FF:EE:00:00:02"
    for bound, waits in ((1, True), (2, False)):
        await bluez.reset()
        await bluez.add_adapter(ADAPTER)
        pool = Pool(max_connections=bound, connect_attempts=1)
        try:
            slow = gatt_driver(pool, timeout_s=0.4)
            fast = gatt_driver(pool, second, timeout_s=2)
            await slow.scan()
            await fast.scan()
            for address in (ESS, second):
                await ess_device(bluez, address)
                await bluez.advertise(ADAPTER, address, rssi=-70)
            await bluez.set_connect(ADAPTER, ESS, "no-services")
            await until(scanned(pool.scanner(ADAPTER), ESS, second))
            started = time.monotonic()
            slow_read = asyncio.create_task(slow.read())
            await asyncio.sleep(0.02)
            assert values(await fast.read())["humidity"] == 48.5
            took = time.monotonic() - started
            with pytest.raises(DeviceUnreachable):
                await slow_read
            assert (took >= 0.35) is waits, (bound, took)
        finally:
            await pool.close()


# --- simulator ------------------------------------------------------------------------------------


async def test_simulated_sensors_are_read_by_the_driver(bluez: BluezControl, pool: Pool) -> None:
    sensors = [
        SimulatedBleSensor(
            id="room-12",
            address=THERMO,
            bind_key=KEY,
            interval_s=0.05,
            values={"temperature": 21.0, "humidity": 45.0, "battery": 90, "voltage": 2.95},
        ),
        SimulatedBleSensor(
            id="room-12-ess",
            address=ESS,
            mode="gatt",
            interval_s=0.05,
            values={"temperature": 20.0, "2a6f": 50.0, "pressure": 100000.0, "battery_level": 80},
        ),
    ]
    thermo = bthome_driver(pool, bind_key=KEY)
    ess = gatt_driver(pool, timeout_s=2)
    await thermo.scan()
    await ess.scan()
    simulation = BleSimulation(bluez, sensors)
    task = asyncio.create_task(simulation.run())
    try:
        await until(lambda: thermo.counters.accepted >= 3 and ESS in ess.scanner.devices)
        got = values(await thermo.read())
        assert abs(float(got["temperature"]) - 21.0) < 0.5  # type: ignore[arg-type]
        assert got["battery"] == 90 and got["battery_voltage"] == 2.95
        assert thermo.counters.malformed == thermo.counters.replayed == 0
        got = values(await ess.read())
        assert abs(float(got["humidity"]) - 50.0) < 1  # type: ignore[arg-type]
        assert got["battery"] == 80
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_serve_announces_its_bus(tmp_path: Path) -> None:
    lines: list[str] = []
    sensor = SimulatedBleSensor(id="s1", address=CO2, values={"co2": 640, "temperature": 21.0})
    task = asyncio.create_task(serve(tmp_path / "sim", [sensor], lines.append))
    try:
        await until(lambda: bool(lines), timeout=10)
        assert lines[0].startswith("DBUS_SYSTEM_BUS_ADDRESS=unix:path=")
        control = await BluezControl.connect(lines[0].split("=", 1)[1])
        try:
            path = f"/org/bluez/hci0/dev_{CO2.replace(':', '_')}"
            for _ in range(100):
                if path in await control.objects():
                    break
                await asyncio.sleep(0.02)
            device = (await control.objects())[path]["org.bluez.Device1"]
            data = bytes(device["ServiceData"].value[bthome.BTHOME_UUID].value)
            assert bthome.decode(data, CO2).as_dict()["co2"] == 640
        finally:
            await control.close()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert not (tmp_path / "sim" / "system_bus_socket").exists()


def test_simulated_sensor_spec_is_checked() -> None:
    with pytest.raises(ValueError, match="no BTHome object named 'co3'"):
        SimulatedBleSensor(id="x", address=CO2, values={"co3": 1})
    with pytest.raises(ValueError, match="no GATT characteristic 'co2'"):
        SimulatedBleSensor(id="x", address=ESS, mode="gatt", values={"co2": 1})


# --- profiles and the GATT codec ----------------------------------------------------------------


def ble_profile(text: str) -> BleProfile:
    return BleProfile.model_validate(
        {
            "vendor": "Acme",
            "model": "B1",
            "protocol": "ble",
            "kind": "sensor",
            "source": "x",
            **yaml.safe_load(text),
        }
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("mode: bthome\npoints: [{name: t, source: temprature}]", "'temprature' is not a BTHome"),
        ("mode: bthome\npoints: [{name: b, source: button}]", "is text: use type: string"),
        ("mode: bthome\npoints: [{name: r, source: rssi}]", "rssi is an int"),
        ("mode: gatt\npoints: [{name: t, source: '2a1c'}]", "no decoder for characteristic 2a1c"),
        ("mode: gatt\npoints: [{name: t, source: '2a6e', type: string}]", "is a number"),
        (
            "mode: bthome\npoints: [{name: t, source: temperature}]\ncommands: [{name: c}]",
            "BLE sensors take no commands",
        ),
        (
            "mode: bthome\npoints: [{name: t, source: temperature, poll_interval_s: 600}]",
            "BTHome sensors are push devices, they report when they advertise, and a GATT "
            "sensor is read whole at each poll: poll_interval_s does not apply to BLE points",
        ),
        (
            "mode: gatt\npoints: [{name: t, source: '2a6e', poll_interval_s: 600}]",
            "poll_interval_s does not apply to BLE points",
        ),
    ],
)
def test_bad_ble_profiles(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ble_profile(text)


@pytest.mark.parametrize("profile_id", ["bthome-co2-sensor", "gatt-environmental-sensor"])
def test_a_poll_interval_is_refused_at_its_line(tmp_path: Path, profile_id: str) -> None:
    """It would be silently ignored: adverts are pushed, GATT points are read all at once."""
    text = (Path(default_profiles_dir()) / f"{profile_id}.yaml").read_text()
    lines = text.splitlines(keepends=True)
    first = next(i for i, line in enumerate(lines) if line.startswith("  - name: "))
    lines.insert(first + 1, "    poll_interval_s: 600\n")
    bad = tmp_path / "acme-ble.yaml"
    bad.write_text("".join(lines))
    with pytest.raises(DocumentError) as caught:
        load_profile(bad)
    [problem] = caught.value.problems
    assert (problem.field, problem.line) == ("points.0", first + 1)
    assert "poll_interval_s does not apply to BLE points" in problem.message


def test_profile_sources_are_normalised() -> None:
    loaded = ble_profile(
        "mode: gatt\npoints: [{name: t, source: 00002A6E-0000-1000-8000-00805F9B34FB}]"
    )
    assert loaded.points[0].source == "2a6e"
    loaded = ble_profile("mode: bthome\npoints: [{name: t2, source: temperature_2}]")
    assert loaded.points[0].source == "temperature_2"


@pytest.mark.parametrize(
    ("uuid", "data", "value"),
    [
        ("2a6e", "e408", 22.76),
        ("2a6e", "dafd", -5.5),
        ("2a6e", "0080", None),  # 0x8000: not known
        ("2a6f", "b211", 45.3),
        ("2a6f", "ffff", None),
        ("2a6d", "02760f00", 101325.0),
        ("2a19", "57", 87),
        ("2a7b", "f6", -10),
        ("2a76", "07", 7),
        ("2b8c", "b004", 1200),
        ("2be7", "2c01", 300),
        ("0x2A19", "64", 100),
        ("00002a6f-0000-1000-8000-00805f9b34fb", "1027", 100.0),
    ],
)
def test_gatt_codec(uuid: str, data: str, value: float | None) -> None:
    assert gatt.decode(uuid, bytes.fromhex(data)) == value
    assert gatt.encode(uuid, value).hex() == data


@pytest.mark.parametrize(
    ("uuid", "data", "message"),
    [
        ("2a6e", "e4", "is 2 bytes, got 1: e4"),
        ("2a19", "65", "reads 101 %, outside 0..100"),
        ("2a6f", "1127", "reads 100.01 %RH, outside 0..100"),
    ],
)
def test_gatt_codec_refuses_bad_data(uuid: str, data: str, message: str) -> None:
    with pytest.raises(gatt.GattDecodeError, match=message):
        gatt.decode(uuid, bytes.fromhex(data))


def test_gatt_uuids() -> None:
    assert gatt.short_uuid("0x2A6E") == "2a6e"
    assert gatt.short_uuid("12345678-1234-5678-1234-56789abcdef0") is None
    assert gatt.full_uuid("2a19") == "00002a19-0000-1000-8000-00805f9b34fb"
    with pytest.raises(KeyError, match="no decoder for characteristic 2a1c"):
        gatt.characteristic("2a1c")
    with pytest.raises(ValueError, match="does not fit"):
        gatt.encode("2a19", 300)
