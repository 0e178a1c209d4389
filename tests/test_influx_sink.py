"""The InfluxDB sink: line protocol byte for byte, the schema, the durable queue, and writes into
real servers (VictoriaMetrics for the v2 path, InfluxDB 1.6 for v1 and type fidelity), through
outages, refusals and restarts, and end to end through Mosquitto and `campus-fleet serve`."""

from __future__ import annotations

import asyncio
import http.server
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qs

import paho.mqtt.client as paho
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from pydantic import BaseModel, TypeAdapter, ValidationError

from fleet.config import load_config
from fleet.influx.check import run_check
from fleet.influx.protocol import (
    encode_readings,
    escape_measurement,
    escape_name,
    field_value,
    line,
    series,
)
from fleet.influx.queue import InfluxQueue, read_status
from fleet.influx.schema import MEASUREMENTS, TAGS
from fleet.influx.settings import InfluxSettings, InfluxV1, InfluxV2
from fleet.influx.sink import InfluxSink
from fleet.influx.transport import Transport, WriteError, classify
from fleet.influx.writer import Backoff, InfluxWriter
from fleet.ingest import Ingest
from fleet.registry import Registry
from fleet.store import Store
from simulator.broker import MosquittoBroker, free_port
from tests.conftest import REPO, Processes, run_cli, wait_for, write_yaml
from tests.influx_servers import InfluxD, VictoriaMetrics, influxd, victoria
from wire.errors import DocumentError
from wire.models import DeviceState, GatewayState, Reading, Status, TelemetryBatch, encode
from wire.mqtt import Message
from wire.topics import Channel, topic

__all__ = ["influxd", "victoria"]  # fixtures

S = 1_000_000_000
T0 = 1_700_000_000 * S + 123_456_789  # readings' own time, with nanoseconds below the millisecond
SITE = "school"
SETTINGS = TypeAdapter(InfluxSettings)
# Integer fields kept as integers: these tests check type fidelity (the default writes floats).
FAST = {
    "flush_interval_s": 0.05,
    "retry_initial_s": 0.05,
    "retry_max_s": 0.3,
    "timeout_s": 5,
    "integers": "integer",
}


def v2(url: str, **extra: Any) -> InfluxV2:
    return InfluxV2(url=url, org="school", bucket="campus", **{**FAST, **extra})


def v1(url: str, database: str = "campus", **extra: Any) -> InfluxV1:
    return InfluxV1(mode="v1", url=url, database=database, **{**FAST, **extra})


# -- line protocol: pure, byte for byte -----------------------------------------------------------


def test_numbers_are_floats_by_default_so_one_field_never_changes_type() -> None:
    settings = InfluxV2(url="http://127.0.0.1:1", org="o", bucket="b")
    assert settings.integers == "float"
    assert field_value(400, integers_as_float=True) == "400.0"


def test_examples_of_the_line_protocol_reference() -> None:
    # InfluxDB's line protocol reference, "Special characters" and "Examples".
    head = series("myMeasurement", [("tag1", "value1"), ("tag2", "value2")])
    assert line(head, "fieldKey", "fieldValue", 1556813561098000000) == (
        'myMeasurement,tag1=value1,tag2=value2 fieldKey="fieldValue" 1556813561098000000'
    )
    assert escape_measurement("my Measurement") == "my\\ Measurement"
    assert line("m", "fieldKey", '"string" within a string', 1) == (
        'm fieldKey="\\"string\\" within a string" 1'
    )
    spaced = series("myMeasurement", [("tag Key1", "tag Value1"), ("tag Key2", "tag Value2")])
    assert spaced == "myMeasurement,tag\\ Key1=tag\\ Value1,tag\\ Key2=tag\\ Value2"
    assert line("myMeasurement,tagKey=🍭", "fieldKey", "Launch 🚀", 1556813561098000000) == (
        'myMeasurement,tagKey=🍭 fieldKey="Launch 🚀" 1556813561098000000'
    )


def test_escaping_names_and_strings() -> None:
    assert escape_measurement("a,b c=d") == "a\\,b\\ c=d"  # '=' is plain in a measurement
    assert escape_name("a,b c=d") == "a\\,b\\ c\\=d"
    assert escape_name("co2") == "co2" and escape_name("pm2.5-avg_1") == "pm2.5-avg_1"
    # A backslash is doubled, so it can never escape the separator after it.
    assert escape_name("ends\\") == "ends\\\\" and escape_name("a\\,b") == "a\\\\\\,b"
    assert escape_name("two\nlines\r") == "two\\nlines\\r"
    assert field_value('C:\\dir "x"') == '"C:\\\\dir \\"x\\""'
    assert field_value("one\ntwo") == '"one\\ntwo"'  # never a line break inside a point


def test_values_keep_their_type() -> None:
    assert field_value(21.5) == "21.5"
    assert field_value(21.0) == "21.0"  # still a float: the field's type must not flip
    assert field_value(1e20) == "1e+20" and field_value(-2.5e-7) == "-2.5e-07"
    assert field_value(400) == "400i"
    assert field_value(-(2**63)) == "-9223372036854775808i"
    assert field_value(True) == "true" and field_value(False) == "false"  # bool before int
    assert field_value("on") == '"on"' and field_value("") == '""'
    assert field_value(400, integers_as_float=True) == "400.0"
    assert field_value(True, integers_as_float=True) == "true"
    for unwritable in (math.nan, math.inf, -math.inf):
        assert field_value(unwritable) is None
    assert line("m", "x", math.nan, 1) is None


def test_series_sorts_tags_and_leaves_out_empty_ones() -> None:
    tags = [("site", "s"), ("room", None), ("building", "b 1"), ("profile", ""), ("device", "d")]
    assert series("sensor", tags) == "sensor,building=b\\ 1,device=d,site=s"
    assert series("sensor", []) == "sensor"


def test_encode_readings_byte_for_byte() -> None:
    readings: list[Reading] = [
        (1, T0, "env-1", "temperature", 21.5, 0),
        (2, T0, "env-1", "co2", 415, 1),
        (3, T0 + 1, "proj-1", "power", True, 0),
        (4, T0 + 2, "proj-1", "input", 'HDMI "1"', 0),
        (5, T0 + 3, "env-1", "humidity", math.nan, 0),
        (6, T0 + 4, "env-1", "temperature", math.inf, 0),
        (7, T0 + 5, "env-1", "temperature", -3.25, 2),
    ]
    heads = {"env-1": "sensor,device=env-1,site=s", "proj-1": "display,device=proj-1,site=s"}
    lines, skipped = encode_readings(readings, heads.__getitem__)
    assert skipped == 2
    assert "\n".join(lines) == (
        f"sensor,device=env-1,site=s temperature=21.5 {T0}\n"
        f"sensor,device=env-1,site=s co2=415i {T0}\n"
        f"display,device=proj-1,site=s power=true {T0 + 1}\n"
        f'display,device=proj-1,site=s input="HDMI \\"1\\"" {T0 + 2}\n'
        f"sensor,device=env-1,site=s temperature=-3.25 {T0 + 5}"
    )
    floats, _ = encode_readings(readings[1:2], heads.__getitem__, integers_as_float=True)
    assert floats == [f"sensor,device=env-1,site=s co2=415.0 {T0}"]


def test_answers_are_classified() -> None:
    assert classify(204, b"") is None
    assert classify(401, b'{"code":"unauthorized","message":"unauthorized access"}') == (
        WriteError("config", "credentials refused: unauthorized access", 401)
    )
    missing = classify(404, b'{"error":"database not found: \\"x\\""}')
    assert missing == WriteError("config", 'not found: database not found: "x"', 404)
    bad = classify(400, b'{"error":"partial write: field type conflict"}')
    assert bad is not None and bad.kind == "rejected"
    assert classify(413, b"too big") == WriteError("too_large", "too big", 413)
    assert classify(503, b"", "7") == WriteError("retry", "Service Unavailable", 503, 7.0)
    assert classify(429, "slow down") == WriteError("retry", "slow down", 429)
    assert classify(301, b"") == WriteError("config", "unexpected answer: Moved Permanently", 301)


def test_backoff_doubles_up_to_its_cap_with_jitter() -> None:
    low = Backoff(1, 8, rand=lambda: 0.0)
    assert [low.next() for _ in range(6)] == [0.5, 1, 2, 4, 4, 4]
    high = Backoff(1, 8, rand=lambda: 1.0)
    assert [high.next() for _ in range(5)] == [1, 2, 4, 8, 8]
    high.reset()
    assert high.next() == 1


# -- settings -----------------------------------------------------------------------------------


def test_settings_modes_and_refusals(tmp_path: Path) -> None:
    plain = SETTINGS.validate_python({"url": "http://h:8086/", "org": "o", "bucket": "b"})
    assert isinstance(plain, InfluxV2) and plain.url == "http://h:8086"  # mode v2 by default
    one = SETTINGS.validate_python({"mode": "v1", "url": "https://h", "database": "d"})
    assert isinstance(one, InfluxV1) and one.target == "https://h database d"
    refused = [
        ({"url": "h:8086", "org": "o", "bucket": "b"}, "http:// or https://"),
        ({"url": "http://h", "org": "o"}, "bucket"),
        ({"mode": "v1", "url": "http://h"}, "database"),
        ({"mode": "v3", "url": "http://h"}, "mode must be v2 or v1"),
        ({"url": "http://h", "org": "o", "bucket": "b", "token": "x"}, "token"),
        (
            {"url": "http://h", "org": "o", "bucket": "b", "token_file": "t", "token_env": "T"},
            "not both",
        ),
        ({"mode": "v1", "url": "http://h", "database": "d", "password_env": "P"}, "username"),
        ({"url": "http://h", "org": "o", "bucket": "b", "batch_size": 0}, "batch_size"),
    ]
    for document, problem in refused:
        with pytest.raises(ValidationError, match=problem):
            SETTINGS.validate_python(document)


def test_the_config_section_with_secrets_beside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "influx.token").write_text("s3cret-token\n")
    influx = {"url": "http://h:8086", "org": "o", "bucket": "b", "token_file": "influx.token"}
    config = load_config(write_yaml(tmp_path / "fleet.yaml", {"influx": influx}))
    assert isinstance(config.influx, InfluxV2)
    assert config.influx.token_file == tmp_path / "influx.token"
    assert config.influx.token() == "s3cret-token"
    assert "s3cret" not in repr(config) and "s3cret" not in config.model_dump_json()
    monkeypatch.setenv("FLEET_INFLUX_TOKEN", " from-env ")
    by_env = v2("http://h", token_env="FLEET_INFLUX_TOKEN")
    assert by_env.token() == "from-env"
    assert load_config(write_yaml(tmp_path / "off.yaml", {})).influx is None
    write_yaml(tmp_path / "bad.yaml", {"name": "f", "influx": {"url": "http://h", "org": "o"}})
    with pytest.raises(DocumentError) as caught:
        load_config(tmp_path / "bad.yaml")
    assert "bad.yaml" in str(caught.value) and "influx" in str(caught.value)


# -- schema and queue on a real fleet store (no server) -------------------------------------------


class Fleet:
    """A fleet store with the sink hooked into the real ingest path, fed wire messages."""

    def __init__(self, path: Path, settings: InfluxSettings) -> None:
        self.path = path
        self.settings = settings
        self.seq: dict[str, int] = {}
        self.open()

    def open(self) -> None:
        self.store = Store(self.path)
        self.sink = InfluxSink(self.store, self.settings)
        self.ingest = Ingest(self.store)
        self.ingest.on_telemetry = self.sink.on_telemetry
        self.ingest.on_state = self.sink.on_state

    def close(self) -> None:
        self.store.close()

    def message(self, channel: Channel, model: BaseModel, gateway: str = "gw-1") -> None:
        with self.store.transaction():
            self.ingest.handle(Message(topic(SITE, gateway, channel), encode(model), 1, False, 1))

    def batch(self, *points: tuple[str, str, Any, int], gateway: str = "gw-1") -> list[Reading]:
        """(device, point, value, ts_ns) readings with the gateway's next seqs, sent as one
        telemetry message; returns them (to send again)."""
        readings: list[Reading] = []
        for device, point, value, ts in points:
            self.seq[gateway] = self.seq.get(gateway, 0) + 1
            readings.append((self.seq[gateway], ts, device, point, value, 0))
        self.send(readings, gateway)
        return readings

    def send(self, readings: list[Reading], gateway: str = "gw-1") -> None:
        batch = TelemetryBatch(
            first_seq=readings[0][0], last_seq=readings[-1][0], sent_ns=T0, readings=readings
        )
        self.message(Channel.TELEMETRY, batch, gateway)

    def counter(self, count: int, device: str = "env-1", start: int = 0) -> None:
        """`count` readings of point `counter`, values start.., one second apart."""
        for first in range(start, start + count, 500):
            last = min(start + count, first + 500)
            self.batch(*((device, "counter", i, T0 + i * S) for i in range(first, last)))

    def state(self, *devices: tuple[str, str, str], gateway: str = "gw-1") -> None:
        """(device, profile, kind) as the gateway reports them."""
        reported = [DeviceState(id=d, profile=p, kind=k, up=True) for d, p, k in devices]
        self.message(Channel.STATE, GatewayState(status=Status.ONLINE, devices=reported), gateway)

    def queued_lines(self) -> list[str]:
        rows = self.store.conn.execute("SELECT lines FROM influx_queue ORDER BY id")
        return [line for (text,) in rows for line in text.split("\n")]

    def status(self) -> dict[str, Any]:
        status = read_status(self.store)
        assert status is not None
        return status

    async def drained(self, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while self.sink.queue.queued() > 0:
            assert time.monotonic() < deadline, f"not drained: {self.status()}"
            await asyncio.sleep(0.02)
        return self.status()

    async def until(self, predicate: Any, timeout: float = 20, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {self.status()}"
            await asyncio.sleep(0.02)

    @asynccontextmanager
    async def writing(self) -> AsyncIterator[None]:
        task = asyncio.create_task(self.sink.run())
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            assert not task.done() or task.cancelled() or task.exception() is None


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    made = Fleet(tmp_path / "fleet.db", v2("http://127.0.0.1:9"))  # nothing listens: queue only
    yield made
    made.close()


def registered(store: Store) -> None:
    """Site school: building main, room r101 (in main); gw-1 in room r101; env-1 on gw-1 in room
    r102 (building annex); gw-2 in building annex, no room."""
    registry = Registry(store)
    registry.add_site(SITE)
    registry.add_building(SITE, "main")
    registry.add_building(SITE, "annex")
    registry.add_room(SITE, "r101", "main")
    registry.add_room(SITE, "r102", "annex")
    registry.add_gateway(SITE, "gw-1", room="r101")
    registry.add_gateway(SITE, "gw-2", building="annex")
    connection = {"type": "modbus-tcp", "host": "127.0.0.1", "port": 502}
    registry.add_device(SITE, "env-1", "gw-1", "campussim-thc100", connection, room="r102")


def test_tags_from_the_registry_else_from_the_gateway(fleet: Fleet) -> None:
    registered(fleet.store)
    fleet.state(("cam-1", "hikvision-ds2cd", "camera"), ("env-1", "other-profile", "meter"))
    fleet.state(("odd-1", "weird profile,x=1", "toaster"), gateway="gw-2")
    fleet.batch(
        ("env-1", "co2", 415, T0),  # registered: the registry wins over the report
        ("cam-1", "clock_drift_s", 0.25, T0),  # reported only: in its gateway's room
        ("new-1", "x", 1, T0),  # neither: measurement `device`, no profile
    )
    fleet.batch(("odd-1", "x", 1.5, T0), gateway="gw-2")  # unknown kind; escaped profile
    assert fleet.queued_lines() == [
        f"sensor,building=annex,device=env-1,gateway=gw-1,profile=campussim-thc100,room=r102,"
        f"site=school co2=415i {T0}",
        f"camera,building=main,device=cam-1,gateway=gw-1,profile=hikvision-ds2cd,room=r101,"
        f"site=school clock_drift_s=0.25 {T0}",
        f"device,building=main,device=new-1,gateway=gw-1,room=r101,site=school x=1i {T0}",
        f"device,building=annex,device=odd-1,gateway=gw-2,profile=weird\\ profile\\,x\\=1,"
        f"site=school x=1.5 {T0}",
    ]


def test_registry_changes_and_new_reports_are_seen(fleet: Fleet, tmp_path: Path) -> None:
    fleet.batch(("env-1", "co2", 400, T0))
    fleet.state(("env-1", "senseair-s8", "sensor"))  # the gateway reports: look up again
    fleet.batch(("env-1", "co2", 401, T0 + S))
    other = Store(tmp_path / "fleet.db")  # the registry CLI: another connection
    registered(other)
    other.close()
    fleet.batch(("env-1", "co2", 402, T0 + 2 * S))
    heads = [line.rsplit(" ", 2)[0] for line in fleet.queued_lines()]
    assert heads == [
        "device,device=env-1,gateway=gw-1,site=school",
        "sensor,device=env-1,gateway=gw-1,profile=senseair-s8,site=school",
        "sensor,building=annex,device=env-1,gateway=gw-1,profile=campussim-thc100,room=r102,"
        "site=school",
    ]


def test_only_new_readings_are_queued(fleet: Fleet) -> None:
    first = fleet.batch(*(("env-1", "co2", 400 + i, T0 + i * S) for i in range(3)))
    fleet.send(first)  # the same batch again (its PUBACK was lost): nothing new
    more = fleet.batch(("env-1", "co2", 500, T0 + 10 * S))
    fleet.send(first[1:] + more + [(5, T0 + 11 * S, "env-1", "co2", 501, 0)])  # partly known
    values = [line.split(" ")[1] for line in fleet.queued_lines()]
    assert values == ["co2=400i", "co2=401i", "co2=402i", "co2=500i", "co2=501i"]
    status = fleet.status()
    assert (status["enqueued"], status["queued"]) == (5, 5)
    stored = fleet.store.conn.execute("SELECT count(*) FROM readings").fetchone()[0]
    assert stored == 5


def test_a_rolled_back_ingest_takes_its_points_along(fleet: Fleet) -> None:
    fleet.batch(("env-1", "co2", 400, T0))
    readings: list[Reading] = [(2, T0 + S, "env-1", "co2", 401, 0)]
    batch = TelemetryBatch(first_seq=2, last_seq=2, sent_ns=T0, readings=readings)
    message = Message(topic(SITE, "gw-1", Channel.TELEMETRY), encode(batch), 1, False, 1)
    with pytest.raises(RuntimeError), fleet.store.transaction():
        fleet.ingest.handle(message)
        raise RuntimeError("disk full")  # e.g. the commit fails
    assert [line.split(" ")[1] for line in fleet.queued_lines()] == ["co2=400i"]
    assert (fleet.status()["enqueued"], fleet.status()["queued"]) == (1, 1)


def test_a_full_queue_evicts_the_oldest_but_not_the_batch_in_flight(tmp_path: Path) -> None:
    store = Store(tmp_path / "fleet.db")
    queue = InfluxQueue(store, max_points=1000)
    with store.transaction():
        for row in range(6):
            queue.push([f"m x={row}i {i}" for i in range(300)])
    assert queue.queued() == 900  # rows 0-2 (and 3's points) went: the oldest, in whole rows
    status = read_status(store)
    assert status is not None and (status["evicted"], status["enqueued"]) == (900, 1800)
    batch = queue.head(500)
    assert batch is not None and batch.lines[0] == "m x=3i 0" and len(batch.lines) == 300
    with store.transaction():
        queue.push(["m x=6i 0"] * 400)  # over the bound: the oldest row after the one in flight
    assert queue.queued() == 1000
    queue.ack(batch, written=300)
    status = read_status(store)
    assert status is not None
    assert (status["written"], status["queued"], status["evicted"]) == (300, 700, 1200)
    rest = queue.head(10_000)
    assert rest is not None and rest.lines[0] == "m x=5i 0" and len(rest.lines) == 700
    reopened = InfluxQueue(store, max_points=1000)  # counters live in the database
    assert reopened.queued() == 700
    store.close()


def test_rejects_are_kept_with_the_server_message_and_bounded(tmp_path: Path) -> None:
    store = Store(tmp_path / "fleet.db")
    queue = InfluxQueue(store, max_points=10_000)
    for _ in range(3):
        with store.transaction():
            queue.push([f"m x={i}i {i}" for i in range(500)])
        batch = queue.head(500)
        assert batch is not None
        queue.ack(batch, written=100, rejects=[(text, "HTTP 400: bad") for text in batch.lines])
    status = read_status(store, rejects=2)
    assert status is not None and status["rejected"] == 1500 and status["written"] == 300
    assert [r["line"] for r in status["recent_rejects"]] == ["m x=499i 499", "m x=498i 498"]
    kept = store.conn.execute("SELECT count(*) FROM influx_rejects").fetchone()[0]
    assert kept == 1000
    store.close()


class Scripted:
    """A transport answering from a function of the body (for the writer's own logic)."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.bodies: list[list[str]] = []

    def write(self, body: bytes) -> WriteError | None:
        lines = body.decode().split("\n")
        self.bodies.append(lines)
        result: WriteError | None = self.answer(lines)
        return result

    def close(self) -> None:
        pass


async def test_isolation_is_bounded_per_batch(tmp_path: Path) -> None:
    """Every line refused: past the request budget, failing parts are rejected whole."""
    store = Store(tmp_path / "fleet.db")
    settings = v2("http://unused", batch_size=4096)
    queue = InfluxQueue(store, settings.queue_max_points)
    transport = Scripted(lambda lines: WriteError("rejected", "bad", 400))

    def factory(_settings: InfluxSettings) -> Transport:
        return transport

    writer = InfluxWriter(queue, settings, transport_factory=factory)
    with store.transaction():
        queue.push([f"m x={i}i {i}" for i in range(4096)])
    task = asyncio.create_task(writer.run())
    while queue.queued():
        await asyncio.sleep(0.01)
    task.cancel()
    status = read_status(store)
    assert status is not None and (status["rejected"], status["written"]) == (4096, 0)
    assert 1 + 128 <= len(transport.bodies) <= 1 + 128 + 12  # + one untried half per level
    store.close()


# -- real servers ---------------------------------------------------------------------------------


async def test_v2_writes_into_victoria_metrics(
    tmp_path: Path, victoria: VictoriaMetrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLEET_TEST_INFLUX_TOKEN", raising=False)
    fleet = Fleet(tmp_path / "fleet.db", v2(victoria.url, token_env="FLEET_TEST_INFLUX_TOKEN"))
    registered(fleet.store)
    fleet.state(("cam-1", "generic-onvif", "camera"))
    async with fleet.writing():
        fleet.batch(("env-1", "temperature", 21.5, T0), ("env-1", "co2", 415, T0))
        await fleet.until(lambda: fleet.status()["last_error"], what="the token error")
        assert "FLEET_TEST_INFLUX_TOKEN" in fleet.status()["last_error"]
        assert fleet.sink.queue.queued() == 2  # kept while the configuration is wrong
        monkeypatch.setenv("FLEET_TEST_INFLUX_TOKEN", "any-token")  # VictoriaMetrics ignores it
        fleet.batch(
            ("env-1", "temperature", 21.75, T0 + S),
            ("cam-1", "rtsp_ok", True, T0 + S),
            ("cam-1", "firmware", "V5.7.3", T0 + S),
        )
        status = await fleet.drained()
    assert (status["written"], status["rejected"], status["failing_since_ns"]) == (5, 0, None)
    got = {
        (s["metric"]["__name__"], v, t)
        for s in victoria.export()
        for v, t in zip(s["values"], s["timestamps"], strict=True)
    }
    ms = T0 // 1_000_000  # VictoriaMetrics keeps milliseconds
    assert got == {
        ("sensor_temperature", 21.5, ms),
        ("sensor_temperature", 21.75, ms + 1000),
        ("sensor_co2", 415, ms),
        ("camera_rtsp_ok", 1, ms + 1000),
        ("camera_firmware", 0, ms + 1000),  # strings are stored as 0 there
    }
    [temperature] = victoria.export('{__name__="sensor_temperature"}')
    assert temperature["metric"] == {
        "__name__": "sensor_temperature",
        "site": "school",
        "building": "annex",
        "room": "r102",
        "gateway": "gw-1",
        "device": "env-1",
        "profile": "campussim-thc100",
    }
    fleet.close()


async def test_v1_keeps_types_and_nanoseconds_in_influxdb(tmp_path: Path, influxd: InfluxD) -> None:
    influxd.create_database("campus")
    fleet = Fleet(tmp_path / "fleet.db", v1(influxd.url))
    text = 'He said "hi", a\\b = c\nnext line'
    async with fleet.writing():
        fleet.batch(
            ("env-1", "temperature", 21.0, T0),
            ("env-1", "big", 2**62 + 1, T0 + 1),
            ("env-1", "negative", -7, T0 + 2),
            ("env-1", "door_open", False, T0 + 3),
            ("env-1", "message", text, T0 + 4),
            ("env-1", "tiny", 1.5e-300, T0 + 5),
        )
        status = await fleet.drained()
    assert status["written"] == 6
    fields = {
        row["fieldKey"]: row["fieldType"]
        for row in influxd.rows("SHOW FIELD KEYS FROM device", "campus")
    }
    assert fields == {
        "temperature": "float",
        "big": "integer",
        "negative": "integer",
        "door_open": "boolean",
        "message": "string",
        "tiny": "float",
    }
    rows = influxd.rows("SELECT * FROM device", "campus")
    got = {
        (row["time"], name): row[name] for row in rows for name in fields if row[name] is not None
    }
    assert got == {
        (T0, "temperature"): 21,
        (T0 + 1, "big"): 2**62 + 1,
        (T0 + 2, "negative"): -7,
        (T0 + 3, "door_open"): False,
        (T0 + 4, "message"): text.replace("\n", "\\n"),  # a newline is written as \n
        (T0 + 5, "tiny"): 1.5e-300,
    }
    assert {(r["device"], r["gateway"], r["site"]) for r in rows} == {("env-1", "gw-1", SITE)}
    fleet.close()


async def test_refused_points_are_isolated_and_the_rest_written(
    tmp_path: Path, influxd: InfluxD
) -> None:
    influxd.create_database("campus")
    fleet = Fleet(tmp_path / "fleet.db", v1(influxd.url, batch_size=1000))
    async with fleet.writing():
        fleet.batch(("env-1", "mode", 1, T0))  # `mode` is an integer field from now on
        await fleet.drained()
        points: list[tuple[str, str, Any, int]] = [
            ("env-1", "n", i, T0 + (i + 1) * S) for i in range(998)
        ]
        points[17] = ("env-1", "mode", 1.5, T0 + 18 * S)  # a field type conflict
        points[523] = ("env-1", "time", 1, T0 + 524 * S)  # a field name InfluxDB refuses
        fleet.batch(*points)  # and, with no await between, two lines no parser takes:
        with fleet.store.transaction():
            fleet.sink.queue.push(["this is not line protocol", 'device x="unterminated 1'])
        status = await fleet.drained()
    assert (status["rejected"], status["written"]) == (4, 1 + 1000 - 4)
    errors = [reject["error"] for reject in status["recent_rejects"][::-1]][-4:]
    assert all(error.startswith("HTTP 400: ") for error in errors), errors
    assert "field type conflict" in errors[0] and "invalid field name" in errors[1]
    assert "unable to parse" in errors[2] and "unable to parse" in errors[3]
    rows = influxd.rows("SELECT count(n), sum(n) FROM device", "campus")
    assert (rows[0]["count"], rows[0]["sum"]) == (996, sum(range(998)) - 17 - 523)
    assert status["failing_since_ns"] is None
    fleet.close()


async def test_a_missing_database_keeps_the_points_until_it_exists(
    tmp_path: Path, influxd: InfluxD, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fleet.influx")
    fleet = Fleet(tmp_path / "fleet.db", v1(influxd.url, database="campus"))
    async with fleet.writing():
        fleet.counter(300)
        await fleet.until(lambda: fleet.status()["failing_since_ns"], what="failing")
        await asyncio.sleep(0.5)  # a few retries: logged once, points kept
        status = fleet.status()
        assert status["last_error"] == 'HTTP 404: not found: database not found: "campus"'
        assert (status["queued"], status["written"], status["rejected"]) == (300, 0, 0)
        errors = [r for r in caplog.records if r.levelname == "ERROR" and "campus" in r.message]
        assert len(errors) == 1 and "create the bucket or database" in errors[0].message
        influxd.create_database("campus")
        fleet.counter(200, start=300)
        status = await fleet.drained()
    assert (status["written"], status["failing_since_ns"]) == (500, None)
    assert influxd.rows("SELECT count(counter) FROM device", "campus")[0]["count"] == 500
    assert any("writing again" in r.message for r in caplog.records)
    fleet.close()


async def test_refused_credentials_keep_the_points_and_a_fixed_password_is_read_again(
    tmp_path: Path,
) -> None:
    server = InfluxD(tmp_path / "influxd-auth", auth=True)
    server.start()
    try:
        server.create_database("campus")
        password = tmp_path / "influx.password"
        password.write_text("wrong")
        settings = v1(server.url, username="admin", password_file=password)
        fleet = Fleet(tmp_path / "fleet.db", settings)
        async with fleet.writing():
            fleet.counter(50)
            await fleet.until(lambda: fleet.status()["failing_since_ns"], what="refused")
            assert fleet.status()["last_error"].startswith("HTTP 401: credentials refused")
            assert fleet.sink.queue.queued() == 50
            password.write_text("admin-pw\n")
            status = await fleet.drained()
        assert status["written"] == 50
        assert server.rows("SELECT count(counter) FROM device", "campus")[0]["count"] == 50
        fleet.close()
    finally:
        server.close()


def _stream(fleet: Fleet, total: int, chunk: int) -> Iterator[int]:
    """Sends `total` counter readings `chunk` at a time, yielding how many were sent."""
    for start in range(0, total, chunk):
        fleet.counter(min(chunk, total - start), start=start)
        yield start + chunk


@pytest.mark.parametrize(
    ("server_kind", "how"),
    [("victoria-metrics", "sigterm"), ("influxd", "sigterm"), ("influxd", "sigkill")],
)
async def test_a_server_stopped_mid_stream_gets_every_point_once(
    tmp_path: Path, server_kind: str, how: str
) -> None:
    server: VictoriaMetrics | InfluxD
    if server_kind == "influxd":
        server = InfluxD(tmp_path / "server")
        settings: InfluxSettings = v1(server.url, batch_size=500)
    else:
        server = VictoriaMetrics(tmp_path / "server")
        settings = v2(server.url, batch_size=500)
    server.start()
    if isinstance(server, InfluxD):
        server.create_database("campus")
    total = 20_000
    fleet = Fleet(tmp_path / "fleet.db", settings)
    try:
        async with fleet.writing():
            for sent in _stream(fleet, total, 250):
                await asyncio.sleep(0.002)
                if sent == 5000:
                    await fleet.until(lambda: fleet.status()["written"] > 0, what="writes")
                    if how == "sigkill":
                        server.kill()
                    else:
                        server.stop()
                if sent == 12_000:
                    await fleet.until(lambda: fleet.status()["failing_since_ns"], what="fail")
                    assert fleet.sink.queue.queued() > 0
                    server.start()
            status = await fleet.drained(timeout=60)
        assert (status["written"], status["rejected"], status["evicted"]) == (total, 0, 0)
        if isinstance(server, InfluxD):
            rows = server.rows("SELECT count(counter), sum(counter) FROM device", "campus")
            assert (rows[0]["count"], rows[0]["sum"]) == (total, total * (total - 1) // 2)
        else:
            [series] = server.export('{__name__="device_counter"}')
            assert len(series["values"]) == total
            assert sorted(series["values"]) == list(range(total))
    finally:
        fleet.close()
        server.close()


# -- campus-fleet influx check / status -----------------------------------------------------------


def fleet_config(tmp_path: Path, influx: dict[str, Any] | None, name: str = "fleet") -> Path:
    document: dict[str, Any] = {"name": name, "database": str(tmp_path / f"{name}.db")}
    if influx is not None:
        document["influx"] = influx
    return write_yaml(tmp_path / f"{name}.yaml", document)


def check(config: Path) -> tuple[int, dict[str, Any]]:
    result = run_cli("campus-fleet", "--config", str(config), "influx", "check", "--json")
    return result.returncode, json.loads(result.stdout)


def test_check_against_real_servers(
    tmp_path: Path, victoria: VictoriaMetrics, influxd: InfluxD
) -> None:
    token = tmp_path / "token"
    token.write_text("t0ken-value")
    v2_ok = {"url": victoria.url, "org": "o", "bucket": "b", "token_file": "token"}
    code, report = check(fleet_config(tmp_path, v2_ok, "v2"))
    assert code == 0 and report["ok"], report
    assert [s["step"] for s in report["steps"]] == ["token", "reachable", "credentials", "bucket"]
    assert "no buckets API" in report["steps"][-1]["message"]

    influxd.create_database("campus")
    v1_ok = {"mode": "v1", "url": influxd.url, "database": "campus"}
    steps = run_check(SETTINGS.validate_python(v1_ok))
    assert [(s.name, s.ok) for s in steps] == [
        ("reachable", True),
        ("credentials", True),
        ("database", True),
    ]
    assert steps[0].message.startswith("InfluxDB 1.6.7")
    cases = [
        ({**v1_ok, "database": "nope"}, 3, "no database 'nope' (databases: campus)"),
        ({**v1_ok, "retention_policy": "short"}, 3, "no retention policy 'short'"),
        ({**v1_ok, "url": f"http://127.0.0.1:{free_port()}"}, 1, "connection refused"),
        ({**v2_ok, "url": influxd.url}, 2, "use mode: v1"),
        ({**v2_ok, "token_file": str(tmp_path / "missing")}, 2, "cannot read the token file"),
        ({**v2_ok, "url": "http://no-such-host.invalid:8086"}, 1, "host name not resolved"),
    ]
    for influx, code_expected, message in cases:
        *passed, failed = run_check(SETTINGS.validate_python(influx).relative_to(tmp_path))
        assert all(step.ok for step in passed) and not failed.ok, (influx, failed)
        assert (failed.code, message in failed.message) == (code_expected, True), failed

    people = run_cli(
        "campus-fleet",
        "--config",
        str(fleet_config(tmp_path, {**v1_ok, "database": "nope"}, "nope")),
        "influx",
        "check",
    )
    assert people.returncode == 3
    assert "FAIL" in people.stdout and "influx check failed: no database" in people.stderr
    off = run_cli("campus-fleet", "--config", str(fleet_config(tmp_path, None)), "influx", "check")
    assert off.returncode == 2 and "sink is off" in off.stderr
    assert "t0ken-value" not in json.dumps(report)


def test_check_with_authentication(tmp_path: Path) -> None:
    server = InfluxD(tmp_path / "influxd-auth", auth=True)
    server.start()
    try:
        server.create_database("campus")
        (tmp_path / "pw").write_text("admin-pw")
        (tmp_path / "bad").write_text("nope")
        good = {"mode": "v1", "url": server.url, "database": "campus", "username": "admin"}
        code, report = check(fleet_config(tmp_path, {**good, "password_file": "pw"}, "good"))
        assert code == 0, report
        assert [s["step"] for s in report["steps"]][:2] == ["password", "reachable"]
        *_, refused = run_check(
            SETTINGS.validate_python({**good, "password_file": tmp_path / "bad"})
        )
        assert refused.code == 2 and "refused the user 'admin' (HTTP 401)" in refused.message
        *_, anonymous = run_check(
            SETTINGS.validate_python({k: v for k, v in good.items() if k != "username"})
        )
        assert anonymous.code == 2 and "requires a user" in anonymous.message
    finally:
        server.close()


class InfluxDB2StandIn(http.server.BaseHTTPRequestHandler):
    """No InfluxDB 2.x is installable here: this answers /ping, GET /api/v2/buckets and POST
    /api/v2/write as its API reference documents them, for the check's v2 branches only."""

    TOKENS: ClassVar[dict[str, list[str]]] = {
        "Token all-access": ["campus"],
        "Token write-only": [],
    }

    def log_message(self, *_args: Any) -> None:
        pass

    def answer(self, status: int, document: dict[str, Any] | None = None) -> None:
        body = json.dumps(document).encode() if document is not None else b""
        self.send_response(status)
        self.send_header("X-Influxdb-Version", "v2.7.11")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def allowed(self, query: dict[str, list[str]]) -> list[str] | None:
        readable = self.TOKENS.get(self.headers.get("Authorization", ""))
        if readable is None:
            self.answer(401, {"code": "unauthorized", "message": "unauthorized access"})
        elif query.get("org") != ["school"]:
            message = f'organization name "{query.get("org", [""])[0]}" not found'
            self.answer(404, {"code": "not found", "message": message})
            return None
        return readable

    def do_GET(self) -> None:
        path, _, raw = self.path.partition("?")
        query = parse_qs(raw)
        if path == "/ping":
            self.answer(204)
        elif (readable := self.allowed(query)) is not None:
            names = [name for name in readable if name in query.get("name", [name])]
            self.answer(200, {"buckets": [{"name": name} for name in names]})

    def do_POST(self) -> None:
        query = parse_qs(self.path.partition("?")[2])
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.allowed(query) is None:
            return
        if query.get("bucket") != ["campus"]:
            bucket = query.get("bucket", [""])[0]
            self.answer(404, {"code": "not found", "message": f'bucket "{bucket}" not found'})
        else:
            self.answer(204)


def test_check_with_influxdb_2_answers(tmp_path: Path) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), InfluxDB2StandIn)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        for name, secret in (("all", "all-access"), ("write", "write-only"), ("bad", "nope")):
            (tmp_path / name).write_text(secret)

        def last(token: str, org: str = "school", bucket: str = "campus") -> tuple[int, str]:
            settings = InfluxV2(url=url, org=org, bucket=bucket, token_file=tmp_path / token)
            *passed, final = run_check(settings)
            assert all(step.ok for step in passed)
            return final.code, final.message

        assert last("all") == (0, "bucket 'campus' exists in org 'school'")
        code, message = last("write")
        assert code == 0 and "the token may not list buckets" in message
        assert last("write", bucket="other") == (
            3,
            "bucket 'other' not found: bucket \"other\" not found",
        )
        assert last("all", org="elsewhere") == (3, 'organization name "elsewhere" not found')
        code, message = last("bad")
        assert code == 2 and message == (
            "the server refused the token (HTTP 401): unauthorized access"
        )
    finally:
        server.shutdown()
        server.server_close()


async def test_status_shows_counters_and_rejects(tmp_path: Path, influxd: InfluxD) -> None:
    influxd.create_database("campus")
    influx = {"mode": "v1", "url": influxd.url, "database": "campus", **FAST}
    config = fleet_config(tmp_path, influx)
    config_model = load_config(config)
    assert config_model.influx is not None
    fleet = Fleet(config_model.database, config_model.influx)
    async with fleet.writing():
        fleet.batch(("env-1", "mode", 1, T0))
        with fleet.store.transaction():  # NaN cannot cross the wire (JSON); the sink copes anyway
            fleet.sink.on_telemetry(SITE, "gw-1", [(99, T0, "env-1", "level", math.nan, 0)])
        fleet.batch(("env-1", "mode", "eco", T0 + S))
        await fleet.drained()
    fleet.close()
    result = run_cli("campus-fleet", "--config", str(config), "influx", "status", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["configured"] and report["mode"] == "v1"
    assert {k: report[k] for k in ("written", "queued", "rejected", "skipped", "evicted")} == {
        "written": 1,
        "queued": 0,
        "rejected": 1,
        "skipped": 1,
        "evicted": 0,
    }
    [reject] = report["recent_rejects"]
    assert reject["line"] == f'device,device=env-1,gateway=gw-1,site=school mode="eco" {T0 + S}'
    assert "field type conflict" in reject["error"]
    table = run_cli("campus-fleet", "--config", str(config), "influx", "status")
    assert "rejected" in table.stdout and "field type conflict" in table.stdout


# -- end to end: Mosquitto, `campus-fleet serve`, a gateway played by paho ------------------------


class Gateway:
    """A test publisher playing a gateway (MQTT v5, QoS 1, waits for each PUBACK)."""

    def __init__(self, broker: MosquittoBroker, site: str, gateway: str) -> None:
        self.site = site
        self.gateway = gateway
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"{site}-{gateway}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.client.connect("::1", broker.port)
        self.client.loop_start()

    def publish(self, channel: Channel, model: BaseModel, retain: bool = False) -> None:
        info = self.client.publish(
            topic(self.site, self.gateway, channel), encode(model), 1, retain
        )
        info.wait_for_publish(10)

    def telemetry(self, readings: list[Reading]) -> None:
        self.publish(
            Channel.TELEMETRY,
            TelemetryBatch(
                first_seq=readings[0][0],
                last_seq=readings[-1][0],
                sent_ns=time.time_ns(),
                readings=readings,
            ),
        )

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.mark.slow
def test_serve_writes_what_gateways_send(
    processes: Processes, broker: MosquittoBroker, tmp_path: Path, victoria: VictoriaMetrics
) -> None:
    site = f"influx-{os.getpid()}-{time.monotonic_ns() % 100_000}"
    (tmp_path / "influx.token").write_text("serve-s3cret-token")
    config = write_yaml(
        tmp_path / "fleet.yaml",
        {
            "name": site,
            "mqtt": {"host": "::1", "port": broker.port},
            "database": str(tmp_path / "fleet.db"),
            "sites": [site],
            "influx": {
                "url": victoria.url,
                "org": "school",
                "bucket": "campus",
                "token_file": "influx.token",
                "flush_interval_s": 0.1,
            },
        },
    )
    inventory = tmp_path / "inventory.csv"
    inventory.write_text(
        "site,building,room,gateway,device,kind,profile,connection\n"
        f"{site},bat-a,a-101,gw-1,a101-env,sensor,campussim-thc100,modbus-tcp://127.0.0.1:1502?unit=1\n"
    )
    imported = run_cli("campus-fleet", "--config", str(config), "import", str(inventory))
    assert imported.returncode == 0, imported.stderr
    processes.start("fleet", "campus-fleet", "--config", str(config), "serve")
    wait_for(lambda: "subscribed to" in processes.log("fleet"), 15, what="fleet subscribed")
    gateway = Gateway(broker, site, "gw-1")
    try:
        camera = DeviceState(id="cam-1", profile="generic-onvif", kind="camera", up=True)
        gateway.publish(Channel.STATE, GatewayState(status=Status.ONLINE, devices=[camera]), True)
        base = time.time_ns() - 60 * S
        first: list[Reading] = [
            (seq, base + seq * S, "a101-env", point, value, 0)
            for seq, (point, value) in enumerate(
                [("temperature", 21.5), ("humidity", 41.0), ("co2", 950)] * 10, start=1
            )
        ]
        gateway.telemetry(first)
        gateway.telemetry(first[-5:])  # sent again: no point twice
        gateway.telemetry([(31, base + 31 * S, "cam-1", "rtsp_response_ms", 42.5, 0)])

        def written() -> int:
            result = run_cli("campus-fleet", "--config", str(config), "influx", "status", "--json")
            return int(json.loads(result.stdout).get("written", 0)) if result.returncode == 0 else 0

        wait_for(lambda: written() == 31, 20, what="31 points written")
        series = victoria.export('{__name__=~"sensor_.+|camera_.+"}')
        samples = {s["metric"]["__name__"]: len(s["values"]) for s in series}
        assert samples == {
            "sensor_temperature": 10,
            "sensor_humidity": 10,
            "sensor_co2": 10,
            "camera_rtsp_response_ms": 1,
        }
        co2 = next(s for s in series if s["metric"]["__name__"] == "sensor_co2")
        assert co2["metric"] == {
            "__name__": "sensor_co2",
            "site": site,
            "building": "bat-a",
            "room": "a-101",
            "gateway": "gw-1",
            "device": "a101-env",
            "profile": "campussim-thc100",
        }
        assert co2["timestamps"][0] == (base + 3 * S) // 1_000_000
        cam = next(s for s in series if s["metric"]["__name__"] == "camera_rtsp_response_ms")
        assert cam["metric"]["profile"] == "generic-onvif" and cam["metric"]["room"] == "a-101"
    finally:
        gateway.close()
    assert processes.stop("fleet") == 0
    log = processes.log("fleet")
    assert "writing telemetry to InfluxDB at" in log and "serve-s3cret-token" not in log


# -- dashboards -------------------------------------------------------------------------------


DASHBOARDS = REPO / "fleet" / "dashboards"
PROFILES = REPO / "firmware-profiles"
# Fields the projector and camera panels read: the shipped display and camera profiles have them.
PANEL_FIELDS = {
    "display": {"lamp_hours", "filter_hours", "power"},
    "camera": {"rtsp_ok", "rtsp_response_ms", "clock_drift_s", "firmware_outdated"},
}


def profile_fields() -> dict[str, set[str]]:
    """Point names of the shipped profiles, by kind."""
    fields: dict[str, set[str]] = {}
    for path in PROFILES.glob("*.yaml"):
        profile = yaml.safe_load(path.read_text())
        names = {point["name"] for point in profile.get("points", [])}
        fields.setdefault(profile["kind"], set()).update(names)
    return fields


def test_the_display_and_camera_panels_read_points_the_shipped_profiles_have() -> None:
    shipped = profile_fields()
    for kind, names in PANEL_FIELDS.items():
        assert names <= shipped.get(kind, set()), (kind, names - shipped.get(kind, set()))


def panel_queries(path: Path) -> Iterator[tuple[str, str]]:
    """(panel title, query) of every target of every panel (rows included)."""
    dashboard = json.loads(path.read_text())

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for item in items:
            yield item
            yield from panels(item.get("panels", []))

    for panel in panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            yield panel["title"], target["query"]


def names_in(query: str, influxql: bool) -> tuple[set[str], set[str], set[str]]:
    """(measurements, fields, tags) a query names."""
    if influxql:
        source = re.search(r'FROM ((?:"[a-z_]+"(?:, )?)+)', query)
        assert source is not None, query
        measurements = set(re.findall(r'"([^"]+)"', source[1]))
        fields = set(re.findall(r'\("([^"]+)"\)', query))
        tags = set(re.findall(r'"([^"]+)"', query)) - measurements - fields
        return measurements, fields, tags
    measurements = set(re.findall(r'r\._measurement == "([^"]+)"', query))
    fields = set(re.findall(r'r\._field == "([^"]+)"', query))
    tags = set(re.findall(r"r\.([a-z_]+) =~", query))
    for columns in re.findall(r"columns: \[([^\]]*)\]", query):
        tags |= set(re.findall(r'"([^"]+)"', columns))
    return measurements, fields, {tag for tag in tags if not tag.startswith("_")}


def test_dashboards_load_and_name_only_the_schema() -> None:
    files = sorted(DASHBOARDS.glob("*.json"))
    assert [p.name for p in files] == ["campus-overview-influxql.json", "campus-overview.json"]
    known = profile_fields()
    every_field = set().union(*known.values())
    for path in files:
        queries = list(panel_queries(path))
        assert len(queries) >= 11, path
        for title, query in queries:
            measurements, fields, tags = names_in(query, path.name.endswith("influxql.json"))
            assert measurements and set(measurements) <= set(MEASUREMENTS), (title, measurements)
            assert tags <= set(TAGS), (path.name, title, tags)
            for measurement in measurements:
                allowed = every_field if measurement == "device" else known.get(measurement, set())
                assert fields <= allowed, (path.name, title, measurement, fields - allowed)
    flux = [query for _, query in panel_queries(DASHBOARDS / "campus-overview.json")]
    assert all('from(bucket: "${bucket}")' in query for query in flux)


async def test_influxql_dashboard_queries_run_on_sink_data(
    tmp_path: Path, influxd: InfluxD
) -> None:
    """Every InfluxQL panel, its Grafana macros filled in, answers rows from what the sink wrote."""
    influxd.create_database("campus")
    fleet = Fleet(tmp_path / "fleet.db", v1(influxd.url))
    registered(fleet.store)
    fleet.state(("proj-1", "pjlink-projector", "display"), ("cam-1", "generic-onvif", "camera"))
    now = time.time_ns()
    async with fleet.writing():
        for minute in range(30):
            ts = now - (30 - minute) * 60 * S
            fleet.batch(
                ("env-1", "temperature", 21.0 + minute / 10, ts),
                ("env-1", "humidity", 40.0, ts),
                ("env-1", "co2", 700 + minute * 20, ts),
                ("proj-1", "lamp_hours", 1500 + minute, ts),
                ("proj-1", "filter_hours", 300 + minute, ts),
                ("proj-1", "power", "on", ts),
                ("cam-1", "rtsp_ok", True, ts),
                ("cam-1", "rtsp_response_ms", 35.0, ts),
                ("cam-1", "clock_drift_s", 0.5, ts),
                ("cam-1", "firmware_outdated", False, ts),
            )
        fleet.batch(("gone-1", "temperature", 20.0, now - 3 * 3600 * S))  # silent since 3 h
        await fleet.drained()
    fleet.close()
    macros = {
        "$timeFilter": "time > now() - 6h",
        "$__interval": "1m",
        "$site": "school",
        "$building": ".*",
        "$room": ".*",
        "$lamp_rated_hours": "4000",
        "$filter_rated_hours": "2000",
        "$offline_after": "15m",
    }
    for title, query in panel_queries(DASHBOARDS / "campus-overview-influxql.json"):
        for macro, value in macros.items():
            query = query.replace(macro, value)
        assert not re.search(r"\$[a-z_]", query), (title, query)
        series = influxd.query(query, "campus")
        assert series and all(s["values"] for s in series), (title, query)
