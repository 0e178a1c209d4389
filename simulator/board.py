"""A simulated Android e-class board: an MDM agent on MQTT, in the layout of the profile
`generic-android-eclass-board` (topics and payloads are described in that file).

The board keeps a retained `status` ("online", and "offline" as its Last Will), publishes a
heartbeat and its state every `interval_s` and after each change, obeys commands on `cmd` and
answers each on `result` with the command's id. Faults: `offline` (says "offline" and leaves),
`silent` (connected but publishes and answers nothing: a hung agent, no will), `garbage` (its
state is not valid JSON). `crash()` drops the TCP connection without DISCONNECT, so the broker
publishes the will. paho runs in its own thread; the board's logic runs on the event loop.

    async with run_board(SimulatedBoard(id="board-101", broker_port=1883)) as board: ...
    python -m simulator.board --id board-101 --port 1883
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import secrets
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from wire.models import Id
from wire.mqtt import no_delay, wakeup_pair
from wire.net import bare_host

log = logging.getLogger(__name__)


class BoardFault(StrEnum):
    NONE = "none"
    OFFLINE = "offline"
    SILENT = "silent"
    GARBAGE = "garbage"


class SimulatedBoard(BaseModel):
    """One simulated board, as scenario files list them."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: Id
    topic: Annotated[str, Field(pattern=r"^[^#+\x00/][^#+\x00]{0,199}$")] | None = Field(
        None, description="base topic; default eclass/<id>"
    )
    broker_host: Annotated[str, AfterValidator(bare_host)] = "localhost"
    broker_port: Annotated[int, Field(ge=1, le=65535)] = 1883
    username: str | None = None
    password: str | None = None
    interval_s: Annotated[float, Field(gt=0, le=3600)] = 30.0
    fault: BoardFault = BoardFault.NONE
    app_version: str = "4.2.1"
    temperature_c: Annotated[float, Field(ge=-20, le=120)] = 42.0
    storage_total_mb: Annotated[int, Field(ge=1)] = 32_768
    storage_free_mb: Annotated[int, Field(ge=0)] = 12_000
    reboot_s: Annotated[float, Field(ge=0, le=600)] = 5.0
    seed: int = 0

    @property
    def base_topic(self) -> str:
        return self.topic or f"eclass/{self.id}"


@dataclass
class Notice:
    text: str
    minutes: int
    until: float  # monotonic


class RunningBoard:
    """A board connected to its broker. Its state is public for tests and scenarios."""

    def __init__(self, spec: SimulatedBoard) -> None:
        self.spec = spec
        self.base = spec.base_topic
        self.fault = spec.fault
        self.screen_on = True
        self.brightness = 80
        self.temperature_c = spec.temperature_c
        self.free_mb = min(spec.storage_free_mb, spec.storage_total_mb)
        self.notice: Notice | None = None
        #: every command received, decoded (or {"raw": text} when it was not JSON)
        self.commands: list[dict[str, Any]] = []
        self.boots = 1
        self.started = time.monotonic()
        self._random = random.Random(spec.seed)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connected = asyncio.Event()
        self._disconnected = asyncio.Event()
        self._disconnected.set()
        self._stopping = threading.Event()
        self._powered = threading.Event()  # cleared: the thread does not (re)connect
        self._crash = threading.Event()
        self._thread: threading.Thread | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._client = self._make_client()

    def topic(self, relative: str) -> str:
        return f"{self.base}/{relative}"

    def _make_client(self) -> paho.Client:
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"sim-board-{self.spec.id}-{secrets.token_hex(3)}",
            protocol=MQTTProtocolVersion.MQTTv311,  # what most Android MDM agents speak
            clean_session=True,
        )
        client._sockpairR, client._sockpairW = wakeup_pair()
        if self.spec.username is not None:
            client.username_pw_set(self.spec.username, self.spec.password)
        client.will_set(self.topic("status"), b"offline", qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(
            target=self._network, name=f"sim-board-{self.spec.id}", daemon=True
        )
        self._thread.start()
        self._ticker = asyncio.create_task(self._tick(), name=f"sim-board-{self.spec.id}")
        if self.fault is BoardFault.OFFLINE:
            await self._say_offline_and_leave()
        else:
            self._powered.set()

    async def stop(self) -> None:
        """A planned stop: 'offline' (retained), then DISCONNECT, so the will is not used."""
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        for task in list(self._tasks):
            task.cancel()
        if self.connected:
            await self._publish_and_wait("status", b"offline", retain=True)
        self._powered.clear()
        self._client.disconnect()  # before stopping the thread, so the DISCONNECT goes out
        self._stopping.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self, timeout: float = 10.0) -> None:
        await asyncio.wait_for(self._connected.wait(), timeout)

    async def wait_disconnected(self, timeout: float = 10.0) -> None:
        await asyncio.wait_for(self._disconnected.wait(), timeout)

    async def crash(self) -> None:
        """Drops the TCP connection without DISCONNECT (power cut, agent killed): the broker
        publishes the Last Will. The board stays down until `power_on()`."""
        self._powered.clear()
        self._crash.set()
        await self.wait_disconnected()

    async def power_on(self) -> None:
        self.started = time.monotonic()
        self._powered.set()
        await self.wait_connected()

    async def set_fault(self, fault: BoardFault) -> None:
        previous, self.fault = self.fault, fault
        if fault is BoardFault.OFFLINE and previous is not BoardFault.OFFLINE:
            await self._say_offline_and_leave()
        elif previous is BoardFault.OFFLINE and fault is not BoardFault.OFFLINE:
            await self.power_on()
        elif fault is not BoardFault.SILENT:
            self.publish_now()

    async def _say_offline_and_leave(self) -> None:
        """A clean shutdown: 'offline' retained, then DISCONNECT."""
        self._powered.set()
        await self.wait_connected()
        await self._publish_and_wait("status", b"offline", retain=True)
        self._powered.clear()
        self._client.disconnect()
        await self.wait_disconnected()

    # -- network thread ----------------------------------------------------------------------

    def _network(self) -> None:
        first = True
        while not self._stopping.is_set():
            if not self._powered.wait(0.1):
                continue
            try:
                if first:
                    self._client.connect(self.spec.broker_host, self.spec.broker_port, keepalive=10)
                    first = False
                else:
                    self._client.reconnect()
            except OSError as exc:
                log.debug("board %s: cannot connect: %s", self.spec.id, exc)
                self._stopping.wait(0.3)
                continue
            rc = MQTTErrorCode.MQTT_ERR_SUCCESS
            while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and not self._stopping.is_set():
                if self._crash.is_set():
                    self._crash.clear()
                    self._drop_connection()
                    break
                rc = self._client.loop(timeout=0.1)
            if self._stopping.is_set():
                self._client.loop(timeout=0.2)  # lets the DISCONNECT out
                break
            self._stopping.wait(0.2)

    def _drop_connection(self) -> None:
        sock = self._client.socket()
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._call(self._went_down)

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
            log.warning("board %s: broker refused: %s", self.spec.id, reason_code)
            return
        no_delay(client)
        client.subscribe(self.topic("cmd"), qos=1)
        if self.fault is not BoardFault.OFFLINE:  # a board shutting down does not say "online"
            client.publish(self.topic("status"), b"online", qos=1, retain=True)
        self._call(self._went_up)

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: Any,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._call(self._went_down)

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        self._call(self._command, bytes(message.payload))

    # -- the board (event loop) --------------------------------------------------------------

    def _went_up(self) -> None:
        self._disconnected.clear()
        self._connected.set()
        self.publish_now()

    def _went_down(self) -> None:
        self._connected.clear()
        self._disconnected.set()

    def _publish(self, relative: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        if self.connected:
            self._client.publish(self.topic(relative), payload, qos=qos, retain=retain)

    async def _publish_and_wait(self, relative: str, payload: bytes, retain: bool) -> None:
        info = self._client.publish(self.topic(relative), payload, qos=1, retain=retain)
        await asyncio.to_thread(info.wait_for_publish, 2.0)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.spec.interval_s)
            self._drift()
            self.publish_now()

    def _drift(self) -> None:
        self.temperature_c = round(
            min(120.0, max(-20.0, self.temperature_c + self._random.uniform(-0.3, 0.3))), 1
        )
        self.free_mb = max(0, self.free_mb - self._random.randint(0, 3))

    def uptime_s(self) -> int:
        return int(time.monotonic() - self.started)

    def publish_now(self) -> None:
        """Heartbeat and state now (nothing when silent or disconnected)."""
        if self.fault in (BoardFault.SILENT, BoardFault.OFFLINE):
            return
        now = int(time.time())
        self._publish("heartbeat", json.dumps({"ts": now, "uptime_s": self.uptime_s()}).encode())
        self._publish("state", self.state_payload())

    def notice_state(self) -> dict[str, Any]:
        notice = self.notice
        if notice is not None and time.monotonic() >= notice.until:
            notice = self.notice = None
        if notice is None:
            return {"active": False, "text": "", "remaining_s": 0}
        remaining = max(0, int(notice.until - time.monotonic()))
        return {"active": True, "text": notice.text, "remaining_s": remaining}

    def state(self) -> dict[str, Any]:
        return {
            "ts": int(time.time()),
            "display": {"screen": "on" if self.screen_on else "off", "brightness": self.brightness},
            "app": {"version": self.spec.app_version},
            "device": {"temperature_c": self.temperature_c, "uptime_s": self.uptime_s()},
            "disks": [
                {"mount": "/data", "free_mb": self.free_mb, "total_mb": self.spec.storage_total_mb}
            ],
            "notice": self.notice_state(),
        }

    def state_payload(self) -> bytes:
        if self.fault is BoardFault.GARBAGE:
            return self._random.choice(
                [
                    b'{"display": {"screen": "on", "brightn',
                    b"\xff\xfe not even text",
                    b"<html>502 Bad Gateway</html>",
                ]
            )
        return json.dumps(self.state()).encode()

    def _command(self, payload: bytes) -> None:
        if self.fault is BoardFault.SILENT:
            return
        try:
            request = json.loads(payload)
        except (UnicodeDecodeError, ValueError):
            self.commands.append({"raw": payload.decode(errors="replace")})
            return
        if not isinstance(request, dict):
            self.commands.append({"raw": request})
            return
        self.commands.append(request)
        answer = {"id": request.get("id"), "action": request.get("action")}
        try:
            answer |= self._obey(request)
            answer["ok"] = True
        except ValueError as exc:
            answer |= {"ok": False, "error": str(exc)}
        self.publish_now()  # the new state goes out before the answer
        self._publish("result", json.dumps(answer).encode(), qos=1)
        if answer["ok"] and request.get("action") == "reboot":
            self._spawn(self._reboot())

    def _obey(self, request: dict[str, Any]) -> dict[str, Any]:
        action = request.get("action")
        if action == "screen":
            on = request.get("on")
            if not isinstance(on, bool):
                raise ValueError(f"'on' must be true or false, not {on!r}")
            self.screen_on = on
            return {"screen": "on" if on else "off"}
        if action == "notice":
            text, minutes = request.get("text"), request.get("minutes")
            if not isinstance(text, str) or not text.strip():
                raise ValueError("'text' must be a non-empty string")
            if isinstance(minutes, bool) or not isinstance(minutes, int):
                raise ValueError(f"'minutes' must be a whole number, not {minutes!r}")
            if not 1 <= minutes <= 1440:
                raise ValueError(f"'minutes' must be 1..1440, not {minutes}")
            self.notice = Notice(text, minutes, time.monotonic() + minutes * 60)
            return {"notice": {"text": text, "minutes": minutes}}
        if action == "reboot":
            return {"back_in_s": self.spec.reboot_s}
        raise ValueError(f"unknown action {action!r}")

    def _spawn(self, coroutine: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reboot(self) -> None:
        await asyncio.sleep(0.1)  # lets the answer out first
        await self.crash()
        await asyncio.sleep(self.spec.reboot_s)
        self.boots += 1
        self.screen_on = True
        self.notice = None
        await self.power_on()


@contextlib.asynccontextmanager
async def run_board(
    spec: SimulatedBoard, *, connect_timeout: float = 10.0
) -> AsyncIterator[RunningBoard]:
    """A running board; it is connected on entry (unless its fault is `offline`)."""
    board = RunningBoard(spec)
    await board.start()
    try:
        if board.fault is not BoardFault.OFFLINE:
            await board.wait_connected(connect_timeout)
        yield board
    finally:
        await board.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A simulated Android e-class board on MQTT")
    parser.add_argument("--id", default="board-101")
    parser.add_argument("--topic", default=None, help="base topic (default eclass/<id>)")
    parser.add_argument("--host", default="localhost")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--interval", type=float, default=30.0)
    parser.add_argument("--fault", choices=[f.value for f in BoardFault], default="none")
    args = parser.parse_args(argv)
    spec = SimulatedBoard(
        id=args.id,
        topic=args.topic,
        broker_host=args.host,
        broker_port=args.port,
        interval_s=args.interval,
        fault=BoardFault(args.fault),
    )
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with run_board(spec) as board:
            print(f"board {spec.id} on {board.base} ready", flush=True)
            await stop.wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
