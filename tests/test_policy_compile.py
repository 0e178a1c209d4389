"""The policy compiler, byte for byte: every folder of `tests/policy_cases/` holds a policy
(`policy.yaml`), optionally the gateway context (`context.yaml`), and the nftables text it must
compile to (`expected.nft`). A new case is a new folder; `CAMPUS_UPDATE_GOLDEN=1 pytest
tests/test_policy_compile.py` writes the expected files (review the diff before committing).
"""

from __future__ import annotations

import os
import random
import re
import subprocess
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import netns
from wire.policy import Policy, parse_policy
from wire.policy_nft import GatewayContext, compile_policy

CASES = Path(__file__).parent / "policy_cases"
CASE_NAMES = sorted(p.name for p in CASES.iterdir() if (p / "policy.yaml").exists())


def load_case(name: str) -> tuple[Policy, GatewayContext]:
    folder = CASES / name
    policy = parse_policy(yaml.safe_load((folder / "policy.yaml").read_text()))
    context = GatewayContext()
    if (folder / "context.yaml").exists():
        data = yaml.safe_load((folder / "context.yaml").read_text())
        context = GatewayContext(
            table=data.get("table", "campus_iot"),
            broker_port=data.get("broker_port"),
            broker_addresses=tuple(ip_address(a) for a in data.get("broker_addresses", [])),
        )
    return policy, context


@pytest.mark.parametrize("name", CASE_NAMES)
def test_each_case_compiles_to_its_expected_text(name: str) -> None:
    policy, context = load_case(name)
    text = compile_policy(policy, context)
    expected = CASES / name / "expected.nft"
    if os.environ.get("CAMPUS_UPDATE_GOLDEN") == "1":
        expected.write_text(text)
    assert text == expected.read_text(), f"{name}: compiled text differs from {expected}"


def test_there_are_cases() -> None:
    assert {"teaching-building", "restricted-output", "enforcement-off"} <= set(CASE_NAMES)


def shuffled(body: dict[str, Any], seed: int) -> dict[str, Any]:
    """The same policy with every list whose order carries no meaning in another order."""
    rng = random.Random(seed)

    def mix(value: Any, key: str = "") -> Any:
        if isinstance(value, dict):
            return {k: mix(v, k) for k, v in reversed(list(value.items()))}
        if isinstance(value, list):
            items = [mix(v) for v in value]
            rng.shuffle(items)
            return items
        return value

    return mix(body)  # type: ignore[no-any-return]


@pytest.mark.parametrize("name", ["teaching-building", "restricted-output"])
def test_the_order_of_the_input_never_changes_the_text(name: str) -> None:
    body = yaml.safe_load((CASES / name / "policy.yaml").read_text())
    policy, context = load_case(name)
    reference = compile_policy(policy, context)
    for seed in range(20):
        assert compile_policy(parse_policy(shuffled(body, seed)), context) == reference
    reordered = GatewayContext(
        context.table, context.broker_port, tuple(reversed(context.broker_addresses))
    )
    assert compile_policy(policy, reordered) == reference


@pytest.mark.parametrize("name", CASE_NAMES)
def test_the_text_touches_only_its_own_table_and_counts_every_rule(name: str) -> None:
    policy, context = load_case(name)
    text = compile_policy(policy, context)
    table = context.table
    lines = text.splitlines()
    assert lines[1:3] == [f"table inet {table} {{}}", f"delete table inet {table}"]
    for line in lines:
        assert "flush" not in line and "ruleset" not in line
        if line.startswith(("table", "delete")):
            own = {
                f"table inet {table} {{}}",
                f"delete table inet {table}",
                f"table inet {table} {{",
            }
            assert line in own, line
    chains = re.findall(r"\tchain (\S+) \{\n(.*?)\n\t\}", text, re.S)
    assert chains or not policy.enforce
    for name_, body in chains:
        rules = [r.strip() for r in body.splitlines() if not r.strip().startswith("type filter")]
        assert all(" counter " in f" {r} " for r in rules), name_
        assert all('comment "' in r for r in rules), name_
        suffix = name_.replace("_", ":", 1)
        assert rules[-1] == f'counter drop comment "drop:{suffix}"', (name_, rules[-1])
    for hook in ("input", "forward"):
        if policy.enforce:
            assert f"type filter hook {hook} priority filter; policy drop;" in text


def test_the_essential_icmpv6_always_passes_and_nd_needs_hop_limit_255() -> None:
    policy = parse_policy({"zones": [{"id": "lab", "interfaces": ["eth1"]}]})
    text = compile_policy(policy, GatewayContext())
    assert (
        "icmpv6 type { nd-router-solicit, nd-router-advert, nd-neighbor-solicit, "
        'nd-neighbor-advert } ip6 hoplimit 255 counter accept comment "icmpv6-nd"'
    ) in text
    assert "packet-too-big" in text.split("chain forward {")[1]
    quiet = compile_policy(policy.model_copy(update={"ping_gateway": False}), GatewayContext())
    assert "echo-request" not in quiet and "echo-request" in text


def test_flows_of_one_family_or_set_get_one_rule_per_family() -> None:
    policy = parse_policy(
        {
            "zones": [
                {
                    "id": "a",
                    "interfaces": ["a0"],
                    "ipv6": ["fd00:1:0:1::/64"],
                    "ipv4": ["10.1.1.0/24"],
                    "sets": [{"id": "v6only", "ipv6": ["fd00:1:0:1::5"]}],
                },
                {"id": "b", "interfaces": ["b0"]},
            ],
            "flows": [
                {"id": "both", "from": "a", "to": "b", "protocol": "tcp", "ports": [1]},
                {"id": "six", "from": "a", "to": "b", "protocol": "udp", "family": "ipv6"},
                {"id": "set", "from": "a.v6only", "to": "b", "protocol": "any"},
            ],
        }
    )
    rules = compile_policy(policy, GatewayContext()).split("chain forward_a {")[1]
    assert 'oifname "b0" tcp dport 1 counter accept comment "flow:both"' in rules
    six = 'meta nfproto ipv6 oifname "b0" meta l4proto udp counter accept comment "flow:six"'
    assert six in rules
    assert 'oifname "b0" ip6 saddr @dev_a_v6only_v6 counter accept comment "flow:set"' in rules
    assert rules.count('comment "flow:set"') == 1, "an IPv6-only set never matches IPv4"


def test_the_context_is_checked() -> None:
    with pytest.raises(ValueError, match="table name"):
        GatewayContext("campus-iot")
    with pytest.raises(ValueError, match="broker port"):
        GatewayContext(broker_port=0)


@pytest.mark.netns
@pytest.mark.skipif(netns.unavailable() is not None, reason=f"nft -c: {netns.unavailable()}")
@pytest.mark.parametrize("name", CASE_NAMES)
def test_nft_accepts_every_expected_text(name: str) -> None:
    """`nft -c` in a namespace of its own (it needs netlink, and must not see the host's)."""
    namespace = f"ci-check-{os.getpid()}-{name[:10]}"
    netns.run("ip", "netns", "add", namespace)
    try:
        expected = str(CASES / name / "expected.nft")
        checked = subprocess.run(
            ["ip", "netns", "exec", namespace, "nft", "-c", "-f", expected],
            capture_output=True,
            text=True,
            check=False,
        )
        assert checked.returncode == 0, checked.stderr
    finally:
        netns.run("ip", "netns", "del", namespace, check=False)
