"""Config push to 1,000 gateways: `campus-fleet config push all` until every gateway applied it.

A private Mosquitto, a fleet database with one site and `--gateways` registered gateways, a swarm
of simulated gateways (`benchmarks/_gateway_swarm.py`, one MQTT connection each, spread over
`--swarm-processes` processes) that verify and acknowledge like the agent, and a real
`campus-fleet serve`. Prints one JSON object:
- all_acked_s: from the start of `campus-fleet config push all --json` until every gateway's
  `config_status.applied_version` is the version that push staged for it (the database polled
  read-only every 50 ms); push_cli_s: until the command exited (it follows the acks itself);
- fleet_cpu_s, broker_cpu_s, swarm_cpu_s: CPU seconds (user + system) of the fleet service, the
  broker and the swarm processes over all_acked_s; push_cli_cpu_s: the command's own;
- baseline_roundtrip_s: the same swarm applying one newer document each, signed and published
  (retained, QoS 1) by this script itself with one client, no fleet and no database, measured
  after the fleet's round from the same broker state (no retained config, the fleet's session
  ended); fleet_vs_direct = all_acked_s / baseline_roundtrip_s.
The broker saves every second (`autosave_interval 1`), as the README configures a district broker
with many gateways; `--broker-autosave changes` saves after every change (the school setting: its
cost grows with the square of the retained configs), `off` shows what saving costs at all.
Target on a 2-core machine: all_acked_s <= 10 with no rejection; `targets_met` says which
hold, and the exit code is 1 when one does not or a step fails (every wait has a timeout;
`fleet_error` or `error` says what went wrong).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import queue
import resource
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiomqtt
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._gateway_swarm import raise_nofile_limit  # noqa: E402
from fleet.store import Store  # noqa: E402
from simulator.broker import MosquittoBroker  # noqa: E402
from simulator.processes import stop_group  # noqa: E402
from wire.control import Ack, AckStatus, SignedDocument  # noqa: E402
from wire.models import decode, encode  # noqa: E402
from wire.signing import generate_key, load_private_key, sign  # noqa: E402
from wire.topics import Channel, parse_topic, topic  # noqa: E402

SITE = "bench"
FLEET_NAME = "bench"
BIN = Path(sys.executable).parent
POLL_S = 0.05
TARGET_ALL_ACKED_S = 10.0


class BenchError(RuntimeError):
    """A step of the benchmark failed; the message says which and why."""


class BenchBroker(MosquittoBroker):
    """The test broker (its persistence settings are the README's for production), with no
    connection limit on either listener and subscriptions logged (so the script sees when the
    fleet service listens for acknowledgements); `autosave` is "interval" (every
    second), "changes" (after every change) or "off"."""

    def __init__(self, workdir: Path, *, autosave: str) -> None:
        super().__init__(workdir)
        self.autosave = autosave

    def config_text(self) -> str:
        lines: list[str] = []
        for line in super().config_text().splitlines():
            if line.startswith("autosave") and self.autosave != "changes":
                continue
            lines.append(line)
        if self.autosave == "interval":
            lines += ["autosave_on_changes false", "autosave_interval 1"]
        with_limits: list[str] = []
        for line in lines:
            with_limits.append(line)
            if line.startswith("listener "):
                with_limits.append("max_connections -1")
        lines = with_limits
        return "\n".join([*lines, "log_type subscribe"]) + "\n"


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def tail(path: Path, lines: int = 8) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def topic_matches(pattern: str, name: str) -> bool:
    """MQTT filter matching (`+` one level, `#` the rest)."""
    wanted, parts = pattern.split("/"), name.split("/")
    for index, level in enumerate(wanted):
        if level == "#":
            return True
        if index >= len(parts) or level not in ("+", parts[index]):
            return False
    return len(wanted) == len(parts)


class Lines:
    """A child's stdout, read by a thread so that waiting for a line can time out."""

    def __init__(self, name: str, process: subprocess.Popen[str]) -> None:
        self.name = name
        self.process = process
        self.queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True, name=f"{name}-stdout").start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.queue.put(line.strip())
        self.queue.put(None)

    def expect(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise BenchError(f"{self.name}: no '{prefix}…' line within {timeout}s") from None
            if line is None:
                raise BenchError(f"{self.name} closed its output (exit {self.process.poll()})")
            if line.startswith(prefix):
                return line


# -- set-up -------------------------------------------------------------------------------------


def register(database: Path, gateways: list[str]) -> None:
    """One site and its gateways in the registry, as `campus-fleet` would have stored them."""
    store = Store(database)
    now = time.time_ns()
    with store.transaction() as conn:
        conn.execute(
            "INSERT INTO sites (site, name, created_ns) VALUES (?, ?, ?)",
            (SITE, "Benchmark school", now),
        )
        conn.executemany(
            "INSERT INTO registry_gateways (site, gateway, created_ns, enrolled_ns) "
            "VALUES (?, ?, ?, ?)",
            [(SITE, gateway, now, now) for gateway in gateways],
        )
    store.close()


def start_swarm(
    work: Path, port: int, public_key: Path, count: int, processes: int
) -> list[tuple[subprocess.Popen[str], Lines]]:
    size = -(-count // processes)
    swarm = []
    for index, first in enumerate(range(0, count, size)):
        last = min(first + size, count) - 1
        log = (work / f"swarm-{index}.log").open("w")
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks._gateway_swarm",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--site",
                SITE,
                "--gateways",
                f"gw-{first:04d}..gw-{last:04d}",
                "--public-key",
                str(public_key),
            ],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            start_new_session=True,
        )
        log.close()
        swarm.append((process, Lines(f"swarm process {index}", process)))
    return swarm


def wait_subscribed(
    broker: MosquittoBroker,
    client_id: str,
    sample_topic: str,
    timeout: float,
    process: subprocess.Popen[bytes],
    log: Path,
) -> None:
    """Until the broker logs a subscription of `client_id` that matches `sample_topic`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"campus-fleet serve exited (code {process.returncode}):\n{tail(log)}")
        for line in broker.log_path.read_text(errors="replace").splitlines():
            words = line.split(": ", 1)[-1].split()
            if len(words) == 3 and words[0] == client_id and topic_matches(words[2], sample_topic):
                return
        time.sleep(0.1)
    raise BenchError(
        f"campus-fleet serve did not subscribe to {sample_topic} as {client_id} within "
        f"{timeout}s:\n{tail(log)}"
    )


# -- the fleet half -----------------------------------------------------------------------------


def fleet_half(
    work: Path,
    broker: MosquittoBroker,
    config: Path,
    database: Path,
    gateways: list[str],
    swarm_pids: list[int],
    timeout: float,
) -> dict[str, Any]:
    fleet = BIN / "campus-fleet"
    if not fleet.exists():
        raise BenchError(f"{fleet} does not exist: install the project (make install)")
    helped = subprocess.run(
        [str(fleet), "config", "push", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if helped.returncode != 0:
        raise BenchError(f"'campus-fleet config push' is not available: {helped.stderr.strip()}")
    log = work / "fleet.log"
    with log.open("wb") as out:
        serve = subprocess.Popen(
            [str(fleet), "--config", str(config), "serve"],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_subscribed(
            broker,
            f"fleet-{FLEET_NAME}",
            topic(SITE, gateways[0], Channel.ACK),
            30,
            serve,
            log,
        )
        assert broker.process is not None
        cpu0 = (proc_cpu_s(serve.pid), proc_cpu_s(broker.process.pid))
        swarm0 = sum(proc_cpu_s(pid) for pid in swarm_pids)
        children0 = children_cpu_s()
        start_ns, started = time.time_ns(), time.monotonic()
        with (work / "push.out").open("wb") as out, (work / "push.err").open("wb") as err:
            push = subprocess.Popen(
                [
                    *(str(fleet), "--config", str(config), "config", "push", "all"),
                    *("--json", "--timeout", str(timeout)),
                ],
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        try:
            finished, push_exited = wait_all_applied(
                database, start_ns, len(gateways), started + timeout, serve, push, work
            )
            cpu1 = (proc_cpu_s(serve.pid), proc_cpu_s(broker.process.pid))
            swarm1 = sum(proc_cpu_s(pid) for pid in swarm_pids)
            if push_exited is None:
                push.wait(timeout=30)
                push_exited = time.monotonic()
        except subprocess.TimeoutExpired:
            raise BenchError(
                "'config push all' did not exit 30 s after all gateways applied"
            ) from None
        finally:
            stop_group(push, timeout=5)
        push_cpu = children_cpu_s() - children0
        if push.returncode != 0:
            raise BenchError(
                f"'config push all' exited {push.returncode}: {tail(work / 'push.err')}"
            )
        expected = staged_versions(database, start_ns)
    finally:
        stop_group(serve, timeout=10)
    return {
        "all_acked_s": round(finished - started, 3),
        "push_cli_s": round(push_exited - started, 3),
        "push_cli_cpu_s": round(push_cpu, 3),
        "fleet_cpu_s": round(cpu1[0] - cpu0[0], 3),
        "broker_cpu_s": round(cpu1[1] - cpu0[1], 3),
        "swarm_cpu_s": round(swarm1 - swarm0, 3),
        "pushed_versions": sorted(set(expected.values())),
        "fleet_version_states": version_states(database),
    }


def read_only(database: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{database}?mode=ro", uri=True, isolation_level=None, timeout=5)


def staged_versions(database: Path, since_ns: int) -> dict[str, int]:
    """The newest version each gateway got from this push."""
    with contextlib.closing(read_only(database)) as db:
        rows = db.execute(
            "SELECT gateway, max(version) FROM config_versions "
            "WHERE site = ? AND created_ns >= ? GROUP BY gateway",
            (SITE, since_ns),
        ).fetchall()
    return {gateway: int(version) for gateway, version in rows}


def version_states(database: Path) -> dict[str, int]:
    with contextlib.closing(read_only(database)) as db:
        rows = db.execute(
            "SELECT state, count(*) FROM config_versions WHERE site = ? GROUP BY state", (SITE,)
        ).fetchall()
    return {str(state): int(count) for state, count in rows}


def wait_all_applied(
    database: Path,
    since_ns: int,
    count: int,
    deadline: float,
    serve: subprocess.Popen[bytes],
    push: subprocess.Popen[bytes],
    work: Path,
) -> tuple[float, float | None]:
    """The moment every gateway's applied version is the newest one staged since `since_ns`,
    and the moment the push command exited if it did before."""
    db = read_only(database)
    push_exited: float | None = None
    try:
        staged = applied = 0
        while time.monotonic() < deadline:
            staged, applied = db.execute(
                "SELECT count(*), count(s.gateway) FROM (SELECT gateway, max(version) AS version "
                "FROM config_versions WHERE site = ? AND created_ns >= ? GROUP BY gateway) e "
                "LEFT JOIN config_status s ON s.site = ? AND s.gateway = e.gateway "
                "AND s.applied_version = e.version",
                (SITE, since_ns, SITE),
            ).fetchone()
            now = time.monotonic()
            if staged == count and applied == count:
                return now, push_exited
            if push_exited is None and push.poll() is not None:
                push_exited = now
                if push.returncode != 0:
                    raise BenchError(
                        f"'config push all' exited {push.returncode}: {tail(work / 'push.err')}"
                    )
                if staged < count:
                    raise BenchError(
                        f"'config push all' staged versions for {staged} of {count} gateways; "
                        f"it printed: {(work / 'push.out').read_text()[:500]}"
                    )
            if serve.poll() is not None:
                raise BenchError(
                    f"campus-fleet serve exited (code {serve.returncode}):\n"
                    f"{tail(work / 'fleet.log')}"
                )
            time.sleep(POLL_S)
        rejected = db.execute(
            "SELECT last_reason, count(*) FROM config_status WHERE site = ? AND "
            "last_status = 'rejected' GROUP BY last_reason ORDER BY 2 DESC LIMIT 3",
            (SITE,),
        ).fetchall()
    finally:
        db.close()
    raise BenchError(
        f"{applied} of {count} gateways applied the pushed version in time ({staged} staged); "
        f"config_versions states {version_states(database)}; rejections {rejected}:\n"
        f"{tail(work / 'fleet.log')}"
    )


# -- the direct baseline ------------------------------------------------------------------------


async def direct_baseline(
    port: int,
    key: Ed25519PrivateKey,
    gateways: list[str],
    version: int,
    body: dict[str, Any],
    pids: dict[str, list[int]],
    timeout: float,
) -> dict[str, Any]:
    """Signs and publishes one document per gateway itself, until every gateway applied it."""
    try:
        # The stopped fleet service's session (clean start off) would queue every ack of this
        # round; a clean start with the same client id ends it.
        async with aiomqtt.Client(
            "127.0.0.1",
            port,
            identifier=f"fleet-{FLEET_NAME}",
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=True,
        ):
            pass
        async with aiomqtt.Client(
            "127.0.0.1",
            port,
            identifier="bench-direct",
            protocol=aiomqtt.ProtocolVersion.V5,
            max_inflight_messages=200,  # as the fleet service's link
            timeout=timeout,
        ) as client:
            client.pending_calls_threshold = 2 * len(gateways)  # no warning for the burst
            # From no retained config, as the fleet's round started: with autosave on, each of
            # the broker's saves costs more the more messages it holds.
            cleared = time.perf_counter()
            await asyncio.gather(
                *(
                    client.publish(topic(SITE, gw, Channel.CONFIG), b"", qos=1, retain=True)
                    for gw in gateways
                )
            )
            cleared = time.perf_counter() - cleared
            await client.subscribe(f"campus/{SITE}/gw/+/ack", qos=1)
            collector = asyncio.create_task(collect_acks(client, set(gateways), version))
            try:
                cpu0 = {name: sum(map(proc_cpu_s, group)) for name, group in pids.items()}
                started = time.perf_counter()
                payloads = [
                    (topic(SITE, gw, Channel.CONFIG), encode(sign_one(key, gw, version, body)))
                    for gw in gateways
                ]
                signed = time.perf_counter()
                await asyncio.gather(
                    *(client.publish(name, data, qos=1, retain=True) for name, data in payloads)
                )
                published = time.perf_counter()
                done, _ = await asyncio.wait({collector}, timeout=timeout)
                finished = time.perf_counter()
                cpu1 = {name: sum(map(proc_cpu_s, group)) for name, group in pids.items()}
                if not done:
                    raise BenchError(f"direct baseline: not every gateway applied in {timeout}s")
                collector.result()
            finally:
                collector.cancel()
    except aiomqtt.MqttError as exc:
        raise BenchError(f"direct baseline: {exc}") from None
    return {
        "baseline_roundtrip_s": round(finished - started, 3),
        "baseline_sign_s": round(signed - started, 3),
        "baseline_publish_s": round(published - started, 3),
        "baseline_version": version,
        "baseline_clear_retained_s": round(cleared, 3),
        **{f"baseline_{name}_cpu_s": round(cpu1[name] - cpu0[name], 3) for name in pids},
    }


def sign_one(
    key: Ed25519PrivateKey, gateway: str, version: int, body: dict[str, Any]
) -> SignedDocument:
    return sign(
        key,
        kind="config",
        site=SITE,
        gateway=gateway,
        version=version,
        issued_ns=time.time_ns(),
        body=body,
    )


async def collect_acks(client: aiomqtt.Client, waiting: set[str], version: int) -> None:
    """Returns once every gateway in `waiting` applied `version`; raises at a rejection."""
    async for message in client.messages:
        payload = message.payload
        assert isinstance(payload, bytes)
        ack = decode(Ack, str(message.topic), payload)
        if ack.version != version:
            continue
        gateway = parse_topic(str(message.topic)).gateway
        if ack.status is not AckStatus.APPLIED:
            raise BenchError(f"direct baseline: {gateway} rejected it: {ack.reason}")
        waiting.discard(gateway)
        if not waiting:
            return


def next_version_and_body(database: Path) -> tuple[int, dict[str, Any]]:
    """A version above anything pushed, and the body the fleet pushed (if it did)."""
    with contextlib.closing(read_only(database)) as db:
        top = db.execute(
            "SELECT max(version) FROM config_versions WHERE site = ?", (SITE,)
        ).fetchone()[0]
        row = db.execute(
            "SELECT body FROM config_versions WHERE site = ? ORDER BY version DESC LIMIT 1",
            (SITE,),
        ).fetchone()
    body: dict[str, Any] = json.loads(row[0]) if row and row[0] else {"devices": []}
    return (int(top) if top else 0) + 1, body


# -- orchestration ------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--gateways", type=int, default=1000)
    parser.add_argument("--swarm-processes", type=int, default=2)
    parser.add_argument(
        "--timeout", type=float, default=60, help="longest wait for the acknowledgements (s)"
    )
    parser.add_argument(
        "--skip-fleet", action="store_true", help="measure the direct baseline only"
    )
    parser.add_argument(
        "--broker-autosave",
        choices=["interval", "changes", "off"],
        default="interval",
        help="interval: save every second, as the README configures a district broker "
        "(default); changes: save after every change (a school broker with few gateways); "
        "off: Mosquitto's default (every 1800 s), to see what the saves cost",
    )
    args = parser.parse_args()
    nofile = raise_nofile_limit()  # before the broker starts, so that it inherits the limit
    gateways = [f"gw-{i:04d}" for i in range(args.gateways)]
    result: dict[str, Any] = {
        "gateways": args.gateways,
        "swarm_processes": args.swarm_processes,
        "connections_per_swarm_process": -(-args.gateways // args.swarm_processes),
        "nofile_limit": nofile,
        "broker_autosave": args.broker_autosave,
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        broker = BenchBroker(work / "broker", autosave=args.broker_autosave)
        broker.start()
        swarm: list[tuple[subprocess.Popen[str], Lines]] = []
        try:
            key_path = work / "fleet-signing.key"
            generate_key(key_path)
            database = work / "fleet.db"
            register(database, gateways)
            config = work / "fleet.yaml"
            config.write_text(
                yaml.safe_dump(
                    {
                        "name": FLEET_NAME,
                        "mqtt": {"host": "127.0.0.1", "port": broker.port},
                        "database": str(database),
                        "signing_key": str(key_path),
                    }
                )
            )
            started = time.monotonic()
            swarm = start_swarm(
                work, broker.port, Path(f"{key_path}.pub"), args.gateways, args.swarm_processes
            )
            for _process, lines in swarm:
                lines.expect("ready", 60)
            result["swarm_ready_s"] = round(time.monotonic() - started, 3)
            swarm_pids = [process.pid for process, _ in swarm]
            assert broker.process is not None
            if not args.skip_fleet:
                try:
                    result |= fleet_half(
                        work, broker, config, database, gateways, swarm_pids, args.timeout
                    )
                except BenchError as exc:
                    result["fleet_error"] = str(exc)
                    print(f"config_push: the fleet half failed: {exc}", file=sys.stderr)
            version, body = next_version_and_body(database)
            result |= asyncio.run(
                direct_baseline(
                    broker.port,
                    load_private_key(key_path),
                    gateways,
                    version,
                    body,
                    {"broker": [broker.process.pid], "swarm": swarm_pids},
                    args.timeout,
                )
            )
            result["swarm"] = stop_swarm(swarm)
        except BenchError as exc:
            result["error"] = str(exc)
            print(f"config_push: {exc}", file=sys.stderr)
        finally:
            for process, _ in swarm:
                stop_group(process, timeout=10)
            broker.stop()
    finish(result)


def stop_swarm(swarm: list[tuple[subprocess.Popen[str], Lines]]) -> dict[str, Any]:
    summaries = []
    for process, lines in swarm:
        stop_group(process, timeout=10)
        summaries.append(json.loads(lines.expect("{", 10)))
    total: dict[str, Any] = {
        name: sum(s[name] for s in summaries)
        for name in ("applied", "applied_again", "rejected", "connects", "disconnects")
    }
    total["cpu_s"] = round(sum(s["cpu_s"] for s in summaries), 3)
    total["peak_rss_mb"] = max(s["peak_rss_mb"] for s in summaries)
    reasons: Counter[str] = Counter()
    for summary in summaries:
        reasons.update(summary["reasons"])
    total["reasons"] = dict(reasons)
    return total


def finish(result: dict[str, Any]) -> None:
    acked, direct = result.get("all_acked_s"), result.get("baseline_roundtrip_s")
    if acked is not None and direct:
        result["fleet_vs_direct"] = round(acked / direct, 2)
    swarm = result.get("swarm", {})
    result["targets"] = {"all_acked_s_max": TARGET_ALL_ACKED_S, "rejected": 0}
    result["targets_met"] = {
        f"all_acked_s <= {TARGET_ALL_ACKED_S:g}": acked is not None and acked <= TARGET_ALL_ACKED_S,
        "no rejection": bool(swarm) and swarm.get("rejected") == 0,
    }
    print(json.dumps(result, indent=2))
    sys.exit(0 if all(result["targets_met"].values()) and "error" not in result else 1)


if __name__ == "__main__":
    main()
