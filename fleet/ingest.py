"""Turns MQTT messages from gateways into store rows: validate, dedupe, store.

Rules: a message is acknowledged to the broker only after the transaction holding it committed
(see `service.py`), so a crash of the fleet cannot lose what the broker already let go of. A bad
message is recorded in `rejected` with the reason, logged once per topic, and acknowledged: it would
be just as bad the next time, and must not block the messages behind it.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

from fleet.store import Store
from wire.errors import WireError
from wire.models import Event, GatewayState, TelemetryBatch, decode
from wire.mqtt import Message
from wire.topics import Channel, parse_topic

log = logging.getLogger(__name__)


@dataclass(slots=True)
class IngestCounters:
    messages: int = 0
    readings: int = 0
    duplicates: int = 0
    rejected: Counter[str] = field(default_factory=Counter)


class Ingest:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.counters = IngestCounters()
        self._logged_bad_topics: set[str] = set()

    def handle(self, message: Message) -> None:
        """Stores one message; call inside `store.transaction()`."""
        self.counters.messages += 1
        try:
            site, gateway, channel = parse_topic(message.topic)
            if channel is Channel.TELEMETRY:
                batch = decode(TelemetryBatch, message.topic, message.payload)
                result = self.store.ingest_batch(site, gateway, batch.readings)
                self.counters.readings += result.new
                self.counters.duplicates += result.duplicates
            elif channel is Channel.STATE:
                if not message.payload:
                    return  # a retained state being cleared
                state = decode(GatewayState, message.topic, message.payload)
                self.store.record_state(site, gateway, state, retained=message.retain)
            elif channel is Channel.EVENTS:
                self.store.record_event(
                    site, gateway, decode(Event, message.topic, message.payload)
                )
        except WireError as exc:
            self.reject(message.topic, str(exc))

    def reject(self, topic: str, reason: str) -> None:
        self.counters.rejected[topic] += 1
        self.store.record_rejected(topic, reason)
        if topic not in self._logged_bad_topics:
            self._logged_bad_topics.add(topic)
            log.warning("rejected: %s (further rejections on this topic are only counted)", reason)
