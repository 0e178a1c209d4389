"""Buffer → forwarder → broker → fleet ingest, in one process over a real Mosquitto."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

from agent.buffer import Buffer, Stamp
from agent.events import EventQueue
from agent.forwarder import Forwarder, encode_batch
from fleet.config import FleetConfig
from fleet.service import FleetService
from simulator.broker import MosquittoBroker
from wire.mqtt import MqttLink, MqttSettings
from wire.topics import Channel, topic


async def wait_until(predicate, timeout: float = 10) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_every_reading_once_and_repeats_counted(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    site = f"s-{uuid.uuid4().hex[:6]}"
    mqtt = MqttSettings(host="::1", port=broker.port)
    fleet = FleetService(
        FleetConfig(name=site, mqtt=mqtt, database=tmp_path / "fleet.db", sites=[site])
    )
    stop = asyncio.Event()
    fleet_task = asyncio.create_task(fleet.run(stop))
    await wait_until(lambda: fleet.link._started)
    await fleet.link.wait_subscribed(10)

    buffer = Buffer(tmp_path / "buffer.db")
    buffer.open()
    for i in range(5000):
        buffer.add(Stamp(1_700_000_000_000_000_000 + i, i, 0), f"room-{i % 7}", "co2", 400 + i)
    buffer.commit()
    telemetry = topic(site, "gw-1", Channel.TELEMETRY)
    async with MqttLink(mqtt, f"agent-{site}") as link:
        forwarder = Forwarder(
            buffer, link, telemetry, EventQueue(buffer, time.time_ns), batch_max=300, window=4
        )
        forward_task = asyncio.create_task(forwarder.run())
        await wait_until(lambda: fleet.ingest.counters.readings == 5000)
        await wait_until(lambda: buffer.stats().depth == 0)  # PUBACKs reach the agent
        assert forwarder.stats.batches_sent == 17

        # The same batch again (a PUBACK lost on the way back): stored once, counted as repeat.
        repeat = encode_batch([(10, 1, "room-3", "co2", 410, 0)], 1)
        await link.publish(telemetry, repeat)
        await wait_until(lambda: fleet.ingest.counters.duplicates == 1)
        # A malformed payload is rejected, recorded and does not stop ingest.
        await link.publish(telemetry, b'{"v":1,"first_seq":"x"}')
        await wait_until(lambda: sum(fleet.ingest.counters.rejected.values()) == 1)
        forward_task.cancel()

    stop.set()
    await fleet_task
    from fleet.store import Store

    store = Store(tmp_path / "fleet.db")
    gateway = store.gateways()[0]
    assert (gateway["received"], gateway["duplicates"], gateway["last_seq"]) == (5000, 1, 5000)
    assert store.conn.execute("SELECT count(*), min(seq), max(seq) FROM readings").fetchone() == (
        5000,
        1,
        5000,
    )
    assert store.rejected_count() == 1
    store.close()
    buffer.close()
