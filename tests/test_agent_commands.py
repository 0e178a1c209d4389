"""Fleet commands run by a real agent on a simulated WB-MR6xV relay module (pymodbus), over the
session's Mosquitto; what the relay holds is read back with pymodbus's own client."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from pymodbus.client import AsyncModbusTcpClient

from agent.runtime import Agent
from simulator.modbus_server import Fault
from tests.test_agent_control import (
    PROFILES,
    RELAY,
    Fleet,
    Gateway,
    Sim,
    Sims,
    device,
    eventually,
    running,
)
from wire.control import CommandOutcome, CommandRequest, CommandResult
from wire.models import EventKind
from wire.topics import Channel

pytest_plugins = ["tests.test_agent_control"]


async def coil(sim: Sim, address: int) -> bool:
    """What the simulated device holds, asked by another Modbus stack than the agent's."""
    client = AsyncModbusTcpClient("127.0.0.1", port=sim.port, timeout=2)
    await client.connect()
    try:
        response = await client.read_coils(address, count=1, device_id=1)
        assert not response.isError(), response
        return bool(response.bits[0])
    finally:
        client.close()


def request(
    device_id: str, action: str, argument: Any = None, *, within_s: float = 10, **extra: Any
) -> CommandRequest:
    now = time.time_ns()
    return CommandRequest(
        id=extra.pop("id", f"cmd-{uuid.uuid4().hex[:12]}"),
        device=device_id,
        action=action,
        argument=argument,
        issued_ns=now,
        deadline_ns=now + int(within_s * 1e9),
    )


async def send(fleet: Fleet, payload: CommandRequest | bytes) -> None:
    data = payload if isinstance(payload, bytes) else payload.model_dump_json().encode()
    future = fleet.link.publish(fleet.topic(Channel.CMD), data, qos=1)
    await fleet.link.acknowledged(future, 10)


def results(fleet: Fleet, command_id: str | None = None) -> list[CommandResult]:
    found = [CommandResult.model_validate_json(p) for p in fleet.received[Channel.CMD_RESULT]]
    return [r for r in found if command_id is None or r.id == command_id]


async def run(fleet: Fleet, command: CommandRequest, timeout: float = 10) -> CommandResult:
    await send(fleet, command)
    found: list[CommandResult] = await eventually(
        lambda: results(fleet, command.id), timeout, f"result {command.id}"
    )
    return found[0]


def relay_agent(gateway: Gateway, sim: Sim, **connection: Any) -> Agent:
    relays = device("relays", RELAY, sim, interval_s=0.2)
    relays["connection"] = sim.connection(**{"timeout_s": 0.5, **connection})
    return Agent(gateway.config([relays]), PROFILES)


async def test_a_command_switches_a_relay(gateway: Gateway, fleet: Fleet, sims: Sims) -> None:
    sim = await sims.start(RELAY)
    async with running(relay_agent(gateway, sim)):
        assert await coil(sim, 0) is False
        result = await run(fleet, request("relays", "set_relay_1", True))
        assert result.outcome is CommandOutcome.OK, result
        assert result.result == {"command": "set_relay_1", "point": "relay_1", "value": True}
        assert result.device == "relays" and result.error is None
        assert await coil(sim, 0) is True
        await eventually(
            lambda: ("relay_1", True) in fleet.readings_of("relays"), 10, "relay_1 on polled"
        )

        result = await run(fleet, request("relays", "set_relay_1", "off"))
        assert result.outcome is CommandOutcome.OK
        assert await coil(sim, 0) is False
        assert await coil(sim, 1) is False, "only relay 1 was touched"

        events = await eventually(
            lambda: len(fleet.events(EventKind.COMMAND)) >= 2 and fleet.events(EventKind.COMMAND),
            10,
            "command events",
        )
        assert [(e.device, e.data["action"], e.data["outcome"]) for e in events] == [
            ("relays", "set_relay_1", "ok"),
            ("relays", "set_relay_1", "ok"),
        ]


async def test_commands_that_cannot_run_say_why_and_write_nothing(
    gateway: Gateway, fleet: Fleet, sims: Sims
) -> None:
    sim = await sims.start(RELAY)
    agent = relay_agent(gateway, sim)
    async with running(agent):
        writes = sim.device.writes

        result = await run(fleet, request("hall-lights", "set_relay_1", True))
        assert result.outcome is CommandOutcome.UNKNOWN_DEVICE
        assert result.error == "no device 'hall-lights' on this gateway (devices: relays)"

        result = await run(fleet, request("relays", "self_destruct"))
        assert result.outcome is CommandOutcome.UNKNOWN_ACTION
        assert result.error is not None
        assert "wirenboard-wb-mr6xv has no command 'self_destruct'" in result.error
        assert "commands: set_relay_1, set_relay_2" in result.error

        result = await run(fleet, request("relays", "set_relay_1", "maybe"))
        assert (result.outcome, result.error) == (
            CommandOutcome.BAD_ARGUMENT,
            "'maybe' is not on/off (true/false)",
        )
        result = await run(fleet, request("relays", "set_safe_mode_timeout", 70000))
        assert (result.outcome, result.error) == (
            CommandOutcome.BAD_ARGUMENT,
            "70000 is above the maximum 65535",
        )
        result = await run(fleet, request("relays", "set_relay_1"))
        assert result.outcome is CommandOutcome.BAD_ARGUMENT
        assert result.error == "command 'set_relay_1' needs an argument (bool)"

        result = await run(fleet, request("relays", "set_relay_1", True, within_s=-5))
        assert result.outcome is CommandOutcome.EXPIRED
        assert result.error is not None and result.error.endswith("after its deadline: not run")

        await send(fleet, b"\x00not json")
        partial = {"id": "broken-1", "device": "relays", "action": "set_relay_1"}
        await send(fleet, json.dumps(partial).encode())
        (broken,) = await eventually(lambda: results(fleet, "broken-1"), 10, "broken-1 answered")
        assert broken.outcome is CommandOutcome.BAD_ARGUMENT
        assert broken.device == "relays"
        assert broken.error is not None and broken.error.startswith("invalid command request")
        assert "issued_ns" in broken.error and "deadline_ns" in broken.error
        await eventually(lambda: agent.executor.rejected == 2, 5, "two payloads refused")
        refusals = await eventually(
            lambda: fleet.events(EventKind.REJECTED_INPUT), 10, "rejected_input events"
        )
        assert all(e.message.startswith("invalid command request") for e in refusals)
        assert len(results(fleet)) == 7, "the payload without an id got no answer"
        assert sim.device.writes == writes


async def test_a_device_that_does_not_answer(gateway: Gateway, fleet: Fleet, sims: Sims) -> None:
    sim = await sims.start(RELAY)
    async with running(relay_agent(gateway, sim, timeout_s=1.5, retries=0)):
        await eventually(lambda: fleet.readings_of("relays"), 10, "first readings")
        sim.device.fault = Fault("offline")
        result = await run(fleet, request("relays", "set_relay_3", True), timeout=15)
        assert result.outcome is CommandOutcome.DEVICE_ERROR
        assert result.error == f"127.0.0.1:{sim.port}: no answer within 1.5 s"

        sim.device.fault = Fault("slow", delay_s=3)
        result = await run(fleet, request("relays", "set_relay_3", True, within_s=0.5))
        assert result.outcome is CommandOutcome.TIMEOUT
        assert result.error is not None and result.error.startswith("no result within 0.")

        sim.device.fault = Fault()
        await asyncio.sleep(3)  # the slow answer goes by
        result = await run(fleet, request("relays", "set_relay_3", True))
        assert result.outcome is CommandOutcome.OK
        assert await coil(sim, 2) is True


async def test_a_command_redelivered_runs_once(gateway: Gateway, fleet: Fleet, sims: Sims) -> None:
    sim = await sims.start(RELAY)
    async with running(relay_agent(gateway, sim, timeout_s=2)):
        await eventually(lambda: fleet.readings_of("relays"), 10, "first readings")
        writes = sim.device.writes
        sim.device.fault = Fault("slow", delay_s=0.4)
        command = request("relays", "set_relay_4", True, id="once-only")
        await send(fleet, command)
        await send(fleet, command)  # a duplicate while the first one runs
        first = await eventually(lambda: results(fleet, "once-only"), 15, "the result")
        await asyncio.sleep(1)
        assert len(results(fleet, "once-only")) == 1
        assert first[0].outcome is CommandOutcome.OK
        sim.device.fault = Fault()

        await send(fleet, command)  # redelivered later (e.g. after a reconnect)
        both = await eventually(
            lambda: len(results(fleet, "once-only")) == 2 and results(fleet, "once-only"),
            10,
            "the stored result sent again",
        )
        assert both[0] == both[1], "the same result, not a second run"
        assert sim.device.writes == writes + 1
        assert await coil(sim, 3) is True


async def test_a_command_waits_for_its_bus(gateway: Gateway, fleet: Fleet, sims: Sims) -> None:
    sim = await sims.start(RELAY)
    agent = relay_agent(gateway, sim)
    async with running(agent):
        loop = agent.coordinator.loops["relays"]
        lock = agent.coordinator.bus_lock(loop.driver.bus)
        assert loop.lock is lock, "polls and commands share the bus lock"
        writes = sim.device.writes
        async with lock:  # a poll (or another command) on the bus
            polls = loop.health.polls
            await send(fleet, request("relays", "set_relay_5", True, id="waits"))
            await asyncio.sleep(0.8)
            assert results(fleet, "waits") == []
            assert sim.device.writes == writes
            assert loop.health.polls <= polls + 1, "the poll waits too"
        result = await eventually(lambda: results(fleet, "waits"), 10, "the result")
        assert result[0].outcome is CommandOutcome.OK
        assert await coil(sim, 4) is True
