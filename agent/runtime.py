"""The agent process: wires the coordinator, buffer, forwarder and MQTT link, and runs them.

Everything runs in one TaskGroup. A planned stop commits the buffer, publishes a retained
'offline' state and disconnects; a crash leaves the broker to publish the Last Will.
"""

from __future__ import annotations

import asyncio
import logging
import time

from agent import __version__
from agent.buffer import Buffer
from agent.config import AgentConfig
from agent.coordinator import Coordinator
from agent.events import EventQueue
from agent.forwarder import Forwarder
from drivers.profiles import ProfileLibrary
from drivers.registry import DriverFactory
from wire.models import BufferState, DeviceState, GatewayState, Status, encode
from wire.mqtt import MqttError, MqttLink, Will
from wire.topics import Channel, topic

log = logging.getLogger(__name__)


class Agent:
    def __init__(self, config: AgentConfig, profiles: ProfileLibrary) -> None:
        self.config = config
        self.profiles = profiles
        self.started_ns = time.time_ns()
        self.buffer = Buffer(config.buffer.path)
        self.events = EventQueue()
        self.coordinator = Coordinator(self.buffer, self.events)
        self.drivers = DriverFactory()
        self._topics = {ch: topic(config.site, config.gateway, ch) for ch in Channel}
        offline = GatewayState(status=Status.OFFLINE, reason="connection lost")
        self.link = MqttLink(
            config.mqtt,
            client_id=f"agent-{config.site}-{config.gateway}",
            will=Will(self._topics[Channel.STATE], encode(offline)),
            max_inflight=max(config.forwarder.window + 4, 20),
        )
        self.forwarder = Forwarder(
            self.buffer,
            self.link,
            self._topics[Channel.TELEMETRY],
            self.events,
            batch_max=config.forwarder.batch_max_readings,
            window=config.forwarder.window,
            ack_timeout_s=config.forwarder.ack_timeout_s,
        )

    def state(self, status: Status = Status.ONLINE, reason: str | None = None) -> GatewayState:
        stats = self.buffer.stats()
        devices = [
            DeviceState(
                id=device.id,
                profile=device.profile,
                kind=self.profiles.get(device.profile).kind.value,
                up=self.coordinator.health[device.id].up,
            )
            for device in self.config.devices
        ]
        return GatewayState(
            status=status,
            reason=reason,
            ts_ns=time.time_ns(),
            agent_version=__version__,
            started_ns=self.started_ns,
            keepalive_s=self.config.mqtt.keepalive_s,
            buffer=BufferState(
                depth=stats.depth, bytes=stats.bytes, evicted=stats.evicted, last_seq=stats.last_seq
            ),
            devices=devices,
        )

    async def run(self, stop: asyncio.Event) -> None:
        self.buffer.open()
        log.info(
            "agent %s/%s starting: %d devices, buffer %s (last seq %d)",
            self.config.site,
            self.config.gateway,
            len(self.config.devices),
            self.config.buffer.path,
            self.buffer.last_seq,
        )
        await self.link.start()
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(self._committer(), name="committer"),
                    group.create_task(self.forwarder.run(), name="forwarder"),
                    group.create_task(self._state_publisher(), name="state"),
                    group.create_task(self._event_sender(), name="events"),
                ]
                for device in self.config.devices:
                    driver = self.drivers.build(
                        self.profiles.get(device.profile), device.connection
                    )
                    loop = self.coordinator.add(device, driver)
                    tasks.append(group.create_task(loop.run(), name=f"poll:{device.id}"))
                await stop.wait()
                for task in tasks:
                    task.cancel()
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        self.buffer.commit()
        payload = encode(self.state(Status.OFFLINE, reason="agent stopped"))
        await self.link.stop(final_publish=(self._topics[Channel.STATE], payload))
        await self.drivers.close()
        depth = self.buffer.stats().depth
        self.buffer.close()
        log.info("agent stopped; %d readings still buffered", depth)

    async def _committer(self) -> None:
        interval = self.config.buffer.commit_interval_s
        limit = self.config.buffer.commit_max_readings
        while True:
            deadline = asyncio.get_running_loop().time() + interval
            while self.buffer.pending < limit:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                await asyncio.sleep(min(remaining, 0.05))
            if self.buffer.commit():
                self.forwarder.wake()

    async def _state_publisher(self) -> None:
        connects_seen = 0
        availability_seen: list[bool | None] = []
        loop = asyncio.get_running_loop()
        last = 0.0
        while True:
            await self.link.wait_connected()
            availability = [h.up for h in self.coordinator.health.values()]
            due = loop.time() - last >= self.config.state_interval_s
            if self.link.connects != connects_seen or availability != availability_seen or due:
                connects_seen = self.link.connects
                availability_seen = availability
                last = loop.time()
                try:
                    await asyncio.wait_for(
                        self.link.publish(
                            self._topics[Channel.STATE], encode(self.state()), qos=1, retain=True
                        ),
                        10,
                    )
                except (MqttError, TimeoutError) as exc:
                    log.info("state not published: %s", exc)
            await asyncio.sleep(0.5)

    async def _event_sender(self) -> None:
        while True:
            event = self.events.peek()
            if event is None or not self.link.connected:
                await asyncio.sleep(0.2)
                continue
            try:
                await asyncio.wait_for(
                    self.link.publish(self._topics[Channel.EVENTS], encode(event), qos=1), 10
                )
            except (MqttError, TimeoutError) as exc:
                log.info("event not published yet: %s", exc)
                await asyncio.sleep(1)
                continue
            self.events.pop()
