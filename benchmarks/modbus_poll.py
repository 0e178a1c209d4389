"""Modbus polling benchmark: 100 simulated devices × 20 points over Modbus TCP, coalescing on/off.

Prints one JSON object: `points_per_s`, `requests_per_s`, `full_poll_s` (all 100 × 20 points, the
devices polled concurrently as the agent does) and `cpu_ms_per_1000_points` for each mode, and
`coalescing_speedup` (full poll time without coalescing / with). The devices are pymodbus servers
in a separate `campus-sim` process, so the polling side's CPU is measured alone.
Targets on a 2-core machine: coalescing_speedup >= 3, a full coalesced poll within 1 s; exit
code 1 when one is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._synthetic import poll_profile, write_profiles  # noqa: E402


async def measure(ports: list[int], profiles: Path, coalesce: bool, rounds: int) -> dict[str, Any]:
    from drivers.modbus.driver import ModbusDriver, ModbusPool, ModbusTcpConnection
    from drivers.profiles import ProfileLibrary

    profile = ProfileLibrary.load(profiles).get("bench-p20")
    pool = ModbusPool()
    drivers = [
        ModbusDriver(
            profile,
            ModbusTcpConnection(type="modbus-tcp", host="127.0.0.1", port=port, timeout_s=5),
            pool,
            coalesce=coalesce,
        )
        for port in ports
    ]
    await asyncio.gather(*(d.read() for d in drivers))  # connect and warm up
    requests_before = sum(d.requests for d in drivers)
    cpu_before, started = time.process_time(), time.perf_counter()
    points = 0
    for _ in range(rounds):
        results = await asyncio.gather(*(d.read() for d in drivers))
        points += sum(len(r.values) for r in results)
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_before
    requests = sum(d.requests for d in drivers) - requests_before
    await pool.close()
    return {
        "full_poll_s": round(elapsed / rounds, 4),
        "points_per_s": round(points / elapsed),
        "requests_per_s": round(requests / elapsed),
        "requests_per_full_poll": requests // rounds,
        "cpu_ms_per_1000_points": round(1000 * cpu / points * 1000, 2),
        "points_per_full_poll": points // rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    from simulator.broker import free_ports

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        profiles = write_profiles(work / "profiles", {"bench-p20": poll_profile(20)})
        ports = free_ports(args.devices)
        scenario = {
            "profiles_dir": str(profiles),
            "devices": [
                {"id": f"dev-{i:03d}", "profile": "bench-p20", "port": port, "seed": i}
                for i, port in enumerate(ports)
            ],
        }
        (work / "scenario.yaml").write_text(json.dumps(scenario))
        log = (work / "sim.log").open("w")
        sim = subprocess.Popen(
            [str(Path(sys.executable).parent / "campus-sim"), "run", str(work / "scenario.yaml")],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 60
            while (work / "sim.log").read_text().count("listening on") < args.devices:
                if sim.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("simulator did not start:\n" + (work / "sim.log").read_text())
                time.sleep(0.1)
            on = asyncio.run(measure(ports, profiles, True, args.rounds))
            off = asyncio.run(measure(ports, profiles, False, args.rounds))
        finally:
            sim.terminate()
            sim.wait(10)
            log.close()
    result: dict[str, Any] = {
        "devices": args.devices,
        "points_per_device": 20,
        "coalescing_on": on,
        "coalescing_off": off,
        "coalescing_speedup": round(off["full_poll_s"] / on["full_poll_s"], 2),
    }
    result["targets_met"] = {
        "coalescing speedup >= 3": result["coalescing_speedup"] >= 3,
        "full poll <= 1 s": on["full_poll_s"] <= 1.0,
    }
    print(json.dumps(result, indent=2))
    sys.exit(0 if all(result["targets_met"].values()) else 1)


if __name__ == "__main__":
    main()
