"""The agent's side of the fleet's control plane: signed configs in, acknowledgements out.

Rules: a config document is checked in a fixed order — decodable, for this site and gateway,
signed by a trusted key, not older than the applied one, then its body valid against the profiles
— and only then applied, all or nothing; every document gets an `Ack`, applied or rejected with
the reason. The applied document is kept as received (signature included) in `fleet.applied_path`,
written atomically, and verified again at every start. Answers wait in the `Outbox` until the
broker acknowledged them, so none is lost while the broker is away.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pydantic import ValidationError

from agent.clock import Clock
from agent.events import EventQueue
from drivers.profiles import ProfileLibrary
from wire.control import Ack, AckStatus, SignedDocument
from wire.errors import InvalidMessage, problems_from
from wire.gateway_config import ManagedConfig, check_against_profiles
from wire.models import EventKind, decode
from wire.mqtt import MqttError, MqttLink, PublishRefused
from wire.verify import PublicKey, SignatureError, load_public_key_file, verify

log = logging.getLogger(__name__)

MAX_REASON = 4000
OUTBOX_LIMIT = 1000


def make_ack(
    kind: str,
    version: int,
    sha256: str | None,
    status: AckStatus,
    reason: str | None,
    applied_version: int,
    clock: Clock,
) -> Ack:
    """The answer to a config or policy document, its reason cut to what the wire allows."""
    if reason is not None and len(reason) > MAX_REASON:
        reason = reason[: MAX_REASON - 1] + "…"
    return Ack(
        kind=kind,
        version=version,
        sha256=sha256,
        status=status,
        reason=reason,
        applied_version=applied_version,
        ts_ns=clock.wall_ns(),
    )


class Refused(Exception):
    """A document that must not be applied; the text is the ack's reason."""

    def __init__(self, reason: str, version: int = 0, sha256: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.version = version
        self.sha256 = sha256


def already_applied(document: SignedDocument, applied: SignedDocument | None) -> bool:
    """True for the applied document again; `Refused` for an older version (a replay) or
    another body under the applied version. Configs and policies follow the same order."""
    if applied is None:
        return False
    if document.version < applied.version:
        raise Refused(
            f"version {document.version} is older than the applied version "
            f"{applied.version}: replay refused",
            document.version,
            document.sha256,
        )
    if document.version == applied.version:
        if document.sha256 == applied.sha256:
            return True
        raise Refused(
            f"version {document.version} is already applied with another body "
            f"(sha256 {applied.sha256[:12]}…, this one {document.sha256[:12]}…): "
            f"a changed {document.kind} needs a new version",
            document.version,
            document.sha256,
        )
    return False


class ApplyError(Exception):
    """A valid config that could not be put into effect; everything was rolled back."""


class AppliedFileError(Exception):
    """The applied-config file cannot be used (damaged, untrusted, or for another gateway)."""


#: Puts a checked config into effect. `persist` (when given) runs once the new devices are
#: polling, before the old ones stop; raises ApplyError after undoing everything.
Apply = Callable[[ManagedConfig, Callable[[], Awaitable[None]] | None], Awaitable[str]]


def load_trusted_keys(paths: list[Path]) -> list[PublicKey]:
    """The fleet's public keys; `KeyFileError` for one that is unreadable or not Ed25519."""
    return [load_public_key_file(path) for path in paths]


# -- the applied-config file ----------------------------------------------------------------------


class AppliedStore:
    """The last applied signed config, exactly as received."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise AppliedFileError(f"cannot read it: {exc.strerror or exc}") from None

    def save(self, payload: bytes) -> None:
        """tmp file, fsync, rename over the old one, fsync the folder: after a power cut the
        file holds either the old document or the new one, whole."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(self.path)
        folder = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)

    def set_aside(self) -> Path:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        target = self.path.with_name(f"{self.path.name}.bad-{stamp}")
        self.path.replace(target)
        return target


# -- checks ---------------------------------------------------------------------------------------


def decode_document(topic: str, payload: bytes) -> SignedDocument:
    """The signed document of a payload, or `Refused` naming every problem (with the version
    when the payload is JSON that carries one)."""
    try:
        document = decode(SignedDocument, topic, payload)
    except InvalidMessage as exc:
        problems = "; ".join(str(problem) for problem in exc.problems)
        version, sha = 0, None
        try:
            raw = json.loads(payload)
        except ValueError:
            raw = None
        if isinstance(raw, dict):
            readable = raw.get("version")
            if isinstance(readable, int) and not isinstance(readable, bool):
                version = readable if 0 <= readable < 2**63 else 0
            if isinstance(raw.get("sha256"), str):
                sha = raw["sha256"][:64]
        raise Refused(f"not a valid signed document: {problems}", version, sha) from None
    if document.kind != "config":
        raise Refused(
            f"a {document.kind} document on the config topic", document.version, document.sha256
        )
    return document


def check_identity(document: SignedDocument, site: str, gateway: str) -> None:
    if (document.site, document.gateway) != (site, gateway):
        raise Refused(
            f"for gateway {document.site}/{document.gateway}, this gateway is {site}/{gateway}",
            document.version,
            document.sha256,
        )


def check_signature(document: SignedDocument, keys: list[PublicKey]) -> None:
    try:
        verify(document, keys)
    except SignatureError as exc:
        raise Refused(str(exc), document.version, document.sha256) from None


def check_body(document: SignedDocument, library: ProfileLibrary) -> ManagedConfig:
    try:
        managed = ManagedConfig.model_validate(document.body)
    except ValidationError as exc:
        problems = [f"body.{p}" for p in problems_from(exc)]
        raise Refused(
            f"invalid config: {'; '.join(problems)}", document.version, document.sha256
        ) from None
    problems = [f"body.{p}" for p in check_against_profiles(managed, library)]
    if problems:
        raise Refused(f"invalid config: {'; '.join(problems)}", document.version, document.sha256)
    return managed


# -- the config applier ----------------------------------------------------------------------------


class ConfigControl:
    def __init__(
        self,
        *,
        site: str,
        gateway: str,
        keys: list[PublicKey],
        library: ProfileLibrary,
        store: AppliedStore,
        clock: Clock,
        events: EventQueue,
        topic: str,
    ) -> None:
        self.site = site
        self.gateway = gateway
        self.keys = keys
        self.library = library
        self.store = store
        self.clock = clock
        self.events = events
        self.topic = topic
        #: The signed config in effect; None while the agent file's own devices are.
        self.applied: SignedDocument | None = None
        self._last_rejected: tuple[int, str | None, str] | None = None

    @property
    def applied_version(self) -> int:
        return self.applied.version if self.applied is not None else 0

    # -- start-up

    def startup(self, local: ManagedConfig) -> ManagedConfig:
        """The config to start with: the applied file's when it is still trusted and valid,
        else the agent file's (a bad applied file is renamed `.bad-<UTC time>` and logged)."""
        try:
            payload = self.store.read()
            if payload is None:
                log.info("no applied fleet config at %s: using the agent file's", self.store.path)
                return local
            document, managed = self._verify_applied(payload)
        except AppliedFileError as exc:
            self.set_aside(str(exc))
            return local
        self.applied = document
        log.info(
            "using the fleet's config version %d from %s (%d devices, %d schedules)",
            document.version,
            self.store.path,
            len(managed.devices),
            len(managed.schedules),
        )
        return managed

    def _verify_applied(self, payload: bytes) -> tuple[SignedDocument, ManagedConfig]:
        try:
            document = decode_document(str(self.store.path), payload)
            check_identity(document, self.site, self.gateway)
            check_signature(document, self.keys)
            return document, check_body(document, self.library)
        except Refused as exc:
            raise AppliedFileError(exc.reason) from None

    def set_aside(self, reason: str) -> None:
        """Stops trusting the applied file: renamed, never read again."""
        self.applied = None
        try:
            moved = self.store.set_aside()
        except OSError as exc:
            log.error(
                "applied config %s is not usable (%s) and cannot be set aside: %s; "
                "using the agent file's config",
                self.store.path,
                reason,
                exc.strerror or exc,
            )
            return
        log.error(
            "applied config %s is not usable (%s): moved to %s; using the agent file's config",
            self.store.path,
            reason,
            moved,
        )

    @staticmethod
    def inspect(
        path: Path,
        site: str,
        gateway: str,
        keys: list[PublicKey],
        library: ProfileLibrary,
    ) -> tuple[SignedDocument, ManagedConfig] | None:
        """The applied file's document, None when there is none; `AppliedFileError` when it
        would be set aside. Reads only (for `campus-agent check`)."""
        payload = AppliedStore(path).read()
        if payload is None:
            return None
        try:
            document = decode_document(str(path), payload)
            check_identity(document, site, gateway)
            check_signature(document, keys)
            return document, check_body(document, library)
        except Refused as exc:
            raise AppliedFileError(exc.reason) from None

    # -- pushed documents

    async def handle(self, payload: bytes, apply: Apply) -> Ack | None:
        """Checks and applies one message of the config topic; the ack to send (None for the
        empty payload that deletes a retained document)."""
        if not payload:
            log.info("the retained config on %s was cleared: keeping the current one", self.topic)
            return None
        try:
            document = decode_document(self.topic, payload)
            check_identity(document, self.site, self.gateway)
            check_signature(document, self.keys)
            if self._already_applied(document):
                log.info("config version %d is already applied", document.version)
                return self._ack(document.version, document.sha256, AckStatus.APPLIED)
            managed = check_body(document, self.library)
        except Refused as refused:
            return self._rejected(refused)

        async def persist() -> None:
            await asyncio.to_thread(self.store.save, payload)

        try:
            summary = await apply(managed, persist)
        except ApplyError as exc:
            return self._rejected(
                Refused(f"could not apply: {exc} (rolled back)", document.version, document.sha256)
            )
        previous = self.applied_version
        self.applied = document
        self._last_rejected = None
        message = f"config version {document.version} applied (was {previous}): {summary}"
        log.info("%s", message)
        self.events.raise_event(
            EventKind.CONFIG,
            message[:2000],
            version=document.version,
            sha256=document.sha256,
            status=AckStatus.APPLIED.value,
            previous=previous,
        )
        return self._ack(document.version, document.sha256, AckStatus.APPLIED)

    def _already_applied(self, document: SignedDocument) -> bool:
        return already_applied(document, self.applied)

    def _rejected(self, refused: Refused) -> Ack:
        key = (refused.version, refused.sha256, refused.reason)
        if key == self._last_rejected:  # the same retained document, redelivered
            log.info("config version %d rejected again: %s", refused.version, refused.reason)
        else:
            self._last_rejected = key
            log.warning("config version %d rejected: %s", refused.version, refused.reason)
            self.events.raise_event(
                EventKind.CONFIG,
                f"config version {refused.version} rejected: {refused.reason}"[:2000],
                version=refused.version,
                sha256=refused.sha256,
                status=AckStatus.REJECTED.value,
                applied_version=self.applied_version,
            )
        return self._ack(refused.version, refused.sha256, AckStatus.REJECTED, refused.reason)

    def _ack(
        self, version: int, sha256: str | None, status: AckStatus, reason: str | None = None
    ) -> Ack:
        return make_ack("config", version, sha256, status, reason, self.applied_version, self.clock)


# -- answers that must reach the broker -----------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _Outgoing:
    topic: str
    payload: bytes


class Outbox:
    """Control-plane answers kept until the broker's PUBACK: the latest one per key (acks are
    keyed by kind and version: a redelivered document's answer replaces its unsent older one,
    while an applied ack is never hidden by a later rejection of another version), the others
    in order, at most `limit` of them (the oldest is dropped, logged)."""

    def __init__(self, link: MqttLink, ack_timeout_s: float, limit: int = OUTBOX_LIMIT) -> None:
        self.link = link
        self.ack_timeout_s = ack_timeout_s
        self.limit = limit
        self._items: OrderedDict[object, _Outgoing] = OrderedDict()
        self._wake = asyncio.Event()
        self._counter = 0
        self.sent = 0
        self.dropped = 0

    @property
    def pending(self) -> int:
        return len(self._items)

    def put(self, topic: str, payload: bytes, key: str | None = None) -> None:
        slot: object
        if key is None:
            self._counter += 1
            slot = self._counter
        else:
            slot = ("key", key)
            self._items.pop(slot, None)
        self._items[slot] = _Outgoing(topic, payload)
        while len(self._items) > self.limit:
            _, oldest = self._items.popitem(last=False)
            self.dropped += 1
            log.warning("outbox full: dropped an unsent message to %s", oldest.topic)
        self._wake.set()

    async def run(self) -> None:
        while True:
            if not self._items:
                self._wake.clear()
                await self._wake.wait()
                continue
            await self.link.wait_connected()
            slot, item = next(iter(self._items.items()))
            try:
                future = self.link.publish(item.topic, item.payload, qos=1)
                await self.link.acknowledged(future, self.ack_timeout_s)
            except PublishRefused as exc:  # would be refused again: keep the others moving
                log.error("dropped, the broker refuses it (%s): %s", exc.reason, item.topic)
            except (MqttError, TimeoutError) as exc:
                log.info("answer to %s not sent yet: %s", item.topic, exc)
                await asyncio.sleep(1)
                continue
            else:
                self.sent += 1
            if self._items.get(slot) is item:
                del self._items[slot]
