"""The agent's side of signed network policies: checked like configs, enforced with nftables.

Rules: a document on `…/policy` is checked in the config's order — decodable, for this site and
gateway, signed by a trusted key, not older than the applied one, body valid — then compiled,
checked with `nft -c`, and applied in one `nft -f` transaction that replaces only the agent's
table. Commit-confirm: within `confirm_timeout_s` the uplink check must pass (a new TCP connection
to the broker completes, and the live MQTT session acknowledges a QoS 1 probe); otherwise the
table as it was before is put back (or ours removed when there was none) and the ack says
`rolled back: uplink lost`. Only a confirmed policy is saved (atomically, as received) and
re-applied at start. Every document gets an ack through the outbox, like configs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import socket
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Address, IPv6Address, IPv6Network, ip_address
from typing import TYPE_CHECKING, Any

from agent.clock import Clock
from agent.config import PolicySettings
from agent.control import (
    AppliedFileError,
    AppliedStore,
    Refused,
    already_applied,
    check_identity,
    check_signature,
    decode_document,
    make_ack,
)
from agent.events import EventQueue
from agent.policy.nft import Nft, NftError, NftUnavailable
from wire.control import (
    Ack,
    AckStatus,
    CommandOutcome,
    CommandRequest,
    CommandResult,
    SignedDocument,
)
from wire.errors import InvalidMessage
from wire.models import EventKind, PolicyCounter, PolicyState, decode
from wire.mqtt import MqttError, MqttLink, MqttSettings
from wire.verify import PublicKey

if TYPE_CHECKING:
    # The policy model and compiler are imported when a policy document arrives, not before:
    # a gateway that does not enforce policies keeps the ~2 MB they cost.
    from wire.policy import Policy
    from wire.policy_nft import GatewayContext, SetKind

log = logging.getLogger(__name__)

#: The pseudo-device of the command path: `{device: policy, action: add_element|delete_element,
#: argument: {set: "<zone>.<set>", value: "<MAC, address or prefix>"}}`.
POLICY_DEVICE = "policy"
COUNTERS_TIMEOUT_S = 10.0


class UplinkLost(Exception):
    """The uplink check failed after a policy was applied; the text says what was tried."""


#: Proves within `timeout_s` that the gateway still reaches its broker; raises `UplinkLost`.
UplinkCheck = Callable[[float], Awaitable[None]]


# -- checks ---------------------------------------------------------------------------------------


def decode_policy_document(topic: str, payload: bytes) -> SignedDocument:
    """The signed policy document of a payload, or `Refused` naming every problem."""
    try:
        document = decode(SignedDocument, topic, payload)
    except InvalidMessage:
        decode_document(topic, payload)  # raises Refused with every problem and the version
        raise
    if document.kind != "policy":
        raise Refused(
            f"a {document.kind} document on the policy topic", document.version, document.sha256
        )
    return document


def check_policy_body(document: SignedDocument) -> Policy:
    from wire.policy import PolicyError, parse_policy

    try:
        return parse_policy(document.body, prefix=("body",))
    except PolicyError as exc:
        problems = "; ".join(str(p) for p in exc.problems)
        raise Refused(f"invalid policy: {problems}", document.version, document.sha256) from None


async def confirm_uplink(
    link: MqttLink,
    host: str,
    port: int,
    probe: Callable[[], tuple[str, bytes]],
    timeout_s: float,
) -> None:
    """The uplink check of commit-confirm: a new TCP connection to the broker completes (what the
    next reconnect needs; established connections pass any policy), then the live MQTT session
    acknowledges a QoS 1 probe (`probe()` gives topic and payload, e.g. the retained state)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    last = ""
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise UplinkLost(
                f"no new TCP connection to the broker at {where} within {timeout_s:g} s"
                + (f" ({last})" if last else "")
            )
        try:
            async with asyncio.timeout(min(remaining, 5.0)):
                _, writer = await asyncio.open_connection(host, port)
        except TimeoutError:
            last = "connection attempts timed out"
            continue
        except OSError as exc:
            last = exc.strerror or str(exc)
            await asyncio.sleep(min(0.2, max(0.0, deadline - loop.time())))
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        break
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise UplinkLost(
                f"the MQTT session did not acknowledge a probe within {timeout_s:g} s"
                + (f" ({last})" if last else "")
            )
        try:
            await link.wait_connected(remaining)
            topic, payload = probe()
            async with asyncio.timeout(max(0.01, deadline - loop.time())):
                await link.publish(topic, payload, qos=1, retain=True)
            return
        except TimeoutError:
            last = "no PUBACK"
        except MqttError as exc:
            last = str(exc)
            await asyncio.sleep(min(0.2, max(0.0, deadline - loop.time())))


# -- the policy applier ---------------------------------------------------------------------------


class PolicyControl:
    def __init__(
        self,
        *,
        site: str,
        gateway: str,
        keys: list[PublicKey],
        settings: PolicySettings,
        clock: Clock,
        events: EventQueue,
        topic: str,
        context: Callable[[], Awaitable[GatewayContext]],
        nft: Nft | None = None,
        compiler: Callable[[Policy, GatewayContext], str] | None = None,
    ) -> None:
        self.site = site
        self.gateway = gateway
        self.keys = keys
        self.settings = settings
        self.clock = clock
        self.events = events
        self.topic = topic
        self.context = context
        self._compiler = compiler
        self.store = AppliedStore(settings.applied_path)
        self.nft = nft or Nft(settings.nft_path, settings.table)
        #: The signed policy in force (None: none, or it could not be put in force at start).
        self.applied: SignedDocument | None = None
        self.policy: Policy | None = None
        self.text: str | None = None
        self.counters: list[PolicyCounter] = []
        self.counters_ns: int | None = None
        self.error: str | None = None
        self._last_rejected: tuple[int, str | None, str] | None = None
        self._counters_failing = False
        #: Documents that cut the uplink, by (version, sha256): a retained one comes back at
        #: every reconnect and must not cut the uplink again each time.
        self._rolled_back: dict[tuple[int, str], str] = {}

    @property
    def applied_version(self) -> int:
        return self.applied.version if self.applied is not None else 0

    @property
    def sha256(self) -> str | None:
        return hashlib.sha256(self.text.encode()).hexdigest() if self.text is not None else None

    def state(self) -> PolicyState | None:
        if not self.settings.enabled:
            return None
        return PolicyState(
            version=self.applied_version,
            sha256=self.sha256,
            table=self.settings.table,
            counters=self.counters,
            counters_ns=self.counters_ns,
            error=self.error[:2000] if self.error else None,
        )

    # -- start-up

    async def startup(self) -> None:
        """Re-applies the saved policy (checked again: signature, gateway, body) without
        commit-confirm: it was confirmed when it came. A file that is no longer trusted is set
        aside; when nft cannot apply it, `error` says why and the pushed one is tried again."""
        if not self.settings.enabled:
            return
        try:
            payload = self.store.read()
            if payload is None:
                log.info("no applied network policy at %s", self.store.path)
                return
            document, policy = self._verify(payload)
        except AppliedFileError as exc:
            self._set_aside(str(exc))
            return
        try:
            text = self.compile(policy, await self.context())
            await self.nft.check(text)
            await self.nft.apply(text)
        except NftError as exc:
            self.error = f"saved policy version {document.version} not applied: {exc}"
            log.error("%s", self.error)
            return
        self._in_force(document, policy, text)
        log.info(
            "network policy version %d from %s applied to table inet %s",
            document.version,
            self.store.path,
            self.settings.table,
        )
        await self.refresh_counters()

    def _verify(self, payload: bytes) -> tuple[SignedDocument, Policy]:
        try:
            document = decode_policy_document(str(self.store.path), payload)
            check_identity(document, self.site, self.gateway)
            check_signature(document, self.keys)
            return document, check_policy_body(document)
        except Refused as exc:
            raise AppliedFileError(exc.reason) from None

    def _set_aside(self, reason: str) -> None:
        try:
            moved = self.store.set_aside()
        except OSError as exc:
            log.error("applied policy %s is not usable (%s): %s", self.store.path, reason, exc)
            return
        log.error(
            "applied policy %s is not usable (%s): moved to %s", self.store.path, reason, moved
        )

    def _in_force(self, document: SignedDocument, policy: Policy, text: str) -> None:
        self.applied = document
        self.policy = policy
        self.text = text
        self.error = None

    # -- pushed documents

    async def handle(self, payload: bytes, confirm: UplinkCheck) -> Ack | None:
        """Checks, applies and confirms one message of the policy topic; the ack to send (None
        for the empty payload that deletes a retained document)."""
        if not payload:
            log.info("the retained policy on %s was cleared: keeping the current one", self.topic)
            return None
        try:
            document = decode_policy_document(self.topic, payload)
            check_identity(document, self.site, self.gateway)
            check_signature(document, self.keys)
            if self._already_applied(document):
                log.info("policy version %d is already applied", document.version)
                return self._ack(document.version, document.sha256, AckStatus.APPLIED)
            cut = self._rolled_back.get((document.version, document.sha256))
            if cut is not None:
                raise Refused(
                    f"version {document.version} was rolled back ({cut}): not tried again; "
                    "a corrected policy needs a new version",
                    document.version,
                    document.sha256,
                )
            policy = check_policy_body(document)
            if not self.settings.enabled:
                raise Refused(
                    "network policy enforcement is disabled on this gateway "
                    "(policy.enabled is false in the agent's file)",
                    document.version,
                    document.sha256,
                )
            text = self.compile(policy, await self.context())
            await self._enforce(document, text, confirm)
            await self._persist(document, payload, text)
        except Refused as refused:
            return self._rejected(refused)
        previous = self.applied_version
        self._in_force(document, policy, text)
        self._last_rejected = None
        message = (
            f"policy version {document.version} applied (was {previous}) to table inet "
            f"{self.settings.table}: {len(policy.zones)} zones, {len(policy.flows)} flows"
        )
        log.info("%s", message)
        self.events.raise_event(
            EventKind.POLICY,
            message,
            version=document.version,
            sha256=document.sha256,
            status=AckStatus.APPLIED.value,
            previous=previous,
            nft_sha256=self.sha256,
        )
        await self.refresh_counters()
        return self._ack(document.version, document.sha256, AckStatus.APPLIED)

    async def _enforce(self, document: SignedDocument, text: str, confirm: UplinkCheck) -> None:
        """nft -c, snapshot, nft -f, confirm; `Refused` once everything is as it was."""

        def refused(reason: str) -> Refused:
            return Refused(reason, document.version, document.sha256)

        try:
            await self.nft.check(text)
        except NftUnavailable as exc:
            raise refused(f"nft not available: {exc.message}") from None
        except NftError as exc:
            raise refused(f"nft -c refused the compiled policy: {exc.message}") from None
        try:
            before = await self.nft.list_table()
            await self.nft.apply(text)
        except NftUnavailable as exc:
            raise refused(f"nft not available: {exc.message}") from None
        except NftError as exc:
            raise refused(f"nft could not apply it (nothing changed): {exc.message}") from None
        try:
            async with asyncio.timeout(self.settings.confirm_timeout_s + 5):
                await confirm(self.settings.confirm_timeout_s)
        except Exception as exc:  # whatever went wrong, the candidate must not stay unconfirmed
            reason = str(exc) or f"no answer within {self.settings.confirm_timeout_s:g} s"
            if not isinstance(exc, UplinkLost | TimeoutError):
                log.exception("the uplink check failed")
                reason = f"the uplink check failed: {type(exc).__name__}: {reason}"
            undone = await self._rollback(before)
            await self.refresh_counters()  # they were read while the candidate was in force
            log.error("policy version %d cut the uplink (%s): %s", document.version, reason, undone)
            self._rolled_back[(document.version, document.sha256)] = "uplink lost"
            raise refused(f"rolled back: uplink lost: {reason}; {undone}") from None

    async def _persist(self, document: SignedDocument, payload: bytes, text: str) -> None:
        try:
            await asyncio.to_thread(self.store.save, payload)
        except OSError as exc:
            undone = await self._rollback_to_applied()
            raise Refused(
                f"could not save it at {self.store.path}: {exc.strerror or exc}; {undone}",
                document.version,
                document.sha256,
            ) from None

    async def _rollback(self, before: str | None) -> str:
        """Puts back the table as listed before the apply; says what it did."""
        try:
            await self.nft.restore(before)
        except NftError as exc:
            log.error("the previous table could not be loaded back: %s", exc)
            return await self._rollback_to_applied()
        if before is None:
            return f"table inet {self.settings.table} removed (there was none before)"
        return f"the previous table inet {self.settings.table} is back in force"

    async def _rollback_to_applied(self) -> str:
        try:
            if self.text is not None:
                await self.nft.apply(self.text)
                return f"policy version {self.applied_version} re-applied"
            await self.nft.delete_table()
            return f"table inet {self.settings.table} removed"
        except NftError as exc:
            return f"the rollback failed too: {exc}"

    def _already_applied(self, document: SignedDocument) -> bool:
        return already_applied(document, self.applied)

    def _rejected(self, refused: Refused) -> Ack:
        key = (refused.version, refused.sha256, refused.reason)
        if key == self._last_rejected:
            log.info("policy version %d rejected again: %s", refused.version, refused.reason)
        else:
            self._last_rejected = key
            log.warning("policy version %d rejected: %s", refused.version, refused.reason)
            self.events.raise_event(
                EventKind.POLICY,
                f"policy version {refused.version} rejected: {refused.reason}"[:2000],
                version=refused.version,
                sha256=refused.sha256,
                status=AckStatus.REJECTED.value,
                rolled_back=refused.reason.startswith("rolled back"),
                applied_version=self.applied_version,
            )
        return self._ack(refused.version, refused.sha256, AckStatus.REJECTED, refused.reason)

    def _ack(
        self, version: int, sha256: str | None, status: AckStatus, reason: str | None = None
    ) -> Ack:
        return make_ack("policy", version, sha256, status, reason, self.applied_version, self.clock)

    # -- counters

    async def refresh_counters(self) -> None:
        """Reads the rule counters of the table in force (logged once when it starts failing
        and once when it works again)."""
        if not self.settings.enabled or self.applied is None:
            return
        try:
            async with asyncio.timeout(COUNTERS_TIMEOUT_S):
                counters = await self.nft.counters()
        except (NftError, TimeoutError) as exc:
            if not self._counters_failing:
                log.warning("policy counters not readable: %s", exc)
                self._counters_failing = True
            return
        if self._counters_failing:
            log.info("policy counters readable again")
            self._counters_failing = False
        self.counters = [
            PolicyCounter(rule=c.rule[:128], verdict=c.verdict, packets=c.packets, bytes=c.bytes)
            for c in counters
        ]
        self.counters_ns = self.clock.wall_ns()

    # -- set members

    def element(self, set_ref: str, value: str) -> tuple[str, str]:
        """The nftables set and element text for `value` in `zone.set` of the policy in force;
        ValueError says why it does not fit."""
        from wire.policy import parse_member
        from wire.policy_nft import address_text, device_set_name

        if self.policy is None:
            raise ValueError("no network policy is in force on this gateway")
        zone_id, _, set_id = set_ref.partition(".")
        try:
            zone = self.policy.zone(zone_id)
            device_set = zone.set(set_id)
        except KeyError:
            raise ValueError(f"the policy in force has no set {set_ref!r}") from None
        member = parse_member(value)
        if isinstance(member, str):
            if device_set.macs is None:
                raise ValueError(f"set {set_ref} holds no MACs")
            return device_set_name(zone.id, device_set.id, "mac"), member
        family = "ipv6" if isinstance(member, IPv6Network) else "ipv4"
        if getattr(device_set, family) is None:
            raise ValueError(f"set {set_ref} holds no {family} addresses")
        if isinstance(member, IPv6Network):
            inside = any(member.subnet_of(prefix) for prefix in zone.ipv6)
        else:
            inside = any(member.subnet_of(prefix) for prefix in zone.ipv4)
        if zone.has_addresses and not inside:
            shown = ", ".join(map(str, getattr(zone, family))) or f"no {family} prefixes"
            raise ValueError(f"{member} is outside zone {zone.id} ({shown})")
        kind: SetKind = "v6" if isinstance(member, IPv6Network) else "v4"
        return device_set_name(zone.id, device_set.id, kind), address_text(member)

    def compile(self, policy: Policy, context: GatewayContext) -> str:
        if self._compiler is None:
            from wire.policy_nft import compile_policy

            self._compiler = compile_policy
        return self._compiler(policy, context)

    async def add_element(self, set_ref: str, value: str) -> str:
        """Adds a member to a set of the policy in force, at once and without a reload (until
        the next policy is applied, or the agent restarts)."""
        name, element = self.element(set_ref, value)
        await self.nft.add_element(name, element)
        return element

    async def delete_element(self, set_ref: str, value: str) -> bool:
        name, element = self.element(set_ref, value)
        return await self.nft.delete_element(name, element)

    async def command(self, request: CommandRequest) -> CommandResult:
        """Runs a `policy` pseudo-device command (add_element / delete_element)."""

        def result(outcome: CommandOutcome, error: str | None = None, **data: Any) -> CommandResult:
            return CommandResult(
                id=request.id,
                device=request.device,
                outcome=outcome,
                result=data,
                error=error[:4000] if error else None,
                finished_ns=self.clock.wall_ns(),
            )

        now = self.clock.wall_ns()
        if now > request.deadline_ns:
            return result(CommandOutcome.EXPIRED, "arrived after its deadline: not run")
        if request.action not in ("add_element", "delete_element"):
            return result(
                CommandOutcome.UNKNOWN_ACTION,
                f"the policy device knows add_element and delete_element, not {request.action}",
            )
        argument = request.argument
        if (
            not isinstance(argument, dict)
            or not isinstance(argument.get("set"), str)
            or not isinstance(argument.get("value"), str)
        ):
            return result(
                CommandOutcome.BAD_ARGUMENT,
                'argument must be {"set": "<zone>.<set>", "value": "<MAC or address>"}',
            )
        set_ref, value = argument["set"], argument["value"]
        try:
            if request.action == "add_element":
                element = await self.add_element(set_ref, value)
                changed = True
            else:
                element = self.element(set_ref, value)[1]
                changed = await self.delete_element(set_ref, value)
        except ValueError as exc:
            return result(CommandOutcome.BAD_ARGUMENT, str(exc))
        except NftError as exc:
            return result(CommandOutcome.DEVICE_ERROR, str(exc))
        verb = "added to" if request.action == "add_element" else "removed from"
        message = f"{element} {verb} set {set_ref}" + ("" if changed else " (was not in it)")
        log.info("policy: %s", message)
        self.events.raise_event(
            EventKind.POLICY,
            message,
            POLICY_DEVICE,
            action=request.action,
            set=set_ref,
            value=element,
            version=self.applied_version,
        )
        return result(CommandOutcome.OK, set=set_ref, value=element, changed=changed)


async def gateway_context(settings: PolicySettings, mqtt: MqttSettings) -> GatewayContext:
    """The compile context of this gateway: its table, and its broker's port and addresses
    (resolved now; a name that does not resolve gives a port-only broker rule)."""
    addresses: set[IPv6Address | IPv4Address] = set()
    try:
        addresses.add(ip_address(mqtt.host))
    except ValueError:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(5):
                found = await loop.getaddrinfo(mqtt.host, mqtt.port, type=socket.SOCK_STREAM)
        except (OSError, TimeoutError) as exc:
            log.warning("broker %s does not resolve (%s): broker rule by port only", mqtt.host, exc)
            found = []
        for _family, _type, _proto, _name, sockaddr in found:
            addresses.add(ip_address(str(sockaddr[0]).split("%")[0]))
    ordered = sorted(addresses, key=lambda a: (a.version, int(a)))
    from wire.policy_nft import GatewayContext

    return GatewayContext(settings.table, mqtt.port, tuple(ordered))
