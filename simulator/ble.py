"""Simulated Bluetooth sensors on a BlueZ of our own: a private system D-Bus (`dbus-daemon`),
python-dbusmock's bluez5 template as bluetoothd, and sensors that advertise BTHome on their
interval or serve Environmental Sensing characteristics. bleak's real BlueZ backend (the agent's
BLE driver) talks to it as to a real adapter — for installers rehearsing a configuration on a
machine without Bluetooth, and for the tests (`tests/bluez_mock.py` is a thin layer over this).

Rules learnt on the mock (see FACTS.md): devices are added with `AddObject` and typed
dictionaries (`a{sv}` ServiceData, `a{qv}` ManufacturerData) plus an `InterfacesAdded` signal —
the template's `AddDevice` types them wrongly and bleak drops the advert; a new advert is an
`UpdateProperties` on Device1; GATT objects sit at BlueZ's paths (`…/service000c/char000d`).
How a simulated device behaves when connected or read (refuse, never resolve services, fail a
read, drop the link mid-read) is a property of our own interface `io.campusiot.Sim` on its object,
read by the device's D-Bus method code. Processes run in their own sessions and are always reaped.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from drivers.ble import bthome, gatt
from drivers.ble.connection import MAC_PATTERN
from simulator.model import Walk
from simulator.processes import stop_group
from wire.models import Id

BLUEZ = "org.bluez"
MOCK_IFACE = "org.freedesktop.DBus.Mock"
BLUEZ_MOCK_IFACE = "org.bluez.Mock"
ADAPTER_IFACE = "org.bluez.Adapter1"
DEVICE_IFACE = "org.bluez.Device1"
SERVICE_IFACE = "org.bluez.GattService1"
CHAR_IFACE = "org.bluez.GattCharacteristic1"
OBJECT_MANAGER_IFACE = "org.freedesktop.DBus.ObjectManager"
SIM_IFACE = "io.campusiot.Sim"
ENVIRONMENTAL_SENSING = "0000181a-0000-1000-8000-00805f9b34fb"
BATTERY_SERVICE = "0000180f-0000-1000-8000-00805f9b34fb"
ConnectBehaviour = Literal["ok", "refuse", "no-services"]
ReadBehaviour = Literal["ok", "error", "disconnect"]

_BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow receive_sender="*"/>
    <allow eavesdrop="true"/>
  </policy>
</busconfig>
"""

# D-Bus method bodies run by dbusmock (`self` is the mock object; `dbus`, `objects` its globals).
_CONNECT = """
mode = str(self.props.get('io.campusiot.Sim', {}).get('Connect', 'ok'))
if mode == 'refuse':
    raise dbus.exceptions.DBusException(
        'le-connection-abort-by-remote (simulated: the device refuses)',
        name='org.bluez.Error.Failed')
if not self.props['org.bluez.Device1']['Connected']:
    self.UpdateProperties('org.bluez.Device1', {'Connected': dbus.Boolean(True)})
if mode == 'ok':
    self.UpdateProperties('org.bluez.Device1', {'ServicesResolved': dbus.Boolean(True)})
"""
_DISCONNECT = """
if self.props['org.bluez.Device1']['Connected']:
    self.UpdateProperties('org.bluez.Device1', {
        'ServicesResolved': dbus.Boolean(False), 'Connected': dbus.Boolean(False)})
"""
_READ_VALUE = """
mode = str(self.props.get('io.campusiot.Sim', {}).get('Read', 'ok'))
char = self.props['org.bluez.GattCharacteristic1']
device = objects[str(char['Service']).rsplit('/', 1)[0]]
if not device.props['org.bluez.Device1']['Connected']:
    raise dbus.exceptions.DBusException('Not connected', name='org.bluez.Error.Failed')
if mode == 'disconnect':
    device.UpdateProperties('org.bluez.Device1', {
        'ServicesResolved': dbus.Boolean(False), 'Connected': dbus.Boolean(False)})
    raise dbus.exceptions.DBusException('Not connected', name='org.bluez.Error.Failed')
if mode == 'error':
    raise dbus.exceptions.DBusException('Read not permitted', name='org.bluez.Error.NotPermitted')
ret = dbus.Array(char['Value'], signature='y')
"""


class MockBluezError(RuntimeError):
    """The private bus or the mock BlueZ could not be started or refused a request."""


def device_path(adapter: str, address: str) -> str:
    return f"/org/bluez/{adapter}/dev_{address.upper().replace(':', '_')}"


# --- processes -----------------------------------------------------------------------------------


class PrivateBluez:
    """A private system bus and a mock bluetoothd on it, for as long as the context lasts.

    The agent (bleak) finds it through `DBUS_SYSTEM_BUS_ADDRESS=<address>`. The socket path must
    stay under the 108 bytes a unix socket allows: keep `workdir` short. `template_parameters`
    go to the bluez5 template (e.g. `{"enable_monitor_api": False}`: a bluetoothd without
    passive scanning)."""

    def __init__(self, workdir: Path, template_parameters: Mapping[str, Any] | None = None) -> None:
        self.workdir = workdir
        self.template_parameters = dict(template_parameters or {})
        self.socket_path = workdir / "system_bus_socket"
        self.address = f"unix:path={self.socket_path}"
        self.log_path = workdir / "bluez-mock.log"
        self.bus_log_path = workdir / "dbus-daemon.log"
        self._daemon: subprocess.Popen[bytes] | None = None
        self._mock: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PrivateBluez:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def environment(self) -> dict[str, str]:
        return {"DBUS_SYSTEM_BUS_ADDRESS": self.address}

    def start(self, timeout: float = 10.0) -> None:
        if len(str(self.socket_path)) > 100:
            raise MockBluezError(f"{self.socket_path} is too long for a unix socket path")
        daemon = shutil.which("dbus-daemon") or "/usr/bin/dbus-daemon"
        if not Path(daemon).exists():
            raise MockBluezError("dbus-daemon is not installed (Debian package 'dbus')")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.socket_path.unlink(missing_ok=True)
        config = self.workdir / "system-bus.conf"
        config.write_text(_BUS_CONFIG.format(socket=self.socket_path))
        deadline = time.monotonic() + timeout
        with self.bus_log_path.open("ab") as log:
            self._daemon = subprocess.Popen(
                [daemon, f"--config-file={config}", "--nofork", "--nopidfile"],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_for_socket(deadline)
            self.start_bluetoothd(deadline - time.monotonic())
        except BaseException:
            self.stop()
            raise

    def start_bluetoothd(self, timeout: float = 10.0) -> None:
        """The mock bluetoothd (again): a fresh one knows no adapter and no device."""
        with self.log_path.open("ab") as log:
            self._mock = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "dbusmock",
                    "--system",
                    "--template",
                    "bluez5",
                    "--parameters",
                    json.dumps(self.template_parameters),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **self.environment, "PYTHONUNBUFFERED": "1"},
            )
        _in_own_loop(_wait_for_bluez(self.address, self._mock, time.monotonic() + timeout))

    def stop_bluetoothd(self) -> None:
        """The mock bluetoothd goes away (crashed, or stopped by systemctl); the bus stays."""
        if self._mock is not None:
            stop_group(self._mock, timeout=5)
            self._mock = None

    def _wait_for_socket(self, deadline: float) -> None:
        assert self._daemon is not None
        while time.monotonic() < deadline:
            if self._daemon.poll() is not None:
                log = self.bus_log_path.read_text(errors="replace").strip()
                raise MockBluezError(f"dbus-daemon exited at start: {log[-500:]}")
            with socket.socket(socket.AF_UNIX) as probe:
                try:
                    probe.connect(str(self.socket_path))
                    return
                except OSError:
                    pass
            time.sleep(0.01)
        raise MockBluezError("dbus-daemon did not open its socket in time")

    def stop(self) -> None:
        self.stop_bluetoothd()
        if self._daemon is not None:
            stop_group(self._daemon, timeout=5)
            self._daemon = None
        self.socket_path.unlink(missing_ok=True)

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def _in_own_loop(coroutine: Awaitable[None]) -> None:
    """Runs `coroutine` to the end on a fresh event loop in a worker thread, so that a caller
    with or without a running loop of its own can wait for it."""

    async def run() -> None:
        await coroutine

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, run()).result()


async def _wait_for_bluez(address: str, mock: subprocess.Popen[bytes], deadline: float) -> None:
    """Until the mock answers GetManagedObjects with its template loaded (/org/bluez exists)."""
    bus = await MessageBus(bus_address=address, bus_type=BusType.SYSTEM).connect()
    try:
        while time.monotonic() < deadline:
            if mock.poll() is not None:
                raise MockBluezError(f"python -m dbusmock exited with {mock.returncode}")
            reply = await bus.call(
                Message(
                    destination=BLUEZ,
                    path="/",
                    interface=OBJECT_MANAGER_IFACE,
                    member="GetManagedObjects",
                )
            )
            if (
                reply is not None
                and reply.message_type is MessageType.METHOD_RETURN
                and "/org/bluez" in reply.body[0]
            ):
                return
            await asyncio.sleep(0.02)
        raise MockBluezError("the mock BlueZ did not come up in time")
    finally:
        bus.disconnect()


# --- control of the mock -------------------------------------------------------------------------


class BluezControl:
    """Drives the mock BlueZ over D-Bus: adapters, devices, adverts, GATT, faults."""

    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus
        self._handles: dict[str, Iterator[int]] = {}

    @classmethod
    async def connect(cls, address: str) -> BluezControl:
        bus = await MessageBus(bus_address=address, bus_type=BusType.SYSTEM).connect()
        return cls(bus)

    async def close(self) -> None:
        self.bus.disconnect()

    async def call(
        self,
        path: str,
        interface: str,
        member: str,
        signature: str = "",
        body: Sequence[Any] = (),
    ) -> list[Any]:
        reply = await self.bus.call(
            Message(
                destination=BLUEZ,
                path=path,
                interface=interface,
                member=member,
                signature=signature,
                body=list(body),
            )
        )
        if reply is None or reply.message_type is MessageType.ERROR:
            detail = reply.body[0] if reply is not None and reply.body else ""
            name = reply.error_name if reply is not None else "no reply"
            raise MockBluezError(f"{member} on {path}: {name} {detail}".strip())
        return list(reply.body)

    async def _emit_added(self, path: str, interfaces: Mapping[str, Mapping[str, Variant]]) -> None:
        await self.call(
            "/",
            MOCK_IFACE,
            "EmitSignal",
            "sssav",
            [
                OBJECT_MANAGER_IFACE,
                "InterfacesAdded",
                "oa{sa{sv}}",
                [Variant("o", path), Variant("a{sa{sv}}", dict(interfaces))],
            ],
        )

    async def reset(self) -> None:
        """Back to the template's start: no adapter, no device."""
        await self.call("/", MOCK_IFACE, "Reset")
        self._handles.clear()

    async def objects(self) -> dict[str, Any]:
        (managed,) = await self.call("/", OBJECT_MANAGER_IFACE, "GetManagedObjects")
        return dict(managed)

    # adapters

    async def add_adapter(self, adapter: str = "hci0") -> str:
        (path,) = await self.call(
            "/", BLUEZ_MOCK_IFACE, "AddAdapter", "ss", [adapter, "campus-sim"]
        )
        return str(path)

    async def set_powered(self, adapter: str, powered: bool) -> None:
        await self._update(
            f"/org/bluez/{adapter}", ADAPTER_IFACE, {"Powered": Variant("b", powered)}
        )

    async def remove_adapter(self, adapter: str) -> None:
        """The adapter and its devices disappear (a USB dongle pulled out)."""
        await self.call("/", BLUEZ_MOCK_IFACE, "RemoveAdapterWithDevices", "s", [adapter])
        self._handles = {k: v for k, v in self._handles.items() if f"/{adapter}/" not in k}

    # devices

    async def add_device(
        self,
        adapter: str,
        address: str,
        *,
        name: str | None = None,
        rssi: int = -65,
        service_data: Mapping[str, bytes] | None = None,
        manufacturer_data: Mapping[int, bytes] | None = None,
        uuids: Sequence[str] = (),
        connect: ConnectBehaviour = "ok",
    ) -> str:
        """A device BlueZ has just heard (its first advert), with typed advert properties."""
        path = device_path(adapter, address)
        props: dict[str, Variant] = {
            "Address": Variant("s", address.upper()),
            "AddressType": Variant("s", "public"),
            "Alias": Variant("s", name or address.upper().replace(":", "-")),
            "Adapter": Variant("o", f"/org/bluez/{adapter}"),
            "Paired": Variant("b", False),
            "Bonded": Variant("b", False),
            "Trusted": Variant("b", False),
            "Blocked": Variant("b", False),
            "LegacyPairing": Variant("b", False),
            "Connected": Variant("b", False),
            "ServicesResolved": Variant("b", False),
            "RSSI": Variant("n", rssi),
            "UUIDs": Variant("as", list(uuids)),
            "ServiceData": _service_data(service_data or {}),
            "ManufacturerData": _manufacturer_data(manufacturer_data or {}),
        }
        if name is not None:
            props["Name"] = Variant("s", name)
        methods = [
            ["Connect", "", "", _CONNECT],
            ["Disconnect", "", "", _DISCONNECT],
            ["ConnectProfile", "s", "", ""],
            ["DisconnectProfile", "s", "", ""],
            ["Pair", "", "", ""],
            ["CancelPairing", "", "", ""],
        ]
        await self.call(
            "/", MOCK_IFACE, "AddObject", "ssa{sv}a(ssss)", [path, DEVICE_IFACE, props, methods]
        )
        await self.call(
            path,
            MOCK_IFACE,
            "AddProperties",
            "sa{sv}",
            [SIM_IFACE, {"Connect": Variant("s", connect)}],
        )
        await self._emit_added(path, {DEVICE_IFACE: props})
        return path

    async def advertise(
        self,
        adapter: str,
        address: str,
        *,
        service_data: Mapping[str, bytes] | None = None,
        manufacturer_data: Mapping[int, bytes] | None = None,
        rssi: int | None = None,
        name: str | None = None,
    ) -> None:
        """A new advert from a known device (BlueZ updates its properties)."""
        props: dict[str, Variant] = {}
        if service_data is not None:
            props["ServiceData"] = _service_data(service_data)
        if manufacturer_data is not None:
            props["ManufacturerData"] = _manufacturer_data(manufacturer_data)
        if rssi is not None:
            props["RSSI"] = Variant("n", rssi)
        if name is not None:
            props["Name"] = Variant("s", name)
            props["Alias"] = Variant("s", name)
        await self._update(device_path(adapter, address), DEVICE_IFACE, props)

    async def remove_device(self, adapter: str, address: str) -> None:
        path = device_path(adapter, address)
        await self.call(f"/org/bluez/{adapter}", ADAPTER_IFACE, "RemoveDevice", "o", [path])

    async def set_connect(self, adapter: str, address: str, behaviour: ConnectBehaviour) -> None:
        """ok; refuse (Connect fails with org.bluez.Error.Failed); no-services (connects but
        never resolves its services: a connection that hangs)."""
        await self._update(
            device_path(adapter, address), SIM_IFACE, {"Connect": Variant("s", behaviour)}
        )

    async def connected(self, adapter: str, address: str) -> bool:
        path = device_path(adapter, address)
        (value,) = await self.call(
            path, "org.freedesktop.DBus.Properties", "Get", "ss", [DEVICE_IFACE, "Connected"]
        )
        return bool(value.value)

    async def method_calls(self, path: str) -> list[str]:
        """The D-Bus methods called on `path` so far, oldest first."""
        (calls,) = await self.call(path, MOCK_IFACE, "GetCalls")
        return [str(call[1]) for call in calls]

    # GATT

    async def add_gatt_service(
        self, adapter: str, address: str, service_uuid: str, values: Mapping[str, bytes]
    ) -> dict[str, str]:
        """A primary service with readable characteristics (UUID -> value); returns the object
        path of each characteristic by its short UUID."""
        device = device_path(adapter, address)
        handles = self._handles.setdefault(device, itertools.count(0x000C))
        service = f"{device}/service{next(handles):04x}"
        service_props = {
            "UUID": Variant("s", gatt.full_uuid(service_uuid)),
            "Device": Variant("o", device),
            "Primary": Variant("b", True),
            "Includes": Variant("ao", []),
        }
        await self.call(
            "/",
            MOCK_IFACE,
            "AddObject",
            "ssa{sv}a(ssss)",
            [service, SERVICE_IFACE, service_props, []],
        )
        await self._emit_added(service, {SERVICE_IFACE: service_props})
        paths: dict[str, str] = {}
        for uuid, value in values.items():
            char = f"{service}/char{next(handles):04x}"
            next(handles)  # the value handle
            char_props = {
                "UUID": Variant("s", gatt.full_uuid(uuid)),
                "Service": Variant("o", service),
                "Value": Variant("ay", bytes(value)),
                "Flags": Variant("as", ["read"]),
                "Notifying": Variant("b", False),
            }
            await self.call(
                "/",
                MOCK_IFACE,
                "AddObject",
                "ssa{sv}a(ssss)",
                [
                    char,
                    CHAR_IFACE,
                    char_props,
                    [
                        ["ReadValue", "a{sv}", "ay", _READ_VALUE],
                        ["WriteValue", "aya{sv}", "", ""],
                        ["StartNotify", "", "", ""],
                        ["StopNotify", "", "", ""],
                    ],
                ],
            )
            await self.call(
                char,
                MOCK_IFACE,
                "AddProperties",
                "sa{sv}",
                [SIM_IFACE, {"Read": Variant("s", "ok")}],
            )
            await self._emit_added(char, {CHAR_IFACE: char_props})
            paths[gatt.short_uuid(uuid) or uuid] = char
        return paths

    async def set_value(self, char_path: str, value: bytes) -> None:
        await self._update(char_path, CHAR_IFACE, {"Value": Variant("ay", bytes(value))})

    async def set_read(self, char_path: str, behaviour: ReadBehaviour) -> None:
        """ok; error (org.bluez.Error.NotPermitted); disconnect (the device drops the link
        during the read)."""
        await self._update(char_path, SIM_IFACE, {"Read": Variant("s", behaviour)})

    async def _update(self, path: str, interface: str, props: Mapping[str, Variant]) -> None:
        await self.call(path, MOCK_IFACE, "UpdateProperties", "sa{sv}", [interface, dict(props)])


def _service_data(data: Mapping[str, bytes]) -> Variant:
    return Variant("a{sv}", {uuid: Variant("ay", bytes(value)) for uuid, value in data.items()})


def _manufacturer_data(data: Mapping[int, bytes]) -> Variant:
    return Variant("a{qv}", {company: Variant("ay", bytes(v)) for company, v in data.items()})


# --- simulated sensors ---------------------------------------------------------------------------


def _gatt_key(key: str) -> str:
    """A characteristic named by UUID ("2a6e") or by name ("temperature") -> its short UUID."""
    short = gatt.short_uuid(key)
    if short is not None and short in gatt.CHARACTERISTICS:
        return short
    for spec in gatt.CHARACTERISTICS.values():
        if spec.name == key:
            return spec.uuid
    known = ", ".join(f"{c.uuid}/{c.name}" for c in gatt.CHARACTERISTICS.values())
    raise ValueError(f"no GATT characteristic {key!r} (known: {known})")


class SimulatedBleSensor(BaseModel):
    """A BLE sensor of a scenario. `values` are BTHome object names (bthome) or characteristic
    UUIDs or names (gatt) with their starting values; numbers drift a little on each advert."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: Id
    address: Annotated[str, Field(pattern=MAC_PATTERN), AfterValidator(str.upper)]
    adapter: Annotated[str, Field(pattern=r"^hci\d{1,2}$")] = "hci0"
    mode: Literal["bthome", "gatt"] = "bthome"
    name: Annotated[str, Field(min_length=1, max_length=29)] | None = None
    interval_s: Annotated[float, Field(gt=0, le=3600)] = 10.0
    bind_key: Annotated[str, Field(pattern=r"^[0-9A-Fa-f]{32}$")] | None = None
    values: dict[str, float | int | bool] = Field(
        default_factory=lambda: {"temperature": 21.0, "humidity": 45.0, "battery": 95}
    )
    drift: bool = True
    rssi: Annotated[int, Field(ge=-127, le=20)] = -65
    seed: int = 0

    @model_validator(mode="after")
    def _encodable(self) -> SimulatedBleSensor:
        if self.mode == "bthome":
            try:
                bthome.encode(list(self.values.items()))
            except ValueError as exc:
                raise ValueError(f"values: {exc}") from None
        else:
            if self.bind_key is not None:
                raise ValueError("bind_key applies to BTHome sensors only")
            for key, value in self.values.items():
                gatt.encode(_gatt_key(key), value)
        return self


@dataclass
class SensorState:
    """What one simulated sensor advertised last, and how its values move."""

    spec: SimulatedBleSensor
    rng: random.Random
    walks: dict[str, Walk] = field(default_factory=dict)
    current: dict[str, float | int | bool] = field(default_factory=dict)
    packet_id: int = 0
    counter: int = 0
    adverts: int = 0
    last_s: float | None = None
    char_paths: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, spec: SimulatedBleSensor) -> SensorState:
        rng = random.Random(spec.seed)
        state = cls(spec, rng, counter=rng.randrange(1, 1 << 16))
        for key, value in spec.values.items():
            state.current[key] = value
            fixed = isinstance(value, bool) or not spec.drift or "battery" in key
            if not fixed:
                sigma = max(abs(float(value)) * 0.0005, 0.005)
                state.walks[key] = Walk(float(value), 600.0, sigma)
        return state

    def step(self, now_s: float) -> None:
        dt = 0.0 if self.last_s is None else now_s - self.last_s
        self.last_s = now_s
        for key, walk in self.walks.items():
            start = self.spec.values[key]
            moved = walk.step(float(start), dt, self.rng)
            self.current[key] = round(moved) if isinstance(start, int) else round(moved, 2)

    def service_data(self) -> bytes:
        """The next BTHome advert (a new packet id, and a new counter when encrypted)."""
        self.packet_id = (self.packet_id + 1) % 256
        self.counter += 1
        encrypted = self.spec.bind_key is not None
        return bthome.encode(
            list(self.current.items()),
            packet_id=self.packet_id,
            mac=self.spec.address if encrypted else None,
            bind_key=self.spec.bind_key,
            counter=self.counter if encrypted else None,
        )

    def characteristics(self) -> dict[str, bytes]:
        return {_gatt_key(key): gatt.encode(_gatt_key(key), v) for key, v in self.current.items()}


class BleSimulation:
    """Simulated sensors on the mock BlueZ: `setup()` adds them, `run()` keeps them advertising
    on their interval until cancelled."""

    def __init__(
        self,
        control: BluezControl,
        sensors: Sequence[SimulatedBleSensor],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        ids = [sensor.id for sensor in sensors]
        if len(set(ids)) != len(ids):
            raise ValueError("simulated BLE sensors need distinct ids")
        self.control = control
        self.clock = clock
        self.sensors = {sensor.id: SensorState.of(sensor) for sensor in sensors}

    async def setup(self) -> None:
        present = set(await self.control.objects())
        for adapter in sorted({s.spec.adapter for s in self.sensors.values()}):
            if f"/org/bluez/{adapter}" not in present:
                await self.control.add_adapter(adapter)
        for state in self.sensors.values():
            await self._add(state)

    async def _add(self, state: SensorState) -> None:
        spec = state.spec
        state.step(self.clock())
        if spec.mode == "bthome":
            await self.control.add_device(
                spec.adapter,
                spec.address,
                name=spec.name,
                rssi=spec.rssi,
                service_data={bthome.BTHOME_UUID: state.service_data()},
            )
        else:
            await self.control.add_device(
                spec.adapter,
                spec.address,
                name=spec.name,
                rssi=spec.rssi,
                uuids=[ENVIRONMENTAL_SENSING],
            )
            chars = state.characteristics()
            battery = {k: v for k, v in chars.items() if k == "2a19"}
            sensing = {k: v for k, v in chars.items() if k != "2a19"}
            if sensing:
                state.char_paths |= await self.control.add_gatt_service(
                    spec.adapter, spec.address, ENVIRONMENTAL_SENSING, sensing
                )
            if battery:
                state.char_paths |= await self.control.add_gatt_service(
                    spec.adapter, spec.address, BATTERY_SERVICE, battery
                )
        state.adverts += 1

    async def advertise(self, sensor_id: str) -> None:
        """One advert now (a BTHome packet; for a GATT sensor, new characteristic values and a
        connectable advert that refreshes its RSSI)."""
        state = self.sensors[sensor_id]
        spec = state.spec
        state.step(self.clock())
        rssi = spec.rssi + state.rng.randint(-3, 3)
        if spec.mode == "bthome":
            await self.control.advertise(
                spec.adapter,
                spec.address,
                service_data={bthome.BTHOME_UUID: state.service_data()},
                rssi=rssi,
            )
        else:
            for uuid, value in state.characteristics().items():
                await self.control.set_value(state.char_paths[uuid], value)
            await self.control.advertise(spec.adapter, spec.address, rssi=rssi)
        state.adverts += 1

    async def run(self) -> None:
        await self.setup()
        async with asyncio.TaskGroup() as group:
            for sensor_id in self.sensors:
                group.create_task(self._advertise_forever(sensor_id), name=f"ble:{sensor_id}")

    async def _advertise_forever(self, sensor_id: str) -> None:
        state = self.sensors[sensor_id]
        interval = state.spec.interval_s
        await asyncio.sleep(state.rng.uniform(0, interval))  # sensors are not in step
        while True:
            await self.advertise(sensor_id)
            await asyncio.sleep(interval)


async def serve(
    workdir: Path,
    sensors: Sequence[SimulatedBleSensor],
    announce: Callable[[str], None] = print,
) -> None:
    """For `campus-sim`: a private bus and mock BlueZ with `sensors` advertising, until
    cancelled. `announce` gets the line to give the agent: DBUS_SYSTEM_BUS_ADDRESS=…"""
    bluez = PrivateBluez(workdir)
    await asyncio.to_thread(bluez.start)
    try:
        announce(f"DBUS_SYSTEM_BUS_ADDRESS={bluez.address}")
        control = await BluezControl.connect(bluez.address)
        try:
            await BleSimulation(control, sensors).run()
        finally:
            await control.close()
    finally:
        await asyncio.to_thread(bluez.stop)
