"""A swarm of simulated gateways for the config-push benchmark: N MQTT connections on one loop.

Each gateway answers its retained `campus/{site}/gw/{gw}/config` the way the agent's config
applier (`agent.control`) does, checks in the same order: a signed document, addressed to this
site and gateway, signed by a trusted key, newer than the applied version (the same version with
the same body is acknowledged as applied again), a valid `ManagedConfig` body; every document
gets an `Ack` on `…/ack`, QoS 1. Nothing is really applied or written to disk: the swarm keeps
each gateway's applied version and body hash in memory.

    python -m benchmarks._gateway_swarm --host H --port P --site S \
        --gateways gw-0000..gw-0499 --public-key fleet-signing.key.pub

prints `ready N` once all N gateways have subscribed (`ready` lines again only after a reconnect
wave) and, when stopped by SIGTERM or SIGINT, one JSON line of counters.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import re
import resource
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt
from pydantic import ValidationError

from wire.control import Ack, AckStatus, SignedDocument
from wire.errors import InvalidMessage, problems_from
from wire.gateway_config import ManagedConfig
from wire.models import decode, encode
from wire.topics import Channel, check_id, topic
from wire.verify import PublicKey, SignatureError, load_public_key_file, verify

log = logging.getLogger(__name__)

CONNECTING_AT_ONCE = 50  # CONNECT/SUBSCRIBE in flight per process (Mosquitto's backlog: 100)
RECONNECT_MIN_S, RECONNECT_MAX_S = 0.5, 5.0


def raise_nofile_limit() -> int:
    """Raises this process's open-file limit to its hard limit (children inherit it)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


_NUMBERED = re.compile(r"^(.*?)(\d+)$")


def expand_gateways(spec: str) -> list[str]:
    """`gw-0000..gw-0499` (inclusive, zero-padded like the first), lists joined by commas."""
    gateways: list[str] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        first, sep, last = part.partition("..")
        if not sep:
            gateways.append(check_id("gateway", part))
            continue
        low, high = _NUMBERED.match(first), _NUMBERED.match(last)
        if low is None or high is None or low[1] != high[1]:
            raise ValueError(f"range {part!r}: both ends need the same prefix and a number")
        width = len(low[2])
        gateways += [
            check_id("gateway", f"{low[1]}{n:0{width}d}")
            for n in range(int(low[2]), int(high[2]) + 1)
        ]
    if len(set(gateways)) != len(gateways):
        raise ValueError(f"{spec!r} names a gateway twice")
    return gateways


# -- the applier: pure logic, no I/O --------------------------------------------------------------


class Refused(Exception):
    """A document the gateway does not apply; the text is the ack's reason."""

    def __init__(self, reason: str, version: int = 0, sha256: str | None = None) -> None:
        super().__init__(reason)
        self.reason, self.version, self.sha256 = reason, version, sha256


@dataclass
class ConfigApplier:
    """What one gateway decides about a config document, and the Ack it answers with: the
    checks and reasons of `agent.control.ConfigControl`, in its order, without the profile
    library (bodies are checked against `ManagedConfig` only) and without persisting."""

    site: str
    gateway: str
    public_keys: list[PublicKey]
    applied_version: int = 0
    applied_sha256: str | None = None

    def handle(self, topic_name: str, payload: bytes, now_ns: int) -> Ack | None:
        """None for an empty payload (a cleared retained message): nothing to answer."""
        if not payload:
            return None
        try:
            document = self._check(topic_name, payload)
        except Refused as refused:
            return self._ack(refused.version, refused.sha256, now_ns, refused.reason)
        self.applied_version, self.applied_sha256 = document.version, document.sha256
        return self._ack(document.version, document.sha256, now_ns)

    def _check(self, topic_name: str, payload: bytes) -> SignedDocument:
        document = _decode_document(topic_name, payload)
        version, sha = document.version, document.sha256
        if (document.site, document.gateway) != (self.site, self.gateway):
            raise Refused(
                f"for gateway {document.site}/{document.gateway}, "
                f"this gateway is {self.site}/{self.gateway}",
                version,
                sha,
            )
        try:
            verify(document, self.public_keys)
        except SignatureError as exc:
            raise Refused(str(exc), version, sha) from None
        if version < self.applied_version:
            raise Refused(
                f"version {version} is older than the applied version {self.applied_version}: "
                "replay refused",
                version,
                sha,
            )
        if version == self.applied_version:
            if sha == self.applied_sha256:
                return document  # the applied document again: applied
            raise Refused(
                f"version {version} is already applied with another body: "
                "a changed config needs a new version",
                version,
                sha,
            )
        try:
            ManagedConfig.model_validate(document.body)
        except ValidationError as exc:
            problems = "; ".join(f"body.{p}" for p in problems_from(exc))
            raise Refused(f"invalid config: {problems}", version, sha) from None
        return document

    def _ack(self, version: int, sha: str | None, now_ns: int, reason: str | None = None) -> Ack:
        return Ack(
            kind="config",
            version=version,
            sha256=sha,
            status=AckStatus.APPLIED if reason is None else AckStatus.REJECTED,
            reason=reason,
            applied_version=self.applied_version,
            ts_ns=now_ns,
        )


def _decode_document(topic_name: str, payload: bytes) -> SignedDocument:
    """The document, or `Refused` naming every problem (with the version and hash when the
    payload is JSON that carries them)."""
    try:
        document = decode(SignedDocument, topic_name, payload)
    except InvalidMessage as exc:
        version, sha = 0, None
        try:
            raw = json.loads(payload)
        except ValueError:
            raw = None
        if isinstance(raw, dict):
            if isinstance(raw.get("version"), int) and 0 <= raw["version"] < 2**63:
                version = raw["version"]
            if isinstance(raw.get("sha256"), str):
                sha = raw["sha256"][:64]
        problems = "; ".join(str(problem) for problem in exc.problems)
        raise Refused(f"not a valid signed document: {problems}", version, sha) from None
    if document.kind != "config":
        raise Refused(
            f"a {document.kind} document on the config topic", document.version, document.sha256
        )
    return document


# -- the swarm: one aiomqtt client per gateway ---------------------------------------------------


@dataclass
class SwarmStats:
    applied: int = 0
    applied_again: int = 0
    rejected: int = 0
    connects: int = 0
    disconnects: int = 0
    reasons: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, object]:
        return {
            "applied": self.applied,
            "applied_again": self.applied_again,
            "rejected": self.rejected,
            "connects": self.connects,
            "disconnects": self.disconnects,
            "reasons": dict(self.reasons.most_common(10)),
        }


class Swarm:
    def __init__(
        self,
        host: str,
        port: int,
        site: str,
        gateways: Sequence[str],
        public_keys: list[PublicKey],
        *,
        on_ready: Callable[[int], None] | None = None,
    ) -> None:
        self.host, self.port, self.site = host, port, check_id("site", site)
        self.appliers = [ConfigApplier(site, gw, public_keys) for gw in gateways]
        self.on_ready = on_ready
        self.stats = SwarmStats()
        self.ready = asyncio.Event()
        self._subscribed: set[str] = set()
        self._connecting = asyncio.Semaphore(CONNECTING_AT_ONCE)

    async def run(self) -> None:
        """Runs every gateway until cancelled."""
        async with asyncio.TaskGroup() as group:
            for applier in self.appliers:
                group.create_task(self._gateway(applier), name=applier.gateway)

    def _mark_subscribed(self, gateway: str) -> None:
        self._subscribed.add(gateway)
        if len(self._subscribed) == len(self.appliers):
            self.ready.set()
            if self.on_ready is not None:
                self.on_ready(len(self._subscribed))

    async def _gateway(self, applier: ConfigApplier) -> None:
        delay = RECONNECT_MIN_S
        while True:
            try:
                await self._session(applier)
            except aiomqtt.MqttError as exc:
                self.stats.disconnects += 1
                if applier.gateway in self._subscribed:  # it was connected: start over
                    delay = RECONNECT_MIN_S
                self._subscribed.discard(applier.gateway)
                log.warning("%s: %s; reconnecting in %.1f s", applier.gateway, exc, delay)
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, RECONNECT_MAX_S)

    async def _session(self, applier: ConfigApplier) -> None:
        config_topic = topic(self.site, applier.gateway, Channel.CONFIG)
        ack_topic = topic(self.site, applier.gateway, Channel.ACK)
        client = aiomqtt.Client(
            self.host,
            self.port,
            identifier=f"swarm-{self.site}-{applier.gateway}",
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=True,
        )
        async with contextlib.AsyncExitStack() as stack:
            async with self._connecting:
                await stack.enter_async_context(client)
                await client.subscribe(config_topic, qos=1)
            self.stats.connects += 1
            self._mark_subscribed(applier.gateway)
            async for message in client.messages:
                before = applier.applied_version
                ack = applier.handle(str(message.topic), _payload(message.payload), time.time_ns())
                if ack is None:
                    continue
                if ack.status is AckStatus.REJECTED:
                    self.stats.rejected += 1
                    self.stats.reasons[_reason_kind(ack.reason)] += 1
                elif ack.version == before:
                    self.stats.applied_again += 1
                else:
                    self.stats.applied += 1
                await client.publish(ack_topic, encode(ack), qos=1)


def _payload(payload: object) -> bytes:
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    if isinstance(payload, str):
        return payload.encode()
    return b""


def _reason_kind(reason: str | None) -> str:
    """Reasons without the version numbers, so the counters group them."""
    return re.sub(r"\d+", "N", reason or "")[:80]


# -- command line -------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def serve(args: argparse.Namespace) -> dict[str, object]:
    key = load_public_key_file(args.public_key)
    gateways = expand_gateways(args.gateways)
    swarm = Swarm(
        args.host,
        args.port,
        args.site,
        gateways,
        [key],
        on_ready=lambda count: print(f"ready {count}", flush=True),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    running = asyncio.create_task(swarm.run(), name="swarm")
    stopping = asyncio.create_task(stop.wait(), name="stop")
    await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
    running.cancel()
    stopping.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await running
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "gateways": len(gateways),
        **swarm.stats.as_dict(),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--site", required=True)
    parser.add_argument(
        "--gateways", required=True, help="gw-0000..gw-0499, or a comma list of ids and ranges"
    )
    parser.add_argument(
        "--public-key", type=Path, required=True, help="the fleet's public key (PEM)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    raise_nofile_limit()
    summary = asyncio.run(serve(args))
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
