"""An asyncio face for paho-mqtt (MQTT v5), shared by the agent and the fleet.

paho runs its network loop in its own thread; every callback hops to the event loop with
`call_soon_threadsafe`, so the rest of the program stays single-threaded. `publish()` returns a
future resolved by the broker's PUBACK *with its reason code*: a refusal (e.g. 135 "not
authorised") raises `PublishRefused` instead of passing for success. Subscriptions are
remembered and renewed on every (re)connect; with `manual_ack` a message is acknowledged only
when `ack()` is called. Publishes in flight when the connection drops stay pending: paho re-sends
them (DUP) when the session resumes, and their futures resolve then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any, Self

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, FilePath

from wire.errors import WireError
from wire.net import bare_host, host_port

log = logging.getLogger(__name__)


class TlsSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ca_file: FilePath
    cert_file: FilePath | None = None
    key_file: FilePath | None = None


class MqttSettings(BaseModel):
    """How to reach the broker (the `mqtt:` section of agent and fleet configs)."""

    model_config = ConfigDict(extra="forbid")
    host: Annotated[str, AfterValidator(bare_host)] = "localhost"
    port: Annotated[int, Field(ge=1, le=65535)] = 1883
    keepalive_s: Annotated[int, Field(ge=2, le=3600)] = 30
    username: str | None = None
    password_file: FilePath | None = None
    tls: TlsSettings | None = None
    session_expiry_s: Annotated[int, Field(ge=0)] = 86_400
    receive_maximum: Annotated[int, Field(ge=1, le=65535)] = 100
    reconnect_min_s: Annotated[int, Field(ge=1)] = 1
    reconnect_max_s: Annotated[int, Field(ge=1)] = 30


class MqttError(WireError):
    """Root of the MQTT link's errors."""


class NotConnected(MqttError):
    def __init__(self, host: str, port: int) -> None:
        super().__init__(f"not connected to the MQTT broker at {host_port(host, port)}")


class PublishRefused(MqttError):
    """The broker answered a QoS 1 publish with a failure reason code."""

    def __init__(self, topic: str, reason_code: int, reason: str) -> None:
        self.topic = topic
        self.reason_code = reason_code
        self.reason = reason
        super().__init__(f"broker refused publish to {topic}: {reason} ({reason_code})")


class ConnectionLost(MqttError):
    """The link was stopped while a publish waited for its acknowledgement."""


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def no_delay(client: Any) -> None:
    """Sends small MQTT packets at once: with Nagle's algorithm on, a command and its answer
    each wait for a delayed ACK, about 40 ms per hop on Linux. paho never sets TCP_NODELAY."""
    sock = client.socket()
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def wakeup_pair() -> tuple[socket.socket, socket.socket]:
    """paho's loop wakes on a socket pair that it makes over TCP on 127.0.0.1, which fails where
    there is no IPv4 loopback (an IPv6-only host); a Unix socket pair does the same job."""
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    writer.setblocking(False)
    return reader, writer


class MqttLink:
    """One MQTT v5 connection; use as `async with MqttLink(...) as link:`."""

    def __init__(
        self,
        settings: MqttSettings,
        client_id: str,
        *,
        will: Will | None = None,
        manual_ack: bool = False,
        clean_start: bool = False,
        max_inflight: int = 20,
    ) -> None:
        self.settings = settings
        self.client_id = client_id
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connected = asyncio.Event()
        self._subscribed = asyncio.Event()
        self._filters: dict[str, int] = {}
        self._pending: dict[int, tuple[asyncio.Future[int], str]] = {}
        self._messages: asyncio.Queue[Message] = asyncio.Queue()
        self._started = False
        self._clean_start = clean_start
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._connack_ok = False
        self.connects = 0
        self.last_error: str | None = None

        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            manual_ack=manual_ack,
        )
        client.max_inflight_messages_set(max_inflight)
        client.max_queued_messages_set(0)
        client._sockpairR, client._sockpairW = wakeup_pair()
        if settings.username is not None:
            password = None
            if settings.password_file is not None:
                password = settings.password_file.read_text().strip()
            client.username_pw_set(settings.username, password)
        if settings.tls is not None:
            context = ssl.create_default_context(cafile=str(settings.tls.ca_file))
            if settings.tls.cert_file is not None:
                context.load_cert_chain(
                    str(settings.tls.cert_file),
                    str(settings.tls.key_file) if settings.tls.key_file else None,
                )
            client.tls_set_context(context)
        if will is not None:
            client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        self._client = client

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            raise MqttError("MqttLink.start() called twice")
        self._started = True
        self._loop = asyncio.get_running_loop()
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = self.settings.session_expiry_s
        properties.ReceiveMaximum = self.settings.receive_maximum
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._network, args=(properties,), name=f"mqtt-{self.client_id}", daemon=True
        )
        self._thread.start()

    async def stop(self, *, final_publish: tuple[str, bytes] | None = None) -> None:
        """Disconnects cleanly; `final_publish` (topic, payload) is sent retained first, e.g. an
        'offline' state, so that a planned stop is not mistaken for a crash."""
        if not self._started:
            return
        if final_publish is not None and self.connected:
            with contextlib.suppress(MqttError, TimeoutError):
                await asyncio.wait_for(
                    self.publish(final_publish[0], final_publish[1], qos=1, retain=True), 2.0
                )
        self._stopping.set()
        self._client.disconnect()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        self._started = False
        self._connected.clear()
        self._fail_pending("MQTT link stopped")

    def _network(self, properties: Properties) -> None:
        """paho's network loop in our thread, with capped exponential back-off and jitter
        between connection attempts (paho's own reconnect has no jitter: a building full of
        gateways that lost the broker together would otherwise reconnect in lockstep)."""
        delay = float(self.settings.reconnect_min_s)
        first = True
        while not self._stopping.is_set():
            self._connack_ok = False
            try:
                if first:
                    self._client.connect(
                        self.settings.host,
                        self.settings.port,
                        keepalive=self.settings.keepalive_s,
                        clean_start=self._clean_start,
                        properties=properties,
                    )
                    first = False
                else:
                    self._client.reconnect()
            except (OSError, ssl.SSLError) as exc:
                self._call(self._set_error, f"cannot connect: {exc}")
            else:
                rc = MQTTErrorCode.MQTT_ERR_SUCCESS
                while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and not self._stopping.is_set():
                    rc = self._client.loop(timeout=1.0)
                if self._stopping.is_set():
                    self._client.loop(timeout=0.2)  # let the DISCONNECT out
                    break
            if self._connack_ok:
                delay = float(self.settings.reconnect_min_s)
            wait = delay / 2 + random.uniform(0, delay / 2)
            delay = min(delay * 2, float(self.settings.reconnect_max_s))
            self._stopping.wait(wait)

    def _fail_pending(self, reason: str) -> None:
        for future, _topic in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionLost(reason))
        self._pending.clear()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self._connected.wait(), timeout)

    # -- publishing and subscribing ------------------------------------------------------------

    def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False
    ) -> asyncio.Future[int]:
        """Sends one message; the future gives the PUBACK reason code (0 for QoS 0 once sent)."""
        if self._loop is None:
            raise MqttError("MqttLink.publish() before start()")
        future: asyncio.Future[int] = self._loop.create_future()
        if not self.connected:
            future.set_exception(NotConnected(self.settings.host, self.settings.port))
            return future
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            reason = paho.error_string(info.rc)
            future.set_exception(MqttError(f"publish to {topic} failed: {reason}"))
            return future
        self._pending[info.mid] = (future, topic)
        return future

    async def acknowledged(self, future: asyncio.Future[int], timeout: float) -> int:
        """The PUBACK's reason code. Time spent disconnected does not count towards `timeout`,
        because paho re-sends the publish when the session resumes; TimeoutError only when a
        connected broker stays silent."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                async with asyncio.timeout(max(0.05, deadline - loop.time())):
                    return await asyncio.shield(future)
            except TimeoutError:
                if self.connected:
                    raise
                await self.wait_connected()
                deadline = loop.time() + timeout

    async def subscribe(self, *filters: str, qos: int = 1) -> None:
        for name in filters:
            self._filters[name] = qos
        if self.connected:
            self._subscribed.clear()
            self._client.subscribe([(name, qos) for name in filters])

    async def wait_subscribed(self, timeout: float | None = None) -> None:
        """Waits for the broker's SUBACK of the remembered subscriptions on this connection."""
        await asyncio.wait_for(self._subscribed.wait(), timeout)

    async def messages(self) -> AsyncIterator[Message]:
        while True:
            yield await self._messages.get()

    def get_nowait(self) -> Message | None:
        try:
            return self._messages.get_nowait()
        except asyncio.QueueEmpty:
            return None

    def ack(self, message: Message) -> None:
        """Acknowledges a message received with `manual_ack` (after it was stored)."""
        if message.qos > 0:
            self._client.ack(message.mid, message.qos)

    # -- callbacks: paho's thread --------------------------------------------------------------

    def _call(self, function: Any, *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(function, *args)

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: Any,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            self._call(self._set_error, f"connection refused: {reason_code}")
            return
        self._connack_ok = True
        if self._filters:
            client.subscribe(list(self._filters.items()))
        self._call(self._set_connected)

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: Any,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._call(self._set_disconnected, str(reason_code))

    def _on_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._call(self._resolve, mid, reason_code.value, reason_code.is_failure, str(reason_code))

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        failures = [str(code) for code in reason_codes if code.is_failure]
        self._call(self._set_subscribed, failures)

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        item = Message(
            message.topic, bytes(message.payload), message.qos, message.retain, message.mid
        )
        self._call(self._messages.put_nowait, item)

    # -- state changes: event loop -------------------------------------------------------------

    def _set_connected(self) -> None:
        self.connects += 1
        self.last_error = None
        self._connected.set()
        log.info("connected to MQTT broker %s", host_port(self.settings.host, self.settings.port))

    def _set_subscribed(self, failures: list[str]) -> None:
        if failures:
            log.error("broker refused subscriptions: %s", ", ".join(failures))
            return
        log.info("subscribed to %d topic filters", len(self._filters))
        self._subscribed.set()

    def _set_disconnected(self, reason: str) -> None:
        self._subscribed.clear()
        if self._connected.is_set() and not self._stopping.is_set():
            log.warning("MQTT connection lost: %s", reason)
        self._connected.clear()
        self.last_error = reason

    def _set_error(self, reason: str) -> None:
        if self.last_error != reason:
            log.error(
                "MQTT broker %s: %s", host_port(self.settings.host, self.settings.port), reason
            )
        self.last_error = reason

    def _resolve(self, mid: int, code: int, failed: bool, reason: str) -> None:
        entry = self._pending.pop(mid, None)
        if entry is None:
            return
        future, topic = entry
        if future.done():
            return
        if failed:
            future.set_exception(PublishRefused(topic, code, reason))
        else:
            future.set_result(code)

    @property
    def in_flight(self) -> int:
        return len(self._pending)
