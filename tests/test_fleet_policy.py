"""The fleet side of network policies: parts set down the registry tree, merged, checked,
rendered with the gateway's compiler, and queued as signed versions (the enforcement with real
traffic is in test_policy_netns.py)."""

from __future__ import annotations

import json
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest
import yaml

from fleet.desired_policy import DesiredPolicyError, build_policy
from fleet.registry import Registry, parse_target
from fleet.settings import NodeSettings, SettingsError, merge_policy, validate_settings
from fleet.store import Store
from tests.conftest import REPO, run_cli, write_yaml
from wire.policy import parse_policy
from wire.policy_nft import GatewayContext, compile_policy

SITE = "school-1"
CASE = REPO / "tests" / "policy_cases" / "teaching-building" / "policy.yaml"


def teaching_building() -> dict[str, Any]:
    return dict(yaml.safe_load(CASE.read_text()))


def test_parts_merge_by_id_down_the_tree() -> None:
    site = {"zones": [{"id": "a", "vlans": [10]}, {"id": "b"}], "flows": [{"id": "f1"}]}
    building = {"zones": [{"id": "a", "vlans": [11]}], "flows": [{"id": "f2"}], "enforce": False}
    merged = merge_policy([site, building])
    assert merged == {
        "zones": [{"id": "a", "vlans": [11]}, {"id": "b"}],
        "flows": [{"id": "f1"}, {"id": "f2"}],
        "enforce": False,
    }
    assert merge_policy([]) is None


def test_settings_refuse_what_is_not_a_policy_part() -> None:
    with pytest.raises(SettingsError, match="unknown policy field"):
        validate_settings({"policy": {"zonez": []}}, "site:x")
    with pytest.raises(SettingsError, match="each have an id"):
        validate_settings({"policy": {"flows": [{"from": "a"}]}}, "site:x")
    assert validate_settings({"policy": {"zones": [{"id": "a"}]}}, "site:x").policy


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    store = Store(tmp_path / "fleet.db")
    registry = Registry(store)
    registry.add_site(SITE)
    registry.add_building(SITE, "b")
    registry.add_gateway(SITE, "gw-1", building="b")
    registry.add_gateway(SITE, "gw-2")
    return registry


def test_a_gateway_policy_is_built_from_its_site_building_and_own_parts(
    registry: Registry,
) -> None:
    policy = teaching_building()
    flows = policy.pop("flows")
    registry.set_settings(parse_target(f"site:{SITE}"), NodeSettings(policy=policy))
    registry.set_settings(
        parse_target(f"building:{SITE}/b"), NodeSettings(policy={"flows": flows[:2]})
    )
    registry.set_settings(
        parse_target(f"gateway:{SITE}/gw-1"), NodeSettings(policy={"flows": flows[2:]})
    )
    built = build_policy(registry, SITE, "gw-1")
    assert built is not None
    body, parsed = built
    assert [flow.id for flow in parsed.flows] == [flow["id"] for flow in flows]
    # gw-2 is not in building b: only the site's zones, no flows.
    other = build_policy(registry, SITE, "gw-2")
    assert other is not None and other[1].flows == []
    assert parse_policy(body) == parsed


def test_an_invalid_merge_is_refused_with_every_problem(registry: Registry) -> None:
    assert build_policy(registry, SITE, "gw-1") is None  # nothing set anywhere
    registry.set_settings(
        parse_target(f"gateway:{SITE}/gw-1"),
        NodeSettings(
            policy={"flows": [{"id": "x", "from": "nowhere", "to": "gateway", "protocol": "tcp"}]}
        ),
    )
    with pytest.raises(DesiredPolicyError, match="nowhere"):
        build_policy(registry, SITE, "gw-1")


def test_the_cli_shows_renders_and_queues_a_policy(tmp_path: Path) -> None:
    config = write_yaml(
        tmp_path / "fleet.yaml",
        {
            "database": str(tmp_path / "fleet.db"),
            "signing_key": str(tmp_path / "fleet.key"),
            "mqtt": {"host": "::1", "port": 1883},
        },
    )

    def cli(*args: str, code: int = 0) -> str:
        done = run_cli("campus-fleet", "--config", str(config), *args)
        assert done.returncode == code, (args, done.returncode, done.stderr, done.stdout)
        return done.stdout

    cli("site", "add", SITE)
    cli("gateway", "add", "gw-1", "--site", SITE)
    write_yaml(tmp_path / "site.yaml", {"policy": teaching_building()})
    cli("settings", "set", f"site:{SITE}", str(tmp_path / "site.yaml"))

    shown = json.loads(cli("policy", "show", "gw-1", "--json"))
    assert shown["policy"]["zones"][0]["id"] == "cameras"
    rendered = cli("policy", "render", "gw-1")
    # The fleet's render is the gateway's compiler on the same document, with the broker the
    # gateways use (here the fleet's own mqtt section).
    context = GatewayContext(broker_port=1883, broker_addresses=(ip_address("::1"),))
    assert rendered == compile_policy(parse_policy(shown["policy"]), context)

    plan = json.loads(cli("policy", "push", f"site:{SITE}", "--dry-run", "--json"))
    assert plan["gateways"] == [{"site": SITE, "gateway": "gw-1", "changed": True}]
    # No service is running: the version is queued, and the command says so (exit 1).
    pushed = json.loads(cli("policy", "push", f"site:{SITE}", "--json", code=1))
    assert pushed["gateways"][0]["state"] == "pending"
    status = json.loads(cli("policy", "status", "--json", code=4))
    assert status[0]["desired_version"] == 1 and not status[0]["in_sync"]
    diff = json.loads(cli("policy", "diff", f"gateway:{SITE}/gw-1", "--json"))
    assert diff[0]["changed"] and "table inet campus_iot" in diff[0]["diff"]
    audit = json.loads(cli("audit", "--action", "policy.push", "--json"))
    assert audit and audit[-1]["result"] == "ok"


def test_a_member_is_kept_in_the_tree_and_sent_to_the_gateway(tmp_path: Path) -> None:
    """No service runs here (its heartbeat is faked): the member is written into the node that
    defines the set, and the command stays queued for the service (the real path, with a
    gateway answering, is in test_policy_netns.py)."""
    import sqlite3
    import time

    config = write_yaml(
        tmp_path / "fleet.yaml",
        {"database": str(tmp_path / "fleet.db"), "signing_key": str(tmp_path / "k")},
    )

    def cli(*args: str, code: int = 0) -> str:
        done = run_cli("campus-fleet", "--config", str(config), *args)
        assert done.returncode == code, (args, done.returncode, done.stderr, done.stdout)
        return done.stdout

    cli("site", "add", SITE)
    cli("gateway", "add", "gw-1", "--site", SITE)
    write_yaml(tmp_path / "site.yaml", {"policy": teaching_building()})
    cli("settings", "set", f"site:{SITE}", str(tmp_path / "site.yaml"))
    conn = sqlite3.connect(tmp_path / "fleet.db")
    conn.execute(
        "INSERT INTO service (name, pid, started_ns, heartbeat_ns, signing_key, connected) "
        "VALUES ('fleet', 1, 0, ?, 'abc', 1)",
        (time.time_ns() + 60 * 10**9,),
    )
    conn.commit()
    conn.close()
    answer = json.loads(
        cli(
            "policy",
            "member",
            "add",
            "gw-1",
            "cameras.known",
            "00:1a:07:3c:11:04",
            "--timeout",
            "0.5",
            "--json",
            code=1,
        )
    )
    assert answer["written_to"] == f"site:{SITE}"
    assert answer["status"] == "pending"  # no service here to send it (or to expire it)
    shown = json.loads(cli("policy", "show", "gw-1", "--json"))
    (cameras,) = [z for z in shown["policy"]["zones"] if z["id"] == "cameras"]
    assert "00:1a:07:3c:11:04" in cameras["sets"][0]["macs"]
    # A set no level defines, and a value that is no address, are refused before anything.
    cli("policy", "member", "add", "gw-1", "cameras.unknown", "00:1a:07:3c:11:05", code=3)
    cli("policy", "member", "add", "gw-1", "cameras.known", "not-a-mac", code=2)


def test_members_are_compared_in_their_canonical_form() -> None:
    from fleet.cli_policy import _with_member

    part = {
        "zones": [
            {
                "id": "cameras",
                "sets": [{"id": "known", "macs": ["00:1a:07:3c:11:01"], "ipv6": ["fd00::9"]}],
            }
        ]
    }
    removed = _with_member(part, "cameras", "known", "macs", "00-1A-07-3C-11-01", add=False)
    assert removed is not None and removed["zones"][0]["sets"][0]["macs"] == []
    removed = _with_member(part, "cameras", "known", "ipv6", "fd00:0:0:0:0:0:0:9", add=False)
    assert removed is not None and removed["zones"][0]["sets"][0]["ipv6"] == []
    added = _with_member(part, "cameras", "known", "macs", "00-1A-07-3C-11-02", add=True)
    assert added is not None
    assert added["zones"][0]["sets"][0]["macs"] == ["00:1a:07:3c:11:01", "00:1a:07:3c:11:02"]


def test_the_policy_device_id_is_reserved(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from fleet.registry import RegistryError
    from wire.gateway_config import DeviceConfig

    with pytest.raises(ValidationError, match="reserved"):
        DeviceConfig.model_validate(
            {"id": "policy", "profile": "p", "connection": {"type": "modbus-tcp", "host": "h"}}
        )
    store = Store(tmp_path / "fleet.db")
    registry = Registry(store)
    registry.add_site(SITE)
    registry.add_gateway(SITE, "gw-1")
    with pytest.raises(RegistryError, match="reserved"):
        registry.add_device(
            SITE, "policy", "gw-1", "campussim-thc100", {"type": "modbus-tcp", "host": "h"}
        )


def test_a_gateway_that_stops_enforcing_no_longer_shows_its_old_counters(tmp_path: Path) -> None:
    from wire.models import BufferState, GatewayState, PolicyState, Status

    store = Store(tmp_path / "fleet.db")

    def reported() -> Any:
        return store.conn.execute("SELECT policy_state FROM gateways").fetchone()[0]

    with store.transaction():
        store.record_state(
            SITE, "gw-1",
            GatewayState(status=Status.ONLINE, buffer=BufferState(), policy=PolicyState(version=3)),
        )  # fmt: skip
    assert json.loads(reported())["version"] == 3
    with store.transaction():  # its Last Will says nothing about the policy: kept
        store.record_state(SITE, "gw-1", GatewayState(status=Status.OFFLINE))
    assert reported() is not None
    with store.transaction():  # back online with policy enforcement switched off
        store.record_state(SITE, "gw-1", GatewayState(status=Status.ONLINE, buffer=BufferState()))
    assert reported() is None
