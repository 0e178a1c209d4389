"""The service's control plane: signs and publishes pushed configs, sends queued commands,
records acknowledgements and results, drives rollouts, and keeps a heartbeat.

The CLI never talks MQTT for these: it writes what it wants into the registry (a pending config
version, a pending command, a rollout) and the running service carries it out, so a change
survives a restart of either and the signing key stays with the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from drivers.profiles import ProfileLibrary
from fleet.commands import Commands
from fleet.config import FleetConfig
from fleet.registry import Registry
from fleet.rollouts import Rollouts
from fleet.store import Store
from fleet.versions import Versions
from wire.control import Ack, CommandResult
from wire.models import encode
from wire.mqtt import MqttError, MqttLink
from wire.signing import KeyFileError, key_id, load_private_key, sign
from wire.topics import Channel, topic

log = logging.getLogger(__name__)

POLL_S = 0.1
TICK_S = 1.0
PUBACK_TIMEOUT_S = 30.0


class ControlPlane:
    def __init__(self, config: FleetConfig, store: Store, link: MqttLink) -> None:
        self.config = config
        self.store = store
        self.link = link
        self.versions = Versions(store)
        self.commands = Commands(store)
        self.library = ProfileLibrary.load(config.profiles_dir)
        self.registry = Registry(store, self.library)
        self.rollouts = Rollouts(store, self.registry, self.library)
        self.key: Ed25519PrivateKey | None = None
        self.key_problem: str | None = None
        try:
            self.key = load_private_key(config.signing_key)
        except KeyFileError as exc:
            self.key_problem = f"{exc} (run 'campus-fleet keys generate')"
            log.error("configs cannot be pushed: %s", self.key_problem)
        self.started_ns = time.time_ns()

    # -- ingest hooks (inside the ingest transaction) --------------------------------------------

    def on_ack(self, site: str, gateway: str, ack: Ack) -> None:
        if ack.kind == "config":
            self.versions.record_ack(site, gateway, ack)
            if ack.status.value == "rejected":
                log.warning("%s/%s rejected config v%d: %s", site, gateway, ack.version, ack.reason)

    def on_result(self, site: str, gateway: str, result: CommandResult) -> None:
        if not self.commands.record_result(site, gateway, result):
            log.info("result for unknown command %s from %s/%s", result.id, site, gateway)

    # -- the loop --------------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        next_tick = 0.0
        while True:
            now = loop.time()
            if now >= next_tick:
                next_tick = now + TICK_S
                self._heartbeat()
                self.rollouts.tick(time.time_ns())
                with self.store.transaction():
                    self.commands.expire(time.time_ns())
            if self.link.connected:
                await self._publish_configs()
                await self._send_commands()
            await asyncio.sleep(POLL_S)

    def _heartbeat(self) -> None:
        with self.store.transaction():
            self.store.conn.execute(
                "INSERT INTO service (name, pid, started_ns, heartbeat_ns, signing_key) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET pid = excluded.pid, "
                "started_ns = excluded.started_ns, heartbeat_ns = excluded.heartbeat_ns, "
                "signing_key = excluded.signing_key",
                (
                    self.config.name,
                    os.getpid(),
                    self.started_ns,
                    time.time_ns(),
                    key_id(self.key.public_key()) if self.key else None,
                ),
            )

    async def _publish_configs(self) -> None:
        pending = self.versions.pending()
        if not pending:
            return
        if self.key is None:
            with self.store.transaction():
                for row in pending:
                    self.versions.mark_unsendable(
                        row["site"],
                        row["gateway"],
                        row["version"],
                        f"not signed: {self.key_problem}",
                    )
            return
        futures = []
        for row in pending:
            document = sign(
                self.key,
                kind="config",
                site=row["site"],
                gateway=row["gateway"],
                version=row["version"],
                issued_ns=time.time_ns(),
                body=json.loads(row["body"]),
            )
            payload = encode(document)
            future = self.link.publish(
                topic(row["site"], row["gateway"], Channel.CONFIG), payload, qos=1, retain=True
            )
            futures.append((row, payload, future))
        sent = []
        for row, payload, future in futures:
            try:
                await self.link.acknowledged(future, PUBACK_TIMEOUT_S)
            except (MqttError, TimeoutError) as exc:
                log.warning(
                    "config %s/%s v%d not published yet: %s",
                    row["site"],
                    row["gateway"],
                    row["version"],
                    exc,
                )
                continue
            sent.append((row["site"], row["gateway"], row["version"], payload.decode()))
        if sent:
            with self.store.transaction():
                self.versions.mark_sent(sent)
            log.info("published %d config versions", len(sent))

    async def _send_commands(self) -> None:
        pending = self.commands.pending()
        if not pending:
            return
        futures = [
            (
                request.id,
                self.link.publish(topic(site, gateway, Channel.CMD), encode(request), qos=1),
            )
            for site, gateway, request in pending
        ]
        sent = []
        for command_id, future in futures:
            with contextlib.suppress(MqttError, TimeoutError):
                await self.link.acknowledged(future, PUBACK_TIMEOUT_S)
                sent.append(command_id)
        if sent:
            with self.store.transaction():
                self.commands.mark_sent(sent)
