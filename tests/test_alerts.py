"""Alerts: the engine on a real store, and end to end through Mosquitto and `campus-fleet serve`."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from pydantic import BaseModel, TypeAdapter, ValidationError

from fleet.alerts import AlertEngine, AlertRule, AlertRules
from fleet.config import load_config
from fleet.ingest import Ingest
from fleet.store import Store
from simulator.broker import MosquittoBroker
from simulator.processes import stop_group
from tests.conftest import Processes, fleet_json, run_cli, wait_for, write_yaml
from wire.control import Ack, AckStatus, AlertMessage, AlertState
from wire.errors import DocumentError
from wire.models import (
    BufferState,
    DeviceState,
    Event,
    EventKind,
    GatewayState,
    Quality,
    Reading,
    Status,
    TelemetryBatch,
    encode,
)
from wire.mqtt import Message
from wire.topics import Channel, topic

S = 1_000_000_000
T0 = 1_700_000_000 * S  # readings' own time, far from the wall clock: arrival time must not count
RULES = TypeAdapter(AlertRules)


def rules(*documents: dict[str, Any]) -> list[AlertRule]:
    return RULES.validate_python(list(documents))


CO2_HIGH = {
    "id": "co2-high",
    "type": "threshold",
    "point": "co2",
    "above": 1000,
    "for_s": 10,
    "clear_hysteresis": 50,
}


class Fleet:
    """A store, an engine and the ingest path, fed with wire messages as the broker would."""

    def __init__(self, path: Path, alert_rules: list[AlertRule]) -> None:
        self.path = path
        self.rules = alert_rules
        self.seq = 0
        self.now_ns = time.time_ns()
        self.start()

    def clock(self) -> int:
        """The fleet's clock (the store's too, see `make_fleet`): moves only in `tick()`."""
        return self.now_ns

    def start(self) -> None:
        self.store = Store(self.path)
        self.engine = AlertEngine(self.store, self.rules, clock=self.clock)
        self.ingest = Ingest(self.store, self.engine)

    def restart(self) -> None:
        self.store.close()
        self.start()

    def send(
        self, channel: Channel, model: BaseModel, gateway: str = "gw-1", retain: bool = False
    ) -> list[AlertMessage]:
        message = Message(topic("school", gateway, channel), encode(model), 1, retain, 1)
        return self.within(lambda: self.ingest.handle(message))

    def within(self, action: Callable[[], object]) -> list[AlertMessage]:
        """One ingest transaction, then what it gives to publish."""
        with self.store.transaction():
            action()
        return self.engine.take()

    def co2(
        self,
        *points: tuple[float, float | str],
        device: str = "room-1",
        gateway: str = "gw-1",
        quality: int = 0,
    ) -> list[AlertMessage]:
        """Readings (seconds after T0, value) in one batch."""
        readings: list[Reading] = []
        for at_s, value in points:
            self.seq += 1
            readings.append((self.seq, T0 + int(at_s * S), device, "co2", value, quality))
        batch = TelemetryBatch(
            first_seq=readings[0][0], last_seq=readings[-1][0], sent_ns=T0, readings=readings
        )
        return self.send(Channel.TELEMETRY, batch, gateway)

    def state(
        self, status: Status = Status.ONLINE, retain: bool = False, **fields: Any
    ) -> list[AlertMessage]:
        return self.send(Channel.STATE, GatewayState(status=status, **fields), retain=retain)

    def event(self, kind: EventKind, device: str | None = None) -> list[AlertMessage]:
        event = Event(ts_ns=self.now_ns, kind=kind, device=device, message=kind.value)
        return self.send(Channel.EVENTS, event)

    def tick(self, after_s: float = 0) -> list[AlertMessage]:
        """`after_s` seconds later, a tick."""
        self.now_ns += int(after_s * S)
        return self.within(lambda: self.engine.tick(self.clock()))

    def rows(self) -> list[dict[str, Any]]:
        cursor = self.store.conn.execute("SELECT * FROM alerts ORDER BY id")
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


@pytest.fixture
def make_fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Fleet]]:
    made: list[Fleet] = []

    def make(*documents: dict[str, Any]) -> Fleet:
        fleet = Fleet(tmp_path / "fleet.db", rules(*documents))
        monkeypatch.setattr("fleet.store.time", SimpleNamespace(time_ns=fleet.clock))
        made.append(fleet)
        return fleet

    yield make
    for fleet in made:
        fleet.store.close()


def states(messages: list[AlertMessage]) -> list[tuple[str, str]]:
    return [(m.rule, m.state.value) for m in messages]


# -- thresholds ----------------------------------------------------------------------------------


def test_a_threshold_raises_once_its_readings_span_for_s(make_fleet: Callable[..., Fleet]) -> None:
    fleet = make_fleet(CO2_HIGH)
    assert fleet.co2((0, 1200), (5, 1300), (9.9, 1250)) == []  # 9.9 s of readings' time
    raised = fleet.co2((10, 1400))
    assert states(raised) == [("co2-high", "raised")]
    alert = raised[0]
    assert (alert.site, alert.gateway, alert.device, alert.point) == (
        "school",
        "gw-1",
        "room-1",
        "co2",
    )
    assert alert.value == 1400 and alert.raised_ns == T0 + 10 * S
    assert alert.message == "co2 1400 above 1000 for 10 s"
    assert fleet.co2((20, 1500), (30, 1600)) == []  # still high: no second alert
    [row] = fleet.rows()
    assert (row["id"], row["state"], row["key"]) == (
        alert.id,
        "open",
        "co2-high|school|gw-1|room-1|co2",
    )


def test_a_dip_restarts_the_duration(make_fleet: Callable[..., Fleet]) -> None:
    fleet = make_fleet(CO2_HIGH)
    assert fleet.co2((0, 1200), (8, 990), (9, 1200), (18, 1200)) == []
    assert states(fleet.co2((19, 1200))) == [("co2-high", "raised")]


def test_hysteresis_clears_once_for_a_value_hovering_at_the_limit(
    make_fleet: Callable[..., Fleet],
) -> None:
    fleet = make_fleet(CO2_HIGH)
    [raised] = fleet.co2((0, 1100), (10, 1100))
    hovering = [(11 + i, 999 if i % 2 else 1001) for i in range(20)]
    assert fleet.co2(*hovering) == []  # never below 950: stays open, no storm
    [cleared] = fleet.co2((40, 949))
    assert (cleared.id, cleared.state, cleared.value) == (raised.id, AlertState.CLEARED, 949)
    assert cleared.cleared_ns == T0 + 40 * S and cleared.raised_ns == raised.raised_ns
    assert fleet.co2(*[(41 + i, 999 if i % 2 else 1001) for i in range(9)]) == []  # < 10 s
    assert [r["state"] for r in fleet.rows()] == ["cleared"]


def test_clear_for_s_and_below_limits(make_fleet: Callable[..., Fleet]) -> None:
    fleet = make_fleet(
        {"id": "cold", "type": "threshold", "point": "co2", "below": 400, "clear_for_s": 5}
    )
    assert states(fleet.co2((0, 350))) == [("cold", "raised")]  # for_s 0: at once
    assert fleet.co2((1, 450), (3, 450), (4, 390), (6, 450), (10, 450)) == []
    assert states(fleet.co2((11, 450))) == [("cold", "cleared")]


def test_old_unsynced_and_text_readings_do_not_count(make_fleet: Callable[..., Fleet]) -> None:
    fleet = make_fleet(CO2_HIGH)
    assert fleet.co2((100, 1200)) == []
    assert fleet.co2((50, 900)) == []  # older than what was seen (a backlog): no dip
    assert fleet.co2((115, 1200), quality=int(Quality.CLOCK_UNSYNCED)) == []  # no time to trust
    assert fleet.co2((108, "sensor error")) == []
    assert states(fleet.co2((110, 1200))) == [("co2-high", "raised")]


def test_scope_filters_by_site_gateway_device_and_kind(make_fleet: Callable[..., Fleet]) -> None:
    fleet = make_fleet(
        {**CO2_HIGH, "id": "gw1", "for_s": 0, "gateways": ["gw-1"], "devices": ["room-1"]},
        {**CO2_HIGH, "id": "other-site", "for_s": 0, "sites": ["elsewhere"]},
        {**CO2_HIGH, "id": "sensors", "for_s": 0, "kinds": ["sensor"], "profiles": ["thc"]},
    )
    assert states(fleet.co2((0, 1200))) == [("gw1", "raised")]  # kind unknown yet
    assert fleet.co2((0, 1200), device="room-2") == []
    assert fleet.co2((0, 1200), gateway="gw-2") == []
    device = DeviceState(id="room-1", profile="thc", kind="sensor", up=True)
    fleet.state(devices=[device, device.model_copy(update={"id": "room-3", "kind": "meter"})])
    assert states(fleet.co2((1, 1200))) == [("sensors", "raised")]  # now known to be a sensor
    assert fleet.co2((1, 1200), device="room-3") == []
    assert {r["rule"] for r in fleet.rows()} == {"gw1", "sensors"}


def test_no_rule_for_a_point_means_no_sql(make_fleet: Callable[..., Fleet]) -> None:
    fleet = make_fleet(CO2_HIGH)
    readings: list[Reading] = [
        (i, T0 + i, "room-1", "temperature", 21.5, 0) for i in range(1, 10_001)
    ]
    statements: list[str] = []
    fleet.store.conn.set_trace_callback(statements.append)
    fleet.engine.on_readings("school", "gw-1", readings)
    fleet.store.conn.set_trace_callback(None)
    assert statements == []


# -- restart, rollback, acks ---------------------------------------------------------------------


def test_an_open_alert_survives_a_restart_and_is_not_raised_again(
    make_fleet: Callable[..., Fleet],
) -> None:
    fleet = make_fleet(CO2_HIGH, {"id": "gw-down", "type": "gateway_offline", "for_s": 0})
    [raised] = fleet.co2((0, 1200), (10, 1200))
    assert states(fleet.state(Status.OFFLINE, reason="connection lost")) == [("gw-down", "raised")]
    fleet.restart()
    assert fleet.engine.open_alerts() == {
        "co2-high|school|gw-1|room-1|co2": raised.id,
        "gw-down|school|gw-1||": raised.id + 1,
    }
    assert fleet.co2((20, 1300), (30, 1300)) == [] and fleet.tick(60) == []
    assert fleet.state(Status.OFFLINE, reason="connection lost") == []  # retained, again
    [cleared] = fleet.co2((40, 900))
    assert (cleared.id, cleared.state) == (raised.id, AlertState.CLEARED)
    assert len(fleet.rows()) == 2


def test_a_rolled_back_alert_is_never_published(make_fleet: Callable[..., Fleet]) -> None:
    fleet = make_fleet({**CO2_HIGH, "for_s": 0})

    def raise_then_fail() -> None:
        fleet.engine.on_readings("school", "gw-1", [(1, T0, "room-1", "co2", 1500, 0)])
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"), fleet.store.transaction():
        raise_then_fail()
    assert fleet.engine.take() == [] and fleet.rows() == []
    assert states(fleet.co2((1, 1500))) == [("co2-high", "raised")]  # the engine forgot it


def test_config_rejected_until_a_config_is_applied(make_fleet: Callable[..., Fleet]) -> None:
    fleet = make_fleet({"id": "cfg", "type": "config_rejected", "severity": "critical"})

    def ack(
        status: AckStatus, version: int, kind: Literal["config", "policy"] = "config"
    ) -> list[AlertMessage]:
        answer = Ack(kind=kind, version=version, status=status, reason="bad", ts_ns=T0)
        return fleet.within(lambda: fleet.engine.on_ack("school", "gw-1", answer))

    [raised] = ack(AckStatus.REJECTED, 7)
    assert (raised.state, raised.value, raised.message) == (
        AlertState.RAISED,
        7,
        "config version 7 rejected: bad",
    )
    assert ack(AckStatus.REJECTED, 8) == []
    assert ack(AckStatus.APPLIED, 3, kind="policy") == []
    [cleared] = ack(AckStatus.APPLIED, 9)
    assert (cleared.id, cleared.state, cleared.message) == (
        raised.id,
        AlertState.CLEARED,
        "config version 9 applied",
    )
    # A rejected network policy is its own alert, cleared by an applied policy only.
    [policy] = ack(AckStatus.REJECTED, 4, kind="policy")
    assert (policy.point, policy.message) == ("policy", "policy version 4 rejected: bad")
    assert ack(AckStatus.APPLIED, 10) == []
    [cleared] = ack(AckStatus.APPLIED, 5, kind="policy")
    assert cleared.id == policy.id


def test_an_alert_of_a_removed_rule_is_cleared(make_fleet: Callable[..., Fleet]) -> None:
    fleet = make_fleet({**CO2_HIGH, "for_s": 0})
    [raised] = fleet.co2((0, 2000))
    fleet.rules = []
    fleet.restart()
    [cleared] = fleet.tick(0)
    assert (cleared.id, cleared.message) == (raised.id, "rule co2-high is no longer configured")


# -- wall-time rules -----------------------------------------------------------------------------


def test_gateway_offline_for_longer_than_for_s(make_fleet: Callable[..., Fleet]) -> None:
    fleet = make_fleet({"id": "gw-down", "type": "gateway_offline", "for_s": 60})
    fleet.state(Status.ONLINE)
    assert fleet.state(Status.OFFLINE, reason="connection lost") == []
    assert fleet.tick(30) == []
    [raised] = fleet.tick(31)
    assert (raised.gateway, raised.device) == ("gw-1", None)
    assert raised.message == "gateway offline for 61 s (connection lost)"
    assert fleet.tick(120) == []
    [cleared] = fleet.state(Status.ONLINE)  # cleared by the state itself, not a tick later
    assert (cleared.id, cleared.message) == (raised.id, "gateway back online")


def test_a_retained_last_will_counts_from_when_the_gateway_was_last_seen(
    make_fleet: Callable[..., Fleet],
) -> None:
    fleet = make_fleet({"id": "gw-down", "type": "gateway_offline", "for_s": 60})
    [raised] = fleet.state(Status.OFFLINE, retain=True, reason="connection lost")  # never seen
    assert raised.message == "gateway offline (connection lost)"
    fleet.state(Status.ONLINE)
    fleet.tick(10)
    assert fleet.state(Status.OFFLINE, retain=True, reason="connection lost") == []
    assert states(fleet.tick(50)) == [("gw-down", "raised")]  # 60 s after it was last seen


def test_device_offline_from_events_and_states(make_fleet: Callable[..., Fleet]) -> None:
    fleet = make_fleet(
        {"id": "dev-down", "type": "device_offline", "for_s": 60, "devices": ["room-1", "room-2"]}
    )
    room = DeviceState(id="room-1", profile="thc", kind="sensor", up=True)
    fleet.state(devices=[room, room.model_copy(update={"id": "room-2"})])
    fleet.event(EventKind.DEVICE_DOWN, "room-1")
    fleet.state(
        devices=[
            room.model_copy(update={"up": False}),
            room.model_copy(update={"id": "room-2", "up": False}),
        ]
    )
    fleet.state(devices=[room.model_copy(update={"up": False})])  # still down: same start
    assert fleet.tick(30) == []
    assert sorted(m.device or "" for m in fleet.tick(31)) == ["room-1", "room-2"]
    [cleared] = fleet.event(EventKind.DEVICE_UP, "room-1")
    assert (cleared.device, cleared.message) == ("room-1", "device back up")
    unknown = room.model_copy(update={"id": "room-2", "up": None})  # e.g. its agent restarted
    assert fleet.state(devices=[unknown]) == [] and fleet.tick(1) == []
    assert states(fleet.state(devices=[room.model_copy(update={"id": "room-2"})])) == [
        ("dev-down", "cleared")
    ]


def test_buffer_evicting_raises_on_growth_and_clears_after_quiet(
    make_fleet: Callable[..., Fleet],
) -> None:
    fleet = make_fleet({"id": "evicting", "type": "buffer_evicting", "for_s": 60})
    assert fleet.state(buffer=BufferState(evicted=0)) == []
    [raised] = fleet.state(buffer=BufferState(evicted=10))
    assert (raised.value, raised.message) == (10, "buffer evicting readings (10 evicted so far)")
    assert fleet.state(buffer=BufferState(evicted=10)) == [] and fleet.tick(30) == []
    [cleared] = fleet.tick(31)
    assert (cleared.id, cleared.message) == (raised.id, "no evictions for 60 s")
    assert fleet.state(buffer=BufferState(evicted=10)) == []  # the same count: nothing new
    assert states(fleet.event(EventKind.BUFFER_EVICTION)) == [("evicting", "raised")]


# -- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "problem"),
    [
        ({"id": "x", "type": "threshold", "point": "co2"}, "needs 'above', 'below' or both"),
        (
            {"id": "x", "type": "threshold", "point": "co2", "above": 10, "below": 10},
            "'below' must be below 'above'",
        ),
        (
            {
                "id": "x",
                "type": "threshold",
                "point": "co2",
                "above": 10,
                "below": 9,
                "clear_hysteresis": 1,
            },
            "could never clear",
        ),
        ({"id": "x", "type": "gateway_offline", "devices": ["a"]}, "Extra inputs"),
        ({"id": "x", "type": "device_offline", "kinds": ["sensr"]}, "'sensor'"),
        ({"id": "x", "type": "offline"}, "does not match any of the expected tags"),
        ({"id": "X Y", "type": "config_rejected"}, "should match pattern"),
    ],
)
def test_bad_rules_are_refused(rule: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        rules(rule)


def test_config_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(
        "name: f\nalerts:\n  - {id: a, type: config_rejected}\n"
        "  - id: a\n    type: config_rejected\n"
    )
    with pytest.raises(
        DocumentError, match="line 2, alerts: Value error, rule id 'a' is used twice"
    ):
        load_config(path)
    path.write_text("alerts:\n  - id: a\n    type: threshold\n    point: co2\n    above: lots\n")
    with pytest.raises(DocumentError, match=r"line 5, alerts\.0\.threshold\.above"):
        load_config(path)


def test_the_cli_lists_alerts_open_during_the_window(make_fleet: Callable[..., Fleet]) -> None:
    fleet = make_fleet({**CO2_HIGH, "for_s": 0, "gateways": ["gw-1"]})
    day = 86_400
    ago = (time.time_ns() - T0) // S
    fleet.co2((ago - 10 * day, 1500))  # raised 10 days ago, still open
    fleet.co2((ago - 3 * day, 1500), (ago - 2 * day, 900), device="room-2")  # cleared 2 days ago
    fleet.store.close()
    db = str(fleet.path)

    def listed(*args: str) -> list[tuple[str, str]]:
        options = ("--config", "/nonexistent.yaml", "--db", db)
        result = run_cli("campus-fleet", *options, "alerts", *args, "--json")
        assert result.returncode == 0, result.stderr
        return [(row["device"], row["state"]) for row in json.loads(result.stdout)]

    assert listed("--since", "1d") == [("room-1", "open")]
    assert listed("--since", "7d") == [("room-2", "cleared"), ("room-1", "open")]
    assert listed("--since", "7d", "--open") == [("room-1", "open")]
    assert listed("--site", "school") == [("room-2", "cleared"), ("room-1", "open")]
    unknown = run_cli("campus-fleet", "--db", db, "alerts", "--site", "elsewhere")
    assert (unknown.returncode, unknown.stderr) == (
        3,
        "campus-fleet: no site 'elsewhere' in the fleet database\n",
    )
    assert run_cli("campus-fleet", "--db", db, "alerts", "--since", "soon").returncode == 2
    no_config = run_cli("campus-fleet", "--config", "/nonexistent.yaml", "alerts", "rules")
    assert no_config.returncode == 2 and "cannot read" in no_config.stderr
    helped = run_cli("campus-fleet", "alerts", "--help")
    assert "campus-fleet alerts --open" in helped.stdout and "rules" in helped.stdout


# -- end to end: Mosquitto, `campus-fleet serve`, a gateway played by paho, mosquitto_sub ---------


class Subscriber:
    """mosquitto_sub on campus/SITE/alerts: an independent client that prints topic TAB payload."""

    def __init__(self, broker: MosquittoBroker, site: str, out: Path) -> None:
        self.out = out
        with out.open("wb") as sink:
            # stdbuf: a line per message in the file as it arrives, not a block at exit
            command = [
                "stdbuf",
                "-oL",
                "mosquitto_sub",
                "-h",
                "::1",
                "-p",
                str(broker.port),
                "-q",
                "1",
                "-d",
            ]
            command += ["-t", f"campus/{site}/alerts", "-F", "%t\t%p"]
            self.process = subprocess.Popen(
                command, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_for(lambda: "SUBACK" in out.read_text(), 10, what="mosquitto_sub subscribed")

    def messages(self) -> list[AlertMessage]:
        lines = self.out.read_text().splitlines()
        payloads = [line.split("\t", 1)[1] for line in lines if line.startswith("campus/")]
        return [AlertMessage.model_validate_json(payload) for payload in payloads]

    def close(self) -> None:
        stop_group(self.process, timeout=5)


class Gateway:
    """A test publisher playing gateway gw-1 (MQTT v5, QoS 1, waits for each PUBACK)."""

    def __init__(self, broker: MosquittoBroker, site: str) -> None:
        self.site = site
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"{site}-gw-1",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.client.connect("::1", broker.port)
        self.client.loop_start()
        self.seq = 0

    def publish(self, channel: Channel, model: BaseModel, retain: bool = False) -> None:
        info = self.client.publish(topic(self.site, "gw-1", channel), encode(model), 1, retain)
        info.wait_for_publish(10)

    def co2(self, *points: tuple[float, float], base_ns: int) -> None:
        readings: list[Reading] = []
        for at_s, value in points:
            self.seq += 1
            readings.append((self.seq, base_ns + int(at_s * S), "room-1", "co2", value, 0))
        self.publish(
            Channel.TELEMETRY,
            TelemetryBatch(
                first_seq=readings[0][0],
                last_seq=self.seq,
                sent_ns=time.time_ns(),
                readings=readings,
            ),
        )

    def state(self, status: Status, reason: str | None = None) -> None:
        device = DeviceState(id="room-1", profile="campussim-thc100", kind="sensor", up=True)
        state = GatewayState(status=status, reason=reason, ts_ns=time.time_ns(), devices=[device])
        self.publish(Channel.STATE, state, retain=True)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def alert_rows(config: Path, *args: str) -> list[dict[str, Any]]:
    return fleet_json(config, "alerts", "--since", "1d", *args)  # type: ignore[no-any-return]


def readings_stored(config: Path) -> int:
    result = run_cli("campus-fleet", "--config", str(config), "readings", "room-1", "--json")
    return len(json.loads(result.stdout)) if result.returncode == 0 else 0


@pytest.mark.slow
def test_alerts_end_to_end(processes: Processes, broker: MosquittoBroker, tmp_path: Path) -> None:
    site = f"alerts-{os.getpid()}-{time.monotonic_ns() % 100_000}"
    config = write_yaml(
        tmp_path / "fleet.yaml",
        {
            "name": site,
            "mqtt": {"host": "::1", "port": broker.port},
            "database": str(tmp_path / "fleet.db"),
            "sites": [site],
            "alerts": [
                {**CO2_HIGH, "for_s": 2, "severity": "critical"},
                {"id": "gw-offline", "type": "gateway_offline", "for_s": 1},
            ],
        },
    )
    subscriber = Subscriber(broker, site, tmp_path / "alerts.out")
    gateway = Gateway(broker, site)

    def serve(name: str) -> None:
        processes.start(name, "campus-fleet", "--config", str(config), "serve")
        wait_for(lambda: "subscribed to" in processes.log(name), 15, what=f"{name} subscribed")

    try:
        serve("fleet")
        gateway.state(Status.ONLINE)
        base = time.time_ns() - 600 * S  # sent all at once: only the readings' times span 2 s
        gateway.co2((0, 1200), (0.5, 1250), (1.0, 1300), (1.5, 1300), base_ns=base)
        wait_for(lambda: readings_stored(config) == 4, 15, what="4 readings")
        assert alert_rows(config) == []
        gateway.co2((2.0, 1350), (2.5, 1400), base_ns=base)
        [raised] = wait_for(lambda: alert_rows(config, "--open"), 10, what="co2 alert")
        assert raised["rule"] == "co2-high" and raised["severity"] == "critical"
        assert (raised["device"], raised["point"], raised["value"]) == ("room-1", "co2", 1350)
        assert raised["raised_ns"] == base + 2 * S

        assert processes.stop("fleet") == 0  # a restart does not raise the open alert again
        serve("fleet-2")
        gateway.co2((3.0, 1500), (3.5, 980), base_ns=base)  # 980: inside the hysteresis band
        wait_for(lambda: readings_stored(config) == 8, 15, what="8 readings")
        assert [(r["id"], r["state"]) for r in alert_rows(config)] == [(raised["id"], "open")]
        gateway.co2((4.0, 940), base_ns=base)
        wait_for(lambda: alert_rows(config, "--open") == [], 10, what="co2 alert cleared")

        gateway.state(Status.OFFLINE, reason="connection lost")  # what the Last Will says
        [offline] = wait_for(lambda: alert_rows(config, "--open"), 10, what="gateway alert")
        assert (offline["rule"], offline["gateway"]) == ("gw-offline", "gw-1")
        assert offline["duration_s"] < 5
        gateway.state(Status.ONLINE)
        wait_for(lambda: alert_rows(config, "--open") == [], 10, what="gateway alert cleared")

        rows = alert_rows(config)
        assert [(r["rule"], r["state"]) for r in rows] == [
            ("gw-offline", "cleared"),
            ("co2-high", "cleared"),
        ]
        expected = [
            (raised["id"], "co2-high", "raised"),
            (raised["id"], "co2-high", "cleared"),
            (offline["id"], "gw-offline", "raised"),
            (offline["id"], "gw-offline", "cleared"),
        ]
        received = wait_for(
            lambda: len(subscriber.messages()) >= 4 and subscriber.messages(), 10, what="4 messages"
        )
        assert [(m.id, m.rule, m.state.value) for m in received] == expected
        assert received[0].raised_ns == base + 2 * S and received[1].cleared_ns == base + 4 * S
        time.sleep(1.5)  # a few more ticks: nothing is published twice
        assert len(subscriber.messages()) == 4

        assert (
            run_cli("campus-fleet", "--config", str(config), "alerts", "--site", "nope").returncode
            == 3
        )
        described = fleet_json(config, "alerts", "rules")
        assert [(r["id"], r["condition"]) for r in described] == [
            ("co2-high", "co2 > 1000 for 2 s; clears at co2 ≤ 950"),
            ("gw-offline", "gateway offline for 1 s"),
        ]
        table = run_cli("campus-fleet", "--config", str(config), "alerts")
        assert table.returncode == 0 and "critical" in table.stdout
    finally:
        gateway.close()
        subscriber.close()


def test_alerts_table_shows_alerts_of_rules_no_longer_configured(tmp_path: Path) -> None:
    """An alert whose rule was removed (or read with --db and no config) has no known
    severity: listed plainly, and text with brackets is not taken for markup."""
    from fleet.store import Store
    from tests.conftest import run_cli

    db = tmp_path / "fleet.db"
    store = Store(db)
    store.conn.execute(
        "INSERT INTO alerts (rule, key, site, state, message, raised_ns) "
        "VALUES ('old-rule', 'k', 'school-1', 'open', 'co2 [ppm] too high', 1)"
    )
    store.close()
    shown = run_cli(
        "campus-fleet", "--config", str(tmp_path / "none.yaml"), "--db", str(db), "alerts"
    )
    assert shown.returncode == 0, shown.stderr
    assert "old-rule" in shown.stdout
    assert "[ppm]" in shown.stdout
