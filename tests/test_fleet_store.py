"""The fleet's store: older databases gain new columns; a failing store stops the service."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from fleet.config import FleetConfig
from fleet.service import FleetService, IngestStopped
from fleet.store import Store
from simulator.broker import MosquittoBroker
from wire.mqtt import MqttLink, MqttSettings


def test_an_older_database_gains_the_new_columns(tmp_path: Path) -> None:
    path = tmp_path / "fleet.db"
    Store(path).close()
    with sqlite3.connect(path) as db:
        db.execute("ALTER TABLE gateways DROP COLUMN lost")  # as version 0.1.0 created it
        db.execute("INSERT INTO gateways (site, gateway) VALUES ('s', 'g')")
    store = Store(path)
    assert store.stats()[0]["lost"] == 0
    with store.transaction():
        store.ingest_batch("s", "g", [(1, 1, "room-1", "co2", 500, 0)])
    assert store.stats()[0]["received"] == 1
    store.close()


async def test_a_failing_store_stops_the_service(tmp_path: Path, broker: MosquittoBroker) -> None:
    mqtt = MqttSettings(host="::1", port=broker.port)
    service = FleetService(
        FleetConfig(name="failing", mqtt=mqtt, database=tmp_path / "f.db", sites=["failing"])
    )

    def broken(*_: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    service.store.ingest_batch = broken  # type: ignore[method-assign,assignment]
    running = asyncio.create_task(service.run(asyncio.Event()))
    while not service.link._started:
        await asyncio.sleep(0.01)
    await service.link.wait_subscribed(10)
    async with MqttLink(mqtt, "failing-producer") as producer:
        await producer.wait_connected(5)
        payload = b'{"v":1,"first_seq":1,"last_seq":1,"sent_ns":1,"readings":[[1,1,"r","co2",1,0]]}'
        await producer.publish("campus/failing/gw/g/telemetry", payload)
        with pytest.raises(IngestStopped, match="disk is full"):
            await asyncio.wait_for(running, 10)


def test_an_event_sent_twice_is_stored_once(tmp_path: Path) -> None:
    from wire.models import Event, EventKind

    store = Store(tmp_path / "fleet.db")
    event = Event(ts_ns=5, kind=EventKind.BUFFER_EVICTION, message="evicted 10", data={"n": 10})
    alarm = Event(ts_ns=6, kind=EventKind.ALARM, device="room-1", message="co2 1600 above 1500")
    with store.transaction():
        for _ in range(2):
            store.record_event("s", "g", event)
            store.record_event("s", "g", alarm)
    assert [(e["kind"], e["device"]) for e in store.events(0, 10)] == [
        ("buffer_eviction", None),
        ("alarm", "room-1"),
    ]
    store.close()
