"""Store-and-forward benchmark: agent buffer + forwarder + fleet ingest over a private Mosquitto.

Prints one JSON object:
- readings, received, lost, duplicates: a backlog of `--readings` drained from the agent's buffer
  to the fleet's store (separate processes, as in production);
- drain_readings_per_s: that backlog divided by the time from the forwarder's first publish to
  the fleet having stored the last reading;
- baseline_*: the broker's own ceiling in the same run — a plain paho publisher sending payloads
  of the forwarder's batch size with the same window (no buffer, no store behind it);
- steady_cpu_pct: agent CPU (one core = 100) while it takes `--rate` readings/s into its buffer
  and forwards them live, measured over the middle of `--steady-seconds`;
- agent_peak_rss_mb: the highest resident set of the agent processes (VmHWM).
Targets on a 2-core machine: lost == 0, duplicates == 0, drain >= 50,000 readings/s,
steady CPU <= 2 % of one core, peak RSS <= 60 MB; `targets_met` says which hold, and the exit
code is 1 when one does not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SITE, GATEWAY = "bench", "gw-1"
BATCH = 1000
WINDOW = 8


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def fill_buffer(path: Path, readings: int) -> float:
    from agent.buffer import Buffer, Stamp

    buffer = Buffer(path)
    buffer.open()
    started = time.perf_counter()
    base = time.time_ns()
    for i in range(readings):
        buffer.add(Stamp(base + i, i, 0), f"room-{i % 40:02d}-env", "co2", 400 + i % 900)
        if buffer.pending >= 5000:
            buffer.commit()
    buffer.commit()
    elapsed = time.perf_counter() - started
    buffer.close()
    return readings / elapsed


def broker_ceiling(port: int, payload_size: int, messages: int) -> float:
    """Messages/s a plain paho QoS 1 publisher gets through this broker with our window."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    slots = threading.Semaphore(WINDOW)
    done = threading.Event()
    acked = [0]

    def on_publish(*_: Any) -> None:
        acked[0] += 1
        slots.release()
        if acked[0] == messages:
            done.set()

    client.on_publish = on_publish
    client.connect("127.0.0.1", port)
    client.loop_start()
    payload = b"x" * payload_size
    started = time.perf_counter()
    for _ in range(messages):
        slots.acquire()
        client.publish("baseline/ceiling", payload, qos=1)
    done.wait(120)
    elapsed = time.perf_counter() - started
    client.disconnect()
    client.loop_stop()
    return messages / elapsed


def fleet_store_ceiling(path: Path, readings: int) -> float:
    """Readings/s the fleet's store takes with no MQTT in front: where the drain's time goes."""
    from fleet.store import Store

    store = Store(path)
    base = time.time_ns()
    started = time.perf_counter()
    for first in range(1, readings + 1, BATCH):
        batch = [
            (seq, base + seq, f"room-{seq % 40:02d}-env", "co2", 400 + seq % 900, 0)
            for seq in range(first, first + BATCH)
        ]
        with store.transaction():
            store.ingest_batch(SITE, "store-only", batch)
    elapsed = time.perf_counter() - started
    store.close()
    return readings / elapsed


# -- worker processes ---------------------------------------------------------------------------


def run_fleet(port: int, database: Path) -> None:
    from fleet.config import FleetConfig
    from fleet.service import FleetService
    from wire.mqtt import MqttSettings

    async def main() -> None:
        service = FleetService(
            FleetConfig(name="bench", mqtt=MqttSettings(host="::1", port=port), database=database)
        )
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        task = asyncio.create_task(service.run(stop))
        while not service.link._started:
            await asyncio.sleep(0.01)
        await service.link.wait_subscribed(20)
        print("ready", flush=True)
        await task

    asyncio.run(main())


def run_agent(port: int, buffer_path: Path, mode: str, rate: int, seconds: float) -> None:
    """`drain`: forward the buffer until empty. `steady`: take `rate` readings/s and forward."""
    from agent.buffer import Buffer, Stamp
    from agent.events import EventQueue
    from agent.forwarder import Forwarder
    from wire.mqtt import MqttLink, MqttSettings
    from wire.topics import Channel, topic

    async def main() -> None:
        buffer = Buffer(buffer_path)
        buffer.open()
        link = MqttLink(MqttSettings(host="127.0.0.1", port=port), f"agent-bench-{mode}")
        await link.start()
        await link.wait_connected(20)
        forwarder = Forwarder(
            buffer,
            link,
            topic(SITE, GATEWAY, Channel.TELEMETRY),
            EventQueue(buffer, time.time_ns),
            batch_max=BATCH,
            window=WINDOW,
        )
        print(json.dumps({"started": time.time()}), flush=True)
        forwarding = asyncio.create_task(forwarder.run())
        added = 0
        if mode == "drain":
            while buffer.depth > 0:
                await asyncio.sleep(0.01)
        else:
            loop = asyncio.get_running_loop()
            start = loop.time()
            tick = 0
            while loop.time() - start < seconds:
                tick += 1
                await asyncio.sleep(max(0.0, start + tick * 0.1 - loop.time()))
                stamp = Stamp(time.time_ns(), time.monotonic_ns(), 0)
                for i in range(rate // 10):  # a poll of rate/10 points every 100 ms
                    buffer.add(stamp, f"room-{i % 40:02d}-env", "co2", 400 + i)
                added += rate // 10
                if tick % 10 == 0:  # the agent's default commit interval: 1 s
                    buffer.commit()
                    forwarder.wake()
            buffer.commit()
            forwarder.wake()
            while buffer.depth > 0:
                await asyncio.sleep(0.05)
        forwarding.cancel()
        await link.stop()
        buffer.close()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        report = {
            "finished": time.time(),
            "added": added,
            "acked": forwarder.stats.readings_acked,
            "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_mb": peak_rss_mb(),
        }
        print(json.dumps(report), flush=True)

    asyncio.run(main())


# -- orchestration ------------------------------------------------------------------------------


def spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, *args],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def fleet_received(database: Path) -> tuple[int, int]:
    with sqlite3.connect(database, timeout=10) as db:
        row = db.execute(
            "SELECT received, duplicates FROM gateways WHERE site = ? AND gateway = ?",
            (SITE, GATEWAY),
        ).fetchone()
    return (row[0], row[1]) if row else (0, 0)


def wait_fleet(database: Path, target: int, timeout: float) -> float:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if database.exists() and fleet_received(database)[0] >= target:
            return time.time()
        time.sleep(0.05)
    raise SystemExit(f"fleet did not receive {target} readings within {timeout}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readings", type=int, default=1_000_000)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--steady-seconds", type=float, default=30.0)
    parser.add_argument("--worker", choices=["fleet", "drain", "steady"])
    parser.add_argument("--port", type=int)
    parser.add_argument("--path", type=Path)
    args = parser.parse_args()
    if args.worker == "fleet":
        run_fleet(args.port, args.path)
        return
    if args.worker in ("drain", "steady"):
        run_agent(args.port, args.path, args.worker, args.rate, args.steady_seconds)
        return

    from simulator.broker import MosquittoBroker

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        broker = MosquittoBroker(work / "broker")
        broker.start()
        try:
            result = measure(args, work, broker.port)
        finally:
            broker.stop()
    result["targets_met"] = {
        "lost == 0": result["lost"] == 0,
        "duplicates == 0": result["duplicates"] == 0,
        "drain >= 50000/s": result["drain_readings_per_s"] >= 50_000,
        "steady cpu <= 2%": result["steady_cpu_pct"] <= 2.0,
        "peak rss <= 60 MB": result["agent_peak_rss_mb"] <= 60.0,
    }
    print(json.dumps(result, indent=2))
    sys.exit(0 if all(result["targets_met"].values()) else 1)


def measure(args: argparse.Namespace, work: Path, port: int) -> dict[str, Any]:
    from agent.forwarder import encode_batch

    sample = [
        (i, time.time_ns(), f"room-{i % 40:02d}-env", "co2", 400 + i % 900, 0)
        for i in range(1, BATCH + 1)
    ]
    batch_bytes = len(encode_batch(sample, time.time_ns()))
    ceiling_msgs = broker_ceiling(port, batch_bytes, 2000)
    small_msgs = broker_ceiling(port, 200, 20_000)

    buffer_path = work / "agent" / "buffer.db"
    fill_rate = fill_buffer(buffer_path, args.readings)
    database = work / "fleet.db"
    fleet = spawn("--worker", "fleet", "--port", str(port), "--path", str(database))
    assert fleet.stdout is not None
    if fleet.stdout.readline().strip() != "ready":
        raise SystemExit("fleet worker did not start")

    drain = spawn("--worker", "drain", "--port", str(port), "--path", str(buffer_path))
    assert drain.stdout is not None
    started = json.loads(drain.stdout.readline())["started"]
    finished = wait_fleet(database, args.readings, timeout=600)
    drain_report = json.loads(drain.stdout.readline())
    drain.wait(60)
    received, duplicates = fleet_received(database)
    drain_s = finished - started

    steady_path = work / "agent-steady" / "buffer.db"
    steady = spawn(
        "--worker",
        "steady",
        "--port",
        str(port),
        "--path",
        str(steady_path),
        "--rate",
        str(args.rate),
        "--steady-seconds",
        str(args.steady_seconds),
    )
    assert steady.stdout is not None
    steady.stdout.readline()
    time.sleep(args.steady_seconds * 0.25)
    cpu_start, wall_start = proc_cpu_s(steady.pid), time.monotonic()
    time.sleep(args.steady_seconds * 0.5)
    steady_cpu_pct = 100 * (proc_cpu_s(steady.pid) - cpu_start) / (time.monotonic() - wall_start)
    steady_done = json.loads(steady.stdout.readline())
    steady.wait(60)
    fleet.send_signal(signal.SIGTERM)
    fleet.wait(30)
    store_only = fleet_store_ceiling(work / "store-only.db", 200_000)

    with sqlite3.connect(database) as db:
        stored, distinct = db.execute(
            "SELECT count(*), count(DISTINCT seq) FROM readings WHERE site = ? AND gateway = ?",
            (SITE, GATEWAY),
        ).fetchone()
    return {
        "readings": args.readings,
        "received": received,
        "lost": args.readings - received,
        "duplicates": duplicates,
        "stored_rows": stored,
        "stored_distinct_seq": distinct,
        "drain_seconds": round(drain_s, 2),
        "drain_readings_per_s": round(args.readings / drain_s),
        "drain_agent_cpu_s": round(drain_report["cpu_s"], 2),
        "buffer_fill_readings_per_s": round(fill_rate),
        "batch_readings": BATCH,
        "batch_bytes": batch_bytes,
        "window": WINDOW,
        "baseline_broker_batch_msgs_per_s": round(ceiling_msgs),
        "baseline_broker_readings_per_s": round(ceiling_msgs * BATCH),
        "baseline_broker_200b_msgs_per_s": round(small_msgs),
        "drain_vs_broker_ceiling": round(args.readings / drain_s / (ceiling_msgs * BATCH), 3),
        "baseline_fleet_store_only_readings_per_s": round(store_only),
        "drain_vs_fleet_store_only": round(args.readings / drain_s / store_only, 3),
        "steady_rate_readings_per_s": args.rate,
        "steady_readings_taken": steady_done["added"],
        "steady_readings_acked": steady_done["acked"],
        "steady_cpu_pct": round(steady_cpu_pct, 2),
        "agent_peak_rss_mb": round(max(drain_report["peak_rss_mb"], steady_done["peak_rss_mb"]), 1),
        "agent_peak_rss_mb_drain": round(drain_report["peak_rss_mb"], 1),
        "agent_peak_rss_mb_steady": round(steady_done["peak_rss_mb"], 1),
    }


if __name__ == "__main__":
    main()
