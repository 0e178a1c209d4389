"""The asyncio MQTT link against a real Mosquitto: reason codes, manual acks, outages."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from simulator.broker import MosquittoBroker
from wire.mqtt import MqttLink, MqttSettings, NotConnected


def settings(broker: MosquittoBroker, host: str = "::1") -> MqttSettings:
    return MqttSettings(
        host=host, port=broker.port, keepalive_s=5, reconnect_min_s=1, reconnect_max_s=2
    )


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def test_puback_reason_no_subscribers_is_a_success(broker: MosquittoBroker) -> None:
    async with MqttLink(settings(broker, "127.0.0.1"), unique("pub")) as link:
        await link.wait_connected(5)
        code = await asyncio.wait_for(link.publish(f"test/{unique('t')}", b"x", qos=1), 5)
        assert code == 16  # "no matching subscribers"


async def test_messages_arrive_and_unacked_ones_come_back(broker: MosquittoBroker) -> None:
    topic = f"test/{unique('acks')}"
    client_id = unique("consumer")
    consumer = MqttLink(settings(broker), client_id, manual_ack=True)
    await consumer.subscribe(topic)
    await consumer.start()
    await consumer.wait_connected(5)
    async with MqttLink(settings(broker), unique("producer")) as producer:
        await producer.wait_connected(5)
        await asyncio.sleep(0.2)  # let the subscription settle
        for i in range(3):
            assert await asyncio.wait_for(producer.publish(topic, str(i).encode()), 5) == 0
        got = [await asyncio.wait_for(consumer._messages.get(), 5) for _ in range(3)]
        assert [m.payload for m in got] == [b"0", b"1", b"2"]
        consumer.ack(got[0])  # only the first is acknowledged
        await asyncio.sleep(0.2)
        await consumer.stop()

        again = MqttLink(settings(broker), client_id, manual_ack=True)
        await again.subscribe(topic)
        await again.start()
        redelivered = [await asyncio.wait_for(again._messages.get(), 5) for _ in range(2)]
        assert sorted(m.payload for m in redelivered) == [b"1", b"2"]
        for message in redelivered:
            again.ack(message)
        await again.stop()


async def test_publish_while_the_broker_is_down_fails_fast_then_recovers(
    own_broker: MosquittoBroker,
) -> None:
    async with MqttLink(settings(own_broker), unique("outage")) as link:
        await link.wait_connected(5)
        own_broker.stop()
        await asyncio.sleep(0.5)
        assert not link.connected
        with pytest.raises(NotConnected):
            await link.publish("test/x", b"x")
        own_broker.start()
        await link.wait_connected(10)
        assert await asyncio.wait_for(link.publish("test/x", b"x"), 5) == 16
        assert link.connects == 2
