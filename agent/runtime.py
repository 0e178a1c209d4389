"""The agent process: wires the clock, coordinator, buffer, forwarder, control plane (configs,
commands, schedules) and MQTT link, and runs them.

Everything runs in one TaskGroup, poll loops included: devices come and go with the configs the
fleet pushes. A planned stop commits the buffer, publishes a retained 'offline' state and
disconnects; a crash leaves the broker to publish the Last Will.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from agent import __version__
from agent.buffer import Buffer
from agent.clock import Clock, FileClock, SystemClock, boot_id
from agent.commands import CommandExecutor
from agent.config import AgentConfig, DeviceConfig
from agent.control import (
    AppliedStore,
    ApplyError,
    ConfigControl,
    Outbox,
    load_trusted_keys,
)
from agent.coordinator import Coordinator
from agent.events import EventQueue
from agent.forwarder import Forwarder
from agent.schedules import Scheduler
from drivers.base import Driver
from drivers.profiles import AnyProfile, ProfileLibrary
from drivers.registry import DriverFactory
from wire.control import CommandRequest
from wire.errors import InvalidMessage
from wire.gateway_config import ManagedConfig, device_kind
from wire.models import (
    DEVICE_REASON_MAX,
    BufferState,
    DeviceState,
    EventKind,
    GatewayState,
    Quality,
    Status,
    decode,
    encode,
)
from wire.mqtt import MqttError, MqttLink, PublishRefused, Will
from wire.topics import Channel, topic

if TYPE_CHECKING:
    from agent.policy.applier import PolicyControl
    from wire.policy_nft import GatewayContext

POLICY_DEVICE = "policy"  # agent.policy.applier.POLICY_DEVICE, without importing it

log = logging.getLogger(__name__)

CLOCK_STEP_EVENT_S = 2.0


def make_clock(config: AgentConfig) -> Clock:
    settings = config.clock
    if settings.sync_check == "file" and settings.file is not None:
        return FileClock(settings.file)
    return SystemClock(check_sync=settings.sync_check == "adjtimex")


class _Stop(Exception):
    """Raised in the TaskGroup's body to end every task in it, poll loops included."""


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        profiles: ProfileLibrary,
        clock: Clock | None = None,
        drivers: DriverFactory | None = None,
    ):
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
        self.drivers = drivers or DriverFactory(state_dir=config.buffer.path.parent)
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
        self.control = ConfigControl(
            site=config.site,
            gateway=config.gateway,
            keys=load_trusted_keys(config.fleet.public_keys),
            library=profiles,
            store=AppliedStore(config.fleet.applied_path),
            clock=self.clock,
            events=self.events,
            topic=self._topics[Channel.CONFIG],
        )
        self._policy: PolicyControl | None = None
        self.outbox = Outbox(self.link, config.forwarder.ack_timeout_s)
        self.executor = CommandExecutor(
            self.coordinator, self.clock, self.events, config.command_timeout_s
        )
        self.scheduler = Scheduler(
            self.executor,
            lambda: self.coordinator.devices,
            profiles,
            self.clock,
            self.events,
            memory_path=config.fleet.applied_path.with_name(
                config.fleet.applied_path.name + ".schedules"
            ),
        )
        #: The managed part in effect: the agent file's, or the fleet's applied config.
        self.managed = config.local_managed()
        self._state_wake = asyncio.Event()

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
                id=device_id,
                profile=loop.device.profile,
                kind=device_kind(loop.device, self.profiles).value,
                up=loop.health.up,
                reason=(loop.health.last_error or "no answer")[:DEVICE_REASON_MAX]
                if loop.health.up is False
                else None,
                # known once the device answers and every watched point was read since start
                alarms=sorted(point for point, watch in loop.alarms.items() if watch.active)
                if loop.health.up is True and all(w.seen for w in loop.alarms.values())
                else None,
            )
            for device_id, loop in self.coordinator.loops.items()
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
            config_version=self.control.applied_version,
            policy_version=self.policy.applied_version if self.config.policy.enabled else None,
            policy=self.policy.state() if self.config.policy.enabled else None,
        )

    @property
    def policy(self) -> PolicyControl:
        """The network policy's control, loaded when it is first needed: at start when
        enforcement is enabled, else when a policy document or command arrives (to answer it),
        so that a gateway that does not enforce policies does not load the policy code."""
        if self._policy is None:
            from agent.policy.applier import PolicyControl

            self._policy = PolicyControl(
                site=self.config.site,
                gateway=self.config.gateway,
                keys=self.control.keys,
                settings=self.config.policy,
                clock=self.clock,
                events=self.events,
                topic=self._topics[Channel.POLICY],
                context=self._policy_context,
            )
        return self._policy

    async def _policy_context(self) -> GatewayContext:
        from agent.policy.applier import gateway_context

        return await gateway_context(self.config.policy, self.config.mqtt)

    async def _confirm_uplink(self, timeout_s: float) -> None:
        """Commit-confirm of a network policy: the broker is still reachable from here."""
        state_topic = self._topics[Channel.STATE]
        from agent.policy.applier import confirm_uplink

        await confirm_uplink(
            self.link,
            self.config.mqtt.host,
            self.config.mqtt.port,
            lambda: (state_topic, encode(self.state())),
            timeout_s,
        )

    def _build(self, device: DeviceConfig) -> tuple[Driver, AnyProfile]:
        profile = self.profiles.get(device.profile)
        return self.drivers.build(profile, device.connection), profile

    async def apply_managed(
        self,
        managed: ManagedConfig,
        persist: Callable[[], Awaitable[None]] | None = None,
    ) -> str:
        """Puts a checked config into effect, all or nothing: new and changed devices start
        polling, then `persist()` runs, then the loops they replace stop and the schedules are
        swapped. ApplyError once everything is as it was."""
        jitter_s = managed.poll_jitter_s
        if jitter_s is None:
            jitter_s = self.config.poll_jitter_s
        try:
            transition = await self.coordinator.begin(managed.devices, self._build, jitter_s)
        except Exception as exc:
            raise ApplyError(_describe(exc)) from exc
        if persist is not None:
            try:
                await persist()
            except Exception as exc:
                await transition.rollback()
                raise ApplyError(
                    f"cannot save it at {self.config.fleet.applied_path}: {_describe(exc)}"
                ) from exc
        await transition.commit()
        self.scheduler.replace(managed.schedules, managed.timezone)
        self.managed = managed
        self._state_wake.set()
        changes = [
            f"{label} {', '.join(ids)}"
            for label, ids in (
                ("added", transition.added),
                ("changed", transition.changed),
                ("removed", transition.removed),
            )
            if ids
        ]
        return (
            f"{len(managed.devices)} devices ({'; '.join(changes) or 'none changed'}), "
            f"{len(managed.schedules)} schedules"
        )

    async def _start_devices(self) -> None:
        """The applied fleet config, or the agent file's when that one cannot be started."""
        managed = self.control.startup(self.config.local_managed())
        try:
            await self.apply_managed(managed)
        except ApplyError as exc:
            if self.control.applied is None:
                raise
            self.control.set_aside(f"its devices cannot be started: {exc}")
            await self.apply_managed(self.config.local_managed())

    async def run(self, stop: asyncio.Event) -> None:
        self.buffer.open()
        log.info(
            "agent %s/%s starting: buffer %s (last seq %d, %d readings waiting)",
            self.config.site,
            self.config.gateway,
            self.config.buffer.path,
            self.buffer.last_seq,
            self.buffer.depth,
        )
        if not self.clock.synced():
            log.warning(
                "clock not synced: readings are marked, held up to %.0fs, corrected once synced",
                self.config.clock.hold_unsynced_s,
            )
        if not self.control.keys:
            log.warning("no fleet.public_keys: every config the fleet pushes will be refused")
        if self.config.policy.enabled:
            await self.policy.startup()  # before connecting: the saved policy was confirmed
        await self.link.subscribe(
            self._topics[Channel.CONFIG],
            self._topics[Channel.POLICY],
            self._topics[Channel.CMD],
            qos=1,
        )
        await self.link.start()
        failed: ApplyError | None = None
        try:
            async with asyncio.TaskGroup() as group:
                self.coordinator.bind(group)
                try:
                    await self._start_devices()
                except ApplyError as exc:
                    failed = exc
                    raise _Stop from None
                log.info(
                    "polling %d devices, %d schedules, config version %d",
                    len(self.coordinator.loops),
                    len(self.managed.schedules),
                    self.control.applied_version,
                )
                group.create_task(self._committer(), name="committer")
                group.create_task(self.forwarder.run(), name="forwarder")
                group.create_task(self._state_publisher(), name="state")
                group.create_task(self._event_sender(), name="events")
                group.create_task(self._clock_watch(), name="clock")
                group.create_task(self._control_listener(group), name="control")
                group.create_task(self.outbox.run(), name="outbox")
                group.create_task(self.scheduler.run(), name="schedules")
                await stop.wait()
                raise _Stop
        except* _Stop:
            pass
        finally:
            self.coordinator.bind(None)
            await self._shutdown()
        if failed is not None:
            raise failed

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

    async def _control_listener(self, group: asyncio.TaskGroup) -> None:
        """Configs are handled one at a time, in order; each command runs in its own task (the
        bus locks order the ones that share a bus)."""
        config_topic = self._topics[Channel.CONFIG]
        policy_topic = self._topics[Channel.POLICY]
        command_topic = self._topics[Channel.CMD]
        async for message in self.link.messages():
            if message.topic == config_topic:
                try:
                    ack = await self.control.handle(message.payload, self.apply_managed)
                except Exception:  # a bug here must not turn a retained config into a crash loop
                    log.exception("config message could not be handled")
                    continue
                if ack is not None:
                    self.outbox.put(
                        self._topics[Channel.ACK], encode(ack), key=f"{ack.kind}:{ack.version}"
                    )
                    self._state_wake.set()
            elif message.topic == policy_topic:
                try:
                    ack = await self.policy.handle(message.payload, self._confirm_uplink)
                except Exception:  # like configs: a bug must not become a crash loop
                    log.exception("policy message could not be handled")
                    continue
                if ack is not None:
                    self.outbox.put(
                        self._topics[Channel.ACK], encode(ack), key=f"{ack.kind}:{ack.version}"
                    )
                    self._state_wake.set()
            elif message.topic == command_topic:
                group.create_task(self._command(message.payload), name="command")
            else:
                log.debug("message on %s ignored", message.topic)

    async def _command(self, payload: bytes) -> None:
        request = _policy_request(self._topics[Channel.CMD], payload)
        if request is not None:
            answer = await self.policy.command(request)
            self.outbox.put(self._topics[Channel.CMD_RESULT], encode(answer))
            return
        result = await self.executor.handle(self._topics[Channel.CMD], payload)
        if result is not None:
            self.outbox.put(self._topics[Channel.CMD_RESULT], encode(result))

    async def _state_publisher(self) -> None:
        connects_seen = 0
        availability_seen: list[bool | None] = []
        loop = asyncio.get_running_loop()
        last = 0.0
        while True:
            await self.link.wait_connected()
            availability = [h.up for h in self.coordinator.health.values()]
            due = loop.time() - last >= self.config.state_interval_s
            changed = self._state_wake.is_set()
            if (
                self.link.connects != connects_seen
                or availability != availability_seen
                or due
                or changed
            ):
                self._state_wake.clear()
                connects_seen = self.link.connects
                availability_seen = availability
                last = loop.time()
                if due and self.config.policy.enabled:
                    await self.policy.refresh_counters()
                try:
                    await asyncio.wait_for(
                        self.link.publish(
                            self._topics[Channel.STATE], encode(self.state()), qos=1, retain=True
                        ),
                        10,
                    )
                except (MqttError, TimeoutError) as exc:
                    log.info("state not published: %s", exc)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await self._state_wake.wait()

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


def _policy_request(topic: str, payload: bytes) -> CommandRequest | None:
    """A command for the `policy` pseudo-device; anything else (invalid ones too) goes to the
    executor."""
    try:
        request = decode(CommandRequest, topic, payload)
    except InvalidMessage:
        return None
    return request if request.device == POLICY_DEVICE else None


def _describe(error: BaseException) -> str:
    if isinstance(error, KeyError) and error.args:
        return str(error.args[0])
    return str(error) or type(error).__name__
