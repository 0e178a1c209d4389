"""Camera codecs, byte for byte: SOAP requests and WS-Security tokens, ONVIF answers (good,
faulty, hostile), HTTP/RTSP framing, digest auth against the RFCs' worked examples, RTSP and
SDP, firmware versions, and camera profiles refused at load."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest

from drivers.camera import http, onvif, rtsp, rtsp_url
from drivers.camera.http import (
    AuthenticationError,
    DigestChallenge,
    DigestSession,
    ProtocolError,
    Response,
    ResponseParser,
    digest_authorization,
    digest_response,
    parse_challenges,
    select_digest,
)
from drivers.camera.profile import parse_version
from drivers.profiles import load_profile
from wire.errors import DocumentError

# --- WS-Security UsernameToken ----------------------------------------------------------------

NONCE = bytes(range(16))
CREATED = "2024-05-01T12:00:00Z"


def test_password_digest_is_base64_sha1_of_nonce_created_password() -> None:
    expected = base64.b64encode(
        hashlib.sha1(NONCE + CREATED.encode("utf-8") + b"s3cret!").digest()
    ).decode()
    assert onvif.password_digest(NONCE, CREATED, "s3cret!") == expected
    # a different nonce, time or password gives another digest
    assert onvif.password_digest(NONCE[::-1], CREATED, "s3cret!") != expected
    assert onvif.password_digest(NONCE, "2024-05-01T12:00:01Z", "s3cret!") != expected


def test_username_token_bytes() -> None:
    digest = base64.b64encode(hashlib.sha1(NONCE + CREATED.encode() + b"pw").digest()).decode()
    token = onvif.username_token("ad<min>", "pw", NONCE, CREATED)
    assert token == (
        '<wsse:Security xmlns:wsse="http://docs.oasis-open.org/wss/2004/01/'
        'oasis-200401-wss-wssecurity-secext-1.0.xsd" xmlns:wsu="http://docs.oasis-open.org/wss/'
        '2004/01/oasis-200401-wss-wssecurity-utility-1.0.xsd" env:mustUnderstand="true">'
        "<wsse:UsernameToken><wsse:Username>ad&lt;min&gt;</wsse:Username>"
        '<wsse:Password Type="http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-'
        f'username-token-profile-1.0#PasswordDigest">{digest}</wsse:Password>'
        '<wsse:Nonce EncodingType="http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-'
        'soap-message-security-1.0#Base64Binary">AAECAwQFBgcICQoLDA0ODw==</wsse:Nonce>'
        "<wsu:Created>2024-05-01T12:00:00Z</wsu:Created></wsse:UsernameToken></wsse:Security>"
    )


def test_soap_request_bytes() -> None:
    assert onvif.request(onvif.GET_DEVICE_INFORMATION) == (
        b'<?xml version="1.0" encoding="UTF-8"?>'
        b'<env:Envelope xmlns:env="http://www.w3.org/2003/05/soap-envelope" '
        b'xmlns:tds="http://www.onvif.org/ver10/device/wsdl">'
        b"<env:Body><tds:GetDeviceInformation/></env:Body></env:Envelope>"
    )
    secured = onvif.request(onvif.GET_SYSTEM_DATE_AND_TIME, "<wsse:Security/>")
    assert secured.endswith(
        b"<env:Header><wsse:Security/></env:Header>"
        b"<env:Body><tds:GetSystemDateAndTime/></env:Body></env:Envelope>"
    )
    assert onvif.content_type("GetDeviceInformation") == (
        "application/soap+xml; charset=utf-8; "
        'action="http://www.onvif.org/ver10/device/wsdl/GetDeviceInformation"'
    )
    with pytest.raises(ValueError, match="unknown ONVIF action"):
        onvif.request("SystemReboot")


def test_whole_http_request_bytes() -> None:
    body = onvif.request(onvif.GET_DEVICE_INFORMATION)
    request = http.format_request(
        "POST",
        "/onvif/device_service",
        [("Host", http.host_header("fd00::30", 8080, 80)), ("Connection", "close")],
        body,
    )
    assert request == (
        b"POST /onvif/device_service HTTP/1.1\r\n"
        b"Host: [fd00::30]:8080\r\n"
        b"Connection: close\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    assert http.host_header("cam.local", 80, 80) == "cam.local"
    with pytest.raises(ValueError, match="invalid header"):
        http.format_request("GET", "/", [("X", "a\r\nInjected: 1")])


# --- ONVIF answers ----------------------------------------------------------------------------

ENVELOPE = (
    '<?xml version="1.0" encoding="UTF-8"?>'
    '<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope" '
    'xmlns:tds="http://www.onvif.org/ver10/device/wsdl" '
    'xmlns:tt="http://www.onvif.org/ver10/schema" xmlns:ter="http://www.onvif.org/ver10/error">'
    "<s:Body>{}</s:Body></s:Envelope>"
)
DEVICE_INFORMATION = ENVELOPE.format(
    "<tds:GetDeviceInformationResponse><tds:Manufacturer>Acme</tds:Manufacturer>"
    "<tds:Model>DS-2CD</tds:Model><tds:FirmwareVersion> V5.7.3 build 220715 </tds:FirmwareVersion>"
    "<tds:SerialNumber>SN1</tds:SerialNumber><tds:HardwareId>88</tds:HardwareId>"
    "</tds:GetDeviceInformationResponse>"
).encode()


def date_time(body: str) -> bytes:
    return ENVELOPE.format(
        "<tds:GetSystemDateAndTimeResponse><tds:SystemDateAndTime>"
        f"{body}</tds:SystemDateAndTime></tds:GetSystemDateAndTimeResponse>"
    ).encode()


UTC = (
    "<tt:UTCDateTime><tt:Time><tt:Hour>23</tt:Hour><tt:Minute>59</tt:Minute>"
    "<tt:Second>58</tt:Second></tt:Time><tt:Date><tt:Year>2024</tt:Year><tt:Month>2</tt:Month>"
    "<tt:Day>29</tt:Day></tt:Date></tt:UTCDateTime>"
)


def test_device_information() -> None:
    info = onvif.parse_device_information(DEVICE_INFORMATION)
    assert info == onvif.DeviceInformation("Acme", "DS-2CD", "V5.7.3 build 220715", "SN1", "88")
    partial = ENVELOPE.format(
        "<tds:GetDeviceInformationResponse><tds:Model>X</tds:Model>"
        "</tds:GetDeviceInformationResponse>"
    ).encode()
    assert onvif.parse_device_information(partial).serial_number is None


def test_system_date_and_time() -> None:
    answer = onvif.parse_system_date_and_time(
        date_time(
            "<tt:DateTimeType>NTP</tt:DateTimeType><tt:DaylightSavings>true</tt:DaylightSavings>"
            f"<tt:TimeZone><tt:TZ>CET-1CEST,M3.5.0,M10.5.0/3</tt:TZ></tt:TimeZone>{UTC}"
        )
    )
    assert answer.date_time_type == "NTP"
    assert answer.daylight_savings is True
    assert answer.time_zone == "CET-1CEST,M3.5.0,M10.5.0/3"
    assert answer.utc is not None and answer.utc.isoformat() == "2024-02-29T23:59:58+00:00"
    bare = onvif.parse_system_date_and_time(date_time("<tt:DateTimeType>Manual</tt:DateTimeType>"))
    assert bare.utc is None and bare.date_time_type == "Manual"
    impossible = UTC.replace("<tt:Day>29</tt:Day>", "<tt:Day>30</tt:Day>")
    with pytest.raises(onvif.OnvifResponseError, match="UTCDateTime: impossible date"):
        onvif.parse_system_date_and_time(date_time(impossible))
    missing = UTC.replace("<tt:Hour>23</tt:Hour>", "")
    with pytest.raises(onvif.OnvifResponseError, match="Time/Hour missing"):
        onvif.parse_system_date_and_time(date_time(missing))


def test_not_authorized_fault_gives_a_clear_error() -> None:
    fault = ENVELOPE.format(
        "<s:Fault><s:Code><s:Value>s:Sender</s:Value><s:Subcode><s:Value>ter:NotAuthorized"
        "</s:Value></s:Subcode></s:Code><s:Reason><s:Text xml:lang='en'>Sender not authorized"
        "</s:Text></s:Reason></s:Fault>"
    ).encode()
    with pytest.raises(onvif.OnvifFault) as caught:
        onvif.parse_device_information(fault)
    assert caught.value.not_authorized
    assert caught.value.code == "Sender"
    assert str(caught.value) == "camera refused the credentials (ONVIF NotAuthorized)"
    with pytest.raises(onvif.OnvifFault, match="NotAuthorized"):
        onvif.check_http_status(400, "Bad Request", fault, "/onvif/device_service")


def test_other_fault_names_code_and_reason() -> None:
    fault = ENVELOPE.format(
        "<s:Fault><s:Code><s:Value>s:Receiver</s:Value><s:Subcode><s:Value>ter:Action"
        "</s:Value><s:Subcode><s:Value>ter:TooManyUsers</s:Value></s:Subcode></s:Subcode>"
        "</s:Code><s:Reason><s:Text>busy</s:Text></s:Reason></s:Fault>"
    ).encode()
    with pytest.raises(onvif.OnvifFault) as caught:
        onvif.body_of(fault)
    assert caught.value.subcodes == ("Action", "TooManyUsers")
    assert str(caught.value) == "camera answered with SOAP fault Receiver/Action/TooManyUsers: busy"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (DEVICE_INFORMATION[: len(DEVICE_INFORMATION) // 2], "not well-formed XML"),
        (b"", "empty answer"),
        (b"<html><body>Login</body></html", "not well-formed XML"),
        (b"<html><body>Login</body></html>", "expected a SOAP 1.2 Envelope, got html"),
        (
            DEVICE_INFORMATION.replace(
                b"http://www.w3.org/2003/05/soap-envelope",
                b"http://schemas.xmlsoap.org/soap/envelope/",
            ),
            "SOAP 1.1 envelope",
        ),
        (
            DEVICE_INFORMATION.replace(
                b"http://www.onvif.org/ver10/device/wsdl", b"http://example.com/other"
            ),
            "expected GetDeviceInformationResponse",
        ),
        (ENVELOPE.format("").encode(), "without a Body"),
        (
            b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
            b'<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]><lolz>&lol2;</lolz>',
            "DOCTYPE or entity declaration",
        ),
        (b"<a>&undefined;</a>", "undefined entity"),
    ],
)
def test_bad_answers_give_clear_errors(body: bytes, message: str) -> None:
    with pytest.raises(onvif.OnvifResponseError, match=message):
        onvif.parse_device_information(body)


def test_http_status_errors() -> None:
    onvif.check_http_status(200, "OK", b"", "/x")
    with pytest.raises(onvif.OnvifResponseError, match="HTTP 404 Not Found: no ONVIF device"):
        onvif.check_http_status(404, "Not Found", b"<html/>", "/onvif/device_service")
    with pytest.raises(onvif.OnvifResponseError, match=r"^HTTP 500 Internal Server Error$"):
        onvif.check_http_status(500, "Internal Server Error", b"oops", "/x")


# --- HTTP and RTSP framing --------------------------------------------------------------------

ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/soap+xml\r\nX-Folded: a\r\n b\r\n"
    b"Content-Length: 5\r\n\r\nhello"
)


def test_response_fed_one_byte_at_a_time() -> None:
    parser = ResponseParser()
    for i in range(len(ANSWER) - 1):
        parser.feed(ANSWER[i : i + 1])
        assert parser.next_response() is None
    parser.feed(ANSWER[-1:])
    response = parser.next_response()
    assert response == Response(
        "HTTP/1.1",
        200,
        "OK",
        (("Content-Type", "application/soap+xml"), ("X-Folded", "a b"), ("Content-Length", "5")),
        b"hello",
    )
    assert response.get("content-type") == "application/soap+xml"
    assert parser.idle


def test_chunked_interim_and_close_delimited_bodies() -> None:
    parser = ResponseParser()
    parser.feed(
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"4;ext=1\r\nWiki\r\n5\r\npedia\r\n0\r\nTrailer: x\r\n\r\n"
    )
    response = parser.next_response()
    assert response is not None and response.status == 200 and response.body == b"Wikipedia"
    parser.feed(b"HTTP/1.0 200 OK\r\nServer: old\r\n\r\nuntil the end")
    assert parser.next_response() is None
    assert parser.end_of_stream().body == b"until the end"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "closed after 5 of 10 body"),
        (b"HTTP/1.1 200 OK\r\nContent-Le", "in the middle of an answer's header"),
        (b"", "without an answer"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nWi", "chunked body"),
    ],
)
def test_truncated_answers(data: bytes, message: str) -> None:
    parser = ResponseParser()
    parser.feed(data)
    assert parser.next_response() is None
    with pytest.raises(ProtocolError, match=message):
        parser.end_of_stream()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "not an HTTP answer"),
        (b"RTSP/1.0 200 OK\r\n\r\n", "not an HTTP answer"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "invalid Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n", "more than"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "unsupported Transfer-Encoding"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "invalid chunk size"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 40_000, "header longer than"),
    ],
)
def test_malformed_answers(data: bytes, message: str) -> None:
    parser = ResponseParser()
    parser.feed(data)
    with pytest.raises(ProtocolError, match=message):
        parser.next_response()


def test_rtsp_framing() -> None:
    parser = ResponseParser("RTSP")
    parser.feed(
        b"RTSP/1.0 200 OK\r\nCSeq: 1\r\nPublic: OPTIONS, DESCRIBE\r\n\r\n"
        b"RTSP/1.0 200 OK\r\nCSeq: 2\r\nContent-Type: application/sdp\r\nContent-Length: 4\r\n"
        b"\r\nv=0\n"
    )
    first, second = parser.next_response(), parser.next_response()
    assert first is not None and first.body == b"" and first.get("cseq") == "1"
    assert second is not None and second.body == b"v=0\n"
    rtsp.check_cseq(second, 2)
    with pytest.raises(ProtocolError, match="CSeq '2', expected 3"):
        rtsp.check_cseq(second, 3)


def test_rtsp_request_bytes() -> None:
    assert rtsp.options("rtsp://cam/s", 1) == (
        b"OPTIONS rtsp://cam/s RTSP/1.0\r\nCSeq: 1\r\nUser-Agent: campus-iot\r\n\r\n"
    )
    assert rtsp.describe("rtsp://[fd00::30]:8554/s", 2, 'Digest username="u"') == (
        b"DESCRIBE rtsp://[fd00::30]:8554/s RTSP/1.0\r\nCSeq: 2\r\nAccept: application/sdp\r\n"
        b'Authorization: Digest username="u"\r\nUser-Agent: campus-iot\r\n\r\n'
    )


def test_rtsp_url() -> None:
    target = rtsp_url.parse_url("rtsp://view%40er:p%3Ass@[fd00::30]:8554/Streaming/101?tr=1")
    assert target == rtsp_url.RtspTarget(
        "fd00::30", 8554, "rtsp://[fd00::30]:8554/Streaming/101?tr=1", "view@er", "p:ss"
    )
    assert rtsp_url.parse_url("rtsp://cam.local").url == "rtsp://cam.local/"
    assert rtsp_url.parse_url("RTSP://10.0.0.5/s").port == 554
    with pytest.raises(ValueError, match="not an rtsp"):
        rtsp_url.parse_url("http://cam/s")


def test_sdp_track_count() -> None:
    sdp = (
        b"v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=x\r\nt=0 0\r\nm=video 0 RTP/AVP 96\r\n"
        b"a=rtpmap:96 H265/90000\r\nm=audio 0 RTP/AVP 8\r\nm=application 0 RTP/AVP 107\r\n"
    )
    assert rtsp.count_tracks(sdp) == 3
    assert rtsp.count_tracks(b"v=0\ns=no media\n") == 0
    with pytest.raises(ProtocolError, match="not an SDP description"):
        rtsp.count_tracks(b"<html>")


# --- digest auth ------------------------------------------------------------------------------

RFC2617_CHALLENGE = (
    'Digest realm="testrealm@host.com", qop="auth,auth-int", '
    'nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", opaque="5ccc069c403ebaf9f0171e9517f40e41"'
)


def test_rfc2617_worked_example() -> None:
    challenge = select_digest(parse_challenges([RFC2617_CHALLENGE]))
    assert challenge == DigestChallenge(
        realm="testrealm@host.com",
        nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093",
        qop=("auth", "auth-int"),
        opaque="5ccc069c403ebaf9f0171e9517f40e41",
    )
    args = (challenge, "Mufasa", "Circle Of Life", "GET", "/dir/index.html")
    assert digest_response(*args, nc=1, cnonce="0a4f113b") == "6629fae49393a05397450978507c4ef1"
    assert digest_authorization(*args, nc=1, cnonce="0a4f113b") == (
        'Digest username="Mufasa", realm="testrealm@host.com", '
        'nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", uri="/dir/index.html", qop=auth, '
        'nc=00000001, cnonce="0a4f113b", response="6629fae49393a05397450978507c4ef1", '
        'opaque="5ccc069c403ebaf9f0171e9517f40e41"'
    )


@pytest.mark.parametrize(
    ("algorithm", "expected"),
    [
        ("MD5", "8ca523f5e9506fed4657c9700eebdbec"),
        ("SHA-256", "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"),
    ],
)
def test_rfc7616_examples(algorithm: str, expected: str) -> None:
    header = (
        f'Digest realm="http-auth@example.org", qop="auth, auth-int", algorithm={algorithm}, '
        'nonce="7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v", '
        'opaque="FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS"'
    )
    challenge = select_digest(parse_challenges([header]))
    assert challenge is not None and challenge.algorithm == algorithm
    response = digest_response(
        challenge,
        "Mufasa",
        "Circle of Life",
        "GET",
        "/dir/index.html",
        nc=1,
        cnonce="f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ",
    )
    assert response == expected


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def test_rtsp_style_digest_without_qop_and_sess() -> None:
    challenge = DigestChallenge(realm="IP Camera", nonce="abc")
    url = "rtsp://10.0.0.5:554/stream1"
    ha1 = md5("admin:IP Camera:pw")
    assert digest_response(challenge, "admin", "pw", "DESCRIBE", url) == md5(
        f"{ha1}:abc:{md5(f'DESCRIBE:{url}')}"
    )
    header = digest_authorization(challenge, "admin", "pw", "DESCRIBE", url)
    assert "qop" not in header and "nc=" not in header and "algorithm" not in header
    sess = DigestChallenge(realm="r", nonce="n", qop=("auth",), algorithm="MD5-sess")
    sess_ha1 = md5(f"{md5('u:r:p')}:n:c")
    assert digest_response(sess, "u", "p", "GET", "/", nc=2, cnonce="c") == md5(
        f"{sess_ha1}:n:00000002:c:auth:{md5('GET:/')}"
    )


def test_challenge_parsing() -> None:
    challenges = parse_challenges(
        ['Basic realm="cam", Digest realm="a \\"quoted\\" realm", nonce=xyz, stale=TRUE', "Bearer"]
    )
    assert [c.scheme for c in challenges] == ["basic", "digest", "bearer"]
    digest = select_digest(challenges)
    assert digest is not None and digest.realm == 'a "quoted" realm' and digest.stale
    assert parse_challenges(["Negotiate abc==, Digest realm=r, nonce=n"])[1].params == {
        "realm": "r",
        "nonce": "n",
    }
    # auth-int only, or an unknown hash: nothing this client can answer
    assert select_digest(parse_challenges(['Digest realm=r, nonce=n, qop="auth-int"'])) is None
    assert select_digest(parse_challenges(["Digest realm=r, nonce=n, algorithm=SHA-512"])) is None
    with pytest.raises(ProtocolError, match="malformed"):
        parse_challenges(['Digest realm="unterminated'])
    with pytest.raises(ProtocolError, match="without realm or nonce"):
        select_digest(parse_challenges(["Digest realm=r"]))


def unauthorized(*challenges: str) -> Response:
    return Response(
        "HTTP/1.1", 401, "Unauthorized", tuple(("WWW-Authenticate", c) for c in challenges)
    )


def test_digest_session_retries_once_then_names_wrong_credentials() -> None:
    session = DigestSession("Mufasa", "Circle Of Life", cnonce=lambda: "0a4f113b")
    session.start()
    assert session.authorization("GET", "/dir/index.html") is None
    session.challenged(unauthorized(RFC2617_CHALLENGE), sent=False)
    first = session.authorization("GET", "/dir/index.html")
    assert first is not None and 'response="6629fae49393a05397450978507c4ef1"' in first
    second = session.authorization("GET", "/dir/index.html")
    assert second is not None and "nc=00000002" in second  # the nonce is reused, counted
    with pytest.raises(AuthenticationError, match=r"refused the credentials \(HTTP 401"):
        session.challenged(unauthorized(RFC2617_CHALLENGE), sent=True)
    # next exchange: a cached nonce refused is a reason to retry once, not a wrong password
    session.challenged(unauthorized(RFC2617_CHALLENGE), sent=False)
    session.start()
    session.challenged(unauthorized(RFC2617_CHALLENGE.replace("dcd98", "00000")), sent=True)
    assert session.challenge is not None and session.challenge.nonce.startswith("00000")
    # a stale nonce is never a wrong password
    session.challenged(unauthorized(RFC2617_CHALLENGE + ", stale=true"), sent=True)


def test_digest_session_refusals() -> None:
    with pytest.raises(AuthenticationError, match="set username and password"):
        DigestSession(None, None).challenged(unauthorized(RFC2617_CHALLENGE), sent=False)
    with pytest.raises(AuthenticationError, match="only Basic authentication"):
        DigestSession("u", "p").challenged(unauthorized('Basic realm="cam"'), sent=False)
    with pytest.raises(AuthenticationError, match="unsupported authentication"):
        DigestSession("u", "p", protocol="RTSP").challenged(unauthorized("NTLM"), sent=False)


# --- firmware versions ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "version"),
    [
        ("V5.7.3 build 220715", (5, 7, 3)),
        ("5.6", (5, 6)),
        ("5.6.0", (5, 6)),
        ("v5.6.0.0", (5, 6)),
        ("2.800.0000000.18.R, Build Date: 2019-11-20", (2, 800, 0, 18)),
        ("IPC_G6100 10.12.182", (10, 12, 182)),
        ("firmware 7", (7,)),
        ("unknown", None),
    ],
)
def test_parse_version(text: str, version: tuple[int, ...] | None) -> None:
    assert parse_version(text) == version


def test_version_order() -> None:
    def v(text: str) -> tuple[int, ...]:
        found = parse_version(text)
        assert found is not None
        return found

    assert v("V5.5.82 build 190220") < v("5.6.0") <= v("V5.6 build 1") < v("5.10.0")


# --- camera profiles --------------------------------------------------------------------------

HEAD = "vendor: Acme\nmodel: C1\nprotocol: onvif\nkind: camera\nsource: ONVIF Core\n"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "acme-c1.yaml"
    path.write_text(HEAD + text)
    return path


def test_shipped_camera_profile_loads() -> None:
    profile = load_profile(
        Path(__file__).parents[1] / "firmware-profiles/generic-onvif-camera.yaml"
    )
    names = {p.name for p in profile.points}
    assert {"rtsp_ok", "rtsp_response_ms", "clock_drift_s", "firmware_outdated"} <= names
    assert profile.kind == "camera"
    drift = profile.point("clock_drift_s")
    assert drift.alarm is not None and drift.alarm.high == 5


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("points:\n  - name: x\n    source: onvif.snapshot\n", "points.0.source: Input should be"),
        (
            "points:\n  - name: x\n    source: rtsp.ok\n    type: float\n",
            "source rtsp.ok gives bool, not float",
        ),
        (
            "points:\n  - name: x\n    source: firmware.outdated\n    type: bool\n",
            "firmware.outdated needs firmware_min",
        ),
        (
            "firmware_min: latest\npoints:\n  - name: x\n    source: onvif.ok\n    type: bool\n",
            "firmware_min 'latest' has no version number",
        ),
        (
            "firmware_min: '5.8'\nfirmware_max: '5.6'\n"
            "points:\n  - name: x\n    source: onvif.ok\n    type: bool\n",
            "firmware_min 5.8 is above 5.6",
        ),
        (
            "points:\n  - name: a\n    source: onvif.ok\n    type: bool\n"
            "  - name: b\n    source: onvif.ok\n    type: bool\n",
            "both read onvif.ok",
        ),
        (
            "points:\n  - name: a\n    source: onvif.ok\n    type: bool\n"
            "commands:\n  - name: reboot\n",
            "health only",
        ),
    ],
)
def test_bad_camera_profiles_fail_at_load(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(DocumentError, match=message):
        load_profile(write(tmp_path, text))
