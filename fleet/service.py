"""`campus-fleet serve`: subscribes to every gateway's telemetry, state and events and stores them.

Messages are taken in groups (whatever has arrived, up to `MAX_GROUP`), stored in one
transaction, and acknowledged after the commit: fast under load, safe under a crash.
"""

from __future__ import annotations

import asyncio
import logging

from fleet.config import FleetConfig
from fleet.ingest import Ingest
from fleet.store import Store
from wire.mqtt import Message, MqttLink
from wire.topics import Channel, subscription

log = logging.getLogger(__name__)

MAX_GROUP = 200


class IngestStopped(RuntimeError):
    """Storing failed (disk full, database damaged): the service must stop, not limp on."""


CHANNELS = (Channel.TELEMETRY, Channel.STATE, Channel.EVENTS)


def subscriptions(config: FleetConfig) -> list[str]:
    sites = config.sites or ["+"]
    return [subscription(channel, site=site) for site in sites for channel in CHANNELS]


class FleetService:
    def __init__(self, config: FleetConfig) -> None:
        self.config = config
        self.store = Store(config.database)
        self.ingest = Ingest(self.store)
        self.link = MqttLink(config.mqtt, client_id=f"fleet-{config.name}", manual_ack=True)

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
        stopper = asyncio.create_task(stop.wait(), name="stop")
        try:
            await asyncio.wait({consumer, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if consumer.done():
                # Unacknowledged messages stay with the broker; the service manager restarts us.
                log.critical("ingest stopped: %r", consumer.exception())
                raise IngestStopped(str(consumer.exception())) from consumer.exception()
        finally:
            stopper.cancel()
            consumer.cancel()
            await asyncio.gather(consumer, stopper, return_exceptions=True)
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
