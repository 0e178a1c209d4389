"""Network policy enforcement: compile a signed policy to one nftables table, apply it with
commit-confirm, report its counters. `compile_policy` is pure (the fleet renders with it too)."""

from wire.policy_nft import (
    DEFAULT_TABLE,
    GatewayContext,
    address_text,
    compile_policy,
    device_set_name,
    zone_set_name,
)

__all__ = [
    "DEFAULT_TABLE",
    "GatewayContext",
    "address_text",
    "compile_policy",
    "device_set_name",
    "zone_set_name",
]
