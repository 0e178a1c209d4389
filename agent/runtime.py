"""The agent process: wires the clock, coordinator, buffer, forwarder and MQTT link, and runs them.

Everything runs in one TaskGroup. A planned stop commits the buffer, publishes a retained
'offline' state and disconnects; a crash leaves the broker to publish the Last Will.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from agent import __version__
from agent.buffer import Buffer
from agent.clock import Clock, FileClock, SystemClock, boot_id
from agent.config import AgentConfig
from agent.coordinator import Coordinator
from agent.events import EventQueue
from agent.forwarder import Forwarder
from drivers.profiles import ProfileLibrary
from drivers.registry import DriverFactory
from wire.models import (
    BufferState,
    DeviceState,
    EventKind,
    GatewayState,
    Quality,
    Status,
    encode,
)
from wire.mqtt import MqttError, MqttLink, PublishRefused, Will
from wire.topics import Channel, topic

log = logging.getLogger(__name__)

CLOCK_STEP_EVENT_S = 2.0


def make_clock(config: AgentConfig) -> Clock:
    settings = config.clock
    if settings.sync_check == "file" and settings.file is not None:
        return FileClock(settings.file)
    return SystemClock(check_sync=settings.sync_check == "adjtimex")


class Agent:
    def __init__(self, config: AgentConfig, profiles: ProfileLibrary, clock: Clock | None = None):
        self.config = config
        self.profiles = profiles
        self.clock = clock or make_clock(config)
        self.started_ns = self.clock.wall_ns()
        self.started_mono_ns = self.clock.mono_ns()
        self.buffer = Buffer(
            config.buffer.path,
            max_bytes=int(config.buffer.max_mb * 1_000_000),
            boot_id=boot_id(),
            wall_ns=self.clock.wall_ns,
        )
        self.events = EventQueue(self.buffer, self.clock.wall_ns)
        self.coordinator = Coordinator(self.buffer, self.events, self.clock)
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
            may_send=self.may_send,
        )
        self._events_wake = asyncio.Event()
        self._pending = asyncio.Event()
        self.buffer.on_pending = self._pending.set
        self._clock_ready = False  # synced, and buffered readings corrected

    def may_send(self) -> bool:
        """Readings wait for a synced clock (to be corrected first), but not for ever."""
        if self._clock_ready:
            return True
        held_s = (self.clock.mono_ns() - self.started_mono_ns) / 1e9
        return held_s >= self.config.clock.hold_unsynced_s

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
            ts_ns=self.clock.wall_ns(),
            agent_version=__version__,
            started_ns=self.started_ns,
            clock_synced=self.clock.synced(),
            keepalive_s=self.config.mqtt.keepalive_s,
            buffer=BufferState(
                depth=stats.depth,
                bytes=stats.bytes,
                evicted=stats.evicted,
                lost=stats.lost,
                events=stats.events,
                last_seq=stats.last_seq,
            ),
            devices=devices,
        )

    async def run(self, stop: asyncio.Event) -> None:
        self.buffer.open()
        log.info(
            "agent %s/%s starting: %d devices, buffer %s (last seq %d, %d readings waiting)",
            self.config.site,
            self.config.gateway,
            len(self.config.devices),
            self.config.buffer.path,
            self.buffer.last_seq,
            self.buffer.depth,
        )
        if not self.clock.synced():
            log.warning(
                "clock not synced: readings are marked, held up to %.0fs, corrected once synced",
                self.config.clock.hold_unsynced_s,
            )
        await self.link.start()
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(self._committer(), name="committer"),
                    group.create_task(self.forwarder.run(), name="forwarder"),
                    group.create_task(self._state_publisher(), name="state"),
                    group.create_task(self._event_sender(), name="events"),
                    group.create_task(self._clock_watch(), name="clock"),
                ]
                for device in self.config.devices:
                    profile = self.profiles.get(device.profile)
                    driver = self.drivers.build(profile, device.connection)
                    loop = self.coordinator.add(device, driver, profile, self.config.poll_jitter_s)
                    tasks.append(group.create_task(loop.run(), name=f"poll:{device.id}"))
                await stop.wait()
                for task in tasks:
                    task.cancel()
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        """Every step runs even when one before it fails; the first failure is raised last."""
        try:
            await self.forwarder.settle(timeout=5)
            self.buffer.commit()
        finally:
            try:
                payload = encode(self.state(Status.OFFLINE, reason="agent stopped"))
                await self.link.stop(final_publish=(self._topics[Channel.STATE], payload))
            finally:
                try:
                    await self.drivers.close()
                finally:
                    depth = self.buffer.depth
                    self.buffer.close()
                    log.info("agent stopped; %d readings still buffered", depth)

    async def _committer(self) -> None:
        """Commits when a poll round is over (no poll in progress), or `commit_interval_s` after
        the first reading waiting, or at once when `commit_max_readings` wait; sleeps while
        nothing waits. With polls aligned, that is one commit per round, right after it."""
        interval = self.config.buffer.commit_interval_s
        limit = self.config.buffer.commit_max_readings
        loop = asyncio.get_running_loop()
        quiet = self.coordinator.quiet
        while True:
            await self._pending.wait()
            self._pending.clear()
            deadline = loop.time() + interval
            while self.buffer.pending < limit and (remaining := deadline - loop.time()) > 0:
                if self.coordinator.polling == 0:
                    break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(remaining, 0.25)):
                        await quiet.wait()
            if self.buffer.commit():
                self.forwarder.wake()
            self._events_wake.set()

    async def _clock_watch(self) -> None:
        """Corrects unsynced readings when sync arrives (before the forwarder may send them);
        reports steps of a synced clock."""
        offset = self.clock.wall_ns() - self.clock.mono_ns()
        was_synced = False
        while True:
            synced = self.clock.synced()
            new_offset = self.clock.wall_ns() - self.clock.mono_ns()
            if synced and not was_synced:
                corrected = self.buffer.correct_unsynced(
                    new_offset, int(Quality.CLOCK_UNSYNCED), int(Quality.CLOCK_CORRECTED)
                )
                if corrected:
                    log.info("clock synced: %d buffered readings re-stamped", corrected)
                self._clock_ready = True
                self.forwarder.wake()
            elif synced and abs(new_offset - offset) > CLOCK_STEP_EVENT_S * 1e9:
                step_s = (new_offset - offset) / 1e9
                log.warning("clock stepped by %+.1f s", step_s)
                self.events.raise_event(
                    EventKind.CLOCK_STEP,
                    f"clock stepped by {step_s:+.1f} s",
                    step_s=round(step_s, 3),
                )
            was_synced, offset = synced, new_offset
            await asyncio.sleep(1.0)

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
            await self.link.wait_connected()
            event = self.buffer.take_event()
            if event is None:
                self._events_wake.clear()
                await self._events_wake.wait()
                continue
            event_id, payload = event
            future = self.link.publish(self._topics[Channel.EVENTS], payload.encode(), qos=1)
            try:
                await self.link.acknowledged(future, self.config.forwarder.ack_timeout_s)
            except PublishRefused as exc:  # would be refused again: keep the others moving
                log.error("event dropped, the broker refuses it (%s): %s", exc.reason, payload)
            except (MqttError, TimeoutError) as exc:
                log.info("event not published yet: %s", exc)
                await asyncio.sleep(1)
                continue
            self.buffer.delete_event(event_id)
