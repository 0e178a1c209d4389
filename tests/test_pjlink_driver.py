"""The PJLink driver against the simulated display over real TCP on loopback (IPv4 and ::1), bad
peers (garbage, silence, truncated and over-long lines), and socat as an independent client
showing that the simulator speaks wire PJLink."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from drivers.errors import DeviceTimeout, DeviceUnreachable, DriverError
from drivers.pjlink.codec import PjlinkAuthError, PjlinkFrameError, PjlinkRefused, Request
from drivers.pjlink.connection import PjlinkConnection
from drivers.pjlink.driver import PjlinkDriver, PjlinkPool, build
from drivers.pjlink.profile import PjlinkProfile
from drivers.profiles import ProfileLibrary
from drivers.registry import DriverFactory
from simulator.pjlink_server import (
    ProjectorServer,
    ProjectorState,
    SimulatedProjector,
    serve_projector,
)


class Clock:
    """Simulated seconds, moved by the test."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


ALL_POINTS = [
    {"name": name, "query": name}
    for name in (
        "power", "power_on", "input", "input_name", "inputs", "video_mute", "audio_mute",
        "errors", "error.fan", "error.lamp", "error.temperature", "error.cover", "error.filter",
        "error.other", "lamp_hours", "lamp_on", "name", "manufacturer", "product", "other_info",
        "pjlink_class",
    )
]  # fmt: skip
CLASS2_POINTS = [{"name": n, "query": n} for n in ("filter_hours", "serial", "software_version")]
COMMANDS = [
    {"name": "power_on", "set": "POWR", "value": 1},
    {"name": "power_off", "set": "POWR", "value": 0},
    {"name": "power", "set": "POWR", "argument": {"type": "bool"}},
    {"name": "input", "set": "INPT", "argument": {"type": "text", "max_length": 16}},
    {"name": "source", "set": "INPT", "argument": {"type": "choice", "choices": {"pc": 11}}},
    {"name": "hdmi1", "set": "INPT", "value": "HDMI1"},
    {"name": "mute", "set": "AVMT", "value": 31},
    {"name": "unmute", "set": "AVMT", "value": 30},
    {"name": "blank", "set": "AVMT", "argument": {"type": "bool"}},
]


def make_profile(pclass: int = 2, points: list[dict[str, Any]] | None = None) -> PjlinkProfile:
    if points is None:
        points = ALL_POINTS + (CLASS2_POINTS if pclass == 2 else [])
    return PjlinkProfile.model_validate(
        {
            "id": f"test-pjlink-class{pclass}",
            "vendor": "Test",
            "model": "PJ",
            "protocol": "pjlink",
            "kind": "display",
            "source": "PJLink class 1 v1.04, class 2 v2.00",
            "pjlink_class": pclass,
            "inputs": {"HDMI1": "32", "VGA": "11"},
            "points": points,
            "commands": COMMANDS,
        }
    )


@asynccontextmanager
async def projector(clock: Clock | None = None, **spec: Any) -> AsyncIterator[ProjectorServer]:
    spec.setdefault("id", "a101-proj")
    async with serve_projector(SimulatedProjector(**spec), clock or Clock()) as server:
        yield server


def driver_for(
    server: ProjectorServer,
    profile: PjlinkProfile | None = None,
    password: str | None = None,
    timeout_s: float = 2.0,
) -> PjlinkDriver:
    connection = PjlinkConnection(
        type="pjlink", host=server.host, port=server.port, password=password, timeout_s=timeout_s
    )
    return build(profile or make_profile(), connection, PjlinkPool())


async def read(driver: PjlinkDriver) -> tuple[dict[str, Any], dict[str, str]]:
    result = await driver.read()
    return dict(result.values), dict(result.rejected)


# --- reading -------------------------------------------------------------------------------------


async def test_class_1_panel_without_password() -> None:
    spec: dict[str, Any] = {"pjlink_class": 1, "lamps": 0, "filter_hours": None, "power": "on"}
    async with projector(**spec, name="A101") as server:
        driver = driver_for(server, make_profile(1))
        values, rejected = await read(driver)
        assert driver.bus == f"pjlink://127.0.0.1:{server.port}"
    assert values == {
        "power": "on", "power_on": True, "input": "31", "input_name": "digital1",
        "inputs": "11 31 32", "video_mute": False, "audio_mute": False, "errors": "ok",
        "error.fan": 0, "error.lamp": 0, "error.temperature": 0, "error.cover": 0,
        "error.filter": 0, "error.other": 0, "name": "A101", "manufacturer": "CampusSim",
        "product": "PJ-100", "other_info": "simulated", "pjlink_class": 1,
    }  # fmt: skip
    # a flat panel has no lamp: LAMP answers ERR1, which rejects those points only
    assert rejected == {
        "lamp_hours": f"127.0.0.1:{server.port}: LAMP refused with ERR1 (undefined command)",
        "lamp_on": f"127.0.0.1:{server.port}: LAMP refused with ERR1 (undefined command)",
    }
    # one connection per poll, one request per PJLink command
    assert (server.connections, server.requests) == (1, 11)
    assert (driver.connects, driver.requests, driver.refusals) == (1, 11, 1)


async def test_class_2_projector_with_password_over_ipv6() -> None:
    spec: dict[str, Any] = {"host": "::1", "pjlink_class": 2, "password": "JBMIAProjectorLink"}
    async with projector(**spec, serial="X5JK0001", software_version="2.10") as server:
        driver = driver_for(server, make_profile(2), password="JBMIAProjectorLink")
        values, rejected = await read(driver)
        assert driver.bus == f"pjlink://[::1]:{server.port}"
        assert server.auth_failures == 0
    assert rejected == {}
    assert values["power"] == "standby" and values["pjlink_class"] == 2
    assert (values["serial"], values["software_version"]) == ("X5JK0001", "2.10")
    assert (values["lamp_hours"], values["lamp_on"], values["filter_hours"]) == (1000, False, 500)
    # in standby a projector answers INPT and AVMT with ERR3: left out, not rejected
    assert not {"input", "input_name", "video_mute", "audio_mute"} & set(values)


async def test_wrong_or_missing_password_is_a_clear_error() -> None:
    async with projector(password="secret") as server:
        with pytest.raises(PjlinkAuthError, match="wrong PJLink password") as wrong:
            await driver_for(server, password="guess").read()
        assert str(wrong.value).startswith(f"127.0.0.1:{server.port}: ")
        assert server.auth_failures == 1
        with pytest.raises(DriverError, match="asks for a PJLink password and none is configured"):
            await driver_for(server).read()
        # a password where none is asked is harmless
    async with projector() as server:
        values, _ = await read(driver_for(server, password="unused"))
        assert values["power"] == "standby"


async def test_class_2_points_on_a_class_1_display_are_rejected_once() -> None:
    async with projector(pjlink_class=1) as server:
        driver = driver_for(server, make_profile(2))
        values, rejected = await read(driver)
        assert server.requests == 11  # CLSS once, then the 10 other class 1 commands
        assert set(rejected) == {"filter_hours", "serial", "software_version"}
        assert "needs PJLink class 2; the display answers class 1" in rejected["serial"]
        assert values["pjlink_class"] == 1 and values["lamp_hours"] == 1000
        requests = server.requests
        values, rejected = await read(driver)
        assert rejected == {} and "serial" not in values
        assert server.requests - requests == 11  # the class 1 queries, as before


async def test_lamp_and_filter_hours_grow_while_on() -> None:
    clock = Clock()
    async with projector(clock, pjlink_class=2, power="on", lamp_hours=3490.0) as server:
        driver = driver_for(server)
        first, _ = await read(driver)
        clock.now += 20 * 3600
        later, _ = await read(driver)
        await driver.command("power_off")
        clock.now += 3600  # cooling takes a minute, then the lamp is off
        off, _ = await read(driver)
        clock.now += 10 * 3600
        still, _ = await read(driver)
    assert (first["lamp_hours"], later["lamp_hours"]) == (3490, 3510)
    assert later["filter_hours"] - first["filter_hours"] == 20
    assert off["lamp_hours"] == 3510 and still["lamp_hours"] == off["lamp_hours"]
    assert (off["power"], off["lamp_on"]) == ("standby", False)


async def test_points_with_their_own_interval_are_read_less_often() -> None:
    library = ProfileLibrary.load()
    profile = library.get("generic-pjlink-projector")
    assert isinstance(profile, PjlinkProfile)
    async with projector(pjlink_class=2, power="on") as server:
        driver = driver_for(server, profile)
        first, rejected = await read(driver)
        second, _ = await read(driver)
    assert rejected == {}
    assert {"lamp_hours", "filter_hours", "serial", "power", "error.lamp"} <= set(first)
    assert {"power", "input", "error.lamp"} <= set(second)
    assert not {"lamp_hours", "filter_hours", "serial", "name"} & set(second)


async def test_error_status_and_refused_queries() -> None:
    async with projector(pjlink_class=2, errors="020010", refuse={"LAMP": 4}) as server:
        driver = driver_for(server)
        values, rejected = await read(driver)
        assert values["errors"] == "lamp error, filter warning"
        assert (values["error.lamp"], values["error.filter"], values["error.fan"]) == (2, 1, 0)
        assert rejected == {
            "lamp_hours": f"127.0.0.1:{server.port}: LAMP refused with ERR4 "
            "(projector/display failure)",
            "lamp_on": rejected["lamp_hours"],
        }
        server.state.errors = "000000"
        values, _ = await read(driver)
        assert values["errors"] == "ok"


async def test_a_display_that_refuses_everything_fails_the_poll() -> None:
    refuse = dict.fromkeys(("POWR", "ERST", "LAMP"), 4)
    points = [{"name": n, "query": n} for n in ("power", "errors", "lamp_hours")]
    async with projector(refuse=refuse) as server:
        with pytest.raises(PjlinkRefused, match="POWR refused with ERR4"):
            await driver_for(server, make_profile(1, points)).read()


# --- commands ------------------------------------------------------------------------------------


async def test_power_input_and_mute_commands_read_back() -> None:
    clock = Clock()
    async with projector(clock, pjlink_class=2, warm_up_s=30, cool_down_s=60) as server:
        driver = driver_for(server)
        with pytest.raises(DriverError, match="display is in standby: power it on first") as off:
            await driver.command("input", "HDMI1")
        assert "INPT 32 refused with ERR3 (unavailable time)" in str(off.value)

        assert await driver.command("power_on") == {
            "command": "power_on",
            "sent": "POWR 1",
            "power": "warming",
        }
        with pytest.raises(DriverError) as busy:
            await driver.command("input", "HDMI1")
        assert str(busy.value).startswith(
            "display busy (warming up or cooling down), try again: "
            f"127.0.0.1:{server.port}: INPT 32 refused with ERR3 (unavailable time)"
        )
        assert str(busy.value).endswith("the display is warming")
        with pytest.raises(DriverError, match="display busy"):
            await driver.command("power_off")

        clock.now += 31
        # a class 2 display gets %2INPT: its inputs may be 6A and alike
        assert await driver.command("input", "hdmi1") == {
            "command": "input", "sent": "INPT 32", "input": "32", "input_name": "HDMI1",
        }  # fmt: skip
        assert (await driver.command("source", "pc"))["input_name"] == "VGA"
        assert (await driver.command("input", "digital1"))["input"] == "31"
        assert (await driver.command("hdmi1"))["input"] == "32"
        mute = await driver.command("mute")
        assert (mute["sent"], mute["video_mute"], mute["audio_mute"]) == ("AVMT 31", True, True)
        unmute = await driver.command("unmute")
        assert (unmute["video_mute"], unmute["audio_mute"]) == (False, False)
        assert (await driver.command("blank", "on"))["video_mute"] is True
        values, _ = await read(driver)
        assert (values["power"], values["input"], values["video_mute"]) == ("on", "32", True)

        assert (await driver.command("power", False))["power"] == "cooling"
        clock.now += 61
        values, _ = await read(driver)
        assert values["power"] == "standby"


async def test_refused_parameters_name_the_command() -> None:
    async with projector(power="on") as server:
        driver = driver_for(server)
        with pytest.raises(DriverError) as caught:
            await driver.command("input", "41")  # a valid code the display does not have
        assert str(caught.value) == (
            "the display does not accept this parameter: "
            f"127.0.0.1:{server.port}: INPT 41 refused with ERR2 (out of parameter)"
        )


async def test_bad_requests_send_nothing() -> None:
    async with projector(power="on") as server:
        driver = driver_for(server)
        for name, argument, message in [
            ("input", "HDMI7", "'HDMI7' is not an input"),
            ("input", None, "needs an argument"),
            ("mute", "now", "takes no argument"),
            ("source", "dvd", "'dvd' is not one of pc"),
            ("power", "maybe", "is not on/off"),
            ("reboot", None, "has no command 'reboot'"),
        ]:
            with pytest.raises(ValueError, match=message):
                await driver.command(name, argument)
        with pytest.raises(ValueError, match="has no option force"):
            await driver.command("mute", options={"force": True})
        assert server.connections == 0


async def test_the_driver_factory_builds_the_driver_and_runs_a_command() -> None:
    profile = ProfileLibrary.load().get("generic-pjlink-flat-panel")
    async with projector(pjlink_class=1, lamps=0, warm_up_s=0) as server:
        connection = PjlinkConnection(type="pjlink", host="127.0.0.1", port=server.port)
        factory = DriverFactory()
        try:
            driver = factory.build(profile, connection)
            assert isinstance(driver, PjlinkDriver)
            result = await driver.command("power_on")
            values, rejected = await read(driver)
        finally:
            await factory.close()
    assert result == {"command": "power_on", "sent": "POWR 1", "power": "on"}
    assert rejected == {}
    assert (values["power"], values["input"], values["errors"]) == ("on", "31", "ok")


# --- bad peers -----------------------------------------------------------------------------------


async def test_garbage_instead_of_a_greeting() -> None:
    async with projector(fault="garbage") as server:
        driver = driver_for(server)
        with pytest.raises(PjlinkFrameError, match="not a PJLink greeting") as caught:
            await driver.read()
    assert str(caught.value).startswith(f"127.0.0.1:{server.port}: ")


async def test_garbled_answers() -> None:
    async with projector(fault="garbled") as server:
        driver = driver_for(server, make_profile(1))
        with pytest.raises(PjlinkFrameError, match=f"127.0.0.1:{server.port}: answer to POWR"):
            await driver.read()
        assert driver.bad_answers == 1


async def test_a_silent_display_times_out_within_timeout_s() -> None:
    async with projector(fault="silent") as server:
        driver = driver_for(server, timeout_s=0.3)
        started = time.monotonic()
        with pytest.raises(DeviceTimeout, match=r"the PJLink greeting did not come within 0\.3 s"):
            await driver.read()
        assert time.monotonic() - started < 1.0


async def test_a_truncated_answer() -> None:
    async with projector(fault="truncated") as server:
        with pytest.raises(DeviceUnreachable) as caught:
            await driver_for(server, make_profile(1)).read()
    assert "connection closed by the display before the answer to POWR after b'%1PO" in str(
        caught.value
    )
    assert "(a line without its CR)" in str(caught.value)


async def test_an_over_long_answer() -> None:
    async with projector(fault="overlong") as server:
        with pytest.raises(PjlinkFrameError, match="longer than 136"):
            await driver_for(server).read()


async def test_offline_then_back_reconnects_transparently() -> None:
    async with projector() as server:
        driver = driver_for(server)
        await server.set_offline(True)
        with pytest.raises(DeviceUnreachable, match="cannot connect"):
            await driver.read()
        await server.set_offline(False)
        values, _ = await read(driver)
        assert values["power"] == "standby"


async def test_one_connection_at_a_time() -> None:
    async with projector() as server:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        assert await reader.readuntil(b"\r") == b"PJLINK 0\r"  # another controller holds it
        try:
            with pytest.raises(DeviceUnreachable, match="one PJLink connection at a time"):
                await driver_for(server).read()
        finally:
            writer.close()
            await writer.wait_closed()
        values, _ = await read(driver_for(server))
        assert values["power"] == "standby"
        assert server.turned_away == 1


async def test_the_simulators_power_machine_without_sockets() -> None:
    state = ProjectorState(SimulatedProjector(id="x", warm_up_s=10, cool_down_s=20), 0.0)
    assert state.answer(Request(1, "POWR", "1"), 0.0) == "OK"
    assert state.answer(Request(1, "POWR", "?"), 9.9) == "3"
    assert state.answer(Request(1, "AVMT", "31"), 9.9) == "ERR3"
    assert state.answer(Request(1, "POWR", "?"), 10.0) == "1"
    assert state.answer(Request(1, "POWR", "7"), 10.0) == "ERR2"
    assert state.answer(Request(1, "SNUM", "?"), 10.0) == "ERR1"  # a class 1 display
    assert state.answer(Request(2, "POWR", "?"), 10.0) == "ERR1"
    assert state.answer(Request(1, "POWR", "0"), 3610.0) == "OK"
    assert state.lamp_hours == pytest.approx(1000 + 3610 / 3600)  # warming counts too
    assert state.answer(Request(1, "POWR", "?"), 3629.0) == "2"
    assert state.answer(Request(1, "POWR", "?"), 3630.0) == "0"


# --- an independent client -----------------------------------------------------------------------


def socat(port: int, send: bytes) -> bytes:
    result = subprocess.run(
        ["socat", "-t", "1", "-", f"TCP:127.0.0.1:{port}"],
        input=send,
        capture_output=True,
        timeout=10,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


async def test_socat_speaks_to_the_simulator() -> None:
    async with projector(pjlink_class=2, power="on", name="A101") as server:
        answer = await asyncio.to_thread(
            socat, server.port, b"%1POWR ?\r%1NAME ?\r%2SNUM ?\r%1LAMP ?\r%1XXXX ?\r"
        )
    assert answer == (
        b"PJLINK 0\r%1POWR=1\r%1NAME=A101\r%2SNUM=SIM0001\r%1LAMP=1000 1\r%1XXXX=ERR1\r"
    )


def socat_with_password(port: int, password: str) -> list[bytes]:
    """Reads the random off the greeting and sends md5(random + password) + the request."""
    with subprocess.Popen(
        ["socat", "-t", "1", "-", f"TCP:127.0.0.1:{port}"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    ) as peer:
        assert peer.stdin is not None and peer.stdout is not None
        greeting = b""
        while not greeting.endswith(b"\r"):
            greeting += peer.stdout.read(1)
        random = greeting[len(b"PJLINK 1 ") : -1]
        digest = hashlib.md5(random + password.encode()).hexdigest().encode()
        peer.stdin.write(digest + b"%1POWR 1\r%1POWR ?\r")
        peer.stdin.close()
        rest = peer.stdout.read()
        peer.wait(10)
    return [greeting, *rest.split(b"\r")]


async def test_socat_authenticates_like_the_specification_says() -> None:
    async with projector(password="JBMIAProjectorLink", warm_up_s=30) as server:
        good = await asyncio.to_thread(socat_with_password, server.port, "JBMIAProjectorLink")
        bad = await asyncio.to_thread(socat_with_password, server.port, "wrong")
    assert good[0].startswith(b"PJLINK 1 ") and len(good[0]) == len(b"PJLINK 1 498e4a67\r")
    assert good[1:] == [b"%1POWR=OK", b"%1POWR=3", b""]
    assert bad[1:] == [b"PJLINK ERRA", b""]


async def test_class_2_input_codes_go_as_class_2_requests() -> None:
    async with projector(pjlink_class=2, power="on", inputs=["31", "6A"]) as server:
        driver = driver_for(server)
        result = await driver.command("input", "internal-a")
        values, _ = await read(driver)
    assert result == {
        "command": "input",
        "sent": "INPT 6A",
        "input": "6A",
        "input_name": "internal-a",
    }
    assert (values["input"], values["inputs"]) == ("6A", "31 6A")
    # the same code in a class 1 request is out of parameter
    state = ProjectorState(SimulatedProjector(id="x", pjlink_class=2, power="on"), 0.0)
    assert state.answer(Request(1, "INPT", "6A"), 0.0) == "ERR2"
    assert state.answer(Request(2, "INPT", "32"), 0.0) == "OK"


async def test_a_poll_cut_short_by_the_agent_leaves_nothing_open() -> None:
    async with projector(fault="silent") as server:
        driver = driver_for(server, timeout_s=5)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):  # as the agent's coordinator bounds a poll
                await driver.read()
        server.fault = "none"
        values, _ = await read(driver)  # the display's one connection was given back
        assert values["power"] == "standby"
        assert server.turned_away == 0
