"""Firmware profiles: every shipped profile loads; bad ones fail at load with line and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from drivers.modbus.codec import DataType, Table
from drivers.modbus.points import check_range, decode_point
from drivers.profiles import ProfileLibrary, default_profiles_dir, load_profile
from wire.errors import DocumentError


def test_every_shipped_profile_loads() -> None:
    library = ProfileLibrary.load(default_profiles_dir())
    assert "campussim-thc100" in library.profiles
    profile = library.get("campussim-thc100")
    assert profile.id == "campussim-thc100"
    assert profile.point("dew_point").count == 2
    assert profile.point("uptime").kind == DataType.UINT32.value


def test_unknown_profile_lists_the_known_ones() -> None:
    library = ProfileLibrary.load(default_profiles_dir())
    with pytest.raises(KeyError, match="campussim-thc100"):
        library.get("acme-nothing")


def write(tmp_path: Path, text: str, name: str = "acme-x1.yaml") -> Path:
    path = tmp_path / name
    path.write_text(
        "vendor: Acme\nmodel: X1\nprotocol: modbus\nkind: sensor\nsource: manual 4.2\n" + text
    )
    return path


@pytest.mark.parametrize(
    ("points", "message"),
    [
        ("points: []\n", "line 6, points: List should have at least 1 item"),
        (
            "points:\n  - name: t\n    table: input\n    address: 0\n    type: int12\n",
            "line 10, points.0.type: Input should be 'int16'",
        ),
        (
            "points:\n  - name: t\n    table: input\n    address: 0\n    scale: 0\n",
            "line 7, points.0: Value error, scale must not be 0",
        ),
        (
            "points:\n  - name: t\n    table: input\n    address: 0\n    access: read-write\n",
            "a point in the input table cannot be read-write",
        ),
        (
            "points:\n  - name: t\n    table: input\n    address: 65535\n    type: float32\n",
            "runs past register 65535",
        ),
        (
            "points:\n  - name: t\n    table: input\n    address: 0\n"
            "  - name: t\n    table: input\n    address: 1\n",
            "point name 't' is used twice",
        ),
    ],
)
def test_bad_profiles(tmp_path: Path, points: str, message: str) -> None:
    with pytest.raises(DocumentError) as caught:
        load_profile(write(tmp_path, points))
    assert message in str(caught.value)
    assert "acme-x1.yaml" in str(caught.value)


def test_profile_file_names_are_ids(tmp_path: Path) -> None:
    path = write(tmp_path, "points:\n  - {name: t, table: input, address: 0}\n", "Acme X1.yaml")
    with pytest.raises(DocumentError, match="file name must be lowercase"):
        load_profile(path)


def test_scaling_and_range_checks(tmp_path: Path) -> None:
    profile = load_profile(
        write(
            tmp_path,
            "points:\n"
            "  - {name: t, table: input, address: 0, type: int16, scale: 0.1, min: -40, max: 85}\n"
            "  - {name: alarm, table: discrete, address: 0}\n",
        )
    )
    t = profile.point("t")
    assert decode_point(t, (0xFF38,)) == -20.0  # -200 x 0.1
    assert check_range(t, -20.0) is None
    assert check_range(t, decode_point(t, (0x7FFF,))) == (
        "3276.7 is above the profile's maximum 85.0"
    )
    assert decode_point(profile.point("alarm"), (True,)) is True
    assert profile.point("alarm").table is Table.DISCRETE
    assert check_range(t, float("nan")) == "nan is not a finite number"
