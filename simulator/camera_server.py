"""A simulated security camera: an ONVIF device service over HTTP and an RTSP responder.

Health only, like the driver: the HTTP side answers GetDeviceInformation and
GetSystemDateAndTime (SOAP 1.2), checking the WS-Security PasswordDigest token when a password
is set (and HTTP digest too in mode `http_digest`); the RTSP side answers OPTIONS and DESCRIBE
(digest auth, a two-track SDP) and refuses SETUP/PLAY: no media is ever served. Written apart
from the driver's codec (its own parsing and digest checks) so that tests check one against
the other. Modes show the faults installers meet: `offline`, `wrong_clock`, `silent_rtsp`,
`truncated_soap`, `old_firmware`, `http_digest`, `onvif_disabled`, `strict_auth`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import hashlib
import logging
import re
import secrets
import socket
import ssl
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from wire.models import Id
from wire.net import bare_host, host_port

log = logging.getLogger(__name__)

CameraMode = Literal[
    "offline",  # nothing listens: connections are refused
    "wrong_clock",  # the clock is clock_offset_s off (an hour when that is 0)
    "silent_rtsp",  # RTSP accepts connections and never answers
    "truncated_soap",  # ONVIF answers are cut in the middle of the XML
    "old_firmware",  # reports OLD_FIRMWARE instead of `firmware`
    "http_digest",  # ONVIF also wants HTTP digest auth (401 first)
    "onvif_disabled",  # the web server answers 404 on the ONVIF path
    "strict_auth",  # GetSystemDateAndTime wants a token too (ONVIF lets anyone read it)
]
OLD_FIRMWARE = "V5.4.0 build 180101"
WRONG_CLOCK_S = 3600.0
TOKEN_WINDOW_S = 300.0  # how far a UsernameToken's Created may be from the camera's clock
REALM = "CampusSim camera"

_SOAP = "http://www.w3.org/2003/05/soap-envelope"
_TDS = "http://www.onvif.org/ver10/device/wsdl"
_TT = "http://www.onvif.org/ver10/schema"
_WSSE = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"
_WSU = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-utility-1.0.xsd"


class SimulatedCamera(BaseModel):
    """One camera of a scenario; ports 0 are picked by the system (see RunningCamera)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: Id
    host: Annotated[str, AfterValidator(bare_host)] = "127.0.0.1"
    http_port: Annotated[int, Field(ge=0, le=65535)] = 0
    rtsp_port: Annotated[int, Field(ge=0, le=65535)] = 0
    username: str = "admin"
    password: str | None = Field(None, description="None: no authentication at all")
    manufacturer: str = "CampusSim"
    model: str = "CAM-200"
    firmware: str = "V5.7.3 build 220715"
    serial: str = "CS200-0001"
    hardware_id: str = "CS200-HW-A"
    ntp: bool = True
    clock_offset_s: float = 0.0
    rtsp_path: Annotated[str, Field(pattern=r"^/\S*$")] = "/stream1"
    onvif_path: Annotated[str, Field(pattern=r"^/\S*$")] = "/onvif/device_service"
    tls_cert: Path | None = Field(None, description="serve ONVIF over https with this PEM pair")
    tls_key: Path | None = None
    modes: frozenset[CameraMode] = frozenset()

    @model_validator(mode="after")
    def _tls_pair(self) -> SimulatedCamera:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        return self


def _md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


def _digest_params(header: str) -> dict[str, str] | None:
    scheme, _, rest = header.strip().partition(" ")
    if scheme.lower() != "digest":
        return None
    return {
        m.group(1).lower(): re.sub(r"\\(.)", r"\1", m.group(2))
        if m.group(2) is not None
        else m.group(3)
        for m in _PARAM.finditer(rest)
    }


class RunningCamera:
    """A camera being served; `modes` may be changed while it runs (see set_offline too)."""

    def __init__(self, spec: SimulatedCamera, *, clock: Callable[[], float] = time.time) -> None:
        self.spec = spec
        self.modes: set[CameraMode] = set(spec.modes)
        self.clock = clock
        self.http_port = spec.http_port
        self.rtsp_port = spec.rtsp_port
        self.soap_actions: Counter[str] = Counter()  # answered calls, by action
        self.onvif_auth_failures = 0  # HTTP 401s and NotAuthorized faults
        self.rtsp_auth_failures = 0
        self.rtsp_methods: Counter[str] = Counter()
        self.rtsp_connections = 0
        self.rtsp_closed = 0  # connections the client closed
        self._servers: list[asyncio.Server] = []
        self._placeholders: list[socket.socket] = []
        self._nonces: set[str] = set()
        self._digest_nonces: set[str] = set()
        self._connections: set[asyncio.StreamWriter] = set()
        self._ssl: ssl.SSLContext | None = None
        if spec.tls_cert is not None and spec.tls_key is not None:
            self._ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._ssl.load_cert_chain(spec.tls_cert, spec.tls_key)

    # --- life cycle -----------------------------------------------------------------------

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in self.spec.host else socket.AF_INET

    @property
    def onvif_url(self) -> str:
        scheme = "https" if self._ssl else "http"
        return f"{scheme}://{host_port(self.spec.host, self.http_port)}{self.spec.onvif_path}"

    @property
    def rtsp_url(self) -> str:
        return f"rtsp://{host_port(self.spec.host, self.rtsp_port)}{self.spec.rtsp_path}"

    def now(self) -> float:
        """The camera's clock (Unix time)."""
        offset = self.spec.clock_offset_s
        if "wrong_clock" in self.modes and offset == 0:
            offset = WRONG_CLOCK_S
        return self.clock() + offset

    def _socket(self, port: int) -> socket.socket:
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((self.spec.host, port))
        return sock

    async def start(self) -> None:
        """Binds both ports (fixed once: a restart keeps them); listens unless offline."""
        http_sock, rtsp_sock = self._socket(self.http_port), self._socket(self.rtsp_port)
        self.http_port = http_sock.getsockname()[1]
        self.rtsp_port = rtsp_sock.getsockname()[1]
        if "offline" in self.modes:
            self._placeholders = [http_sock, rtsp_sock]  # bound, not listening: refused
            return
        await self._listen(http_sock, rtsp_sock)

    async def _listen(self, http_sock: socket.socket, rtsp_sock: socket.socket) -> None:
        self._servers = [
            await asyncio.start_server(self._serve_http, sock=http_sock, ssl=self._ssl),
            await asyncio.start_server(self._serve_rtsp, sock=rtsp_sock),
        ]

    async def set_offline(self, offline: bool) -> None:
        """Stops listening (connections refused) or listens again, on the same ports."""
        if offline == ("offline" in self.modes):
            return
        if offline:
            self.modes.add("offline")
            await self._close_servers()
            self._placeholders = [self._socket(self.http_port), self._socket(self.rtsp_port)]
        else:
            self.modes.discard("offline")
            for sock in self._placeholders:
                sock.close()
            self._placeholders = []
            await self._listen(self._socket(self.http_port), self._socket(self.rtsp_port))

    async def _close_servers(self) -> None:
        """Stops listening and drops the connections still open (their handlers then end)."""
        servers, self._servers = self._servers, []
        for server in servers:
            server.close()
        for writer in list(self._connections):
            writer.transport.abort()
        for server in servers:
            await server.wait_closed()
        for _ in range(100):
            if not self._connections:
                break
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        await self._close_servers()
        for sock in self._placeholders:
            sock.close()
        self._placeholders = []

    @contextlib.contextmanager
    def _open(self, writer: asyncio.StreamWriter) -> Iterator[None]:
        self._connections.add(writer)
        try:
            yield
        finally:
            self._connections.discard(writer)
            writer.close()

    # --- ONVIF over HTTP ------------------------------------------------------------------

    async def _serve_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._open(writer), contextlib.suppress(*_CLIENT_GONE):
            method, target, headers = await _read_head(reader)
            length = int(headers.get("content-length", "0"))
            body = await reader.readexactly(length) if 0 < length <= 1 << 20 else b""
            status, extra, answer = self._answer_http(method, target, headers, body)
            await self._respond_http(writer, status, extra, answer)

    async def _respond_http(
        self, writer: asyncio.StreamWriter, status: str, headers: list[str], body: bytes
    ) -> None:
        if status.startswith("200") and "truncated_soap" in self.modes:
            body = body[: len(body) // 2]
        content_type = (
            "application/soap+xml; charset=utf-8" if body.startswith(b"<?xml") else ("text/html")
        )
        head = [
            f"HTTP/1.1 {status}",
            "Server: campus-sim-camera",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}",
            "Connection: close",
            *headers,
        ]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        await writer.drain()

    def _answer_http(
        self, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> tuple[str, list[str], bytes]:
        if target.split("?")[0] != self.spec.onvif_path or "onvif_disabled" in self.modes:
            return "404 Not Found", [], b"<html><body>Not Found</body></html>"
        if method != "POST":
            return "405 Method Not Allowed", ["Allow: POST"], b""
        if "http_digest" in self.modes and self.spec.password:
            problem = self._check_http_digest(method, headers.get("authorization"))
            if problem is not None:
                self.onvif_auth_failures += 1
                nonce = secrets.token_hex(16)
                self._digest_nonces.add(nonce)
                challenge = (
                    f'WWW-Authenticate: Digest realm="{REALM}", qop="auth", '
                    f'nonce="{nonce}", opaque="{secrets.token_hex(8)}", algorithm=MD5'
                )
                return "401 Unauthorized", [challenge], b"<html>401 Unauthorized</html>"
        try:
            envelope = ET.fromstring(body)
        except ET.ParseError:
            return self._fault("400 Bad Request", "Sender", "ter:WellFormed", "not XML")
        request_body = envelope.find(f"{{{_SOAP}}}Body")
        if envelope.tag != f"{{{_SOAP}}}Envelope" or request_body is None or not len(request_body):
            return self._fault("400 Bad Request", "Sender", "ter:WellFormed", "no SOAP 1.2 Body")
        call = request_body[0].tag
        clock = call == f"{{{_TDS}}}GetSystemDateAndTime"
        if call != f"{{{_TDS}}}GetDeviceInformation" and not clock:
            return self._fault(
                "400 Bad Request", "Receiver", "ter:ActionNotSupported", f"no action {call}"
            )
        if self.spec.password and (not clock or "strict_auth" in self.modes):
            problem = self._check_token(envelope)
            if problem is not None:
                self.onvif_auth_failures += 1
                log.info("camera %s: refused a token: %s", self.spec.id, problem)
                return self._fault("400 Bad Request", "Sender", "ter:NotAuthorized", problem)
        if clock:
            self.soap_actions["GetSystemDateAndTime"] += 1
            return "200 OK", [], self._date_and_time()
        self.soap_actions["GetDeviceInformation"] += 1
        return "200 OK", [], self._device_information()

    def _check_http_digest(self, method: str, header: str | None) -> str | None:
        params = _digest_params(header or "")
        if params is None:
            return "no Digest authorization"
        if params.get("nonce") not in self._digest_nonces:
            return "unknown nonce"
        if params.get("username") != self.spec.username or params.get("realm") != REALM:
            return "wrong user or realm"
        assert self.spec.password is not None
        ha1 = _md5(f"{self.spec.username}:{REALM}:{self.spec.password}")
        ha2 = _md5(f"{method}:{params.get('uri', '')}")
        if params.get("qop") == "auth":
            expected = _md5(
                f"{ha1}:{params['nonce']}:{params.get('nc', '')}:"
                f"{params.get('cnonce', '')}:auth:{ha2}"
            )
        else:
            expected = _md5(f"{ha1}:{params['nonce']}:{ha2}")
        return None if params.get("response") == expected else "wrong digest response"

    def _check_token(self, envelope: ET.Element) -> str | None:
        token = envelope.find(f"{{{_SOAP}}}Header/{{{_WSSE}}}Security/{{{_WSSE}}}UsernameToken")
        if token is None:
            return "no UsernameToken"
        username = token.findtext(f"{{{_WSSE}}}Username")
        password = token.find(f"{{{_WSSE}}}Password")
        nonce = token.findtext(f"{{{_WSSE}}}Nonce")
        created = token.findtext(f"{{{_WSU}}}Created")
        if username != self.spec.username or password is None or not nonce or not created:
            return "wrong user or incomplete token"
        if not (password.get("Type") or "").endswith("#PasswordDigest"):
            return "not a PasswordDigest"
        if nonce in self._nonces:
            return "nonce used before (replay)"
        try:
            raw_nonce = base64.b64decode(nonce, validate=True)
            when = dt.datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return "undecodable nonce or Created"
        if abs(when - self.now()) > TOKEN_WINDOW_S:
            return f"Created {created} is too far from the camera's clock"
        assert self.spec.password is not None
        expected = base64.b64encode(
            hashlib.sha1(raw_nonce + created.encode() + self.spec.password.encode()).digest()
        ).decode()
        if (password.text or "").strip() != expected:
            return "wrong password digest"
        self._nonces.add(nonce)
        return None

    @staticmethod
    def _envelope(body: str) -> bytes:
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<SOAP-ENV:Envelope xmlns:SOAP-ENV="{_SOAP}" xmlns:tds="{_TDS}" xmlns:tt="{_TT}" '
            'xmlns:ter="http://www.onvif.org/ver10/error">'
            f"<SOAP-ENV:Body>{body}</SOAP-ENV:Body></SOAP-ENV:Envelope>\n"
        ).encode()

    def _fault(
        self, status: str, code: str, subcode: str, reason: str
    ) -> tuple[str, list[str], bytes]:
        fault = (
            "<SOAP-ENV:Fault><SOAP-ENV:Code>"
            f"<SOAP-ENV:Value>SOAP-ENV:{code}</SOAP-ENV:Value>"
            f"<SOAP-ENV:Subcode><SOAP-ENV:Value>{subcode}</SOAP-ENV:Value></SOAP-ENV:Subcode>"
            "</SOAP-ENV:Code><SOAP-ENV:Reason>"
            f'<SOAP-ENV:Text xml:lang="en">{_escape(reason)}</SOAP-ENV:Text>'
            "</SOAP-ENV:Reason></SOAP-ENV:Fault>"
        )
        return status, [], self._envelope(fault)

    def _device_information(self) -> bytes:
        spec = self.spec
        firmware = OLD_FIRMWARE if "old_firmware" in self.modes else spec.firmware
        return self._envelope(
            "<tds:GetDeviceInformationResponse>"
            f"<tds:Manufacturer>{_escape(spec.manufacturer)}</tds:Manufacturer>"
            f"<tds:Model>{_escape(spec.model)}</tds:Model>"
            f"<tds:FirmwareVersion>{_escape(firmware)}</tds:FirmwareVersion>"
            f"<tds:SerialNumber>{_escape(spec.serial)}</tds:SerialNumber>"
            f"<tds:HardwareId>{_escape(spec.hardware_id)}</tds:HardwareId>"
            "</tds:GetDeviceInformationResponse>"
        )

    def _date_and_time(self) -> bytes:
        now = dt.datetime.fromtimestamp(self.now(), dt.UTC)
        local = now + dt.timedelta(hours=1)  # the camera's zone: CET without summer time

        def date_time(when: dt.datetime) -> str:
            return (
                f"<tt:Time><tt:Hour>{when.hour}</tt:Hour><tt:Minute>{when.minute}</tt:Minute>"
                f"<tt:Second>{when.second}</tt:Second></tt:Time>"
                f"<tt:Date><tt:Year>{when.year}</tt:Year><tt:Month>{when.month}</tt:Month>"
                f"<tt:Day>{when.day}</tt:Day></tt:Date>"
            )

        return self._envelope(
            "<tds:GetSystemDateAndTimeResponse><tds:SystemDateAndTime>"
            f"<tt:DateTimeType>{'NTP' if self.spec.ntp else 'Manual'}</tt:DateTimeType>"
            "<tt:DaylightSavings>false</tt:DaylightSavings>"
            "<tt:TimeZone><tt:TZ>CET-1</tt:TZ></tt:TimeZone>"
            f"<tt:UTCDateTime>{date_time(now)}</tt:UTCDateTime>"
            f"<tt:LocalDateTime>{date_time(local)}</tt:LocalDateTime>"
            "</tds:SystemDateAndTime></tds:GetSystemDateAndTimeResponse>"
        )

    # --- RTSP -----------------------------------------------------------------------------

    async def _serve_rtsp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.rtsp_connections += 1
        nonce = secrets.token_hex(16)
        with self._open(writer), contextlib.suppress(*_CLIENT_GONE):
            if "silent_rtsp" in self.modes:
                while await reader.read(4096):
                    pass  # read and never answer
                self.rtsp_closed += 1
                return
            while not reader.at_eof():
                try:
                    method, url, headers = await _read_head(reader)
                except asyncio.IncompleteReadError:
                    break
                self.rtsp_methods[method] += 1
                status, extra, body = self._answer_rtsp(method, url, headers, nonce)
                head = [
                    f"RTSP/1.0 {status}",
                    f"CSeq: {headers.get('cseq', '0')}",
                    "Server: campus-sim-camera",
                    *extra,
                ]
                if body:
                    head.append(f"Content-Length: {len(body)}")
                writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
                await writer.drain()
            self.rtsp_closed += 1

    def _answer_rtsp(
        self, method: str, url: str, headers: dict[str, str], nonce: str
    ) -> tuple[str, list[str], bytes]:
        if method == "OPTIONS":
            return "200 OK", ["Public: OPTIONS, DESCRIBE, SETUP, PLAY, TEARDOWN"], b""
        if method != "DESCRIBE":
            return "455 Method Not Valid in This State", [], b""
        if self.spec.password:
            params = _digest_params(headers.get("authorization", ""))
            if params is None or not self._rtsp_digest_ok(params, method, url, nonce):
                self.rtsp_auth_failures += 1
                return (
                    "401 Unauthorized",
                    [f'WWW-Authenticate: Digest realm="{REALM}", nonce="{nonce}"'],
                    b"",
                )
        path = re.sub(r"^rtsp://[^/]+", "", url) or "/"
        if path.split("?")[0] != self.spec.rtsp_path:
            return "404 Not Found", [], b""
        if "application/sdp" not in headers.get("accept", "application/sdp"):
            return "406 Not Acceptable", [], b""
        address = "IP6 ::1" if self.family == socket.AF_INET6 else "IP4 127.0.0.1"
        sdp = (
            "v=0\r\n"
            f"o=- 1 1 IN {address}\r\n"
            "s=campus-sim camera\r\n"
            "t=0 0\r\n"
            "m=video 0 RTP/AVP 96\r\n"
            "a=rtpmap:96 H264/90000\r\n"
            "a=control:trackID=1\r\n"
            "m=audio 0 RTP/AVP 0\r\n"
            "a=control:trackID=2\r\n"
        ).encode()
        return "200 OK", [f"Content-Base: {url}/", "Content-Type: application/sdp"], sdp

    def _rtsp_digest_ok(self, params: dict[str, str], method: str, url: str, nonce: str) -> bool:
        if params.get("nonce") != nonce or params.get("username") != self.spec.username:
            return False
        if params.get("uri") != url or params.get("realm") != REALM:
            return False
        assert self.spec.password is not None
        ha1 = _md5(f"{self.spec.username}:{REALM}:{self.spec.password}")
        expected = _md5(f"{ha1}:{nonce}:{_md5(f'{method}:{url}')}")
        return params.get("response") == expected


_CLIENT_GONE = (
    ConnectionError,
    ssl.SSLError,
    asyncio.IncompleteReadError,
    asyncio.LimitOverrunError,
)


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str]]:
    """(method, target, headers by lowercase name) of the next request; ValueError if garbled."""
    head = await reader.readuntil(b"\r\n\r\n")
    request_line, *lines = head.decode("latin-1").split("\r\n")
    method, target, _ = request_line.split(" ", 2)
    headers = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return method, target, headers


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


@contextlib.asynccontextmanager
async def serve_camera(
    spec: SimulatedCamera, *, clock: Callable[[], float] = time.time
) -> AsyncIterator[RunningCamera]:
    """`async with serve_camera(spec) as cam:` serves it on cam.http_port and cam.rtsp_port."""
    camera = RunningCamera(spec, clock=clock)
    await camera.start()
    try:
        yield camera
    finally:
        await camera.stop()
