"""The benchmark's gateway swarm answers config documents the way the agent's applier does.

Each test uses its own site on the session broker, so retained documents never meet.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from benchmarks._gateway_swarm import Swarm, expand_gateways
from simulator.broker import MosquittoBroker
from wire.control import Ack, AckStatus, SignedDocument
from wire.models import decode, encode
from wire.signing import generate_key, load_private_key, raw_public, sign
from wire.topics import Channel, parse_topic, topic
from wire.verify import PublicKey

REPO = Path(__file__).resolve().parents[1]
BODY: dict[str, Any] = {"devices": [], "schedules": []}


def new_site() -> str:
    return f"swarm-{uuid.uuid4().hex[:10]}"


def document(
    key: Ed25519PrivateKey,
    site: str,
    gateway: str,
    version: int,
    body: dict[str, Any] | None = None,
) -> SignedDocument:
    return sign(
        key,
        kind="config",
        site=site,
        gateway=gateway,
        version=version,
        issued_ns=time.time_ns(),
        body=BODY if body is None else body,
    )


class Acks:
    """Every Ack published under one site, per gateway, in arrival order."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.queues: defaultdict[str, asyncio.Queue[Ack]] = defaultdict(asyncio.Queue)

    async def collect(self) -> None:
        async for message in self.client.messages:
            gateway = parse_topic(str(message.topic)).gateway
            payload = message.payload
            assert isinstance(payload, bytes)
            self.queues[gateway].put_nowait(decode(Ack, str(message.topic), payload))

    async def next(self, gateway: str, timeout: float = 5) -> Ack:
        return await asyncio.wait_for(self.queues[gateway].get(), timeout)

    def unread(self) -> dict[str, int]:
        return {gw: queue.qsize() for gw, queue in self.queues.items() if queue.qsize()}


@contextlib.asynccontextmanager
async def ack_collector(port: int, site: str) -> AsyncIterator[tuple[aiomqtt.Client, Acks]]:
    async with aiomqtt.Client(
        "127.0.0.1", port, identifier=f"test-{site}", protocol=aiomqtt.ProtocolVersion.V5
    ) as client:
        await client.subscribe(f"campus/{site}/gw/+/ack", qos=1)
        acks = Acks(client)
        reader = asyncio.create_task(acks.collect())
        try:
            yield client, acks
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


async def push(client: aiomqtt.Client, site: str, gateway: str, payload: bytes) -> None:
    await client.publish(topic(site, gateway, Channel.CONFIG), payload, qos=1, retain=True)


def test_gateway_ranges() -> None:
    assert expand_gateways("gw-08..gw-11") == ["gw-08", "gw-09", "gw-10", "gw-11"]
    assert expand_gateways("a,gw-0998..gw-1000") == ["a", "gw-0998", "gw-0999", "gw-1000"]
    with pytest.raises(ValueError, match="same prefix"):
        expand_gateways("gw-01..ap-03")
    with pytest.raises(ValueError, match="twice"):
        expand_gateways("gw-1,gw-1..gw-2")


async def test_swarm_applies_and_rejects_like_the_agent(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    public = PublicKey(raw_public(generate_key(tmp_path / "fleet.key")))
    key = load_private_key(tmp_path / "fleet.key")
    stranger = Ed25519PrivateKey.generate()
    site = new_site()
    gateways = expand_gateways("gw-00..gw-19")
    async with ack_collector(broker.port, site) as (client, acks):
        # Retained before the gateway connects: delivered when it subscribes.
        await push(client, site, "gw-19", encode(document(key, site, "gw-19", 1)))
        swarm = Swarm("127.0.0.1", broker.port, site, gateways, [public])
        running = asyncio.create_task(swarm.run())
        try:
            await asyncio.wait_for(swarm.ready.wait(), 10)
            early = await acks.next("gw-19")
            assert (early.status, early.version, early.applied_version) == (AckStatus.APPLIED, 1, 1)

            valid = document(key, site, "gw-00", 1)
            await push(client, site, "gw-00", encode(valid))
            ack = await acks.next("gw-00")
            assert ack.status is AckStatus.APPLIED
            assert (ack.kind, ack.version, ack.sha256, ack.applied_version) == (
                "config",
                1,
                valid.sha256,
                1,
            )
            assert ack.reason is None and ack.ts_ns > 0

            await push(client, site, "gw-00", encode(valid))  # the same again: applied again
            again = await acks.next("gw-00")
            assert (again.status, again.version, again.applied_version) == (
                AckStatus.APPLIED,
                1,
                1,
            )
            other_body = document(key, site, "gw-00", 1, {"devices": [], "timezone": "UTC"})
            await push(client, site, "gw-00", encode(other_body))
            clash = await acks.next("gw-00")
            assert clash.status is AckStatus.REJECTED
            assert "already applied with another body" in (clash.reason or "")
            assert clash.applied_version == 1

            signed = document(key, site, "gw-01", 1)
            tampered = signed.model_copy(update={"body": {"devices": [], "timezone": "X"}})
            await push(client, site, "gw-01", encode(tampered))
            ack = await acks.next("gw-01")
            assert (ack.status, ack.version, ack.applied_version) == (AckStatus.REJECTED, 1, 0)
            assert "tampered" in (ack.reason or "")

            await push(client, site, "gw-02", encode(document(key, site, "gw-03", 1)))
            ack = await acks.next("gw-02")
            assert ack.status is AckStatus.REJECTED
            assert ack.reason == f"for gateway {site}/gw-03, this gateway is {site}/gw-02"

            await push(client, site, "gw-04", encode(document(key, site, "gw-04", 5)))
            assert (await acks.next("gw-04")).applied_version == 5
            await push(client, site, "gw-04", encode(document(key, site, "gw-04", 3)))
            older = await acks.next("gw-04")
            assert (older.status, older.version, older.applied_version) == (
                AckStatus.REJECTED,
                3,
                5,
            )
            assert "older than the applied version 5" in (older.reason or "")

            await push(client, site, "gw-05", encode(document(stranger, site, "gw-05", 1)))
            ack = await acks.next("gw-05")
            assert ack.status is AckStatus.REJECTED
            assert "does not trust" in (ack.reason or "")

            await push(client, site, "gw-06", b'{"kind": "config", "version": 4}')
            ack = await acks.next("gw-06")
            assert (ack.status, ack.version, ack.sha256) == (AckStatus.REJECTED, 4, None)
            assert "not a valid signed document" in (ack.reason or "")

            bad_body = document(key, site, "gw-08", 1, {"devices": [], "colour": "red"})
            await push(client, site, "gw-08", encode(bad_body))
            ack = await acks.next("gw-08")
            assert (ack.status, ack.applied_version) == (AckStatus.REJECTED, 0)
            assert (ack.reason or "").startswith("invalid config: body.colour")

            await push(client, site, "gw-07", b"")  # a cleared retained message: no answer
            await push(client, site, "gw-07", encode(document(key, site, "gw-07", 2)))
            ack = await acks.next("gw-07")
            assert (ack.status, ack.version) == (AckStatus.APPLIED, 2)

            await asyncio.sleep(0.2)
            assert acks.unread() == {}
            stats = swarm.stats
            assert (stats.applied, stats.applied_again, stats.rejected) == (4, 1, 7)
            assert (stats.connects, stats.disconnects) == (20, 0)
        finally:
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running


async def test_swarm_command_line(broker: MosquittoBroker, tmp_path: Path) -> None:
    """`ready N` once subscribed; one JSON line of counters after SIGTERM."""
    generate_key(tmp_path / "fleet.key")
    key = load_private_key(tmp_path / "fleet.key")
    site = new_site()
    async with ack_collector(broker.port, site) as (client, acks):
        swarm = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "benchmarks._gateway_swarm",
            "--port",
            str(broker.port),
            "--site",
            site,
            "--gateways",
            "gw-0..gw-2",
            "--public-key",
            str(tmp_path / "fleet.key.pub"),
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.PIPE,
        )
        assert swarm.stdout is not None
        try:
            line = await asyncio.wait_for(swarm.stdout.readline(), 10)
            assert line.decode().strip() == "ready 3"
            await push(client, site, "gw-2", encode(document(key, site, "gw-2", 7)))
            ack = await acks.next("gw-2")
            assert (ack.status, ack.applied_version) == (AckStatus.APPLIED, 7)
            swarm.terminate()
            summary = json.loads(await asyncio.wait_for(swarm.stdout.readline(), 10))
            assert await asyncio.wait_for(swarm.wait(), 10) == 0
        finally:
            if swarm.returncode is None:
                swarm.kill()
                await swarm.wait()
    assert summary["gateways"] == 3
    assert (summary["applied"], summary["rejected"], summary["disconnects"]) == (1, 0, 0)


async def test_swarm_reconnects_and_gets_the_retained_config(
    own_broker: MosquittoBroker, tmp_path: Path
) -> None:
    """After a broker restart every gateway subscribes again and gets what was retained."""
    public = PublicKey(raw_public(generate_key(tmp_path / "fleet.key")))
    key = load_private_key(tmp_path / "fleet.key")
    site = new_site()
    swarm = Swarm("127.0.0.1", own_broker.port, site, ["gw-0", "gw-1"], [public])
    running = asyncio.create_task(swarm.run())
    try:
        await asyncio.wait_for(swarm.ready.wait(), 10)
        own_broker.stop()
        await asyncio.sleep(0.3)
        swarm.ready.clear()
        own_broker.start()
        async with ack_collector(own_broker.port, site) as (client, acks):
            await push(client, site, "gw-1", encode(document(key, site, "gw-1", 3)))
            await asyncio.wait_for(swarm.ready.wait(), 10)
            ack = await acks.next("gw-1", timeout=10)
            assert (ack.status, ack.applied_version) == (AckStatus.APPLIED, 3)
        assert swarm.stats.connects == 4  # failed attempts while it was down count as disconnects
        assert swarm.stats.disconnects >= 2
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
