"""Network policies enforced on a gateway namespace and proven with real traffic.

A gateway namespace routes between leaf namespaces: two cameras behind a bridge (one known by
MAC, one not), a recorder, a sensor, another device and an uplink with the broker, dual stack
(ULA `fd00:ab:0:…` and `10.77.…`, only inside the namespaces). Every leaf and the gateway listen on
TCP 7000 (one socket per family). Connections are tried in parallel with a 1 s timeout: a dropped
SYN only times out. The applier runs with real nft (through `ip netns exec`), real signed
documents, and an uplink check that really connects from the gateway namespace; the last tests
run a whole agent in the gateway namespace against a Mosquitto in the uplink namespace, and the
last one `campus-fleet serve` beside that Mosquitto, driven by the CLI as IT staff would.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.buffer import Buffer
from agent.clock import SystemClock
from agent.config import PolicySettings
from agent.events import EventQueue
from agent.policy.applier import PolicyControl, UplinkLost
from agent.policy.nft import Nft, NftError, counters_from_json
from simulator.broker import find_mosquitto, free_port
from tests import netns
from tests.netns import Host, Lab, Listeners, connect, connect_all
from wire.control import Ack, AckStatus, CommandOutcome, CommandRequest, SignedDocument
from wire.models import GatewayState
from wire.policy import parse_policy
from wire.policy_nft import GatewayContext, compile_policy
from wire.signing import generate_key, load_private_key, public_path, sign

REPO = Path(__file__).resolve().parents[1]
FLEET_CLI = Path(sys.executable).parent / "campus-fleet"
PORT = 7000
TABLE = "campus_iot"
SKIP = netns.unavailable()
pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(SKIP is not None, reason=f"network namespace tests: {SKIP}"),
    pytest.mark.timeout(60),
]

CAM_MAC, CAM2_MAC = "02:00:00:00:01:02", "02:00:00:00:01:03"

POLICY: dict[str, Any] = {
    "site_prefixes": ["fd00:ab::/48"],
    "zones": [
        {
            "id": "cameras",
            "interfaces": ["br-cam"],
            "ipv6": ["fd00:ab:0:1::/64"],
            "ipv4": ["10.77.1.0/24"],
            "admit": "known",
            "sets": [{"id": "known", "macs": [CAM_MAC]}],
        },
        {
            "id": "recorders",
            "interfaces": ["rec0"],
            "ipv6": ["fd00:ab:0:2::/64"],
            "ipv4": ["10.77.2.0/24"],
        },
        {
            "id": "sensors",
            "interfaces": ["sen0"],
            "ipv6": ["fd00:ab:0:3::/64"],
            "ipv4": ["10.77.3.0/24"],
        },
        {
            "id": "other",
            "interfaces": ["oth0"],
            "ipv6": ["fd00:ab:0:4::/64"],
            "ipv4": ["10.77.4.0/24"],
        },
        {"id": "uplink", "interfaces": ["up0"]},
        {"id": "staff", "ipv6": ["fd00:ab:0:80::/64"], "ipv4": ["10.77.128.0/20"]},
    ],
    "flows": [
        {
            "id": "cameras-recorder",
            "from": "cameras.known",
            "to": "recorders",
            "protocol": "tcp",
            "ports": [PORT],
        },
        {
            "id": "sensors-gateway",
            "from": "sensors",
            "to": "gateway",
            "protocol": "tcp",
            "ports": [PORT],
        },
        {
            "id": "other-recorder-v6",
            "from": "other",
            "to": "recorders",
            "protocol": "tcp",
            "ports": [PORT],
            "family": "ipv6",
        },
        {
            "id": "recorder-all",
            "from": "recorders",
            "to": "any",
            "protocol": "tcp",
            "ports": [PORT],
        },
        {
            "id": "recorder-uplink",
            "from": "recorders",
            "to": "uplink",
            "protocol": "tcp",
            "ports": [PORT + 1],
        },
        {
            "id": "staff-recorder",
            "from": "staff",
            "to": "recorders",
            "protocol": "tcp",
            "ports": [PORT],
        },
    ],
}

#: Which connections the policy allows, by hand (source, destination) and family; and for every
#: other one, the rule comment whose counter must count its drop.
ALLOWED = {
    ("cam", "rec"): {"v6", "v4"},
    ("sen", "gw"): {"v6", "v4"},
    ("oth", "rec"): {"v6"},
    **{("rec", d): {"v6", "v4"} for d in ("cam", "cam2", "sen", "oth", "up")},
}
ZONE_OF = {
    "cam": "cameras",
    "cam2": "cameras",
    "rec": "recorders",
    "sen": "sensors",
    "oth": "other",
}
FLOW_OF = {
    ("cam", "rec"): "flow:cameras-recorder",
    ("sen", "gw"): "flow:sensors-gateway",
    ("oth", "rec"): "flow:other-recorder-v6",
}


def expected_outcomes(
    labels: Iterable[str], allowed: dict[tuple[str, str], set[str]]
) -> dict[str, str]:
    """'connected' or 'timeout' for each `src>dst/family` label of the matrix."""
    expected = {}
    for label in labels:
        pair, family = label.split("/")
        source, destination = pair.split(">")
        expected[label] = (
            "connected" if family in allowed.get((source, destination), ()) else "timeout"
        )
    return expected


def drop_rule(source: str, destination: str) -> str:
    if source == "cam2":
        return "admit:cameras"
    chain = "input" if destination == "gw" else "forward"
    return f"drop:{chain}:{ZONE_OF[source]}"


@dataclass
class Topology:
    lab: Lab
    hosts: dict[str, Host]
    staff: tuple[str, str]  # a host of the staff network behind the uplink (v6, v4)
    gateway_on: dict[str, str]  # the gateway's address per link, by family, e.g. "cam-v6"

    def attempts(self) -> list[tuple[str, str, str, int]]:
        """Every (label, namespace, address, port) of the matrix; label `src>dst/family`."""
        found = []
        for source in ("cam", "cam2", "rec", "sen", "oth"):
            for destination in ("cam", "cam2", "rec", "sen", "oth", "up", "gw"):
                if source == destination or {source, destination} == {"cam", "cam2"}:
                    continue  # the cameras share a bridge: not the gateway's traffic
                for family in ("v6", "v4"):
                    if destination == "gw":
                        address = self.gateway_on[f"{source}-{family}"]
                    else:
                        address = getattr(self.hosts[destination], family)
                    label = f"{source}>{destination}/{family}"
                    found.append((label, self.hosts[source].ns, address, PORT))
        return found

    def run_matrix(self) -> dict[str, str]:
        return {a[0]: outcome for a, outcome in connect_all(self.attempts(), 1.0).items()}


@pytest.fixture(scope="module")
def topology() -> Iterator[Topology]:
    if SKIP is not None:
        pytest.skip(SKIP)
    lab = Lab()
    listeners = Listeners()
    try:
        lab.start()
        cameras = lab.link("br-cam", 1, bridge=True)
        hosts = {
            "cam": lab.leaf("cam", cameras, 2, CAM_MAC),
            "cam2": lab.leaf("cam2", cameras, 3, CAM2_MAC),
            "rec": lab.leaf("rec", lab.link("rec0", 2), 2, "02:00:00:00:02:02"),
            "sen": lab.leaf("sen", lab.link("sen0", 3), 2, "02:00:00:00:03:02"),
            "oth": lab.leaf("oth", lab.link("oth0", 4), 2, "02:00:00:00:04:02"),
            "up": lab.leaf("up", lab.link("up0", 255), 2, "02:00:00:00:ff:02"),
        }
        gateway_on: dict[str, str] = {}
        for name, link in (("cam", "br-cam"), ("cam2", "br-cam"), ("rec", "rec0")):
            gateway_on |= {f"{name}-v6": lab.links[link].v6, f"{name}-v4": lab.links[link].v4}
        for name, link in (("sen", "sen0"), ("oth", "oth0")):
            gateway_on |= {f"{name}-v6": lab.links[link].v6, f"{name}-v4": lab.links[link].v4}
        staff = lab.route_behind(hosts["up"], "fd00:ab:0:80::/64", "10.77.128.0/20")
        for ns in [lab.gw, *(h.ns for h in hosts.values())]:
            listeners.listen(ns, PORT)
            listeners.listen(ns, PORT + 1)
        yield Topology(lab, hosts, staff, gateway_on)
    finally:
        listeners.close()
        lab.close()


@pytest.fixture
def clean_table(topology: Topology) -> Iterator[None]:
    """Every test starts and ends without the agent's table in the gateway namespace."""
    topology.lab.nft("delete", "table", "inet", TABLE, check=False)
    yield
    topology.lab.nft("delete", "table", "inet", TABLE, check=False)


# -- the applier, driven directly -----------------------------------------------------------------


@dataclass
class Applier:
    control: PolicyControl
    buffer: Buffer
    key: Ed25519PrivateKey
    site: str
    gateway: str

    def document(
        self, version: int, body: dict[str, Any], *, key: Ed25519PrivateKey | None = None
    ) -> SignedDocument:
        return sign(
            key or self.key,
            kind="policy",
            site=self.site,
            gateway=self.gateway,
            version=version,
            issued_ns=time.time_ns(),
            body=body,
        )

    def events(self) -> list[dict[str, Any]]:
        self.buffer.commit()
        found = []
        while (event := self.buffer.take_event()) is not None:
            found.append(json.loads(event[1]))
            self.buffer.delete_event(event[0])
        return found


def payload(document: SignedDocument) -> bytes:
    return document.model_dump_json(exclude_none=True).encode()


ApplierFactory = Callable[..., Applier]


@pytest.fixture
def applier_factory(tmp_path: Path) -> Iterator[ApplierFactory]:
    made: list[Buffer] = []
    key_path = tmp_path / "keys" / "fleet.key"
    generate_key(key_path)

    def make(
        nft_path: str,
        *,
        context: GatewayContext | None = None,
        enabled: bool = True,
        confirm_timeout_s: float = 2.0,
        compiler: Any = None,
    ) -> Applier:
        buffer = Buffer(tmp_path / f"buffer-{len(made)}.db")
        buffer.open()
        made.append(buffer)
        settings = PolicySettings(
            enabled=enabled,
            nft_path=nft_path,
            table=TABLE,
            applied_path=tmp_path / "state" / "policy.applied.json",
            confirm_timeout_s=confirm_timeout_s,
        )

        async def gateway_context() -> GatewayContext:
            return context or GatewayContext(TABLE)

        clock = SystemClock(check_sync=False)
        control = PolicyControl(
            site="school-1",
            gateway="gw-1",
            keys=[load_public(key_path)],
            settings=settings,
            clock=clock,
            events=EventQueue(buffer, clock.wall_ns),
            topic="campus/school-1/gw/gw-1/policy",
            context=gateway_context,
            **({"compiler": compiler} if compiler is not None else {}),
        )
        return Applier(control, buffer, load_private_key(key_path), "school-1", "gw-1")

    yield make
    for buffer in made:
        buffer.close()


def load_public(path: Path) -> Any:
    from wire.verify import load_public_key_file

    return load_public_key_file(public_path(path))


def uplink_check(topology: Topology, port: int = PORT) -> Any:
    """A real commit-confirm check: a new TCP connection from the gateway namespace to the
    uplink host (standing in for the broker) must complete."""
    up = topology.hosts["up"]

    async def check(timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        outcome = ""
        while time.monotonic() < deadline:
            remaining = max(0.05, deadline - time.monotonic())
            outcome = await asyncio.to_thread(connect, topology.lab.gw, up.v6, port, remaining)
            if outcome == "connected":
                return
        raise UplinkLost(f"no new TCP connection to [{up.v6}]:{port}: {outcome}")

    return check


async def apply_policy(
    applier: Applier, topology: Topology, version: int, body: dict[str, Any]
) -> Ack:
    ack = await applier.control.handle(
        payload(applier.document(version, body)), uplink_check(topology)
    )
    assert ack is not None
    return ack


def counters(applier: Applier) -> dict[str, int]:
    return {c.rule: c.packets for c in applier.control.counters}


# -- tests ---------------------------------------------------------------------------------------


@pytest.mark.usefixtures("clean_table")
async def test_allowed_flows_connect_and_every_other_is_dropped_and_counted(
    topology: Topology, applier_factory: ApplierFactory, tmp_path: Path
) -> None:
    control_run = await asyncio.to_thread(topology.run_matrix)
    assert set(control_run.values()) == {"connected"}, {
        k: v for k, v in control_run.items() if v != "connected"
    }
    assert len(control_run) == 56

    applier = applier_factory(str(topology.lab.nft_wrapper(tmp_path)))
    ack = await apply_policy(applier, topology, 1, POLICY)
    assert (ack.kind, ack.status, ack.version, ack.applied_version) == (
        "policy",
        AckStatus.APPLIED,
        1,
        1,
    ), ack.reason

    outcomes = await asyncio.to_thread(topology.run_matrix)
    assert outcomes == expected_outcomes(outcomes, ALLOWED)

    await applier.control.refresh_counters()
    seen = counters(applier)
    allowed_by_flow: Counter[str] = Counter()
    dropped_by_rule: Counter[str] = Counter()
    for label, outcome in outcomes.items():
        source, destination = label.split("/")[0].split(">")
        if outcome == "connected":
            allowed_by_flow[FLOW_OF.get((source, destination), "flow:recorder-all")] += 1
        else:
            dropped_by_rule[drop_rule(source, destination)] += 1
    # a flow's rule sees the first packet of each connection only (the rest is established)
    for rule, count in allowed_by_flow.items():
        assert seen[rule] == count, (rule, seen[rule], count)
    assert allowed_by_flow["flow:recorder-all"] == 10
    # a dropped connect sends its SYN at least once (maybe again before the 1 s timeout)
    for rule, count in dropped_by_rule.items():
        assert seen[rule] >= count, (rule, seen[rule], count)
    assert dropped_by_rule["admit:cameras"] == 10
    state = applier.control.state()
    assert state is not None and state.version == 1
    assert applier.control.text is not None
    assert state.sha256 == hashlib.sha256(applier.control.text.encode()).hexdigest()


@pytest.mark.usefixtures("clean_table")
async def test_a_camera_outside_its_set_passes_once_added_without_a_reload(
    topology: Topology, applier_factory: ApplierFactory, tmp_path: Path
) -> None:
    applier = applier_factory(str(topology.lab.nft_wrapper(tmp_path)))
    assert (await apply_policy(applier, topology, 1, POLICY)).status is AckStatus.APPLIED
    cam, cam2, rec = (topology.hosts[n] for n in ("cam", "cam2", "rec"))
    pair = [
        ("cam", cam.ns, rec.v6, PORT),
        ("cam2", cam2.ns, rec.v6, PORT),
        ("cam2-v4", cam2.ns, rec.v4, PORT),
    ]

    def outcomes() -> dict[str, str]:
        return {a[0]: o for a, o in connect_all(pair, 1.0).items()}

    assert await asyncio.to_thread(outcomes) == {
        "cam": "connected",
        "cam2": "timeout",
        "cam2-v4": "timeout",
    }
    table_handle = _table_handle(topology)
    await applier.control.refresh_counters()
    before = counters(applier)

    request = CommandRequest(
        id="allow-cam2",
        device="policy",
        action="add_element",
        argument={"set": "cameras.known", "value": CAM2_MAC.upper().replace(":", "-")},
        issued_ns=time.time_ns(),
        deadline_ns=time.time_ns() + 10**10,
    )
    result = await applier.control.command(request)
    assert result.outcome is CommandOutcome.OK, result.error
    assert result.result == {"set": "cameras.known", "value": CAM2_MAC, "changed": True}

    assert await asyncio.to_thread(outcomes) == {
        "cam": "connected",
        "cam2": "connected",
        "cam2-v4": "connected",
    }
    await applier.control.refresh_counters()
    after = counters(applier)
    assert _table_handle(topology) == table_handle, "the table was not reloaded"
    assert after["flow:cameras-recorder"] == before["flow:cameras-recorder"] + 3, (
        "counters kept counting: no reload"
    )
    assert after["admit:cameras"] == before["admit:cameras"]

    removed = await applier.control.delete_element("cameras.known", CAM2_MAC)
    assert removed is True
    assert await applier.control.delete_element("cameras.known", CAM2_MAC) is False
    assert await asyncio.to_thread(outcomes) == {
        "cam": "connected",
        "cam2": "timeout",
        "cam2-v4": "timeout",
    }

    refused = await applier.control.command(
        request.model_copy(
            update={"id": "bad", "argument": {"set": "cameras.known", "value": "fd00:ab:0:2::9"}}
        )
    )
    assert refused.outcome is CommandOutcome.BAD_ARGUMENT
    assert refused.error == "set cameras.known holds no ipv6 addresses"
    events = [e for e in applier.events() if e.get("device") == "policy"]
    assert [e["data"]["action"] for e in events] == ["add_element"]


def _table_handle(topology: Topology) -> int:
    listing = json.loads(topology.lab.nft("-j", "list", "table", "inet", TABLE).stdout)
    return next(int(i["table"]["handle"]) for i in listing["nftables"] if "table" in i)


def _rule_packets(topology: Topology) -> dict[str, int]:
    """Packets per rule comment of the table in the gateway namespace, read with nft itself."""
    listing = topology.lab.nft("-j", "list", "table", "inet", TABLE).stdout
    return {c.rule: c.packets for c in counters_from_json(listing)}


@pytest.mark.usefixtures("clean_table")
async def test_a_policy_nft_refuses_leaves_the_old_ruleset_in_force(
    topology: Topology, applier_factory: ApplierFactory, tmp_path: Path
) -> None:
    wrapper = str(topology.lab.nft_wrapper(tmp_path))
    broken_now: list[bool] = []

    def compiler(policy: Any, context: GatewayContext) -> str:
        """The real compiled text, once `broken_now` with one error in it (as a compiler bug or
        an nft without a feature the text uses would give)."""
        text = compile_policy(policy, context)
        return text.replace("tcp dport 7000", "tcp dport 70000", 1) if broken_now else text

    applier = applier_factory(wrapper, compiler=compiler)
    assert (await apply_policy(applier, topology, 1, POLICY)).status is AckStatus.APPLIED
    before = topology.lab.nft("-s", "list", "table", "inet", TABLE).stdout

    broken_now.append(True)
    opened = copy.deepcopy(POLICY)
    opened["flows"].append({"id": "sensors-all", "from": "sensors", "to": "any", "protocol": "tcp"})
    ack = await applier.control.handle(payload(applier.document(2, opened)), uplink_check(topology))
    assert ack is not None and ack.status is AckStatus.REJECTED
    assert ack.reason is not None
    assert ack.reason.startswith("nft -c refused the compiled policy: "), ack.reason
    assert "Error:" in ack.reason and "70000" in ack.reason, ack.reason
    assert ack.applied_version == 1
    assert topology.lab.nft("-s", "list", "table", "inet", TABLE).stdout == before
    sen, rec = topology.hosts["sen"], topology.hosts["rec"]
    assert await asyncio.to_thread(connect, sen.ns, rec.v6, PORT, 1.0) == "timeout"

    nft = Nft(wrapper, TABLE)
    with pytest.raises(NftError) as refused:
        await nft.apply("table inet campus_iot {\n\tchain input {\n\t\tnonsense\n\t}\n}\n")
    assert "/dev/stdin:3:" in refused.value.message  # nft names the line
    assert topology.lab.nft("-s", "list", "table", "inet", TABLE).stdout == before


@pytest.mark.usefixtures("clean_table")
async def test_commit_confirm_rolls_back_a_policy_that_cuts_the_uplink(
    topology: Topology, applier_factory: ApplierFactory, tmp_path: Path
) -> None:
    up = topology.hosts["up"]
    context = GatewayContext(TABLE, PORT, (ip_address(up.v6), ip_address(up.v4)))
    applier = applier_factory(
        str(topology.lab.nft_wrapper(tmp_path)), context=context, confirm_timeout_s=1.5
    )
    lab = topology.lab
    lab.nft("add", "table", "ip", "host_rules")  # the host's own rules: never touched
    lab.nft("add chain ip host_rules keep { type filter hook input priority 10; policy accept; }")
    lab.nft("add rule ip host_rules keep udp dport 9 counter")
    host_rules = lab.nft("-s", "list", "table", "ip", "host_rules").stdout
    guarded = {**POLICY, "restrict_output": True}
    ack = await apply_policy(applier, topology, 1, guarded)
    assert ack.status is AckStatus.APPLIED, ack.reason
    before = topology.lab.nft("-s", "list", "table", "inet", TABLE).stdout
    assert f'ip6 daddr {up.v6} tcp dport {PORT} counter accept comment "broker"' in before

    cut = {**guarded, "allow_broker": False}
    cutting = payload(applier.document(2, cut))
    started = time.monotonic()
    handled = await applier.control.handle(cutting, uplink_check(topology))
    assert handled is not None
    ack, took = handled, time.monotonic() - started
    assert ack.status is AckStatus.REJECTED
    assert ack.reason is not None and ack.reason.startswith("rolled back: uplink lost: "), (
        ack.reason
    )
    assert ack.reason.endswith(f"the previous table inet {TABLE} is back in force"), ack.reason
    assert (ack.version, ack.applied_version) == (2, 1)
    assert 1.5 <= took < 5, took
    assert topology.lab.nft("-s", "list", "table", "inet", TABLE).stdout == before
    assert await asyncio.to_thread(connect, topology.lab.gw, up.v6, PORT, 1.0) == "connected"
    saved = SignedDocument.model_validate_json(applier.control.store.path.read_bytes())
    assert saved.version == 1, "a rolled-back policy is never saved"
    rolled = [e for e in applier.events() if e["data"].get("rolled_back")]
    assert len(rolled) == 1 and rolled[0]["kind"] == "policy"
    assert lab.nft("-s", "list", "table", "ip", "host_rules").stdout == host_rules

    # the retained document comes back at every reconnect: it is not applied again
    started = time.monotonic()
    again = await applier.control.handle(cutting, uplink_check(topology))
    assert again is not None and again.status is AckStatus.REJECTED
    assert again.reason == (
        "version 2 was rolled back (uplink lost): not tried again; a corrected policy needs a "
        "new version"
    )
    assert time.monotonic() - started < 0.5
    assert topology.lab.nft("-s", "list", "table", "inet", TABLE).stdout == before

    # a first policy that cuts the uplink leaves no table behind
    topology.lab.nft("delete", "table", "inet", TABLE)
    fresh = applier_factory(
        str(topology.lab.nft_wrapper(tmp_path)), context=context, confirm_timeout_s=1.0
    )
    ack = await apply_policy(fresh, topology, 1, cut)
    assert ack.status is AckStatus.REJECTED
    assert ack.reason is not None and ack.reason.endswith(
        f"table inet {TABLE} removed (there was none before)"
    )
    assert topology.lab.nft("list", "table", "inet", TABLE, check=False).returncode != 0
    assert lab.nft("-s", "list", "table", "ip", "host_rules").stdout == host_rules
    lab.nft("delete", "table", "ip", "host_rules")


@pytest.mark.usefixtures("clean_table")
async def test_a_zone_known_by_address_alone_is_told_apart_behind_the_uplink(
    topology: Topology, applier_factory: ApplierFactory, tmp_path: Path
) -> None:
    applier = applier_factory(str(topology.lab.nft_wrapper(tmp_path)))
    assert (await apply_policy(applier, topology, 1, POLICY)).status is AckStatus.APPLIED
    up, rec = topology.hosts["up"], topology.hosts["rec"]
    staff6, staff4 = topology.staff
    attempts = {
        "staff>rec/v6": (up.ns, rec.v6, PORT, staff6),
        "staff>rec/v4": (up.ns, rec.v4, PORT, staff4),
        "uplink>rec/v6": (up.ns, rec.v6, PORT, up.v6),
        "uplink>rec/v4": (up.ns, rec.v4, PORT, up.v4),
        "rec>uplink:7001/v6": (rec.ns, up.v6, PORT + 1, None),
        "rec>staff:7001/v6": (rec.ns, staff6, PORT + 1, None),
        "rec>staff:7001/v4": (rec.ns, staff4, PORT + 1, None),
        "rec>staff:7000/v6": (rec.ns, staff6, PORT, None),
    }

    def run_all() -> dict[str, str]:
        with ThreadPoolExecutor(len(attempts)) as pool:
            futures = {
                k: pool.submit(connect, a[0], a[1], a[2], 1.0, a[3]) for k, a in attempts.items()
            }
            return {k: f.result() for k, f in futures.items()}

    assert await asyncio.to_thread(run_all) == {
        "staff>rec/v6": "connected",
        "staff>rec/v4": "connected",
        "uplink>rec/v6": "timeout",
        "uplink>rec/v4": "timeout",
        "rec>uplink:7001/v6": "connected",
        "rec>staff:7001/v6": "timeout",  # `to: uplink` is not `to: staff`, though both go out up0
        "rec>staff:7001/v4": "timeout",
        "rec>staff:7000/v6": "connected",  # `to: any` is
    }
    await applier.control.refresh_counters()
    seen = counters(applier)
    assert seen["flow:staff-recorder"] == 2 and seen["flow:recorder-uplink"] == 1
    assert seen["drop:forward:uplink"] >= 2 and seen["drop:forward:recorders"] >= 2


@pytest.mark.usefixtures("clean_table")
async def test_checks_come_before_nft_and_a_saved_policy_is_applied_again_at_start(
    topology: Topology, applier_factory: ApplierFactory, tmp_path: Path
) -> None:
    wrapper = str(topology.lab.nft_wrapper(tmp_path))
    applier = applier_factory(wrapper)
    good = applier.document(3, POLICY)
    check = uplink_check(topology)

    async def refused(data: bytes, reason: str) -> None:
        ack = await applier.control.handle(data, check)
        assert ack is not None and ack.status is AckStatus.REJECTED, ack
        assert ack.reason is not None and reason in ack.reason, ack.reason
        assert topology.lab.nft("list", "table", "inet", TABLE, check=False).returncode != 0

    await refused(
        payload(good.model_copy(update={"signature": ""})), "policy version 3 is not signed"
    )
    await refused(
        payload(good.model_copy(update={"body": {**POLICY, "restrict_output": True}})),
        "does not match its signed hash (tampered)",
    )
    stranger = applier.document(3, POLICY, key=Ed25519PrivateKey.generate())
    await refused(payload(stranger), "which this gateway does not trust")
    other = sign(
        applier.key, kind="policy", site="school-1", gateway="gw-2", version=3,
        issued_ns=time.time_ns(), body=POLICY,
    )  # fmt: skip
    await refused(payload(other), "for gateway school-1/gw-2, this gateway is school-1/gw-1")
    config = sign(
        applier.key, kind="config", site="school-1", gateway="gw-1", version=3,
        issued_ns=time.time_ns(), body=POLICY,
    )  # fmt: skip
    await refused(payload(config), "a config document on the policy topic")
    bad = copy.deepcopy(POLICY)
    bad["flows"][0]["to"] = "printers"
    bad["zones"][1]["ipv6"] = ["fd00:ab:0:1::/64"]
    await refused(
        payload(applier.document(3, bad)),
        "invalid policy: body.zones.1.ipv6.0: fd00:ab:0:1::/64 overlaps fd00:ab:0:1::/64 of zone "
        "'cameras'; body.flows.0.to: unknown zone 'printers'",
    )
    await refused(b"{not json", "not a valid signed document")

    applied = await applier.control.handle(payload(good), check)
    assert applied is not None and applied.status is AckStatus.APPLIED
    await refused_older(applier, check)
    again = await applier.control.handle(payload(good), check)
    assert again is not None and (again.status, again.applied_version) == (AckStatus.APPLIED, 3)

    # the agent restarts: the table is gone (a reboot), the saved policy is applied again
    topology.lab.nft("delete", "table", "inet", TABLE)
    restarted = applier_factory(wrapper)
    await restarted.control.startup()
    assert restarted.control.applied_version == 3
    assert restarted.control.text == applier.control.text
    listing = topology.lab.nft("list", "table", "inet", TABLE).stdout
    assert 'comment "flow:cameras-recorder"' in listing
    cam, rec = topology.hosts["cam"], topology.hosts["rec"]
    assert await asyncio.to_thread(connect, cam.ns, rec.v6, PORT, 1.0) == "connected"

    # a saved file that is no longer trusted is set aside, and nothing is applied
    topology.lab.nft("delete", "table", "inet", TABLE)
    path = restarted.control.store.path
    path.write_bytes(payload(applier.document(9, POLICY, key=Ed25519PrivateKey.generate())))
    distrustful = applier_factory(wrapper)
    await distrustful.control.startup()
    assert distrustful.control.applied is None
    assert not path.exists() and list(path.parent.glob("policy.applied.json.bad-*"))
    assert topology.lab.nft("list", "table", "inet", TABLE, check=False).returncode != 0


async def refused_older(applier: Applier, check: Any) -> None:
    ack = await applier.control.handle(payload(applier.document(2, POLICY)), check)
    assert ack is not None and ack.status is AckStatus.REJECTED
    assert ack.reason == "version 2 is older than the applied version 3: replay refused"


async def test_without_nft_or_its_rights_the_policy_is_refused_clearly(
    applier_factory: ApplierFactory, tmp_path: Path
) -> None:
    missing = applier_factory("/nonexistent/nft")
    ack = await missing.control.handle(payload(missing.document(1, POLICY)), _never_called)
    assert ack is not None and ack.status is AckStatus.REJECTED
    assert ack.reason == "nft not available: /nonexistent/nft is missing or not executable"

    # the real nft, run as an unprivileged user, in a namespace of its own
    namespace = f"ci-nopriv-{os.getpid()}"
    netns.run("ip", "netns", "add", namespace)
    try:
        wrapper = tmp_path / "nft-nobody"
        wrapper.write_text(
            "#!/bin/sh\nexec ip netns exec "
            f'{namespace} setpriv --reuid=65534 --regid=65534 --clear-groups nft "$@"\n'
        )
        wrapper.chmod(0o755)
        unprivileged = applier_factory(str(wrapper))
        ack = await unprivileged.control.handle(
            payload(unprivileged.document(1, POLICY)), _never_called
        )
        assert ack is not None and ack.status is AckStatus.REJECTED
        assert ack.reason is not None and ack.reason.startswith("nft not available: "), ack.reason
        assert "CAP_NET_ADMIN" in ack.reason

        disabled = applier_factory(str(wrapper), enabled=False)
        ack = await disabled.control.handle(payload(disabled.document(1, POLICY)), _never_called)
        assert ack is not None and ack.reason is not None
        assert "enforcement is disabled on this gateway" in ack.reason
        assert disabled.control.state() is None
    finally:
        netns.run("ip", "netns", "del", namespace, check=False)


async def _never_called(timeout_s: float) -> None:
    raise AssertionError("no uplink check without an applied table")


# -- a whole agent in the gateway namespace ------------------------------------------------------


class Broker:
    """Mosquitto in the uplink namespace, with a subscriber that writes every message to a file."""

    def __init__(self, lab: Lab, host: Host, workdir: Path) -> None:
        self.lab, self.host, self.workdir = lab, host, workdir
        self.port = free_port()
        self.processes: list[subprocess.Popen[bytes]] = []
        self.seen = workdir / "seen.txt"

    def start(self, site: str) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = self.workdir / "mosquitto.log"
        (self.workdir / "mosquitto.conf").write_text(
            f"user root\nlistener {self.port} {self.host.v6}\nlistener {self.port} ::1\n"
            f"allow_anonymous true\npersistence false\nlog_dest file {log}\n"
            "log_type all\n"
        )
        self._spawn("mosquitto", "-c", str(self.workdir / "mosquitto.conf"))
        deadline = time.monotonic() + 10
        while not (log.exists() and b"running" in log.read_bytes()):
            assert time.monotonic() < deadline, "mosquitto did not start"
            time.sleep(0.02)
        with self.seen.open("wb") as out:
            self._spawn(
                "mosquitto_sub", "-h", "::1", "-p", str(self.port), "-V", "mqttv5", "-v",
                "-t", f"campus/{site}/#", stdout=out,
            )  # fmt: skip
        marker = f"campus/{site}/ready"
        while marker not in self.seen.read_text():
            assert time.monotonic() < deadline, "mosquitto_sub did not subscribe"
            self.publish(marker, b"1", retain=False)
            time.sleep(0.1)

    def _spawn(self, *command: str, stdout: Any = subprocess.DEVNULL) -> None:
        program = find_mosquitto() if command[0] == "mosquitto" else command[0]
        self.processes.append(
            subprocess.Popen(
                ["ip", "netns", "exec", self.host.ns, program, *command[1:]],
                stdout=stdout,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )

    def publish(self, topic: str, data: bytes, *, retain: bool = True) -> None:
        file = self.workdir / "publish.json"
        file.write_bytes(data)
        args = ["-r"] if retain else []
        self.lab.exec(
            self.host.ns, "mosquitto_pub", "-h", "::1", "-p", str(self.port), "-V", "mqttv5",
            "-q", "1", "-t", topic, "-f", str(file), *args,
        )  # fmt: skip

    def messages(self, topic: str) -> list[bytes]:
        found = []
        for line in self.seen.read_bytes().splitlines():
            name, _, data = line.partition(b" ")
            if name.decode() == topic:
                found.append(data)
        return found

    def stop(self) -> None:
        for process in reversed(self.processes):
            stop_process(process, 5)


def stop_process(process: subprocess.Popen[bytes], timeout: float) -> int:
    """SIGTERM to the process group (a planned stop), SIGKILL after `timeout`; its exit code."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        return process.wait()


def start_agent(lab: Lab, workdir: Path, settings: dict[str, Any]) -> subprocess.Popen[bytes]:
    """A whole agent (tests/agent_host.py) in the gateway namespace, logging to agent.log:
    `settings` are the test's (site, mqtt, fleet keys, policy), the rest is filled in here."""
    config = {
        "gateway": "gw-1",
        "buffer": {"path": str(workdir / "buffer.db")},
        "clock": {"sync_check": "none"},
        "state_interval_s": 1,
        **settings,
    }
    (workdir / "agent.yaml").write_text(yaml.safe_dump(config))
    with (workdir / "agent.log").open("wb") as log:
        return subprocess.Popen(
            [
                "ip", "netns", "exec", lab.gw, sys.executable,
                str(REPO / "tests" / "agent_host.py"), str(workdir / "agent.yaml"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)},
        )  # fmt: skip


def agent_log(workdir: Path) -> str:
    return (workdir / "agent.log").read_text(errors="replace")[-3000:]


@pytest.fixture
def broker_in_uplink(topology: Topology, tmp_path: Path) -> Iterator[Broker]:
    broker = Broker(topology.lab, topology.hosts["up"], tmp_path / "broker")
    yield broker
    broker.stop()


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.usefixtures("clean_table")
def test_an_agent_in_the_gateway_namespace_rolls_back_a_policy_that_cuts_its_uplink(
    topology: Topology, broker_in_uplink: Broker, tmp_path: Path
) -> None:
    broker, lab, up = broker_in_uplink, topology.lab, topology.hosts["up"]
    site = f"school-{broker.port}"
    broker.start(site)
    key_path = tmp_path / "keys" / "fleet.key"
    generate_key(key_path)
    key = load_private_key(key_path)
    agent = start_agent(
        lab,
        tmp_path,
        {
            "site": site,
            "mqtt": {"host": up.v6, "port": broker.port, "keepalive_s": 5, "reconnect_max_s": 2},
            "fleet": {"public_keys": [str(public_path(key_path))]},
            "policy": {
                "enabled": True,
                "table": TABLE,
                "applied_path": str(tmp_path / "policy.applied.json"),
                "confirm_timeout_s": 3,
            },
        },
    )
    topic = f"campus/{site}/gw/gw-1"
    try:

        def states() -> list[GatewayState]:
            return [GatewayState.model_validate_json(p) for p in broker.messages(f"{topic}/state")]

        def acks() -> list[Ack]:
            return [Ack.model_validate_json(p) for p in broker.messages(f"{topic}/ack")]

        wait_for(lambda: any(s.status == "online" for s in states()), 20, "the agent online")
        guarded = {**POLICY, "restrict_output": True}

        def push(version: int, body: dict[str, Any]) -> Ack:
            seen = len(acks())
            document = sign(
                key, kind="policy", site=site, gateway="gw-1", version=version,
                issued_ns=time.time_ns(), body=body,
            )  # fmt: skip
            broker.publish(f"{topic}/policy", payload(document))
            ack: Ack = wait_for(lambda: acks()[seen:] and acks()[seen], 20, f"ack of v{version}")
            return ack

        ack = push(1, guarded)
        assert (ack.kind, ack.status, ack.version) == ("policy", AckStatus.APPLIED, 1), ack.reason
        before = lab.nft("-s", "list", "table", "inet", TABLE).stdout
        assert (
            f'ip6 daddr {up.v6} tcp dport {broker.port} counter accept comment "broker"' in before
        )

        started = time.monotonic()
        ack = push(2, {**guarded, "allow_broker": False})
        assert ack.status is AckStatus.REJECTED
        assert ack.reason is not None
        assert ack.reason.startswith(
            f"rolled back: uplink lost: no new TCP connection to the broker at [{up.v6}]:"
            f"{broker.port} within 3 s"
        ), ack.reason
        assert ack.applied_version == 1
        assert 3 <= time.monotonic() - started < 12
        assert lab.nft("-s", "list", "table", "inet", TABLE).stdout == before
        assert connect(lab.gw, up.v6, broker.port, 2.0) == "connected"

        context = GatewayContext(TABLE, broker.port, (ip_address(up.v6),))
        text = compile_policy(parse_policy(guarded), context)
        rolled_back_ns = ack.ts_ns
        state = wait_for(
            lambda: [s for s in states() if s.ts_ns and s.ts_ns > rolled_back_ns and s.policy],
            10,
            "a state after the rollback",
        )[-1]
        assert state.policy_version == 1
        assert state.policy is not None
        assert state.policy.sha256 == hashlib.sha256(text.encode()).hexdigest()
        by_rule = {c.rule: c for c in state.policy.counters}
        assert by_rule["broker"].verdict == "accept" and by_rule["broker"].packets >= 1
        assert by_rule["drop:output"].verdict == "drop"
        events = [json.loads(p) for p in broker.messages(f"{topic}/events")]
        rolled = [e for e in events if e["kind"] == "policy" and e["data"].get("rolled_back")]
        assert rolled and rolled[0]["data"]["version"] == 2

        # the fleet's command path: a camera admitted at once, without a reload
        command = CommandRequest(
            id="admit-cam2",
            device="policy",
            action="add_element",
            argument={"set": "cameras.known", "value": CAM2_MAC},
            issued_ns=time.time_ns(),
            deadline_ns=time.time_ns() + 30 * 10**9,
        )
        broker.publish(f"{topic}/cmd", command.model_dump_json().encode(), retain=False)
        result = json.loads(
            wait_for(lambda: broker.messages(f"{topic}/cmd/result"), 10, "result")[0]
        )
        assert (result["id"], result["outcome"]) == ("admit-cam2", "ok"), result
        members = lab.nft("list", "set", "inet", TABLE, "dev_cameras_known_mac").stdout
        assert CAM2_MAC in members and CAM_MAC in members
    finally:
        returncode = stop_process(agent, 15)
    assert returncode == 0, agent_log(tmp_path)  # a planned stop


# -- the whole chain: campus-fleet → broker → agent → nftables -----------------------------------


class FleetInUplink:
    """`campus-fleet serve` in the uplink namespace (its broker at ::1 there), and the CLI run
    beside it on the same database, as IT staff would."""

    def __init__(self, broker: Broker, site: str, workdir: Path) -> None:
        self.broker, self.site, self.workdir = broker, site, workdir
        self.gateway = f"gateway:{site}/gw-1"
        self.config = workdir / "fleet.yaml"
        self.public_key = workdir / "keys" / "fleet-signing.key.pub"  # `keys generate` makes it
        self.process: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            yaml.safe_dump(
                {
                    "name": f"fleet-{site}",
                    "mqtt": {"host": "::1", "port": broker.port, "keepalive_s": 5},
                    "database": str(workdir / "fleet.db"),
                    "sites": [site],
                    "signing_key": str(workdir / "keys" / "fleet-signing.key"),
                    # the broker as the gateways reach it: `policy render` compiles with it
                    "agent_broker": {"host": broker.host.v6, "port": broker.port},
                }
            )
        )

    def cli(self, *args: str, ok: tuple[int, ...] = (0,)) -> str:
        done = subprocess.run(
            [str(FLEET_CLI), "--config", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode in ok, (args, done.returncode, done.stdout, done.stderr)
        return done.stdout

    def json(self, *args: str, ok: tuple[int, ...] = (0,)) -> Any:
        return json.loads(self.cli(*args, "--json", ok=ok))

    def settings(self, target: str, settings: dict[str, Any]) -> None:
        path = self.workdir / f"{target.replace(':', '-').replace('/', '-')}.yaml"
        path.write_text(yaml.safe_dump(settings, sort_keys=False))
        self.cli("settings", "set", target, str(path))

    def start(self) -> None:
        log = self.workdir / "fleet.log"
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [
                    "ip", "netns", "exec", self.broker.host.ns,
                    str(FLEET_CLI), "--config", str(self.config), "serve",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip
        wait_for(lambda: b"subscribed to" in log.read_bytes(), 20, "campus-fleet serve subscribed")
        wait_for(self._heard, 10, "the fleet service's heartbeat, connected")

    def _heard(self) -> bool:
        conn = sqlite3.connect(f"file:{self.workdir / 'fleet.db'}?mode=ro", uri=True)
        try:
            row = conn.execute("SELECT max(connected) FROM service").fetchone()
        finally:
            conn.close()
        return bool(row and row[0])

    def stop(self) -> int | None:
        return None if self.process is None else stop_process(self.process, 10)

    def log(self) -> str:
        return (self.workdir / "fleet.log").read_text(errors="replace")[-3000:]

    def status(self) -> dict[str, Any]:
        rows = self.json("policy", "status", self.gateway, ok=(0, 4))
        assert len(rows) == 1, rows
        row: dict[str, Any] = rows[0]
        return row


@pytest.mark.slow
@pytest.mark.usefixtures("clean_table")
def test_a_policy_pushed_from_campus_fleet_is_enforced_on_the_gateway_and_proven_by_traffic(
    topology: Topology, broker_in_uplink: Broker, tmp_path: Path
) -> None:
    broker, lab, up = broker_in_uplink, topology.lab, topology.hosts["up"]
    site = f"school-{broker.port}"
    broker.start(site)
    fleet = FleetInUplink(broker, site, tmp_path / "fleet")
    gateway = fleet.gateway
    fleet.cli("keys", "generate")
    fleet.cli("site", "add", site, "--name", "A teaching building")
    fleet.cli("gateway", "add", "gw-1", "--site", site)

    # the site sets the zones, their device sets and most flows; the gateway adds its own flow
    site_flows = [flow for flow in POLICY["flows"] if flow["id"] != "sensors-gateway"]
    fleet.settings(
        f"site:{site}", {"policy": {**POLICY, "flows": site_flows, "restrict_output": True}}
    )
    sensors = {"id": "sensors", "from": "sensors", "to": "gateway", "protocol": "tcp"}
    fleet.settings(gateway, {"policy": {"flows": [{**sensors, "ports": [PORT]}]}})
    shown = fleet.json("policy", "show", gateway)["policy"]
    assert [flow["id"] for flow in shown["flows"]] == [f["id"] for f in site_flows] + ["sensors"]
    assert [zone["id"] for zone in shown["zones"]] == [z["id"] for z in POLICY["zones"]]

    agent: subprocess.Popen[bytes] | None = None
    try:
        fleet.start()
        agent = start_agent(
            lab,
            tmp_path,
            {
                "site": site,
                "mqtt": {
                    "host": up.v6,
                    "port": broker.port,
                    "keepalive_s": 5,
                    "reconnect_max_s": 2,
                },
                "fleet": {"public_keys": [str(fleet.public_key)]},
                "policy": {
                    "enabled": True,
                    "table": TABLE,
                    "applied_path": str(tmp_path / "policy.applied.json"),
                    "confirm_timeout_s": 3,
                },
            },
        )
        wait_for(
            lambda: fleet.status()["gateway_status"] == "online",
            20,
            "the agent online at the fleet",
        )
        assert fleet.json("policy", "diff", gateway)[0]["changed"] is True  # nothing applied yet

        def push(version: int) -> None:
            pushed = fleet.json("policy", "push", gateway, "--timeout", "20")
            assert pushed == {
                "service": "running",
                "gateways": [
                    {
                        "site": site,
                        "gateway": "gw-1",
                        "version": version,
                        "new": True,
                        "state": "applied",
                        "reason": None,
                    }
                ],
            }, (pushed, agent_log(tmp_path), fleet.log())

        def enforced(version: int, allowed: dict[tuple[str, str], set[str]]) -> dict[str, Any]:
            """The matrix connects as `allowed` says, and the fleet sees `version` in force:
            the hash of its own rendering, the drops counted. The status, with its counters."""
            outcomes = topology.run_matrix()
            assert outcomes == expected_outcomes(outcomes, allowed)
            blocked = sum(outcome == "timeout" for outcome in outcomes.values())
            status: dict[str, Any] = wait_for(
                lambda: (row := fleet.status())["dropped_packets"] >= blocked and row,
                10,
                f"the drops of v{version} at the fleet",
            )
            rendered = fleet.cli("policy", "render", gateway)
            assert (
                status["applied_version"],
                status["desired_version"],
                status["in_sync"],
                status["last_ack"],
                status["enforcement_error"],
                status["running_sha256"],
            ) == (version, version, True, "applied", None, sha256(rendered))
            # byte for byte, restrict_output's broker rule included: the fleet renders it with
            # the broker as the gateways reach it (agent_broker), not as the fleet does (::1)
            broker_rule = f"ip6 daddr {up.v6} tcp dport {broker.port} counter accept"
            assert broker_rule in rendered
            assert broker_rule in lab.nft("-s", "list", "table", "inet", TABLE).stdout
            return status

        push(1)
        status = enforced(1, ALLOWED)
        by_rule = {c["rule"]: c["packets"] for c in status["counters"]}
        assert by_rule["flow:sensors"] == 2  # sen>gw, once per family: the gateway's own flow
        assert fleet.json("policy", "diff", gateway) == [
            {"site": site, "gateway": "gw-1", "applied_version": 1, "changed": False, "diff": ""}
        ]

        # the gateway's flow changes: sensors may reach the recorder now, no longer the gateway
        fleet.settings(
            gateway, {"policy": {"flows": [{**sensors, "to": "recorders", "ports": [PORT]}]}}
        )
        (diff,) = fleet.json("policy", "diff", gateway)
        assert diff["changed"] is True and diff["applied_version"] == 1
        text = diff["diff"]
        removed = [line for line in text.splitlines() if line.startswith("-\t")]
        added = [line for line in text.splitlines() if line.startswith("+\t")]
        assert removed == ['-\t\ttcp dport 7000 counter accept comment "flow:sensors"'], text
        assert added == [
            '+\t\toifname "rec0" ip6 daddr @zone_recorders_v6 tcp dport 7000 counter accept '
            'comment "flow:sensors"',
            '+\t\toifname "rec0" ip daddr @zone_recorders_v4 tcp dport 7000 counter accept '
            'comment "flow:sensors"',
        ], text
        push(2)
        moved = {pair: families for pair, families in ALLOWED.items() if pair != ("sen", "gw")}
        status = enforced(2, moved | {("sen", "rec"): {"v6", "v4"}})
        by_rule = {c["rule"]: c["packets"] for c in status["counters"]}
        assert by_rule["flow:sensors"] == 2  # sen>rec now (a new table: new counters)
        assert fleet.json("policy", "diff", gateway)[0]["changed"] is False

        # a camera outside cameras.known, admitted and removed again through the fleet, live
        cam, cam2, rec = (topology.hosts[n] for n in ("cam", "cam2", "rec"))

        def cam2_to_recorder() -> dict[str, str]:
            pair = [
                ("cam/v6", cam.ns, rec.v6, PORT),
                ("cam2/v6", cam2.ns, rec.v6, PORT),
                ("cam2/v4", cam2.ns, rec.v4, PORT),
            ]
            return {a[0]: outcome for a, outcome in connect_all(pair, 1.0).items()}

        def known(which: str = "desired") -> dict[str, Any]:
            """The set cameras.known in the policy `policy show` gives (desired or applied)."""
            flags = ("--applied",) if which == "applied" else ()
            body = fleet.json("policy", "show", gateway, *flags)["policy"]
            (cameras,) = [zone for zone in body["zones"] if zone["id"] == "cameras"]
            (found,) = [s for s in cameras["sets"] if s["id"] == "known"]
            return dict(found)

        def member(action: str) -> None:
            answer = fleet.json(
                "policy", "member", action, gateway, "cameras.known", CAM2_MAC, "--timeout", "10"
            )
            assert {k: v for k, v in answer.items() if k != "id"} == {
                "site": site,
                "gateway": "gw-1",
                "set": "cameras.known",
                "value": CAM2_MAC,
                "written_to": f"site:{site}",  # the site defines the set, not the gateway
                "status": "ok",
                "result": {"set": "cameras.known", "value": CAM2_MAC, "changed": True},
                "error": None,
            }, (answer, agent_log(tmp_path), fleet.log())

        dropped = {"cam/v6": "connected", "cam2/v6": "timeout", "cam2/v4": "timeout"}
        assert cam2_to_recorder() == dropped
        handle, before = _table_handle(topology), _rule_packets(topology)
        member("add")
        assert cam2_to_recorder() == dict.fromkeys(dropped, "connected")
        after = _rule_packets(topology)
        assert _table_handle(topology) == handle, "the table was not reloaded"
        assert after["flow:cameras-recorder"] == before["flow:cameras-recorder"] + 3, (
            "counters kept counting: no reload"
        )
        assert after["admit:cameras"] == before["admit:cameras"]
        assert known() == {"id": "known", "macs": [CAM_MAC, CAM2_MAC]}
        assert known("applied") == {"id": "known", "macs": [CAM_MAC]}
        (diff,) = fleet.json("policy", "diff", gateway)
        assert diff["changed"] is True and diff["applied_version"] == 2
        lines = diff["diff"].splitlines()
        assert [line for line in lines if line[:2] in ("-\t", "+\t")] == [
            f"-\t\telements = {{ {CAM_MAC} }}",
            "+\t\telements = {",
            f"+\t\t\t{CAM_MAC},",
            f"+\t\t\t{CAM2_MAC},",
            "+\t\t}",
        ], diff["diff"]
        assert fleet.status()["applied_version"] == 2  # nothing pushed

        member("remove")
        assert cam2_to_recorder() == dropped
        assert _table_handle(topology) == handle
        assert _rule_packets(topology)["admit:cameras"] >= after["admit:cameras"] + 2
        assert fleet.json("policy", "diff", gateway)[0]["changed"] is False
        # an address in a set of MACs: refused before the tree changes (declaring `ipv6` there
        # would make the set match by address, and never over IPv4, at the next push)
        fleet.cli("policy", "member", "add", gateway, "cameras.known", cam2.v6, ok=(2,))
        assert known() == {"id": "known", "macs": [CAM_MAC]}
    finally:
        returncode = None if agent is None else stop_process(agent, 15)
        fleet_returncode = fleet.stop()
    assert returncode == 0, agent_log(tmp_path)  # planned stops
    assert fleet_returncode == 0, fleet.log()


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
