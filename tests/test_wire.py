"""Wire models and topics: round trips, and clear refusals of bad payloads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.forwarder import encode_batch
from wire.errors import InvalidMessage, InvalidTopic
from wire.models import (
    BufferState,
    DeviceState,
    Event,
    EventKind,
    GatewayState,
    Status,
    TelemetryBatch,
    decode,
    encode,
)
from wire.schema import export
from wire.topics import Channel, parse_topic, subscription, topic

T = "campus/s/gw/g/telemetry"


def test_topics_round_trip() -> None:
    name = topic("school-42", "gw-7", Channel.CMD_RESULT)
    assert name == "campus/school-42/gw/gw-7/cmd/result"
    assert parse_topic(name) == ("school-42", "gw-7", Channel.CMD_RESULT)
    assert subscription(Channel.TELEMETRY) == "campus/+/gw/+/telemetry"


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("campus/School/gw/g/state", "site id 'School'"),
        ("campus/s/gw/g_1/state", "gateway id 'g_1'"),
        ("campus/s/gw/g/nonsense", "unknown channel 'nonsense'"),
        ("other/s/gw/g/state", "expected campus/"),
        ("campus/s/gw/g", "expected campus/"),
    ],
)
def test_bad_topics_are_named(name: str, why: str) -> None:
    with pytest.raises(InvalidTopic, match=why):
        parse_topic(name)


def test_building_a_topic_with_a_bad_id_fails() -> None:
    with pytest.raises(ValueError, match="site id 'a/b'"):
        topic("a/b", "g", Channel.STATE)


def test_agent_encoding_is_a_valid_batch_and_round_trips() -> None:
    rows = [
        (5, 1_700_000_000_000_000_000, "room-1", "temperature", 21.5, 0),
        (6, 1_700_000_000_100_000_000, "room-1", "co2", 812, 1),
        (8, 1_700_000_000_200_000_000, "room-1", "power", "on", 0),
    ]
    payload = encode_batch(rows, 1_700_000_001_000_000_000)
    batch = decode(TelemetryBatch, T, payload)
    assert batch.first_seq == 5 and batch.last_seq == 8
    assert [tuple(r) for r in batch.readings] == rows
    assert decode(TelemetryBatch, T, encode(batch)) == batch


@pytest.mark.parametrize(
    ("mutate", "field", "reason"),
    [
        (lambda d: d.pop("readings"), "readings", "Field required"),
        (lambda d: d.update(first_seq="one"), "first_seq", "valid integer"),
        (lambda d: d["readings"][0].__setitem__(2, "Room 1"), "readings.0.2", "pattern"),
        (lambda d: d["readings"][1].__setitem__(0, 3), "readings.1", "out of order"),
        (lambda d: d.update(extra=1), "extra", "Extra inputs"),
        (lambda d: d.update(v=2), "v", "Input should be 1"),
        (lambda d: d["readings"][0].pop(), "readings.0.5", "Field required"),
        (lambda d: d.update(readings=[]), "readings", "at least 1"),
    ],
)
def test_bad_batches_are_refused_with_field_and_reason(mutate, field: str, reason: str) -> None:  # type: ignore[no-untyped-def]
    document = {
        "v": 1,
        "first_seq": 1,
        "last_seq": 2,
        "sent_ns": 1,
        "readings": [[1, 1, "room-1", "co2", 500, 0], [2, 2, "room-1", "co2", 501, 0]],
    }
    mutate(document)
    with pytest.raises(InvalidMessage) as caught:
        decode(TelemetryBatch, T, json.dumps(document))
    message = str(caught.value)
    assert T in message
    assert any(p.field.startswith(field) or field in p.message for p in caught.value.problems), (
        message
    )
    assert reason in message


def test_not_json_is_refused() -> None:
    with pytest.raises(InvalidMessage, match="Invalid JSON"):
        decode(TelemetryBatch, T, b"\xff\x00not json")


def test_state_and_event_round_trip() -> None:
    state = GatewayState(
        status=Status.ONLINE,
        ts_ns=1,
        agent_version="0.1.0",
        buffer=BufferState(depth=3, bytes=4096, evicted=0, last_seq=10),
        devices=[DeviceState(id="room-1", profile="campussim-thc100", kind="sensor", up=True)],
    )
    assert decode(GatewayState, "t", encode(state)) == state
    will = decode(GatewayState, "t", b'{"v":1,"status":"offline","reason":"connection lost"}')
    assert will.status is Status.OFFLINE
    event = Event(ts_ns=2, kind=EventKind.DEVICE_DOWN, device="room-1", message="timeout")
    assert decode(Event, "t", encode(event)) == event
    with pytest.raises(InvalidMessage, match="status"):
        decode(GatewayState, "t", b'{"v":1,"status":"sleeping"}')


def test_json_schema_export(tmp_path: Path) -> None:
    written = export(tmp_path)
    assert {p.name for p in written} == {
        "telemetry.schema.json",
        "state.schema.json",
        "events.schema.json",
        "config.schema.json",
        "ack.schema.json",
        "cmd.schema.json",
        "cmd-result.schema.json",
        "alerts.schema.json",
    }
    telemetry = json.loads((tmp_path / "telemetry.schema.json").read_text())
    assert telemetry["properties"]["readings"]["items"]["prefixItems"][0]["minimum"] == 1


def test_ipv6_literals_are_accepted_with_or_without_brackets() -> None:
    from drivers.modbus.driver import ModbusTcpConnection
    from wire.mqtt import MqttSettings
    from wire.net import host_port

    assert MqttSettings(host="[fd00::1]").host == "fd00::1"
    assert MqttSettings(host="::1").host == "::1"
    connection = ModbusTcpConnection(type="modbus-tcp", host="[fd00::5]", port=1502)
    assert connection.host == "fd00::5"
    assert host_port("fd00::5", 502) == "[fd00::5]:502"
    assert host_port("broker.school", 1883) == "broker.school:1883"
    with pytest.raises(ValueError, match="not a host"):
        MqttSettings(host="[fd00::1]:1883")


@pytest.mark.parametrize("backend", ["libcrypto", "cryptography"])
def test_gateways_verify_fleet_signatures_without_the_cryptography_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    """The agent verifies through OpenSSL's libcrypto (no memory cost); the result is the same
    as with `cryptography`, which signs on the fleet."""
    import wire.verify
    from wire.signing import generate_key, load_private_key, public_path, sign
    from wire.verify import SignatureError, load_public_key_file, verify, verify_raw

    if backend == "cryptography":
        monkeypatch.setattr(wire.verify, "_LIBCRYPTO", None)
    else:
        assert wire.verify._LIBCRYPTO is not None, "libcrypto should be usable here"
    generate_key(tmp_path / "fleet.key")
    generate_key(tmp_path / "other.key")
    key = load_private_key(tmp_path / "fleet.key")
    trusted = [load_public_key_file(public_path(tmp_path / "fleet.key"))]
    document = sign(
        key, kind="config", site="s", gateway="g", version=3, issued_ns=1, body={"a": [1, "é"]}
    )
    verify(document, trusted)
    message = b"campus"
    raw = trusted[0].raw
    assert verify_raw(raw, key.sign(message), message)
    assert not verify_raw(raw, key.sign(message), message + b"!")
    assert not verify_raw(raw, b"\0" * 64, message)
    tampered = document.model_copy(update={"version": 4})
    with pytest.raises(SignatureError, match="does not match"):
        verify(tampered, trusted)
    with pytest.raises(SignatureError, match="tampered"):
        verify(document.model_copy(update={"body": {"a": [2]}}), trusted)
    with pytest.raises(SignatureError, match="does not trust"):
        verify(document, [load_public_key_file(public_path(tmp_path / "other.key"))])
    with pytest.raises(SignatureError, match="does not match"):
        verify(document.model_copy(update={"signature": "AAAA"}), trusted)


def test_public_key_files_are_checked(tmp_path: Path) -> None:
    from wire.signing import generate_key
    from wire.verify import KeyFileError, load_public_key, load_public_key_file

    with pytest.raises(KeyFileError, match="No such file"):
        load_public_key_file(tmp_path / "missing.pub")
    with pytest.raises(KeyFileError, match="not a PEM"):
        load_public_key(b"hello", "x.pub")
    with pytest.raises(KeyFileError, match="not an Ed25519"):
        # An RSA-sized body in a PUBLIC KEY block.
        load_public_key(b"-----BEGIN PUBLIC KEY-----\nMIIBIjAN\n-----END PUBLIC KEY-----\n", "x")
    generate_key(tmp_path / "k")
    private_pem = (tmp_path / "k").read_bytes()
    with pytest.raises(KeyFileError, match="not a PEM public key"):
        load_public_key(private_pem, "k")
