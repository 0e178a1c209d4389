"""MQTT devices: the pure codec byte for byte, presence rules, and the driver against a real
private Mosquitto with the simulated e-class board (in process and as a killed process), and
with mosquitto_pub / mosquitto_sub as an independent board."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import TypeAdapter, ValidationError

from drivers.base import PollResult
from drivers.errors import DeviceUnreachable, DriverError
from drivers.mqtt.codec import (
    MissingField,
    PayloadError,
    extract,
    parse_json,
    placeholders,
    plain_value,
    render,
    split_path,
    template_problems,
)
from drivers.mqtt.connection import MqttDeviceConnection
from drivers.mqtt.driver import DeviceFeed, MqttDeviceDriver, Pool, Presence, build
from drivers.mqtt.profile import HeartbeatSpec, MqttProfile, StatusSpec
from drivers.profiles import ProfileLibrary, default_profiles_dir, load_profile
from drivers.registry import Connection, DriverFactory
from fleet.csv_import import parse_connection_url
from simulator.board import BoardFault, SimulatedBoard, run_board
from simulator.broker import MosquittoBroker, TlsListener, free_ports
from tests.tls_certs import make_test_pki
from wire.errors import DocumentError

REPO = Path(__file__).resolve().parents[1]


def _shipped() -> MqttProfile:
    profile = load_profile(REPO / "firmware-profiles" / "generic-android-eclass-board.yaml")
    assert isinstance(profile, MqttProfile)
    return profile


SHIPPED = _shipped()

HEARTBEAT_S = 0.25  # tests' boards publish every 0.2 s; offline after 6 silent heartbeats
HOSTS = ["127.0.0.1", "::1"]


def variant(change: Callable[[dict[str, Any]], None] | None = None) -> MqttProfile:
    """The shipped profile with test-sized timings, optionally changed further."""
    data = SHIPPED.model_dump(mode="json")
    data["online"]["heartbeat"].update(interval_s=HEARTBEAT_S, missed=6)
    data["reply"]["timeout_s"] = 3
    if change is not None:
        change(data)
    return MqttProfile.model_validate(data)


def no_heartbeat(data: dict[str, Any]) -> None:
    data["online"]["heartbeat"] = None


def unique_topic(name: str) -> str:
    return f"eclass/{name}-{uuid.uuid4().hex[:8]}"


def connection(port: int, topic: str, host: str = "::1", **extra: Any) -> MqttDeviceConnection:
    return MqttDeviceConnection(
        type="mqtt", host=host, port=port, topic=topic, timeout_s=2, **extra
    )


def board_spec(port: int, topic: str, host: str = "::1", **extra: Any) -> SimulatedBoard:
    return SimulatedBoard(
        id="board-101",
        topic=topic,
        broker_host=host,
        broker_port=port,
        interval_s=0.2,
        reboot_s=0.5,
        **extra,
    )


@pytest.fixture
async def pool() -> AsyncIterator[Pool]:
    shared = Pool(reconnect_min_s=0.2, reconnect_max_s=1.0)
    yield shared
    await shared.close()


async def eventually(
    driver: MqttDeviceDriver, check: Callable[[PollResult], bool], timeout: float = 5.0
) -> PollResult:
    """Reads until `check` passes; failures to read count as 'not yet'."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: object = None
    while loop.time() < deadline:
        try:
            last = result = await driver.read()
        except DriverError as exc:
            last = exc
        else:
            if check(result):
                return result
        await asyncio.sleep(0.05)
    raise AssertionError(f"no matching read within {timeout} s; last: {last}")


async def unreachable(driver: MqttDeviceDriver, timeout: float = 5.0) -> DeviceUnreachable:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        try:
            await driver.read()
        except DeviceUnreachable as exc:
            return exc
        await asyncio.sleep(0.05)
    raise AssertionError(f"the device still reads as online after {timeout} s")


def values(result: PollResult) -> dict[str, Any]:
    return dict(result.values)


async def mosquitto_pub(
    port: int, topic: str, payload: bytes, *, retain: bool = False, host: str = "::1"
) -> None:
    args = ["-h", host, "-p", str(port), "-t", topic, "-q", "1", "-s" if payload else "-n"]
    process = await asyncio.create_subprocess_exec(
        "mosquitto_pub", *args, *(["-r"] if retain else []), stdin=asyncio.subprocess.PIPE
    )
    await process.communicate(payload)
    assert process.returncode == 0


# -- codec: pure, byte for byte ----------------------------------------------------------------

STATE = {
    "display": {"screen": "on", "brightness": 80},
    "disks": [{"free_mb": 10240}, {"free_mb": 5}],
    "map": {"0": "key zero"},
}


def test_json_paths() -> None:
    assert split_path("") == ()
    assert split_path("disks.0.free_mb") == ("disks", "0", "free_mb")
    with pytest.raises(ValueError, match="empty segment"):
        split_path("a..b")
    assert extract(STATE, split_path("display.screen")) == "on"
    assert extract(STATE, split_path("disks.1.free_mb")) == 5
    assert extract(STATE, split_path("map.0")) == "key zero"  # digits on a mapping: a key
    assert extract(STATE, ()) is STATE
    with pytest.raises(MissingField) as caught:
        extract(STATE, split_path("disks.2.free_mb"))
    assert str(caught.value) == "no field 'disks.2'"
    with pytest.raises(MissingField, match=r"display\.screen\.x"):
        extract(STATE, split_path("display.screen.x"))


def test_payloads() -> None:
    assert plain_value(b" 21.5\n") == 21.5
    assert plain_value(b"on") == "on"
    assert plain_value(b'"off"') == "off"
    assert plain_value(b"true") is True
    assert plain_value(b"NaN") == "NaN"  # text, never a float NaN
    with pytest.raises(PayloadError, match=r"not UTF-8 text \(byte 0\)"):
        plain_value(b"\xff\xfe")
    with pytest.raises(PayloadError, match=r"invalid JSON \(Expecting .* line 1 column 9\)"):
        parse_json(b'{"a": 1,')
    with pytest.raises(PayloadError, match="NaN is not a JSON value"):
        parse_json(b'{"t": NaN}')
    with pytest.raises(PayloadError, match="1e400 is out of range"):
        parse_json(b'{"t": 1e400}')  # Python would make it inf
    assert plain_value(b"1e400") == "1e400"
    with pytest.raises(PayloadError, match="nested too deeply"):
        parse_json(b"[" * 100_000)


def test_templates_keep_types_and_escape_text() -> None:
    notice = next(command for command in SHIPPED.commands if command.name == "notice")
    text = 'Fire drill "now"\n{request} }, "action": "reboot'
    payload = render(
        notice.payload,
        {"argument": text, "minutes": 10, "request": "r1", "command": "notice"},
    )
    assert payload == (
        b'{"action":"notice","text":"Fire drill \\"now\\"\\n{request} }, \\"action\\": '
        b'\\"reboot","minutes":10,"id":"r1"}'
    )
    assert json.loads(payload)["text"] == text  # nothing injected, nothing substituted twice
    mixed = {"msg": "Room {argument}: {n} min, {on} {{literal}}", "n": "{n}", "list": ["{on}"]}
    assert render(mixed, {"argument": "A-101", "n": 5, "on": True}) == (
        b'{"msg":"Room A-101: 5 min, true {literal}","n":5,"list":[true]}'
    )
    assert render("{argument}", {"argument": 42}) == b"42"  # a string template: plain text
    assert render("POWER {argument}", {"argument": False}) == b"POWER false"
    assert render({"t": "é"}, {}) == '{"t":"é"}'.encode()
    with pytest.raises(ValueError, match="not a finite number"):
        render({"v": "{argument}"}, {"argument": math.nan})
    with pytest.raises(KeyError, match="no value for minutes"):
        render({"m": "{minutes}"}, {})
    assert placeholders(notice.payload) == {"argument", "minutes", "request"}
    assert template_problems({"text": {"argument": None}}, {"argument"}) == [
        '{argument} is read by YAML as a mapping: quote it, "{argument}"'
    ]
    assert template_problems({"t": "{nope}"}, {"argument"}) == [
        "unknown placeholder {nope} (known: argument)"
    ]


# -- profiles ------------------------------------------------------------------------------


def test_shipped_profile() -> None:
    library = ProfileLibrary.load(default_profiles_dir())
    profile = library.get("generic-android-eclass-board")
    assert isinstance(profile, MqttProfile)
    assert profile.kind == "board"
    assert [c.name for c in profile.commands] == ["reboot", "screen_on", "screen_off", "notice"]
    assert profile.online.heartbeat is not None and profile.online.heartbeat.window_s == 90
    assert profile.point("temperature").alarm is not None
    notice = profile.command("notice")
    assert notice.check_options({}) == {"minutes": 10}
    with pytest.raises(ValueError, match="above the maximum 1440"):
        notice.check_options({"minutes": 1441})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(online={}), "'online' needs a 'status' topic, a 'heartbeat', or both"),
        (
            lambda d: d["commands"][3]["payload"].pop("minutes"),
            "command 'notice' never sends {minutes}",
        ),
        (
            lambda d: d["commands"][0]["payload"].pop("id"),
            "command 'reboot': its answer is matched on 'id', so its payload must send {request}",
        ),
        (
            lambda d: d["commands"][1]["payload"].update(x="{argument}"),
            "command 'screen_on' payload: unknown placeholder {argument}",
        ),
        (lambda d: d["points"][0].update(topic="state/#"), "no wildcards"),
        (lambda d: d["points"][0].update(path="display..screen"), "empty segment"),
        (
            lambda d: d["online"]["status"].update(online="OFFLINE"),
            "'online' and 'offline' must be different words",
        ),
    ],
)
def test_bad_profiles(change: Callable[[dict[str, Any]], None], message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("{", "\\{").replace("}", "\\}")):
        variant(change)


def test_unquoted_placeholder_fails_at_load_with_its_line(tmp_path: Path) -> None:
    text = (REPO / "firmware-profiles" / "generic-android-eclass-board.yaml").read_text()
    bad = tmp_path / "acme-board.yaml"
    bad.write_text(text.replace('text: "{argument}"', "text: {argument}"))
    with pytest.raises(DocumentError) as caught:
        load_profile(bad)
    assert 'is read by YAML as a mapping: quote it, "{argument}"' in str(caught.value)
    assert "acme-board.yaml" in str(caught.value)


def test_a_poll_interval_is_refused_with_its_line(tmp_path: Path) -> None:
    """Values are pushed: a per-point poll interval would be silently ignored."""
    text = (REPO / "firmware-profiles" / "generic-android-eclass-board.yaml").read_text()
    bad = tmp_path / "acme-board.yaml"
    bad.write_text(
        text.replace(
            "    path: display.screen\n", "    path: display.screen\n    poll_interval_s: 600\n", 1
        )
    )
    with pytest.raises(DocumentError) as caught:
        load_profile(bad)
    [problem] = caught.value.problems
    assert problem.field == "points.0"
    assert problem.line == text.splitlines().index("  - name: screen") + 1
    assert problem.message.endswith(
        "MQTT devices are push devices, they report when they publish: poll_interval_s does not "
        "apply (remove it; each poll records the latest value heard, every interval_s of the "
        "device)"
    )


def test_tls_means_port_8883_unless_a_port_is_given() -> None:
    def port(text: str) -> int:
        connection = TypeAdapter(Connection).validate_python(yaml.safe_load(text))
        assert isinstance(connection, MqttDeviceConnection)
        return connection.port

    assert port("{type: mqtt, topic: eclass/b}") == 1883
    assert port("{type: mqtt, topic: eclass/b, tls: true}") == 8883
    assert port("{type: mqtt, topic: eclass/b, tls: false}") == 1883
    assert port("{type: mqtt, topic: eclass/b, tls: true, port: 1883}") == 1883  # as written
    assert port("{type: mqtt, topic: eclass/b, tls: true, port: 8884}") == 8884
    # the same as the fleet's mqtts:// URL
    url = parse_connection_url("mqtts://broker.example/eclass/b")
    assert (
        url["port"]
        == MqttDeviceConnection.model_validate(
            {"type": "mqtt", "host": "broker.example", "topic": "eclass/b", "tls": True}
        ).port
    )


def test_connection_rules() -> None:
    with pytest.raises(ValidationError, match="set 'tls: true' too"):
        MqttDeviceConnection(type="mqtt", topic="eclass/b", ca_file=Path("/etc/ca.pem"))
    with pytest.raises(ValidationError, match="no leading or ending /"):
        MqttDeviceConnection(type="mqtt", topic="eclass/b/")
    one = MqttDeviceConnection(type="mqtt", host="[::1]", topic="eclass/a")
    two = MqttDeviceConnection(type="mqtt", host="::1", topic="eclass/b")
    assert one.session_key() == two.session_key()


# -- presence and decoding, no broker -------------------------------------------------------


def test_presence_rules() -> None:
    presence = Presence(
        "board",
        StatusSpec(),
        HeartbeatSpec(interval_s=10, missed=3),
        "eclass/b/status",
        "eclass/b/heartbeat",
        grace_s=5,
    )
    assert presence.offline_reason(1000) is None  # not subscribed yet: the session decides
    presence.subscribed(0)
    presence.report(True, 0.1, retained=True)  # a retained "online" may be days old
    assert presence.offline_reason(29) is None
    assert presence.offline_reason(31) == (
        "no heartbeat for 31 s on eclass/b/heartbeat (expected every 10 s, none since subscribing)"
    )
    presence.beat(40)
    assert presence.offline_reason(60) is None
    presence.report(False, 61, retained=False)
    assert presence.offline_reason(62) == (
        "board reported offline (last will or shutdown: 'offline' on eclass/b/status)"
    )
    presence.beat(63)  # heard again after the will: it is back, whatever status says
    assert presence.offline_reason(64) is None
    presence.subscribed(200)  # a reconnection after a broker outage starts the watch again
    assert presence.offline_reason(220) is None
    assert presence.offline_reason(231) == (
        "no heartbeat for 31 s on eclass/b/heartbeat (expected every 10 s)"
    )

    status_only = Presence("device", StatusSpec(), None, "x/status", "", grace_s=5)
    status_only.subscribed(0)
    assert status_only.offline_reason(4) is None
    assert status_only.offline_reason(6) == (
        "no status from the device on x/status within 5 s of subscribing (is the base topic right?)"
    )


def test_feed_rejects_only_what_is_bad() -> None:
    def unbounded_temperature(data: dict[str, Any]) -> None:
        data["points"][4].update(min=None, max=None)

    feed = DeviceFeed(variant(unbounded_temperature), "eclass/t", "127.0.0.1:1883", grace_s=5)
    good = {
        "display": {"screen": "off", "brightness": 40},
        "app": {"version": "4.2.1"},
        "device": {"temperature_c": 38.5},
        "disks": [{"free_mb": 900}],
        "notice": {"active": False, "text": ""},
    }

    def send(relative: str, payload: bytes, retained: bool = False) -> None:
        feed.receive(relative, payload, len(payload), retained, 1.0)

    send("state", json.dumps(good).encode())
    send("heartbeat", b'{"uptime_s": 77}')
    assert values(feed.poll()) == {
        "screen": False,
        "brightness": 40,
        "app_version": "4.2.1",
        "storage_free": 900,
        "temperature": 38.5,
        "notice_active": False,
        "notice_text": "",
        "uptime": 77,
    }
    wrong = good | {"display": {"screen": "dim", "brightness": 140}, "device": {}}
    wrong["disks"] = [{"free_mb": "lots"}]
    send("state", json.dumps(wrong).encode())
    result = feed.poll()
    assert dict(result.rejected) == {
        "screen": "expected bool, got 'dim' (eclass/t/state display.screen)",
        "brightness": "140 above the valid maximum 100 (eclass/t/state display.brightness)",
        "storage_free": "expected int, got 'lots' (eclass/t/state disks.0.free_mb)",
        "temperature": "no field 'device.temperature_c' in the payload on eclass/t/state",
    }
    assert values(result) == {
        "app_version": "4.2.1",
        "notice_active": False,
        "notice_text": "",
        "uptime": 77,
    }
    assert feed.rejected_values == 4 and feed.bad_payloads == 0

    send("state", b'{"display": {"screen": "on"')
    result = feed.poll()
    assert len(result.rejected) == 7
    assert dict(result.rejected)["screen"] == (
        "invalid JSON (Expecting ',' delimiter at line 1 column 28) on eclass/t/state"
    )
    assert values(result) == {"uptime": 77}  # another topic: untouched
    send("state", b"x" * 70_000)
    assert dict(feed.poll().rejected)["notice_text"] == (
        "payload of 70000 bytes on eclass/t/state is over the 65536-byte limit"
    )
    assert feed.bad_payloads == 2

    send("state", json.dumps(good | {"notice": {"active": True, "text": None}}).encode())
    result = feed.poll()
    assert not result.rejected
    assert "notice_text" not in values(result)  # JSON null: no value now, not an error
    send("state", json.dumps(good | {"device": {"temperature_c": "-inf"}}).encode())
    assert dict(feed.poll().rejected) == {
        "temperature": "not a finite number: '-inf' (eclass/t/state device.temperature_c)"
    }
    send("debug/logcat", b"whatever")
    send("status", b"OFFLINE", retained=True)  # words are compared without case
    assert feed.poll() == PollResult()
    assert feed.ignored == 1 and feed.messages == 8


# -- the driver against a real broker and the simulated board ----------------------------------


@pytest.mark.parametrize("host", HOSTS)
async def test_points_and_commands(broker: MosquittoBroker, pool: Pool, host: str) -> None:
    topic = unique_topic("points")
    async with run_board(board_spec(broker.port, topic, host=host)) as board:
        driver = build(variant(), connection(broker.port, topic, host=host), pool)
        assert driver.bus == f"mqtt://{'[::1]' if ':' in host else host}:{broker.port}/{topic}"
        result = await eventually(driver, lambda r: len(r.values) == 8)
        got = values(result)
        assert got["screen"] is True and got["app_version"] == "4.2.1"
        assert got["storage_free"] <= 12_000 and isinstance(got["storage_free"], int)
        assert isinstance(got["temperature"], float) and isinstance(got["uptime"], int)
        assert not result.rejected

        answer = await driver.command("notice", 'Fire drill "now" at 10:00')
        assert answer["ok"] is True and answer["notice"] == {
            "text": 'Fire drill "now" at 10:00',
            "minutes": 10,
        }
        answer = await driver.command("notice", "Bus late", {"minutes": 3})
        assert answer["notice"]["minutes"] == 3
        assert [(c["text"], c["minutes"]) for c in board.commands] == [
            ('Fire drill "now" at 10:00', 10),
            ("Bus late", 3),
        ]
        assert all(type(c["minutes"]) is int for c in board.commands)  # typed, not "10"
        got = values(await driver.read())
        assert got["notice_active"] is True and got["notice_text"] == "Bus late"

        answer = await driver.command("screen_off")
        assert answer == {"id": answer["id"], "action": "screen", "screen": "off", "ok": True}
        assert values(await driver.read())["screen"] is False  # the state came before the answer
        assert board.screen_on is False
        await driver.command("screen_on")
        assert values(await driver.read())["screen"] is True
        assert driver.feed.bad_payloads == 0 and driver.feed.rejected_values == 0


async def test_reboot_goes_offline_and_comes_back(broker: MosquittoBroker, pool: Pool) -> None:
    topic = unique_topic("reboot")
    async with run_board(board_spec(broker.port, topic)) as board:
        driver = build(variant(), connection(broker.port, topic), pool)
        await eventually(driver, lambda r: len(r.values) == 8)
        answer = await driver.command("reboot")
        assert answer["ok"] is True and answer["back_in_s"] == 0.5
        down = await unreachable(driver)
        assert str(down) == (
            f"[::1]:{broker.port}/{topic}: board reported offline "
            f"(last will or shutdown: 'offline' on {topic}/status)"
        )
        with pytest.raises(DeviceUnreachable, match="reported offline"):
            await driver.command("screen_on")  # nothing is sent to an offline board
        result = await eventually(driver, lambda r: len(r.values) == 8)
        assert board.boots == 2 and values(result)["uptime"] < 5
        assert [c["action"] for c in board.commands] == ["reboot"]


async def test_last_will_of_a_killed_board_process(broker: MosquittoBroker, pool: Pool) -> None:
    """The board is a real process killed with SIGKILL: only the broker can say it is gone."""
    topic = unique_topic("killed")
    driver = build(variant(), connection(broker.port, topic, host="127.0.0.1"), pool)
    for life in range(2):
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "simulator.board",
            *("--topic", topic, "--host", "127.0.0.1", "--port", str(broker.port)),
            *("--interval", "0.2"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            assert process.stdout is not None
            line = await asyncio.wait_for(process.stdout.readline(), 15)
            assert b"ready" in line
            await eventually(driver, lambda r: values(r).get("screen") is True, timeout=10)
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
            down = await unreachable(driver)
            assert "board reported offline (last will" in str(down), life
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()


async def test_heartbeat_silence_means_offline(broker: MosquittoBroker, pool: Pool) -> None:
    topic = unique_topic("silent")
    async with run_board(board_spec(broker.port, topic)) as board:
        driver = build(variant(), connection(broker.port, topic), pool)
        await eventually(driver, lambda r: len(r.values) == 8)
        await board.set_fault(BoardFault.SILENT)  # connected, status still "online", no will
        down = await unreachable(driver, timeout=5)
        assert f"no heartbeat for 2 s on {topic}/heartbeat (expected every 0.25 s)" in str(down)
        await board.set_fault(BoardFault.NONE)
        await eventually(driver, lambda r: len(r.values) == 8)


async def test_no_answer_and_refusals(broker: MosquittoBroker, pool: Pool) -> None:
    topic = unique_topic("answers")

    def change(data: dict[str, Any]) -> None:
        data["online"]["heartbeat"]["interval_s"] = 30  # stays online while the agent hangs
        data["reply"]["timeout_s"] = 0.5
        data["commands"][3]["payload"]["minutes"] = "{minutes} min"  # text: the board refuses

    async with run_board(board_spec(broker.port, topic)) as board:
        driver = build(variant(change), connection(broker.port, topic), pool)
        await eventually(driver, lambda r: len(r.values) == 8)
        with pytest.raises(DriverError) as refused:
            await driver.command("notice", "Hello", {"minutes": 5})
        assert str(refused.value) == (
            f"[::1]:{broker.port}/{topic}: the board refused notice: "
            "'minutes' must be a whole number, not '5 min'"
        )
        for bad, options, message in [
            ("x" * 281, {}, "the text has 281 characters, at most 280"),
            ("Hello", {"minutes": 0}, "--minutes: 0 is below the minimum 1"),
            ("Hello", {"hours": 1}, "has no option hours"),
            (None, {}, "needs an argument"),
        ]:
            with pytest.raises(ValueError, match=message):
                await driver.command("notice", bad, options)
        with pytest.raises(ValueError, match="has no command 'dance'"):
            await driver.command("dance")
        assert len(board.commands) == 1  # nothing was sent for a bad request

        await board.set_fault(BoardFault.SILENT)
        with pytest.raises(DriverError) as silent:
            await driver.command("screen_off")
        assert str(silent.value) == (
            f"[::1]:{broker.port}/{topic}: no answer from the board within 0.5 s on {topic}/result"
        )
        assert driver.feed._waiters == []


async def test_offline_board_and_wrong_base_topic(broker: MosquittoBroker, pool: Pool) -> None:
    topic = unique_topic("off")
    async with run_board(board_spec(broker.port, topic, fault=BoardFault.OFFLINE)) as board:
        driver = build(variant(), connection(broker.port, topic), pool)
        down = await unreachable(driver)
        assert "board reported offline" in str(down)
        await board.set_fault(BoardFault.NONE)
        await eventually(driver, lambda r: len(r.values) == 8)

    lost = build(
        variant(no_heartbeat),
        MqttDeviceConnection(
            type="mqtt", host="::1", port=broker.port, topic=f"{topic}-typo", timeout_s=0.3
        ),
        pool,
    )
    assert await lost.read() == PollResult()  # just subscribed: nothing yet, no error
    down = await unreachable(lost)
    assert f"no status from the board on {topic}-typo/status within 0.3 s" in str(down)


async def test_garbage_and_wrong_values_from_an_independent_publisher(
    broker: MosquittoBroker, pool: Pool
) -> None:
    """mosquitto_pub plays the board: bad payloads reject their own points and are counted."""
    topic = unique_topic("pub")
    port = broker.port
    await mosquitto_pub(port, f"{topic}/status", b"online", retain=True)
    driver = build(variant(no_heartbeat), connection(port, topic, host="127.0.0.1"), pool)
    assert await driver.read() == PollResult()  # subscribed, online, no value yet
    state = {
        "display": {"screen": "off", "brightness": 55},
        "app": {"version": 431},
        "device": {"temperature_c": "hot"},
        "disks": [{"free_mb": -3}],
        "notice": {"active": "yes", "text": "Exam in progress"},
    }
    await mosquitto_pub(port, f"{topic}/heartbeat", b'{"uptime_s": 12}')
    await mosquitto_pub(port, f"{topic}/state", json.dumps(state).encode())
    result = await eventually(driver, lambda r: len(r.values) + len(r.rejected) == 8)
    assert values(result) == {
        "screen": False,
        "brightness": 55,
        "app_version": "431",
        "notice_active": True,
        "notice_text": "Exam in progress",
        "uptime": 12,
    }
    assert dict(result.rejected) == {
        "storage_free": f"-3 below the valid minimum 0 ({topic}/state disks.0.free_mb)",
        "temperature": f"expected float, got 'hot' ({topic}/state device.temperature_c)",
    }

    await mosquitto_pub(port, f"{topic}/heartbeat", b'{"uptime_s": 13}')
    await mosquitto_pub(port, f"{topic}/state", b"\xff\xfe garbage")
    result = await eventually(driver, lambda r: len(r.rejected) == 7)
    assert values(result) == {"uptime": 13}
    assert set(dict(result.rejected).values()) == {f"not UTF-8 text (byte 0) on {topic}/state"}
    await mosquitto_pub(port, f"{topic}/state", b"[" * 70_000)
    result = await eventually(driver, lambda r: "over the" in dict(r.rejected).get("screen", ""))
    assert dict(result.rejected)["screen"] == (
        f"payload of 70000 bytes on {topic}/state is over the 65536-byte limit"
    )
    assert driver.feed.bad_payloads == 2
    await mosquitto_pub(port, f"{topic}/state", json.dumps(state | {"device": {}}).encode())
    result = await eventually(driver, lambda r: "screen" in values(r))
    assert values(result)["uptime"] == 13
    await mosquitto_pub(port, f"{topic}/status", b"offline", retain=True)
    assert "reported offline" in str(await unreachable(driver))
    await mosquitto_pub(port, f"{topic}/status", b"", retain=True)  # clears the retained status


async def test_command_publish_seen_by_mosquitto_sub(broker: MosquittoBroker, pool: Pool) -> None:
    """mosquitto_sub sees the exact payload; mosquitto_pub answers with the id it carried."""
    topic = unique_topic("sub")
    port = broker.port

    def fire_and_forget(data: dict[str, Any]) -> None:
        no_heartbeat(data)
        data["commands"][1]["reply"] = False  # screen_on: this board never answers it

    await mosquitto_pub(port, f"{topic}/status", b"online", retain=True)
    driver = build(variant(fire_and_forget), connection(port, topic), pool)
    assert await driver.read() == PollResult()
    sub = await asyncio.create_subprocess_exec(
        *("stdbuf", "-oL"),  # mosquitto_sub block-buffers its output into a pipe
        *("mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-t", f"{topic}/cmd"),
        *("-q", "1", "-d", "-C", "2"),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert sub.stdout is not None
        while b"SUBACK" not in await asyncio.wait_for(sub.stdout.readline(), 10):
            pass

        async def next_payload() -> bytes:
            assert sub.stdout is not None
            while True:
                line = await asyncio.wait_for(sub.stdout.readline(), 10)
                if line.startswith(b"{"):
                    return line.rstrip(b"\n")

        command = asyncio.create_task(driver.command("notice", 'Ü "quoted"', {"minutes": 7}))
        sent = await next_payload()
        request = json.loads(sent)["id"]
        assert (
            sent
            == (
                '{"action":"notice","text":"Ü \\"quoted\\"","minutes":7,"id":"' + request + '"}'
            ).encode()
        )
        await mosquitto_pub(port, f"{topic}/result", b'{"id": "someone-else", "ok": true}')
        answer = {"id": request, "ok": True, "shown": "Ü"}
        await mosquitto_pub(port, f"{topic}/result", json.dumps(answer).encode())
        assert await asyncio.wait_for(command, 5) == answer

        assert await driver.command("screen_on") == {"published": True, "topic": f"{topic}/cmd"}
        sent = await next_payload()
        assert json.loads(sent) == {"action": "screen", "on": True, "id": json.loads(sent)["id"]}
        assert b'"on":true' in sent
        await asyncio.wait_for(sub.wait(), 5)
    finally:
        if sub.returncode is None:
            sub.kill()
            await sub.wait()
    await mosquitto_pub(port, f"{topic}/status", b"", retain=True)


async def test_broker_restart(own_broker: MosquittoBroker, pool: Pool) -> None:
    topic = unique_topic("restart")
    port = own_broker.port
    async with run_board(board_spec(port, topic, host="127.0.0.1")) as board:
        driver = build(variant(), connection(port, topic), pool)
        await eventually(driver, lambda r: len(r.values) == 8)
        own_broker.stop()
        down = await unreachable(driver)
        assert str(down).startswith(f"[::1]:{port}/{topic}: broker [::1]:{port} unreachable")
        with pytest.raises(DeviceUnreachable, match="unreachable"):
            await driver.command("screen_off")
        await asyncio.sleep(0.5)  # a few failed reconnections
        own_broker.start()
        await board.wait_connected(10)
        # Mosquitto publishes its clients' wills when it shuts down: until the board says
        # "online" again, its retained status is "offline".
        board.screen_on = False  # changed while nobody could see it: only a new publish tells
        board.publish_now()
        await eventually(
            driver, lambda r: values(r).get("screen") is False and len(r.values) == 8, timeout=10
        )
        (session,) = pool.sessions.values()
        assert session.connects == 2
        answer = await driver.command("screen_on")
        assert answer["ok"] is True


async def test_boards_share_one_session_and_command_in_parallel(
    broker: MosquittoBroker, pool: Pool
) -> None:
    topics = [unique_topic("shared"), unique_topic("shared")]
    async with (
        run_board(board_spec(broker.port, topics[0])) as first,
        run_board(board_spec(broker.port, topics[1])) as second,
    ):
        drivers = [build(variant(), connection(broker.port, t), pool) for t in topics]
        for driver in drivers:
            await eventually(driver, lambda r: len(r.values) == 8)
        assert len(pool.sessions) == 1 and drivers[0].bus != drivers[1].bus
        answers = await asyncio.gather(
            drivers[0].command("notice", "first", {"minutes": 1}),
            drivers[1].command("notice", "second", {"minutes": 2}),
        )
        assert [a["notice"]["text"] for a in answers] == ["first", "second"]
        assert [c["text"] for c in first.commands] == ["first"]
        assert [c["text"] for c in second.commands] == ["second"]
        await drivers[0].close()
        assert len(pool.sessions) == 1  # the other board still uses it
        assert values(await drivers[1].read())["notice_text"] == "second"
        await drivers[1].close()
        assert pool.sessions == {}


async def test_driver_factory_builds_and_commands(broker: MosquittoBroker) -> None:
    topic = unique_topic("factory")
    library = ProfileLibrary.load(default_profiles_dir())
    conn = TypeAdapter(Connection).validate_python(
        {"type": "mqtt", "host": "::1", "port": broker.port, "topic": topic}
    )
    assert isinstance(conn, MqttDeviceConnection)
    factory = DriverFactory()
    try:
        async with run_board(board_spec(broker.port, topic)) as board:
            driver = factory.build(library.get("generic-android-eclass-board"), conn)
            assert isinstance(driver, MqttDeviceDriver)
            await driver.open()  # waits until the board is heard
            assert values(await driver.read())["screen"] is True
            answer = await driver.command("screen_off")
            assert answer["ok"] is True and board.screen_on is False
            assert values(await driver.read())["screen"] is False
    finally:
        await factory.close()


async def test_credentials_and_tls(tmp_path: Path, pool: Pool) -> None:
    """A vendor-style broker: TLS with a private CA, a password file; wrong password refused."""
    pki = make_test_pki(tmp_path / "pki")
    passwords = tmp_path / "passwords"
    passwords.write_text("")
    made = await asyncio.create_subprocess_exec(
        "mosquitto_passwd", "-b", str(passwords), "mdm", "s3cret"
    )
    assert await made.wait() == 0
    plain, tls_port = free_ports(2)
    listener = TlsListener(
        tls_port,
        pki.ca,
        pki.server.cert,
        pki.server.key,
        require_certificate=False,
        use_identity_as_username=False,
    )
    with MosquittoBroker(
        tmp_path / "vendor", plain, tls=listener, extra_config=[f"password_file {passwords}"]
    ):
        topic = unique_topic("tls")
        await mosquitto_pub(plain, f"{topic}/status", b"online", retain=True)
        await mosquitto_pub(plain, f"{topic}/state", b'{"display": {"screen": "off"}}', retain=True)
        secure: dict[str, Any] = {"tls": True, "ca_file": pki.ca, "username": "mdm"}
        driver = build(
            variant(no_heartbeat),
            connection(tls_port, topic, host="127.0.0.1", password="s3cret", **secure),
            pool,
        )
        result = await eventually(driver, lambda r: "screen" in values(r))
        assert values(result) == {"screen": False}
        wrong = build(
            variant(no_heartbeat),
            connection(tls_port, topic, host="127.0.0.1", password="guess", **secure),
            pool,
        )
        with pytest.raises(DeviceUnreachable) as refused:
            await wrong.read()
        assert str(refused.value) == (
            f"127.0.0.1:{tls_port}/{topic}: broker 127.0.0.1:{tls_port} refused the "
            "connection: Not authorized"
        )
        assert len(pool.sessions) == 2  # other credentials: another session
        await wrong.close()
        await driver.close()
