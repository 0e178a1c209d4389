"""Alerts: the engine on a real store, and end to end through Mosquitto and `campus-fleet serve`."""

from __future__ import annotations

import json
import os
import sqlite3
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
from simulator.broker import MosquittoBroker, free_port
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

    def alarm(
        self,
        state: Literal["raised", "cleared"],
        at_s: float,
        value: float,
        point: str = "lamp_hours",
        device: str = "proj-1",
        gateway: str = "gw-1",
    ) -> list[AlertMessage]:
        """An agent's alarm event, as agent/coordinator.py's AlarmWatch sends it (high 3500 h),
        stamped `at_s` seconds after T0 on the gateway's clock."""
        if state == "raised":
            message = f"{point} {value:g} h above 3500"
        else:
            message = f"{point} back to {value:g} h"
        data = {"point": point, "value": value, "state": state, "level": "high", "high": 3500}
        event = Event(
            ts_ns=T0 + int(at_s * S),
            kind=EventKind.ALARM,
            device=device,
            message=message,
            data={**data, "low": None},
        )
        return self.send(Channel.EVENTS, event, gateway)

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


# -- agents' alarms -------------------------------------------------------------------------------

ALARMS = {"id": "profile-alarms", "type": "device_alarm"}


def test_an_agent_alarm_opens_one_alert_per_device_and_point(
    make_fleet: Callable[..., Fleet],
) -> None:
    fleet = make_fleet({**ALARMS, "severity": "critical"})
    [raised] = fleet.alarm("raised", 10, 3620)
    assert (raised.rule, raised.severity, raised.state) == (
        "profile-alarms",
        "critical",
        AlertState.RAISED,
    )
    assert (raised.site, raised.gateway, raised.device, raised.point, raised.value) == (
        "school",
        "gw-1",
        "proj-1",
        "lamp_hours",
        3620,
    )
    assert raised.message == "lamp_hours 3620 h above 3500"
    assert raised.raised_ns == T0 + 10 * S  # when the agent saw it, not when it arrived
    assert fleet.alarm("raised", 20, 3621) == []  # the agent raises again after its restart
    [other] = fleet.alarm("raised", 21, 2100, point="filter_hours")
    assert other.id != raised.id and other.point == "filter_hours"
    assert fleet.alarm("raised", 22, 3700, device="proj-2")[0].device == "proj-2"
    assert fleet.event(EventKind.DEVICE_DOWN, "proj-1") == [] and fleet.tick(3600) == []
    assert fleet.event(EventKind.DEVICE_UP, "proj-1") == []
    [cleared] = fleet.alarm("cleared", 30, 3400)
    assert (cleared.id, cleared.state, cleared.value, cleared.message) == (
        raised.id,
        AlertState.CLEARED,
        3400,
        "lamp_hours back to 3400 h",
    )
    assert cleared.cleared_ns == T0 + 30 * S and cleared.raised_ns == raised.raised_ns
    assert fleet.alarm("cleared", 31, 3300) == []  # nothing open: nothing to clear
    assert [(r["point"], r["device"], r["state"]) for r in fleet.rows()] == [
        ("lamp_hours", "proj-1", "cleared"),
        ("filter_hours", "proj-1", "open"),
        ("lamp_hours", "proj-2", "open"),
    ]
    [again] = fleet.alarm("raised", 40, 3650)  # a new crossing is a new alert
    assert again.id not in (raised.id, other.id)


def test_an_alarm_the_gateway_no_longer_has_is_cleared_by_its_state(
    make_fleet: Callable[..., Fleet],
) -> None:
    """The agent restarted (or a config moved the threshold) while the lamp went back under
    it: no `cleared` event will come, its state no longer lists the point."""

    def device(alarms: list[str] | None) -> DeviceState:
        return DeviceState(id="proj-1", profile="p", kind="display", up=True, alarms=alarms)

    fleet = make_fleet(ALARMS)
    [raised] = fleet.alarm("raised", 10, 3620)
    before = T0 + 5 * S  # a state taken before the raise, arriving late, clears nothing
    assert fleet.state(ts_ns=before, devices=[device([])]) == []
    assert fleet.state(ts_ns=T0 + 20 * S, devices=[device(["lamp_hours"])]) == []
    assert fleet.state(ts_ns=T0 + 21 * S, devices=[device(None)]) == []  # an older agent
    [cleared] = fleet.state(ts_ns=T0 + 30 * S, devices=[device([])])
    assert (cleared.id, cleared.state, cleared.cleared_ns) == (
        raised.id,
        AlertState.CLEARED,
        T0 + 30 * S,
    )
    assert cleared.message == "lamp_hours no longer in alarm on gateway gw-1"


def test_alarm_events_delivered_twice_change_nothing(make_fleet: Callable[..., Fleet]) -> None:
    """QoS 1: the agent sends again what the broker may already have passed on."""
    fleet = make_fleet(ALARMS)
    fleet.alarm("raised", 1, 3600)
    fleet.alarm("cleared", 2, 3400)
    [latest] = fleet.alarm("raised", 3, 3600)
    for state, at_s, value in (("raised", 1, 3600), ("cleared", 2, 3400), ("raised", 3, 3600)):
        assert fleet.alarm(state, at_s, value) == [], (state, at_s)  # type: ignore[arg-type]
    assert fleet.engine.open_alerts() == {"profile-alarms|school|gw-1|proj-1|lamp_hours": latest.id}
    assert len(fleet.rows()) == 2
    # A raise the fleet ignored (the alert was open) comes again after the clear, then the
    # clear: at worst a short alert, never one left open.
    fleet.alarm("raised", 5, 3610)
    fleet.alarm("cleared", 6, 3300)
    replayed = fleet.alarm("raised", 5, 3610) + fleet.alarm("cleared", 6, 3300)
    assert states(replayed) == [("profile-alarms", "raised"), ("profile-alarms", "cleared")]
    assert fleet.engine.open_alerts() == {}


def test_alarms_stamped_by_a_clock_set_back_still_count(make_fleet: Callable[..., Fleet]) -> None:
    """A gateway without a real-time clock boots with the time it last saved: its first events
    may be stamped before the last ones it sent. Only the same timestamp means the same event."""
    fleet = make_fleet(ALARMS)
    fleet.alarm("raised", 3600, 3600)
    fleet.alarm("cleared", 3700, 3400)
    [raised] = fleet.alarm("raised", 100, 3620)  # after a reboot, before NTP
    [cleared] = fleet.alarm("cleared", 50, 3300)  # the clock stepped back once more
    assert cleared.id == raised.id and cleared.cleared_ns == raised.raised_ns
    assert fleet.engine.open_alerts() == {}


def test_alarm_rules_scope_and_points(make_fleet: Callable[..., Fleet]) -> None:
    fleet = make_fleet(
        {**ALARMS, "id": "lamps", "points": ["lamp_hours", "filter_hours"], "kinds": ["display"]},
        {**ALARMS, "id": "gw2-co2", "points": ["co2"], "gateways": ["gw-2"]},
        {**ALARMS, "id": "one-camera", "devices": ["cam-1"], "profiles": ["generic-onvif-camera"]},
    )
    projector = DeviceState(id="proj-1", profile="generic-pjlink-projector", kind="display")
    camera = DeviceState(id="cam-1", profile="generic-onvif-camera", kind="camera")
    fleet.state(devices=[projector, camera, camera.model_copy(update={"id": "cam-2"})])
    assert states(fleet.alarm("raised", 1, 3600)) == [("lamps", "raised")]
    assert states(fleet.alarm("raised", 1, 2100, point="filter_hours")) == [("lamps", "raised")]
    assert fleet.alarm("raised", 1, 2100, point="fan_rpm") == []  # not in any rule's points
    assert fleet.alarm("raised", 1, 1800, point="co2", device="room-1") == []  # gw-1
    assert states(fleet.alarm("raised", 1, 1800, point="co2", device="room-1", gateway="gw-2")) == [
        ("gw2-co2", "raised")
    ]
    assert states(fleet.alarm("raised", 1, 95, point="clock_drift_s", device="cam-1")) == [
        ("one-camera", "raised")
    ]
    assert fleet.alarm("raised", 1, 95, point="clock_drift_s", device="cam-2") == []
    assert fleet.alarm("raised", 1, 3600, device="unknown-proj") == []  # kind not reported
    assert sorted((r["rule"], r["point"]) for r in fleet.rows()) == [
        ("gw2-co2", "co2"),
        ("lamps", "filter_hours"),
        ("lamps", "lamp_hours"),
        ("one-camera", "clock_drift_s"),
    ]


def test_an_open_alarm_alert_survives_a_restart(make_fleet: Callable[..., Fleet]) -> None:
    fleet = make_fleet(ALARMS)
    [raised] = fleet.alarm("raised", 1, 3600)
    fleet.restart()
    assert fleet.engine.open_alerts() == {"profile-alarms|school|gw-1|proj-1|lamp_hours": raised.id}
    assert fleet.tick(1) == []
    assert fleet.alarm("raised", 1, 3600) == []  # sent again: its PUBACK was lost
    assert fleet.alarm("raised", 9, 3700) == []  # the agent restarted too
    [cleared] = fleet.alarm("cleared", 10, 3300)
    assert cleared.id == raised.id
    fleet.restart()
    assert fleet.alarm("raised", 1, 3600) == [] and fleet.alarm("cleared", 10, 3300) == []
    assert [r["state"] for r in fleet.rows()] == ["cleared"]


def test_an_alarm_of_a_device_its_gateway_no_longer_polls_is_cleared(
    make_fleet: Callable[..., Fleet],
) -> None:
    """Its alarm watch went with it: no `cleared` event will ever come."""
    fleet = make_fleet(ALARMS)
    projector = DeviceState(id="proj-1", profile="generic-pjlink-projector", kind="display")
    other = projector.model_copy(update={"id": "proj-2"})
    fleet.state(devices=[projector, other])
    [raised] = fleet.alarm("raised", 1, 3600)
    fleet.alarm("raised", 1, 3600, device="proj-2", gateway="gw-2")
    assert fleet.state(Status.OFFLINE) == []  # a Last Will lists no devices: nothing known
    assert fleet.state(devices=[projector.model_copy(update={"up": False})]) == []
    [cleared] = fleet.state(devices=[other])
    assert (cleared.id, cleared.device, cleared.message) == (
        raised.id,
        "proj-1",
        "device proj-1 is no longer on gateway gw-1",
    )
    assert cleared.cleared_ns == fleet.now_ns
    assert [r["state"] for r in fleet.rows()] == ["cleared", "open"]  # gw-2's proj-2 stays


def test_a_bad_alarm_event_is_rejected_naming_the_device(make_fleet: Callable[..., Fleet]) -> None:
    fleet = make_fleet(ALARMS)

    def event(device: str | None, **data: Any) -> list[AlertMessage]:
        fleet.seq += 1
        alarm = Event(
            ts_ns=T0 + fleet.seq, kind=EventKind.ALARM, device=device, message="alarm", data=data
        )
        return fleet.send(Channel.EVENTS, alarm)

    assert event("proj-1", point="lamp_hours", value="lots", state="raised") == []
    assert event("proj-1", point="lamp_hours", value=True, state="raised") == []
    assert event("proj-1", point="lamp_hours", value=3600, state="on") == []
    assert event(None, point="lamp_hours", value=3600, state="raised") == []
    reasons = [row[0] for row in fleet.store.conn.execute("SELECT reason FROM rejected")]
    where = "invalid message on campus/school/gw/gw-1/events: "
    assert reasons == [
        where + "data.value: Input should be a valid number (alarm event of device proj-1)",
        where + "data.value: Input should be a valid number (alarm event of device proj-1)",
        where + "data.state: Input should be 'raised' or 'cleared' (alarm event of device proj-1)",
        where + "device: an alarm event must name its device",
    ]
    assert fleet.rows() == []
    stored = fleet.store.conn.execute("SELECT count(*) FROM events WHERE kind = 'alarm'")
    assert stored.fetchone()[0] == 4  # still in `campus-fleet events`
    assert states(event("proj-1", point="lamp_hours", value=3600, state="raised")) == [
        ("profile-alarms", "raised")
    ]


def test_alarm_events_without_alarm_rules_are_only_stored(
    make_fleet: Callable[..., Fleet],
) -> None:
    fleet = make_fleet(CO2_HIGH)
    event = Event(ts_ns=T0, kind=EventKind.ALARM, device="proj-1", message="?", data={})
    assert fleet.send(Channel.EVENTS, event) == [] and fleet.rows() == []
    assert fleet.store.conn.execute("SELECT count(*) FROM rejected").fetchone()[0] == 0


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
        ({"id": "x", "type": "device_alarm", "points": ["Lamp Hours"]}, "should match pattern"),
        ({"id": "x", "type": "device_alarm", "for_s": 10}, "Extra inputs"),
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


def query(db: Path, sql: str) -> list[dict[str, Any]]:
    """Rows of the running service's database, read-only (faster than a CLI run per poll)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        cursor = conn.execute(sql)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
    except sqlite3.OperationalError:
        return []  # not created yet
    finally:
        conn.close()


def test_a_real_agents_co2_alarm_opens_and_clears_one_alert(
    processes: Processes, broker: MosquittoBroker, tmp_path: Path
) -> None:
    """campus-sim serves a CO2 sensor stuck at 1800 ppm; campus-agent, whose device setting
    raises an alarm above 1000 ppm, polls it; `campus-fleet serve` turns the alarm into an
    alert. The agent restarts (it raises again: still one alert), the sensor goes away (down:
    still open), and comes back at 600 ppm: the agent clears its alarm, the fleet its alert."""
    port = free_port()
    site = f"alarm-{port}"
    db = tmp_path / "fleet.db"

    def sensor(co2: int) -> Path:
        device = {"id": "room-1-env", "profile": "campussim-thc100", "port": port}
        scenario = {"devices": [{**device, "values": {"co2": co2}}]}
        return write_yaml(tmp_path / f"scenario-{co2}.yaml", scenario)

    def alerts() -> list[dict[str, Any]]:
        return query(db, "SELECT id, state FROM alerts ORDER BY id")

    def events(kind: str, state: str | None = None) -> list[dict[str, Any]]:
        rows = query(db, f"SELECT * FROM events WHERE kind = '{kind}' ORDER BY id")
        return [e for e in rows if state is None or json.loads(e["data"])["state"] == state]

    config = write_yaml(
        tmp_path / "fleet.yaml",
        {
            "name": site,
            "mqtt": {"host": "::1", "port": broker.port},
            "database": str(db),
            "sites": [site],
            "alerts": [{"id": "air", "type": "device_alarm", "points": ["co2"]}],
        },
    )
    agent = write_yaml(
        tmp_path / "agent.yaml",
        {
            "site": site,
            "gateway": "gw-1",
            "mqtt": {"host": "127.0.0.1", "port": broker.port, "keepalive_s": 2},
            "buffer": {"path": str(tmp_path / "buffer.db"), "commit_interval_s": 0.1},
            "clock": {"sync_check": "none"},
            "devices": [
                {
                    "id": "room-1-env",
                    "profile": "campussim-thc100",
                    "interval_s": 0.2,
                    "connection": {"type": "modbus-tcp", "host": "127.0.0.1", "port": port},
                    "alarms": {"co2": {"high": 1000, "hysteresis": 50}},
                }
            ],
        },
    )
    subscriber = Subscriber(broker, site, tmp_path / "alerts.out")
    try:
        processes.start("sim", "campus-sim", "run", str(sensor(1800)))
        processes.start("fleet", "campus-fleet", "--config", str(config), "serve")
        wait_for(lambda: "subscribed to" in processes.log("fleet"), 15, what="fleet subscribed")
        processes.start("agent", "campus-agent", "run", "--config", str(agent))
        [first] = wait_for(alerts, 20, what="the co2 alert")
        alert_id = first["id"]

        assert processes.stop("agent") == 0
        processes.start("agent-2", "campus-agent", "run", "--config", str(agent))
        wait_for(lambda: len(events("alarm", "raised")) == 2, 20, what="raised again")
        assert processes.stop("sim") == 0
        wait_for(lambda: events("device_down"), 10, interval=0.05, what="device_down")
        assert alerts() == [{"id": alert_id, "state": "open"}]  # neither raised twice nor cleared

        processes.start("sim-2", "campus-sim", "run", str(sensor(600)))
        wait_for(lambda: events("alarm", "cleared"), 20, interval=0.05, what="cleared alarm")
        [raised, cleared] = wait_for(
            lambda: len(subscriber.messages()) >= 2 and subscriber.messages(), 10, what="2 messages"
        )
        assert [(m.id, m.rule, m.state.value, m.value) for m in (raised, cleared)] == [
            (alert_id, "air", "raised", 1800),
            (alert_id, "air", "cleared", 600),
        ]
        assert (raised.device, raised.point, raised.message) == (
            "room-1-env",
            "co2",
            "co2 1800 ppm above 1000",
        )
        assert cleared.message == "co2 back to 600 ppm"
        first_raise = events("alarm", "raised")[0]
        assert raised.raised_ns == first_raise["ts_ns"] == cleared.raised_ns
        assert cleared.cleared_ns == events("alarm", "cleared")[0]["ts_ns"]
        [row] = alert_rows(config)
        assert (row["id"], row["rule"], row["state"], row["severity"]) == (
            alert_id,
            "air",
            "cleared",
            "warning",
        )
        assert [(r["id"], r["condition"]) for r in fleet_json(config, "alerts", "rules")] == [
            (
                "air",
                "the agent's alarm on co2; clears when the agent clears it or no longer lists it",
            )
        ]
    finally:
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
