"""The service's control loop (fleet/control.py) against a stand-in MQTT link whose broker the test
plays: PUBACKs that come late or while the broker is away, connections that come and go.

The loop must never wait for the broker: heartbeat, command deadlines and rollouts go on while
it is away, and rollout acknowledgement timeouts only count time in which answers could arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from drivers.profiles import ProfileLibrary
from fleet import control as control_module
from fleet.commands import Commands, Target
from fleet.config import FleetConfig
from fleet.control import ControlPlane
from fleet.desired import body_of, build_config
from fleet.registry import Registry
from fleet.rollouts import Rollouts
from fleet.store import Store
from fleet.versions import Versions
from wire.mqtt import MqttLink, MqttSettings, NotConnected, PublishRefused
from wire.signing import generate_key

SITE = "school-1"


class BrokerLink(MqttLink):
    """An MqttLink whose broker is the test: publications are recorded, their PUBACKs given by
    hand, the connection switched on and off. `acknowledged()` is the real one."""

    def __init__(self) -> None:
        super().__init__(MqttSettings(), client_id="control-plane-test")
        self.published: list[tuple[str, dict[str, Any], asyncio.Future[int]]] = []

    def online(self) -> None:
        self.connects += 1
        self._connected.set()

    def offline(self) -> None:
        self._connected.clear()

    def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False
    ) -> asyncio.Future[int]:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        if not self.connected:
            future.set_exception(NotConnected("test", 0))
            return future
        self.published.append((topic, json.loads(payload), future))
        return future

    def configs(self) -> list[tuple[str, int]]:
        return [
            (message["gateway"], message["version"])
            for name, message, _future in self.published
            if name.endswith("/config")
        ]


async def eventually(predicate: Callable[[], Any], timeout: float = 5.0, what: str = "") -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (value := predicate()):
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        await asyncio.sleep(0.01)
    return value


class Fleet:
    def __init__(self, tmp_path: Path) -> None:
        generate_key(tmp_path / "fleet-signing.key")
        self.config = FleetConfig(
            database=tmp_path / "fleet.db", signing_key=tmp_path / "fleet-signing.key"
        )
        self.store = Store(self.config.database)
        self.library = ProfileLibrary.load()
        self.registry = Registry(self.store, self.library)
        self.registry.add_site(SITE)
        self.registry.add_building(SITE, "a")
        for n in (1, 2):
            self.registry.add_gateway(SITE, f"gw-0{n}", building="a")
            self.registry.add_device(
                SITE,
                f"rel-0{n}",
                f"gw-0{n}",
                "wirenboard-wb-mr6xv",
                {"type": "modbus-tcp", "host": "127.0.0.1", "port": 1502 + n},
            )
        self.versions = Versions(self.store)
        self.link = BrokerLink()
        self.control = ControlPlane(self.config, self.store, self.link)

    def push(self, gateway: str, interval_s: float) -> int:
        body = body_of(build_config(self.registry, self.library, SITE, gateway))
        body["devices"][0]["interval_s"] = interval_s
        with self.store.transaction():
            staged = self.versions.stage(SITE, gateway, body, origin="push", actor="t")
        assert staged.version is not None
        return staged.version

    def state(self, gateway: str, version: int) -> str:
        row = self.versions.get(SITE, gateway, version)
        assert row is not None
        return str(row["state"])

    def reason(self, gateway: str, version: int) -> str | None:
        row = self.versions.get(SITE, gateway, version)
        assert row is not None
        return row["reason"]  # type: ignore[no-any-return]

    def heartbeat(self) -> int:
        row = self.store.conn.execute("SELECT heartbeat_ns FROM service").fetchone()
        return int(row[0]) if row else 0


@pytest.fixture
async def fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Fleet]:
    monkeypatch.setattr(control_module, "POLL_S", 0.01)
    monkeypatch.setattr(control_module, "TICK_S", 0.05)
    env = Fleet(tmp_path)
    task = asyncio.create_task(env.control.run())
    try:
        yield env
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        env.store.close()


async def test_the_loop_goes_on_while_the_broker_is_away(fleet: Fleet) -> None:
    fleet.link.online()
    version = fleet.push("gw-01", 5)
    await eventually(fleet.link.configs, what="the config published")
    # The broker goes away before its PUBACK: paho keeps the message for the next connection.
    fleet.link.offline()
    commands = Commands(fleet.store)
    batch = commands.queue(
        [Target(SITE, "gw-02", "rel-02", "wirenboard-wb-mr6xv")],
        "set_relay_1",
        True,
        timeout_s=0.1,
        actor="t",
        library=fleet.library,
    )
    before = fleet.heartbeat()
    await asyncio.sleep(0.5)
    assert fleet.heartbeat() > before, "no heartbeat while the broker is away"
    (command,) = commands.batch(batch)
    assert command["status"] == "timeout", "its deadline passed while the broker was away"
    assert fleet.state("gw-01", version) == "pending"
    # Back: the PUBACK of the message paho sent again marks it sent; it was published once.
    fleet.link.online()
    _topic, _message, future = fleet.link.published[0]
    future.set_result(0)
    await eventually(lambda: fleet.state("gw-01", version) == "sent", what="marked sent")
    assert fleet.link.configs() == [("gw-01", version)]
    stored = fleet.versions.get(SITE, "gw-01", version)
    assert stored is not None and json.loads(stored["document"])["version"] == version


async def test_only_the_newest_pending_version_of_a_gateway_is_published(fleet: Fleet) -> None:
    older = fleet.push("gw-01", 5)
    newer = fleet.push("gw-01", 6)
    fleet.link.online()
    await eventually(fleet.link.configs, what="a config published")
    await asyncio.sleep(0.1)
    assert fleet.link.configs() == [("gw-01", newer)]
    fleet.link.published[0][2].set_result(0)
    await eventually(lambda: fleet.state("gw-01", newer) == "sent", what="marked sent")
    assert fleet.state("gw-01", older) == "superseded"
    await asyncio.sleep(0.1)
    assert fleet.link.configs() == [("gw-01", newer)], "the older one never goes out after it"


async def test_a_refused_publication_says_why_and_is_tried_again_later(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control_module, "RETRY_S", 0.3)
    fleet.link.online()
    version = fleet.push("gw-01", 5)
    await eventually(fleet.link.configs, what="the config published")
    fleet.link.published[0][2].set_exception(PublishRefused("config", 135, "Not authorized"))
    await eventually(
        lambda: "Not authorized" in (fleet.reason("gw-01", version) or ""),
        what="the reason recorded",
    )
    await asyncio.sleep(0.1)
    assert len(fleet.link.configs()) == 1, "not again at once"
    await eventually(lambda: len(fleet.link.configs()) == 2, what="tried again")
    fleet.link.published[1][2].set_result(0)
    await eventually(lambda: fleet.state("gw-01", version) == "sent", what="marked sent")
    assert fleet.reason("gw-01", version) is None


async def test_rollout_timeouts_only_count_while_the_fleet_can_hear_answers(
    fleet: Fleet,
) -> None:
    rollouts = Rollouts(fleet.store, fleet.registry, fleet.library)
    rollout_id = rollouts.start(f"site:{SITE}", "1,100%", "0%", None, 1, "tester")
    rollouts.tick(time.time_ns())  # the canary's version, staged
    # As if the service had been down for a minute since: its acknowledgement waits in the
    # broker's session, to be delivered once the service is back.
    with fleet.store.transaction():
        fleet.store.conn.execute(
            "UPDATE rollouts SET stage_started_ns = ? WHERE id = ?",
            (time.time_ns() - 60 * 10**9, rollout_id),
        )
    await asyncio.sleep(0.3)  # the service runs, the broker is not there yet
    (canary,) = [m for m in rollouts.gateways(rollout_id) if m["stage"] == 0]
    assert canary["status"] == "pushed", canary
    assert rollouts.get(rollout_id)["state"] == "running"
    fleet.link.online()
    await asyncio.sleep(0.3)  # connected: the second of ack timeout starts now
    assert rollouts.get(rollout_id)["state"] == "running"
    await eventually(
        lambda: rollouts.get(rollout_id)["state"] == "halted", what="timed out at last"
    )
    (canary,) = [m for m in rollouts.gateways(rollout_id) if m["stage"] == 0]
    assert "no acknowledgement" in canary["reason"]
