"""The camera health driver against the simulated camera over real loopback sockets (IPv4 and
::1), through the driver factory, and curl as an independent HTTP/SOAP client of the simulator.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import hashlib
import secrets
import shutil
import socket
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from drivers.base import PollResult
from drivers.camera.connection import OnvifConnection
from drivers.camera.driver import CameraDriver, CameraPool
from drivers.camera.profile import CameraProfile
from drivers.errors import DeviceTimeout, DeviceUnreachable
from drivers.profiles import ProfileLibrary, default_profiles_dir
from drivers.registry import DriverFactory
from simulator.camera_server import (
    OLD_FIRMWARE,
    RunningCamera,
    SimulatedCamera,
    serve_camera,
)
from tests.tls_certs import make_test_pki

PASSWORD = "Circle Of Life"
TDS = "http://www.onvif.org/ver10/device/wsdl"


@pytest.fixture(scope="module")
def profile() -> CameraProfile:
    found = ProfileLibrary.load(default_profiles_dir()).get("generic-onvif-camera")
    assert isinstance(found, CameraProfile)
    return found


def connect(cam: RunningCamera, **overrides: Any) -> OnvifConnection:
    settings: dict[str, Any] = {
        "type": "onvif",
        "host": cam.spec.host,
        "port": cam.http_port,
        "username": "admin",
        "password": PASSWORD,
        "rtsp_url": cam.rtsp_url,
        "timeout_s": 1.0,
        **overrides,
    }
    return OnvifConnection.model_validate(settings)


@contextlib.asynccontextmanager
async def camera(**spec: Any) -> AsyncIterator[RunningCamera]:
    settings: dict[str, Any] = {"id": "cam-a101", "password": PASSWORD, **spec}
    async with serve_camera(SimulatedCamera.model_validate(settings)) as cam:
        yield cam


async def read(profile: CameraProfile, cam: RunningCamera, **overrides: Any) -> PollResult:
    driver = CameraDriver(profile, connect(cam, **overrides), CameraPool())
    try:
        return await driver.read()
    finally:
        await driver.close()


def rejected_with(result: PollResult, text: str) -> set[str]:
    return {name for name, why in result.rejected if text in why}


async def client_closed(cam: RunningCamera) -> bool:
    for _ in range(100):
        if cam.rtsp_closed == cam.rtsp_connections:
            return True
        await asyncio.sleep(0.01)
    return False


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_every_point_from_a_healthy_camera(profile: CameraProfile, host: str) -> None:
    async with camera(host=host) as cam:
        result = await read(profile, cam)
        assert result.rejected == []
        values = dict(result.values)
        assert set(values) == {p.name for p in profile.points}
        assert values["manufacturer"] == "CampusSim"
        assert values["model"] == "CAM-200"
        assert values["firmware"] == "V5.7.3 build 220715"
        assert values["serial"] == "CS200-0001"
        assert values["clock_mode"] == "NTP"
        assert values["onvif_ok"] is True and values["rtsp_ok"] is True
        assert values["rtsp_status"] == "200 OK" and values["rtsp_tracks"] == 2
        assert values["firmware_outdated"] is False and values["firmware_known_good"] is True
        assert abs(float(values["clock_drift_s"])) <= 1.0  # the camera's clock is to the second
        assert 0 < float(values["onvif_response_ms"]) < 1000
        assert 0 < float(values["rtsp_response_ms"]) < 1000
        # no media: the probe stops at DESCRIBE and closes its connection at once
        assert set(cam.rtsp_methods) == {"OPTIONS", "DESCRIBE"}
        assert await client_closed(cam)
        assert cam.soap_actions == {"GetSystemDateAndTime": 1, "GetDeviceInformation": 1}


async def test_built_by_the_driver_factory(profile: CameraProfile) -> None:
    factory = DriverFactory()
    async with camera() as cam:
        driver = factory.build(profile, connect(cam))
        assert isinstance(driver, CameraDriver)
        assert driver.bus == f"onvif:127.0.0.1:{cam.http_port}"
        await driver.open()
        result = await driver.read()
        assert dict(result.values)["rtsp_ok"] is True
        assert dict(result.values)["serial"] == "CS200-0001"
        await driver.close()
    await factory.close()


async def test_points_with_a_poll_interval_are_read_when_due(profile: CameraProfile) -> None:
    async with camera() as cam:
        driver = CameraDriver(profile, connect(cam), CameraPool())
        first, second = await driver.read(), await driver.read()
        assert "serial" in dict(first.values)
        assert "serial" not in dict(second.values) and second.rejected == []
        assert {"clock_drift_s", "onvif_ok", "rtsp_ok"} <= set(dict(second.values))
        # GetDeviceInformation once (hourly points); the clock on every poll
        assert cam.soap_actions == {"GetSystemDateAndTime": 2, "GetDeviceInformation": 1}


async def test_wrong_password(profile: CameraProfile) -> None:
    async with camera() as cam:
        result = await read(profile, cam, password="Circle Of Lies")
        values = dict(result.values)
        assert values["onvif_ok"] is False
        assert rejected_with(result, "camera refused the credentials (ONVIF NotAuthorized)") == {
            "manufacturer",
            "model",
            "firmware",
            "serial",
            "firmware_outdated",
            "firmware_known_good",
        }
        # the clock is readable without credentials: it is still reported
        assert abs(float(values["clock_drift_s"])) <= 1.0
        assert values["rtsp_ok"] is False and values["rtsp_status"] == "401 Unauthorized"
        assert rejected_with(result, "camera refused the credentials (RTSP 401") == {
            "rtsp_response_ms",
            "rtsp_tracks",
        }


async def test_no_credentials_configured(profile: CameraProfile) -> None:
    async with camera() as cam:
        result = await read(profile, cam, username=None, password=None)
        assert "serial" in rejected_with(result, "set username and password in the connection")
        assert "rtsp_tracks" in rejected_with(result, "set username and password")


async def test_camera_without_a_password(profile: CameraProfile) -> None:
    async with camera(password=None) as cam:
        result = await read(profile, cam, username=None, password=None)
        assert result.rejected == []
        assert dict(result.values)["rtsp_tracks"] == 2


@pytest.mark.parametrize("offset", [-7200.0, 3600.0])
async def test_wrong_clock(profile: CameraProfile, offset: float) -> None:
    async with camera(modes=["wrong_clock"], clock_offset_s=offset, ntp=False) as cam:
        result = await read(profile, cam)
        values = dict(result.values)
        assert abs(float(values["clock_drift_s"]) - offset) <= 1.0
        assert values["clock_mode"] == "Manual"
        # the token's Created was set on the camera's clock, so it was accepted
        assert values["serial"] == "CS200-0001" and cam.onvif_auth_failures == 0


async def test_clock_that_needs_a_token(profile: CameraProfile) -> None:
    async with camera(modes=["strict_auth"]) as cam:
        driver = CameraDriver(profile, connect(cam), CameraPool())
        result = await driver.read()
        assert result.rejected == [] and dict(result.values)["onvif_ok"] is True
        assert cam.onvif_auth_failures == 1  # the first unauthenticated try; the driver then learns
        await driver.read()
        assert cam.onvif_auth_failures == 1


async def test_old_firmware_is_flagged(profile: CameraProfile) -> None:
    async with camera(modes=["old_firmware"]) as cam:
        values = dict((await read(profile, cam)).values)
        assert values["firmware"] == OLD_FIRMWARE
        assert values["firmware_outdated"] is True and values["firmware_known_good"] is False


async def test_firmware_newer_than_tested(profile: CameraProfile) -> None:
    capped = profile.model_copy(update={"firmware_max": "5.7.0"})
    async with camera() as cam:
        values = dict((await read(capped, cam)).values)
        assert values["firmware_outdated"] is False and values["firmware_known_good"] is False


async def test_silent_rtsp_is_a_reading_not_a_crash(profile: CameraProfile) -> None:
    async with camera(modes=["silent_rtsp"]) as cam:
        started = time.monotonic()
        result = await read(profile, cam, timeout_s=0.5)
        elapsed = time.monotonic() - started
        assert 0.45 <= elapsed < 1.0
        values = dict(result.values)
        assert values["rtsp_ok"] is False and values["rtsp_status"] == "timeout"
        assert rejected_with(result, "no answer in time") == {"rtsp_response_ms", "rtsp_tracks"}
        assert values["onvif_ok"] is True and values["serial"] == "CS200-0001"
        assert await client_closed(cam)


async def test_truncated_soap(profile: CameraProfile) -> None:
    async with camera(modes=["truncated_soap"]) as cam:
        result = await read(profile, cam)
        values = dict(result.values)
        assert values["onvif_ok"] is False
        bad = rejected_with(result, f"ONVIF 127.0.0.1:{cam.http_port}: answer is not well-formed")
        assert {"serial", "clock_drift_s", "onvif_response_ms"} <= bad
        assert values["rtsp_ok"] is True and values["rtsp_tracks"] == 2


async def test_http_digest(profile: CameraProfile) -> None:
    async with camera(modes=["http_digest"]) as cam:
        driver = CameraDriver(profile, connect(cam), CameraPool())
        first = await driver.read()
        assert first.rejected == [] and dict(first.values)["serial"] == "CS200-0001"
        assert cam.onvif_auth_failures == 1  # one 401 to learn the nonce
        second = await driver.read()
        assert dict(second.values)["onvif_ok"] is True
        assert cam.onvif_auth_failures == 1  # the nonce is reused with a higher nc
        refused = await read(profile, cam, password="nope")
        assert "onvif_response_ms" in rejected_with(
            refused, "camera refused the credentials (HTTP 401 Unauthorized, Digest)"
        )


async def test_onvif_disabled_but_stream_fine(profile: CameraProfile) -> None:
    async with camera(modes=["onvif_disabled"]) as cam:
        result = await read(profile, cam)
        assert "serial" in rejected_with(result, "HTTP 404 Not Found")
        assert "clock_drift_s" in rejected_with(result, "is ONVIF enabled on the camera?")
        values = dict(result.values)
        assert values["onvif_ok"] is False and values["rtsp_ok"] is True


def closed_port(host: str = "127.0.0.1") -> tuple[socket.socket, int]:
    """A port bound but not listening: connections to it are refused."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.bind((host, 0))
    return sock, sock.getsockname()[1]


async def test_rtsp_refused_onvif_fine(profile: CameraProfile) -> None:
    placeholder, port = closed_port()
    with placeholder:
        async with camera() as cam:
            result = await read(profile, cam, rtsp_url=f"rtsp://127.0.0.1:{port}/stream1")
    values = dict(result.values)
    assert values["rtsp_ok"] is False and values["rtsp_status"] == "connection refused"
    assert values["onvif_ok"] is True and values["serial"] == "CS200-0001"


async def test_wrong_stream_path(profile: CameraProfile) -> None:
    async with camera() as cam:
        result = await read(profile, cam, rtsp_url=cam.rtsp_url.replace("stream1", "stream9"))
        values = dict(result.values)
        assert values["rtsp_ok"] is False and values["rtsp_status"] == "404 Not Found"
        assert "rtsp_tracks" in rejected_with(result, "DESCRIBE answered 404 Not Found")


async def test_rtsp_credentials_from_the_url(profile: CameraProfile) -> None:
    async with camera() as cam:
        url = cam.rtsp_url.replace("rtsp://", "rtsp://admin:Circle%20Of%20Life@")
        result = await read(profile, cam, password="onvif-password", rtsp_url=url)
        assert dict(result.values)["rtsp_ok"] is True
        assert "serial" in rejected_with(result, "NotAuthorized")


async def test_no_rtsp_url(profile: CameraProfile) -> None:
    async with camera() as cam:
        result = await read(profile, cam, rtsp_url=None)
        assert rejected_with(result, "no rtsp_url in the connection") == {
            "rtsp_ok",
            "rtsp_response_ms",
            "rtsp_tracks",
            "rtsp_status",
        }
        assert cam.rtsp_connections == 0 and dict(result.values)["onvif_ok"] is True


async def test_unreachable_camera_raises_and_comes_back(profile: CameraProfile) -> None:
    async with camera(modes=["offline"]) as cam:
        driver = CameraDriver(profile, connect(cam), CameraPool())
        with pytest.raises(DeviceUnreachable) as caught:
            await driver.read()
        message = str(caught.value)
        assert message.startswith(f"127.0.0.1:{cam.http_port}: camera unreachable")
        assert f"ONVIF 127.0.0.1:{cam.http_port}: cannot connect: connection refused" in message
        assert f"RTSP 127.0.0.1:{cam.rtsp_port}: cannot connect" in message
        await cam.set_offline(False)
        assert dict((await driver.read()).values)["rtsp_ok"] is True
        await cam.set_offline(True)
        with pytest.raises(DeviceUnreachable):
            await driver.read()


async def test_camera_that_accepts_and_never_answers(profile: CameraProfile) -> None:
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await reader.read()  # until the driver gives up and closes

    server = await asyncio.start_server(hold, "::1", 0)
    port = server.sockets[0].getsockname()[1]
    connection = OnvifConnection(
        type="onvif", host="::1", port=port, rtsp_url=f"rtsp://[::1]:{port}/s", timeout_s=0.3
    )
    driver = CameraDriver(profile, connection, CameraPool())
    async with server:
        with pytest.raises(DeviceTimeout, match=r"\[::1\]:\d+: camera does not answer"):
            await driver.read()
    assert len(held) == 2  # ONVIF and RTSP both connected, side by side


async def test_https_with_and_without_verification(
    profile: CameraProfile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pki = make_test_pki(tmp_path / "pki")
    async with camera(tls_cert=pki.server.cert, tls_key=pki.server.key) as cam:
        assert cam.onvif_url.startswith("https://")
        trusting = await read(profile, cam, https=True, verify_tls=False)
        assert dict(trusting.values)["serial"] == "CS200-0001"
        verifying = await read(profile, cam, https=True)
        assert "serial" in rejected_with(verifying, "certificate verify failed")
        monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))  # the camera's CA, trusted
        trusted = await read(profile, cam, https=True)
        assert dict(trusted.values)["serial"] == "CS200-0001"


# --- curl, an independent HTTP client, against the simulator ---------------------------------


def soap_with_token(action: str, username: str, password: str, now: float) -> str:
    """A request written by hand (not with the driver's codec), token per OASIS's formula."""
    nonce = secrets.token_bytes(20)
    created = dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    digest = base64.b64encode(
        hashlib.sha1(nonce + created.encode() + password.encode()).digest()
    ).decode()
    wss = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss"
    return f"""<?xml version="1.0" encoding="utf-8"?>
<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope">
  <s:Header>
    <Security xmlns="{wss}-wssecurity-secext-1.0.xsd">
      <UsernameToken>
        <Username>{username}</Username>
        <Password Type="{wss}-username-token-profile-1.0#PasswordDigest">{digest}</Password>
        <Nonce EncodingType="{wss}-soap-message-security-1.0#Base64Binary">{
        base64.b64encode(nonce).decode()
    }</Nonce>
        <Created xmlns="{wss}-wssecurity-utility-1.0.xsd">{created}</Created>
      </UsernameToken>
    </Security>
  </s:Header>
  <s:Body><{action} xmlns="{TDS}"/></s:Body>
</s:Envelope>
"""


async def curl(tmp_path: Path, *args: str) -> tuple[int, bytes]:
    """(final HTTP status, body) of one curl call; curl runs as its own process."""
    curl_path = shutil.which("curl")
    assert curl_path, (
        "curl is missing: install the Debian package curl (scripts/debian-packages.txt)"
    )
    out = tmp_path / "answer.bin"
    process = await asyncio.create_subprocess_exec(
        curl_path,
        "-s",
        "--max-time",
        "5",
        "-o",
        str(out),
        "-w",
        "%{http_code}",
        *args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    code, err = await process.communicate()
    assert process.returncode == 0, err
    return int(code), out.read_bytes()


async def test_curl_reads_device_information(tmp_path: Path) -> None:
    request = tmp_path / "req.xml"
    post = ["--data-binary", f"@{request}", "-H", "Content-Type: application/soap+xml"]
    async with camera(firmware="V5.8.1 build 240101") as cam:
        request.write_text(soap_with_token("GetDeviceInformation", "admin", PASSWORD, time.time()))
        status, body = await curl(tmp_path, *post, cam.onvif_url)
        assert status == 200
        answer = ET.fromstring(body).find(
            f"{{http://www.w3.org/2003/05/soap-envelope}}Body/{{{TDS}}}GetDeviceInformationResponse"
        )
        assert answer is not None
        assert answer.findtext(f"{{{TDS}}}FirmwareVersion") == "V5.8.1 build 240101"
        assert answer.findtext(f"{{{TDS}}}SerialNumber") == "CS200-0001"

        request.write_text(soap_with_token("GetDeviceInformation", "admin", "wrong", time.time()))
        status, body = await curl(tmp_path, *post, cam.onvif_url)
        assert status == 400
        assert b"ter:NotAuthorized" in body


async def test_curl_http_digest(tmp_path: Path) -> None:
    request = tmp_path / "req.xml"
    request.write_text(
        '<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope"><s:Body>'
        f'<GetSystemDateAndTime xmlns="{TDS}"/></s:Body></s:Envelope>'
    )
    post = ["--data-binary", f"@{request}", "-H", "Content-Type: application/soap+xml"]
    async with camera(modes=["http_digest"]) as cam:
        status, _ = await curl(tmp_path, *post, cam.onvif_url)
        assert status == 401
        status, body = await curl(
            tmp_path, *post, "--digest", "-u", f"admin:{PASSWORD}", cam.onvif_url
        )
        assert status == 200
        assert b"<tt:DateTimeType>NTP</tt:DateTimeType>" in body
        status, _ = await curl(tmp_path, *post, "--digest", "-u", "admin:wrong", cam.onvif_url)
        assert status == 401


async def test_garbage_from_the_camera_is_a_reading(profile: CameraProfile) -> None:
    async def babble(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.write(b"\x00\xff\xfeSSH-2.0-dropbear\r\n\r\nnoise")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(babble, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    connection = OnvifConnection(
        type="onvif", host="127.0.0.1", port=port, rtsp_url=f"rtsp://127.0.0.1:{port}/s"
    )
    async with server:
        result = await CameraDriver(profile, connection, CameraPool()).read()
    values = dict(result.values)
    assert values == {"onvif_ok": False, "rtsp_ok": False, "rtsp_status": "bad answer"}
    assert "serial" in rejected_with(result, "not an HTTP answer")
    assert "rtsp_tracks" in rejected_with(result, "not an RTSP answer")


async def test_rtsp_server_closing_after_its_challenge(profile: CameraProfile) -> None:
    """A server that closes after each 401 and wants qop=auth (RFC 2617 style, as some do)."""
    seen: list[str] = []
    nonce = "dcd98b7102dd2f0e8b11d0f600bfb0c093"

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode()
                method, url = head.split(" ")[:2]
                cseq = head.split("CSeq: ")[1].split("\r\n")[0]
                authorized = "Authorization: Digest" in head
                seen.append(f"{method} {'auth' if authorized else 'anon'}")
                if not authorized:
                    challenge = f'Digest realm="r", nonce="{nonce}", qop="auth"'
                    writer.write(
                        f"RTSP/1.0 401 Unauthorized\r\nCSeq: {cseq}\r\nConnection: close\r\n"
                        f"WWW-Authenticate: {challenge}\r\n\r\n".encode()
                    )
                    await writer.drain()
                    break
                ha1 = hashlib.md5(f"admin:r:{PASSWORD}".encode()).hexdigest()
                ha2 = hashlib.md5(f"{method}:{url}".encode()).hexdigest()
                nc = head.split("nc=")[1].split(",")[0]
                cnonce = head.split('cnonce="')[1].split('"')[0]
                expected = hashlib.md5(
                    f"{ha1}:{nonce}:{nc}:{cnonce}:auth:{ha2}".encode()
                ).hexdigest()
                assert f'response="{expected}"' in head
                body = b"v=0\r\nm=video 0 RTP/AVP 96\r\n" if method == "DESCRIBE" else b""
                head = f"RTSP/1.0 200 OK\r\nCSeq: {cseq}\r\nContent-Length: {len(body)}\r\n\r\n"
                writer.write(head.encode() + body)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, camera(password=None) as cam:
        result = await read(profile, cam, rtsp_url=f"rtsp://127.0.0.1:{port}/live")
    values = dict(result.values)
    assert values["rtsp_ok"] is True and values["rtsp_tracks"] == 1
    assert seen == ["OPTIONS anon", "OPTIONS auth", "DESCRIBE auth"]
