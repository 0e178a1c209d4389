"""The service's control plane: signs and publishes pushed configs, sends queued commands,
records acknowledgements and results, drives rollouts, and keeps a heartbeat.

The CLI never talks MQTT for these: it writes what it wants into the registry (a pending config
version, a pending command, a rollout) and the running service carries it out, so a change
survives a restart of either and the signing key stays with the service.

Rules: the loop never waits for the broker (heartbeat, rollouts and command deadlines go on while
it is away). A publication is tracked until its PUBACK, then its row is marked sent; it is not
published again meanwhile (paho re-sends it on a new connection). Only the newest pending version
of a gateway is published, so an older one never lands on the retained topic after a newer one.
Rollout acknowledgement timeouts count only time in which the service could hear the gateways.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

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
from wire.mqtt import MqttLink
from wire.signing import KeyFileError, key_id, load_private_key, sign
from wire.topics import Channel, topic

log = logging.getLogger(__name__)

POLL_S = 0.1
TICK_S = 1.0
PUBACK_TIMEOUT_S = 30.0  # connected, yet no PUBACK: published again
RETRY_S = 5.0  # wait after a failed publication

K = TypeVar("K")
ConfigKey = tuple[str, str, int]


@dataclass(slots=True)
class _Sending:
    future: asyncio.Future[int]
    payload: str
    since: float  # event-loop time of the publication, or of the link's last (re)connection


def _retrieve(future: asyncio.Future[int]) -> None:
    """Marks the outcome of a publication given up on as seen."""
    if not future.cancelled():
        future.exception()


class _InFlight(Generic[K]):
    """Publications waiting for their PUBACK, by key, and keys resting after a failure."""

    def __init__(self) -> None:
        self.sending: dict[K, _Sending] = {}
        self.resting: dict[K, float] = {}

    def busy(self, key: K, now: float) -> bool:
        return key in self.sending or self.resting.get(key, 0.0) > now

    def add(self, key: K, future: asyncio.Future[int], payload: str, now: float) -> None:
        self.sending[key] = _Sending(future, payload, now)

    def reconnected(self, now: float) -> None:
        for sending in self.sending.values():
            sending.since = now

    def finished(
        self, now: float, connected: bool
    ) -> tuple[list[tuple[K, str]], list[tuple[K, str]]]:
        """Takes out the publications that ended: (key, payload) acknowledged, (key, why)
        failed; the failed ones rest `RETRY_S`."""
        done: list[tuple[K, str]] = []
        failed: list[tuple[K, str]] = []
        for key, sending in list(self.sending.items()):
            future = sending.future
            if future.done():
                error = None if future.cancelled() else future.exception()
                if future.cancelled() or error is not None:
                    failed.append((key, str(error) if error is not None else "cancelled"))
                else:
                    done.append((key, sending.payload))
            elif connected and now - sending.since > PUBACK_TIMEOUT_S:
                future.add_done_callback(_retrieve)
                failed.append((key, f"no PUBACK within {PUBACK_TIMEOUT_S:g} s"))
            else:
                continue
            del self.sending[key]
        self.resting = {key: until for key, until in self.resting.items() if until > now}
        for key, _why in failed:
            self.resting[key] = now + RETRY_S
        return done, failed


class ControlPlane:
    def __init__(self, config: FleetConfig, store: Store, link: MqttLink) -> None:
        self.config = config
        self.store = store
        self.link = link
        self.versions = Versions(store)
        self.policy_versions = Versions(store, "policy")
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
        #: Wall time since which the service hears the gateways (connected); None while not.
        self.listening_since_ns: int | None = None
        self._connects = 0
        self._next_tick = 0.0
        self._heartbeat_connected: bool | None = None
        self._configs: _InFlight[ConfigKey] = _InFlight()
        self._policies: _InFlight[ConfigKey] = _InFlight()
        self._commands: _InFlight[str] = _InFlight()
        self._unsigned: set[tuple[str, str, str, int]] = set()

    # -- ingest hooks (inside the ingest transaction) --------------------------------------------

    def on_ack(self, site: str, gateway: str, ack: Ack) -> None:
        versions = self.versions if ack.kind == "config" else self.policy_versions
        versions.record_ack(site, gateway, ack)
        if ack.status.value == "rejected":
            log.warning(
                "%s/%s rejected %s v%d: %s", site, gateway, ack.kind, ack.version, ack.reason
            )

    def on_result(self, site: str, gateway: str, result: CommandResult) -> None:
        if not self.commands.record_result(site, gateway, result):
            log.info("result for unknown command %s from %s/%s", result.id, site, gateway)

    # -- the loop --------------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self.step(loop.time())
            await asyncio.sleep(POLL_S)

    def step(self, now: float) -> None:
        """One round at event-loop time `now`; never waits."""
        self._watch_link(now)
        if self.link.connected != self._heartbeat_connected:
            self._next_tick = now  # the CLI reads the connection from the heartbeat: at once
        if now >= self._next_tick:
            self._next_tick = now + TICK_S
            wall = time.time_ns()
            self._heartbeat()
            heard = self.listening_since_ns
            self.rollouts.tick(wall, wall if heard is None else heard)
            with self.store.transaction():
                self.commands.expire(wall)
        self._collect(now)
        if self.link.connected:
            self._publish_configs(now)
            self._send_commands(now)

    def _watch_link(self, now: float) -> None:
        if not self.link.connected:
            self.listening_since_ns = None
        elif self.listening_since_ns is None or self.link.connects != self._connects:
            self._connects = self.link.connects
            self.listening_since_ns = time.time_ns()
            self._configs.reconnected(now)
            self._policies.reconnected(now)
            self._commands.reconnected(now)

    def _heartbeat(self) -> None:
        self._heartbeat_connected = self.link.connected
        with self.store.transaction():
            self.store.conn.execute(
                "INSERT INTO service (name, pid, started_ns, heartbeat_ns, signing_key, "
                "connected) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
                "pid = excluded.pid, started_ns = excluded.started_ns, "
                "heartbeat_ns = excluded.heartbeat_ns, signing_key = excluded.signing_key, "
                "connected = excluded.connected",
                (
                    self.config.name,
                    os.getpid(),
                    self.started_ns,
                    time.time_ns(),
                    key_id(self.key.public_key()) if self.key else None,
                    int(self.link.connected),
                ),
            )

    # -- publications ----------------------------------------------------------------------------

    def _collect(self, now: float) -> None:
        connected = self.link.connected
        for versions, in_flight in self._documents():
            sent, failed = in_flight.finished(now, connected)
            kind = versions.kind
            for (site, gateway, version), why in failed:
                log.warning("%s %s/%s v%d not published yet: %s", kind, site, gateway, version, why)
            if sent or failed:
                with self.store.transaction():
                    for (site, gateway, version), why in failed:
                        versions.mark_unsendable(site, gateway, version, f"not published: {why}")
                    versions.mark_sent([(*key, document) for key, document in sent])
                if sent:
                    log.info("published %d %s versions", len(sent), kind)
        done, failed_commands = self._commands.finished(now, connected)
        for command_id, why in failed_commands:
            log.warning("command %s not sent yet: %s", command_id, why)
        if done or failed_commands:
            with self.store.transaction():
                self.commands.mark_unsent([command_id for command_id, _why in failed_commands])
                self.commands.mark_sent([command_id for command_id, _payload in done])

    def _documents(self) -> list[tuple[Versions, _InFlight[ConfigKey]]]:
        return [(self.versions, self._configs), (self.policy_versions, self._policies)]

    def _publish_configs(self, now: float) -> None:
        for versions, in_flight in self._documents():
            self._publish(versions, in_flight, now)

    def _publish(self, versions: Versions, in_flight: _InFlight[ConfigKey], now: float) -> None:
        kind = versions.kind
        channel = Channel.CONFIG if kind == "config" else Channel.POLICY
        newest: dict[tuple[str, str], dict[str, Any]] = {}
        for row in versions.pending():
            place = (row["site"], row["gateway"])
            if place not in newest or row["version"] > newest[place]["version"]:
                newest[place] = row  # an older pending one is superseded once this one is sent
        if self.key is None:
            unsigned = {
                (kind, s, g, row["version"]) for (s, g), row in newest.items()
            } - self._unsigned
            if unsigned:
                with self.store.transaction():
                    for _kind, site, gateway, version in unsigned:
                        versions.mark_unsendable(
                            site, gateway, version, f"not signed: {self.key_problem}"
                        )
                self._unsigned |= unsigned
            return
        for (site, gateway), row in newest.items():
            key = (site, gateway, int(row["version"]))
            if in_flight.busy(key, now):
                continue
            document = sign(
                self.key,
                kind=kind,
                site=site,
                gateway=gateway,
                version=key[2],
                issued_ns=time.time_ns(),
                body=json.loads(row["body"]),
            )
            payload = encode(document)
            future = self.link.publish(topic(site, gateway, channel), payload, qos=1, retain=True)
            in_flight.add(key, future, payload.decode(), now)

    def _send_commands(self, now: float) -> None:
        due = [
            (site, gateway, request)
            for site, gateway, request in self.commands.pending()
            if not self._commands.busy(request.id, now)
        ]
        if not due:
            return
        # The sent time is written before the publication: a device that answers at once may
        # have answered before the PUBACK is collected (and before `cmd` prints the batch).
        with self.store.transaction():
            self.commands.mark_publishing([request.id for _s, _g, request in due], time.time_ns())
        for site, gateway, request in due:
            future = self.link.publish(topic(site, gateway, Channel.CMD), encode(request), qos=1)
            self._commands.add(request.id, future, "", now)
