"""ONVIF device service codec (SOAP 1.2 + WS-Security UsernameToken), pure: bytes in, values out.

Health only: the two calls used here (GetDeviceInformation, GetSystemDateAndTime) return
identity and clock, never video, images or anything about people. Answers are parsed with
xml.etree after a first pass with expat that refuses any DOCTYPE or entity declaration
(entity-expansion attacks); every way an answer can be wrong raises OnvifResponseError, a
SOAP Fault raises OnvifFault.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Final
from xml.parsers import expat
from xml.sax.saxutils import escape

from drivers.errors import DriverError

SOAP_ENV: Final = "http://www.w3.org/2003/05/soap-envelope"
SOAP_11_ENV: Final = "http://schemas.xmlsoap.org/soap/envelope/"
TDS: Final = "http://www.onvif.org/ver10/device/wsdl"
TT: Final = "http://www.onvif.org/ver10/schema"
WSSE: Final = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"
WSU: Final = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-utility-1.0.xsd"
PASSWORD_DIGEST: Final = (
    "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-username-token-profile-1.0"
    "#PasswordDigest"
)
BASE64_BINARY: Final = (
    "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-soap-message-security-1.0#Base64Binary"
)

GET_DEVICE_INFORMATION: Final = "GetDeviceInformation"
GET_SYSTEM_DATE_AND_TIME: Final = "GetSystemDateAndTime"
ACTIONS: Final = (GET_DEVICE_INFORMATION, GET_SYSTEM_DATE_AND_TIME)


class OnvifError(DriverError):
    """Root of the ONVIF codec's errors."""


class OnvifResponseError(OnvifError):
    """The camera's answer is not a usable ONVIF answer (not XML, wrong namespace, cut short)."""


class OnvifFault(OnvifError):
    """The camera answered with a SOAP Fault."""

    def __init__(self, code: str, subcodes: tuple[str, ...], reason: str) -> None:
        super().__init__(code, subcodes, reason)
        self.code = code
        self.subcodes = subcodes
        self.reason = reason

    @property
    def not_authorized(self) -> bool:
        return "NotAuthorized" in self.subcodes

    def __str__(self) -> str:
        if self.not_authorized:
            return "camera refused the credentials (ONVIF NotAuthorized)"
        if "ActionNotSupported" in self.subcodes:
            return "camera does not support this ONVIF call (ActionNotSupported)"
        name = "/".join((self.code, *self.subcodes)) or "no code"
        reason = f": {self.reason[:200]}" if self.reason else ""
        return f"camera answered with SOAP fault {name}{reason}"


# --- requests -------------------------------------------------------------------------------


def password_digest(nonce: bytes, created: str, password: str) -> str:
    """Base64(SHA-1(nonce + created + password)), OASIS UsernameToken Profile 1.0, 3.1."""
    digest = hashlib.sha1(nonce + created.encode() + password.encode()).digest()
    return base64.b64encode(digest).decode("ascii")


def format_created(when: dt.datetime) -> str:
    """xsd:dateTime in UTC to the second, e.g. 2024-05-01T12:00:00Z."""
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def username_token(username: str, password: str, nonce: bytes, created: str) -> str:
    """The wsse:Security header element with a PasswordDigest UsernameToken."""
    return (
        f'<wsse:Security xmlns:wsse="{WSSE}" xmlns:wsu="{WSU}" env:mustUnderstand="true">'
        "<wsse:UsernameToken>"
        f"<wsse:Username>{escape(username)}</wsse:Username>"
        f'<wsse:Password Type="{PASSWORD_DIGEST}">'
        f"{password_digest(nonce, created, password)}</wsse:Password>"
        f'<wsse:Nonce EncodingType="{BASE64_BINARY}">'
        f"{base64.b64encode(nonce).decode('ascii')}</wsse:Nonce>"
        f"<wsu:Created>{created}</wsu:Created>"
        "</wsse:UsernameToken></wsse:Security>"
    )


def request(action: str, security: str | None = None) -> bytes:
    """The SOAP 1.2 envelope calling a device service `action` (no arguments)."""
    if action not in ACTIONS:
        raise ValueError(f"unknown ONVIF action {action!r}")
    header = f"<env:Header>{security}</env:Header>" if security else ""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f'<env:Envelope xmlns:env="{SOAP_ENV}" xmlns:tds="{TDS}">'
        f"{header}<env:Body><tds:{action}/></env:Body></env:Envelope>"
    ).encode()


def content_type(action: str) -> str:
    """SOAP 1.2 over HTTP: the action goes in the media type's `action` parameter."""
    return f'application/soap+xml; charset=utf-8; action="{TDS}/{action}"'


# --- answers --------------------------------------------------------------------------------


class _DtdRefused(Exception):
    pass


def _refuse_dtd(*_: object) -> None:
    raise _DtdRefused


def parse_xml(body: bytes) -> ET.Element:
    """The document's root; OnvifResponseError for anything that is not plain, safe XML."""
    if not body.strip():
        raise OnvifResponseError("empty answer where a SOAP envelope was expected")
    check = expat.ParserCreate()
    check.StartDoctypeDeclHandler = _refuse_dtd
    check.EntityDeclHandler = _refuse_dtd
    try:
        check.Parse(body, True)
    except _DtdRefused:
        raise OnvifResponseError("answer has a DOCTYPE or entity declaration (refused)") from None
    except expat.ExpatError as error:
        raise OnvifResponseError(
            f"answer is not well-formed XML ({expat.errors.messages[error.code]}, "
            f"line {error.lineno}, column {error.offset}): cut short or not XML"
        ) from None
    try:
        return ET.fromstring(body)
    except ET.ParseError as error:  # expat accepted it above; kept for safety
        raise OnvifResponseError(f"answer is not well-formed XML ({error})") from None


def _name(tag: str) -> str:
    """`{namespace}local` as `local (namespace)`, for messages."""
    if tag.startswith("{"):
        namespace, _, local = tag[1:].partition("}")
        return f"{local} ({namespace})"
    return f"{tag} (no namespace)"


def body_of(body: bytes) -> ET.Element:
    """The first element of the SOAP 1.2 Body; OnvifFault when that is a Fault."""
    root = parse_xml(body)
    if root.tag != f"{{{SOAP_ENV}}}Envelope":
        if root.tag == f"{{{SOAP_11_ENV}}}Envelope":
            raise OnvifResponseError("answer is a SOAP 1.1 envelope; ONVIF uses SOAP 1.2")
        raise OnvifResponseError(f"expected a SOAP 1.2 Envelope, got {_name(root.tag)}")
    soap_body = root.find(f"{{{SOAP_ENV}}}Body")
    if soap_body is None or len(soap_body) == 0:
        raise OnvifResponseError("SOAP envelope without a Body element")
    first = soap_body[0]
    if first.tag == f"{{{SOAP_ENV}}}Fault":
        raise parse_fault(first)
    return first


def _qname_local(text: str | None) -> str:
    return (text or "").strip().rpartition(":")[2]


def parse_fault(fault: ET.Element) -> OnvifFault:
    code = _qname_local(fault.findtext(f"{{{SOAP_ENV}}}Code/{{{SOAP_ENV}}}Value"))
    subcodes: list[str] = []
    node = fault.find(f"{{{SOAP_ENV}}}Code")
    while node is not None and (node := node.find(f"{{{SOAP_ENV}}}Subcode")) is not None:
        subcodes.append(_qname_local(node.findtext(f"{{{SOAP_ENV}}}Value")))
    reason = (fault.findtext(f"{{{SOAP_ENV}}}Reason/{{{SOAP_ENV}}}Text") or "").strip()
    return OnvifFault(code, tuple(s for s in subcodes if s), reason)


def check_http_status(status: int, reason: str, body: bytes, path: str) -> None:
    """Nothing for 200; otherwise the SOAP Fault in the body, or an error naming the status."""
    if status == 200:
        return
    try:
        body_of(body)
    except OnvifFault:
        raise
    except OnvifResponseError:
        pass
    hint = ""
    if status in (404, 405, 501):
        hint = f": no ONVIF device service at {path}; is ONVIF enabled on the camera?"
    raise OnvifResponseError(f"HTTP {status} {reason}{hint}".strip())


def _expect(element: ET.Element, action: str) -> None:
    wanted = f"{{{TDS}}}{action}Response"
    if element.tag != wanted:
        raise OnvifResponseError(f"expected {action}Response ({TDS}), got {_name(element.tag)}")


@dataclass(frozen=True, slots=True)
class DeviceInformation:
    manufacturer: str | None
    model: str | None
    firmware_version: str | None
    serial_number: str | None
    hardware_id: str | None


def parse_device_information(body: bytes) -> DeviceInformation:
    response = body_of(body)
    _expect(response, GET_DEVICE_INFORMATION)

    def text(name: str) -> str | None:
        found = response.findtext(f"{{{TDS}}}{name}")
        return None if found is None else found.strip()

    return DeviceInformation(
        manufacturer=text("Manufacturer"),
        model=text("Model"),
        firmware_version=text("FirmwareVersion"),
        serial_number=text("SerialNumber"),
        hardware_id=text("HardwareId"),
    )


@dataclass(frozen=True, slots=True)
class SystemDateAndTime:
    date_time_type: str | None  # "NTP" or "Manual"
    daylight_savings: bool | None
    time_zone: str | None
    utc: dt.datetime | None  # None when the camera leaves UTCDateTime out (it is optional)


def _date_time(element: ET.Element, where: str) -> dt.datetime:
    def number(path: str) -> int:
        text = element.findtext(f"{{{TT}}}{path.replace('/', f'/{{{TT}}}')}")
        if text is None or not text.strip().isdigit():
            raise OnvifResponseError(f"{where}: {path} missing or not a number ({text!r:.20})")
        return int(text)

    try:
        return dt.datetime(
            number("Date/Year"),
            number("Date/Month"),
            number("Date/Day"),
            number("Time/Hour"),
            number("Time/Minute"),
            min(number("Time/Second"), 59),  # a leap second
            tzinfo=dt.UTC,
        )
    except ValueError as error:
        raise OnvifResponseError(f"{where}: impossible date or time ({error})") from None


def parse_system_date_and_time(body: bytes) -> SystemDateAndTime:
    response = body_of(body)
    _expect(response, GET_SYSTEM_DATE_AND_TIME)
    system = response.find(f"{{{TDS}}}SystemDateAndTime")
    if system is None:
        raise OnvifResponseError("GetSystemDateAndTimeResponse without SystemDateAndTime")
    utc = system.find(f"{{{TT}}}UTCDateTime")
    daylight = system.findtext(f"{{{TT}}}DaylightSavings")
    kind = system.findtext(f"{{{TT}}}DateTimeType")
    zone = system.findtext(f"{{{TT}}}TimeZone/{{{TT}}}TZ")
    return SystemDateAndTime(
        date_time_type=None if kind is None else kind.strip(),
        daylight_savings=None if daylight is None else daylight.strip() in ("true", "1"),
        time_zone=None if zone is None else zone.strip(),
        utc=None if utc is None else _date_time(utc, "UTCDateTime"),
    )
