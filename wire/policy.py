"""The network policy of a gateway: the body of a signed `policy` document.

Rules: a policy declares *zones* (where devices live: interfaces or VLANs, IPv6 prefixes, optional
legacy IPv4 ranges), *device sets* inside zones (MACs and/or addresses, changeable at run time
without a reload) and *flows* (who may open connections to whom). Everything between zones that
no flow allows is dropped; replies of allowed connections pass; the ICMPv6 that IPv6 needs
always passes. `parse_policy()` is the whole validation: the model checks each part, then
`check_policy()` checks what needs the whole document (references, overlaps, reachability) and
names every problem by its dotted field path (and YAML line when given `line_of`).

The compiler (`wire.policy_nft.compile_policy`, the same for the agent that applies and the
fleet that renders) turns a valid policy into one nftables table; see
its module for what each field becomes.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from ipaddress import IPv4Network, IPv6Network
from itertools import pairwise
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from wire.errors import Problem, WireError

#: Zone and set ids: lowercase words joined by single hyphens (no underscores: the compiler joins
#: ids with `_` to name nftables sets and chains, so names never collide).
NAME_PATTERN = r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$"
#: Endpoints of a flow that are not zones.
GATEWAY = "gateway"  # the gateway itself (its input chain; as a source, its output chain)
ANY = "any"  # any zone, any address
RESERVED = frozenset({GATEWAY, ANY})
MAX_INTERFACE = 15  # IFNAMSIZ - 1

ZoneId = Annotated[str, Field(pattern=NAME_PATTERN, max_length=24)]
SetId = Annotated[str, Field(pattern=NAME_PATTERN, max_length=24)]
FlowId = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,47}$")]
InterfaceName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")]
VlanId = Annotated[int, Field(ge=1, le=4094)]
Description = Annotated[str, Field(max_length=500)]


class PolicyError(WireError):
    """A policy body that cannot be compiled; `problems` names each field and why."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = tuple(problems)
        shown = "; ".join(str(p) for p in self.problems[:8])
        more = f" (+{len(self.problems) - 8} more)" if len(self.problems) > 8 else ""
        super().__init__(f"invalid policy: {shown}{more}")


def _fail(message: str) -> PydanticCustomError:
    return PydanticCustomError("policy", message)


# -- addresses -------------------------------------------------------------------------------------


def _network(value: Any, version: Literal[4, 6], *, host_ok: bool) -> Any:
    """An `ipaddress` network from text, with messages that say what is wrong."""
    if isinstance(value, IPv4Network | IPv6Network):
        value = str(value)
    if not isinstance(value, str):
        raise _fail("an address or prefix is written as text")
    text = value.strip()
    try:
        parsed = ipaddress.ip_network(text, strict=True)
    except ValueError:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise _fail(f"{text!r} is not an IP address or prefix") from None
        raise _fail(
            f"{text} has host bits set: the prefix is {loose}"
            + (" (a single device is written without /length)" if host_ok else "")
        ) from None
    if parsed.version != version:
        other = "IPv4" if parsed.version == 4 else "IPv6"
        field = "ipv4" if parsed.version == 4 else "ipv6"
        raise _fail(
            f"{text} is an {other} {'prefix' if '/' in text else 'address'}: put it in {field}"
        )
    if isinstance(parsed, IPv6Network) and parsed.network_address.ipv4_mapped is not None:
        raise _fail(f"{text} is an IPv4-mapped IPv6 address: write the IPv4 address in ipv4")
    if not host_ok and parsed.num_addresses == 1:
        raise _fail(f"{text} is a single address: a zone needs a prefix (e.g. a /64)")
    if parsed.is_multicast or parsed.is_unspecified or parsed.is_loopback:
        raise _fail(f"{text} is a multicast, unspecified or loopback address")
    if isinstance(parsed, IPv6Network) and parsed.subnet_of(IPv6Network("fe80::/10")):
        raise _fail(f"{text} is link-local: it never crosses the gateway")
    return parsed


def _v6_prefix(value: Any) -> Any:
    return _network(value, 6, host_ok=False)


def _v4_prefix(value: Any) -> Any:
    return _network(value, 4, host_ok=False)


def _v6_member(value: Any) -> Any:
    return _network(value, 6, host_ok=True)


def _v4_member(value: Any) -> Any:
    return _network(value, 4, host_ok=True)


ZonePrefix6 = Annotated[IPv6Network, BeforeValidator(_v6_prefix)]
ZonePrefix4 = Annotated[IPv4Network, BeforeValidator(_v4_prefix)]
Member6 = Annotated[IPv6Network, BeforeValidator(_v6_member)]
Member4 = Annotated[IPv4Network, BeforeValidator(_v4_member)]

_MAC = re.compile(r"^[0-9a-f]{2}([:-])[0-9a-f]{2}(\1[0-9a-f]{2}){4}$")


def normalise_mac(value: Any) -> str:
    """`aa:bb:cc:dd:ee:ff` (lowercase, colons) from colon or hyphen notation; a device's own
    (unicast, non-zero) address only."""
    if not isinstance(value, str) or not _MAC.match(value.strip().lower()):
        raise _fail(f"{value!r} is not a MAC address like 02:1a:2b:3c:4d:5e")
    mac = value.strip().lower().replace("-", ":")
    if int(mac[:2], 16) & 1:
        raise _fail(f"{mac} is a multicast MAC address, not a device's")
    if mac == "00:00:00:00:00:00":
        raise _fail("00:00:00:00:00:00 is not a device's MAC address")
    return mac


Mac = Annotated[str, BeforeValidator(normalise_mac)]


def parse_member(value: str) -> str | IPv6Network | IPv4Network:
    """A set member given as text: a MAC (normalised), or an IPv6 or IPv4 address or prefix.
    ValueError says what is wrong."""
    text = value.strip()
    if _MAC.match(text.lower()):
        return str(normalise_mac(text))
    version: Literal[4, 6] = 6 if ":" in text else 4
    network: IPv6Network | IPv4Network = _network(text, version, host_ok=True)
    return network


def _unique(values: list[Any], what: str) -> list[Any]:
    seen: set[Any] = set()
    for value in values:
        if value in seen:
            raise _fail(f"{what} {value} is listed twice")
        seen.add(value)
    return values


def _no_overlaps(networks: list[Any], what: str) -> list[Any]:
    ordered = sorted(networks, key=lambda n: (n.network_address, n.prefixlen))
    for first, second in pairwise(ordered):
        if first.overlaps(second):
            raise _fail(f"{what} {first} and {second} overlap")
    return networks


# -- the model ------------------------------------------------------------------------------------


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DeviceSet(_Part):
    """Named devices of a zone. A set restricts by what it *declares*: `macs` (even empty) makes
    the source MAC count, `ipv6`/`ipv4` make the source (or destination) address of that family
    count, and a set that declares addresses of one family only never matches the other family.
    Members change at run time with `nft add element` (the agent's `add_element`); the lists here
    are the members a (re)load starts with. Addresses may be single devices or prefixes."""

    id: SetId
    description: Description | None = None
    macs: Annotated[list[Mac], AfterValidator(lambda v: _unique(v, "MAC"))] | None = None
    ipv6: Annotated[list[Member6], AfterValidator(lambda v: _unique(v, "address"))] | None = None
    ipv4: Annotated[list[Member4], AfterValidator(lambda v: _unique(v, "address"))] | None = None

    @model_validator(mode="after")
    def _declares_something(self) -> DeviceSet:
        if self.macs is None and self.ipv6 is None and self.ipv4 is None:
            raise _fail(
                "a set declares macs, ipv6 and/or ipv4 (an empty list is fine: members can be "
                "added later)"
            )
        return self

    @property
    def has_addresses(self) -> bool:
        return self.ipv6 is not None or self.ipv4 is not None


class Addressing(StrEnum):
    """How hosts of a zone get their IPv6 addresses (RAs come from the gateway in both cases)."""

    SLAAC = "slaac"  # from the RA's /64 prefix: the prefix must be a /64
    DHCPV6 = "dhcpv6"  # from the gateway's DHCPv6 server: DHCPv6 to the gateway is allowed
    STATIC = "static"  # configured by hand


class Zone(_Part):
    """Where devices live. Traffic belongs to a zone when it arrives on one of the zone's
    interfaces (`interfaces`, and `{vlan_parent}.{vid}` for each of `vlans`); a zone without
    interfaces is recognised by source address alone. A zone that declares addresses (`ipv6`
    and/or `ipv4`) accepts only sources inside them (anti-spoofing; a zone with IPv6 prefixes
    only is IPv6-only); one without addresses (e.g. the uplink) accepts any source, and as a
    destination means "out of its interfaces, into no other zone's addresses". `admit` names one
    of the zone's sets: only its members may send anything to or through the gateway (the
    essential ICMPv6 excepted)."""

    id: ZoneId
    description: Description | None = None
    interfaces: Annotated[
        list[InterfaceName], AfterValidator(lambda v: _unique(v, "interface"))
    ] = []
    vlans: Annotated[list[VlanId], AfterValidator(lambda v: _unique(v, "VLAN"))] = []
    ipv6: Annotated[list[ZonePrefix6], AfterValidator(lambda v: _no_overlaps(v, "prefixes"))] = []
    addressing: Addressing = Addressing.SLAAC
    ipv4: Annotated[list[ZonePrefix4], AfterValidator(lambda v: _no_overlaps(v, "ranges"))] = []
    dhcp4: bool = Field(False, description="legacy devices get IPv4 from the gateway's DHCP server")
    sets: list[DeviceSet] = []
    admit: SetId | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Zone:
        if self.id in RESERVED:
            raise _fail(f"{self.id!r} is reserved (a flow endpoint), not a zone id")
        if not (self.interfaces or self.vlans or self.ipv6 or self.ipv4):
            raise _fail("a zone needs interfaces, vlans or address prefixes (ipv6/ipv4)")
        if self.addressing is Addressing.SLAAC:
            for prefix in self.ipv6:
                if prefix.prefixlen != 64:
                    raise _fail(
                        f"SLAAC needs /64 prefixes, {prefix} is a /{prefix.prefixlen} "
                        "(or set addressing: dhcpv6 or static)"
                    )
        if self.addressing is Addressing.DHCPV6 and not self.ipv6:
            raise _fail("addressing dhcpv6 needs at least one ipv6 prefix")
        if self.dhcp4 and not self.ipv4:
            raise _fail("dhcp4 needs at least one ipv4 range")
        if (self.addressing is Addressing.DHCPV6 or self.dhcp4) and not self.on_link:
            raise _fail("DHCP needs the zone on the gateway's links: give interfaces or vlans")
        _unique([s.id for s in self.sets], "set id")
        if self.admit is not None and self.admit not in {s.id for s in self.sets}:
            known = ", ".join(s.id for s in self.sets) or "none"
            raise _fail(f"admit names set {self.admit!r}, which this zone lacks (sets: {known})")
        return self

    @property
    def on_link(self) -> bool:
        return bool(self.interfaces or self.vlans)

    @property
    def has_addresses(self) -> bool:
        return bool(self.ipv6 or self.ipv4)

    def set(self, set_id: str) -> DeviceSet:
        for device_set in self.sets:
            if device_set.id == set_id:
                return device_set
        raise KeyError(set_id)


_PORT_RANGE = re.compile(r"^(\d{1,5})-(\d{1,5})$")


def _port(value: Any) -> Any:
    if isinstance(value, bool):
        raise _fail("a port is a number 1-65535 or a range 'low-high'")
    if isinstance(value, int):
        if not 1 <= value <= 65535:
            raise _fail(f"port {value} is outside 1-65535")
        return value
    if isinstance(value, str):
        if value.isdigit():
            return _port(int(value))
        match = _PORT_RANGE.match(value.replace(" ", ""))
        if match:
            low, high = int(match[1]), int(match[2])
            if not (1 <= low < high <= 65535):
                raise _fail(f"port range {value} needs 1 <= low < high <= 65535")
            return f"{low}-{high}"
    raise _fail(f"{value!r} is not a port (1-65535) or a range 'low-high'")


Port = Annotated[int | str, BeforeValidator(_port)]


def port_bounds(port: int | str) -> tuple[int, int]:
    if isinstance(port, int):
        return port, port
    low, high = port.split("-")
    return int(low), int(high)


class Limit(_Part):
    """At most `rate` new connections per `per` (a burst of `burst` first), per flow; the rest
    are dropped and counted by the zone chain's final drop."""

    rate: Annotated[int, Field(ge=1, le=1_000_000)]
    per: Literal["second", "minute", "hour", "day"] = "second"
    burst: Annotated[int, Field(ge=1, le=1_000_000)] | None = None


Endpoint = Annotated[
    str, Field(pattern=r"^[a-z][a-z0-9]*(-[a-z0-9]+)*(\.[a-z][a-z0-9]*(-[a-z0-9]+)*)?$")
]


@dataclass(frozen=True, slots=True)
class EndpointRef:
    """A parsed flow endpoint: `gateway`, `any`, a zone, or `zone.set`."""

    zone: str
    set: str | None = None

    @property
    def is_gateway(self) -> bool:
        return self.zone == GATEWAY and self.set is None

    @property
    def is_any(self) -> bool:
        return self.zone == ANY and self.set is None

    def __str__(self) -> str:
        return self.zone if self.set is None else f"{self.zone}.{self.set}"


def endpoint(text: str) -> EndpointRef:
    zone, _, set_id = text.partition(".")
    return EndpointRef(zone, set_id or None)


class Flow(_Part):
    """Connections `from` may open to `to` (replies always pass). Endpoints: a zone id, `zone.set`,
    `gateway` (the gateway itself) or `any`. `protocol` `any` allows every protocol; `ports`
    (destination ports, numbers or 'low-high') need tcp or udp and default to all. `family`
    narrows a flow to IPv6 or IPv4; `both_ways` also allows `to` → `from`. The rule's nftables
    comment is `flow:<id>`, which is how its counter is found."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    id: FlowId
    description: Description | None = None
    from_: Endpoint = Field(alias="from")
    to: Endpoint
    protocol: Literal["tcp", "udp", "icmp", "icmpv6", "any"]
    ports: list[Port] = []
    family: Literal["ipv6", "ipv4"] | None = None
    both_ways: bool = False
    limit: Limit | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Flow:
        if self.ports and self.protocol not in ("tcp", "udp"):
            raise _fail(f"ports need protocol tcp or udp, not {self.protocol}")
        bounds = sorted(port_bounds(p) for p in self.ports)
        for (low1, high1), (low2, high2) in pairwise(bounds):
            if low2 <= high1:
                first = str(low1) if low1 == high1 else f"{low1}-{high1}"
                second = str(low2) if low2 == high2 else f"{low2}-{high2}"
                raise _fail(f"ports {first} and {second} overlap")
        if (self.protocol, self.family) in (("icmp", "ipv6"), ("icmpv6", "ipv4")):
            raise _fail(f"protocol {self.protocol} cannot be family {self.family}")
        if self.source.is_gateway and self.destination.is_gateway:
            raise _fail("from and to are both the gateway")
        for ref in (self.source, self.destination):
            if ref.set is not None and ref.zone in RESERVED:
                raise _fail(f"{ref}: {ref.zone} has no sets")
        return self

    @property
    def source(self) -> EndpointRef:
        return endpoint(self.from_)

    @property
    def destination(self) -> EndpointRef:
        return endpoint(self.to)

    @property
    def families(self) -> tuple[str, ...]:
        """The IP families this flow may carry, from `family` and `protocol` alone."""
        if self.protocol == "icmp":
            return ("ipv4",)
        if self.protocol == "icmpv6":
            return ("ipv6",)
        if self.family is not None:
            return (self.family,)
        return ("ipv6", "ipv4")


class Policy(_Part):
    """The body of a signed `policy` document. See the module and the README's worked example.

    `site_prefixes` is the site's IPv6 plan (a ULA `fdXX:…/48` and/or a delegated prefix); when
    given, every zone prefix lies inside one. `restrict_output` also filters what the gateway
    itself sends (then flows `from: gateway` say what it may open; the agent's own connection to
    its broker stays allowed unless `allow_broker` is false). `ping_gateway` lets every zone ping
    the gateway (rate limited). `enforce: false` removes the agent's table altogether."""

    description: Description | None = None
    enforce: bool = True
    site_prefixes: Annotated[
        list[Annotated[IPv6Network, BeforeValidator(_v6_prefix)]],
        AfterValidator(lambda v: _no_overlaps(v, "site prefixes")),
    ] = []
    vlan_parent: InterfaceName = "eth0"
    zones: list[Zone] = []
    flows: list[Flow] = []
    restrict_output: bool = False
    allow_broker: bool = True
    ping_gateway: bool = True

    def zone(self, zone_id: str) -> Zone:
        for zone in self.zones:
            if zone.id == zone_id:
                return zone
        raise KeyError(zone_id)

    def interfaces(self, zone: Zone) -> list[str]:
        """The zone's interface names, VLANs included, sorted."""
        return sorted({*zone.interfaces, *(f"{self.vlan_parent}.{vid}" for vid in zone.vlans)})


# -- whole-document checks -----------------------------------------------------------------------

LineOf = Callable[[tuple[str | int, ...]], int | None]


def check_policy(
    policy: Policy, line_of: LineOf | None = None, prefix: tuple[str | int, ...] = ()
) -> list[Problem]:
    """Problems that need the whole policy to find: ids used twice, interfaces or prefixes in two
    zones, prefixes outside the site plan, set members outside their zone, flows that reference
    unknown zones or sets, or that can never match."""
    problems: list[Problem] = []

    def problem(message: str, *path: str | int) -> None:
        full = (*prefix, *path)
        problems.append(
            Problem(".".join(map(str, full)), message, line_of(full) if line_of else None)
        )

    zones: dict[str, tuple[int, Zone]] = {}
    for index, zone in enumerate(policy.zones):
        if zone.id in zones:
            problem(
                f"zone id {zone.id!r} is used twice (first at zones.{zones[zone.id][0]})",
                "zones",
                index,
                "id",
            )
        else:
            zones[zone.id] = (index, zone)

    owners: dict[str, str] = {}
    for index, zone in enumerate(policy.zones):
        for vid in zone.vlans:
            name = f"{policy.vlan_parent}.{vid}"
            if len(name) > MAX_INTERFACE:
                problem(
                    f"VLAN interface {name} is longer than {MAX_INTERFACE} characters",
                    "zones",
                    index,
                    "vlans",
                )
        for name in policy.interfaces(zone):
            if name in owners and owners[name] != zone.id:
                problem(
                    f"interface {name} is also in zone {owners[name]!r}",
                    "zones",
                    index,
                    "interfaces",
                )
            owners.setdefault(name, zone.id)

    for family in ("ipv6", "ipv4"):
        seen: list[tuple[Any, str]] = []
        for index, zone in enumerate(policy.zones):
            for number, net in enumerate(getattr(zone, family)):
                for other, owner in seen:
                    if owner != zone.id and net.overlaps(other):
                        problem(
                            f"{net} overlaps {other} of zone {owner!r}",
                            "zones",
                            index,
                            family,
                            number,
                        )
                seen.append((net, zone.id))

    if policy.site_prefixes:
        for index, zone in enumerate(policy.zones):
            for number, net in enumerate(zone.ipv6):
                if not any(net.subnet_of(site) for site in policy.site_prefixes):
                    plan = ", ".join(map(str, policy.site_prefixes))
                    problem(
                        f"{net} is outside the site prefixes ({plan})",
                        "zones",
                        index,
                        "ipv6",
                        number,
                    )

    for index, zone in enumerate(policy.zones):
        for number, device_set in enumerate(zone.sets):
            if device_set.macs is not None and not zone.on_link:
                problem(
                    "MACs are only seen on the gateway's own links: the zone needs "
                    "interfaces or vlans",
                    "zones",
                    index,
                    "sets",
                    number,
                    "macs",
                )
            for family in ("ipv6", "ipv4"):
                members = getattr(device_set, family)
                if members is None or not zone.has_addresses:
                    continue
                ranges = getattr(zone, family)
                if not ranges:
                    problem(
                        f"zone {zone.id!r} has no {family} prefixes, so these members can "
                        "never send or receive",
                        "zones",
                        index,
                        "sets",
                        number,
                        family,
                    )
                    continue
                for position, member in enumerate(members):
                    if not any(member.subnet_of(r) for r in ranges):
                        problem(
                            f"{member} is outside zone {zone.id!r} ({', '.join(map(str, ranges))})",
                            "zones",
                            index,
                            "sets",
                            number,
                            family,
                            position,
                        )

    flows: dict[str, int] = {}
    for index, flow in enumerate(policy.flows):
        if flow.id in flows:
            problem(
                f"flow id {flow.id!r} is used twice (first at flows.{flows[flow.id]})",
                "flows",
                index,
                "id",
            )
        flows.setdefault(flow.id, index)
        resolved = True
        for field, ref in (("from", flow.source), ("to", flow.destination)):
            if ref.zone in RESERVED:
                continue
            if ref.zone not in zones:
                known = ", ".join(sorted(zones)) or "none"
                problem(
                    f"unknown zone {ref.zone!r} (zones: {known}; or gateway, any)",
                    "flows",
                    index,
                    field,
                )
                resolved = False
                continue
            zone = zones[ref.zone][1]
            if ref.set is not None:
                try:
                    device_set = zone.set(ref.set)
                except KeyError:
                    known = ", ".join(s.id for s in zone.sets) or "none"
                    problem(
                        f"zone {zone.id!r} has no set {ref.set!r} (sets: {known})",
                        "flows",
                        index,
                        field,
                    )
                    resolved = False
                    continue
                if field == "to" and not device_set.has_addresses:
                    problem(
                        f"set {ref} has MACs only and cannot be a destination (the "
                        "gateway does not know a destination's MAC when it filters): "
                        "give it ipv6/ipv4 members",
                        "flows",
                        index,
                        field,
                    )
                    resolved = False
        if flow.source.is_gateway and not policy.restrict_output:
            problem(
                "flows from the gateway need restrict_output: true (otherwise the "
                "gateway may open anything already)",
                "flows",
                index,
                "from",
            )
        if flow.both_ways and flow.destination.is_gateway and not policy.restrict_output:
            problem(
                "both_ways to the gateway needs restrict_output: true", "flows", index, "both_ways"
            )
        if resolved and not _families(policy, flow):
            problem(
                "this flow can never match: its endpoints and family/protocol share no IP family",
                "flows",
                index,
            )
    return problems


def _families(policy: Policy, flow: Flow) -> list[str]:
    return [f for f in flow.families if all(_carries(policy, ref, f) for ref in _refs(flow))]


def _refs(flow: Flow) -> Iterator[EndpointRef]:
    yield flow.source
    yield flow.destination


def _carries(policy: Policy, ref: EndpointRef, family: str) -> bool:
    """Whether an endpoint can send or receive packets of `family`."""
    if ref.zone in RESERVED:
        return True
    zone = policy.zone(ref.zone)
    if zone.has_addresses and not getattr(zone, family):
        return False
    if ref.set is None:
        return True
    device_set = zone.set(ref.set)
    return not device_set.has_addresses or getattr(device_set, family) is not None


def parse_policy(
    data: Any, line_of: LineOf | None = None, prefix: tuple[str | int, ...] = ()
) -> Policy:
    """A valid policy, or `PolicyError` naming every problem (with YAML lines via `line_of`)."""
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            full = (*prefix, *err["loc"])
            problems.append(
                Problem(
                    ".".join(map(str, full)),
                    err["msg"],
                    line_of(tuple(full)) if line_of else None,
                )
            )
        raise PolicyError(problems) from None
    problems = check_policy(policy, line_of, prefix)
    if problems:
        raise PolicyError(problems)
    return policy
