"""Builds a gateway's network policy from the registry tree, validated before it may be pushed.

The parts set on the site, building, room and gateway (`policy:` in their settings) are merged
root first (`fleet.settings.merge_policy`) and checked whole with `wire.policy.parse_policy`, the
same check the gateway makes. The body pushed is the merged document as written, so what IT
staff read in `policy show` is what the gateway receives.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from fleet.config import FleetConfig
from fleet.registry import Registry, Target
from fleet.settings import merge_policy
from wire.errors import Problem, WireError
from wire.policy import Policy, PolicyError, parse_policy
from wire.policy_nft import DEFAULT_TABLE, GatewayContext, compile_policy


class DesiredPolicyError(WireError):
    def __init__(self, site: str, gateway: str, problems: list[Problem]) -> None:
        self.site = site
        self.gateway = gateway
        self.problems = problems
        listed = "; ".join(str(problem) for problem in problems)
        super().__init__(f"policy of {site}/{gateway} is not valid: {listed}")


def build_policy(
    registry: Registry, site: str, gateway: str
) -> tuple[dict[str, Any], Policy] | None:
    """(body, parsed policy), or None when no level of the tree sets a policy."""
    lineage = registry.lineage(Target("gateway", site, gateway))
    body = merge_policy([settings.policy for _node, settings in lineage if settings.policy])
    if body is None:
        return None
    try:
        return body, parse_policy(body)
    except PolicyError as exc:
        raise DesiredPolicyError(site, gateway, list(exc.problems)) from None


def render_context(config: FleetConfig, table: str = DEFAULT_TABLE) -> GatewayContext:
    """The compiler's view of a gateway as the fleet knows it: the broker the gateways use.
    A gateway resolves the broker's name itself, so with `restrict_output` its compiled text
    (and hash) can differ from this rendering when the name resolves differently there."""
    broker = config.agent_broker
    host, port = (broker.host, broker.port) if broker else (config.mqtt.host, config.mqtt.port)
    addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    try:
        addresses.append(ipaddress.ip_address(host))
    except ValueError:
        try:
            for info in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP):
                address = ipaddress.ip_address(info[4][0])
                if address not in addresses:
                    addresses.append(address)
        except OSError:
            pass
    return GatewayContext(table=table, broker_port=port, broker_addresses=tuple(addresses))


def render(policy: Policy, config: FleetConfig) -> str:
    return compile_policy(policy, render_context(config))
