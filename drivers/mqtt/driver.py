"""MQTT devices (e-class boards, sensor hubs): values pushed on a broker, commands published.

Rules: one paho session per broker and credentials (`Pool`), shared by every device on it, each
device subscribed to `<base topic>/#`; paho runs in its own thread and every callback hops to
the event loop, so all state below is touched by the event loop only. The session reconnects on
its own with capped, jittered back-off and subscribes again each time. `read()` never waits for
the device: it returns the latest value of each point heard, or raises `DeviceUnreachable` when
the broker is away or the device is offline (status topic / Last Will, or heartbeat silence).
A bad payload rejects the points of its topic only, and is counted; it never raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import secrets
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from drivers.base import Driver, PollResult, Value
from drivers.errors import DeviceTimeout, DeviceUnreachable, DriverError
from drivers.mqtt.codec import (
    MissingField,
    PayloadError,
    extract,
    parse_json,
    plain_value,
    render,
    split_path,
)
from drivers.mqtt.connection import MqttDeviceConnection
from drivers.mqtt.profile import HeartbeatSpec, MqttPoint, MqttProfile, ReplySpec, StatusSpec
from drivers.profile_base import DeviceKind
from wire.mqtt import no_delay, wakeup_pair
from wire.net import host_port

log = logging.getLogger(__name__)

#: payloads above this never leave paho's thread, whatever a profile allows
HARD_PAYLOAD_CAP = 1_048_576


def _word(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value).strip().lower()


# -- online / offline: pure time logic -------------------------------------------------------


@dataclass(slots=True)
class Presence:
    """Whether a device is online, from its status word and heartbeats (monotonic seconds).

    Only messages published live count as heartbeats: a retained one may be days old. Watching
    starts again at each (re)subscription, so a broker outage is not mistaken for silence."""

    noun: str
    status: StatusSpec | None
    heartbeat: HeartbeatSpec | None
    status_topic: str
    heartbeat_topic: str
    grace_s: float
    watching_since: float | None = None
    reported: bool | None = None
    reported_at: float = -math.inf
    last_beat: float | None = None

    def subscribed(self, now: float) -> None:
        self.watching_since = now

    def report(self, online: bool, now: float, retained: bool) -> None:
        self.reported = online
        self.reported_at = now
        if online and not retained:
            self.beat(now)

    def beat(self, now: float) -> None:
        self.last_beat = now

    def offline_reason(self, now: float) -> str | None:
        """Why the device counts as offline now, or None."""
        if self.watching_since is None:
            return None
        beat_after_report = self.last_beat is not None and self.last_beat > self.reported_at
        if self.reported is False and not beat_after_report:
            assert self.status is not None
            return (
                f"{self.noun} reported offline (last will or shutdown: "
                f"'{self.status.offline}' on {self.status_topic})"
            )
        if self.heartbeat is not None:
            since = self.watching_since
            if self.last_beat is not None:
                since = max(since, self.last_beat)
            silent = now - since
            if silent > self.heartbeat.window_s:
                where = f" on {self.heartbeat_topic}" if self.heartbeat_topic else ""
                never = "" if self.last_beat is not None else ", none since subscribing"
                return (
                    f"no heartbeat for {silent:.0f} s{where} "
                    f"(expected every {self.heartbeat.interval_s:g} s{never})"
                )
        elif self.reported is None and now - self.watching_since > self.grace_s:
            return (
                f"no status from the {self.noun} on {self.status_topic} within "
                f"{self.grace_s:g} s of subscribing (is the base topic right?)"
            )
        return None


# -- one device's messages ------------------------------------------------------------------


@dataclass(slots=True)
class _TopicRole:
    points: list[tuple[MqttPoint, tuple[str, ...]]] = field(default_factory=list)
    status: bool = False
    heartbeat: bool = False
    reply: bool = False


@dataclass(slots=True)
class _Waiter:
    topic: str
    match: tuple[str, ...]
    request: str
    future: asyncio.Future[Any]


class DeviceFeed:
    """What one device has published: latest values, rejections, presence, command answers."""

    def __init__(self, profile: MqttProfile, base: str, broker: str, grace_s: float) -> None:
        self.profile = profile
        self.base = base
        self.broker = broker
        self.address = f"{broker}/{base}"
        self.noun = "board" if profile.kind is DeviceKind.BOARD else "device"
        self.max_payload = profile.max_payload_bytes
        online = profile.online
        self.roles: dict[str, _TopicRole] = {}
        for point in profile.points:
            self._role(point.topic).points.append((point, split_path(point.path)))
        if online.status is not None:
            self._role(online.status.topic).status = True
        self.any_message_beats = False
        if online.heartbeat is not None:
            if online.heartbeat.topic is None:
                self.any_message_beats = True
            else:
                self._role(online.heartbeat.topic).heartbeat = True
        for command in profile.commands:
            reply = profile.reply_of(command)
            if reply is not None:
                self._role(reply.topic).reply = True
        self.presence = Presence(
            self.noun,
            online.status,
            online.heartbeat,
            self.full(online.status.topic) if online.status else "",
            self.full(online.heartbeat.topic or "")
            if online.heartbeat and online.heartbeat.topic is not None
            else "",
            grace_s,
        )
        self.values: dict[str, Value] = {}
        self.rejected: dict[str, str] = {}
        #: set once every topic with points has been heard, or the device said it is offline
        self.heard = asyncio.Event()
        self._unheard = {topic for topic, role in self.roles.items() if role.points}
        self._waiters: list[_Waiter] = []
        #: messages on the profile's topics
        self.messages = 0
        #: payloads that could not be read at all (not JSON or UTF-8, too large, unknown status)
        self.bad_payloads = 0
        #: point values refused, one per point (wrong type, out of range, missing field, and
        #: each point of a payload that could not be read)
        self.rejected_values = 0
        #: messages on topics the profile does not use
        self.ignored = 0
        self.last_problem: str | None = None

    def _role(self, topic: str) -> _TopicRole:
        return self.roles.setdefault(topic, _TopicRole())

    @property
    def filter(self) -> str:
        return f"{self.base}/#"

    def full(self, relative: str) -> str:
        return f"{self.base}/{relative}" if relative else self.base

    # -- incoming --------------------------------------------------------------------------

    def receive(
        self, relative: str, payload: bytes | None, size: int, retained: bool, now: float
    ) -> None:
        if self.any_message_beats and not retained:
            self.presence.beat(now)
        role = self.roles.get(relative)
        if role is None:
            self.ignored += 1
            return
        self.messages += 1
        if role.heartbeat and not retained:
            self.presence.beat(now)
        topic = self.full(relative)
        if payload is None or size > self.max_payload:
            self._bad(
                role,
                f"payload of {size} bytes on {topic} is over the {self.max_payload}-byte limit",
            )
            return
        if role.status:
            self._status(payload, topic, retained, now)
        if role.reply and not retained:
            self._answer(relative, payload)
        if role.points:
            self._decode(role, payload, topic)
            self._unheard.discard(relative)
            if not self._unheard:
                self.heard.set()

    def _bad(self, role: _TopicRole, why: str) -> None:
        self.bad_payloads += 1
        self.last_problem = why
        for point, _parts in role.points:
            self._reject(point.name, why)

    def _reject(self, name: str, why: str) -> None:
        self.values.pop(name, None)
        self.rejected[name] = why
        self.rejected_values += 1

    def _status(self, payload: bytes, topic: str, retained: bool, now: float) -> None:
        spec = self.profile.online.status
        assert spec is not None
        try:
            word = _word(
                plain_value(payload)
                if not spec.path
                else extract(parse_json(payload), split_path(spec.path))
            )
        except (PayloadError, MissingField) as exc:
            self.bad_payloads += 1
            self.last_problem = f"status on {topic}: {exc}"
            return
        if word == spec.online.strip().lower():
            self.presence.report(True, now, retained)
        elif word == spec.offline.strip().lower():
            self.presence.report(False, now, retained)
            self.values.clear()
            self.rejected.clear()
            self.heard.set()
        else:
            self.bad_payloads += 1
            self.last_problem = (
                f"status {word!r} on {topic} is neither {spec.online!r} nor {spec.offline!r}"
            )

    def _decode(self, role: _TopicRole, payload: bytes, topic: str) -> None:
        document: Any = None
        error: str | None = None
        parsed = False
        for point, parts in role.points:
            try:
                if not parts:
                    raw = plain_value(payload)
                else:
                    if not parsed:
                        parsed = True
                        try:
                            document = parse_json(payload)
                        except PayloadError as exc:
                            error = f"{exc} on {topic}"
                    if error is not None:
                        self._reject(point.name, error)
                        continue
                    raw = extract(document, parts)
            except PayloadError as exc:
                self._reject(point.name, f"{exc} on {topic}")
                continue
            except MissingField as exc:
                self._reject(point.name, f"{exc} in the payload on {topic}")
                continue
            if raw is None:  # JSON null: the device has no value for it now
                self.values.pop(point.name, None)
                self.rejected.pop(point.name, None)
                continue
            value, why = point.check(raw)
            if why is not None or value is None:
                where = f"{topic} {point.path}" if point.path else topic
                self._reject(point.name, f"{why} ({where})")
                continue
            self.values[point.name] = value
            self.rejected.pop(point.name, None)
        if error is not None:
            self.bad_payloads += 1
            self.last_problem = error

    def _answer(self, relative: str, payload: bytes) -> None:
        try:
            document: Any = parse_json(payload)
        except PayloadError:
            try:
                document = plain_value(payload)
            except PayloadError:
                return
        for waiter in self._waiters:
            if waiter.topic != relative or waiter.future.done():
                continue
            if waiter.match:
                try:
                    echoed = extract(document, waiter.match)
                except MissingField:
                    continue
                if str(echoed) != waiter.request:
                    continue
            waiter.future.set_result(document)
            return

    # -- what read() and command() use ------------------------------------------------------

    def subscribed(self, now: float) -> None:
        self.presence.subscribed(now)

    def offline_reason(self, now: float) -> str | None:
        reason = self.presence.offline_reason(now)
        if reason is not None:
            self.values.clear()
            self.rejected.clear()
        return reason

    def poll(self) -> PollResult:
        result = PollResult()
        for point in self.profile.points:
            if point.name in self.values:
                result.values.append((point.name, self.values[point.name]))
            elif point.name in self.rejected:
                result.rejected.append((point.name, self.rejected[point.name]))
        return result

    def expect(self, reply: ReplySpec, request: str) -> _Waiter:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(reply.topic, split_path(reply.match), request, future)
        self._waiters.append(waiter)
        return waiter

    def forget(self, waiter: _Waiter) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)
        if not waiter.future.done():
            waiter.future.cancel()


# -- one client session per broker -----------------------------------------------------------


class BrokerSession:
    """One paho client, its network thread and the devices it carries."""

    def __init__(
        self, connection: MqttDeviceConnection, reconnect_min_s: float, reconnect_max_s: float
    ) -> None:
        self.connection = connection
        self.address = host_port(connection.host, connection.port)
        self.v5 = connection.mqtt_version == "5"
        self.reconnect_min_s = reconnect_min_s
        self.reconnect_max_s = reconnect_max_s
        self.feeds: dict[str, list[DeviceFeed]] = {}
        self.connects = 0
        self.last_error: str | None = None
        self._subscribed: set[str] = set()
        self._refused: dict[str, str] = {}
        self._sub_mids: dict[int, list[str]] = {}
        self._pending: dict[int, tuple[asyncio.Future[int], str]] = {}
        self._connected = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._change: asyncio.Future[None] | None = None
        self._client = self._make_client()

    def _make_client(self) -> paho.Client:
        connection = self.connection
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"campus-devices-{socket.gethostname()[:24]}-{secrets.token_hex(4)}",
            protocol=MQTTProtocolVersion.MQTTv5 if self.v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if self.v5 else True,
        )
        client._sockpairR, client._sockpairW = wakeup_pair()
        client.max_inflight_messages_set(20)
        if connection.username is not None:
            client.username_pw_set(connection.username, connection.password)
        if connection.tls:
            cafile = str(connection.ca_file) if connection.ca_file is not None else None
            client.tls_set_context(ssl.create_default_context(cafile=cafile))
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        return client

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._change = self._loop.create_future()
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._network, name=f"mqtt-devices-{self.address}", daemon=True
        )
        self._thread.start()

    async def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._client.disconnect()  # before stopping the thread, so the DISCONNECT goes out
        self._stopping.set()
        await asyncio.to_thread(thread.join)
        self._connected = False
        self._subscribed.clear()
        for future, topic in self._pending.values():
            if not future.done():
                future.set_exception(DeviceUnreachable(self.address, f"stopped before {topic}"))
        self._pending.clear()

    @property
    def idle(self) -> bool:
        return not self.feeds

    def _network(self) -> None:
        """paho's loop in our thread; between attempts a capped exponential back-off with
        jitter, so gateways that lost a broker together do not all come back at once."""
        delay = self.reconnect_min_s
        first = True
        while not self._stopping.is_set():
            connected_once = False
            try:
                if first:
                    self._client.connect(
                        self.connection.host,
                        self.connection.port,
                        keepalive=self.connection.keepalive_s,
                        clean_start=True if self.v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
                    )
                    first = False
                else:
                    self._client.reconnect()
            except (OSError, ssl.SSLError) as exc:
                self._call(self._failed, f"broker {self.address} unreachable ({exc})")
            else:
                rc = MQTTErrorCode.MQTT_ERR_SUCCESS
                while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and not self._stopping.is_set():
                    rc = self._client.loop(timeout=1.0)
                    connected_once = connected_once or self._client.is_connected()
                if self._stopping.is_set():
                    self._client.loop(timeout=0.2)  # lets the DISCONNECT out
                    break
            if connected_once:
                delay = self.reconnect_min_s
            wait = delay / 2 + random.uniform(0, delay / 2)
            delay = min(delay * 2, self.reconnect_max_s)
            self._stopping.wait(wait)

    def _call(self, function: Any, *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(function, *args)

    # -- paho callbacks (its thread) ---------------------------------------------------------

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: Any,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            self._call(self._failed, f"broker {self.address} refused the connection: {reason_code}")
        else:
            no_delay(client)
            self._call(self._up)

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: Any,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._call(self._down, str(reason_code))

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        refusals = [str(code) if code.is_failure else None for code in reason_codes]
        self._call(self._suback, mid, refusals)

    def _on_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._call(self._puback, mid, reason_code.value, reason_code.is_failure, str(reason_code))

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        size = len(message.payload)
        payload = bytes(message.payload) if size <= HARD_PAYLOAD_CAP else None
        self._call(self._deliver, message.topic, payload, size, bool(message.retain))

    # -- state changes (event loop) ----------------------------------------------------------

    def _changed(self) -> None:
        previous, self._change = self._change, asyncio.get_running_loop().create_future()
        if previous is not None and not previous.done():
            previous.set_result(None)

    def _up(self) -> None:
        self._connected = True
        self.connects += 1
        if self.last_error is not None:
            log.info("MQTT broker %s: connected again", self.address)
        self.last_error = None
        self._subscribed.clear()
        self._refused.clear()
        self._sub_mids.clear()
        if self.feeds:
            self._subscribe(list(self.feeds))
        self._changed()

    def _down(self, reason: str) -> None:
        if self._stopping.is_set():
            return
        if self._connected:
            log.warning("MQTT broker %s: connection lost (%s)", self.address, reason)
            self.last_error = f"broker {self.address} unreachable (connection lost: {reason})"
        elif self.last_error is None:  # else keep why the attempt failed (e.g. refused)
            self.last_error = f"broker {self.address} unreachable ({reason})"
        self._connected = False
        self._subscribed.clear()
        self._changed()

    def _failed(self, reason: str) -> None:
        if reason != self.last_error:
            log.error("MQTT devices: %s", reason)
        self._connected = False
        self.last_error = reason
        self._changed()

    def _subscribe(self, bases: list[str]) -> None:
        options: Any = SubscribeOptions(qos=1, noLocal=True) if self.v5 else 1
        rc, mid = self._client.subscribe([(f"{base}/#", options) for base in bases])
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
            self._sub_mids[mid] = bases

    def _suback(self, mid: int, refusals: list[str | None]) -> None:
        bases = self._sub_mids.pop(mid, [])
        now = time.monotonic()
        for base, refusal in zip(bases, refusals, strict=False):
            if refusal is not None:
                self._refused[base] = refusal
                log.error(
                    "MQTT broker %s refused a subscription to %s/#: %s", self.address, base, refusal
                )
                continue
            self._subscribed.add(base)
            for feed in self.feeds.get(base, []):
                feed.subscribed(now)
        self._changed()

    def _puback(self, mid: int, code: int, failed: bool, reason: str) -> None:
        entry = self._pending.pop(mid, None)
        if entry is None:
            return
        future, topic = entry
        if future.done():
            return
        if failed:
            future.set_exception(
                DriverError(f"broker {self.address} refused the publish on {topic}: {reason}")
            )
        else:
            future.set_result(code)

    def _deliver(self, topic: str, payload: bytes | None, size: int, retained: bool) -> None:
        """Hands a message to the device whose base topic is the longest prefix of `topic`."""
        parts = topic.split("/")
        for cut in range(len(parts), 0, -1):
            feeds = self.feeds.get("/".join(parts[:cut]))
            if feeds:
                relative = "/".join(parts[cut:])
                now = time.monotonic()
                for feed in feeds:
                    feed.receive(relative, payload, size, retained, now)
                return

    # -- what drivers use --------------------------------------------------------------------

    def attach(self, feed: DeviceFeed) -> None:
        self.start()
        feeds = self.feeds.setdefault(feed.base, [])
        feeds.append(feed)
        if feed.base in self._subscribed:
            feed.subscribed(time.monotonic())
        elif len(feeds) == 1 and self._connected:
            self._subscribe([feed.base])

    def detach(self, feed: DeviceFeed) -> None:
        feeds = self.feeds.get(feed.base, [])
        if feed in feeds:
            feeds.remove(feed)
        if not feeds and feed.base in self.feeds:
            del self.feeds[feed.base]
            self._subscribed.discard(feed.base)
            if self._connected:
                self._client.unsubscribe(feed.filter)

    async def ready(self, feed: DeviceFeed, timeout: float) -> None:
        """Returns once the broker carries `feed`'s subscription; DeviceUnreachable at once when
        the broker is known to be away, or after `timeout` without an answer."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if feed.base in self._subscribed:
                return
            if feed.base in self._refused:
                raise DeviceUnreachable(
                    feed.address,
                    f"broker {self.address} refused the subscription to {feed.filter}: "
                    f"{self._refused[feed.base]}",
                )
            if not self._connected and self.last_error is not None:
                raise DeviceUnreachable(feed.address, self.last_error)
            remaining = deadline - loop.time()
            change = self._change
            if remaining <= 0 or change is None:
                raise DeviceUnreachable(
                    feed.address,
                    f"broker {self.address} unreachable (no answer within {timeout:g} s)",
                )
            try:
                await asyncio.wait_for(asyncio.shield(change), remaining)
            except TimeoutError:
                continue

    async def publish(self, feed: DeviceFeed, topic: str, payload: bytes, timeout: float) -> int:
        """One QoS 1 publish, acknowledged. (MQTT v5's reason 16, "no matching subscribers", is
        no use here: this session's own `<base>/#` subscription always matches.)"""
        if not self._connected:
            raise DeviceUnreachable(
                feed.address, self.last_error or f"broker {self.address} unreachable"
            )
        info = self._client.publish(topic, payload, qos=1)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise DeviceUnreachable(
                feed.address, f"publish on {topic} failed: {paho.error_string(info.rc)}"
            )
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending[info.mid] = (future, topic)
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise DeviceTimeout(
                feed.address,
                f"broker {self.address} did not acknowledge the publish on {topic} "
                f"within {timeout:g} s",
            ) from None
        finally:
            self._pending.pop(info.mid, None)


class Pool:
    """The MQTT sessions of a gateway's devices: one per broker and credentials."""

    def __init__(self, *, reconnect_min_s: float = 1.0, reconnect_max_s: float = 30.0) -> None:
        self.reconnect_min_s = reconnect_min_s
        self.reconnect_max_s = reconnect_max_s
        self.sessions: dict[tuple[object, ...], BrokerSession] = {}

    def attach(self, connection: MqttDeviceConnection, feed: DeviceFeed) -> BrokerSession:
        key = connection.session_key()
        session = self.sessions.get(key)
        if session is None:
            session = self.sessions[key] = BrokerSession(
                connection, self.reconnect_min_s, self.reconnect_max_s
            )
        session.attach(feed)
        return session

    async def detach(self, session: BrokerSession, feed: DeviceFeed) -> None:
        """Removes a device; a session left without devices is closed."""
        session.detach(feed)
        if session.idle:
            for key, known in list(self.sessions.items()):
                if known is session:
                    del self.sessions[key]
            await session.stop()

    async def close(self) -> None:
        sessions = list(self.sessions.values())
        self.sessions.clear()
        await asyncio.gather(*(session.stop() for session in sessions))


# -- the driver --------------------------------------------------------------------------------


class MqttDeviceDriver(Driver):
    def __init__(self, profile: MqttProfile, connection: MqttDeviceConnection, pool: Pool) -> None:
        self.profile = profile
        self.connection = connection
        self.pool = pool
        broker = host_port(connection.host, connection.port)
        self.feed = DeviceFeed(profile, connection.topic, broker, grace_s=connection.timeout_s)
        self.bus = f"mqtt://{broker}/{connection.topic}"
        self._commands = {command.name: command for command in profile.commands}
        self._session: BrokerSession | None = None

    async def _ready(self) -> BrokerSession:
        if self._session is None:
            self._session = self.pool.attach(self.connection, self.feed)
        await self._session.ready(self.feed, self.connection.timeout_s)
        return self._session

    def _check_online(self) -> None:
        reason = self.feed.offline_reason(time.monotonic())
        if reason is not None:
            raise DeviceUnreachable(self.feed.address, reason)

    async def open(self) -> None:
        """Subscribes and waits (up to the connection's timeout) until every topic with points
        has been heard once, so that a one-off probe sees values."""
        await self._ready()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.feed.heard.wait(), self.connection.timeout_s)

    async def read(self) -> PollResult:
        await self._ready()
        self._check_online()
        return self.feed.poll()

    async def command(
        self, name: str, argument: Any = None, options: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        command = self._commands.get(name)
        if command is None:
            known = ", ".join(self._commands) or "none"
            raise ValueError(f"{self.profile.id} has no command {name!r} (commands: {known})")
        value = command.check_argument(argument)
        values: dict[str, Any] = {**command.check_options(options)}
        request = secrets.token_hex(8)
        values.update(request=request, command=name)
        if command.argument is not None:
            values["argument"] = value
        payload = render(command.payload, values)
        session = await self._ready()
        self._check_online()
        reply = self.profile.reply_of(command)
        topic = self.feed.full(command.topic)
        waiter = self.feed.expect(reply, request) if reply is not None else None
        try:
            await session.publish(self.feed, topic, payload, self.connection.timeout_s)
            if reply is None or waiter is None:
                return {"published": True, "topic": topic}
            try:
                answer = await asyncio.wait_for(asyncio.shield(waiter.future), reply.timeout_s)
            except TimeoutError:
                raise DriverError(
                    f"{self.feed.address}: no answer from the {self.feed.noun} within "
                    f"{reply.timeout_s:g} s on {self.feed.full(reply.topic)}"
                ) from None
        finally:
            if waiter is not None:
                self.feed.forget(waiter)
        if reply.error:
            try:
                error = extract(answer, split_path(reply.error))
            except MissingField:
                error = None
            if error not in (None, False, ""):
                raise DriverError(
                    f"{self.feed.address}: the {self.feed.noun} refused {name}: {error}"
                )
        return answer if isinstance(answer, dict) else {"reply": answer}

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await self.pool.detach(session, self.feed)


def build(profile: MqttProfile, connection: MqttDeviceConnection, pool: Pool) -> MqttDeviceDriver:
    return MqttDeviceDriver(profile, connection, pool)
