"""InfluxDB sink benchmark: readings through the sink (encode + durable queue + write) into a
private VictoriaMetrics, against the same points posted as raw line protocol.

Prints one JSON object:
- points, points_arrived: readings given to the sink (as the ingest path does, in transactions of
  `--batch` readings, the writer running meanwhile) and samples VictoriaMetrics holds afterwards;
- points_per_s: points divided by the time from the first reading queued to the last one
  acknowledged by the server (`mode: v2`, influxdb-client, gzip, `batch_size` 5000);
- enqueue_points_per_s: the ingest side alone (encode, look up tags, insert into the queue);
- raw_points_per_s: the same lines posted by a plain HTTP client (http.client, no gzip, no queue)
  in the same run, in batches of the same size; overhead_ratio = raw / sink;
- v1_points_per_s (unless --no-influxd): `mode: v1` into a private InfluxDB 1.6, for information.
Targets: points_per_s >= 80,000 and points_arrived == points (each point once); `targets_met`
says which hold, and the exit code is 1 when one does not.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fleet.influx.protocol import encode_readings  # noqa: E402
from fleet.influx.settings import InfluxSettings, InfluxV1, InfluxV2  # noqa: E402
from fleet.influx.sink import InfluxSink  # noqa: E402
from fleet.store import Store  # noqa: E402
from tests.influx_servers import InfluxD, VictoriaMetrics  # noqa: E402
from wire.models import Reading  # noqa: E402

SITE = "bench"
GATEWAYS = 10
DEVICES_PER_GATEWAY = 20
POINTS = ("temperature", "humidity", "co2", "dew_point", "uptime")
TARGET_POINTS_PER_S = 80_000
BATCH_SIZE = 5000
T0 = 1_700_000_000_000_000_000


def batches(total: int, size: int) -> list[tuple[str, list[Reading]]]:
    """(gateway, readings) in ingest order: polls of 5 points per device, 1 s apart; floats,
    integers and a growing counter, as classroom sensors send them."""
    result: list[tuple[str, list[Reading]]] = []
    seqs = dict.fromkeys(range(GATEWAYS), 0)
    made = 0
    while made < total:
        g = len(result) % GATEWAYS
        readings: list[Reading] = []
        while len(readings) < size and made < total:
            seqs[g] += 1
            seq = seqs[g]
            poll, point = divmod(seq - 1, len(POINTS))
            device = f"g{g}-room-{poll % DEVICES_PER_GATEWAY:02d}-env"
            ts = T0 + (poll // DEVICES_PER_GATEWAY) * 1_000_000_000 + g * 1000
            value: bool | int | float | str = {
                "temperature": 20.0 + (seq % 50) / 10,
                "humidity": 40.0 + (seq % 200) / 10,
                "co2": 400 + seq % 900,
                "dew_point": 9.5 + (seq % 30) / 10,
                "uptime": seq,
            }[POINTS[point]]
            readings.append((seq, ts, device, POINTS[point], value, 0))
            made += 1
        result.append((f"gw-{g}", readings))
    return result


def registry(store: Store) -> None:
    """Sites, rooms, gateways and devices as `campus-fleet import` would leave them."""
    conn = store.conn
    with store.transaction():
        conn.execute("INSERT INTO sites (site) VALUES (?)", (SITE,))
        for g in range(GATEWAYS):
            building = f"bat-{g % 3}"
            conn.execute(
                "INSERT OR IGNORE INTO buildings (site, building) VALUES (?, ?)", (SITE, building)
            )
            for d in range(DEVICES_PER_GATEWAY):
                room = f"r-{g}{d:02d}"
                conn.execute(
                    "INSERT INTO rooms (site, room, building) VALUES (?, ?, ?)",
                    (SITE, room, building),
                )
                conn.execute(
                    "INSERT INTO registry_devices (site, device, gateway, room, kind, profile) "
                    "VALUES (?, ?, ?, ?, 'sensor', 'campussim-thc100')",
                    (SITE, f"g{g}-room-{d:02d}-env", f"gw-{g}", room),
                )
            conn.execute(
                "INSERT INTO registry_gateways (site, gateway, building) VALUES (?, ?, ?)",
                (SITE, f"gw-{g}", building),
            )


async def through_sink(
    settings: InfluxSettings, work: Path, data: list[tuple[str, list[Reading]]]
) -> dict[str, float]:
    store = Store(work / "fleet.db")
    registry(store)
    sink = InfluxSink(store, settings)
    writer = asyncio.create_task(sink.run())
    enqueue_s = 0.0
    started = time.perf_counter()
    for gateway, readings in data:
        before = time.perf_counter()
        with store.transaction():
            sink.on_telemetry(SITE, gateway, readings)
        enqueue_s += time.perf_counter() - before
        await asyncio.sleep(0)  # the service's loop: ingest and writer take turns
    while sink.queue.queued() > 0:
        await asyncio.sleep(0.002)
    elapsed = time.perf_counter() - started
    writer.cancel()
    await asyncio.gather(writer, return_exceptions=True)
    written = store.conn.execute("SELECT written, rejected FROM influx_status").fetchone()
    store.close()
    total = sum(len(readings) for _, readings in data)
    return {
        "seconds": elapsed,
        "points_per_s": total / elapsed,
        "enqueue_points_per_s": total / enqueue_s,
        "written": written[0],
        "rejected": written[1],
    }


def same_series(key: str) -> Callable[[str], str]:
    return lambda _device: key


def raw_posts(port: int, lines: list[str], path: str) -> float:
    """Points/s of plain http.client posts of the same lines (keep-alive, no gzip)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    bodies = [
        "\n".join(lines[i : i + BATCH_SIZE]).encode() for i in range(0, len(lines), BATCH_SIZE)
    ]
    started = time.perf_counter()
    for body in bodies:
        conn.request("POST", path, body, {"Content-Type": "text/plain; charset=utf-8"})
        response = conn.getresponse()
        response.read()
        assert response.status == 204, response.status
    elapsed = time.perf_counter() - started
    conn.close()
    return len(lines) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=1000, help="readings per ingest message")
    parser.add_argument("--v1-points", type=int, default=300_000)
    parser.add_argument("--no-influxd", action="store_true", help="skip the v1 run")
    args = parser.parse_args()

    data = batches(args.points, args.batch)
    with tempfile.TemporaryDirectory(prefix="influx-bench-") as tmp:
        work = Path(tmp)
        victoria = VictoriaMetrics(work / "vm")
        victoria.start()
        try:
            v2 = InfluxV2(url=victoria.url, org="bench", bucket="bench", batch_size=BATCH_SIZE)
            sink = asyncio.run(through_sink(v2, work / "v2", data))
            arrived = victoria.samples('{__name__=~".+", run=""}')
            lines: list[str] = []
            for gateway, readings in data:
                lines += encode_readings(readings, same_series(f"device,gateway={gateway}"))[0]
            raw = raw_posts(
                victoria.port, lines, "/api/v2/write?org=o&bucket=b&extra_label=run%3Draw"
            )
        finally:
            victoria.close()
        v1_rate = None
        if not args.no_influxd:
            influxd = InfluxD(work / "influxd")
            influxd.start()
            try:
                influxd.create_database("bench")
                v1 = InfluxV1(mode="v1", url=influxd.url, database="bench", batch_size=BATCH_SIZE)
                v1_run = asyncio.run(
                    through_sink(v1, work / "v1", batches(args.v1_points, args.batch))
                )
                v1_rate = round(v1_run["points_per_s"])
            finally:
                influxd.close()

    points_per_s = sink["points_per_s"]
    targets = {
        "points_per_s>=80000": points_per_s >= TARGET_POINTS_PER_S,
        "points_arrived==points": arrived == args.points,
        "rejected==0": sink["rejected"] == 0,
    }
    report: dict[str, Any] = {
        "points": args.points,
        "points_arrived": arrived,
        "points_written_counter": sink["written"],
        "rejected": sink["rejected"],
        "seconds": round(sink["seconds"], 2),
        "points_per_s": round(points_per_s),
        "enqueue_points_per_s": round(sink["enqueue_points_per_s"]),
        "raw_points_per_s": round(raw),
        "overhead_ratio": round(raw / points_per_s, 2),
        "batch_size": BATCH_SIZE,
        "ingest_message_readings": args.batch,
        "gzip": True,
        "v1_points": None if args.no_influxd else args.v1_points,
        "v1_points_per_s": v1_rate,
        "target_points_per_s": TARGET_POINTS_PER_S,
        "targets_met": targets,
    }
    print(json.dumps(report, indent=2))
    sys.exit(0 if all(targets.values()) else 1)


if __name__ == "__main__":
    main()
