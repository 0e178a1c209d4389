"""BLE sensors of both kinds reach the fleet through the real bleak code path, all real
processes: `campus-sim run` serves the sensors on a private mock BlueZ (its own D-Bus system
bus), `campus-agent run` reads them through bleak with DBUS_SYSTEM_BUS_ADDRESS pointing there,
and `campus-fleet serve` receives their readings over a private Mosquitto.

The registry is filled through the CLI with ble:// URLs (bind keys for the encrypted sensors)
and the devices reach the agent in a signed config. Checked: a plain BTHome thermometer, an
encrypted BTHome CO2 sensor and a GATT environmental sensor report every point of their
profiles; an encrypted sensor registered with the wrong bind key never reports a value, is down
with "MIC check failed" in the fleet's events, and the others keep reporting; a sensor on an
adapter the gateway lacks (hci1) is down with "Bluetooth adapter hci1 not found", the rest of
the agent unaffected.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from simulator.broker import MosquittoBroker, free_port
from tests.conftest import wait_for
from tests.fleet_campus import Campus

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

GATEWAY = "gw-ble"
THERMO = "th-101"  # plain BTHome thermometer
CO2 = "co2-101"  # encrypted BTHome CO2 sensor, right key
ESS = "ess-101"  # GATT environmental sensing
WRONG = "co2-102"  # encrypted BTHome CO2 sensor, registered with the wrong key
ELSEWHERE = "th-102"  # a thermometer on adapter hci1, which this gateway does not have
ADDRESSES = {
    THERMO: "A4:C1:38:10:01:01",
    CO2: "A4:C1:38:10:01:02",
    ESS: "C0:FF:EE:10:01:03",
    WRONG: "A4:C1:38:10:01:04",
    ELSEWHERE: "A4:C1:38:10:01:05",
}
KEY = "231d39c1d7cc1ab1aee224cd096db932"
WRONG_SENSOR_KEY = "00112233445566778899aabbccddeeff"
NOT_ITS_KEY = "ffeeddccbbaa99887766554433221100"
RSSI = -65  # the simulator adds ±3 to each advert

PROFILES = {
    THERMO: "bthome-lywsd03mmc",
    CO2: "bthome-co2-sensor",
    ESS: "gatt-environmental-sensor",
    WRONG: "bthome-co2-sensor",
    ELSEWHERE: "bthome-lywsd03mmc",
}
POINTS = {
    THERMO: {"temperature", "humidity", "battery", "battery_voltage", "rssi", "last_seen_s"},
    CO2: {"co2", "temperature", "humidity", "rssi", "last_seen_s"},
    ESS: {"temperature", "humidity", "pressure", "battery"},
}


def _scenario(workdir: Path) -> dict[str, Any]:
    return {
        "name": "ble-classroom",
        "time_scale": 1,
        "ble_workdir": str(workdir),
        "ble_sensors": [
            {
                "id": THERMO,
                "address": ADDRESSES[THERMO],
                "interval_s": 1,
                "values": {"temperature": 21.5, "humidity": 48.0, "battery": 87, "voltage": 2.9},
                "rssi": RSSI,
                "seed": 1,
            },
            {
                "id": CO2,
                "address": ADDRESSES[CO2],
                "interval_s": 1,
                "bind_key": KEY,
                "values": {"co2": 850, "temperature": 22.0, "humidity": 41.0},
                "rssi": RSSI,
                "seed": 2,
            },
            {
                "id": ESS,
                "address": ADDRESSES[ESS],
                "mode": "gatt",
                "interval_s": 1,
                "values": {
                    "temperature": 19.5,
                    "humidity": 55.0,
                    "pressure": 101_300.0,
                    "battery_level": 76,
                },
                "rssi": RSSI,
                "seed": 3,
            },
            {
                "id": WRONG,
                "address": ADDRESSES[WRONG],
                "interval_s": 1,
                "bind_key": WRONG_SENSOR_KEY,
                "values": {"co2": 1200, "temperature": 23.0, "humidity": 40.0},
                "rssi": RSSI,
                "seed": 4,
            },
        ],
    }


CONNECTIONS = {
    THERMO: f"ble://{ADDRESSES[THERMO]}?advert_interval_s=1",
    CO2: f"ble://{ADDRESSES[CO2]}?bind_key={KEY}&advert_interval_s=1",
    ESS: f"ble://{ADDRESSES[ESS]}?timeout_s=3",
    WRONG: f"ble://{ADDRESSES[WRONG]}?bind_key={NOT_ITS_KEY}&advert_interval_s=1",
    ELSEWHERE: f"ble://{ADDRESSES[ELSEWHERE]}?adapter=hci1&advert_interval_s=1",
}


@pytest.fixture(scope="module")
def campus(tmp_path_factory: pytest.TempPathFactory, broker: MosquittoBroker) -> Iterator[Campus]:
    base = tmp_path_factory.mktemp("ble")
    # The bus socket's path must stay short (a unix socket path is at most 107 bytes).
    workdir = Path(tempfile.mkdtemp(prefix="ble", dir="/tmp"))
    try:
        with Campus(base, f"college-{free_port()}", broker) as campus:
            agent = _fill_registry(campus)
            campus.start_sim(_scenario(workdir))
            line = wait_for(
                lambda: next(
                    (
                        text
                        for text in campus.processes.log("sim").splitlines()
                        if text.startswith("DBUS_SYSTEM_BUS_ADDRESS=")
                    ),
                    None,
                ),
                20,
                what="campus-sim's DBUS_SYSTEM_BUS_ADDRESS line",
            )
            address = line.partition("=")[2]
            assert address == f"unix:path={workdir / 'system_bus_socket'}"
            campus.start_fleet()
            campus.start_agent(agent, env={"DBUS_SYSTEM_BUS_ADDRESS": address})
            campus.wait_online([GATEWAY])
            campus.push_and_wait_applied([GATEWAY])
            yield campus
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _fill_registry(campus: Campus) -> Path:
    """The registry of the classroom, as IT staff fill it; the gateway's agent.yaml."""
    campus.ok("keys", "generate")
    campus.ok("site", "add", campus.site)
    campus.ok("building", "add", "main", "--site", campus.site)
    campus.ok("room", "add", "r-101", "--site", campus.site, "--building", "main")
    agent = campus.enroll(GATEWAY, room="r-101")
    for device, url in CONNECTIONS.items():
        campus.add_device(
            device, PROFILES[device], url, gateway=GATEWAY, interval_s=1, timeout_s=10
        )
    shown = campus.json("device", "list")
    keys = {d["device"]: d["connection"] for d in shown}
    assert KEY not in json.dumps(keys) and NOT_ITS_KEY not in json.dumps(keys)  # masked
    return agent


def test_ble_sensors_of_both_kinds_report_every_point(campus: Campus) -> None:
    devices = wait_for(
        lambda: campus.devices_up_with(POINTS), 40, what="the three sensors reporting"
    )

    def values(device: str) -> dict[str, Any]:
        return {p["point"]: p["value"] for p in devices[device]["points"]}

    thermo, co2, ess = values(THERMO), values(CO2), values(ESS)
    assert abs(thermo["temperature"] - 21.5) < 0.5 and abs(thermo["humidity"] - 48.0) < 1
    assert thermo["battery"] == 87 and thermo["battery_voltage"] == pytest.approx(2.9, abs=0.01)
    assert abs(co2["co2"] - 850) <= 10 and isinstance(co2["co2"], int)
    assert abs(co2["temperature"] - 22.0) < 0.5 and abs(co2["humidity"] - 41.0) < 1
    for adverts in (thermo, co2):
        assert RSSI - 3 <= adverts["rssi"] <= RSSI + 3
        assert 0 <= adverts["last_seen_s"] < 10
    assert abs(ess["temperature"] - 19.5) < 0.5 and abs(ess["humidity"] - 55.0) < 1
    assert abs(ess["pressure"] - 101_300) < 100 and ess["battery"] == 76
    units = {p["point"]: p["unit"] for p in devices[CO2]["points"]}
    assert (units["co2"], units["rssi"]) == ("ppm", "dBm")
    for device in POINTS:
        assert devices[device]["profile"] == PROFILES[device]
        assert devices[device]["kind"] == "sensor"

    # The readings are stored one by one, with the gateway's sequence numbers.
    rows = campus.json("readings", CO2, "--since", "10m")
    co2_rows = [row for row in rows if row["point"] == "co2"]
    assert co2_rows and all(abs(row["value"] - 850) <= 10 for row in co2_rows)
    seqs = [row["seq"] for row in rows]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    # Nothing was refused from the sensors with the right key.
    refused = [e for e in campus.events() if e["device"] in POINTS and e["kind"] != "device_up"]
    assert refused == []


def test_a_wrong_bind_key_gives_no_values_and_says_why(campus: Campus) -> None:
    down = wait_for(
        lambda: next(
            (e for e in campus.events() if e["device"] == WRONG and e["kind"] == "device_down"),
            None,
        ),
        30,
        what="the wrong-key sensor reported down",
    )
    assert "MIC check failed" in down["message"], down
    assert ADDRESSES[WRONG] in down["message"]
    assert "adverts heard but refused" in down["message"]
    wrong = wait_for(
        lambda: (d := campus.devices_with_points()[WRONG])["availability"] == "down" and d,
        20,
        what="the wrong-key sensor down in devices list",
    )
    assert wrong["points"] == [] and wrong["last_reading"] is None
    assert campus.json("readings", WRONG, "--since", "1h") == []
    # The others go on reporting after it was refused.
    after = down["ts_ns"]

    def fresh() -> bool:
        rows = {d: campus.json("readings", d, "--since", "1m") for d in POINTS}
        return all(any(r["ts_ns"] > after + 2e9 for r in rows[d]) for d in POINTS)

    wait_for(fresh, 30, what="readings of the other sensors after the refusal")
    devices = campus.devices_with_points()
    assert all(devices[d]["availability"] == "up" for d in POINTS)
    down_devices = {e["device"] for e in campus.events() if e["kind"] == "device_down"}
    assert WRONG in down_devices and not down_devices & set(POINTS)


def test_a_missing_adapter_fails_only_its_devices(campus: Campus) -> None:
    """The agent reads a sensor on an adapter the gateway lacks: that device is down with the
    reason, in the events and in devices list; the sensors on hci0 keep reporting."""
    down = wait_for(
        lambda: next(
            (e for e in campus.events() if e["device"] == ELSEWHERE and e["kind"] == "device_down"),
            None,
        ),
        30,
        what="the sensor on the missing adapter reported down",
    )
    assert "Bluetooth adapter hci1 not found" in down["message"], down
    listed = wait_for(
        lambda: (d := campus.devices_with_points()[ELSEWHERE])["availability"] == "down" and d,
        20,
        what="the sensor on hci1 down in devices list",
    )
    assert "hci1 not found" in (listed["reason"] or "") and listed["points"] == []
    after = down["ts_ns"]

    def fresh() -> bool:
        rows = {d: campus.json("readings", d, "--since", "1m") for d in POINTS}
        return all(any(r["ts_ns"] > after + 2e9 for r in rows[d]) for d in POINTS)

    wait_for(fresh, 30, what="readings of the sensors on hci0 after it")
    assert all(campus.devices_with_points()[d]["availability"] == "up" for d in POINTS)
