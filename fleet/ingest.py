"""Turns MQTT messages from gateways into store rows: validate, dedupe, store.

Rules: a message is acknowledged to the broker only after the transaction holding it committed
(see `service.py`), so a crash of the fleet cannot lose what the broker already let go of. A bad
message is recorded in `rejected` with the reason, logged once per topic, and acknowledged: it would
be just as bad the next time, and must not block the messages behind it.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from fleet.alerts import AlertEngine
from fleet.store import Store
from wire.control import Ack, CommandResult
from wire.errors import WireError
from wire.models import Event, GatewayState, Reading, TelemetryBatch, decode
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
    def __init__(self, store: Store, alerts: AlertEngine | None = None) -> None:
        self.store = store
        self.alerts = alerts if alerts is not None else AlertEngine(store, [])
        self.counters = IngestCounters()
        self._logged_bad_topics: set[str] = set()
        # Control-plane answers go to the service's control plane (fleet/control.py).
        self.on_ack: Callable[[str, str, Ack], None] | None = None
        self.on_result: Callable[[str, str, CommandResult], None] | None = None
        # The InfluxDB sink (fleet/influx/sink.py): readings before they are stored (so that it
        # can tell repeats), and states (devices' kinds and profiles may change).
        self.on_telemetry: Callable[[str, str, Sequence[Reading]], None] | None = None
        self.on_state: Callable[[str, str], None] | None = None

    def handle(self, message: Message) -> None:
        """Stores one message; call inside `store.transaction()`."""
        self.counters.messages += 1
        try:
            site, gateway, channel = parse_topic(message.topic)
            if channel is Channel.TELEMETRY:
                batch = decode(TelemetryBatch, message.topic, message.payload)
                if self.on_telemetry is not None:
                    self.on_telemetry(site, gateway, batch.readings)
                result = self.store.ingest_batch(site, gateway, batch.readings)
                self.counters.readings += result.new
                self.counters.duplicates += result.duplicates
                self.alerts.on_readings(site, gateway, batch.readings)
            elif channel is Channel.STATE:
                if not message.payload:
                    return  # a retained state being cleared
                state = decode(GatewayState, message.topic, message.payload)
                self.store.record_state(site, gateway, state, retained=message.retain)
                self.alerts.on_state(site, gateway, state)
                if self.on_state is not None:
                    self.on_state(site, gateway)
            elif channel is Channel.EVENTS:
                event = decode(Event, message.topic, message.payload)
                self.store.record_event(site, gateway, event)
                self.alerts.on_event(site, gateway, event)
            elif channel is Channel.ACK:
                ack = decode(Ack, message.topic, message.payload)
                if self.on_ack is not None:
                    self.on_ack(site, gateway, ack)
            elif channel is Channel.CMD_RESULT:
                answer = decode(CommandResult, message.topic, message.payload)
                if self.on_result is not None:
                    self.on_result(site, gateway, answer)
        except WireError as exc:
            self.reject(message.topic, str(exc))

    def reject(self, topic: str, reason: str) -> None:
        self.counters.rejected[topic] += 1
        self.store.record_rejected(topic, reason)
        if topic not in self._logged_bad_topics:
            self._logged_bad_topics.add(topic)
            log.warning("rejected: %s (further rejections on this topic are only counted)", reason)
