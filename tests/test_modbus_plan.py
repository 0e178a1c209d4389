"""Tests of read planning: fewest reads, bounded gaps and sizes, members sliced back out."""

from __future__ import annotations

import pytest

from drivers.modbus.codec import ModbusRequestError, Table
from drivers.modbus.plan import PointRef, ReadBlock, plan_reads, slice_block

HR, IR, CO, DI = Table.HOLDING, Table.INPUT, Table.COIL, Table.DISCRETE


def spans(blocks: list[ReadBlock]) -> list[tuple[Table, int, int]]:
    return [(block.table, block.address, block.count) for block in blocks]


def test_no_points_no_reads() -> None:
    assert plan_reads([]) == []


def test_adjacent_points_share_one_read() -> None:
    points = [PointRef("b", HR, 2, 2), PointRef("a", HR, 0, 2), PointRef("c", HR, 4, 1)]
    (block,) = plan_reads(points)
    assert (block.table, block.address, block.count) == (HR, 0, 5)
    assert [m.key for m in block.members] == ["a", "b", "c"]


def test_gap_of_max_gap_merges_and_one_more_splits() -> None:
    merged = [PointRef("a", HR, 0, 2), PointRef("b", HR, 10, 1)]
    assert spans(plan_reads(merged, max_gap=8)) == [(HR, 0, 11)]
    split = [PointRef("a", HR, 0, 2), PointRef("b", HR, 11, 1)]
    assert spans(plan_reads(split, max_gap=8)) == [(HR, 0, 2), (HR, 11, 1)]
    assert spans(plan_reads(merged, max_gap=0)) == [(HR, 0, 2), (HR, 10, 1)]


def test_tables_never_mix() -> None:
    points = [
        PointRef("h", HR, 0),
        PointRef("i", IR, 1),
        PointRef("c", CO, 0),
        PointRef("d", DI, 1),
    ]
    assert spans(plan_reads(points)) == [(HR, 0, 1), (IR, 1, 1), (CO, 0, 1), (DI, 1, 1)]


def test_read_never_exceeds_max_registers_and_never_splits_a_point() -> None:
    points = [PointRef(f"p{n}", HR, 2 * n, 2) for n in range(100)]
    blocks = plan_reads(points)
    assert spans(blocks) == [(HR, 0, 124), (HR, 124, 76)]
    assert sum(len(block.members) for block in blocks) == 100
    assert spans(plan_reads(points, max_registers=10)) == [(HR, a, 10) for a in range(0, 200, 10)]


def test_bit_tables_use_the_bit_limit() -> None:
    points = [PointRef("first", CO, 0), PointRef("last", CO, 1999), PointRef("next", CO, 2000)]
    assert spans(plan_reads(points, max_gap=2000)) == [(CO, 0, 2000), (CO, 2000, 1)]
    assert spans(plan_reads(points, max_gap=2000, max_bits=16)) == [(CO, 0, 1), (CO, 1999, 2)]


def test_overlapping_points_share_registers() -> None:
    points = [
        PointRef("energy", IR, 10, 4),
        PointRef("energy_low", IR, 12, 2),
        PointRef("x", IR, 11),
    ]
    (block,) = plan_reads(points)
    assert (block.address, block.count) == (10, 4)
    values = slice_block(block, (1, 2, 3, 4))
    assert values == {"energy": (1, 2, 3, 4), "x": (2,), "energy_low": (3, 4)}


def test_greedy_plan_uses_the_fewest_reads() -> None:
    points = [PointRef(f"p{a}", HR, a, 1) for a in (0, 9, 18, 27, 60, 200, 205)]
    assert spans(plan_reads(points)) == [(HR, 0, 28), (HR, 60, 1), (HR, 200, 6)]


def test_slice_block_gives_each_member_its_values() -> None:
    points = [PointRef("t", HR, 100, 2), PointRef("rh", HR, 105, 1), PointRef("co2", HR, 103, 1)]
    (block,) = plan_reads(points)
    assert block.address == 100
    assert slice_block(block, [10, 11, 12, 13, 14, 15]) == {
        "t": (10, 11),
        "co2": (13,),
        "rh": (15,),
    }
    (coils,) = plan_reads([PointRef("pump", CO, 3), PointRef("fan", CO, 5)])
    assert slice_block(coils, (True, False, False)) == {"pump": (True,), "fan": (False,)}


def test_slice_block_checks_the_value_count() -> None:
    (block,) = plan_reads([PointRef("a", HR, 0, 2)])
    with pytest.raises(ModbusRequestError, match="block of 2 items got 3 values"):
        slice_block(block, [1, 2, 3])


@pytest.mark.parametrize(
    ("points", "message"),
    [
        ([PointRef("a", HR, 0), PointRef("a", HR, 5)], "point key 'a' appears twice"),
        ([PointRef("a", HR, 0, 0)], r"point 'a' count 0 is outside 1\.\.125"),
        ([PointRef("a", HR, 0, 126)], r"count 126 is outside 1\.\.125"),
        ([PointRef("a", CO, 0, 2001)], r"count 2001 is outside 1\.\.2000"),
        ([PointRef("a", HR, 65535, 2)], r"is outside addresses 0\.\.65535"),
        ([PointRef("a", HR, -1)], "point 'a' at -1"),
    ],
)
def test_bad_points_are_refused(points: list[PointRef], message: str) -> None:
    with pytest.raises(ModbusRequestError, match=message):
        plan_reads(points)


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ModbusRequestError, match=r"max_registers 126 is outside 1\.\.125"):
        plan_reads([], max_registers=126)
    with pytest.raises(ModbusRequestError, match="max_gap -1 is negative"):
        plan_reads([], max_gap=-1)
    with pytest.raises(ModbusRequestError, match="max_bits 0"):
        plan_reads([], max_bits=0)
