"""ModbusProfile points ⇄ registers for every data type and order; commands' argument checks; alarm
thresholds with hysteresis."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from agent.coordinator import AlarmWatch
from drivers.modbus.points import check_range, clip_to_type, decode_point, encode_point
from drivers.modbus.profile import ModbusPoint, ModbusProfile
from drivers.profile_base import Alarm, Argument


def point(**fields: object) -> ModbusPoint:
    return ModbusPoint.model_validate({"name": "p", "table": "holding", "address": 0, **fields})


@pytest.mark.parametrize(
    ("fields", "registers", "value"),
    [
        ({"type": "int16", "scale": 0.1}, (0xFF38,), -20.0),
        ({"type": "uint16"}, (0xFFFF,), 65535),
        ({"type": "int32"}, (0xFFFF, 0xFFFE), -2),
        ({"type": "uint32", "word_order": "little"}, (0x0001, 0x0002), 0x0002_0001),
        ({"type": "float32"}, (0x41AC, 0x0000), 21.5),
        ({"type": "float32", "word_order": "little"}, (0x0000, 0x41AC), 21.5),
        ({"type": "float32", "byte_order": "little"}, (0xAC41, 0x0000), 21.5),
        (
            {"type": "float32", "byte_order": "little", "word_order": "little"},
            (0x0000, 0xAC41),
            21.5,
        ),
        ({"type": "float64"}, (0x4035, 0x8000, 0x0000, 0x0000), 21.5),
        ({"type": "int64"}, (0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF), -1),
        ({"type": "uint16", "scale": 0.01, "offset": -40}, (6150,), 21.5),
        ({"type": "bool", "bit": 3}, (0b1000,), True),
        ({"type": "bool", "bit": 2}, (0b1000,), False),
        ({"type": "bitfield", "bits": {0: "overheat", 3: "fault"}}, (0b1001,), 9),
        ({"type": "string", "length": 3}, (0x5344, 0x4D31, 0x3230), "SDM120"),
        ({"type": "string", "length": 3}, (0x4142, 0x0000, 0x4344), "AB"),
    ],
)
def test_decode_and_encode(
    fields: dict[str, object], registers: tuple[int, ...], value: object
) -> None:
    spec = point(**fields)
    assert decode_point(spec, registers) == pytest.approx(value)
    if spec.kind.value != "bool":
        encoded = encode_point(spec, value)  # type: ignore[arg-type]
        assert decode_point(spec, tuple(encoded)) == pytest.approx(value)  # type: ignore[arg-type]


def test_bits_tables() -> None:
    coil = ModbusPoint.model_validate({"name": "relay", "table": "coil", "address": 5})
    assert decode_point(coil, (True,)) is True
    assert encode_point(coil, False) is False


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"type": "bool"}, "'bit' is needed by, and only by, a bool kept in a register"),
        ({"type": "uint16", "bit": 1}, "'bit' is needed by"),
        ({"type": "bitfield"}, "'bits' is needed by, and only by, a bitfield"),
        ({"type": "string"}, "'length' is needed by, and only by, a string"),
        ({"type": "string", "length": 2, "scale": 2}, "scale and offset apply to numbers"),
        ({"type": "bool", "bit": 1, "alarm": {"high": 1}}, "min, max and alarm apply to numbers"),
        ({"type": "float32", "table": "coil"}, "a point in the coil table is a bool"),
        ({"alarm": {"hysteresis": 1}}, "an alarm needs 'low', 'high' or both"),
        ({"alarm": {"low": 5, "high": 1}}, "alarm low 5.0 must be below high 1.0"),
    ],
)
def test_inconsistent_points_are_refused(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        point(**fields)


def test_flags_may_share_a_register_but_not_a_bit() -> None:
    base = {"vendor": "V", "model": "M", "protocol": "modbus", "kind": "sensor", "source": "s"}
    flags = [
        {"name": "a", "table": "holding", "address": 0, "type": "bool", "bit": 0},
        {"name": "b", "table": "holding", "address": 0, "type": "bool", "bit": 1},
    ]
    ModbusProfile.model_validate({**base, "points": flags})
    clash = [*flags, {"name": "c", "table": "holding", "address": 0, "type": "bool", "bit": 1}]
    with pytest.raises(ValidationError, match="points 'b' and 'c' overlap at holding 0"):
        ModbusProfile.model_validate({**base, "points": clash})
    whole = [*flags, {"name": "w", "table": "holding", "address": 0}]
    with pytest.raises(ValidationError, match="points 'a' and 'w' overlap"):
        ModbusProfile.model_validate({**base, "points": whole})


def test_commands_are_checked_against_points() -> None:
    base = {
        "vendor": "V",
        "model": "M",
        "protocol": "modbus",
        "kind": "meter",
        "source": "s",
        "points": [{"name": "addr", "table": "holding", "address": 0}],
    }
    with pytest.raises(ValidationError, match="point 'addr' is not read-write"):
        ModbusProfile.model_validate(
            {**base, "commands": [{"name": "set", "point": "addr", "value": 1}]}
        )
    with pytest.raises(ValidationError, match="no point 'nope'"):
        ModbusProfile.model_validate(
            {**base, "commands": [{"name": "set", "point": "nope", "value": 1}]}
        )
    with pytest.raises(ValidationError, match="either a fixed 'value' or an 'argument'"):
        ModbusProfile.model_validate(
            {**base, "commands": [{"name": "reset", "table": "holding", "address": 9}]}
        )
    with pytest.raises(ValidationError, match="a point command needs either a fixed 'value'"):
        ModbusProfile.model_validate(
            {
                **base,
                "points": [
                    {"name": "addr", "table": "holding", "address": 0, "access": "read-write"}
                ],
                "commands": [{"name": "set", "point": "addr"}],
            }
        )
    with pytest.raises(ValidationError, match="either to a 'point' or to a 'table' \\+ 'address'"):
        ModbusProfile.model_validate({**base, "commands": [{"name": "x", "value": 1}]})


@pytest.mark.parametrize(
    ("argument", "given", "expected", "error"),
    [
        ({"type": "int", "min": 1, "max": 247}, "17", 17, None),
        ({"type": "int", "min": 1, "max": 247}, 248, None, "above the maximum 247"),
        ({"type": "int"}, 2.5, None, "not a whole number"),
        ({"type": "int"}, "ten", None, "is not an integer"),
        ({"type": "float", "min": 0}, -0.5, None, "below the minimum 0"),
        ({"type": "bool"}, "on", True, None),
        ({"type": "bool"}, "maybe", None, "not on/off"),
        ({"type": "choice", "choices": {"9600": 3, "19200": 4}}, "19200", 4, None),
        ({"type": "choice", "choices": {"9600": 3}}, "57600", None, "not one of 9600"),
        ({"type": "choice", "choices": {"9600": 3}}, 9600, 3, None),
        ({"type": "bool"}, "OFF", False, None),
        ({"type": "bool"}, 0, False, None),
    ],
)
def test_command_arguments(
    argument: dict[str, object], given: object, expected: object, error: str | None
) -> None:
    spec = Argument.model_validate(argument)
    if error is None:
        assert spec.check(given) == expected
    else:
        with pytest.raises(ValueError, match=error):
            spec.check(given)


def test_alarm_raises_once_and_clears_with_hysteresis() -> None:
    watch = AlarmWatch("co2", "ppm", Alarm(high=1500, hysteresis=100))
    seen = [watch.update(v) for v in (900, 1501, 1600, 1450, 1401, 1399, 1501)]
    messages = [event[0] if event else None for event in seen]
    assert messages == [
        None,
        "co2 1501 ppm above 1500",
        None,
        None,
        None,
        "co2 back to 1399 ppm",
        "co2 1501 ppm above 1500",
    ]
    assert seen[5] is not None and seen[5][1]["state"] == "cleared"
    low = AlarmWatch("temperature", "degC", Alarm(low=16, hysteresis=0.5))
    assert low.update(15.9) is not None and low.update(16.2) is None
    cleared = low.update(16.5)
    assert cleared is not None and cleared[1]["level"] == "low"


def test_a_number_sqlite_cannot_store_is_rejected() -> None:
    spec = point(type="uint64")
    assert decode_point(spec, (0xFFFF,) * 4) == 2**64 - 1
    assert "does not fit a signed 64-bit integer" in str(check_range(spec, 2**64 - 1))


def test_range_and_clipping() -> None:
    spec = point(type="int16", scale=0.1, min=-40, max=85)
    assert check_range(spec, 85.1) == "85.1 is above the profile's maximum 85.0"
    assert clip_to_type(spec, 5000.0) == pytest.approx(3276.7)
    assert check_range(point(type="string", length=1), "x") is None


def test_profile_schema_is_exported(tmp_path: Path) -> None:
    from tests.conftest import run_cli

    result = run_cli("campus-fleet", "profiles", "schema", "--out", str(tmp_path / "p.json"))
    assert result.returncode == 0
    assert '"Command"' in (tmp_path / "p.json").read_text()
