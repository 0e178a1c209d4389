"""BLE driver: BTHome sensors heard through the adapter's shared scanner, GATT sensors read over
a short connection on each poll.

Rules. BTHome (`mode: bthome`): every advert carrying BTHome service data is decoded with the
device's bind key; a repeated advert (same bytes, or same packet id) only proves the sensor is
alive; an encrypted advert whose counter is not above the last one is a replay and is refused,
unless the counter keeps rising from its new start while the sensor is otherwise silent (it
restarted); the last accepted counter of each sensor outlives the driver (kept by the pool,
and saved in the gateway's data directory when the pool has one), so neither a pushed config
nor an agent restart opens a gap for replays; a malformed advert (wrong key, truncated, unknown
object) is counted and changes nothing. `read()` returns the latest value of each point, and
fails when nothing valid was heard for `offline_after` × the advert interval; `open()` (the
installer's probe, never the agent's coordinator) waits up to one advert interval for a valid
advert and fails when none came.
GATT (`mode: gatt`): connect, read the profile's characteristics, disconnect; a connection
attempt is bounded by `timeout_s` and retried with back-off; at most `max_connections`
connections per adapter at a time. An adapter that is missing or powered off fails every read
of its devices with a clear DriverError.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bleak import BleakClient
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.device import BLEDevice
from bleak.exc import (
    BleakDBusError,
    BleakDeviceNotFoundError,
    BleakError,
    BleakGATTProtocolError,
)
from dbus_fast.errors import DBusFastError

from drivers.base import Driver, PollResult, Value
from drivers.ble import bthome, gatt
from drivers.ble.connection import BleConnection
from drivers.ble.counters import FILE_NAME, CounterStore, key_id
from drivers.ble.profile import BlePoint, BleProfile
from drivers.ble.scanner import Advert, Registration, Scanner
from drivers.errors import DeviceTimeout, DeviceUnreachable, DriverError

log = logging.getLogger(__name__)

#: adverts accepted before a point missing from them is reported (some sensors alternate packets)
_ADVERTS_BEFORE_MISSING = 3

#: drivers.registry gives this module's Pool the gateway's data directory
POOL_TAKES_STATE_DIR = True


class Pool:
    """What every BLE device of a gateway shares: one scanner per adapter, a bound on the GATT
    connections each adapter holds at once, and the last accepted BTHome counters (in
    `state_dir`, when given, else in memory only)."""

    def __init__(
        self,
        *,
        max_connections: int = 1,
        connect_attempts: int = 2,
        retry_delay_s: float = 0.5,
        state_dir: Path | None = None,
        save_interval_s: float = 60.0,
    ) -> None:
        if max_connections < 1 or connect_attempts < 1 or retry_delay_s < 0:
            raise ValueError("max_connections and connect_attempts ≥ 1, retry_delay_s ≥ 0")
        self.max_connections = max_connections
        self.connect_attempts = connect_attempts
        self.retry_delay_s = retry_delay_s
        self._scanners: dict[str, Scanner] = {}
        self._slots: dict[str, asyncio.Semaphore] = {}
        self.counters = CounterStore(
            None if state_dir is None else state_dir / FILE_NAME, save_interval_s=save_interval_s
        )

    def scanner(self, adapter: str) -> Scanner:
        if adapter not in self._scanners:
            self._scanners[adapter] = Scanner(adapter)
        return self._scanners[adapter]

    def slots(self, adapter: str) -> asyncio.Semaphore:
        if adapter not in self._slots:
            self._slots[adapter] = asyncio.Semaphore(self.max_connections)
        return self._slots[adapter]

    async def close(self) -> None:
        scanners, self._scanners = list(self._scanners.values()), {}
        for scanner in scanners:
            await scanner.close()
        await self.counters.close()


def build(profile: BleProfile, connection: BleConnection, pool: Pool) -> Driver:
    if profile.mode == "bthome":
        return BthomeDriver(profile, connection, pool)
    return GattDriver(profile, connection, pool)


class _BleDriver(Driver):
    def __init__(self, profile: BleProfile, connection: BleConnection, pool: Pool) -> None:
        self.profile = profile
        self.connection = connection
        self.address = connection.address
        self.bus = f"ble://{connection.adapter}/{connection.address}"
        self.pool = pool
        self.scanner = pool.scanner(connection.adapter)
        self._registration: Registration | None = None
        self._listen()  # adverts count from the moment any device starts the scan

    def _listen(self) -> None:
        if self._registration is None:
            self._registration = Registration.of(
                self.address, self.connection.local_name, self.connection.scan, self._on_advert
            )
            self.scanner.add(self._registration)

    def _on_advert(self, advert: Advert) -> None:
        pass

    async def scan(self) -> None:
        """Listening, with the adapter's scan running; does not wait for an advert."""
        self._listen()
        await self.scanner.ensure()

    async def open(self) -> None:
        await self.scan()

    async def close(self) -> None:
        if self._registration is not None:
            self.scanner.remove(self._registration)
            self._registration = None

    async def command(
        self, name: str, argument: Any = None, options: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        raise ValueError(f"{self.address}: BLE sensors take no commands")


# --- BTHome --------------------------------------------------------------------------------------


@dataclass(slots=True)
class BthomeCounters:
    adverts: int = 0  # BTHome adverts heard (repeats included)
    accepted: int = 0  # new measurements taken
    duplicates: int = 0  # the same advert or packet id again
    malformed: int = 0  # refused: wrong key, truncated, unknown object, not encrypted…
    replayed: int = 0  # refused: encryption counter not above the last one


class BthomeDriver(_BleDriver):
    def __init__(self, profile: BleProfile, connection: BleConnection, pool: Pool) -> None:
        super().__init__(profile, connection, pool)
        self.key = bytes.fromhex(connection.bind_key) if connection.bind_key else None
        self._key_id = key_id(self.key) if self.key is not None else ""
        self.interval_s = connection.advert_interval_s or profile.advert_interval_s
        self.window_s = self.interval_s * profile.offline_after
        self.counters = BthomeCounters()
        self.values: dict[str, Value] = {}
        self.rssi: int | None = None
        self.last_heard: float | None = None  # any BTHome advert
        self.last_good: float | None = None  # an advert accepted, or a repeat of one
        self.problem: str | None = None  # why the last advert was refused
        self._last_data: bytes | None = None
        self._last_data_good = False
        self._packet_id: int | None = None
        # the floor a new driver starts from: what the pool remembers of this sensor
        self._counter = pool.counters.get(connection.adapter, self.address, self._key_id)
        self._listening_since = time.monotonic()
        self._rising: tuple[int, int] | None = None  # (replays in a row rising, last counter)
        self._alive = asyncio.Event()  # set by each valid advert, for open()

    # adverts

    def _on_advert(self, advert: Advert) -> None:
        data = advert.service_data.get(bthome.BTHOME_UUID)
        if data is None:
            return
        self.counters.adverts += 1
        self.last_heard = advert.at
        if advert.rssi is not None:
            self.rssi = advert.rssi
        if data == self._last_data:  # BlueZ repeats the service data with each new RSSI
            self.counters.duplicates += 1
            if self._last_data_good:
                self._good(advert.at)
            return
        self._last_data = bytes(data)
        self._last_data_good = False
        try:
            parsed = bthome.decode(data, advert.address, self.key, self._counter)
        except bthome.BthomeReplay as replay:
            self.counters.replayed += 1
            if not self._restarted(replay, advert.at):
                self._refused(
                    advert, f"replayed advert refused (counter {replay.counter} ≤ {replay.last})"
                )
                return
            parsed = replay.advert
        except bthome.BthomeError as exc:
            self.counters.malformed += 1
            self._refused(advert, f"malformed advert: {exc}")
            return
        if parsed.unknown_ids:
            self.counters.malformed += 1
            self._refused(
                advert, f"advert with unknown BTHome object 0x{parsed.unknown_ids[0]:02x} ignored"
            )
            return
        self._last_data_good = True
        self._good(advert.at)
        if parsed.counter is not None and parsed.counter != self._counter:
            self._counter = parsed.counter
            self.pool.counters.put(
                self.connection.adapter, self.address, self._key_id, parsed.counter
            )
        if parsed.packet_id is not None and parsed.packet_id == self._packet_id:
            self.counters.duplicates += 1
            return
        self._packet_id = parsed.packet_id
        self.counters.accepted += 1
        self.values.update(parsed.values)
        if self.problem is not None:
            log.info("%s: adverts are accepted again", self.address)
            self.problem = None

    def _good(self, at: float) -> None:
        self.last_good = at
        self._alive.set()

    def _refused(self, advert: Advert, why: str) -> None:
        if self.problem is None:
            log.warning("%s (heard as %s): %s", self.address, advert.address, why)
        else:
            log.debug("%s: %s", self.address, why)
        self.problem = why

    def _restarted(self, replay: bthome.BthomeReplay, at: float) -> bool:
        """True when authentic adverts keep coming with a rising counter below the last one
        accepted while the sensor has been silent for its offline window: it restarted and its
        counter began again. Anything shorter stays a replay. Silence counts from the last
        advert accepted, or from when this driver began listening: after an agent restart the
        saved counter holds for one window at least."""
        run, last = self._rising or (0, -1)
        run = run + 1 if replay.counter > last else 1
        self._rising = (run, replay.counter)
        quiet_since = self.last_good
        if quiet_since is None:
            quiet_since = max(self._listening_since, self.scanner.started_at or 0.0)
        silent = at - quiet_since > self.window_s
        if run < self.profile.offline_after or not silent:
            return False
        log.warning(
            "%s: encryption counter restarted (%d after %d): the sensor restarted",
            self.address,
            replay.counter,
            replay.last,
        )
        self._rising = None
        return True

    # polls

    async def open(self) -> None:
        """Scans and waits, up to one advert interval, for a valid advert of this sensor, so
        that a one-off probe shows values; DriverError when none came. The agent's coordinator
        never calls it: the daemon starts without waiting for its sensors."""
        await self.scan()
        self._alive.clear()
        started = time.monotonic()
        if self.last_good is not None and started - self.last_good <= self.window_s:
            return
        try:
            async with asyncio.timeout(self.interval_s):
                await self._alive.wait()
        except TimeoutError:
            if self.last_heard is not None and self.last_heard >= started:
                raise self._refused_error() from None
            by_name = (
                f" (named {self.connection.local_name!r})" if self.connection.local_name else ""
            )
            raise DriverError(
                f"no advert from {self.address}{by_name} within {self.interval_s:g} s on "
                f"{self.connection.adapter}: check that the sensor is in range, its battery, its "
                "address, and that it advertises BTHome v2"
            ) from None

    async def read(self) -> PollResult:
        await self.scan()
        now = time.monotonic()
        if self.last_good is None or now - self.last_good > self.window_s:
            self._silent(now)
            return PollResult()  # scanning only began: no advert due yet
        result = PollResult()
        for point in self.profile.points:
            raw = self._raw(point, now)
            if raw is None:
                if self.counters.accepted >= _ADVERTS_BEFORE_MISSING:
                    result.rejected.append(
                        (point.name, f"BTHome object {point.source!r} is not in the adverts")
                    )
                continue
            result.add(point, raw)
        return result

    def _raw(self, point: BlePoint, now: float) -> Value | None:
        if point.source == "rssi":
            return self.rssi
        if point.source == "last_seen_s":
            return None if self.last_good is None else round(now - self.last_good, 1)
        return self.values.get(point.source)

    def _refused_error(self) -> DriverError:
        c = self.counters
        return DriverError(
            f"{self.address}: adverts heard but refused ({c.malformed} malformed, "
            f"{c.replayed} replayed); last: {self.problem}"
        )

    def _silent(self, now: float) -> None:
        """Raises unless scanning (re)started less than the offline window ago."""
        if self.last_heard is not None and now - self.last_heard <= self.window_s:
            raise self._refused_error()
        started = self.scanner.started_at
        if started is not None and now - started <= self.window_s:
            return
        last = self.last_good if self.last_good is not None else started
        age = "" if last is None else f" for {now - last:.0f} s"
        raise DeviceUnreachable(
            self.address,
            f"no advert{age} (expected every {self.interval_s:g} s, down after "
            f"{self.profile.offline_after} missed)",
        )


# --- GATT ----------------------------------------------------------------------------------------


@dataclass(slots=True)
class GattCounters:
    connections: int = 0  # connections made
    failed_attempts: int = 0  # connection attempts that failed
    dropped: int = 0  # connections lost in the middle of a read


class GattDriver(_BleDriver):
    def __init__(self, profile: BleProfile, connection: BleConnection, pool: Pool) -> None:
        super().__init__(profile, connection, pool)
        self.timeout_s = connection.timeout_s
        attempts, delay = pool.connect_attempts, pool.retry_delay_s
        backoff = sum(delay * 2**attempt for attempt in range(attempts - 1))
        # connection attempts, their back-off, then the reads (each within timeout_s)
        self.poll_timeout_s = (attempts + 1) * self.timeout_s + backoff
        self.uuids = {point.name: gatt.full_uuid(point.source) for point in profile.points}
        self.counters = GattCounters()

    async def read(self) -> PollResult:
        await self.scan()
        async with self.pool.slots(self.connection.adapter):
            client = await self._connect()
            try:
                return await self._read_points(client)
            finally:
                await self._disconnect(client)

    async def _connect(self) -> BleakClient:
        attempts = self.pool.connect_attempts
        why = ""
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(self.pool.retry_delay_s * 2 ** (attempt - 1))
            target: BLEDevice | str = self.scanner.devices.get(self.address, self.address)
            client = BleakClient(
                target, timeout=self.timeout_s, bluez={"adapter": self.connection.adapter}
            )
            try:
                async with asyncio.timeout(self.timeout_s):
                    await client.connect()
            except TimeoutError:
                why = f"no connection within {self.timeout_s:g} s"
            except BleakDeviceNotFoundError:
                self.scanner.devices.pop(self.address, None)  # a stale BlueZ object
                why = "not found: it does not advertise (out of range? flat battery?)"
            except BleakDBusError as exc:
                why = f"connection refused ({exc.dbus_error}: {exc.dbus_error_details})"
            except (BleakError, OSError, EOFError, DBusFastError) as exc:
                why = f"connection failed: {exc or type(exc).__name__}"
            else:
                self.counters.connections += 1
                return client
            self.counters.failed_attempts += 1
            await self._disconnect(client)
        raise DeviceUnreachable(self.address, f"{why} ({attempts} attempts)")

    async def _read_points(self, client: BleakClient) -> PollResult:
        result = PollResult()
        for point in self.profile.points:
            char = client.services.get_characteristic(self.uuids[point.name])
            if char is None:
                result.rejected.append((point.name, f"no characteristic {point.source}"))
                continue
            data = await self._read_char(client, point, char)
            if isinstance(data, str):
                result.rejected.append((point.name, data))
                continue
            try:
                raw = gatt.decode(point.source, data)
            except gatt.GattDecodeError as exc:
                result.rejected.append((point.name, str(exc)))
                continue
            if raw is None:
                result.rejected.append((point.name, "the device reports 'value is not known'"))
                continue
            result.add(point, raw)
        return result

    async def _read_char(
        self, client: BleakClient, point: BlePoint, char: BleakGATTCharacteristic
    ) -> bytes | str:
        """The characteristic's bytes, or why the device refused this one read; DriverError
        when the link is lost."""
        try:
            async with asyncio.timeout(self.timeout_s):
                return bytes(await client.read_gatt_char(char))
        except TimeoutError:
            raise DeviceTimeout(
                self.address, f"no answer reading {point.name} ({point.source})"
            ) from None
        except BleakError as exc:
            lost = not client.is_connected or (
                isinstance(exc, BleakDBusError) and "Not connected" in str(exc.dbus_error_details)
            )
            if lost:
                self.counters.dropped += 1
                raise DriverError(
                    f"{self.address}: disconnected while reading {point.name} "
                    f"(characteristic {point.source}): {exc}"
                ) from None
            detail = exc.args[1] if isinstance(exc, BleakGATTProtocolError) else exc
            return f"characteristic {point.source} unreadable: {detail}"

    async def _disconnect(self, client: BleakClient) -> None:
        try:
            async with asyncio.timeout(self.timeout_s):
                await client.disconnect()
        except Exception as exc:  # teardown: the link may already be gone
            log.debug("%s: disconnecting: %r", self.address, exc)
