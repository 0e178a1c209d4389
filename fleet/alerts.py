"""Alerts: rules from the fleet config, evaluated as gateways report, kept in the `alerts` table.

Rules: an alert is identified by its key (rule|site|gateway|device|point), is open at most once per
key, and is raised once and cleared once. Thresholds are timed on the readings' own timestamps;
agents' alarms follow the agent's raised and cleared events (one delivered twice is known by its
timestamp); offline and eviction rules on the fleet's clock, from columns the store keeps
(`*_since_ns`), so they survive a restart. Hooks run inside the ingest transaction and only queue
messages; `take()` after the commit hands over what the commit kept: an alert lost to a rollback
is never published.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import partial
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from drivers.profiles import PROFILE_ID, DeviceKind
from fleet.store import Store
from wire.control import Ack, AckStatus, AlertMessage, AlertState
from wire.errors import InvalidMessage, Problem
from wire.models import Event, EventKind, GatewayState, Id, PointName, Quality, Reading, encode
from wire.mqtt import MqttError, MqttLink
from wire.topics import Channel, alerts_topic, topic

log = logging.getLogger(__name__)

TICK_S = 1.0
NS = 1_000_000_000

RuleId = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")]
Seconds = Annotated[float, Field(ge=0, le=366 * 86_400)]
ProfileId = Annotated[str, Field(pattern=PROFILE_ID.pattern)]


# -- rules (the `alerts:` list of fleet.yaml) ----------------------------------------------------


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


class _Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: RuleId = Field(description="the rule's name, unique in the file")
    severity: Severity = Severity.WARNING
    sites: list[Id] = Field(default_factory=list, description="only these sites (default: all)")
    gateways: list[Id] = Field(default_factory=list, description="only these gateways")

    def in_scope(
        self,
        site: str,
        gateway: str,
        device: str | None = None,
        profile: str | None = None,
        kind: str | None = None,
    ) -> bool:
        """Whether the rule applies there (device, profile and kind: for device rules)."""
        return (not self.sites or site in self.sites) and (
            not self.gateways or gateway in self.gateways
        )

    def describe(self) -> str:
        raise NotImplementedError


class _DeviceRule(_Rule):
    devices: list[Id] = Field(default_factory=list, description="only these devices")
    profiles: list[ProfileId] = Field(default_factory=list, description="only these profiles")
    kinds: list[DeviceKind] = Field(default_factory=list, description="only these device kinds")

    def in_scope(
        self,
        site: str,
        gateway: str,
        device: str | None = None,
        profile: str | None = None,
        kind: str | None = None,
    ) -> bool:
        return (
            super().in_scope(site, gateway)
            and (not self.devices or device in self.devices)
            and (not self.profiles or profile in self.profiles)
            and (not self.kinds or kind in self.kinds)
        )

    @property
    def needs_device_info(self) -> bool:
        return bool(self.profiles or self.kinds)


class ThresholdRule(_DeviceRule):
    """A point beyond `above` or `below` for `for_s` seconds of its readings' own time."""

    type: Literal["threshold"]
    point: PointName
    above: float | None = None
    below: float | None = None
    for_s: Seconds = 0.0
    clear_hysteresis: Annotated[float, Field(ge=0)] = Field(
        0.0, description="clears only this far back inside the limits"
    )
    clear_for_s: Seconds = Field(0.0, description="...and only after this long back inside")

    @model_validator(mode="after")
    def _limits(self) -> ThresholdRule:
        if self.above is None and self.below is None:
            raise ValueError("a threshold rule needs 'above', 'below' or both")
        above, below, margin = self.above, self.below, self.clear_hysteresis
        if above is not None and below is not None and below >= above:
            raise ValueError("'below' must be below 'above'")
        if above is not None and below is not None and below + margin > above - margin:
            raise ValueError(
                "'below' + clear_hysteresis must not exceed 'above' - clear_hysteresis "
                "(the rule could never clear)"
            )
        return self

    def describe(self) -> str:
        beyond, back = [], []
        if self.above is not None:
            beyond.append(f"{self.point} > {self.above:g}")
            back.append(f"{self.point} ≤ {self.above - self.clear_hysteresis:g}")
        if self.below is not None:
            beyond.append(f"{self.point} < {self.below:g}")
            back.append(f"{self.point} ≥ {self.below + self.clear_hysteresis:g}")
        text = f"{' or '.join(beyond)} for {span(self.for_s)}; clears at {' and '.join(back)}"
        return text + (f" for {span(self.clear_for_s)}" if self.clear_for_s else "")


class DeviceOfflineRule(_DeviceRule):
    """A device reported down (device_down event, or up: false in the state) for `for_s`."""

    type: Literal["device_offline"]
    for_s: Seconds = 300.0

    def describe(self) -> str:
        return f"device down for {span(self.for_s)}"


class DeviceAlarmRule(_DeviceRule):
    """An agent's `alarm` event (a profile's or the device's thresholds crossed): one alert per
    device and point, raised by the agent's `raised` event and cleared by its `cleared` one."""

    type: Literal["device_alarm"]
    points: list[PointName] = Field(default_factory=list, description="only these points")

    def describe(self) -> str:
        which = ", ".join(self.points) if self.points else "any point"
        return (
            f"the agent's alarm on {which}; clears when the agent clears it or no longer lists it"
        )


class GatewayOfflineRule(_Rule):
    """A gateway offline (its Last Will, or a planned stop) for `for_s`."""

    type: Literal["gateway_offline"]
    for_s: Seconds = 300.0

    def describe(self) -> str:
        return f"gateway offline for {span(self.for_s)}"


class BufferEvictingRule(_Rule):
    """A gateway's buffer evicted readings; clears after `for_s` without new evictions."""

    type: Literal["buffer_evicting"]
    for_s: Seconds = 3600.0

    def describe(self) -> str:
        return f"buffer evicted readings; clears after {span(self.for_s)} without"


class ConfigRejectedRule(_Rule):
    """A gateway rejected a config (or a network policy); clears when it applies one."""

    type: Literal["config_rejected"]

    def describe(self) -> str:
        return "config or network policy rejected; clears when one is applied"


TimedRule = DeviceOfflineRule | GatewayOfflineRule | BufferEvictingRule
AlertRule = Annotated[
    ThresholdRule | DeviceAlarmRule | TimedRule | ConfigRejectedRule, Field(discriminator="type")
]


def _unique_ids(rules: list[AlertRule]) -> list[AlertRule]:
    seen: set[str] = set()
    for rule in rules:
        if rule.id in seen:
            raise ValueError(f"rule id {rule.id!r} is used twice")
        seen.add(rule.id)
    return rules


AlertRules = Annotated[list[AlertRule], AfterValidator(_unique_ids)]


def span(seconds: float) -> str:
    """A duration for people: 45 s, 12 min, 3 h, 2 d."""
    if seconds < 120:
        return f"{round(seconds, 1 if seconds < 10 else None):g} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172_800:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86_400:.0f} d"


def alert_key(
    rule: str, site: str, gateway: str | None, device: str | None = None, point: str | None = None
) -> str:
    return f"{rule}|{site}|{gateway or ''}|{device or ''}|{point or ''}"


# -- engine state: plain data ---------------------------------------------------------------------


@dataclass(slots=True)
class _Open:
    id: int
    rule: str
    site: str
    gateway: str | None
    device: str | None
    point: str | None
    value: float | None
    message: str
    raised_ns: int


@dataclass(frozen=True, slots=True)
class _Threshold:
    """A threshold rule compiled for the hot path (infinite limits where none is set)."""

    rule: ThresholdRule
    id: str
    point: str
    above: float
    below: float
    clear_above: float
    clear_below: float
    for_ns: int
    clear_for_ns: int

    @classmethod
    def of(cls, rule: ThresholdRule) -> _Threshold:
        above = math.inf if rule.above is None else rule.above
        below = -math.inf if rule.below is None else rule.below
        return cls(
            rule,
            rule.id,
            rule.point,
            above,
            below,
            above - rule.clear_hysteresis,
            below + rule.clear_hysteresis,
            int(rule.for_s * NS),
            int(rule.clear_for_s * NS),
        )


@dataclass(slots=True)
class _Tracker:
    """One threshold rule on one device: since when the condition to change state holds."""

    key: str
    site: str
    gateway: str
    device: str
    last_ts: int = -1
    since_ts: int | None = None


_OUT_OF_SCOPE = _Tracker("", "", "", "")
_UNSYNCED = int(Quality.CLOCK_UNSYNCED)


class _AlarmData(BaseModel):
    """What an `alarm` event's `data` must hold to open or clear an alert (agent/coordinator.py's
    AlarmWatch also sends `level`, `high` and `low`: the message already says them)."""

    model_config = ConfigDict(frozen=True)
    point: PointName
    value: Annotated[float, Field(strict=True, allow_inf_nan=False)]
    state: Literal["raised", "cleared"]


@dataclass(frozen=True, slots=True)
class _Condition:
    """A wall-time condition that holds now; `ready` once it held for the rule's `for_s`."""

    key: str
    site: str
    gateway: str
    device: str | None
    ready: bool
    value: float | None
    message: str


class AlertEngine:
    """Evaluates the rules; call every hook inside the transaction that stored the message."""

    def __init__(
        self, store: Store, rules: Iterable[AlertRule], *, clock: Callable[[], int] = time.time_ns
    ) -> None:
        self.store = store
        self.rules: dict[str, AlertRule] = {rule.id: rule for rule in rules}
        self.clock = clock
        self._by_point: dict[str, list[_Threshold]] = {}
        for rule in self.rules.values():
            if isinstance(rule, ThresholdRule):
                self._by_point.setdefault(rule.point, []).append(_Threshold.of(rule))
        self._alarms = [r for r in self.rules.values() if isinstance(r, DeviceAlarmRule)]
        self._alarm_ids = {rule.id for rule in self._alarms}
        self._timed: list[TimedRule] = [
            r
            for r in self.rules.values()
            if isinstance(r, DeviceOfflineRule | GatewayOfflineRule | BufferEvictingRule)
        ]
        self._needs_device_info = any(
            isinstance(r, _DeviceRule) and r.needs_device_info for r in self.rules.values()
        )
        self._trackers: dict[tuple[str, str], dict[tuple[str, str], _Tracker]] = {}
        self._device_info: dict[tuple[str, str], dict[str, tuple[str | None, str | None]]] = {}
        self._open: dict[str, _Open] = {}
        self._pending: list[tuple[str, AlertMessage]] = []
        self._orphans_checked = False
        self._load_open()

    @property
    def needs_tick(self) -> bool:
        return bool(self._timed) or not self._orphans_checked

    def open_alerts(self) -> dict[str, int]:
        """Key → id of every open alert."""
        return {key: alert.id for key, alert in self._open.items()}

    # -- hooks ---------------------------------------------------------------------------------

    def on_readings(self, site: str, gateway: str, readings: Sequence[Reading]) -> None:
        """The hot path: one dict lookup per reading whose point no rule names."""
        by_point = self._by_point
        if not by_point:
            return
        trackers = self._trackers.setdefault((site, gateway), {})
        for _seq, ts, device, point, value, quality in readings:
            rules = by_point.get(point)
            if rules is None or quality & _UNSYNCED or isinstance(value, str):
                continue  # an unsynced clock's timestamps cannot time a duration
            for rule in rules:
                tracker = trackers.get((rule.id, device))
                if tracker is None:
                    tracker = self._new_tracker(rule, site, gateway, device)
                    trackers[(rule.id, device)] = tracker
                if tracker is not _OUT_OF_SCOPE and ts > tracker.last_ts:
                    self._step(rule, tracker, float(value), ts)

    def on_state(self, site: str, gateway: str, state: GatewayState) -> None:
        if self._needs_device_info and state.devices is not None:
            self._device_info[(site, gateway)] = {d.id: (d.profile, d.kind) for d in state.devices}
            self._rescope(site, gateway)
        if self._alarms and state.devices is not None:
            self._drop_alarms_of_removed_devices(site, gateway, {d.id for d in state.devices})
            self._drop_alarms_no_longer_active(site, gateway, state)
        self._reconcile(self.clock(), (site, gateway))

    def on_event(self, site: str, gateway: str, event: Event) -> None:
        """Raises `InvalidMessage` for an alarm event the alarm rules cannot use."""
        if event.kind in (EventKind.DEVICE_UP, EventKind.DEVICE_DOWN, EventKind.BUFFER_EVICTION):
            self._reconcile(self.clock(), (site, gateway))
        elif event.kind is EventKind.ALARM and self._alarms:
            self._on_alarm(site, gateway, event)

    def on_ack(self, site: str, gateway: str, ack: Ack) -> None:
        """A rejected config or network policy (each its own alert: a policy is told apart by
        `point: policy`); cleared when that kind is applied again."""
        now = self.clock()
        point = None if ack.kind == "config" else ack.kind
        for rule in self.rules.values():
            if not isinstance(rule, ConfigRejectedRule) or not rule.in_scope(site, gateway):
                continue
            key = alert_key(rule.id, site, gateway, None, point)
            if ack.status is AckStatus.REJECTED and key not in self._open:
                reason = f": {ack.reason}" if ack.reason else ""
                message = f"{ack.kind} version {ack.version} rejected{reason}"
                self._raise(key, rule.id, site, gateway, None, point, ack.version, message, now)
            elif ack.status is AckStatus.APPLIED and key in self._open:
                self._clear(key, now, ack.version, f"{ack.kind} version {ack.version} applied")

    def tick(self, now_ns: int) -> None:
        """Wall-time rules (offline for N, evictions stopped for N); call about every second."""
        if not self._orphans_checked:
            self._orphans_checked = True
            for key, alert in list(self._open.items()):
                if alert.rule not in self.rules:
                    self._clear(key, now_ns, None, f"rule {alert.rule} is no longer configured")
        self._reconcile(now_ns, None)

    def take(self) -> list[AlertMessage]:
        """The messages to publish, once their transaction committed (call after the commit).
        Anything a rollback undid is dropped, and the engine re-reads the open alerts."""
        pending, self._pending = self._pending, []
        if not pending:
            return []
        ids = json.dumps(sorted({message.id for _key, message in pending}))
        rows = {
            row[0]: (row[1], row[2])
            for row in self.store.conn.execute(
                "SELECT id, key, state FROM alerts WHERE id IN (SELECT value FROM json_each(?))",
                (ids,),
            )
        }
        kept = [message for key, message in pending if _committed(rows, key, message)]
        if len(kept) < len(pending):
            log.warning("%d alert changes were rolled back", len(pending) - len(kept))
            self._load_open()
        return kept

    # -- thresholds ----------------------------------------------------------------------------

    def _new_tracker(self, rule: _Threshold, site: str, gateway: str, device: str) -> _Tracker:
        profile, kind = self._info(site, gateway, device)
        if not rule.rule.in_scope(site, gateway, device, profile, kind):
            return _OUT_OF_SCOPE
        key = alert_key(rule.id, site, gateway, device, rule.point)
        return _Tracker(key, site, gateway, device)

    def _step(self, rule: _Threshold, tracker: _Tracker, value: float, ts: int) -> None:
        tracker.last_ts = ts
        is_open = tracker.key in self._open
        if is_open:
            changing = rule.clear_below <= value <= rule.clear_above
            hold_ns = rule.clear_for_ns
        else:
            changing = value > rule.above or value < rule.below
            hold_ns = rule.for_ns
        if not changing:
            tracker.since_ts = None
            return
        if tracker.since_ts is None:
            tracker.since_ts = ts
        if ts - tracker.since_ts < hold_ns:
            return
        tracker.since_ts = None
        if is_open:
            self._clear(tracker.key, ts, value, f"{rule.point} {value:g} back within limits")
            return
        side = f"above {rule.above:g}" if value > rule.above else f"below {rule.below:g}"
        held = f" for {span(rule.for_ns / NS)}" if rule.for_ns else ""
        self._raise(
            tracker.key,
            rule.id,
            tracker.site,
            tracker.gateway,
            tracker.device,
            rule.point,
            value,
            f"{rule.point} {value:g} {side}{held}",
            ts,
        )

    def _info(self, site: str, gateway: str, device: str) -> tuple[str | None, str | None]:
        """A device's profile and kind (as its gateway last reported), when a rule needs them."""
        if not self._needs_device_info:
            return None, None
        devices = self._device_info.get((site, gateway))
        if devices is None:
            rows = self.store.conn.execute(
                "SELECT device, profile, kind FROM devices WHERE site = ? AND gateway = ?",
                (site, gateway),
            )
            devices = {row[0]: (row[1], row[2]) for row in rows}
            self._device_info[(site, gateway)] = devices
        return devices.get(device, (None, None))

    def _rescope(self, site: str, gateway: str) -> None:
        """A gateway's devices changed: check its trackers' scope again (keep their timing)."""
        trackers = self._trackers.get((site, gateway), {})
        for (rule_id, device), tracker in list(trackers.items()):
            rule = self.rules[rule_id]
            if not rule.in_scope(site, gateway, device, *self._info(site, gateway, device)):
                trackers[(rule_id, device)] = _OUT_OF_SCOPE
            elif tracker is _OUT_OF_SCOPE:
                del trackers[(rule_id, device)]

    # -- agents' alarms ------------------------------------------------------------------------

    def _on_alarm(self, site: str, gateway: str, event: Event) -> None:
        """A raise while the alert is open (the agent restarted) is ignored. An event delivered
        twice is known by its timestamp (the agent's clock) in raised_ns or cleared_ns: that
        raise opens nothing, that clear closes only an alert raised before it. Order is not
        judged otherwise: a gateway's clock may be set back (no real-time clock)."""
        device, alarm = _alarm_of(site, gateway, event)
        for rule in self._alarms:
            if rule.points and alarm.point not in rule.points:
                continue
            key = alert_key(rule.id, site, gateway, device, alarm.point)
            alert = self._open.get(key)
            if alarm.state == "cleared":
                if alert is not None and (
                    event.ts_ns >= alert.raised_ns or not self._was_at(key, "cleared", event)
                ):
                    self._clear(key, event.ts_ns, alarm.value, event.message)
                continue
            if alert is not None:
                continue
            profile, kind = self._info(site, gateway, device)
            if rule.in_scope(site, gateway, device, profile, kind) and not self._was_at(
                key, "raised", event
            ):
                self._raise(
                    key,
                    rule.id,
                    site,
                    gateway,
                    device,
                    alarm.point,
                    alarm.value,
                    event.message,
                    event.ts_ns,
                )

    def _drop_alarms_of_removed_devices(self, site: str, gateway: str, devices: set[str]) -> None:
        """A device its gateway no longer polls will never clear its alarm: cleared here."""
        for key, alert in list(self._open.items()):
            if (
                alert.rule in self._alarm_ids
                and alert.device not in devices
                and (alert.site, alert.gateway) == (site, gateway)
            ):
                message = f"device {alert.device} is no longer on gateway {gateway}"
                self._clear(key, self.clock(), None, message)

    def _drop_alarms_no_longer_active(self, site: str, gateway: str, state: GatewayState) -> None:
        """An alarm the gateway no longer has (its agent restarted, or a new config changed the
        threshold, while the value came back) never gets its `cleared` event: the state says so.
        Only a state taken after the raise counts (both on the gateway's clock)."""
        taken_ns = state.ts_ns
        if taken_ns is None:
            return
        active = {
            device.id: set(device.alarms)
            for device in state.devices or ()
            if device.alarms is not None
        }
        for key, alert in list(self._open.items()):
            if (
                alert.rule in self._alarm_ids
                and (alert.site, alert.gateway) == (site, gateway)
                and alert.device in active
                and alert.point not in active[alert.device]
                and taken_ns > alert.raised_ns
            ):
                message = f"{alert.point} no longer in alarm on gateway {gateway}"
                self._clear(key, taken_ns, None, message)

    def _was_at(self, key: str, change: Literal["raised", "cleared"], event: Event) -> bool:
        """Whether an alert of `key` was raised (or cleared) by this very event before."""
        return (
            self.store.conn.execute(
                f"SELECT 1 FROM alerts WHERE key = ? AND {change}_ns = ? LIMIT 1",
                (key, event.ts_ns),
            ).fetchone()
            is not None
        )

    # -- wall-time rules -----------------------------------------------------------------------

    def _reconcile(self, now_ns: int, where: tuple[str, str] | None) -> None:
        """Raises what held long enough, clears what no longer holds (all, or one gateway)."""
        if not self._timed:
            return
        rows = _Rows(self.store, where)
        for rule in self._timed:
            holding = {c.key: c for c in _conditions(rule, rows, now_ns)}
            for c in holding.values():
                if c.ready and c.key not in self._open:
                    self._raise(
                        c.key,
                        rule.id,
                        c.site,
                        c.gateway,
                        c.device,
                        None,
                        c.value,
                        c.message,
                        now_ns,
                    )
            for key, alert in list(self._open.items()):
                if alert.rule != rule.id or key in holding:
                    continue
                if where is None or where == (alert.site, alert.gateway):
                    self._clear(key, now_ns, None, _clear_message(rule))

    # -- rows and messages -----------------------------------------------------------------------

    def _raise(
        self,
        key: str,
        rule: str,
        site: str,
        gateway: str | None,
        device: str | None,
        point: str | None,
        value: float | None,
        message: str,
        at_ns: int,
    ) -> None:
        cursor = self.store.conn.execute(
            "INSERT INTO alerts (rule, key, site, gateway, device, point, state, value, message, "
            "raised_ns) VALUES (?, ?, ?, ?, ?, ?, 'open', ?, ?, ?)",
            (rule, key, site, gateway, device, point, value, message, at_ns),
        )
        assert cursor.lastrowid is not None
        alert = _Open(cursor.lastrowid, rule, site, gateway, device, point, value, message, at_ns)
        self._open[key] = alert
        self._queue(key, alert, AlertState.RAISED, value, message, None)

    def _clear(self, key: str, at_ns: int, value: float | None, message: str) -> None:
        alert = self._open.pop(key)
        cleared_ns = max(at_ns, alert.raised_ns)
        self.store.conn.execute(
            "UPDATE alerts SET state = 'cleared', cleared_ns = ? WHERE id = ?",
            (cleared_ns, alert.id),
        )
        self._queue(key, alert, AlertState.CLEARED, value, message, cleared_ns)

    def _queue(
        self,
        key: str,
        alert: _Open,
        state: AlertState,
        value: float | None,
        message: str,
        cleared_ns: int | None,
    ) -> None:
        log.info("alert %s %s: %s (%s)", alert.id, state.value, message, key)
        self._pending.append(
            (
                key,
                AlertMessage(
                    id=alert.id,
                    rule=alert.rule,
                    severity=rule.severity.value if (rule := self.rules.get(alert.rule)) else None,
                    state=state,
                    site=alert.site,
                    gateway=alert.gateway,
                    device=alert.device,
                    point=alert.point,
                    value=value,
                    message=message[:2000],
                    raised_ns=alert.raised_ns,
                    cleared_ns=cleared_ns,
                ),
            )
        )

    def _load_open(self) -> None:
        self._open = {
            row[1]: _Open(row[0], *row[2:])
            for row in self.store.conn.execute(
                "SELECT id, key, rule, site, gateway, device, point, value, message, raised_ns "
                "FROM alerts WHERE state = 'open' ORDER BY id"
            )
        }
        self._trackers.clear()


def _alarm_of(site: str, gateway: str, event: Event) -> tuple[str, _AlarmData]:
    """The device and details of an alarm event; `InvalidMessage` names what is wrong."""
    where = topic(site, gateway, Channel.EVENTS)
    if event.device is None:
        raise InvalidMessage(where, [Problem("device", "an alarm event must name its device")])
    try:
        return event.device, _AlarmData.model_validate(event.data)
    except ValidationError as exc:
        problems = [
            Problem(
                ".".join(("data", *map(str, err["loc"]))),
                f"{err['msg']} (alarm event of device {event.device})",
            )
            for err in exc.errors()
        ]
        raise InvalidMessage(where, problems) from None


def _committed(rows: dict[int, tuple[str, str]], key: str, message: AlertMessage) -> bool:
    row = rows.get(message.id)
    if row is None or row[0] != key:
        return False
    return message.state is AlertState.RAISED or row[1] == "cleared"


class _Rows:
    """What the wall-time rules read, each query run at most once per reconcile."""

    def __init__(self, store: Store, where: tuple[str, str] | None) -> None:
        self.store = store
        self.where = where
        self._cache: dict[str, list[tuple[Any, ...]]] = {}

    def get(self, sql: str) -> list[tuple[Any, ...]]:
        if sql not in self._cache:
            if self.where is None:
                cursor = self.store.conn.execute(sql)
            else:
                cursor = self.store.conn.execute(f"{sql} AND site = ? AND gateway = ?", self.where)
            self._cache[sql] = cursor.fetchall()
        return self._cache[sql]


_OFFLINE_GATEWAYS = (
    "SELECT site, gateway, offline_since_ns, reason FROM gateways "
    "WHERE offline_since_ns IS NOT NULL"
)
_DOWN_DEVICES = (
    "SELECT site, gateway, device, profile, kind, down_since_ns FROM devices "
    "WHERE down_since_ns IS NOT NULL"
)
_EVICTING_GATEWAYS = (
    "SELECT site, gateway, last_eviction_ns, evicted FROM gateways "
    "WHERE last_eviction_ns IS NOT NULL"
)


def _conditions(rule: TimedRule, rows: _Rows, now_ns: int) -> Iterator[_Condition]:
    limit_ns = now_ns - int(rule.for_s * NS)
    if isinstance(rule, GatewayOfflineRule):
        for site, gateway, since, reason in rows.get(_OFFLINE_GATEWAYS):
            if rule.in_scope(site, gateway):
                why = f" ({reason})" if reason else ""
                message = f"gateway offline{_for(since, now_ns)}{why}"
                key = alert_key(rule.id, site, gateway)
                yield _Condition(key, site, gateway, None, since <= limit_ns, None, message)
    elif isinstance(rule, DeviceOfflineRule):
        for site, gateway, device, profile, kind, since in rows.get(_DOWN_DEVICES):
            if rule.in_scope(site, gateway, device, profile, kind):
                message = f"device down{_for(since, now_ns)}"
                key = alert_key(rule.id, site, gateway, device)
                yield _Condition(key, site, gateway, device, since <= limit_ns, None, message)
    else:
        for site, gateway, last, evicted in rows.get(_EVICTING_GATEWAYS):
            if last > limit_ns and rule.in_scope(site, gateway):
                message = f"buffer evicting readings ({evicted} evicted so far)"
                key = alert_key(rule.id, site, gateway)
                yield _Condition(key, site, gateway, None, True, evicted, message)


def _for(since_ns: int, now_ns: int) -> str:
    """' for 12 min', or nothing when the start is unknown (0: a retained message without time)."""
    return f" for {span((now_ns - since_ns) / NS)}" if since_ns > 0 else ""


def _clear_message(rule: TimedRule) -> str:
    if isinstance(rule, GatewayOfflineRule):
        return "gateway back online"
    if isinstance(rule, DeviceOfflineRule):
        return "device back up"
    return f"no evictions for {span(rule.for_s)}"


# -- the service's side: publishing and the periodic tick ------------------------------------------


def publish_alerts(link: MqttLink, messages: Iterable[AlertMessage]) -> None:
    """Publishes each message QoS 1 on `campus/{site}/alerts`; a failure is logged, not raised."""
    for message in messages:
        topic = alerts_topic(message.site)
        try:
            future = link.publish(topic, encode(message), qos=1)
        except MqttError as exc:
            _log_unpublished(message, exc)
            continue
        future.add_done_callback(partial(_published, message))


def _published(message: AlertMessage, future: asyncio.Future[int]) -> None:
    if not future.cancelled() and (exc := future.exception()) is not None:
        _log_unpublished(message, exc)


def _log_unpublished(message: AlertMessage, exc: BaseException) -> None:
    log.warning("alert %d (%s %s) not published: %s", message.id, message.rule, message.state, exc)


async def run_ticks(engine: AlertEngine, link: MqttLink, interval_s: float = TICK_S) -> None:
    """Ticks the engine in its own transaction about every `interval_s`, publishing after each
    commit. A failing tick is logged once (and once more when it works again), then retried."""
    failing = False
    while True:
        await asyncio.sleep(interval_s)
        if not engine.needs_tick:
            continue
        try:
            with engine.store.transaction():
                engine.tick(engine.clock())
        except Exception:
            if not failing:
                log.exception("alert tick failed; retrying every %g s", interval_s)
            failing = True
            continue
        if failing:
            log.info("alert tick works again")
            failing = False
        publish_alerts(link, engine.take())
