"""One BLE scanner per Bluetooth adapter, shared by every BLE device of the gateway, and the
adapter's state as BlueZ reports it.

Rules: the scanner starts on the first read of a device on its adapter: passive (a BlueZ
advertisement monitor matching BTHome service data, and the advertised names devices are known
by) unless a device asks for active scanning or BlueZ refuses passive (bluetoothd without
--experimental), then active. The adapter's state (missing, powered off, bluetoothd gone) comes
from BlueZ's own signals; when the adapter comes back the scanner restarts by itself. Adverts go
to listeners by address, or by advertised name for sensors that rotate their address; a listener
runs on the event loop, must be quick, and one that raises is logged, never fatal.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from bleak import BleakScanner
from bleak.args.bluez import BlueZScannerArgs, OrPattern, OrPatternLike
from bleak.assigned_numbers import AdvertisementDataType
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData
from bleak.exc import BleakError
from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus
from dbus_fast.errors import DBusFastError

from drivers.ble.bthome import UUID16_LE
from drivers.errors import DriverError

log = logging.getLogger(__name__)

BLUEZ = "org.bluez"
ADAPTER_IFACE = "org.bluez.Adapter1"
DEFAULT_SYSTEM_BUS = "unix:path=/var/run/dbus/system_bus_socket"
BTHOME_PATTERN = OrPattern(0, AdvertisementDataType.SERVICE_DATA_UUID16, UUID16_LE)
_NO_BLUEZ = (
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
)

ScanMode = Literal["passive", "active"]


@dataclass(frozen=True, slots=True)
class Advert:
    """One advert as bleak reports it: BlueZ's current view of the device."""

    address: str
    name: str | None
    rssi: int | None
    service_data: Mapping[str, bytes]
    at: float  # time.monotonic()


Listener = Callable[[Advert], None]


@dataclass(eq=False)
class Registration:
    """A device listening on a scanner: by `address`, or by `name` when it is given. The
    listener is held weakly: a driver dropped without `close()` (the agent keeps no closed
    drivers, but does not close a replaced one whose bus key lives on) stops listening."""

    address: str
    name: str | None
    mode: ScanMode
    listener: weakref.WeakMethod[Listener]

    @classmethod
    def of(cls, address: str, name: str | None, mode: ScanMode, listener: Listener) -> Registration:
        return cls(address, name, mode, weakref.WeakMethod(listener))


def system_bus_address() -> str:
    return os.environ.get("DBUS_SYSTEM_BUS_ADDRESS", DEFAULT_SYSTEM_BUS)


class AdapterWatch:
    """Whether `hciN` exists and is powered, kept current from BlueZ's signals on our own
    D-Bus connection. `problem` is None when the adapter is usable, else what is wrong;
    `generation` grows each time it becomes usable again, and `on_back` is called then."""

    def __init__(self, adapter: str, on_back: Callable[[], None]) -> None:
        self.adapter = adapter
        self.path = f"/org/bluez/{adapter}"
        self.on_back = on_back
        self.problem: str | None = "not checked yet"
        self.generation = 0
        self._bus: MessageBus | None = None
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    async def ensure(self) -> None:
        """Connected to the system bus, with the adapter's state known; DriverError when the
        system bus cannot be reached."""
        async with self._lock:
            if self._bus is not None and self._bus.connected:
                return
            bus = MessageBus(bus_type=BusType.SYSTEM)
            try:
                await bus.connect()
                bus.add_message_handler(self._on_message)
                for rule in self._rules():
                    await _call(bus, "AddMatch", [rule])
                self._bus = bus
                self.problem = "not checked yet"  # a new connection: BlueZ may have restarted
                await self._query()
            except (OSError, EOFError, DBusFastError) as exc:
                bus.disconnect()
                self._bus = None
                raise DriverError(
                    f"{self.adapter}: cannot reach the system D-Bus at {system_bus_address()} "
                    f"({exc or type(exc).__name__}): is dbus running?"
                ) from None

    def _rules(self) -> list[str]:
        bluez = f"type='signal',sender='{BLUEZ}'"
        manager = f"{bluez},interface='org.freedesktop.DBus.ObjectManager'"
        return [
            f"{bluez},path='{self.path}',interface='org.freedesktop.DBus.Properties',"
            "member='PropertiesChanged'",
            f"{manager},member='InterfacesAdded',arg0path='{self.path}'",
            f"{manager},member='InterfacesRemoved',arg0path='{self.path}'",
            "type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',"
            f"member='NameOwnerChanged',arg0='{BLUEZ}'",
        ]

    async def _query(self) -> None:
        assert self._bus is not None
        reply = await self._bus.call(
            Message(
                destination=BLUEZ,
                path=self.path,
                interface="org.freedesktop.DBus.Properties",
                member="GetAll",
                signature="s",
                body=[ADAPTER_IFACE],
            )
        )
        if reply is None:
            return
        if reply.message_type is MessageType.ERROR:
            if reply.error_name in _NO_BLUEZ:
                self._set("BlueZ (bluetoothd) is not running")
            else:
                self._set(f"Bluetooth adapter {self.adapter} not found")
            return
        powered = reply.body[0].get("Powered")
        self._set(None if powered is not None and powered.value else self._off())

    def _off(self) -> str:
        return f"{self.adapter} is powered off"

    def _set(self, problem: str | None) -> None:
        was, self.problem = self.problem, problem
        if problem == was:
            return
        if problem is None:
            self.generation += 1
            if was != "not checked yet":
                log.info("Bluetooth adapter %s is back", self.adapter)
                self.on_back()
        else:
            log.warning("Bluetooth: %s", problem)

    def _on_message(self, message: Message) -> None:
        if message.message_type is not MessageType.SIGNAL:
            return
        body = message.body
        if message.member == "PropertiesChanged" and message.path == self.path:
            interface, changed = body[0], body[1]
            if interface == ADAPTER_IFACE and "Powered" in changed:
                self._set(None if changed["Powered"].value else self._off())
        elif message.member == "InterfacesAdded" and body[0] == self.path:
            props = body[1].get(ADAPTER_IFACE)
            if props is not None:
                powered = props.get("Powered")
                self._set(None if powered is not None and powered.value else self._off())
        elif message.member == "InterfacesRemoved" and body[0] == self.path:
            if ADAPTER_IFACE in body[1]:
                self._set(f"Bluetooth adapter {self.adapter} not found")
        elif message.member == "NameOwnerChanged" and body[0] == BLUEZ:
            if body[2]:  # bluetoothd (re)started: ask it afresh
                task = asyncio.get_running_loop().create_task(self._requery())
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            else:
                self._set("BlueZ (bluetoothd) is not running")

    async def _requery(self) -> None:
        try:
            await self._query()
        except (OSError, EOFError, DBusFastError) as exc:
            log.warning("%s: asking BlueZ for the adapter failed: %s", self.adapter, exc)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._bus is not None:
            self._bus.disconnect()
            self._bus = None


async def _call(bus: MessageBus, member: str, body: list[Any]) -> None:
    """A method of the bus itself (AddMatch), which must succeed."""
    reply = await bus.call(
        Message(
            destination="org.freedesktop.DBus",
            path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus",
            member=member,
            signature="s",
            body=body,
        )
    )
    if reply is not None and reply.message_type is MessageType.ERROR:
        raise DBusFastError(f"{member}: {reply.error_name} {reply.body}")


class Scanner:
    """The scanner of one adapter and the devices listening on it."""

    def __init__(self, adapter: str) -> None:
        self.adapter = adapter
        self.watch = AdapterWatch(adapter, self._adapter_back)
        self.registrations: list[Registration] = []
        #: the latest BLEDevice bleak reported for each device (for GATT connections)
        self.devices: dict[str, BLEDevice] = {}
        #: time.monotonic() when scanning last (re)started; None while not scanning
        self.started_at: float | None = None
        self.mode: ScanMode | None = None
        #: why BlueZ refused passive scanning, once it did (the adapter then scans actively)
        self.passive_refused: str | None = None
        self._bleak: BleakScanner | None = None
        self._running: tuple[ScanMode, tuple[OrPatternLike, ...]] | None = None
        self._generation = -1
        self._lock = asyncio.Lock()
        self._by_address: dict[str, list[Registration]] = {}
        self._by_name: dict[str, list[Registration]] = {}
        self._restart: asyncio.Task[None] | None = None

    def add(self, registration: Registration) -> None:
        self.registrations.append(registration)
        self._index()

    def remove(self, registration: Registration) -> None:
        if registration in self.registrations:
            self.registrations.remove(registration)
            self._index()

    def _index(self) -> None:
        self._by_address, self._by_name = {}, {}
        for reg in self.registrations:
            if reg.name is not None:
                self._by_name.setdefault(reg.name, []).append(reg)
            else:
                self._by_address.setdefault(reg.address, []).append(reg)

    def _wanted(self) -> tuple[ScanMode, tuple[OrPatternLike, ...]]:
        names = sorted({reg.name for reg in self.registrations if reg.name is not None})
        patterns: list[OrPatternLike] = [BTHOME_PATTERN]
        for name in names:
            patterns.append(OrPattern(0, AdvertisementDataType.COMPLETE_LOCAL_NAME, name.encode()))
        active = self.passive_refused is not None or any(
            reg.mode == "active" for reg in self.registrations
        )
        return ("active", ()) if active else ("passive", tuple(patterns))

    async def ensure(self) -> None:
        """Scanning on a usable adapter, in the mode the devices want; DriverError naming the
        adapter's problem otherwise (missing, powered off, bluetoothd not running)."""
        await self.watch.ensure()
        if self.watch.problem is not None:
            raise DriverError(self.watch.problem)
        async with self._lock:
            wanted = self._wanted()
            current = self._running == wanted and self._generation == self.watch.generation
            if self._bleak is not None and current:
                return
            await self._stop_bleak()
            generation = self.watch.generation
            await self._start(*wanted)
            self._running = self._wanted()  # passive may have been refused meanwhile
            self._generation = generation

    async def _start(self, mode: ScanMode, patterns: tuple[OrPatternLike, ...]) -> None:
        active: BlueZScannerArgs = {"adapter": self.adapter}
        passive: BlueZScannerArgs = {"adapter": self.adapter, "or_patterns": list(patterns)}
        refused = ""
        if mode == "passive":
            scanner = BleakScanner(
                self._on_advert,
                scanning_mode="passive",
                bluez=passive,
            )
            try:
                await scanner.start()
                self._started(scanner, "passive")
                return
            except (BleakError, OSError, EOFError, DBusFastError) as exc:
                refused = str(exc) or type(exc).__name__
        scanner = BleakScanner(self._on_advert, scanning_mode="active", bluez=active)
        try:
            await scanner.start()
        except (BleakError, OSError, EOFError, DBusFastError) as exc:
            why = str(exc) or type(exc).__name__
            raise DriverError(f"{self.adapter}: cannot scan for BLE adverts: {why}") from None
        if refused:
            log.warning(
                "%s: passive scanning refused (%s); scanning actively instead",
                self.adapter,
                refused,
            )
            self.passive_refused = refused
        self._started(scanner, "active")

    def _started(self, scanner: BleakScanner, mode: ScanMode) -> None:
        self._bleak = scanner
        self.mode = mode
        self.started_at = time.monotonic()
        log.info("%s: scanning for BLE adverts (%s)", self.adapter, mode)

    async def _stop_bleak(self) -> None:
        scanner, self._bleak = self._bleak, None
        self.started_at = self.mode = self._running = None
        if scanner is None:
            return
        try:
            await scanner.stop()
        except Exception as exc:  # teardown of a scan the adapter may already have ended
            log.debug("%s: stopping the scan: %r", self.adapter, exc)

    def _adapter_back(self) -> None:
        if not self.registrations:
            return
        if self._restart is None or self._restart.done():
            self._restart = asyncio.get_running_loop().create_task(self._restart_scan())

    async def _restart_scan(self) -> None:
        try:
            await self.ensure()
        except DriverError as exc:
            log.warning("%s: scanning again failed: %s", self.adapter, exc)

    def _on_advert(self, device: BLEDevice, data: AdvertisementData) -> None:
        address = device.address.upper()
        targets = self._by_address.get(address, [])
        if data.local_name is not None and data.local_name in self._by_name:
            targets = targets + self._by_name[data.local_name]
        if not targets:
            return
        for reg in targets:  # kept for the devices of this gateway only: phones rotate addresses
            self.devices[reg.address] = device
        advert = Advert(address, data.local_name, data.rssi, data.service_data, time.monotonic())
        for reg in targets:
            listener = reg.listener()
            if listener is None:
                self.remove(reg)
                continue
            try:
                listener(advert)
            except Exception:  # one device's bug must not stop the others' adverts
                log.exception("%s: handling an advert from %s failed", self.adapter, address)

    async def close(self) -> None:
        if self._restart is not None:
            self._restart.cancel()
        async with self._lock:
            await self._stop_bleak()
        await self.watch.close()
