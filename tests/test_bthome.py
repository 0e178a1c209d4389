"""Byte-for-byte tests of the BTHome v2 codec, against the specification's own examples
(bthome.io/format, bthome.io/encryption) and, independently, the `bthome-ble` parser that Home
Assistant uses (a test-only dependency: the driver never imports it)."""

from __future__ import annotations

import re
import subprocess
import sys
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESCCM

from drivers.ble.bthome import (
    BTHOME_UUID,
    IDS_BY_NAME,
    KINDS,
    OBJECT_NAMES,
    OBJECTS,
    BthomeAdvert,
    BthomeError,
    BthomeReplay,
    Kind,
    decode,
    encode,
    mac_to_bytes,
    unit,
    value_type,
)

REPO = Path(__file__).resolve().parents[1]
MAC = "AA:BB:CC:DD:EE:FF"

# bthome.io/encryption: key, sensor MAC, and the counter bytes as they appear in the nonce
# 5448e68f80a5 d2fc 41 00112233 (on air, little-endian: counter 0x33221100).
SPEC_KEY = bytes.fromhex("231d39c1d7cc1ab1aee224cd096db932")
SPEC_MAC = "54:48:E6:8F:80:A5"
SPEC_NONCE = bytes.fromhex("5448e68f80a5d2fc4100112233")
SPEC_PLAIN = bytes.fromhex("02CA0903BF13")  # temperature 25.06 °C, humidity 50.55 %
SPEC_ENCRYPTED = bytes.fromhex("41a47266c95f730011223378237214")


def values(hex_data: str, **kwargs: Any) -> dict[str, Any]:
    return decode(bytes.fromhex(hex_data), MAC, **kwargs).as_dict()


# --- the specification's example for every object -----------------------------------------------

# (object bytes as bthome.io/format prints them, name, value)
SPEC_EXAMPLES: list[tuple[str, str, Any]] = [
    ("0009", "packet_id", 9),
    ("0161", "battery", 97),
    ("02CA09", "temperature", 25.06),
    ("03BF13", "humidity", 50.55),
    ("04138A01", "pressure", 1008.83),
    ("05138A14", "illuminance", 13460.67),
    ("065E1F", "mass", 80.3),
    ("073E1D", "mass_lb", 74.86),
    ("08CA06", "dewpoint", 17.38),
    ("0960", "count", 96),
    ("0A138A14", "energy", 1346.067),
    ("0B021B00", "power", 69.14),
    ("0C020C", "voltage", 3.074),
    ("0D120C", "pm25", 3090),
    ("0E021C", "pm10", 7170),
    ("0F01", "generic", True),
    ("1001", "power_on", True),
    ("1100", "opening", False),
    ("12E204", "co2", 1250),
    ("133301", "tvoc", 307),
    ("14020C", "moisture", 30.74),
    ("1501", "battery_low", True),
    ("1601", "battery_charging", True),
    ("1700", "carbon_monoxide", False),
    ("1801", "cold", True),
    ("1900", "connectivity", False),
    ("1A00", "door", False),
    ("1B01", "garage_door", True),
    ("1C01", "gas_detected", True),
    ("1D00", "heat", False),
    ("1E01", "light", True),
    ("1F01", "unlocked", True),
    ("2001", "moisture_detected", True),
    ("2100", "motion", False),
    ("2201", "moving", True),
    ("2301", "occupancy", True),
    ("2400", "plug", False),
    ("2500", "presence", False),
    ("2601", "problem", True),
    ("2701", "running", True),
    ("2800", "safety", False),
    ("2901", "smoke", True),
    ("2A00", "sound", False),
    ("2B00", "tamper", False),
    ("2C01", "vibration", True),
    ("2D01", "window", True),
    ("2E23", "humidity", 35),
    ("2F23", "moisture", 35),
    ("3A00", "button", "none"),
    ("3A01", "button", "press"),
    ("3A02", "button", "double_press"),
    ("3A03", "button", "triple_press"),
    ("3A04", "button", "long_press"),
    ("3A05", "button", "long_double_press"),
    ("3A06", "button", "long_triple_press"),
    ("3A80", "button", "hold_press"),
    ("3B010305", "command", "step_up:05"),  # the spec's "step up 5 steps"
    ("3C0000", "dimmer", 0),
    ("3C0103", "dimmer", -3),  # rotate left 3 steps
    ("3C020A", "dimmer", 10),  # rotate right 10 steps
    ("3D0960", "count", 24585),
    ("3E2A2C0960", "count", 1611213866),
    ("3F020C", "rotation", 307.4),
    ("400C00", "distance_mm", 12),
    ("414E00", "distance_m", 7.8),
    ("424E3400", "duration", 13.39),
    ("434E34", "current", 13.39),
    ("444E34", "speed", 133.9),
    ("451101", "temperature", 27.3),
    ("4632", "uv_index", 5.0),
    ("478756", "volume", 2215.1),
    ("48DC87", "volume_ml", 34780),
    ("49DC87", "volume_flow_rate", 34.78),
    ("4A020C", "voltage", 307.4),
    ("4B138A14", "gas", 1346.067),
    ("4C41018A01", "gas", 25821.505),
    ("4D12138A14", "energy", 344593.17),
    ("4E87562A01", "volume", 19551.879),
    ("4F87562A01", "water", 19551.879),
    ("505D396164", "timestamp", 1684093277),  # 2023-05-14 19:41:17 UTC
    ("518756", "acceleration", 22.151),
    ("528756", "gyroscope", 22.151),
    ("530C48656C6C6F20576F726C6421", "text", "Hello World!"),
    ("540C48656C6C6F20576F726C6421", "raw", "48656c6c6f20576f726c6421"),
    ("5587562A01", "volume_storage", 19551.879),
    ("56E803", "conductivity", 1000),
    ("57EA", "temperature", -22),
    ("58EA", "temperature", -7.7),
    ("59EA", "count", -22),
    ("5AEAEA", "count", -5398),
    ("5BEA0234EA", "count", -365690134),
    ("5C02FBFFFF", "power", -12.78),
    ("5D02EA", "current", -5.63),
    ("5E9F8C", "direction", 359.99),
    ("5FA00F", "precipitation", 400.0),  # 4000 × 0.1 mm (factor 0.1 since bthome.io PR #58)
    ("F00100", "device_type_id", 1),
    ("F100010204", "firmware_version", "4.2.1.0"),
    ("F2000106", "firmware_version", "6.1.0"),
]
# Objects added to the spec after the version of bthome.io/format these examples come from.
NO_SPEC_EXAMPLE = {0x60, 0x61, 0x62, 0x63, 0x64, 0x65}


@pytest.mark.parametrize(("hex_object", "name", "expected"), SPEC_EXAMPLES)
def test_spec_example_decodes(hex_object: str, name: str, expected: Any) -> None:
    advert = decode(bytes.fromhex("40" + hex_object), MAC)
    if name == "packet_id":
        assert advert.packet_id == expected
        assert advert.values == ()
        return
    assert advert.values == ((name, expected),)
    assert type(advert.values[0][1]) is type(expected)


@pytest.mark.parametrize(("hex_object", "name", "expected"), SPEC_EXAMPLES)
def test_spec_example_encodes_byte_for_byte(hex_object: str, name: str, expected: Any) -> None:
    oid = int(hex_object[:2], 16)
    if name == "packet_id":
        assert encode([], packet_id=expected) == bytes.fromhex("40" + hex_object)
        return
    assert encode([(oid, expected)]) == bytes.fromhex("40" + hex_object)


def test_every_object_has_a_spec_example() -> None:
    covered = {int(hex_object[:2], 16) for hex_object, _, _ in SPEC_EXAMPLES}
    assert covered | NO_SPEC_EXAMPLE == set(OBJECTS)


def test_spec_format_page_example_advert() -> None:
    # bthome.io/format: service data D2FC 40 02C409 03BF13
    advert = decode(bytes.fromhex("4002C40903BF13"), MAC)
    assert advert == BthomeAdvert(
        version=2,
        encrypted=False,
        trigger_based=False,
        packet_id=None,
        counter=None,
        values=(("temperature", 25.0), ("humidity", 50.55)),
        unknown_ids=(),
    )


def test_real_sensor_advert_from_bthome_ble_issue_118() -> None:
    # A sensor's service data quoted in Bluetooth-Devices/bthome-ble#118, decoded there by hand.
    advert = decode(bytes.fromhex("40003f015e02820803ac170c830b"), MAC)
    assert advert.packet_id == 63
    assert advert.values == (
        ("battery", 94),
        ("temperature", 21.78),
        ("humidity", 60.6),
        ("voltage", 2.947),
    )


# --- the table ------------------------------------------------------------------------------------


def test_names_are_point_names_with_one_unit_and_one_type() -> None:
    for name, ids in IDS_BY_NAME.items():
        assert re.fullmatch(r"[a-z0-9_][a-z0-9_.-]{0,63}", name)
        assert len({OBJECTS[oid].unit for oid in ids}) == 1, name
        assert len({KINDS[oid] for oid in ids}) == 1, name
    assert "packet_id" not in OBJECT_NAMES
    assert value_type("temperature") == "float"  # 0x57 alone is whole degrees
    assert value_type("co2") == "int"
    assert value_type("motion") == "bool"
    assert value_type("button") == "string"
    assert value_type("dimmer") == "int"
    assert value_type("firmware_version") == "string"
    assert unit("temperature") == "°C"
    assert unit("pm25") == "µg/m³"
    assert IDS_BY_NAME["temperature"] == (0x02, 0x45, 0x57, 0x58)


def test_table_matches_bthome_ble() -> None:
    """Ids, sizes, signedness and factors against bthome-ble's own table."""
    from bthome_ble.const import MEAS_TYPES

    assert set(OBJECTS) == set(MEAS_TYPES)
    for oid, spec in OBJECTS.items():
        theirs = MEAS_TYPES[oid]
        label = f"0x{oid:02x} {spec.name}"
        if KINDS[oid] in (Kind.TEXT, Kind.RAW, Kind.COMMAND):
            assert spec.size == 0, label
            assert theirs.data_format in ("string", "raw", "command"), label
            continue
        assert spec.size == theirs.data_length, label
        assert spec.signed == (theirs.data_format == "signed_integer"), label
        assert spec.factor == theirs.factor, label


def _raw_samples(oid: int) -> list[int]:
    spec = OBJECTS[oid]
    bits = 8 * spec.size
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if spec.signed else (0, (1 << bits) - 1)
    return sorted({low, high, (low + high) // 2, min(high, 1), min(high, 0x1234)})


def _samples(oid: int) -> list[Any]:
    """Values covering each object's range: its smallest, largest and a few between."""
    spec, kind = OBJECTS[oid], KINDS[oid]
    if kind is Kind.NUMBER:
        decimals = max(0, -int(Decimal(str(spec.factor)).as_tuple().exponent))
        return [
            raw if spec.factor == 1 else round(raw * spec.factor, decimals)
            for raw in _raw_samples(oid)
        ]
    others: dict[Kind, list[Any]] = {
        Kind.BINARY: [False, True],
        Kind.BUTTON: ["none", "press", "long_triple_press", "hold_press", "hold_release"],
        Kind.DIMMER: [0, -1, 1, -255, 255],
        Kind.COMMAND: ["off", "on", "toggle", "step_up:05", "step_down:" + "ab" * 31],
        Kind.TEXT: ["", "Salle B-204 ✓", "x" * 255],
        Kind.RAW: ["", "00ff10", "ee" * 255],
        Kind.FIRMWARE: ["0.0.0.1", "255.255.255.255"] if spec.size == 4 else ["6.1.0", "1.2.3"],
    }
    return others[kind]


@pytest.mark.parametrize("oid", sorted(set(OBJECTS) - {0x00}), ids=lambda oid: f"0x{oid:02x}")
def test_round_trip_every_object(oid: int) -> None:
    name = OBJECTS[oid].name
    for value in _samples(oid):
        data = encode([(oid, value)])
        assert data[1] == oid
        assert decode(data, MAC).values == ((name, value),), (oid, value, data.hex())
    if KINDS[oid] is Kind.NUMBER:
        spec = OBJECTS[oid]
        for raw in _raw_samples(oid):  # the wire bytes are the integer, little-endian
            body = raw.to_bytes(spec.size, "little", signed=spec.signed)
            value = decode(bytes([0x40, oid]) + body, MAC).values[0][1]
            assert encode([(oid, value)]) == bytes([0x40, oid]) + body


def test_round_trip_of_a_full_classroom_sensor_encrypted() -> None:
    readings: list[tuple[str | int, Any]] = [
        ("battery", 87),
        ("temperature", 21.37),
        ("humidity", 43.5),
        ("co2", 1234),
        ("pm25", 12),
        ("pm10", 20),
        ("motion", True),
        ("window", False),
        ("button", "double_press"),
    ]
    data = encode(readings, packet_id=200, mac=MAC, bind_key=SPEC_KEY, counter=77)
    advert = decode(data, MAC, SPEC_KEY)
    assert advert.encrypted and advert.counter == 77 and advert.packet_id == 200
    assert advert.as_dict() == dict(readings)


# --- names, order, flags --------------------------------------------------------------------------


def test_repeated_objects_get_numbered_names() -> None:
    # two sensors on one device: 0x02 twice and 0x45 (same name, another resolution)
    assert decode(bytes.fromhex("4002C40902CA09451101"), MAC).values == (
        ("temperature", 25.0),
        ("temperature_2", 25.06),
        ("temperature_3", 27.3),
    )
    assert values("403A003A01") == {"button": "none", "button_2": "press"}  # spec example


def test_encode_accepts_numbered_names_and_keeps_repeats_in_order() -> None:
    data = encode([("temperature", 25.0), ("humidity", 50.55), ("temperature_2", 25.06)])
    assert data == bytes.fromhex("4002C40902CA0903BF13")  # objects sorted by id, repeats stable


def test_objects_out_of_order_are_accepted() -> None:
    # The spec asks for increasing ids; not every firmware does it.
    assert decode(bytes.fromhex("4003BF1302C409"), MAC).values == (
        ("humidity", 50.55),
        ("temperature", 25.0),
    )


def test_trigger_based_flag_and_reserved_bits() -> None:
    assert decode(bytes.fromhex("4402C409"), MAC).trigger_based
    assert not decode(bytes.fromhex("4002C409"), MAC).trigger_based
    assert encode([("button", "press")], trigger_based=True) == bytes.fromhex("443A01")
    assert values("5802C409") == {"temperature": 25.0}  # bits 3-4 reserved: ignored


def test_duplicate_packet_id_is_reported_for_the_driver_to_drop() -> None:
    data = encode([("temperature", 21.5)], packet_id=7)
    assert data == bytes.fromhex("40 0007 026608")  # packet id first, then the temperature
    first, repeat = decode(data, MAC), decode(data, MAC)
    assert first.packet_id == repeat.packet_id == 7
    assert first.values == repeat.values == (("temperature", 21.5),)
    assert decode(encode([("temperature", 21.5)], packet_id=8), MAC).packet_id == 8
    assert decode(encode([("temperature", 21.5)]), MAC).packet_id is None


def test_encode_chooses_the_object_that_carries_the_value() -> None:
    assert encode([("temperature", 25.06)]).hex() == "4002ca09"
    assert encode([("temperature", 1000.5)]).hex() == "40451527"  # 0x02 stops at 327.67
    assert encode([("voltage", 3.3)]).hex() == "400ce40c"
    assert encode([("voltage", 230.0)]).hex() == "404afc08"
    assert encode([("count", 5)]).hex() == "400905"
    assert encode([("count", 300)]).hex() == "403d2c01"
    assert encode([("count", 70000)]).hex() == "403e70110100"
    assert encode([("count", -5)]).hex() == "4059fb"
    assert encode([("power", -12.78)]).hex() == "405c02fbffff"
    assert encode([("humidity", 50.55)]).hex() == "4003bf13"


# --- malformed input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hex_data", "offset", "oid", "words"),
    [
        ("4002C4", 1, 0x02, "object 0x02 (temperature) at offset 1 needs 2 bytes, 1 left"),
        ("400161 0C02", 3, 0x0C, "object 0x0c (voltage) at offset 3 needs 2 bytes, 1 left"),
        ("400009 3E2A2C09", 3, 0x3E, "object 0x3e (count) at offset 3 needs 4 bytes, 3 left"),
        ("4053", 1, 0x53, "object 0x53 (text) at offset 1 needs a length byte, 0 left"),
        ("40530C4865", 1, 0x53, "needs 12 bytes, 2 left"),
        ("40543B01", 1, 0x54, "object 0x54 (raw) at offset 1 needs 59 bytes, 1 left"),
        ("403B0203", 1, 0x3B, "object 0x3b (command) at offset 1 needs 3 bytes, 1 left"),
        ("403C01", 1, 0x3C, "object 0x3c (dimmer) at offset 1 needs 2 bytes, 1 left"),
        ("40F2000106F1", 5, 0xF1, "object 0xf1 (firmware_version) at offset 5 needs 4 bytes"),
    ],
)
def test_truncated_object_names_object_and_offset(
    hex_data: str, offset: int, oid: int, words: str
) -> None:
    with pytest.raises(BthomeError, match=re.escape(words)) as caught:
        decode(bytes.fromhex(hex_data), MAC)
    assert (caught.value.offset, caught.value.object_id) == (offset, oid)


def test_unknown_object_stops_decoding_and_keeps_what_came_before() -> None:
    advert = decode(bytes.fromhex("400005 02C409 AB 0102 03BF13"), MAC)
    assert advert.packet_id == 5
    assert advert.values == (("temperature", 25.0),)
    assert advert.unknown_ids == (0xAB,)
    first = decode(bytes.fromhex("40 66 0102"), MAC)  # 0x66 is not (yet) in the spec
    assert (first.values, first.unknown_ids) == ((), (0x66,))


@pytest.mark.parametrize(("first", "version"), [(0x20, 1), (0x00, 0), (0x60, 3), (0xE1, 7)])
def test_other_versions_are_refused(first: int, version: int) -> None:
    with pytest.raises(BthomeError, match=f"^BTHome version {version} not supported$"):
        decode(bytes([first]) + bytes.fromhex("02C409"), MAC)


def test_empty_service_data() -> None:
    with pytest.raises(BthomeError, match="empty service data"):
        decode(b"", MAC)
    assert decode(b"\x40", MAC).values == ()  # an advert without objects is valid


def test_non_binary_values_in_binary_objects_and_unknown_events() -> None:
    assert values("4021FF") == {"motion": True}
    assert values("403A07") == {"button": "event_0x07"}
    assert values("403B0009") == {"command": "opcode_0x09"}
    assert values("4053028080") == {"text": "\ufffd\ufffd"}  # invalid UTF-8 shown, not fatal


# --- encryption -----------------------------------------------------------------------------------


def test_spec_encryption_example_decodes() -> None:
    advert = decode(SPEC_ENCRYPTED, SPEC_MAC, SPEC_KEY)
    assert advert.encrypted
    assert advert.counter == 0x33221100
    assert advert.values == (("temperature", 25.06), ("humidity", 50.55))


def test_spec_encryption_example_encodes_byte_for_byte() -> None:
    data = encode(
        [("temperature", 25.06), ("humidity", 50.55)],
        mac=SPEC_MAC,
        bind_key=SPEC_KEY.hex(),
        counter=0x33221100,
    )
    assert data == SPEC_ENCRYPTED


def test_encryption_layout_by_an_independent_route() -> None:
    """AES-CCM computed here from the nonce as bthome.io/encryption prints it."""
    sealed = AESCCM(SPEC_KEY, tag_length=4).encrypt(SPEC_NONCE, SPEC_PLAIN, None)
    ciphertext, mic = sealed[:-4], sealed[-4:]
    assert bytes([0x41]) + ciphertext + SPEC_NONCE[-4:] + mic == SPEC_ENCRYPTED
    # every byte of the nonce counts: MAC, UUID, device-information byte and counter
    for index in range(13):
        nonce = bytearray(SPEC_NONCE)
        nonce[index] ^= 0x01
        resealed = AESCCM(SPEC_KEY, tag_length=4).encrypt(bytes(nonce), SPEC_PLAIN, None)
        assert resealed[-4:] != mic


def test_mac_carried_in_the_advert_is_used_for_the_nonce() -> None:
    # Bit 1 set (an early v2 draft): the MAC follows the device-information byte, reversed.
    mac = mac_to_bytes(SPEC_MAC)
    counter = (1122867).to_bytes(4, "little")
    nonce = mac + b"\xd2\xfc\x43" + counter
    sealed = AESCCM(SPEC_KEY, tag_length=4).encrypt(nonce, SPEC_PLAIN, None)
    data = b"\x43" + mac[::-1] + sealed[:-4] + counter + sealed[-4:]
    advert = decode(data, "00:00:00:00:00:00", SPEC_KEY)  # the advert's own MAC wins
    assert (advert.counter, advert.as_dict()) == (
        1122867,
        {"temperature": 25.06, "humidity": 50.55},
    )
    assert _bthome_ble(data, "00:00:00:00:00:00", SPEC_KEY)[0] == {
        "temperature": 25.06,
        "humidity": 50.55,
    }
    plain = b"\x42" + mac[::-1] + SPEC_PLAIN
    assert decode(plain, MAC).as_dict() == {"temperature": 25.06, "humidity": 50.55}
    with pytest.raises(BthomeError, match="announces a MAC"):
        decode(b"\x42\x01\x02", MAC)


def test_wrong_key_wrong_mac_or_tampered_bytes_fail_the_mic() -> None:
    wrong_key = bytes.fromhex("814aac74c4f17b6c1581e1ab87816b99")
    tampered = bytearray(SPEC_ENCRYPTED)
    tampered[3] ^= 0x01
    replayed_elsewhere = bytearray(SPEC_ENCRYPTED)
    replayed_elsewhere[8] ^= 0x01  # counter byte: authenticated through the nonce
    for data, mac, key in [
        (SPEC_ENCRYPTED, SPEC_MAC, wrong_key),
        (SPEC_ENCRYPTED, MAC, SPEC_KEY),
        (bytes(tampered), SPEC_MAC, SPEC_KEY),
        (bytes(replayed_elsewhere), SPEC_MAC, SPEC_KEY),
    ]:
        with pytest.raises(BthomeError, match=re.escape("MIC check failed (wrong bind key?)")):
            decode(data, mac, key)


def test_encrypted_advert_without_a_key_and_plain_advert_with_a_key() -> None:
    with pytest.raises(BthomeError, match=r"^encrypted advert but no bind_key configured$"):
        decode(SPEC_ENCRYPTED, SPEC_MAC)
    with pytest.raises(BthomeError, match="unencrypted advert but a bind_key is configured"):
        decode(bytes.fromhex("4002C409"), SPEC_MAC, SPEC_KEY)


def test_encrypted_advert_too_short_for_counter_and_mic() -> None:
    with pytest.raises(BthomeError, match="too short for its counter and MIC"):
        decode(bytes.fromhex("41a472001122"), SPEC_MAC, SPEC_KEY)
    empty = encode([], mac=SPEC_MAC, bind_key=SPEC_KEY, counter=1)
    assert len(empty) == 9 and decode(empty, SPEC_MAC, SPEC_KEY).values == ()


def test_truncated_object_inside_an_encrypted_advert() -> None:
    # offsets count from the device-information byte, ciphertext and plaintext alike
    counter = (5).to_bytes(4, "little")
    nonce = mac_to_bytes(SPEC_MAC) + b"\xd2\xfc\x41" + counter
    sealed = AESCCM(SPEC_KEY, tag_length=4).encrypt(nonce, bytes.fromhex("02CA0903BF"), None)
    data = b"\x41" + sealed[:-4] + counter + sealed[-4:]
    with pytest.raises(BthomeError, match="0x03 \\(humidity\\) at offset 4") as caught:
        decode(data, SPEC_MAC, SPEC_KEY)
    assert caught.value.object_id == 0x03


def test_replayed_counter_is_refused_after_the_mic_check() -> None:
    counter = 0x33221100
    assert decode(SPEC_ENCRYPTED, SPEC_MAC, SPEC_KEY, last_counter=counter - 1).counter == counter
    for last in (counter, counter + 1, 0xFFFFFFFF):
        with pytest.raises(BthomeReplay) as caught:
            decode(SPEC_ENCRYPTED, SPEC_MAC, SPEC_KEY, last_counter=last)
        assert str(caught.value) == f"replayed advert (counter {counter} ≤ last {last})"
        assert (caught.value.counter, caught.value.last) == (counter, last)
        assert caught.value.advert.as_dict() == {"temperature": 25.06, "humidity": 50.55}
        assert isinstance(caught.value, BthomeError)
    forged = bytearray(SPEC_ENCRYPTED)
    forged[-1] ^= 0x01
    with pytest.raises(BthomeError, match="MIC check failed"):  # not reported as a replay
        decode(bytes(forged), SPEC_MAC, SPEC_KEY, last_counter=counter)
    # last_counter means nothing to an unencrypted advert (it has no counter)
    assert decode(bytes.fromhex("4002C409"), MAC, last_counter=10).counter is None


# --- caller mistakes: plain ValueError, nothing produced -----------------------------------------


@pytest.mark.parametrize(
    ("readings", "kwargs", "words"),
    [
        ([("temperature", 400000.0)], {}, "out of range for temperature"),
        ([(0x02, 400.0)], {}, "400.0 is out of range for temperature (object 0x02): -327.68 to"),
        ([("battery", -1)], {}, "out of range for battery"),
        ([("battery", True)], {}, "battery (object 0x01) takes a number"),
        ([("co2", "450")], {}, "takes a number"),
        ([("co2", float("nan"))], {}, "cannot carry nan"),
        ([("motion", 2)], {}, "takes true or false"),
        ([("button", "tap")], {}, "takes one of none, press"),
        ([("dimmer", 300)], {}, "takes steps from -255"),
        ([("text", "é" * 128)], {}, "at most 255 bytes, not 256"),
        ([("firmware_version", "1.2")], {}, "joined by dots"),
        ([("command", "jump")], {}, "takes one of off, on"),
        ([("no_such_thing", 1)], {}, "no BTHome object named 'no_such_thing'"),
        ([("packet_id", 1)], {}, "use packet_id="),
        ([(0x99, 1)], {}, "no BTHome object 0x99"),
        ([], {"packet_id": 256}, "out of range for packet_id"),
        ([], {"counter": 1}, "only sent in encrypted adverts"),
        ([], {"bind_key": SPEC_KEY, "counter": 1}, "needs the sensor's mac and a counter"),
        ([], {"bind_key": SPEC_KEY, "mac": MAC}, "needs the sensor's mac and a counter"),
        ([], {"bind_key": SPEC_KEY, "mac": MAC, "counter": 1 << 32}, "not a 32-bit"),
        ([], {"bind_key": b"short", "mac": MAC, "counter": 1}, "16 bytes (32 hex digits), not 5"),
        ([], {"bind_key": "zz" * 16, "mac": MAC, "counter": 1}, "32 hex digits"),
    ],
)
def test_encode_refuses_what_it_cannot_send(
    readings: list[tuple[Any, Any]], kwargs: dict[str, Any], words: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(words)):
        encode(readings, **kwargs)


def test_mac_forms() -> None:
    expected = bytes.fromhex("5448E68F80A5")
    for form in ("54:48:E6:8F:80:A5", "54:48:e6:8f:80:a5", "54-48-E6-8F-80-A5", "5448E68F80A5"):
        assert mac_to_bytes(form) == expected
    assert mac_to_bytes(expected) == expected
    for bad in ("54:48:E6:8F:80", "54:48-E6:8F:80:A5", "54:48:E6:8F:80:G5", b"\x01\x02"):
        with pytest.raises(ValueError, match="MAC address"):
            mac_to_bytes(bad)
    with pytest.raises(ValueError, match="MAC address"):
        decode(bytes.fromhex("4002C409"), "not-a-mac")


# --- module hygiene -------------------------------------------------------------------------------


def test_importing_and_plain_decoding_do_not_load_cryptography_or_bthome_ble() -> None:
    script = (
        "import sys\n"
        "from drivers.ble import bthome\n"
        "assert 'cryptography' not in sys.modules\n"
        "bthome.decode(bytes.fromhex('4002C409'), 'AA:BB:CC:DD:EE:FF')\n"
        "assert 'cryptography' not in sys.modules\n"
        "bthome.decode(bytes.fromhex('41a47266c95f730011223378237214'), '54:48:E6:8F:80:A5',\n"
        "              '231d39c1d7cc1ab1aee224cd096db932')\n"
        "assert 'cryptography' in sys.modules\n"
        "assert not any(m.startswith(('bthome_ble', 'habluetooth')) for m in sys.modules)\n"
        "print('ok')\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "ok"


def test_no_driver_code_imports_bthome_ble() -> None:
    offenders = [
        str(path.relative_to(REPO))
        for path in (REPO / "drivers").rglob("*.py")
        if re.search(r"^\s*(from|import)\s+(bthome_ble|habluetooth)\b", path.read_text(), re.M)
    ]
    assert offenders == []


# --- independent check: the bthome-ble parser on the same service data ----------------------------


def _bthome_ble(
    data: bytes, mac: str, key: bytes | None = None
) -> tuple[dict[str, Any], list[Any]]:
    """(sensor and binary values by bthome-ble key, event-like values in order) of one advert,
    seen by a fresh bthome-ble device (so its own duplicate filters do not interfere)."""
    from bthome_ble import BTHomeBluetoothDeviceData
    from habluetooth import BluetoothServiceInfoBleak

    info = BluetoothServiceInfoBleak(
        name="campus-test",
        address=mac,
        rssi=-60,
        manufacturer_data={},
        service_data={BTHOME_UUID: data},
        service_uuids=[],
        source="",
        device=None,  # type: ignore[arg-type]
        advertisement=None,
        connectable=False,
        time=0.0,
        tx_power=None,
    )
    device = BTHomeBluetoothDeviceData(bindkey=key)
    update = device.update(info)
    found: dict[str, Any] = {}
    for device_key, sensor in update.entity_values.items():
        if device_key.key in ("signal_strength", "packet_id"):
            continue
        value = sensor.native_value
        found[device_key.key] = int(value.timestamp()) if isinstance(value, datetime) else value
    for device_key, binary in update.binary_entity_values.items():
        found[device_key.key] = binary.native_value
    events: list[Any] = []
    for event in update.events.values():
        props = event.event_properties or {}
        if event.device_key.key.startswith("dimmer"):
            steps: Any = props["steps"]
            events.append(-steps if event.event_type == "rotate_left" else steps)
        elif props.get("args"):
            events.append(f"{event.event_type}:{props['args']}")
        else:
            events.append(event.event_type)
    if device.device_type_id is not None:
        events.append(device.device_type_id)
    info_of_device = update.devices.get(None)
    sw_version = info_of_device.sw_version if info_of_device else None
    if sw_version and not sw_version.startswith("BTHome BLE"):
        events.append(sw_version)
    return found, events


def _theirs_single(data: bytes) -> Any:
    found, events = _bthome_ble(data, MAC)
    everything = list(found.values()) + events
    assert len(everything) == 1, (data.hex(), found, events)
    return everything[0]


@pytest.mark.parametrize("oid", sorted(set(OBJECTS) - {0x00}), ids=lambda oid: f"0x{oid:02x}")
def test_bthome_ble_reads_every_object_as_we_do(oid: int) -> None:
    for value in _samples(oid):
        if value in ("none", 0, "") and KINDS[oid] in (
            Kind.BUTTON,
            Kind.DIMMER,
            Kind.TEXT,
            Kind.RAW,
        ):
            continue  # no event, or nothing to show: bthome-ble reports nothing
        data = encode([(oid, value)])
        ours = decode(data, MAC).values[0][1]
        theirs = _theirs_single(data)
        if oid == 0x58:  # factor 0.35: bthome-ble rounds to 1 decimal, we keep 2
            assert ours == pytest.approx(theirs, abs=0.051), data.hex()
        else:
            assert ours == theirs, data.hex()
            assert isinstance(theirs, bool) == isinstance(ours, bool)


# our name -> bthome-ble's key, for the objects a school's sensors send
BTHOME_BLE_KEYS = {
    "battery": "battery",
    "temperature": "temperature",
    "humidity": "humidity",
    "pressure": "pressure",
    "illuminance": "illuminance",
    "co2": "carbon_dioxide",
    "tvoc": "volatile_organic_compounds",
    "pm25": "pm25",
    "pm10": "pm10",
    "voltage": "voltage",
    "motion": "motion",
    "door": "door",
    "window": "window",
    "occupancy": "occupancy",
}


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_bthome_ble_agrees_on_whole_adverts(encrypted: bool) -> None:
    readings: list[tuple[str | int, Any]] = [
        ("battery", 93),
        ("temperature", -4.25),
        ("humidity", 61.3),
        ("pressure", 1013.25),
        ("illuminance", 350.5),
        ("co2", 1480),
        ("tvoc", 220),
        ("pm25", 35),
        ("pm10", 48),
        ("voltage", 2.981),
        ("motion", True),
        ("door", False),
        ("window", True),
        ("occupancy", True),
    ]
    key = SPEC_KEY if encrypted else None
    extra: dict[str, Any] = {"mac": SPEC_MAC, "bind_key": key, "counter": 4242} if encrypted else {}
    data = encode(readings, packet_id=12, **extra)
    ours = decode(data, SPEC_MAC, key).as_dict()
    theirs, events = _bthome_ble(data, SPEC_MAC, key)
    assert events == []
    assert ours == dict(readings)
    assert {BTHOME_BLE_KEYS[name]: value for name, value in ours.items()} == theirs


def test_bthome_ble_agrees_on_repeats_and_events() -> None:
    data = bytes.fromhex("40 02C409 02CA09 2101 3A00 3A04 3C020A")
    assert decode(data, MAC).values == (
        ("temperature", 25.0),
        ("temperature_2", 25.06),
        ("motion", True),
        ("button", "none"),
        ("button_2", "long_press"),
        ("dimmer", 10),
    )
    theirs, events = _bthome_ble(data, MAC)
    assert theirs == {"temperature_1": 25.0, "temperature_2": 25.06, "motion": True}
    assert events == ["long_press", 10]


def test_bthome_ble_refuses_what_we_refuse() -> None:
    wrong_key = bytes.fromhex("814aac74c4f17b6c1581e1ab87816b99")
    assert _bthome_ble(SPEC_ENCRYPTED, SPEC_MAC, wrong_key) == ({}, [])
    assert _bthome_ble(bytes.fromhex("E102C409"), MAC) == ({}, [])  # version 7
    assert _bthome_ble(SPEC_ENCRYPTED, SPEC_MAC, SPEC_KEY)[0] == {
        "temperature": 25.06,
        "humidity": 50.55,
    }
    # An unknown id stops both parsers at the same place.
    assert _bthome_ble(bytes.fromhex("4002C409AB0102"), MAC) == ({"temperature": 25.0}, [])
