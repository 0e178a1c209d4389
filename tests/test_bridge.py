"""The bridge to the cloud: exact rendering, argument checks, and two real Mosquittos.

The cloud broker has a TLS listener that requires a client certificate from a test CA, and an
ACL keyed on the certificate's CN; the school broker loads the rendered file from its
include_dir, as /etc/mosquitto/conf.d would. Independent clients: paho in this process, and
mosquitto_pub for the burst published while the cloud is down.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePath
from typing import Any, NamedTuple

import paho.mqtt.client as paho
import pytest
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives import serialization
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from fleet.bridge import (
    BridgeError,
    BridgeSpec,
    CloudAddress,
    parse_cloud,
    parse_restart_timeout,
    render_bridge,
    split_names,
)
from fleet.cli import main
from simulator.broker import MosquittoBroker, TlsListener, free_ports
from simulator.processes import stop_group
from tests.conftest import wait_for
from tests.tls_certs import Pki, make_test_pki

SITE = "school-42"
CERTS = PurePath("/etc/mosquitto/certs")

# The cloud's ACL: each school's certificate CN is its site id; it may write under its own
# prefix and read only the downlink channels the cloud is willing to send. The cloud's own
# consumer logs in on the plain listener as cloud-reader (a `user` block: Mosquitto 2.0.11
# does not apply the anonymous block to sessions restored after a restart). The last line
# would let a bridge publish its connection state at the cloud, so that a test sees it if
# the rendered config sent it up (notifications_local_only keeps it at the school).
CLOUD_ACL = """\
user cloud-reader
topic read cloud/#
topic write cloud/+/gw/#
topic read $SYS/broker/connection/#

pattern write cloud/%u/#
pattern read cloud/%u/gw/+/config
pattern read cloud/%u/gw/+/cmd
pattern write $SYS/broker/connection/%c/state
"""


# -- the renderer: exact text -----------------------------------------------------------------


def spec(**changes: Any) -> BridgeSpec:
    fields: dict[str, Any] = {
        "site": SITE,
        "cloud": CloudAddress("mqtt.district.example", 8883),
        "cafile": CERTS / "cloud-ca.pem",
        "certfile": CERTS / "school-42.crt",
        "keyfile": CERTS / "school-42.key",
    }
    return BridgeSpec(**{**fields, **changes})


EXPECTED_DEFAULT = """\
# Mosquitto bridge of site school-42 to the cloud at mqtt.district.example:8883, rendered by
# `campus-fleet bridge render`. Install as /etc/mosquitto/conf.d/campus-cloud.conf on
# the school's broker and restart it. Bridge state (1 connected, 0 not), published on
# this broker only:
#   mosquitto_sub -v -t '$SYS/broker/connection/school-42.campus-cloud/state'
connection campus-cloud
address mqtt.district.example:8883
# MQTT 3.1.1: Mosquitto 2.0 keeps a 3.1.1 bridge's session on the cloud; with mqttv50
# the bridge gets no session there, and what the cloud queued for it is lost.
bridge_protocol_version mqttv311
try_private true
# A persistent session under a fixed client id: while the cloud is unreachable, QoS 1
# messages wait in this broker (up to its max_queued_messages, saved with persistence).
cleansession false
remote_clientid school-42.campus-cloud
local_clientid local.school-42.campus-cloud
restart_timeout 5 60
notifications true
notifications_local_only true
bridge_attempt_unsubscribe false
# TLS: the CA of the cloud broker's certificate, and this school's client certificate
# (the cloud's ACL expects its CN to be the site id).
bridge_cafile /etc/mosquitto/certs/cloud-ca.pem
bridge_certfile /etc/mosquitto/certs/school-42.crt
bridge_keyfile /etc/mosquitto/certs/school-42.key
# Up to the cloud, QoS 1: campus/school-42/X becomes cloud/school-42/X.
topic gw/+/telemetry out 1 campus/school-42/ cloud/school-42/
topic gw/+/state out 1 campus/school-42/ cloud/school-42/
topic gw/+/events out 1 campus/school-42/ cloud/school-42/
topic alerts out 1 campus/school-42/ cloud/school-42/
# Nothing comes down from the cloud: no config, policy or cmd.
"""


def test_default_rendering_is_exact() -> None:
    assert render_bridge(spec()) == EXPECTED_DEFAULT


def test_downlink_lines_come_last_with_a_loud_comment() -> None:
    text = render_bridge(spec(downlink=("cmd", "config"), name="district"))
    tail = text.split("topic alerts out 1 campus/school-42/ cloud/school-42/\n")[1]
    banner = "# " + "!" * 78
    assert tail.splitlines() == [
        banner,
        "# DOWN FROM THE CLOUD: cmd, config. Whoever may publish on these topics at the cloud",
        "# reaches this site's gateways. Taking a line out does not end the subscription",
        "# the cloud keeps in this bridge's session: take its read right out of the cloud's",
        "# ACL too.",
        "#   cloud/school-42/gw/+/cmd -> campus/school-42/gw/+/cmd",
        "#   cloud/school-42/gw/+/config -> campus/school-42/gw/+/config",
        banner,
        "topic gw/+/cmd in 1 campus/school-42/ cloud/school-42/",
        "topic gw/+/config in 1 campus/school-42/ cloud/school-42/",
    ]
    assert "connection district\n" in text
    assert "remote_clientid school-42.district\n" in text


def test_channels_prefix_restart_and_ipv6_address() -> None:
    text = render_bridge(
        spec(
            cloud=parse_cloud("[FD00:0::10]:8883"),
            remote_prefix_template="district-7/{site}/in/",
            channels=("telemetry", "cmd/result", "ack"),
            restart_timeout=(2, 30),
        )
    )
    lines = text.splitlines()
    assert "address fd00::10:8883" in lines
    assert "restart_timeout 2 30" in lines
    assert [line for line in lines if line.startswith("topic ")] == [
        "topic gw/+/telemetry out 1 campus/school-42/ district-7/school-42/in/",
        "topic gw/+/cmd/result out 1 campus/school-42/ district-7/school-42/in/",
        "topic gw/+/ack out 1 campus/school-42/ district-7/school-42/in/",
    ]
    assert text.startswith("# Mosquitto bridge of site school-42 to the cloud at [fd00::10]:8883")
    # Mosquitto has no trailing comments: every line is a comment or a directive.
    assert all(line.startswith("#") or " #" not in line for line in lines)


@pytest.mark.parametrize(
    ("text", "host", "port", "address"),
    [
        ("mqtt.district.example:8883", "mqtt.district.example", 8883, "mqtt.district.example:8883"),
        ("localhost:1883", "localhost", 1883, "localhost:1883"),
        ("10.0.0.5:8883", "10.0.0.5", 8883, "10.0.0.5:8883"),
        ("[fd00::1]:8883", "fd00::1", 8883, "fd00::1:8883"),
        (" [::1]:18883 ", "::1", 18883, "::1:18883"),
        ("[2001:DB8:0:0::7]:8883", "2001:db8::7", 8883, "2001:db8::7:8883"),
    ],
)
def test_cloud_addresses(text: str, host: str, port: int, address: str) -> None:
    cloud = parse_cloud(text)
    assert (cloud.host, cloud.port, cloud.config_address) == (host, port, address)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("mqtt.district.example", "needs a port"),
        ("fd00::1:8883", "write an IPv6 address in brackets"),
        ("[fd00::1]", "needs a port after the address"),
        ("[fd00::1:8883", "'[' without ']'"),
        ("[10.0.0.5]:8883", "is not an IPv6 address"),
        ("mqtt.example:0", "from 1 to 65535"),
        ("mqtt.example:65536", "from 1 to 65535"),
        ("mqtt.example:88a", "from 1 to 65535"),
        (":8883", "has no host"),
        ("under_score.example:8883", "neither a host name nor an IP address"),
        ("-lead.example:8883", "neither a host name nor an IP address"),
        ("10.0.0.256:8883", "neither a host name nor an IP address"),
    ],
)
def test_bad_cloud_addresses(text: str, message: str) -> None:
    with pytest.raises(BridgeError, match=r"^--cloud: ") as raised:
        parse_cloud(text)
    assert message in raised.value.message


@pytest.mark.parametrize(
    ("changes", "option", "message"),
    [
        ({"site": "School_42"}, "--site", "1-63 characters"),
        ({"name": "my bridge"}, "--name", "bridge id"),
        ({"remote_prefix_template": "cloud/{site}"}, "--remote-prefix", "must end with '/'"),
        ({"remote_prefix_template": "cloud/+/"}, "--remote-prefix", "no wildcards"),
        ({"remote_prefix_template": "cloud//{site}/"}, "--remote-prefix", "non-empty"),
        ({"remote_prefix_template": "$SYS/{site}/"}, "--remote-prefix", "'$'"),
        ({"remote_prefix_template": "{school}/"}, "--remote-prefix", "only {site} is known"),
        ({"channels": ()}, "--channels", "at least one"),
        ({"channels": ("telemetry", "config")}, "--channels", "use --downlink config"),
        ({"channels": ("cmd",)}, "--channels", "use --downlink cmd"),
        ({"channels": ("metrics",)}, "--channels", "unknown channel 'metrics'"),
        ({"downlink": ("telemetry",)}, "--downlink", "cannot come down"),
        ({"cafile": PurePath("certs/ca.pem")}, "--cafile", "absolute path"),
        ({"keyfile": PurePath("/etc/k\nconnection evil")}, "--keyfile", "control characters"),
        ({"restart_timeout": (0, 5)}, "--restart-timeout", "1 <= BASE <= CAP"),
        ({"restart_timeout": (10, 5)}, "--restart-timeout", "1 <= BASE <= CAP"),
    ],
)
def test_spec_refuses(changes: dict[str, Any], option: str, message: str) -> None:
    with pytest.raises(BridgeError) as raised:
        spec(**changes)
    assert raised.value.option == option
    assert message in raised.value.message


def test_small_parsers() -> None:
    assert split_names(" telemetry, state,,telemetry ") == ("telemetry", "state")
    assert split_names("") == ()
    assert parse_restart_timeout("5:60") == (5, 60)
    assert parse_restart_timeout("3") == (3, 3)
    with pytest.raises(BridgeError, match="--restart-timeout"):
        parse_restart_timeout("5s")


# -- the command ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_test_pki(tmp_path_factory.mktemp("pki"), ("school-42", "school-43", "other"))


def render_args(pki: Pki, cloud: str, *extra: str, client: str = SITE) -> list[str]:
    pair = pki.clients[client]
    return [
        "bridge",
        "render",
        "--cloud",
        cloud,
        "--site",
        SITE,
        "--cafile",
        str(pki.ca),
        "--certfile",
        str(pair.cert),
        "--keyfile",
        str(pair.key),
        *extra,
    ]


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_cli_prints_what_the_renderer_renders(pki: Pki) -> None:
    result = cli(*render_args(pki, "[fd00::1]:8883", "--downlink", "config"))
    assert result.exit_code == 0, result.output
    pair = pki.clients[SITE]
    expected = spec(
        cloud=CloudAddress("fd00::1", 8883),
        cafile=pki.ca,
        certfile=pair.cert,
        keyfile=pair.key,
        downlink=("config",),
    )
    assert result.stdout == render_bridge(expected)


def test_cli_writes_the_file_and_json(pki: Pki, tmp_path: Path) -> None:
    out = tmp_path / "conf.d" / "campus-cloud.conf"
    out.parent.mkdir()
    result = cli(*render_args(pki, "127.0.0.1:8883", "--out", str(out), "--json"))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert out.read_text() == report["config"]
    assert "connection campus-cloud\naddress 127.0.0.1:8883\n" in report["config"]
    assert out.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in out.parent.iterdir()] == ["campus-cloud.conf"]
    assert report["out"] == str(out)
    assert report["cloud"] == {"host": "127.0.0.1", "port": 8883, "address": "127.0.0.1:8883"}
    assert report["state_topic"] == "$SYS/broker/connection/school-42.campus-cloud/state"
    assert report["up"][0] == {
        "local": "campus/school-42/gw/+/telemetry",
        "remote": "cloud/school-42/gw/+/telemetry",
    }
    assert report["down"] == []
    assert report["certificate"]["subject_cn"] == SITE


def test_cli_warns_when_the_certificate_is_not_the_sites(pki: Pki) -> None:
    result = cli(*render_args(pki, "127.0.0.1:8883", client="other"))
    assert result.exit_code == 0
    assert "warning: the certificate's CN is 'other', not the site id 'school-42'" in result.stderr


def test_cli_refuses_bad_arguments(pki: Pki, tmp_path: Path) -> None:
    def refused(*args: str) -> str:
        result = cli(*args)
        assert result.exit_code == 2, result.output
        assert result.stdout == ""
        return result.stderr

    ok = render_args(pki, "127.0.0.1:8883")
    assert "--cloud: 'fd00::1:8883': write an IPv6 address in brackets" in refused(
        *render_args(pki, "fd00::1:8883")
    )
    assert "--site: site id 'School 42'" in refused(*ok[:5], "School 42", *ok[6:])
    missing = [*ok[:7], str(tmp_path / "nope.pem"), *ok[8:]]
    assert "'--cafile'" in refused(*missing) and "does not exist" in refused(*missing)
    mismatch = [*ok[:11], str(pki.clients["other"].key)]
    assert f"--keyfile: {pki.clients['other'].key} is not the key of" in refused(*mismatch)
    not_pem = [*ok[:9], str(pki.clients[SITE].key), *ok[10:]]
    assert "--certfile:" in refused(*not_pem) and "no PEM certificate" in refused(*not_pem)
    encrypted = tmp_path / "encrypted.key"
    key = serialization.load_pem_private_key(pki.clients[SITE].key.read_bytes(), None)
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    assert "is encrypted" in refused(*ok[:11], str(encrypted))
    assert "use --downlink cmd" in refused(*ok, "--channels", "telemetry,cmd")
    assert "--out: directory" in refused(*ok, "--out", str(tmp_path / "no-dir" / "b.conf"))
    assert not (tmp_path / "no-dir").exists()
    unwritable = cli(*ok, "--out", "/proc/campus-cloud.conf")
    assert unwritable.exit_code == 1
    assert "cannot write /proc/campus-cloud.conf" in unwritable.stderr


# -- two real brokers -------------------------------------------------------------------------


class Message(NamedTuple):
    topic: str
    payload: str
    retain: bool


class Collector:
    """An independent MQTT 3.1.1 client (paho) that records every message it receives."""

    def __init__(
        self,
        port: int,
        topics: Sequence[str],
        *,
        client_id: str = "",
        username: str | None = None,
        persistent: bool = False,
    ) -> None:
        self.messages: list[Message] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=not persistent,
            protocol=MQTTProtocolVersion.MQTTv311,
        )
        if username is not None:
            self.client.username_pw_set(username)
        self.client.on_connect = lambda client, *_: client.subscribe([(t, 1) for t in topics])
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = self._record
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not subscribed.wait(10):
            raise AssertionError(f"no SUBACK from the broker on port {port}")

    def _record(self, _client: paho.Client, _userdata: Any, message: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(
                Message(message.topic, message.payload.decode(), bool(message.retain))
            )

    def received(self) -> list[Message]:
        with self._lock:
            return list(self.messages)

    def payloads(self) -> list[str]:
        return [message.payload for message in self.received()]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def publish(
    port: int, messages: Sequence[tuple[str, str, bool]], username: str | None = None
) -> None:
    """QoS 1, one at a time, each acknowledged before the next."""
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv311)
    if username is not None:
        client.username_pw_set(username)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        for topic, payload, retain in messages:
            client.publish(topic, payload, 1, retain).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


class Brokers:
    """The cloud and the school brokers of one test, and the clients on them; all stopped."""

    def __init__(self, workdir: Path, pki: Pki) -> None:
        self.pki = pki
        acl = workdir / "cloud.acl"
        acl.write_text(CLOUD_ACL)
        plain, tls = free_ports(2)
        self.cloud = MosquittoBroker(
            workdir / "cloud",
            plain,
            tls=TlsListener(tls, pki.ca, pki.server.cert, pki.server.key),
            extra_config=[f"acl_file {acl}"],
        )
        self.conf_d = workdir / "school-conf.d"
        self.conf_d.mkdir()
        self.school = MosquittoBroker(
            workdir / "school", extra_config=[f"include_dir {self.conf_d}"]
        )
        self.clients: list[Collector] = []

    @property
    def tls_port(self) -> int:
        assert self.cloud.tls is not None
        return self.cloud.tls.port

    def bridge(self, cloud: str, client: str = SITE, **changes: Any) -> BridgeSpec:
        """Renders a bridge into the school's conf.d (reconnecting within 1-2 s)."""
        pair = self.pki.clients[client]
        fields: dict[str, Any] = {
            "cloud": parse_cloud(cloud),
            "cafile": self.pki.ca,
            "certfile": pair.cert,
            "keyfile": pair.key,
            "restart_timeout": (1, 2),
        }
        bridge = spec(**{**fields, **changes})
        (self.conf_d / f"{bridge.name}.conf").write_text(render_bridge(bridge))
        return bridge

    def collect(self, broker: MosquittoBroker, *topics: str, **options: Any) -> Collector:
        collector = Collector(broker.port, topics, **options)
        self.clients.append(collector)
        return collector

    def close(self) -> None:
        for client in self.clients:
            client.close()
        self.school.stop()
        self.cloud.stop()


@pytest.fixture
def brokers(tmp_path: Path, pki: Pki) -> Iterator[Brokers]:
    running = Brokers(tmp_path, pki)
    yield running
    running.close()


def wait_state(brokers: Brokers, bridge: BridgeSpec, state: str) -> None:
    """The bridge's own notification on the school broker: 1 connected, 0 not."""
    watch = brokers.collect(brokers.school, bridge.state_topic)
    wait_for(lambda: watch.payloads()[-1:] == [state], 10, 0.02, f"{bridge.state_topic} = {state}")
    watch.close()
    brokers.clients.remove(watch)


def connected_as(cloud: MosquittoBroker) -> list[str]:
    """What the cloud's log says of each connection of the bridge (waits for the first)."""
    pattern = r"New bridge connected from \S+ as school-42\.campus-cloud (\(.*\))"
    found: list[str] = wait_for(
        lambda: re.findall(pattern, cloud.log_path.read_text()), 5, 0.02, "the bridge's login"
    )
    return found


def cloud_topic(rest: str) -> str:
    return f"cloud/{SITE}/{rest}"


def campus_topic(rest: str, site: str = SITE) -> str:
    return f"campus/{site}/{rest}"


def test_up_remapped_and_nothing_else(brokers: Brokers) -> None:
    """The school broker loads the file the command wrote: what goes up, what never does."""
    brokers.cloud.start()
    result = cli(
        *render_args(brokers.pki, f"127.0.0.1:{brokers.tls_port}"),
        "--restart-timeout",
        "1:2",
        "--out",
        str(brokers.conf_d / "campus-cloud.conf"),
    )
    assert result.exit_code == 0, result.output
    brokers.school.start()
    wait_state(brokers, spec(), "1")
    # At the cloud: a bridge (try_private), MQTT 3.1.1 (p2), a persistent session (c0), and
    # the certificate's CN as its username.
    assert connected_as(brokers.cloud) == ["(p2, c0, k60, u'school-42')"]
    at_cloud = brokers.collect(
        brokers.cloud, "#", "$SYS/broker/connection/#", username="cloud-reader"
    )
    at_school = brokers.collect(brokers.school, "#")

    sent = [
        (campus_topic("gw/gw-1/telemetry"), "t1", False),
        (campus_topic("gw/gw-2/state"), "s1", True),
        (campus_topic("gw/gw-1/events"), "e1", False),
        (campus_topic("alerts"), "a1", False),
        (campus_topic("gw/gw-1/config"), "config-up", True),
        (campus_topic("gw/gw-1/policy"), "policy-up", False),
        (campus_topic("gw/gw-1/cmd"), "cmd-up", False),
        (campus_topic("gw/gw-1/ack"), "ack-up", False),
        (campus_topic("gw/gw-1/cmd/result"), "result-up", False),
        (campus_topic("gw/gw-1/telemetry", "school-43"), "other-site", False),
        (campus_topic("gw/gw-1/telemetry"), "fence", False),
    ]
    publish(brokers.school.port, sent)
    # The bridge forwards in order: once the fence is at the cloud, anything sent before it
    # that was going to be forwarded is there too.
    wait_for(lambda: "fence" in at_cloud.payloads(), 10, 0.02, "the fence at the cloud")
    assert at_cloud.received() == [
        Message(cloud_topic("gw/gw-1/telemetry"), "t1", False),
        Message(cloud_topic("gw/gw-2/state"), "s1", False),
        Message(cloud_topic("gw/gw-1/events"), "e1", False),
        Message(cloud_topic("alerts"), "a1", False),
        Message(cloud_topic("gw/gw-1/telemetry"), "fence", False),
    ]
    # Retained at the school, retained at the cloud: a late subscriber gets the state.
    late = brokers.collect(brokers.cloud, cloud_topic("gw/+/state"), username="cloud-reader")
    wait_for(late.received, 5, 0.02, "the retained state")
    assert late.received() == [Message(cloud_topic("gw/gw-2/state"), "s1", True)]

    # Down: the cloud's ACL would let the school read config and cmd, but the bridge has no
    # `in` line, so it never subscribes and nothing comes down.
    down = [
        (cloud_topic("gw/gw-1/config"), "config-down", True),
        (cloud_topic("gw/gw-1/cmd"), "cmd-down", False),
    ]
    publish(brokers.cloud.port, down, username="cloud-reader")
    time.sleep(1.0)
    assert sorted(at_school.payloads()) == sorted(payload for _, payload, _ in sent)
    assert [m.topic for m in at_cloud.received() if m.topic.startswith("$SYS")] == []


def test_downlink_when_asked_and_queued_while_the_school_is_down(brokers: Brokers) -> None:
    brokers.cloud.start()
    bridge = brokers.bridge(f"localhost:{brokers.tls_port}", downlink=("config", "cmd"))
    brokers.school.start()
    wait_state(brokers, bridge, "1")
    agent = brokers.collect(
        brokers.school, "campus/#", "cloud/#", client_id="gw-1", persistent=True
    )
    publish(
        brokers.cloud.port,
        [
            (cloud_topic("gw/gw-1/policy"), "policy-down", True),
            (cloud_topic("gw/gw-1/cmd/result"), "result-down", False),
            (cloud_topic("gw/gw-1/config"), "config-down", True),
            (cloud_topic("gw/gw-1/cmd"), "cmd-1", False),
        ],
        username="cloud-reader",
    )
    wait_for(lambda: "cmd-1" in agent.payloads(), 10, 0.02, "cmd-1 at the school")
    assert agent.received() == [
        Message(campus_topic("gw/gw-1/config"), "config-down", False),
        Message(campus_topic("gw/gw-1/cmd"), "cmd-1", False),
    ]

    # The school's broker is down: the cloud keeps the bridge's 3.1.1 session and its queue.
    agent.close()
    brokers.clients.remove(agent)
    brokers.school.stop()
    publish(brokers.cloud.port, [(cloud_topic("gw/gw-1/cmd"), "cmd-2", False)], "cloud-reader")
    brokers.school.start()
    agent = brokers.collect(
        brokers.school, "campus/#", "cloud/#", client_id="gw-1", persistent=True
    )
    wait_for(lambda: "cmd-2" in agent.payloads(), 10, 0.02, "cmd-2 at the school")
    time.sleep(0.3)
    assert agent.payloads().count("cmd-2") == 1
    assert {m.topic for m in agent.received()} <= {
        campus_topic("gw/gw-1/config"),
        campus_topic("gw/gw-1/cmd"),
    }


def test_500_messages_queue_while_the_cloud_is_down(brokers: Brokers) -> None:
    """Over IPv6 (::1): all 500 arrive after the cloud returns, once each, in order."""
    brokers.cloud.start()
    bridge = brokers.bridge(f"[::1]:{brokers.tls_port}")
    assert f"address ::1:{brokers.tls_port}\n" in render_bridge(bridge)
    brokers.school.start()
    wait_state(brokers, bridge, "1")
    # The cloud's consumer: a persistent session that outlives the cloud's restart.
    reader = {"client_id": "cloud-consumer", "username": "cloud-reader", "persistent": True}
    consumer = brokers.collect(brokers.cloud, cloud_topic("#"), **reader)
    publish(brokers.school.port, [(campus_topic("gw/gw-1/telemetry"), "before", False)])
    wait_for(lambda: consumer.payloads() == ["before"], 10, 0.02, "the bridge to work")
    consumer.close()
    brokers.clients.remove(consumer)

    brokers.cloud.stop()
    wait_state(brokers, bridge, "0")
    lines = "".join(f"{n}\n" for n in range(500))
    published = subprocess.run(
        [
            *("mosquitto_pub", "-h", "::1", "-p", str(brokers.school.port), "-q", "1", "-l"),
            *("-t", campus_topic("gw/gw-7/telemetry")),
        ],
        input=lines,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert published.returncode == 0, published.stderr

    brokers.cloud.start()
    consumer = brokers.collect(brokers.cloud, cloud_topic("#"), **reader)
    wait_for(lambda: len(consumer.received()) >= 500, 15, 0.05, "500 messages at the cloud")
    wait_state(brokers, bridge, "1")
    time.sleep(0.3)
    received = consumer.received()
    assert [m.payload for m in received] == [str(n) for n in range(500)]
    assert {m.topic for m in received} == {cloud_topic("gw/gw-7/telemetry")}


def test_the_queue_survives_a_school_broker_restart(brokers: Brokers) -> None:
    brokers.cloud.start()
    bridge = brokers.bridge(f"127.0.0.1:{brokers.tls_port}")
    brokers.school.start()
    wait_state(brokers, bridge, "1")
    reader = {"client_id": "cloud-consumer", "username": "cloud-reader", "persistent": True}
    brokers.collect(brokers.cloud, cloud_topic("#"), **reader).close()
    brokers.cloud.stop()
    wait_state(brokers, bridge, "0")
    sent = [(campus_topic("gw/gw-1/events"), f"e{n}", False) for n in range(50)]
    publish(brokers.school.port, sent)
    brokers.school.stop()
    brokers.school.start()
    brokers.cloud.start()
    consumer = brokers.collect(brokers.cloud, cloud_topic("#"), **reader)
    wait_for(lambda: len(consumer.payloads()) >= 50, 15, 0.05, "50 messages at the cloud")
    time.sleep(0.3)
    assert consumer.payloads() == [f"e{n}" for n in range(50)]


def test_the_cloud_needs_the_schools_certificate(brokers: Brokers) -> None:
    """No client certificate: no connection. Another school's certificate: it connects, but
    the cloud's ACL drops what it writes under this site's prefix."""
    brokers.cloud.start()
    no_cert = subprocess.run(
        [
            *("mosquitto_pub", "--cafile", str(brokers.pki.ca), "-h", "127.0.0.1"),
            *("-p", str(brokers.tls_port), "-t", cloud_topic("x"), "-m", "y", "-q", "1"),
        ],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    assert no_cert.returncode != 0
    bridge = brokers.bridge(f"127.0.0.1:{brokers.tls_port}", client="school-43")
    brokers.school.start()
    wait_state(brokers, bridge, "1")
    assert connected_as(brokers.cloud) == ["(p2, c0, k60, u'school-43')"]
    at_cloud = brokers.collect(brokers.cloud, "#", username="cloud-reader")
    publish(brokers.school.port, [(campus_topic("gw/gw-1/telemetry"), "t1", False)])
    time.sleep(1.0)
    assert at_cloud.received() == []


def test_mosquitto_cannot_resolve_a_bracketed_address(brokers: Brokers) -> None:
    """Why the renderer writes `address ::1:PORT`: Mosquitto 2.0.11 resolves `[::1]` with the
    brackets, fails, and the bridge stays down."""
    brokers.cloud.start()
    bridge = brokers.bridge(f"[::1]:{brokers.tls_port}")
    path = brokers.conf_d / f"{bridge.name}.conf"
    path.write_text(path.read_text().replace("address ::1:", "address [::1]:"))
    brokers.school.start()
    wait_state(brokers, bridge, "0")
    process = brokers.school.process
    assert process is not None and process.stderr is not None
    assert stop_group(process) == 0
    assert b"Error resolving bridge address" in process.stderr.read()
