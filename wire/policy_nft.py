"""Compiles a policy into one nftables `inet` table: a pure function, same input → same bytes.

Rules: the text replaces the agent's table as a whole (`table inet T {}` creates it when absent,
`delete table inet T` removes it with its sets and chain policies, then the full definition), so
one `nft -f` applies it in one transaction and never touches another table. Order never depends
on input order where it carries no meaning: sets, zones, flows, interfaces, ports and set
elements are sorted. Each zone has an `input_<zone>` and a `forward_<zone>` chain (admission,
anti-spoofing, its flows, a counted drop); the base chains send packets there by interface, or by
source address for zones without interfaces (checked first, except on the interfaces of zones
with addresses, where such a source is a spoof). Every rule has a counter; the rules the state
reports carry a comment:

| comment | rule |
|---|---|
| `flow:<id>` | accepts of a flow (every rule of the flow, both directions) |
| `zone:<zone>` | sends a zone's traffic to its chain (`input_<zone>`, `forward_<zone>`) |
| `admit:<zone>` | drops senders outside the zone's `admit` set |
| `spoof:<zone>` | drops sources outside the zone's addresses (or of a family it lacks) |
| `drop:<chain>` | the final drop of every chain, e.g. `drop:forward:cameras` |
| `established`, `invalid`, `loopback`, `broker` | what they say |
| `icmpv6-nd`, `icmpv6-mld`, `icmpv6-errors`, `icmpv6-echo`, `icmp-echo` | the essential ICMP |
| `dhcpv6:<zone>`, `dhcp4:<zone>` (input), `dhcpv6`, `dhcp4` (output) | the gateway's DHCP |

ICMPv6 that always passes (RFC 4890): neighbour discovery and router solicitation/advertisement
with hop limit 255 (nothing routed can forge it), MLD from link-local sources (switches with MLD
snooping stop delivering neighbour solicitations to hosts that do not report), and the error
messages — packet-too-big above all, or path MTU discovery breaks. Echo requests reach the gateway
itself (rate limited, `ping_gateway`): the first tool of whoever troubleshoots a classroom; between
zones they are a scanning tool and need a flow like any other traffic.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Literal

from wire.policy import (
    Addressing,
    DeviceSet,
    EndpointRef,
    Flow,
    Policy,
    Zone,
    port_bounds,
)

TABLE_PATTERN = r"^[a-z][a-z0-9_]{0,31}$"
DEFAULT_TABLE = "campus_iot"
Family = Literal["ipv6", "ipv4"]
SetKind = Literal["mac", "v6", "v4"]

ND_TYPES = "nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert"
MLD_TYPES = "mld-listener-query, mld-listener-report, mld-listener-done, mld2-listener-report"
ERROR_TYPES = "destination-unreachable, packet-too-big, time-exceeded, parameter-problem"
PING_LIMIT = "limit rate 10/second burst 20 packets"
LINK_LOCAL = "fe80::/10"


@dataclass(frozen=True, slots=True)
class GatewayContext:
    """What the compiler needs to know about the gateway beyond the policy: the table it owns,
    and where its broker is (for the `broker` rule of `restrict_output`; without a port the rule
    is left out, without addresses it allows the port to any address)."""

    table: str = DEFAULT_TABLE
    broker_port: int | None = None
    broker_addresses: tuple[IPv6Address | IPv4Address, ...] = ()

    def __post_init__(self) -> None:
        if not re.match(TABLE_PATTERN, self.table):
            raise ValueError(f"table name {self.table!r} must match {TABLE_PATTERN}")
        if self.broker_port is not None and not 1 <= self.broker_port <= 65535:
            raise ValueError(f"broker port {self.broker_port} is outside 1-65535")


def zone_set_name(zone: str, family: Family) -> str:
    return f"zone_{zone}_{'v6' if family == 'ipv6' else 'v4'}"


def device_set_name(zone: str, set_id: str, kind: SetKind) -> str:
    """The nftables set holding one kind of member of a device set (what `add_element` uses)."""
    return f"dev_{zone}_{set_id}_{kind}"


def compile_policy(policy: Policy, context: GatewayContext) -> str:
    """The nftables text that replaces the agent's table with `policy`. The policy must come
    from `wire.policy.parse_policy` (references resolved, overlaps refused)."""
    table = context.table
    head = f"table inet {table} {{}}\ndelete table inet {table}\n"
    if not policy.enforce:
        return (
            f"# campus-iot network policy: enforcement is off, table inet {table} is removed.\n"
            + head
        )
    blocks = [*_limits(policy), *_sets(policy), *_Chains(policy, context).blocks()]
    body = "\n\n".join(blocks)
    return (
        f"# campus-iot network policy, compiled: the agent replaces table inet {table} "
        "as a whole.\n" + head + f"table inet {table} {{\n{body}\n}}\n"
    )


# -- objects ---------------------------------------------------------------------------------------


def _limits(policy: Policy) -> Iterator[str]:
    for flow in sorted(policy.flows, key=lambda f: f.id):
        if flow.limit is None:
            continue
        burst = f" burst {flow.limit.burst} packets" if flow.limit.burst is not None else ""
        yield (
            f"\tlimit {_limit_name(flow)} {{\n"
            f"\t\trate {flow.limit.rate}/{flow.limit.per}{burst}\n"
            "\t}"
        )


def _limit_name(flow: Flow) -> str:
    return f"limit_{flow.id}"


def _sets(policy: Policy) -> Iterator[str]:
    named: dict[str, str] = {}
    for zone in policy.zones:
        if zone.ipv6:
            named[zone_set_name(zone.id, "ipv6")] = _address_set("ipv6_addr", zone.ipv6)
        if zone.ipv4:
            named[zone_set_name(zone.id, "ipv4")] = _address_set("ipv4_addr", zone.ipv4)
        for device_set in zone.sets:
            if device_set.macs is not None:
                named[device_set_name(zone.id, device_set.id, "mac")] = _mac_set(device_set.macs)
            if device_set.ipv6 is not None:
                named[device_set_name(zone.id, device_set.id, "v6")] = _address_set(
                    "ipv6_addr", device_set.ipv6
                )
            if device_set.ipv4 is not None:
                named[device_set_name(zone.id, device_set.id, "v4")] = _address_set(
                    "ipv4_addr", device_set.ipv4
                )
    for name in sorted(named):
        yield f"\tset {name} {{\n{named[name]}\t}}"


def _address_set(kind: str, networks: Iterable[IPv6Network | IPv4Network]) -> str:
    ordered = sorted(networks, key=lambda n: (n.network_address, n.prefixlen))
    elements = [address_text(n) for n in ordered]
    return f"\t\ttype {kind}\n\t\tflags interval\n\t\tauto-merge\n{_elements(elements)}"


def _mac_set(macs: Iterable[str]) -> str:
    return f"\t\ttype ether_addr\n{_elements(sorted(macs))}"


def _elements(elements: list[str]) -> str:
    if not elements:
        return ""
    if len(elements) == 1:
        return f"\t\telements = {{ {elements[0]} }}\n"
    lines = "".join(f"\t\t\t{element},\n" for element in elements)
    return f"\t\telements = {{\n{lines}\t\t}}\n"


def address_text(network: IPv6Network | IPv4Network) -> str:
    """A single address without its /128 or /32, a prefix with its length."""
    if network.num_addresses == 1:
        return str(network.network_address)
    return str(network)


# -- rules -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Side:
    """The matches of one end of a flow: family-independent ones, then per family (None: the
    end cannot be of that family)."""

    common: tuple[str, ...] = ()
    ipv6: tuple[str, ...] | None = ()
    ipv4: tuple[str, ...] | None = ()

    def family(self, family: Family) -> tuple[str, ...] | None:
        return self.ipv6 if family == "ipv6" else self.ipv4


def _names(names: list[str]) -> str:
    quoted = [f'"{name}"' for name in names]
    return quoted[0] if len(quoted) == 1 else "{ " + ", ".join(quoted) + " }"


def _ports(flow: Flow) -> str:
    ordered = sorted(flow.ports, key=port_bounds)
    texts = [str(p) for p in ordered]
    return texts[0] if len(texts) == 1 else "{ " + ", ".join(texts) + " }"


def _protocol(flow: Flow) -> tuple[str, ...]:
    if flow.protocol in ("tcp", "udp"):
        if flow.ports:
            return (f"{flow.protocol} dport {_ports(flow)}",)
        return (f"meta l4proto {flow.protocol}",)
    if flow.protocol == "icmp":
        return ("meta l4proto icmp",)
    if flow.protocol == "icmpv6":
        return ("meta l4proto ipv6-icmp",)
    return ()


_IP = {"ipv6": "ip6", "ipv4": "ip"}
#: Selects flow directions by (source, destination).
_Where = Callable[[EndpointRef, EndpointRef], bool]


@dataclass
class _Chains:
    policy: Policy
    context: GatewayContext
    zones: list[Zone] = field(init=False)

    def __post_init__(self) -> None:
        self.zones = sorted(self.policy.zones, key=lambda z: z.id)

    def blocks(self) -> Iterator[str]:
        for zone in self.zones:
            yield self._chain(f"input_{zone.id}", None, self._zone_input(zone))
        yield self._chain("input", "input", self._input())
        for zone in self.zones:
            yield self._chain(f"forward_{zone.id}", None, self._zone_forward(zone))
        yield self._chain("forward", "forward", self._forward())
        if self.policy.restrict_output:
            yield self._chain("output", "output", self._output())

    @staticmethod
    def _chain(name: str, hook: str | None, rules: Iterable[str]) -> str:
        lines = [f"\tchain {name} {{"]
        if hook is not None:
            lines.append(f"\t\ttype filter hook {hook} priority filter; policy drop;")
        lines += [f"\t\t{rule}" for rule in rules]
        lines.append("\t}")
        return "\n".join(lines)

    # -- base chains

    def _input(self) -> Iterator[str]:
        yield 'iif "lo" counter accept comment "loopback"'
        yield from self._stateful()
        if self.policy.ping_gateway:
            yield f'icmpv6 type echo-request {PING_LIMIT} counter accept comment "icmpv6-echo"'
            yield f'icmp type echo-request {PING_LIMIT} counter accept comment "icmp-echo"'
        yield from self._dispatch("input")
        yield from self._flow_rules(lambda s, d: s.is_any and d.is_gateway)
        yield 'counter drop comment "drop:input"'

    def _forward(self) -> Iterator[str]:
        yield 'ct state established,related counter accept comment "established"'
        yield f'icmpv6 type {{ {ERROR_TYPES} }} counter accept comment "icmpv6-errors"'
        yield 'ct state invalid counter drop comment "invalid"'
        yield from self._dispatch("forward")
        yield from self._flow_rules(lambda s, d: s.is_any and not d.is_gateway)
        yield 'counter drop comment "drop:forward"'

    def _output(self) -> Iterator[str]:
        yield 'oif "lo" counter accept comment "loopback"'
        yield 'ct state established,related counter accept comment "established"'
        yield (f'icmpv6 type {{ {ND_TYPES} }} ip6 hoplimit 255 counter accept comment "icmpv6-nd"')
        yield f'icmpv6 type {{ {MLD_TYPES} }} counter accept comment "icmpv6-mld"'
        yield f'icmpv6 type {{ {ERROR_TYPES} }} counter accept comment "icmpv6-errors"'
        yield 'ct state invalid counter drop comment "invalid"'
        if any(z.addressing is Addressing.DHCPV6 for z in self.zones):
            yield 'udp sport 547 udp dport 546 counter accept comment "dhcpv6"'
        if any(z.dhcp4 for z in self.zones):
            yield 'meta nfproto ipv4 udp sport 67 udp dport 68 counter accept comment "dhcp4"'
        yield from self._broker()
        yield from self._flow_rules(lambda s, d: s.is_gateway)
        yield 'counter drop comment "drop:output"'

    def _stateful(self) -> Iterator[str]:
        yield 'ct state established,related counter accept comment "established"'
        yield (f'icmpv6 type {{ {ND_TYPES} }} ip6 hoplimit 255 counter accept comment "icmpv6-nd"')
        yield (
            f"icmpv6 type {{ {MLD_TYPES} }} ip6 saddr {LINK_LOCAL} counter accept "
            'comment "icmpv6-mld"'
        )
        yield f'icmpv6 type {{ {ERROR_TYPES} }} counter accept comment "icmpv6-errors"'
        yield 'ct state invalid counter drop comment "invalid"'

    def _broker(self) -> Iterator[str]:
        port = self.context.broker_port
        if not self.policy.allow_broker or port is None:
            return
        tail = f'tcp dport {port} counter accept comment "broker"'
        addresses = sorted(self.context.broker_addresses, key=lambda a: (a.version, a))
        if not addresses:
            yield tail
            return
        for version, ip in ((6, "ip6"), (4, "ip")):
            chosen = [str(a) for a in addresses if a.version == version]
            if chosen:
                listed = chosen[0] if len(chosen) == 1 else "{ " + ", ".join(chosen) + " }"
                yield f"{ip} daddr {listed} {tail}"

    def _dispatch(self, hook: str) -> Iterator[str]:
        """Sends each packet to the chain of its zone. Zones known by address alone come first
        (they are often reached through a zone without addresses, like the uplink), except on
        interfaces of zones that declare addresses: there a foreign source is a spoof."""
        guarded = sorted(
            {
                name
                for z in self.zones
                if z.on_link and z.has_addresses
                for name in self.policy.interfaces(z)
            }
        )
        guard = f"iifname != {_names(guarded)} " if guarded else ""
        for zone in self.zones:
            if zone.on_link:
                continue
            for family in ("ipv6", "ipv4"):
                if getattr(zone, family):
                    yield (
                        f"{guard}{_IP[family]} saddr @{zone_set_name(zone.id, family)} counter "
                        f'jump {hook}_{zone.id} comment "zone:{zone.id}"'
                    )
        for zone in self.zones:
            if zone.on_link:
                interfaces = _names(self.policy.interfaces(zone))
                yield f'iifname {interfaces} counter jump {hook}_{zone.id} comment "zone:{zone.id}"'

    # -- zone chains

    def _zone_input(self, zone: Zone) -> Iterator[str]:
        yield from self._admission(zone, link_local_ok=True)
        if zone.addressing is Addressing.DHCPV6:
            yield (
                f"udp sport 546 udp dport 547 ip6 saddr {LINK_LOCAL} counter accept "
                f'comment "dhcpv6:{zone.id}"'
            )
        if zone.dhcp4:
            yield (
                "meta nfproto ipv4 udp sport 68 udp dport 67 counter accept "
                f'comment "dhcp4:{zone.id}"'
            )
        yield from self._spoofing(zone, link_local_ok=True)
        yield from self._flow_rules(
            lambda s, d: (s.zone == zone.id or s.is_any) and d.is_gateway, origin=zone
        )
        yield f'counter drop comment "drop:input:{zone.id}"'

    def _zone_forward(self, zone: Zone) -> Iterator[str]:
        yield from self._admission(zone, link_local_ok=False)
        yield from self._spoofing(zone, link_local_ok=False)
        yield from self._flow_rules(
            lambda s, d: (s.zone == zone.id or s.is_any) and not d.is_gateway, origin=zone
        )
        yield f'counter drop comment "drop:forward:{zone.id}"'

    def _admission(self, zone: Zone, *, link_local_ok: bool) -> Iterator[str]:
        if zone.admit is None:
            return
        device_set = zone.set(zone.admit)
        comment = f'counter drop comment "admit:{zone.id}"'
        if device_set.macs is not None:
            name = device_set_name(zone.id, device_set.id, "mac")
            yield f"ether saddr != @{name} {comment}"
        if device_set.has_addresses:
            yield from _outside(
                comment,
                device_set_name(zone.id, device_set.id, "v6")
                if device_set.ipv6 is not None
                else None,
                device_set_name(zone.id, device_set.id, "v4")
                if device_set.ipv4 is not None
                else None,
                link_local_ok,
            )

    def _spoofing(self, zone: Zone, *, link_local_ok: bool) -> Iterator[str]:
        if not zone.on_link or not zone.has_addresses:
            return  # an address-only zone is recognised by its addresses already
        yield from _outside(
            f'counter drop comment "spoof:{zone.id}"',
            zone_set_name(zone.id, "ipv6") if zone.ipv6 else None,
            zone_set_name(zone.id, "ipv4") if zone.ipv4 else None,
            link_local_ok,
        )

    # -- flows

    def _flow_rules(
        self,
        where: _Where,
        origin: Zone | None = None,
    ) -> Iterator[str]:
        """The rules of every flow direction that `where(source, destination)` selects, in flow
        id order; `origin` is the zone whose chain they go in (None: a base chain)."""
        for flow in sorted(self.policy.flows, key=lambda f: f.id):
            directions = [(flow.source, flow.destination)]
            if flow.both_ways:
                directions.append((flow.destination, flow.source))
            for source, destination in directions:
                if where(source, destination):
                    yield from self._rules(flow, source, destination, origin)

    def _rules(
        self, flow: Flow, source: EndpointRef, destination: EndpointRef, origin: Zone | None
    ) -> Iterator[str]:
        src = self._source(source, origin)
        dst = self._destination(destination)
        tail = [*_protocol(flow)]
        if flow.limit is not None:
            tail.append(f'limit name "{_limit_name(flow)}"')
        tail.append(f'counter accept comment "flow:{flow.id}"')
        families: list[Family] = [
            f
            for f in ("ipv6", "ipv4")
            if f in flow.families and src.family(f) is not None and dst.family(f) is not None
        ]
        common = [*src.common, *dst.common]
        if len(families) == 2 and not any((src.ipv6, src.ipv4, dst.ipv6, dst.ipv4)):
            yield " ".join([*common, *tail])
            return
        for family in families:
            by_family = [*(src.family(family) or ()), *(dst.family(family) or ())]
            if not by_family:
                by_family = [f"meta nfproto {family}"]
                yield " ".join([*by_family, *common, *tail])
            else:
                yield " ".join([*common, *by_family, *tail])

    def _source(self, ref: EndpointRef, origin: Zone | None) -> _Side:
        """Source matches inside the origin zone's chain (which has checked the zone already)."""
        if ref.is_any or ref.is_gateway:
            zone = origin
            if zone is None:
                return _Side()
            return _Side(
                ipv6=() if _carries(zone, "ipv6") else None,
                ipv4=() if _carries(zone, "ipv4") else None,
            )
        zone = self.policy.zone(ref.zone)
        if ref.set is None:
            return _Side(
                ipv6=() if _carries(zone, "ipv6") else None,
                ipv4=() if _carries(zone, "ipv4") else None,
            )
        device_set = zone.set(ref.set)
        common: tuple[str, ...] = ()
        if device_set.macs is not None:
            common = (f"ether saddr @{device_set_name(zone.id, device_set.id, 'mac')}",)
        return _Side(
            common,
            _member_match(zone, device_set, "ipv6", "saddr"),
            _member_match(zone, device_set, "ipv4", "saddr"),
        )

    def _destination(self, ref: EndpointRef) -> _Side:
        if ref.is_any or ref.is_gateway:
            return _Side()
        zone = self.policy.zone(ref.zone)
        common: tuple[str, ...] = ()
        if zone.on_link:
            common = (f"oifname {_names(self.policy.interfaces(zone))}",)
        if ref.set is not None:
            device_set = zone.set(ref.set)
            return _Side(
                common,
                _member_match(zone, device_set, "ipv6", "daddr"),
                _member_match(zone, device_set, "ipv4", "daddr"),
            )
        by_family: dict[Family, tuple[str, ...] | None] = {}
        for family in ("ipv6", "ipv4"):
            if getattr(zone, family):
                by_family[family] = (f"{_IP[family]} daddr @{zone_set_name(zone.id, family)}",)
            elif zone.has_addresses:
                by_family[family] = None
            else:  # e.g. the uplink: anywhere out of its interfaces, but no other zone
                by_family[family] = tuple(
                    f"{_IP[family]} daddr != @{zone_set_name(other.id, family)}"
                    for other in self.zones
                    if not other.on_link and other is not zone and getattr(other, family)
                )
        return _Side(common, by_family["ipv6"], by_family["ipv4"])


def _carries(zone: Zone, family: Family) -> bool:
    return not zone.has_addresses or bool(getattr(zone, family))


def _member_match(
    zone: Zone, device_set: DeviceSet, family: Family, direction: str
) -> tuple[str, ...] | None:
    if not _carries(zone, family):
        return None
    if not device_set.has_addresses:
        return ()
    if getattr(device_set, family) is None:
        return None
    kind: SetKind = "v6" if family == "ipv6" else "v4"
    return (f"{_IP[family]} {direction} @{device_set_name(zone.id, device_set.id, kind)}",)


def _outside(
    comment: str, v6_set: str | None, v4_set: str | None, link_local_ok: bool
) -> Iterator[str]:
    """Drops sources outside the given sets (link-local IPv6 too, unless `link_local_ok`); a
    family without a set is dropped whole."""
    if v6_set is not None:
        link_local = f"ip6 saddr != {LINK_LOCAL} " if link_local_ok else ""
        yield f"{link_local}ip6 saddr != @{v6_set} {comment}"
    else:
        yield f"meta nfproto ipv6 {comment}"
    if v4_set is not None:
        yield f"ip saddr != @{v4_set} {comment}"
    else:
        yield f"meta nfproto ipv4 {comment}"
