"""Signed configs pushed to a real agent: the session's Mosquitto, `Agent` objects running in this
event loop, simulated Modbus devices served by pymodbus, and a test key made with `generate_key`.

The `Fleet` below stands in for the fleet service: it signs documents, publishes them retained on
`…/config` and reads what the agent answers (acks, state, telemetry, events, command results).
The command and schedule tests reuse these helpers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config import AgentConfig
from agent.control import Outbox
from agent.coordinator import DeviceLoop
from agent.runtime import Agent
from drivers.base import Driver
from drivers.errors import DriverError
from drivers.profiles import AnyProfile, ProfileLibrary
from drivers.registry import Connection, DriverFactory
from simulator.broker import MosquittoBroker, free_port
from simulator.modbus_server import SimulatedModbusDevice, serve_tcp
from simulator.values import DeviceValues
from wire.control import Ack, AckStatus, SignedDocument
from wire.models import Event, EventKind, GatewayState, TelemetryBatch
from wire.mqtt import MqttLink, MqttSettings
from wire.signing import generate_key, load_private_key, public_path, sign
from wire.topics import Channel, topic

PROFILES = ProfileLibrary.load()
THC = "campussim-thc100"
RELAY = "wirenboard-wb-mr6xv"


async def eventually(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """The predicate's first true value, polled in this event loop."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        await asyncio.sleep(0.05)


# -- simulated devices -----------------------------------------------------------------------------


@dataclass
class Sim:
    device: SimulatedModbusDevice
    port: int
    task: asyncio.Task[None]

    def connection(self, **extra: Any) -> dict[str, Any]:
        return {"type": "modbus-tcp", "host": "127.0.0.1", "port": self.port, **extra}


class Sims:
    def __init__(self) -> None:
        self.running: list[Sim] = []

    async def start(self, profile_id: str, unit: int = 1) -> Sim:
        profile = PROFILES.get(profile_id)
        device = SimulatedModbusDevice(
            profile, DeviceValues(profile, seed=unit), unit=unit, clock=time.time
        )
        port = free_port()
        task = asyncio.create_task(serve_tcp([device], "127.0.0.1", port))
        sim = Sim(device, port, task)
        self.running.append(sim)

        async def answers() -> bool:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                return False
            writer.close()
            return True

        deadline = time.monotonic() + 5
        while not await answers():
            assert time.monotonic() < deadline, f"simulated {profile_id} did not listen"
            await asyncio.sleep(0.05)
        return sim

    async def close(self) -> None:
        for sim in self.running:
            sim.task.cancel()
        await asyncio.gather(*(sim.task for sim in self.running), return_exceptions=True)


@pytest.fixture
async def sims() -> AsyncIterator[Sims]:
    running = Sims()
    yield running
    await running.close()


def device(
    device_id: str, profile: str, sim: Sim, interval_s: float = 0.2, **extra: Any
) -> dict[str, Any]:
    return {
        "id": device_id,
        "profile": profile,
        "interval_s": interval_s,
        "timeout_s": 1.0,
        "connection": sim.connection(timeout_s=0.5),
        **extra,
    }


# -- the fleet's side ------------------------------------------------------------------------------


class Fleet:
    """Signs and publishes configs for one gateway, and keeps everything the agent publishes."""

    def __init__(self, broker: MosquittoBroker, site: str, gateway: str, key: Path) -> None:
        self.site = site
        self.gateway = gateway
        self.key = load_private_key(key)
        self.key_path = key
        self.settings = MqttSettings(
            host="127.0.0.1", port=broker.port, keepalive_s=5, reconnect_max_s=2
        )
        # A session of its own: what the agent says while this link is away is kept for it.
        self.link = MqttLink(self.settings, f"test-fleet-{site}-{gateway}")
        self.received: dict[Channel, list[bytes]] = defaultdict(list)
        self._reader: asyncio.Task[None] | None = None

    def topic(self, channel: Channel) -> str:
        return topic(self.site, self.gateway, channel)

    async def start(self) -> None:
        channels = [
            Channel.ACK,
            Channel.STATE,
            Channel.TELEMETRY,
            Channel.EVENTS,
            Channel.CMD_RESULT,
        ]
        await self.link.subscribe(*(self.topic(c) for c in channels), qos=1)
        await self.link.start()
        await self.link.wait_connected(10)
        await self.link.wait_subscribed(10)
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        by_topic = {self.topic(c): c for c in Channel}
        async for message in self.link.messages():
            channel = by_topic.get(message.topic)
            if channel is not None:
                self.received[channel].append(message.payload)

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        await self.link.stop()

    def document(
        self,
        version: int,
        body: dict[str, Any],
        *,
        gateway: str | None = None,
        key: Ed25519PrivateKey | None = None,
    ) -> SignedDocument:
        return sign(
            key or self.key,
            kind="config",
            site=self.site,
            gateway=gateway or self.gateway,
            version=version,
            issued_ns=time.time_ns(),
            body=body,
        )

    async def publish(self, document: SignedDocument | bytes) -> None:
        payload = (
            document
            if isinstance(document, bytes)
            else document.model_dump_json(exclude_none=True).encode()
        )
        future = self.link.publish(self.topic(Channel.CONFIG), payload, qos=1, retain=True)
        await self.link.acknowledged(future, 10)

    def acks(self) -> list[Ack]:
        return [Ack.model_validate_json(p) for p in self.received[Channel.ACK]]

    async def push(self, document: SignedDocument | bytes, timeout: float = 10) -> Ack:
        """Publishes a config and returns the agent's next ack."""
        seen = len(self.received[Channel.ACK])
        await self.publish(document)
        await eventually(lambda: len(self.received[Channel.ACK]) > seen, timeout, "an ack")
        return self.acks()[seen]

    def states(self) -> list[GatewayState]:
        return [GatewayState.model_validate_json(p) for p in self.received[Channel.STATE]]

    def events(self, kind: EventKind | None = None) -> list[Event]:
        events = [Event.model_validate_json(p) for p in self.received[Channel.EVENTS]]
        return [e for e in events if kind is None or e.kind is kind]

    def readings_of(self, device_id: str) -> list[tuple[str, Any]]:
        found = []
        for payload in self.received[Channel.TELEMETRY]:
            batch = TelemetryBatch.model_validate_json(payload)
            found += [(r[3], r[4]) for r in batch.readings if r[2] == device_id]
        return found


@dataclass
class Gateway:
    """What one test needs: ids, the trusted key, the broker, and a config maker."""

    tmp_path: Path
    broker: MosquittoBroker
    site: str
    gateway: str
    key: Path

    @property
    def applied_path(self) -> Path:
        return self.tmp_path / "state" / "config.applied.json"

    def config(self, devices: list[dict[str, Any]], **extra: Any) -> AgentConfig:
        document: dict[str, Any] = {
            "site": self.site,
            "gateway": self.gateway,
            "mqtt": {
                "host": "127.0.0.1",
                "port": self.broker.port,
                "keepalive_s": 5,
                "reconnect_max_s": 2,
            },
            "buffer": {"path": str(self.tmp_path / "buffer.db"), "commit_interval_s": 0.05},
            "forwarder": {"ack_timeout_s": 5},
            "state_interval_s": 30,
            "clock": {"sync_check": "none"},
            "fleet": {
                "public_keys": [str(public_path(self.key))],
                "applied_path": str(self.applied_path),
            },
            "devices": devices,
        }
        for name, value in extra.items():
            if isinstance(value, dict):
                document[name] = {**document.get(name, {}), **value}
            else:
                document[name] = value
        return AgentConfig.model_validate(document)


@pytest.fixture
def gateway(tmp_path: Path, broker: MosquittoBroker) -> Gateway:
    key = tmp_path / "keys" / "fleet.key"
    generate_key(key)
    return Gateway(tmp_path, broker, f"school-{uuid.uuid4().hex[:10]}", "gw-1", key)


@pytest.fixture
async def fleet(gateway: Gateway) -> AsyncIterator[Fleet]:
    running = Fleet(gateway.broker, gateway.site, gateway.gateway, gateway.key)
    await running.start()
    yield running
    await running.stop()


@contextlib.asynccontextmanager
async def running(agent: Agent) -> AsyncIterator[Agent]:
    """Runs `agent` in this event loop until the block ends (then stops it as SIGTERM would)."""
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop), name="agent")
    try:
        await eventually(lambda: task.done() or agent.link.connected, 10, "the agent connected")
        if task.done():
            task.result()
        yield agent
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 20)


def loops(agent: Agent) -> dict[str, DeviceLoop]:
    return dict(agent.coordinator.loops)


def latest_state(fleet: Fleet) -> GatewayState | None:
    states = fleet.states()
    return states[-1] if states else None


# -- tests -----------------------------------------------------------------------------------------


async def test_configs_add_change_and_remove_devices(
    gateway: Gateway, fleet: Fleet, sims: Sims
) -> None:
    room_a, room_b = await sims.start(THC), await sims.start(THC)
    agent = Agent(gateway.config([device("room-a", THC, room_a)]), PROFILES)
    async with running(agent):
        await eventually(lambda: fleet.readings_of("room-a"), 10, "readings of room-a")
        loop_a = loops(agent)["room-a"]

        both = {"devices": [device("room-a", THC, room_a), device("room-b", THC, room_b)]}
        ack = await fleet.push(fleet.document(1, both))
        assert (ack.status, ack.version, ack.applied_version, ack.reason) == (
            AckStatus.APPLIED,
            1,
            1,
            None,
        )
        assert ack.sha256 == fleet.document(1, both).sha256
        assert loops(agent)["room-a"] is loop_a, "an unchanged device keeps its poll loop"
        await eventually(lambda: fleet.readings_of("room-b"), 10, "readings of the added device")
        state = await eventually(
            lambda: (s := latest_state(fleet)) and s.config_version == 1 and s, 10, "state v1"
        )
        assert [d.id for d in state.devices or []] == ["room-a", "room-b"]

        slower = {
            "devices": [
                device("room-a", THC, room_a, interval_s=0.5),
                device("room-b", THC, room_b),
            ]
        }
        loop_b = loops(agent)["room-b"]
        ack = await fleet.push(fleet.document(2, slower))
        assert ack.status is AckStatus.APPLIED and ack.applied_version == 2
        assert loops(agent)["room-a"] is not loop_a
        assert loops(agent)["room-a"].device.interval_s == 0.5
        assert loops(agent)["room-b"] is loop_b
        assert loop_a.task is not None and loop_a.task.done(), "the replaced loop stopped"

        only_b = {"devices": [device("room-b", THC, room_b)]}
        ack = await fleet.push(fleet.document(3, only_b))
        assert ack.status is AckStatus.APPLIED and ack.applied_version == 3
        assert list(loops(agent)) == ["room-b"]
        reads_a = room_a.device.reads
        await asyncio.sleep(1.2)
        assert room_a.device.reads == reads_a, "the removed device is no longer polled"
        assert room_b.device.reads > 0
        state = await eventually(
            lambda: (s := latest_state(fleet)) and s.config_version == 3 and s, 10, "state v3"
        )
        assert [d.id for d in state.devices or []] == ["room-b"]

        applied = SignedDocument.model_validate_json(gateway.applied_path.read_bytes())
        assert (applied.version, applied.body) == (3, only_b)
        events = await eventually(
            lambda: len(fleet.events(EventKind.CONFIG)) >= 3 and fleet.events(EventKind.CONFIG),
            10,
            "config events",
        )
        assert [e.data["version"] for e in events] == [1, 2, 3]
        assert all(e.data["status"] == "applied" for e in events)
        assert "added room-b" in events[0].message
        assert "removed room-a" in events[2].message


async def test_refused_documents_change_nothing_and_say_why(
    gateway: Gateway, fleet: Fleet, sims: Sims, tmp_path: Path
) -> None:
    room = await sims.start(THC)
    body = {"devices": [device("room-a", THC, room)]}
    agent = Agent(gateway.config([]), PROFILES)
    async with running(agent):
        ack = await fleet.push(fleet.document(5, body))
        assert ack.status is AckStatus.APPLIED
        applied_loop = loops(agent)["room-a"]

        def refused(ack: Ack, version: int, reason: str) -> None:
            assert ack.status is AckStatus.REJECTED, ack
            assert ack.version == version
            assert ack.applied_version == 5
            assert ack.reason is not None and reason in ack.reason, ack.reason
            assert loops(agent) == {"room-a": applied_loop}

        changed = {"devices": [device("room-a", THC, room, interval_s=1.0)]}
        good = fleet.document(6, changed)
        tampered = good.model_copy(update={"body": {"devices": []}})
        refused(await fleet.push(tampered), 6, "does not match its signed hash (tampered)")
        refused(
            await fleet.push(good.model_copy(update={"version": 7})),
            7,
            "the signature does not match (tampered or corrupted)",
        )
        refused(
            await fleet.push(fleet.document(6, changed, gateway="gw-2")),
            6,
            f"for gateway {gateway.site}/gw-2, this gateway is {gateway.site}/gw-1",
        )
        stranger = Ed25519PrivateKey.generate()
        refused(
            await fleet.push(fleet.document(6, changed, key=stranger)),
            6,
            "which this gateway does not trust",
        )
        refused(
            await fleet.push(good.model_copy(update={"signature": ""})),
            6,
            "config version 6 is not signed",
        )
        refused(
            await fleet.push(fleet.document(3, changed)),
            3,
            "version 3 is older than the applied version 5: replay refused",
        )
        refused(
            await fleet.push(fleet.document(5, changed)),
            5,
            "version 5 is already applied with another body",
        )
        unknown = {"devices": [{**device("room-a", THC, room), "profile": "no-such-sensor"}]}
        refused(
            await fleet.push(fleet.document(6, unknown)),
            6,
            "body.devices.0.profile: unknown profile 'no-such-sensor'",
        )
        bad_field = {"devices": [{**device("room-a", THC, room), "interval_s": -1}]}
        refused(await fleet.push(fleet.document(6, bad_field)), 6, "body.devices.0.interval_s")
        refused(await fleet.push(b"{not json"), 0, "not a valid signed document")
        refused(
            await fleet.push(json.dumps({"v": 1, "version": 9}).encode()),
            9,
            "not a valid signed document",
        )

        again = await fleet.push(fleet.document(5, body))
        assert (again.status, again.version, again.applied_version) == (AckStatus.APPLIED, 5, 5)
        assert loops(agent)["room-a"] is applied_loop, "the applied version is not applied again"
        rejections = await eventually(
            lambda: [e for e in fleet.events(EventKind.CONFIG) if e.data["status"] == "rejected"],
            10,
            "rejection events",
        )
        assert len(rejections) >= 10
        saved = SignedDocument.model_validate_json(gateway.applied_path.read_bytes())
        assert saved.version == 5


class FailingDrivers(DriverFactory):
    """Real drivers, except for one profile whose driver cannot be built."""

    def __init__(self, failing_profile: str) -> None:
        super().__init__()
        self.failing_profile = failing_profile

    def build(self, profile: AnyProfile, connection: Connection) -> Driver:
        if profile.id == self.failing_profile:
            raise DriverError(f"{connection.type} port busy (injected)")
        return super().build(profile, connection)


async def test_a_config_that_cannot_be_applied_is_rolled_back(
    gateway: Gateway, fleet: Fleet, sims: Sims
) -> None:
    room, relay, other = await sims.start(THC), await sims.start(RELAY), await sims.start(THC)
    agent = Agent(
        gateway.config([device("room-a", THC, room)]), PROFILES, drivers=FailingDrivers(RELAY)
    )
    async with running(agent):
        before = loops(agent)
        body = {
            "devices": [
                device("room-b", THC, other),  # built and started first, then stopped again
                device("room-a", THC, room, interval_s=0.3),
                device("relays", RELAY, relay),
            ]
        }
        ack = await fleet.push(fleet.document(1, body))
        assert ack.status is AckStatus.REJECTED
        assert ack.reason == ("could not apply: modbus-tcp port busy (injected) (rolled back)"), (
            ack.reason
        )
        assert ack.applied_version == 0
        assert loops(agent) == before
        polls = before["room-a"].health.polls
        await eventually(
            lambda: before["room-a"].health.polls > polls + 3, 5, "the old loop still polls"
        )
        assert not gateway.applied_path.exists()
        others = [t for t in asyncio.all_tasks() if t.get_name() in ("poll:room-b", "poll:relays")]
        assert all(t.done() for t in others), "the loops started for the config were stopped"
        reads = other.device.reads
        await asyncio.sleep(0.6)
        assert other.device.reads == reads


async def test_a_config_that_cannot_be_saved_is_rolled_back(
    gateway: Gateway, fleet: Fleet, sims: Sims
) -> None:
    room, other = await sims.start(THC), await sims.start(THC)
    blocker = gateway.tmp_path / "not-a-folder"
    blocker.write_text("a file where the applied config's folder should be")
    config = gateway.config(
        [device("room-a", THC, room)],
        fleet={"applied_path": str(blocker / "config.applied.json")},
    )
    agent = Agent(config, PROFILES)
    async with running(agent):
        before = loops(agent)
        ack = await fleet.push(fleet.document(1, {"devices": [device("room-b", THC, other)]}))
        assert ack.status is AckStatus.REJECTED
        assert ack.reason is not None
        assert ack.reason.startswith(f"could not apply: cannot save it at {blocker}/")
        assert ack.reason.endswith("(rolled back)")
        assert loops(agent) == before
        assert agent.control.applied is None


async def test_a_restarted_agent_runs_its_persisted_config(
    gateway: Gateway, fleet: Fleet, sims: Sims
) -> None:
    room_a, room_b = await sims.start(THC), await sims.start(THC)
    config = gateway.config([device("room-a", THC, room_a)])
    pushed = fleet.document(2, {"devices": [device("room-b", THC, room_b, interval_s=0.3)]})
    async with running(Agent(config, PROFILES)):
        assert (await fleet.push(pushed)).status is AckStatus.APPLIED
    await fleet.publish(b"")  # the broker forgets the retained config: only the file is left
    fleet.received.clear()

    agent = Agent(config, PROFILES)
    async with running(agent):
        assert list(loops(agent)) == ["room-b"]
        assert loops(agent)["room-b"].device.interval_s == 0.3
        assert agent.control.applied_version == 2
        state = await eventually(lambda: latest_state(fleet), 10, "state")
        assert (state.status, state.config_version) == ("online", 2)
        assert [d.id for d in state.devices or []] == ["room-b"]
        loop_b = loops(agent)["room-b"]
        ack = await fleet.push(pushed)
        assert (ack.status, ack.applied_version) == (AckStatus.APPLIED, 2)
        assert loops(agent)["room-b"] is loop_b


async def test_an_agent_started_later_takes_the_retained_config(
    gateway: Gateway, fleet: Fleet, sims: Sims
) -> None:
    room_a, room_b = await sims.start(THC), await sims.start(THC)
    await fleet.publish(fleet.document(4, {"devices": [device("room-b", THC, room_b)]}))
    agent = Agent(gateway.config([device("room-a", THC, room_a)]), PROFILES)
    async with running(agent):
        await eventually(lambda: fleet.acks(), 10, "the agent's ack")
        ack = fleet.acks()[0]
        assert (ack.status, ack.version, ack.applied_version) == (AckStatus.APPLIED, 4, 4)
        assert list(loops(agent)) == ["room-b"]
        await eventually(lambda: fleet.readings_of("room-b"), 10, "readings of room-b")


@pytest.mark.parametrize("damage", ["garbage", "untrusted", "other-gateway", "unknown-profile"])
async def test_a_damaged_applied_file_is_set_aside(
    gateway: Gateway, fleet: Fleet, sims: Sims, damage: str
) -> None:
    room_a, room_b = await sims.start(THC), await sims.start(THC)
    body = {"devices": [device("room-b", THC, room_b)]}
    documents: dict[str, SignedDocument | bytes] = {
        "garbage": b'{"kind": "config", "vers',
        "untrusted": fleet.document(3, body, key=Ed25519PrivateKey.generate()),
        "other-gateway": fleet.document(3, body, gateway="gw-9"),
        "unknown-profile": fleet.document(
            3, {"devices": [{**device("room-b", THC, room_b), "profile": "gone"}]}
        ),
    }
    document = documents[damage]
    payload = document if isinstance(document, bytes) else document.model_dump_json().encode()
    gateway.applied_path.parent.mkdir(parents=True)
    gateway.applied_path.write_bytes(payload)

    agent = Agent(gateway.config([device("room-a", THC, room_a)]), PROFILES)
    async with running(agent):
        assert list(loops(agent)) == ["room-a"]
        assert agent.control.applied_version == 0
    assert not gateway.applied_path.exists()
    (bad,) = gateway.applied_path.parent.glob("config.applied.json.bad-*")
    assert bad.read_bytes() == payload


async def test_the_retained_config_comes_back_after_a_reconnect(
    gateway: Gateway, own_broker: MosquittoBroker, sims: Sims
) -> None:
    room_a, room_b = await sims.start(THC), await sims.start(THC)
    gateway.broker = own_broker
    fleet = Fleet(own_broker, gateway.site, gateway.gateway, gateway.key)
    await fleet.start()
    agent = Agent(gateway.config([device("room-a", THC, room_a)]), PROFILES)
    try:
        async with running(agent):
            connects = agent.link.connects
            await asyncio.to_thread(own_broker.stop)
            await eventually(lambda: not agent.link.connected, 10, "the agent disconnected")
            await asyncio.to_thread(own_broker.start)
            # The fleet pushes right away: the agent gets it live or, if it reconnects later,
            # as the retained message; either way once.
            await eventually(lambda: fleet.link.connected, 15, "the fleet reconnected")
            await fleet.publish(fleet.document(1, {"devices": [device("room-b", THC, room_b)]}))
            await eventually(lambda: agent.link.connects > connects, 15, "agent reconnected")
            await eventually(lambda: fleet.acks(), 10, "an ack")
            assert fleet.acks()[-1].status is AckStatus.APPLIED
            assert list(loops(agent)) == ["room-b"]
            loop_b = loops(agent)["room-b"]

            acks = len(fleet.acks())
            await asyncio.to_thread(own_broker.stop)
            await eventually(lambda: not agent.link.connected, 10, "disconnected again")
            await asyncio.to_thread(own_broker.start)
            await eventually(lambda: len(fleet.acks()) > acks, 20, "the ack of the redelivery")
            assert fleet.acks()[-1].status is AckStatus.APPLIED
            assert fleet.acks()[-1].version == 1
            assert loops(agent)["room-b"] is loop_b, "a redelivered config is not applied again"
    finally:
        await fleet.stop()


async def test_answers_wait_for_the_broker_and_only_the_latest_ack_is_sent(
    own_broker: MosquittoBroker, tmp_path: Path
) -> None:
    settings = MqttSettings(host="127.0.0.1", port=own_broker.port, keepalive_s=5)
    receiver = MqttLink(settings, "test-outbox-receiver", clean_start=False)
    await receiver.subscribe("outbox-test/#", qos=1)
    await receiver.start()
    await receiver.wait_subscribed(10)
    sender = MqttLink(settings.model_copy(update={"reconnect_max_s": 1}), "test-outbox-sender")
    await sender.start()
    await sender.wait_connected(10)
    outbox = Outbox(sender, ack_timeout_s=5)
    task = asyncio.create_task(outbox.run())
    try:
        await asyncio.to_thread(own_broker.stop)
        await eventually(lambda: not sender.connected, 10, "the sender disconnected")
        outbox.put("outbox-test/ack", b"ack v1", key="config")
        outbox.put("outbox-test/result", b"result 1")
        outbox.put("outbox-test/ack", b"ack v2", key="config")
        await asyncio.sleep(0.5)
        assert outbox.pending == 2
        await asyncio.to_thread(own_broker.start)
        received: list[tuple[str, bytes]] = []

        def drain() -> bool:
            while (message := receiver.get_nowait()) is not None:
                received.append((message.topic, message.payload))
            return len(received) >= 2 and outbox.pending == 0

        await eventually(drain, 20, "both answers delivered")
        await asyncio.sleep(0.3)
        drain()
        assert sorted(received) == [
            ("outbox-test/ack", b"ack v2"),
            ("outbox-test/result", b"result 1"),
        ]
        assert outbox.sent == 2
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await sender.stop()
        await receiver.stop()
