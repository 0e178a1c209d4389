"""The policy model: what a valid policy is, and how a wrong one is refused (every problem named
by its field, and its YAML line when the policy comes from a file)."""

from __future__ import annotations

import copy
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Any

import pytest
import yaml

from wire.documents import line_of, parse_yaml
from wire.policy import Policy, PolicyError, endpoint, parse_member, parse_policy

TEACHING = Path(__file__).parent / "policy_cases" / "teaching-building" / "policy.yaml"


def base() -> dict[str, Any]:
    return {
        "site_prefixes": ["fd00:ab::/48"],
        "zones": [
            {
                "id": "cameras",
                "interfaces": ["br-cam"],
                "ipv6": ["fd00:ab:0:1::/64"],
                "ipv4": ["10.77.1.0/24"],
                "admit": "known",
                "sets": [{"id": "known", "macs": ["02:00:00:00:01:02"]}],
            },
            {
                "id": "recorders",
                "vlans": [20],
                "ipv6": ["fd00:ab:0:2::/64"],
                "sets": [{"id": "nvr", "ipv6": ["fd00:ab:0:2::10"]}],
            },
            {"id": "uplink", "interfaces": ["eth0"]},
        ],
        "flows": [
            {
                "id": "cams-nvr",
                "from": "cameras.known",
                "to": "recorders.nvr",
                "protocol": "tcp",
                "ports": [554],
            }
        ],
    }


def problems(body: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(PolicyError) as refused:
        parse_policy(body)
    return [(p.field, p.message) for p in refused.value.problems]


def test_the_teaching_building_is_valid() -> None:
    policy = parse_policy(yaml.safe_load(TEACHING.read_text()))
    assert [z.id for z in policy.zones] == [
        "cameras",
        "displays",
        "boards",
        "sensors",
        "management",
        "uplink",
    ]
    assert policy.interfaces(policy.zone("cameras")) == ["eth1.10"]
    assert policy.zone("management").set("recorder").ipv6 == [
        IPv6Network("fd4c:2b1e:7a30:50::10/128")
    ]
    flow = next(f for f in policy.flows if f.id == "displays-boards")
    assert (str(flow.source), str(flow.destination), flow.both_ways) == ("displays", "boards", True)


def test_macs_are_normalised_and_from_is_an_alias() -> None:
    body = base()
    body["zones"][0]["sets"][0]["macs"] = ["02-00-00-00-01-0A"]
    policy = parse_policy(body)
    assert policy.zone("cameras").set("known").macs == ["02:00:00:00:01:0a"]
    assert policy.flows[0].from_ == "cameras.known"
    assert policy.flows[0].model_dump(by_alias=True)["from"] == "cameras.known"


def edit(path: str, value: Any) -> dict[str, Any]:
    """`base()` with the value at a dotted path replaced (or appended to a list)."""
    body = copy.deepcopy(base())
    target: Any = body
    parts = path.split(".")
    for part in parts[:-1]:
        target = target[int(part)] if part.isdigit() else target[part]
    last = parts[-1]
    if not last.isdigit():
        target[last] = value
    elif int(last) == len(target):
        target.append(value)
    else:
        target[int(last)] = value
    return body


def assert_problem(body: dict[str, Any], field: str, message: str) -> None:
    found = problems(body)
    assert any(f == field and message in m for f, m in found), found


STAFF = {"id": "staff", "ipv6": ["fd00:ab:0:80::/64"], "sets": [{"id": "x", "macs": []}]}


@pytest.mark.parametrize(
    ("path", "value", "field", "message"),
    [
        ("zones.0.ipv6", ["10.0.0.0/24"], "zones.0.ipv6.0", "IPv4 prefix: put it in ipv4"),
        ("zones.0.ipv4", ["fd00:ab:0:9::/64"], "zones.0.ipv4.0", "IPv6 prefix: put it in ipv6"),
        ("zones.0.ipv6", ["fd00:ab:0:1::5/64"], "zones.0.ipv6.0", "the prefix is fd00:ab:0:1::/64"),
        ("zones.0.ipv6", ["fd00:ab:0:1::5"], "zones.0.ipv6.0", "a zone needs a prefix"),
        ("zones.0.ipv6", ["fd00:ab:0:100::/56"], "zones.0", "SLAAC needs /64 prefixes"),
        ("zones.0.ipv6", ["fe80::/64"], "zones.0.ipv6.0", "is link-local"),
        ("zones.0.ipv6", ["::ffff:10.0.0.0/120"], "zones.0.ipv6.0", "IPv4-mapped"),
        ("zones.0.ipv6", ["fd00:ab:0:1::/64"] * 2, "zones.0.ipv6", "fd00:ab:0:1::/64 overlap"),
        ("zones.0.sets.0.macs", ["02:00:00:00:01"], "zones.0.sets.0.macs.0", "not a MAC address"),
        ("zones.0.sets.0.macs", ["01:00:5e:00:00:01"], "zones.0.sets.0.macs.0", "multicast MAC"),
        ("zones.0.sets.0.macs", ["02:00:00:00:01:02", "02-00-00-00-01-02"], "zones.0.sets.0.macs",
         "MAC 02:00:00:00:01:02 is listed twice"),
        ("zones.0.sets.0", {"id": "known"}, "zones.0.sets.0", "a set declares macs, ipv6 and/or"),
        ("zones.0.admit", "gone", "zones.0", "admit names set 'gone', which this zone lacks"),
        ("zones.0.id", "gateway", "zones.0", "'gateway' is reserved"),
        ("zones.0.id", "Cameras_1", "zones.0.id", "String should match pattern"),
        ("zones.2", {"id": "uplink"}, "zones.2", "a zone needs interfaces, vlans or address"),
        ("zones.2.dhcp4", True, "zones.2", "dhcp4 needs at least one ipv4 range"),
        ("zones.1.vlans", [0], "zones.1.vlans.0", "greater than or equal to 1"),
        ("flows.0.protocol", "icmp", "flows.0", "ports need protocol tcp or udp, not icmp"),
        ("flows.0.ports", [554, "500-600"], "flows.0", "ports 500-600 and 554 overlap"),
        ("flows.0.ports", [70000], "flows.0.ports.0", "port 70000 is outside 1-65535"),
        ("flows.0.ports", ["600-500"], "flows.0.ports.0", "needs 1 <= low < high <= 65535"),
        ("flows.0.family", "ipv7", "flows.0.family", "Input should be 'ipv6' or 'ipv4'"),
        ("flows.0.protcol", "tcp", "flows.0.protcol", "Extra inputs are not permitted"),
        ("flows.0.to", "gateway.x", "flows.0", "gateway.x: gateway has no sets"),
    ],
)  # fmt: skip
def test_a_wrong_part_is_named_with_what_is_wrong(
    path: str, value: Any, field: str, message: str
) -> None:
    assert_problem(edit(path, value), field, message)


@pytest.mark.parametrize(
    ("path", "value", "field", "message"),
    [
        ("zones.1.ipv6", ["fd00:ab:0:1::/64"], "zones.1.ipv6.0",
         "fd00:ab:0:1::/64 overlaps fd00:ab:0:1::/64 of zone 'cameras'"),
        ("zones.1.interfaces", ["br-cam"], "zones.1.interfaces",
         "interface br-cam is also in zone 'cameras'"),
        ("zones.2.interfaces", ["eth0.20"], "zones.2.interfaces",
         "interface eth0.20 is also in zone 'recorders'"),
        ("vlan_parent", "enp0s20f0u10x1", "zones.1.vlans",
         "VLAN interface enp0s20f0u10x1.20 is longer than 15 characters"),
        ("zones.0.ipv6", ["fd00:cd:0:1::/64"], "zones.0.ipv6.0",
         "fd00:cd:0:1::/64 is outside the site prefixes (fd00:ab::/48)"),
        ("zones.1.sets.0.ipv6", ["fd00:ab:0:3::10"], "zones.1.sets.0.ipv6.0",
         "fd00:ab:0:3::10/128 is outside zone 'recorders' (fd00:ab:0:2::/64)"),
        ("zones.1.sets.0.ipv4", ["10.77.2.10"], "zones.1.sets.0.ipv4",
         "zone 'recorders' has no ipv4 prefixes, so these members can never send or receive"),
        ("zones.3", STAFF, "zones.3.sets.0.macs", "MACs are only seen on the gateway's own links"),
        ("flows.0.to", "printers", "flows.0.to",
         "unknown zone 'printers' (zones: cameras, recorders, uplink; or gateway, any)"),
        ("flows.0.to", "recorders.disk", "flows.0.to",
         "zone 'recorders' has no set 'disk' (sets: nvr)"),
        ("flows.0.to", "cameras.known", "flows.0.to",
         "set cameras.known has MACs only and cannot be a destination"),
        ("flows.0.from", "gateway", "flows.0.from",
         "flows from the gateway need restrict_output: true"),
        ("flows.0.family", "ipv4", "flows.0",
         "this flow can never match: its endpoints and family/protocol share no IP family"),
        ("flows.1", {"id": "cams-nvr", "from": "any", "to": "gateway", "protocol": "any"},
         "flows.1.id", "flow id 'cams-nvr' is used twice (first at flows.0)"),
        ("zones.2.id", "cameras", "zones.2.id", "zone id 'cameras' is used twice"),
    ],
)  # fmt: skip
def test_the_whole_policy_is_checked(path: str, value: Any, field: str, message: str) -> None:
    assert_problem(edit(path, value), field, message)


def test_every_problem_is_reported_at_once_with_its_yaml_line() -> None:
    text = TEACHING.read_text().replace("to: cameras\n", "to: kameras\n")
    text = text.replace("ports: [80, 443]\n    family: ipv6", "ports: [80, 443]\n    family: ipv4")
    data, root = parse_yaml(text, "policy.yaml")
    with pytest.raises(PolicyError) as refused:
        parse_policy(data, lambda where: line_of(root, where))
    found = {(p.field, p.line) for p in refused.value.problems}
    line_of_kameras = text.splitlines().index("    to: kameras") + 1
    assert ("flows.0.to", line_of_kameras) in found
    assert any(field == "flows.5" for field, _ in found), found  # displays-cloud over IPv4
    assert "invalid policy: " in str(refused.value)


def test_members_given_at_run_time_are_parsed_like_the_policy_s() -> None:
    assert parse_member("02-00-00-00-01-0A") == "02:00:00:00:01:0a"
    assert parse_member("fd00:ab:0:1::5") == IPv6Network("fd00:ab:0:1::5/128")
    assert parse_member("10.77.1.0/28") == IPv4Network("10.77.1.0/28")
    with pytest.raises(ValueError, match="has host bits set"):
        parse_member("10.77.1.1/28")
    with pytest.raises(ValueError, match="multicast"):
        parse_member("ff02::1")


def test_endpoints() -> None:
    assert endpoint("gateway").is_gateway and endpoint("any").is_any
    ref = endpoint("cameras.known")
    assert (ref.zone, ref.set, str(ref)) == ("cameras", "known", "cameras.known")


def test_an_empty_policy_is_valid_and_enforces_default_deny() -> None:
    policy = parse_policy({})
    assert policy == Policy()
    assert policy.enforce and not policy.flows


def test_the_agent_names_the_policy_device_as_its_applier_does() -> None:
    """The runtime keeps its own copy of the name so that it loads the policy code only when a
    gateway enforces policies (or a policy message arrives)."""
    from agent.policy.applier import POLICY_DEVICE as APPLIER_NAME
    from agent.runtime import POLICY_DEVICE
    from wire.gateway_config import RESERVED_DEVICE_IDS

    assert POLICY_DEVICE == APPLIER_NAME
    assert POLICY_DEVICE in RESERVED_DEVICE_IDS
