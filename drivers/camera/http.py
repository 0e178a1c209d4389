"""A minimal HTTP/1.1 client codec (also RTSP/1.0's message syntax) and HTTP digest auth.

Pure except for the three small stream functions at the end (`open_stream`, `read_response`,
`exchange`): requests are formatted to bytes, answers are parsed from bytes fed in any pieces.
One request per connection for HTTP (`Connection: close`): cameras are polled a few times a
minute and their web servers handle keep-alive badly. Digest auth follows RFC 7616 (MD5 and
SHA-256, with or without -sess) and the older RFC 2617/2069 forms RTSP servers still send.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import secrets
import ssl
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

from drivers.errors import DeviceTimeout, DeviceUnreachable, DriverError
from wire.net import host_port

USER_AGENT: Final = "campus-iot"
MAX_HEAD: Final = 32 * 1024
MAX_BODY: Final = 1024 * 1024

_Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class ProtocolError(DriverError):
    """The peer sent bytes that are not a valid HTTP or RTSP answer."""


class AuthenticationError(DriverError):
    """The peer refused the credentials, or asks for a scheme this client does not use."""


class NotConnected(DeviceUnreachable):
    """No connection could be opened (refused, no route, or no answer to the TCP handshake)."""


class TlsError(DriverError):
    """The TLS handshake failed: the peer answered, but its certificate or TLS is not accepted."""


# --- requests -------------------------------------------------------------------------------


def format_request(
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]],
    body: bytes = b"",
    *,
    version: str = "HTTP/1.1",
) -> bytes:
    """The request's bytes; Content-Length is added after `headers` for a body or a POST."""
    fields = list(headers)
    if body or method in ("POST", "PUT"):
        fields.append(("Content-Length", str(len(body))))
    lines = [f"{method} {target} {version}"]
    for name, value in fields:
        if not _TOKEN.fullmatch(name) or any(c in value for c in "\r\n\0"):
            raise ValueError(f"invalid header {name!r}: {value!r:.60}")
        lines.append(f"{name}: {value}")
    if any(c in method + target for c in " \r\n\0"):
        raise ValueError(f"invalid request line {method!r} {target!r:.80}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def host_header(host: str, port: int, default_port: int) -> str:
    if port == default_port:
        return f"[{host}]" if ":" in host else host
    return host_port(host, port)


# --- responses ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Response:
    version: str  # "HTTP/1.1", "RTSP/1.0"
    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]
    body: bytes = b""

    def get(self, name: str) -> str | None:
        name = name.lower()
        return next((v for n, v in self.headers if n.lower() == name), None)

    def get_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for n, v in self.headers if n.lower() == name]

    @property
    def status_text(self) -> str:
        return f"{self.status} {self.reason}".strip()


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_STATUS_LINE = re.compile(r"(HTTP|RTSP)/(\d)\.(\d) (\d{3})(?: (.*))?")
_HEAD_END = re.compile(rb"\r?\n\r?\n")


@dataclass(slots=True)
class _Head:
    response: Response
    body_start: int
    length: int | None  # None: chunked or until close
    chunked: bool


class ResponseParser:
    """Feed bytes as they arrive; `next_response()` gives each complete answer, in order.

    `protocol` is "HTTP" or "RTSP": an RTSP answer without Content-Length has no body, an HTTP
    one runs until the connection closes (`end_of_stream()`).
    """

    def __init__(
        self, protocol: str = "HTTP", *, max_head: int = MAX_HEAD, max_body: int = MAX_BODY
    ) -> None:
        if protocol not in ("HTTP", "RTSP"):
            raise ValueError(f"unknown protocol {protocol!r}")
        self.protocol = protocol
        self.max_head = max_head
        self.max_body = max_body
        self._buffer = bytearray()
        self._head: _Head | None = None

    def feed(self, data: bytes) -> None:
        self._buffer += data

    @property
    def idle(self) -> bool:
        """Nothing of an answer received yet."""
        return not self._buffer and self._head is None

    def next_response(self) -> Response | None:
        while True:
            if self._head is None:
                self._head = self._parse_head()
                if self._head is None:
                    return None
            head = self._head
            if 100 <= head.response.status < 200 and self.protocol == "HTTP":
                del self._buffer[: head.body_start]  # interim answer (100 Continue): skip
                self._head = None
                continue
            if head.chunked:
                decoded = self._dechunk(head.body_start)
                if decoded is None:
                    return None
                body, end = decoded
            elif head.length is None:
                return None  # until the connection closes
            else:
                end = head.body_start + head.length
                if len(self._buffer) < end:
                    return None
                body = bytes(self._buffer[head.body_start : end])
            del self._buffer[:end]
            self._head = None
            return _with_body(head.response, body)

    def end_of_stream(self) -> Response:
        """The answer that the closed connection completes; ProtocolError when it is cut."""
        if self._head is None:
            self._head = self._parse_head()
        head = self._head
        if head is None:
            if self._buffer:
                raise ProtocolError(
                    f"connection closed in the middle of an answer's header "
                    f"({len(self._buffer)} bytes: {bytes(self._buffer[:40])!r})"
                )
            raise ProtocolError("connection closed without an answer")
        received = len(self._buffer) - head.body_start
        if head.chunked:
            raise ProtocolError(f"connection closed in a chunked body after {received} bytes")
        if head.length is not None:
            raise ProtocolError(
                f"connection closed after {received} of {head.length} body bytes (truncated)"
            )
        body = bytes(self._buffer[head.body_start :])
        self._buffer.clear()
        self._head = None
        return _with_body(head.response, body)

    def _parse_head(self) -> _Head | None:
        match = _HEAD_END.search(self._buffer)
        if match is None:
            if len(self._buffer) > self.max_head:
                raise ProtocolError(f"answer header longer than {self.max_head} bytes")
            return None
        if match.start() > self.max_head:
            raise ProtocolError(f"answer header longer than {self.max_head} bytes")
        text = bytes(self._buffer[: match.start()]).decode("latin-1")
        lines = text.replace("\r\n", "\n").split("\n")
        status = _STATUS_LINE.fullmatch(lines[0].strip())
        if status is None or status.group(1) != self.protocol:
            raise ProtocolError(f"not an {self.protocol} answer: {lines[0][:60]!r}")
        headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            if line[:1] in (" ", "\t") and headers:  # obsolete line folding
                name, value = headers[-1]
                headers[-1] = (name, f"{value} {line.strip()}")
                continue
            name, colon, value = line.partition(":")
            if not colon or not _TOKEN.fullmatch(name):
                raise ProtocolError(f"malformed header line {line[:60]!r}")
            headers.append((name, value.strip()))
        version = f"{status.group(1)}/{status.group(2)}.{status.group(3)}"
        reason = (status.group(5) or "").strip()
        response = Response(version, int(status.group(4)), reason, tuple(headers))
        chunked, length = self._framing(response)
        return _Head(response, match.end(), length, chunked)

    def _framing(self, response: Response) -> tuple[bool, int | None]:
        if self.protocol == "HTTP" and (response.status in (204, 304) or response.status < 200):
            return False, 0
        encoding = response.get("Transfer-Encoding")
        if encoding is not None and self.protocol == "HTTP":
            if encoding.lower().split(",")[-1].strip() != "chunked":
                raise ProtocolError(f"unsupported Transfer-Encoding {encoding!r}")
            return True, None
        lengths = {v.strip() for v in response.get_all("Content-Length")}
        if not lengths:
            return False, (None if self.protocol == "HTTP" else 0)
        if len(lengths) > 1 or not all(v.isdigit() for v in lengths):
            raise ProtocolError(f"invalid Content-Length {', '.join(sorted(lengths))!r}")
        length = int(lengths.pop())
        if length > self.max_body:
            raise ProtocolError(f"answer body of {length} bytes, more than {self.max_body}")
        return False, length

    def _dechunk(self, start: int) -> tuple[bytes, int] | None:
        """(body, end offset) once the whole chunked body and its trailer are buffered."""
        body = bytearray()
        position = start
        buffer = self._buffer
        while True:
            line_end = buffer.find(b"\n", position)
            if line_end < 0:
                return None
            size_text = bytes(buffer[position:line_end]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise ProtocolError(f"invalid chunk size {size_text[:20]!r}") from None
            position = line_end + 1
            if size == 0:
                break
            if len(body) + size > self.max_body:
                raise ProtocolError(f"chunked body of more than {self.max_body} bytes")
            if len(buffer) < position + size + 1:
                return None
            body += buffer[position : position + size]
            position += size
            if buffer[position : position + 2] == b"\r\n":
                position += 2
            elif buffer[position : position + 1] == b"\n":
                position += 1
            elif len(buffer) - position < 2:
                return None
            else:
                raise ProtocolError("chunk not followed by CRLF")
        while True:  # trailer fields, up to an empty line
            line_end = buffer.find(b"\n", position)
            if line_end < 0:
                return None
            empty = not buffer[position:line_end].strip()
            position = line_end + 1
            if empty:
                return bytes(body), position


def _with_body(response: Response, body: bytes) -> Response:
    return Response(response.version, response.status, response.reason, response.headers, body)


# --- authentication challenges (RFC 7235) and digest (RFC 7616, 2617, 2069) ---------------------


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str  # lowercase: "digest", "basic"
    params: dict[str, str] = field(default_factory=dict)  # lowercase names


_LEX = re.compile(r'"((?:[^"\\]|\\.)*)"|([^\s,="]+)|([,=])|\s+|(.)', re.S)


def parse_challenges(values: Iterable[str]) -> list[Challenge]:
    """Every challenge of WWW-Authenticate header values (several may share one value)."""
    challenges: list[Challenge] = []
    for value in values:
        items: list[tuple[str, str]] = []
        for match in _LEX.finditer(value):
            quoted, token, separator, stray = match.groups()
            if stray is not None:
                raise ProtocolError(f"malformed authentication challenge {value[:80]!r}")
            if quoted is not None:
                items.append(("q", re.sub(r"\\(.)", r"\1", quoted)))
            elif token is not None:
                items.append(("t", token))
            elif separator is not None:
                items.append((separator, separator))
        current: Challenge | None = None
        i = 0
        while i < len(items):
            kind, text = items[i]
            if kind == ",":
                i += 1
            elif kind == "t" and current is not None and items[i + 1 : i + 2] == [("=", "=")]:
                if i + 2 < len(items) and items[i + 2][0] in ("t", "q"):
                    current.params[text.lower()] = items[i + 2][1]
                    i += 3
                else:  # token68 (base64 padding), e.g. "Negotiate abc=="
                    i += 1
                    while i < len(items) and items[i][0] == "=":
                        i += 1
            elif kind == "t":
                current = Challenge(text.lower())
                challenges.append(current)
                i += 1
            else:
                raise ProtocolError(f"malformed authentication challenge {value[:80]!r}")
    return challenges


_HASHES: Final = {"MD5": "md5", "SHA-256": "sha256"}  # digest algorithm -> hashlib name


@dataclass(frozen=True, slots=True)
class DigestChallenge:
    realm: str
    nonce: str
    qop: tuple[str, ...] = ()
    algorithm: str | None = None  # as the server wrote it; None means MD5
    opaque: str | None = None
    stale: bool = False

    @classmethod
    def from_challenge(cls, challenge: Challenge) -> DigestChallenge:
        params = challenge.params
        if "realm" not in params or "nonce" not in params:
            raise ProtocolError("Digest challenge without realm or nonce")
        qop = tuple(q.strip().lower() for q in params.get("qop", "").split(",") if q.strip())
        return cls(
            realm=params["realm"],
            nonce=params["nonce"],
            qop=qop,
            algorithm=params.get("algorithm"),
            opaque=params.get("opaque"),
            stale=params.get("stale", "").lower() == "true",
        )

    @property
    def hash_name(self) -> str:
        return (self.algorithm or "MD5").upper().removesuffix("-SESS")

    @property
    def session(self) -> bool:
        return (self.algorithm or "").upper().endswith("-SESS")

    @property
    def supported(self) -> bool:
        return self.hash_name in _HASHES and (not self.qop or "auth" in self.qop)


def select_digest(challenges: Iterable[Challenge]) -> DigestChallenge | None:
    """The first Digest challenge this client can answer (servers list their preferred first)."""
    for challenge in challenges:
        if challenge.scheme == "digest":
            digest = DigestChallenge.from_challenge(challenge)
            if digest.supported:
                return digest
    return None


def digest_response(
    challenge: DigestChallenge,
    username: str,
    password: str,
    method: str,
    uri: str,
    *,
    nc: int = 1,
    cnonce: str = "",
) -> str:
    """The `response` value: with qop=auth (RFC 2617/7616) or without qop (RFC 2069)."""

    def h(text: str) -> str:
        return hashlib.new(_HASHES[challenge.hash_name], text.encode()).hexdigest()

    ha1 = h(f"{username}:{challenge.realm}:{password}")
    if challenge.session:
        ha1 = h(f"{ha1}:{challenge.nonce}:{cnonce}")
    ha2 = h(f"{method}:{uri}")
    if challenge.qop:
        return h(f"{ha1}:{challenge.nonce}:{nc:08x}:{cnonce}:auth:{ha2}")
    return h(f"{ha1}:{challenge.nonce}:{ha2}")


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def digest_authorization(
    challenge: DigestChallenge,
    username: str,
    password: str,
    method: str,
    uri: str,
    *,
    nc: int = 1,
    cnonce: str = "",
) -> str:
    """The Authorization header value answering `challenge`."""
    if not challenge.supported:
        raise ValueError(f"unsupported digest challenge {challenge}")
    response = digest_response(challenge, username, password, method, uri, nc=nc, cnonce=cnonce)
    parts = [
        f"username={_quote(username)}",
        f"realm={_quote(challenge.realm)}",
        f"nonce={_quote(challenge.nonce)}",
        f"uri={_quote(uri)}",
    ]
    if challenge.algorithm is not None:
        parts.append(f"algorithm={challenge.algorithm}")
    if challenge.qop:
        parts += ["qop=auth", f"nc={nc:08x}", f"cnonce={_quote(cnonce)}"]
    parts.append(f"response={_quote(response)}")
    if challenge.opaque is not None:
        parts.append(f"opaque={_quote(challenge.opaque)}")
    return "Digest " + ", ".join(parts)


class DigestSession:
    """Client digest state for one peer: the last challenge (reused, nc counting up, so that a
    poll does not cost a 401 round trip each time) and when a 401 means "wrong password".

    Per request: `authorization()` before sending; on a 401, `challenged()` either takes the
    new challenge (send again) or raises AuthenticationError.
    """

    def __init__(
        self,
        username: str | None,
        password: str | None,
        *,
        protocol: str = "HTTP",
        cnonce: Callable[[], str] = lambda: secrets.token_hex(8),
    ) -> None:
        self.username = username
        self.password = password
        self.protocol = protocol
        self._cnonce = cnonce
        self.challenge: DigestChallenge | None = None
        self._nc = 0
        self._fresh = False  # the challenge came with a 401 of the current exchange

    def start(self) -> None:
        """Marks the start of a new exchange (a new request, not a retry)."""
        self._fresh = False

    def authorization(self, method: str, uri: str) -> str | None:
        if self.challenge is None or self.username is None or self.password is None:
            return None
        self._nc += 1
        return digest_authorization(
            self.challenge,
            self.username,
            self.password,
            method,
            uri,
            nc=self._nc,
            cnonce=self._cnonce(),
        )

    def challenged(self, response: Response, *, sent: bool) -> None:
        """Takes the challenge of a 401 answer, or raises AuthenticationError saying why not."""
        label = f"{self.protocol} {response.status_text}"
        challenges = parse_challenges(response.get_all("WWW-Authenticate"))
        digest = select_digest(challenges)
        if self.username is None or self.password is None:
            raise AuthenticationError(
                f"camera wants a user name and password ({label}): "
                "set username and password in the connection"
            )
        if digest is None:
            schemes = sorted({c.scheme for c in challenges})
            if schemes == ["basic"]:
                raise AuthenticationError(
                    f"camera offers only Basic authentication ({label}), which sends the password "
                    "in clear text: enable Digest authentication on the camera"
                )
            offered = ", ".join(schemes) or "no challenge"
            raise AuthenticationError(f"camera asks for unsupported authentication ({offered})")
        if sent and self._fresh and not digest.stale:
            self.challenge = None
            raise AuthenticationError(f"camera refused the credentials ({label}, Digest)")
        self.challenge = digest
        self._nc = 0
        self._fresh = True


# --- the small I/O part ---------------------------------------------------------------------


async def open_stream(
    host: str,
    port: int,
    *,
    deadline: float,
    ssl_context: ssl.SSLContext | None = None,
) -> _Streams:
    """A connection by `deadline` (event-loop time); NotConnected or TlsError otherwise."""
    address = host_port(host, port)
    try:
        async with asyncio.timeout_at(deadline):
            return await asyncio.open_connection(
                host, port, ssl=ssl_context, server_hostname=host if ssl_context else None
            )
    except TimeoutError:
        raise NotConnected(address, "no connection (no answer to the TCP handshake)") from None
    except ssl.SSLCertVerificationError as error:
        raise TlsError(
            f"certificate verify failed: {error.verify_message} "
            "(a camera with a self-signed certificate needs verify_tls: false)"
        ) from error
    except ssl.SSLError as error:
        raise TlsError(f"TLS handshake failed: {error.reason or error}") from error
    except OSError as error:
        reason = os.strerror(error.errno) if error.errno else str(error)
        raise NotConnected(address, f"cannot connect: {reason.lower()}") from error


async def read_response(
    reader: asyncio.StreamReader, parser: ResponseParser, address: str
) -> Response:
    """The next answer; DeviceUnreachable when the connection closes before any of it."""
    while (response := parser.next_response()) is None:
        data = await reader.read(65536)
        if not data:
            if parser.idle:
                raise DeviceUnreachable(address, "connection closed without an answer")
            return parser.end_of_stream()  # ProtocolError when it is cut short
        parser.feed(data)
    return response


async def exchange(
    host: str,
    port: int,
    request: bytes,
    *,
    deadline: float,
    ssl_context: ssl.SSLContext | None = None,
    max_body: int = MAX_BODY,
) -> Response:
    """One request on a new connection, its answer, and the connection closed.

    NotConnected: no connection; DeviceTimeout: no (complete) answer by `deadline`;
    DeviceUnreachable: closed or reset without an answer; ProtocolError: a broken answer.
    """
    address = host_port(host, port)
    reader, writer = await open_stream(host, port, deadline=deadline, ssl_context=ssl_context)
    try:
        async with asyncio.timeout_at(deadline):
            writer.write(request)
            await writer.drain()
            return await read_response(reader, ResponseParser("HTTP", max_body=max_body), address)
    except TimeoutError:
        raise DeviceTimeout(address, "no complete answer in time") from None
    except ssl.SSLError as error:
        raise TlsError(f"TLS error: {error.reason or error}") from error
    except OSError as error:
        raise DeviceUnreachable(address, f"connection lost: {error.strerror or error}") from error
    finally:
        writer.transport.abort()
