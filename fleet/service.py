"""`campus-fleet serve`: subscribes to every gateway's telemetry, state and events and stores them.

Messages are taken in groups (whatever has arrived, up to `MAX_GROUP`), stored in one
transaction, and acknowledged after the commit: fast under load, safe under a crash.
"""

from __future__ import annotations

import asyncio
import logging

from fleet.alerts import AlertEngine, publish_alerts, run_ticks
from fleet.config import FleetConfig
from fleet.control import ControlPlane
from fleet.influx.sink import InfluxSink
from fleet.ingest import Ingest
from fleet.store import Store
from wire.control import Ack
from wire.mqtt import Message, MqttLink
from wire.topics import Channel, subscription

log = logging.getLogger(__name__)

MAX_GROUP = 200


class IngestStopped(RuntimeError):
    """Storing failed (disk full, database damaged): the service must stop, not limp on."""


CHANNELS = (Channel.TELEMETRY, Channel.STATE, Channel.EVENTS, Channel.ACK, Channel.CMD_RESULT)


def subscriptions(config: FleetConfig) -> list[str]:
    sites = config.sites or ["+"]
    return [subscription(channel, site=site) for site in sites for channel in CHANNELS]


class FleetService:
    def __init__(self, config: FleetConfig) -> None:
        self.config = config
        self.store = Store(config.database)
        self.alerts = AlertEngine(self.store, config.alerts)
        self.ingest = Ingest(self.store, self.alerts)
        self.link = MqttLink(
            config.mqtt, client_id=f"fleet-{config.name}", manual_ack=True, max_inflight=200
        )
        self.control = ControlPlane(config, self.store, self.link)
        self.ingest.on_ack = self._on_ack
        self.ingest.on_result = self.control.on_result
        self.influx = InfluxSink(self.store, config.influx) if config.influx else None
        if self.influx is not None:
            self.ingest.on_telemetry = self.influx.on_telemetry
            self.ingest.on_state = self.influx.on_state

    def _on_ack(self, site: str, gateway: str, ack: Ack) -> None:
        self.control.on_ack(site, gateway, ack)
        self.alerts.on_ack(site, gateway, ack)

    async def run(self, stop: asyncio.Event) -> None:
        await self.link.subscribe(*subscriptions(self.config))
        await self.link.start()
        log.info(
            "fleet %s storing into %s, broker %s:%d",
            self.config.name,
            self.config.database,
            self.config.mqtt.host,
            self.config.mqtt.port,
        )
        consumer = asyncio.create_task(self._consume(), name="ingest")
        control = asyncio.create_task(self.control.run(), name="control")
        alerts = asyncio.create_task(run_ticks(self.alerts, self.link), name="alerts")
        workers = [consumer, control, alerts]
        if self.influx is not None:
            workers.append(asyncio.create_task(self.influx.run(), name="influx"))
        stopper = asyncio.create_task(stop.wait(), name="stop")
        try:
            await asyncio.wait({*workers, stopper}, return_when=asyncio.FIRST_COMPLETED)
            for task in workers:
                if task.done():
                    # Unacknowledged messages stay with the broker; the service manager
                    # restarts us.
                    log.critical("%s stopped: %r", task.get_name(), task.exception())
                    raise IngestStopped(str(task.exception())) from task.exception()
        finally:
            stopper.cancel()
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, stopper, return_exceptions=True)
            await self.link.stop()
            self.store.close()

    async def _consume(self) -> None:
        async for first in self.link.messages():
            group = [first]
            while len(group) < MAX_GROUP and (more := self.link.get_nowait()) is not None:
                group.append(more)
            self._store_group(group)
            for message in group:
                self.link.ack(message)

    def _store_group(self, group: list[Message]) -> None:
        with self.store.transaction():
            for message in group:
                self.ingest.handle(message)
        publish_alerts(self.link, self.alerts.take())  # only what the commit kept
