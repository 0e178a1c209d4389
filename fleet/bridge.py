"""The Mosquitto 2.0 bridge that carries a school's topics up to the central cloud.

Pure: `parse_cloud()` and `BridgeSpec` validate what the command line gives, `render_bridge()`
returns the config text; no I/O here. The Mosquitto behaviours the text relies on were checked
with Mosquitto 2.0.11; tests/test_bridge.py runs the rendered text in two real brokers.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import NamedTuple

from wire.topics import ROOT, Channel, alerts_topic, check_id, subscription

ALERTS = "alerts"
UP_CHANNELS: tuple[str, ...] = (
    Channel.TELEMETRY.value,
    Channel.STATE.value,
    Channel.EVENTS.value,
    Channel.ACK.value,
    Channel.CMD_RESULT.value,
    ALERTS,
)
DEFAULT_UP: tuple[str, ...] = ("telemetry", "state", "events", "alerts")
DOWN_CHANNELS: tuple[str, ...] = (Channel.CONFIG.value, Channel.POLICY.value, Channel.CMD.value)
DEFAULT_NAME = "campus-cloud"
DEFAULT_REMOTE_PREFIX = "cloud/{site}/"
DEFAULT_RESTART_TIMEOUT = (5, 60)
QOS = 1

_HOSTNAME_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_PREFIX_SEGMENT = re.compile(r"^[A-Za-z0-9_.-]+$")


class BridgeError(ValueError):
    """A bridge setting that cannot work; `option` names the command-line option at fault."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}")
        self.option = option
        self.message = message


@dataclass(frozen=True)
class CloudAddress:
    host: str
    port: int

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    @property
    def config_address(self) -> str:
        """Mosquitto's `address` value. It splits host and port at the LAST colon and resolves
        the host as written, so an IPv6 literal goes without brackets (`fd00::1:8883`); with
        brackets, 2.0.11 logs "Error resolving bridge address" and never connects."""
        return f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.is_ipv6 else f"{self.host}:{self.port}"


def parse_cloud(text: str) -> CloudAddress:
    """HOST:PORT, IPV4:PORT or [IPV6]:PORT (the port is required)."""
    option = "--cloud"
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise BridgeError(option, f"{text!r} has '[' without ']'")
        if not rest.startswith(":"):
            raise BridgeError(option, f"{text!r} needs a port after the address: [{host}]:8883")
        try:
            address = ipaddress.IPv6Address(host)
        except ValueError:
            raise BridgeError(option, f"{host!r} in brackets is not an IPv6 address") from None
        return CloudAddress(address.compressed, _parse_port(option, rest[1:]))
    if text.count(":") > 1:
        raise BridgeError(
            option, f"{text!r}: write an IPv6 address in brackets, e.g. [fd00::1]:8883"
        )
    host, sep, port_text = text.partition(":")
    if not sep:
        raise BridgeError(option, f"{text!r} needs a port: HOST:PORT, e.g. {text}:8883")
    if not host:
        raise BridgeError(option, f"{text!r} has no host")
    port = _parse_port(option, port_text)
    try:
        return CloudAddress(str(ipaddress.IPv4Address(host)), port)
    except ValueError:
        pass
    name = host.removesuffix(".")
    if (
        len(name) > 253
        or not all(_HOSTNAME_LABEL.match(label) for label in name.split("."))
        or name.replace(".", "").isdigit()
    ):
        raise BridgeError(option, f"{host!r} is neither a host name nor an IP address")
    return CloudAddress(host, port)


def _parse_port(option: str, text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise BridgeError(option, f"port {text!r} is not a number from 1 to 65535")
    return int(text)


def split_names(text: str) -> tuple[str, ...]:
    """A comma-separated list (e.g. of channels), in the order given, each once."""
    names = (name.strip() for name in text.split(","))
    return tuple(dict.fromkeys(name for name in names if name))


def parse_restart_timeout(text: str) -> tuple[int, int]:
    """BASE or BASE:CAP in seconds."""
    base_text, _, cap_text = text.partition(":")
    parts = (base_text, cap_text or base_text)
    if not all(part.strip().isdigit() for part in parts):
        raise BridgeError("--restart-timeout", f"{text!r} is not BASE or BASE:CAP in seconds")
    base, cap = (int(part) for part in parts)
    return base, cap


class TopicMapping(NamedTuple):
    """One `topic` line: `pattern` between the prefixes, as Mosquitto concatenates them."""

    pattern: str
    direction: str
    local_prefix: str
    remote_prefix: str

    @property
    def local(self) -> str:
        return self.local_prefix + self.pattern

    @property
    def remote(self) -> str:
        return self.remote_prefix + self.pattern

    def line(self) -> str:
        return (
            f"topic {self.pattern} {self.direction} {QOS} {self.local_prefix} {self.remote_prefix}"
        )


@dataclass(frozen=True)
class BridgeSpec:
    """What `render_bridge` needs; built from checked arguments, refuses what cannot work."""

    site: str
    cloud: CloudAddress
    cafile: PurePath
    certfile: PurePath
    keyfile: PurePath
    name: str = DEFAULT_NAME
    remote_prefix_template: str = DEFAULT_REMOTE_PREFIX
    channels: tuple[str, ...] = DEFAULT_UP
    downlink: tuple[str, ...] = ()
    restart_timeout: tuple[int, int] = DEFAULT_RESTART_TIMEOUT
    remote_prefix: str = field(init=False)

    def __post_init__(self) -> None:
        try:
            check_id("site", self.site)
        except ValueError as exc:
            raise BridgeError("--site", str(exc)) from None
        try:
            check_id("bridge", self.name)
        except ValueError as exc:
            raise BridgeError("--name", str(exc)) from None
        object.__setattr__(self, "remote_prefix", self._checked_prefix())
        for option, path in (
            ("--cafile", self.cafile),
            ("--certfile", self.certfile),
            ("--keyfile", self.keyfile),
        ):
            _check_path(option, path)
        self._check_channels()
        base, cap = self.restart_timeout
        if not 1 <= base <= cap <= 3600:
            raise BridgeError(
                "--restart-timeout", f"need 1 <= BASE <= CAP <= 3600 seconds, got {base}:{cap}"
            )

    def _checked_prefix(self) -> str:
        option = "--remote-prefix"
        prefix = self.remote_prefix_template.replace("{site}", self.site)
        if "{" in prefix or "}" in prefix:
            raise BridgeError(option, f"{self.remote_prefix_template!r}: only {{site}} is known")
        if not prefix.endswith("/"):
            # Mosquitto joins prefix and pattern as they are: "cloud/x" + "gw/+/state" would
            # become "cloud/xgw/+/state".
            raise BridgeError(option, f"{prefix!r} must end with '/'")
        segments = prefix[:-1].split("/")
        if not all(_PREFIX_SEGMENT.match(segment) for segment in segments):
            raise BridgeError(
                option,
                f"{prefix!r}: levels must be non-empty and of A-Z, a-z, 0-9, '_', '.', '-' "
                "(no wildcards, spaces or '$')",
            )
        if len(prefix) > 200:
            raise BridgeError(option, f"{prefix!r} is longer than 200 characters")
        return prefix

    def _check_channels(self) -> None:
        if not self.channels:
            raise BridgeError("--channels", "name at least one channel to send up")
        for name in self.channels:
            if name in DOWN_CHANNELS:
                raise BridgeError(
                    "--channels",
                    f"{name!r} flows from the fleet to the gateways; "
                    f"to take it from the cloud use --downlink {name}",
                )
            if name not in UP_CHANNELS:
                raise BridgeError("--channels", f"unknown channel {name!r}")
        for name in self.downlink:
            if name not in DOWN_CHANNELS:
                raise BridgeError(
                    "--downlink",
                    f"{name!r} cannot come down; choose from {', '.join(DOWN_CHANNELS)}",
                )

    @property
    def local_prefix(self) -> str:
        return f"{ROOT}/{self.site}/"

    @property
    def remote_clientid(self) -> str:
        """Stable across restarts and host renames: the cloud keeps this session's queue."""
        return f"{self.site}.{self.name}"

    @property
    def local_clientid(self) -> str:
        return f"local.{self.site}.{self.name}"

    @property
    def state_topic(self) -> str:
        """Where the school's broker says 1 (bridge connected) or 0, retained.
        Mosquitto names it after the remote client id, not after the connection."""
        return f"$SYS/broker/connection/{self.remote_clientid}/state"

    def mappings(self) -> list[TopicMapping]:
        """The `out` mappings in --channels order, then the `in` ones in --downlink order."""
        return [
            TopicMapping(self._pattern(name), "out", self.local_prefix, self.remote_prefix)
            for name in self.channels
        ] + [
            TopicMapping(self._pattern(name), "in", self.local_prefix, self.remote_prefix)
            for name in self.downlink
        ]

    def _pattern(self, name: str) -> str:
        full = alerts_topic(self.site) if name == ALERTS else subscription(Channel(name), self.site)
        if not full.startswith(self.local_prefix):
            raise AssertionError(f"{full} is outside {self.local_prefix}")
        return full.removeprefix(self.local_prefix)


def _check_path(option: str, path: PurePath) -> None:
    text = str(path)
    if not path.is_absolute():
        # Mosquitto resolves relative paths from its own working directory, not this one.
        raise BridgeError(option, f"{text!r} must be an absolute path")
    if any(ord(char) < 32 or ord(char) == 127 for char in text) or text != text.strip():
        raise BridgeError(option, f"{text!r}: control characters or edge spaces in a path")


def render_bridge(spec: BridgeSpec) -> str:
    """The bridge section for the school broker's conf.d, as Mosquitto 2.0 reads it.

    Comments stay on their own lines: Mosquitto has no trailing comments.
    """
    up = [m for m in spec.mappings() if m.direction == "out"]
    down = [m for m in spec.mappings() if m.direction == "in"]
    base, cap = spec.restart_timeout
    lines = [
        f"# Mosquitto bridge of site {spec.site} to the cloud at {spec.cloud}, rendered by",
        f"# `campus-fleet bridge render`. Install as /etc/mosquitto/conf.d/{spec.name}.conf on",
        "# the school's broker and restart it. Bridge state (1 connected, 0 not), published on",
        "# this broker only:",
        f"#   mosquitto_sub -v -t '{spec.state_topic}'",
        f"connection {spec.name}",
        f"address {spec.cloud.config_address}",
        "# MQTT 3.1.1: Mosquitto 2.0 keeps a 3.1.1 bridge's session on the cloud; with mqttv50",
        "# the bridge gets no session there, and what the cloud queued for it is lost.",
        "bridge_protocol_version mqttv311",
        "try_private true",
        "# A persistent session under a fixed client id: while the cloud is unreachable, QoS 1",
        "# messages wait in this broker (up to its max_queued_messages, saved with persistence).",
        "cleansession false",
        f"remote_clientid {spec.remote_clientid}",
        f"local_clientid {spec.local_clientid}",
        f"restart_timeout {base} {cap}",
        "notifications true",
        "notifications_local_only true",
        "bridge_attempt_unsubscribe false",
        "# TLS: the CA of the cloud broker's certificate, and this school's client certificate",
        "# (the cloud's ACL expects its CN to be the site id).",
        f"bridge_cafile {spec.cafile}",
        f"bridge_certfile {spec.certfile}",
        f"bridge_keyfile {spec.keyfile}",
        f"# Up to the cloud, QoS 1: {spec.local_prefix}X becomes {spec.remote_prefix}X.",
        *(mapping.line() for mapping in up),
    ]
    if down:
        names = ", ".join(spec.downlink)
        lines += [
            "# " + "!" * 78,
            f"# DOWN FROM THE CLOUD: {names}. Whoever may publish on these topics at the cloud",
            "# reaches this site's gateways. Taking a line out does not end the subscription",
            "# the cloud keeps in this bridge's session: take its read right out of the cloud's",
            "# ACL too.",
            *(f"#   {m.remote} -> {m.local}" for m in down),
            "# " + "!" * 78,
            *(mapping.line() for mapping in down),
        ]
    else:
        lines.append("# Nothing comes down from the cloud: no config, policy or cmd.")
    return "\n".join(lines) + "\n"
