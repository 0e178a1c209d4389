"""Byte-for-byte tests of the sans-IO PJLink codec, with frames from the JBMIA specification
(Class 1 v1.04, Class 2 v2.00), and of the PJLink profile model's load-time checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from drivers.errors import DriverError
from drivers.pjlink.codec import (
    MAX_LINE,
    QUERIES,
    Context,
    ErrorStatus,
    Lamp,
    LineSplitter,
    Mute,
    PjlinkAuthError,
    PjlinkFrameError,
    PjlinkRefused,
    PjlinkRequestError,
    Power,
    Request,
    Response,
    Severity,
    auth_digest,
    check_ok,
    encode_greeting,
    encode_request,
    encode_response,
    input_code,
    input_name,
    parse_class,
    parse_errors,
    parse_greeting,
    parse_hours,
    parse_input,
    parse_input_list,
    parse_lamps,
    parse_mute,
    parse_power,
    parse_request,
    parse_response,
    valid_input,
)
from drivers.pjlink.profile import PjlinkProfile
from drivers.profiles import load_profile
from fleet.reports.timeline import power_on
from wire.errors import DocumentError

# --- greeting and authentication (Class 1 v1.04, section 5) ---------------------------------------


def test_the_specifications_authentication_example() -> None:
    # random number 498e4a67 from "PJLINK 1 498e4a67", password JBMIAProjectorLink
    assert auth_digest("498e4a67", "JBMIAProjectorLink") == "5d8409bc1c3fa39749434aa3a5c38682"
    assert encode_request("POWR", "?", digest="5d8409bc1c3fa39749434aa3a5c38682") == (
        b"5d8409bc1c3fa39749434aa3a5c38682%1POWR ?\r"
    )


def test_greetings() -> None:
    assert parse_greeting(b"PJLINK 0") == parse_greeting(b"PJLINK 0")
    assert not parse_greeting(b"PJLINK 0").auth
    greeting = parse_greeting(b"PJLINK 1 498e4a67")
    assert greeting.auth and greeting.random == "498e4a67"
    assert encode_greeting(None) == b"PJLINK 0\r"
    assert encode_greeting("498e4a67") == b"PJLINK 1 498e4a67\r"


@pytest.mark.parametrize(
    "line",
    [b"", b"PJLINK", b"PJLINK 2", b"PJLINK 1", b"PJLINK 1 498e4a6", b"PJLINK 1 498e4a67 x",
     b"HTTP/1.1 400 Bad Request", b"\xff\xfePJLINK 0", b"pjlink 0"],
)  # fmt: skip
def test_what_is_not_a_greeting(line: bytes) -> None:
    with pytest.raises(PjlinkFrameError, match="greeting"):
        parse_greeting(line)


def test_erra_is_a_wrong_password() -> None:
    with pytest.raises(PjlinkAuthError, match="wrong PJLink password"):
        parse_greeting(b"PJLINK ERRA")
    with pytest.raises(PjlinkAuthError, match="wrong PJLink password"):
        parse_response(b"PJLINK ERRA", "POWR")


def test_a_password_is_ascii() -> None:
    with pytest.raises(PjlinkRequestError, match="ASCII"):
        auth_digest("498e4a67", "mot-de-passe-é")


# --- requests ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "frame"),
    [
        (("POWR", "1"), b"%1POWR 1\r"),
        (("POWR", "0"), b"%1POWR 0\r"),
        (("POWR",), b"%1POWR ?\r"),
        (("INPT", "31"), b"%1INPT 31\r"),
        (("AVMT", "31"), b"%1AVMT 31\r"),
        (("ERST",), b"%1ERST ?\r"),
        (("LAMP",), b"%1LAMP ?\r"),
        (("INF1",), b"%1INF1 ?\r"),
        (("CLSS",), b"%1CLSS ?\r"),
        (("SNUM", "?", 2), b"%2SNUM ?\r"),
        (("FILT", "?", 2), b"%2FILT ?\r"),
        (("INPT", "3A", 2), b"%2INPT 3A\r"),
    ],
)
def test_requests_byte_for_byte(args: tuple[Any, ...], frame: bytes) -> None:
    assert encode_request(*args) == frame
    request = parse_request(frame[:-1])
    assert (request.command, request.digest) == (args[0], None)
    assert encode_request(request.command, request.parameter, request.pclass) == frame


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"command": "powr"}, "not a PJLink command"),
        ({"command": "POWER"}, "not a PJLink command"),
        ({"command": "POWR", "parameter": ""}, "1..128"),
        ({"command": "NAME", "parameter": "x" * 129}, "1..128"),
        ({"command": "POWR", "parameter": "1\r%1POWR 0"}, "printable"),
        ({"command": "POWR", "pclass": 3}, "class"),
        ({"command": "POWR", "digest": "5D8409BC1C3FA39749434AA3A5C38682"}, "digest"),
    ],
)
def test_local_misuse_is_a_value_error(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(PjlinkRequestError, match=message) as caught:
        encode_request(**kwargs)  # type: ignore[arg-type]
    assert isinstance(caught.value, ValueError)


def test_the_display_reads_the_digest_off_the_first_request() -> None:
    request = parse_request(b"5d8409bc1c3fa39749434aa3a5c38682%1POWR 1")
    assert request == Request(1, "POWR", "1", "5d8409bc1c3fa39749434aa3a5c38682")
    assert not request.is_query
    for junk in (b"POWR ?", b"%3POWR ?", b"%1POWR", b"%1PO?R ?", b"%1POWR?", b"x" * 200):
        with pytest.raises(PjlinkFrameError):
            parse_request(junk)


# --- responses -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "command", "pclass", "body"),
    [
        (b"%1POWR=OK", "POWR", 1, "OK"),
        (b"%1POWR=1", "POWR", 1, "1"),
        (b"%1INPT=31", "INPT", 1, "31"),
        (b"%1AVMT=31", "AVMT", 1, "31"),
        (b"%1ERST=000000", "ERST", 1, "000000"),
        (b"%1LAMP=12345 1", "LAMP", 1, "12345 1"),
        (b"%1INST=11 12 21 31 32", "INST", 1, "11 12 21 31 32"),
        (b"%1NAME=", "NAME", 1, ""),
        (b"%1NAME=Salle A101", "NAME", 1, "Salle A101"),
        (b"%1INF1=EPSON", "INF1", 1, "EPSON"),
        (b"%1CLSS=2", "CLSS", 1, "2"),
        (b"%2SNUM=ABC1234567", "SNUM", 2, "ABC1234567"),
        (b"%2SVER=1.02", "SVER", 2, "1.02"),
        (b"%2FILT=1500", "FILT", 2, "1500"),
        (b"%2INPT=6A", "INPT", 2, "6A"),
        ("%2NAME=Salle B2 – étage".encode(), "NAME", 2, "Salle B2 – étage"),  # UTF-8 (class 2)
    ],
)
def test_responses_byte_for_byte(frame: bytes, command: str, pclass: int, body: str) -> None:
    assert parse_response(frame, command, pclass) == Response(pclass, command, body)
    assert encode_response(pclass, command, body) == frame + b"\r"


@pytest.mark.parametrize(
    ("code", "meaning", "busy"),
    [
        ("ERR1", "undefined command", False),
        ("ERR2", "out of parameter", False),
        ("ERR3", "unavailable time", True),
        ("ERR4", "projector/display failure", False),
    ],
)
def test_error_answers_name_the_command(code: str, meaning: str, busy: bool) -> None:
    with pytest.raises(PjlinkRefused) as caught:
        parse_response(f"%1INPT={code}".encode(), "INPT")
    refused = caught.value
    assert (refused.command, refused.code, refused.meaning, refused.busy) == (
        "INPT",
        code,
        meaning,
        busy,
    )
    assert str(refused) == f"INPT refused with {code} ({meaning})"
    assert (
        str(refused.at("192.0.2.7:4352")) == f"192.0.2.7:4352: INPT refused with {code} ({meaning})"
    )
    assert isinstance(refused, DriverError)


@pytest.mark.parametrize(
    ("frame", "command", "pclass", "message"),
    [
        (b"%1INPT=31", "POWR", 1, "asked %1POWR, the answer is for %1INPT"),
        (b"%2POWR=1", "POWR", 1, "asked %1POWR, the answer is for %2POWR"),
        (b"%1POWR:1", "POWR", 1, "not PJLink"),
        (b"#1POWR=1", "POWR", 1, "not PJLink"),
        (b"%1PO", "POWR", 1, "not PJLink"),
        (b"", "POWR", 1, "not PJLink"),
        (b"\xff\xfe\x00\x01garbage", "POWR", 1, "not ASCII"),
        (b"%1NAME=\xff\xfe", "NAME", 1, "not text"),
        (b"%1NAME=a\x07b", "NAME", 1, "control characters"),
        (b"%1NAME=" + b"x" * 129, "NAME", 1, "137 bytes, more than PJLink's 136"),
    ],
)
def test_what_is_not_an_answer(frame: bytes, command: str, pclass: int, message: str) -> None:
    with pytest.raises(PjlinkFrameError, match=message):
        parse_response(frame, command, pclass)


def test_the_longest_answer_is_allowed() -> None:
    frame = b"%1NAME=" + b"x" * 128
    assert len(frame) + 1 == MAX_LINE
    assert parse_response(frame, "NAME").body == "x" * 128
    with pytest.raises(PjlinkRequestError):
        encode_response(1, "NAME", "x" * 129)


def test_a_set_command_expects_ok() -> None:
    check_ok(Response(1, "POWR", "OK"))
    with pytest.raises(PjlinkFrameError, match="not OK"):
        check_ok(Response(1, "POWR", "1"))


# --- the stream ----------------------------------------------------------------------------------


def test_lines_arrive_in_pieces() -> None:
    splitter = LineSplitter()
    stream = b"PJLINK 0\r%1POWR=1\r%1LAMP=12 1\r\n%1INPT=3"
    lines = [line for byte in stream for line in splitter.feed(bytes([byte]))]
    assert lines == [b"PJLINK 0", b"%1POWR=1", b"%1LAMP=12 1"]
    assert splitter.pending == b"%1INPT=3"
    assert splitter.feed(b"1\r") == [b"%1INPT=31"]
    assert splitter.pending == b""


def test_an_endless_line_is_refused_and_the_splitter_stays_broken() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b"x" * (MAX_LINE - 1)) == []
    with pytest.raises(PjlinkFrameError, match="no CR within 136 bytes"):
        splitter.feed(b"x")
    with pytest.raises(PjlinkFrameError, match="unusable"):
        splitter.feed(b"\r")
    with pytest.raises(PjlinkFrameError, match="line of 201 bytes"):
        LineSplitter().feed(b"y" * 200 + b"\r")


# --- typed values --------------------------------------------------------------------------------


def test_power_states_and_what_the_reports_make_of_them() -> None:
    assert [parse_power(c) for c in "0123"] == [
        Power.STANDBY,
        Power.ON,
        Power.COOLING,
        Power.WARMING,
    ]
    assert [p.code for p in Power] == ["0", "1", "2", "3"]
    # fleet/reports/timeline.py counts a display's `power` point: warming is on, cooling off
    assert [power_on(p.value) for p in Power] == [False, True, False, True]
    assert [p.lit for p in Power] == [False, True, False, True]
    for junk in ("", "4", "01", "on", "ERR"):
        with pytest.raises(PjlinkFrameError, match="POWR answered"):
            parse_power(junk)


def test_inputs() -> None:
    assert parse_input("31") == "31"
    assert parse_input("3A", 2) == "3A"
    assert parse_input("61", 2) == "61"
    for junk, pclass in (("3A", 1), ("61", 1), ("30", 2), ("71", 2), ("3", 1), ("311", 1)):
        with pytest.raises(PjlinkFrameError):
            parse_input(junk, pclass)
    assert [input_name(c) for c in ("11", "21", "31", "42", "59", "61", "6A")] == [
        "rgb1", "video1", "digital1", "storage2", "network9", "internal1", "internal-a",
    ]  # fmt: skip
    for code in ("11", "31", "59", "6Z", "3A"):
        assert input_code(input_name(code)) == code
    assert input_code("DIGITAL2") == "32"
    assert input_code(" 32 ") == "32"
    assert input_code("hdmi1") is None
    assert input_code("digital0") is None
    assert valid_input("3A") and not valid_input("3A", 1)
    assert parse_input_list("11 12 21 31 32") == ("11", "12", "21", "31", "32")
    assert parse_input_list("") == ()
    with pytest.raises(PjlinkFrameError, match="'99' is not an input code"):
        parse_input_list("11 99")


def test_mute() -> None:
    assert parse_mute("11") == Mute(video=True, audio=False)
    assert parse_mute("21") == Mute(video=False, audio=True)
    assert parse_mute("31") == Mute(video=True, audio=True)
    assert parse_mute("30") == Mute(video=False, audio=False)
    for mute in (Mute(True, False), Mute(False, True), Mute(True, True), Mute(False, False)):
        assert parse_mute(mute.code) == mute
    with pytest.raises(PjlinkFrameError, match="AVMT answered"):
        parse_mute("32")


def test_error_status() -> None:
    status = parse_errors("021000")
    assert status == ErrorStatus(
        fan=Severity.OK,
        lamp=Severity.ERROR,
        temperature=Severity.WARNING,
        cover=Severity.OK,
        filter=Severity.OK,
        other=Severity.OK,
    )
    assert status.summary() == "lamp error, temperature warning"
    assert parse_errors("000000").summary() == "ok"
    assert status.code == "021000"
    for junk in ("00000", "0000000", "000003", "00000a"):
        with pytest.raises(PjlinkFrameError, match="ERST answered"):
            parse_errors(junk)


def test_lamps_and_hours() -> None:
    assert parse_lamps("12345 1") == (Lamp(12345, True),)
    assert parse_lamps("0 0") == (Lamp(0, False),)
    assert parse_lamps("10 1 20 0") == (Lamp(10, True), Lamp(20, False))
    assert len(parse_lamps(" ".join(["1 1"] * 8))) == 8
    for junk in ("", "12345", "123456 1", "12 2", "12  1", " ".join(["1 1"] * 9), "-1 1"):
        with pytest.raises(PjlinkFrameError, match="LAMP answered"):
            parse_lamps(junk)
    assert parse_hours("1500") == 1500
    assert parse_hours("0") == 0
    for junk in ("", "100000", "1.5", "-3"):
        with pytest.raises(PjlinkFrameError, match="FILT answered"):
            parse_hours(junk)
    assert parse_class("1") == 1
    assert parse_class("2") == 2
    with pytest.raises(PjlinkFrameError):
        parse_class("B")


def test_every_query_reads_its_answer() -> None:
    answers = {
        "POWR": "3", "INPT": "32", "INST": "11 31 32", "AVMT": "21", "ERST": "002010",
        "LAMP": "3600 1 10 0", "NAME": "A101", "INF1": "EPSON", "INF2": "EB-L200", "INFO": "",
        "CLSS": "2", "FILT": "1200", "SNUM": "X5JK0001", "SVER": "1.02",
    }  # fmt: skip
    context = Context(2, {"32": "HDMI1"})
    values = {name: q.extract(answers[q.command], context) for name, q in QUERIES.items()}
    assert values == {
        "power": "warming", "power_on": True, "input": "32", "input_name": "HDMI1",
        "inputs": "11 31 32", "video_mute": False, "audio_mute": True,
        "error.fan": 0, "error.lamp": 0, "error.temperature": 2, "error.cover": 0,
        "error.filter": 1, "error.other": 0, "errors": "temperature error, filter warning",
        "lamp_hours": 3600, "lamp_on": True, "name": "A101", "manufacturer": "EPSON",
        "product": "EB-L200", "other_info": "", "pjlink_class": 2, "filter_hours": 1200,
        "serial": "X5JK0001", "software_version": "1.02",
    }  # fmt: skip
    assert QUERIES["input_name"].extract("31", Context()) == "digital1"
    assert {q.name for q in QUERIES.values() if q.pclass == 2} == {
        "filter_hours",
        "serial",
        "software_version",
    }


# --- profiles ------------------------------------------------------------------------------------


POWER = "points:\n  - {name: p, query: power}\n"


def load_pjlink(path: Path) -> PjlinkProfile:
    profile = load_profile(path)
    assert isinstance(profile, PjlinkProfile)
    return profile


def write(tmp_path: Path, body: str, pclass: int = 1) -> Path:
    path = tmp_path / "acme-pj1.yaml"
    path.write_text(
        "vendor: Acme\nmodel: PJ1\nprotocol: pjlink\nkind: display\n"
        f"source: PJLink class 1 v1.04\npjlink_class: {pclass}\n" + body
    )
    return path


def test_a_profile_gets_each_points_type_from_its_query(tmp_path: Path) -> None:
    profile = load_pjlink(
        write(
            tmp_path,
            "inputs: {HDMI1: 32, VGA: '11'}\n"
            "points:\n  - {name: power, query: power}\n  - {name: lamp, query: lamp_hours}\n"
            "  - {name: hours, query: lamp_hours, type: float, alarm: {high: 3500}}\n"
            "  - {name: muted, query: video_mute}\n"
            "commands:\n  - {name: switch_on, set: POWR, value: 1}\n"
            "  - {name: source, set: INPT, argument: {type: choice, choices: {pc: 11, hdmi: 32}}}\n"
            "  - {name: blank, set: AVMT, argument: {type: bool}}\n",
        )
    )
    assert [p.type.value for p in profile.points] == ["string", "int", "float", "bool"]
    assert profile.command("switch_on").value == "1"
    assert profile.inputs == {"HDMI1": "32", "VGA": "11"}
    assert profile.input_parameter("hdmi1") == "32"
    assert profile.input_parameter("digital3") == "33"
    assert profile.input_parameter("41") == "41"
    with pytest.raises(ValueError, match=r"'HDMI' is not an input.*\(HDMI1, VGA\)"):
        profile.input_parameter("HDMI")
    assert profile.input_names() == {"32": "HDMI1", "11": "VGA"}


@pytest.mark.parametrize(
    ("body", "pclass", "message"),
    [
        (
            "points:\n  - {name: p, query: powr}\n",
            1,
            "line 8, points.0: Value error, unknown PJLink query 'powr' (queries: power, power_on",
        ),
        (
            "points:\n  - {name: f, query: filter_hours}\n",
            1,
            "query 'filter_hours' needs PJLink class 2, the profile says pjlink_class 1",
        ),
        (
            "points:\n  - {name: s, query: serial}\n",
            1,
            "query 'serial' needs PJLink class 2",
        ),
        (
            "points:\n  - {name: p, query: power, type: int}\n",
            1,
            "query 'power' gives string: type must be string",
        ),
        (
            "points:\n  - {name: p, query: power, alarm: {high: 1}}\n",
            1,
            "min, max and alarm apply to numbers",
        ),
        (
            "inputs: {HDMI1: '3A'}\npoints:\n  - {name: p, query: power}\n",
            1,
            "input 'HDMI1': '3A' is not a class 1 input code",
        ),
        (
            POWER + "commands:\n  - {name: x, set: AVMT, value: 12}\n",
            1,
            "AVMT takes 10, 11, 20, 21, 30, 31, not '12'",
        ),
        (
            POWER + "commands:\n  - {name: x, set: POWR, value: 2}\n",
            1,
            "POWR takes 0 (standby) or 1 (on)",
        ),
        (
            POWER + "commands:\n  - {name: x, set: POWR, argument: {type: int}}\n",
            1,
            "the argument of a POWR command is a bool",
        ),
        (
            POWER + "commands:\n  - {name: x, set: POWR, value: 1, argument: {type: bool}}\n",
            1,
            "either a fixed 'value' or an 'argument'",
        ),
        (
            POWER + "commands:\n  - {name: x, set: INPT, value: hdmi}\n",
            1,
            "'hdmi' is not an input",
        ),
        (
            POWER + "commands:\n  - {name: x, set: FREZ, value: 1}\n",
            1,
            "commands.0.set: Input should be 'POWR', 'INPT' or 'AVMT'",
        ),
    ],
)
def test_bad_pjlink_profiles_fail_at_load(
    tmp_path: Path, body: str, pclass: int, message: str
) -> None:
    with pytest.raises(DocumentError) as caught:
        load_profile(write(tmp_path, body, pclass))
    assert message in str(caught.value)
    assert "acme-pj1.yaml" in str(caught.value)


def test_class_2_queries_load_in_a_class_2_profile(tmp_path: Path) -> None:
    profile = load_pjlink(
        write(
            tmp_path,
            "inputs: {Logo: 6A}\npoints:\n  - {name: f, query: filter_hours}\n"
            "  - {name: s, query: serial}\n",
            2,
        )
    )
    assert [p.pclass for p in profile.points] == [2, 2]
    assert profile.input_parameter("logo") == "6A"
