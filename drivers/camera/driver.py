"""Security-camera health driver: ONVIF device information and clock, an RTSP probe of the
stream, the firmware against the profile's known-good range. Never video, never images: the
ONVIF calls return identity and time only, and the RTSP probe stops at DESCRIBE (no SETUP, no
PLAY), so no picture and no personal data ever leaves the camera.

Rules: the ONVIF calls and the RTSP probe run side by side, each within the connection's
`timeout_s`. A camera that answers neither (connection refused, reset, silent) raises
DeviceUnreachable or DeviceTimeout; otherwise every failure is a reading: `onvif_ok` or
`rtsp_ok` false, and the points that could not be read rejected with why. GetSystemDateAndTime
goes first, without credentials (ONVIF lets anyone read the clock): the WS-Security token's
Created time is then set on the camera's clock, so a camera whose clock is off still accepts it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
import ssl
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TypeVar

from drivers.base import Driver, PollResult, Value
from drivers.camera import onvif, rtsp, rtsp_url
from drivers.camera.connection import OnvifConnection
from drivers.camera.http import (
    USER_AGENT,
    AuthenticationError,
    DigestSession,
    NotConnected,
    ProtocolError,
    ResponseParser,
    TlsError,
    exchange,
    format_request,
    host_header,
    open_stream,
    read_response,
)
from drivers.camera.profile import (
    DATE_AND_TIME_SOURCES,
    DEVICE_INFORMATION_SOURCES,
    RTSP_SOURCES,
    CameraPoint,
    CameraProfile,
    Source,
    parse_version,
)
from drivers.errors import DeviceLinkError, DeviceTimeout, DeviceUnreachable, DriverError
from wire.net import host_port

MAX_SOAP_ANSWER = 256 * 1024
MAX_SDP = 64 * 1024
_T = TypeVar("_T")


class CameraPool:
    """What camera drivers share on a gateway: the TLS contexts (loading the CA store once)."""

    def __init__(self) -> None:
        self._contexts: dict[bool, ssl.SSLContext] = {}

    def ssl_context(self, verify: bool) -> ssl.SSLContext:
        if verify not in self._contexts:
            context = ssl.create_default_context()
            if not verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            self._contexts[verify] = context
        return self._contexts[verify]

    async def close(self) -> None:
        self._contexts.clear()


@dataclass(slots=True)
class _Outcome:
    """What one probe (ONVIF or RTSP) found: values by source, and why others are missing."""

    values: dict[Source, Value] = field(default_factory=dict)
    missing: dict[Source, str] = field(default_factory=dict)
    protocol: str = "ONVIF"
    answered: bool = False  # the camera sent something back (even an error)
    link_error: DeviceLinkError | None = None  # it sent nothing back: why

    def fail(self, sources: frozenset[Source], why: str) -> None:
        for source in sources:
            self.missing.setdefault(source, why)


class CameraDriver(Driver):
    def __init__(
        self,
        profile: CameraProfile,
        connection: OnvifConnection,
        pool: CameraPool,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.profile = profile
        self.connection = connection
        self.address = host_port(connection.host, connection.port)
        self.bus = f"onvif:{self.address}"
        self.poll_timeout_s = connection.timeout_s + 0.5  # ONVIF and RTSP side by side
        self._clock = clock
        self._ssl = pool.ssl_context(connection.verify_tls) if connection.https else None
        self._points = list(profile.points)
        self._scheduled = any(p.poll_interval_s is not None for p in self._points)
        self._next_due: dict[str, float] = {}
        self._http_auth = DigestSession(connection.username, connection.password)
        self._rtsp = (
            None if connection.rtsp_url is None else rtsp_url.parse_url(connection.rtsp_url)
        )
        self._drift_s: float | None = None  # camera clock minus ours, last measured
        self._clock_needs_auth = False
        self._low, self._high = profile.firmware_range
        self.requests = 0

    async def open(self) -> None:
        """Nothing to warm up: every poll opens its own short connections."""

    async def close(self) -> None:
        """Nothing stays open between polls."""

    def _due(self, now: float) -> list[CameraPoint]:
        if not self._scheduled:
            return self._points
        return [
            p
            for p in self._points
            if p.poll_interval_s is None or now >= self._next_due.get(p.name, 0.0)
        ]

    async def read(self) -> PollResult:
        now = time.monotonic()
        due = self._due(now)
        sources = {p.source for p in due}
        want_info = bool(sources & DEVICE_INFORMATION_SOURCES)
        want_onvif = want_info or bool(sources & DATE_AND_TIME_SOURCES)
        want_rtsp = bool(sources & RTSP_SOURCES) and self._rtsp is not None
        probes: list[Coroutine[None, None, _Outcome]] = []
        if want_onvif:
            probes.append(self._probe_onvif(want_info))
        if want_rtsp:
            probes.append(self._probe_rtsp())
        outcomes = list(await asyncio.gather(*probes))
        if outcomes and all(o.link_error is not None and not o.answered for o in outcomes):
            self._raise_unreachable(outcomes)
        values: dict[Source, Value] = {}
        missing: dict[Source, str] = {}
        for outcome in outcomes:
            values.update(outcome.values)
            missing.update(outcome.missing)
        if self._rtsp is None:
            for source in RTSP_SOURCES:
                missing[source] = "no rtsp_url in the connection"
        result = PollResult()
        for point in due:
            if point.source in values:
                value, why = point.check(values[point.source])
                if value is not None:
                    result.values.append((point.name, value))
                    if point.poll_interval_s is not None:
                        self._next_due[point.name] = now + point.poll_interval_s
                    continue
            else:
                why = missing.get(point.source, "not read")
            result.rejected.append((point.name, why or "not read"))
        return result

    def _raise_unreachable(self, outcomes: list[_Outcome]) -> None:
        errors = [o.link_error for o in outcomes if o.link_error is not None]
        detail = "; ".join(f"{o.protocol} {o.link_error}" for o in outcomes)
        if all(isinstance(e, DeviceTimeout) for e in errors):
            raise DeviceTimeout(self.address, f"camera does not answer ({detail})")
        raise DeviceUnreachable(self.address, f"camera unreachable ({detail})")

    # --- ONVIF ----------------------------------------------------------------------------

    async def _probe_onvif(self, want_info: bool) -> _Outcome:
        outcome = _Outcome()
        deadline = asyncio.get_running_loop().time() + self.connection.timeout_s
        calls_ok = True
        try:
            calls_ok &= await self._read_clock(outcome, deadline)
            if want_info:
                calls_ok &= await self._read_information(outcome, deadline)
        except DeviceLinkError as error:
            outcome.link_error = error
            calls_ok = False
            why = f"ONVIF: {error}"
            outcome.fail(DATE_AND_TIME_SOURCES | DEVICE_INFORMATION_SOURCES, why)
        outcome.values[Source.ONVIF_OK] = calls_ok
        outcome.missing.pop(Source.ONVIF_OK, None)
        return outcome

    async def _read_clock(self, outcome: _Outcome, deadline: float) -> bool:
        sources = DATE_AND_TIME_SOURCES - {Source.ONVIF_OK}
        try:
            answer, sent_at, rtt = await self._call(
                onvif.GET_SYSTEM_DATE_AND_TIME,
                onvif.parse_system_date_and_time,
                outcome,
                deadline,
                secure=self._clock_needs_auth,
            )
        except DeviceLinkError:
            raise
        except DriverError as error:
            outcome.fail(sources, self._why(error))
            return False
        outcome.values[Source.ONVIF_RESPONSE_MS] = round(rtt * 1000, 1)
        if answer.date_time_type:
            outcome.values[Source.DATE_TIME_TYPE] = answer.date_time_type
        else:
            outcome.missing[Source.DATE_TIME_TYPE] = "camera does not report DateTimeType"
        if answer.utc is None:
            outcome.missing[Source.CLOCK_DRIFT_S] = "camera does not report UTCDateTime"
        else:
            # The camera read its clock about mid-way and cut it to the whole second: its
            # clock was then half a second past what it says, on average.
            self._drift_s = answer.utc.timestamp() + 0.5 - (sent_at + rtt / 2)
            outcome.values[Source.CLOCK_DRIFT_S] = round(self._drift_s, 1) + 0.0  # not -0.0
        return True

    async def _read_information(self, outcome: _Outcome, deadline: float) -> bool:
        try:
            info, _, _ = await self._call(
                onvif.GET_DEVICE_INFORMATION,
                onvif.parse_device_information,
                outcome,
                deadline,
                secure=True,
            )
        except DeviceLinkError:
            raise
        except DriverError as error:
            outcome.fail(DEVICE_INFORMATION_SOURCES, self._why(error))
            return False
        for source, text, name in (
            (Source.MANUFACTURER, info.manufacturer, "Manufacturer"),
            (Source.MODEL, info.model, "Model"),
            (Source.FIRMWARE, info.firmware_version, "FirmwareVersion"),
            (Source.SERIAL, info.serial_number, "SerialNumber"),
            (Source.HARDWARE_ID, info.hardware_id, "HardwareId"),
        ):
            if text:
                outcome.values[source] = text
            else:
                outcome.missing[source] = f"camera does not report {name}"
        self._check_firmware(info.firmware_version, outcome)
        return True

    def _check_firmware(self, firmware: str | None, outcome: _Outcome) -> None:
        sources = frozenset({Source.FIRMWARE_OUTDATED, Source.FIRMWARE_KNOWN_GOOD})
        version = None if firmware is None else parse_version(firmware)
        if version is None:
            outcome.fail(sources, f"no version number in the firmware {firmware!r:.60}")
            return
        low, high = self._low, self._high
        if low is not None:
            outcome.values[Source.FIRMWARE_OUTDATED] = version < low
        known_good = (low is None or version >= low) and (high is None or version <= high)
        outcome.values[Source.FIRMWARE_KNOWN_GOOD] = known_good

    def _why(self, error: Exception) -> str:
        return f"ONVIF {self.address}: {error}"

    @property
    def _has_credentials(self) -> bool:
        return self.connection.username is not None and self.connection.password is not None

    def _security(self) -> str | None:
        username, password = self.connection.username, self.connection.password
        if username is None or password is None:
            return None
        now = self._clock() + (self._drift_s or 0.0)
        created = onvif.format_created(dt.datetime.fromtimestamp(now, dt.UTC))
        return onvif.username_token(username, password, secrets.token_bytes(16), created)

    async def _call(
        self,
        action: str,
        parse: Callable[[bytes], _T],
        outcome: _Outcome,
        deadline: float,
        *,
        secure: bool,
    ) -> tuple[_T, float, float]:
        """(parsed answer to `action`, our wall-clock time when the request that got it was
        sent, its round trip in s), after HTTP digest and WS-Security as the camera asks."""
        connection = self.connection
        default_port = 443 if self._ssl else 80
        self._http_auth.start()
        for _ in range(4):  # a digest challenge, a stale nonce, escalation to WS-Security
            security = self._security() if secure else None
            headers = [
                ("Host", host_header(connection.host, connection.port, default_port)),
                ("Content-Type", onvif.content_type(action)),
                ("User-Agent", USER_AGENT),
                ("Connection", "close"),
            ]
            authorization = self._http_auth.authorization("POST", connection.path)
            if authorization is not None:
                headers.append(("Authorization", authorization))
            body = onvif.request(action, security)
            request = format_request("POST", connection.path, headers, body)
            self.requests += 1
            sent_at, started = self._clock(), time.monotonic()
            try:
                response = await exchange(
                    connection.host,
                    connection.port,
                    request,
                    deadline=deadline,
                    ssl_context=self._ssl,
                    max_body=MAX_SOAP_ANSWER,
                )
            except (ProtocolError, TlsError):
                outcome.answered = True
                raise
            rtt = time.monotonic() - started
            outcome.answered = True
            if response.status == 401:
                self._http_auth.challenged(response, sent=authorization is not None)
                continue
            try:
                onvif.check_http_status(
                    response.status, response.reason, response.body, connection.path
                )
                return parse(response.body), sent_at, rtt
            except onvif.OnvifFault as fault:
                if not fault.not_authorized:
                    raise
                if not self._has_credentials:
                    raise AuthenticationError(
                        "camera wants a user name and password (ONVIF NotAuthorized): "
                        "set username and password in the connection"
                    ) from None
                if secure:
                    raise
                secure = True
                if action == onvif.GET_SYSTEM_DATE_AND_TIME:
                    self._clock_needs_auth = True
        raise AuthenticationError("camera keeps asking for authentication")

    # --- RTSP -----------------------------------------------------------------------------

    async def _probe_rtsp(self) -> _Outcome:
        assert self._rtsp is not None
        target = self._rtsp
        outcome = _Outcome(protocol="RTSP")
        address = host_port(target.host, target.port)
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self.connection.timeout_s
        try:
            status, tracks = await self._describe(target, address, outcome, deadline)
        except TimeoutError:
            self._rtsp_failed(outcome, "timeout", f"RTSP {address}: no answer in time")
            if not outcome.answered:
                outcome.link_error = DeviceTimeout(address, "RTSP: no answer in time")
            return outcome
        except DeviceLinkError as error:
            self._rtsp_failed(outcome, _short(error), f"RTSP {error}")
            outcome.link_error = error
            return outcome
        except AuthenticationError as error:
            self._rtsp_failed(outcome, "401 Unauthorized", f"RTSP {address}: {error}")
            return outcome
        except DriverError as error:
            self._rtsp_failed(outcome, "bad answer", f"RTSP {address}: {error}")
            return outcome
        outcome.values[Source.RTSP_STATUS] = status
        if tracks is None:
            self._rtsp_failed(outcome, status, f"RTSP {address}: DESCRIBE answered {status}")
            return outcome
        outcome.values[Source.RTSP_OK] = True
        outcome.values[Source.RTSP_RESPONSE_MS] = round((loop.time() - started) * 1000, 1)
        outcome.values[Source.RTSP_TRACKS] = tracks
        return outcome

    @staticmethod
    def _rtsp_failed(outcome: _Outcome, status: str, why: str) -> None:
        outcome.values[Source.RTSP_OK] = False
        outcome.values.setdefault(Source.RTSP_STATUS, status)
        outcome.fail(frozenset({Source.RTSP_RESPONSE_MS, Source.RTSP_TRACKS}), why)

    async def _describe(
        self, target: rtsp_url.RtspTarget, address: str, outcome: _Outcome, deadline: float
    ) -> tuple[str, int | None]:
        """(DESCRIBE's status, track count when it succeeded), then the connection is closed."""
        auth = DigestSession(
            target.username or self.connection.username,
            target.password or self.connection.password,
            protocol="RTSP",
        )
        streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        parser = ResponseParser("RTSP", max_body=MAX_SDP)
        cseq = 0
        try:
            async with asyncio.timeout_at(deadline):
                for method, encode in (("OPTIONS", rtsp.options), ("DESCRIBE", rtsp.describe)):
                    auth.start()
                    for _ in range(3):  # a digest challenge, a stale nonce
                        if streams is None:
                            streams = await open_stream(target.host, target.port, deadline=deadline)
                            parser = ResponseParser("RTSP", max_body=MAX_SDP)
                        reader, writer = streams
                        cseq += 1
                        authorization = auth.authorization(method, target.url)
                        writer.write(encode(target.url, cseq, authorization))
                        await writer.drain()
                        response = await read_response(reader, parser, address)
                        outcome.answered = True
                        rtsp.check_cseq(response, cseq)
                        if (response.get("Connection") or "").lower() == "close":
                            writer.close()
                            streams = None
                        if response.status != 401:
                            break
                        auth.challenged(response, sent=authorization is not None)
            if response.status != 200:
                return response.status_text, None
            return response.status_text, rtsp.count_tracks(response.body)
        except TimeoutError:
            raise
        except OSError as error:
            raise DeviceUnreachable(address, f"connection lost: {error}") from error
        finally:
            if streams is not None:
                streams[1].close()


def _short(error: DeviceLinkError) -> str:
    if isinstance(error, DeviceTimeout):
        return "timeout"
    if isinstance(error, NotConnected):
        return "connection refused" if "refused" in error.detail else "no connection"
    return "connection lost"


Pool = CameraPool


def build(profile: CameraProfile, connection: OnvifConnection, pool: CameraPool) -> CameraDriver:
    return CameraDriver(profile, connection, pool)
