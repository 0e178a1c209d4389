"""The sink's ingest side: every new reading becomes a queued point, in the ingest transaction.

Rules: `on_telemetry` runs before the readings are stored, in the same transaction, so it can tell
new readings from repeats (a repeat was stored before: it is not queued again) and a rollback takes
the points with the readings. Encoding happens here, once; the queue holds line protocol.
"""

from __future__ import annotations

from collections.abc import Sequence

from fleet.influx.protocol import encode_readings
from fleet.influx.queue import InfluxQueue
from fleet.influx.schema import Schema
from fleet.influx.settings import InfluxSettings
from fleet.influx.writer import InfluxWriter
from fleet.store import Store
from wire.models import Reading

_STORED = (
    "SELECT seq FROM readings WHERE site = ? AND gateway = ? AND seq BETWEEN ? AND ? ORDER BY seq"
)


class InfluxSink:
    def __init__(self, store: Store, settings: InfluxSettings) -> None:
        self.store = store
        self.settings = settings
        self.schema = Schema(store.conn)
        self.queue = InfluxQueue(store, settings.queue_max_points)
        self.writer = InfluxWriter(self.queue, settings)
        self._integers_as_float = settings.integers == "float"

    def on_telemetry(self, site: str, gateway: str, readings: Sequence[Reading]) -> None:
        """Queues the readings not stored before; call inside the ingest transaction, before
        `Store.ingest_batch`."""
        if not readings:
            return
        stored = self.store.conn.execute(
            _STORED, (site, gateway, readings[0][0], readings[-1][0])
        ).fetchall()
        if stored:
            repeats = {row[0] for row in stored}
            readings = [reading for reading in readings if reading[0] not in repeats]
        known = self.schema.for_gateway(site, gateway)

        def series_of(device: str) -> str:
            key = known.get(device)
            if key is None:
                key = known[device] = self.schema.series_of(site, gateway, device)
            return key

        lines, skipped = encode_readings(readings, series_of, self._integers_as_float)
        if lines or skipped:
            self.writer.notify(self.queue.push(lines, skipped))

    def on_state(self, site: str, gateway: str) -> None:
        """The gateway reported its devices: their kind and profile may have changed."""
        self.schema.forget(site, gateway)

    async def run(self) -> None:
        await self.writer.run()
