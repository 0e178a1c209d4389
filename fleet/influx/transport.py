"""Posting line protocol to InfluxDB, and what each answer means for the points.

Rules: a transport writes one body and says how it went; it never retries on its own (the writer
decides). Blocking calls: run them in a thread. Answers are classified once, here:
2xx written; 401/403/404 a configuration problem (token, user, bucket, database, org), 413 too
large, other 4xx the points themselves (keep the good ones, reject the bad); 429, 5xx and
connection failures are worth retrying. Secrets go into request headers only.
"""

from __future__ import annotations

import base64
import gzip
import http.client
import json
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol
from urllib.parse import urlencode, urlsplit

import urllib3

from fleet.influx.settings import InfluxSettings, InfluxV1, InfluxV2
from wire.net import host_port

Failure = Literal["rejected", "too_large", "config", "retry"]
GZIP_LEVEL = 1  # line protocol compresses ~15x at level 1; higher levels cost 3-5x the CPU
MESSAGE_MAX = 500


@dataclass(frozen=True, slots=True)
class WriteError:
    """Why a write did not go in: `kind` decides what happens to the points."""

    kind: Failure
    message: str
    status: int | None = None
    retry_after_s: float | None = None

    def __str__(self) -> str:
        return f"HTTP {self.status}: {self.message}" if self.status else self.message


class Transport(Protocol):
    """Writes line protocol (a blocking call); None when the server took every point."""

    def write(self, body: bytes) -> WriteError | None: ...

    def close(self) -> None: ...


def server_message(body: bytes | str | None) -> str:
    """The error text of an answer: InfluxDB 1.x `{"error"}`, 2.x `{"message"}`, else the text."""
    if body is None:
        return ""
    text = body.decode(errors="replace") if isinstance(body, bytes) else body
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        for key in ("error", "message"):
            if isinstance(data.get(key), str):
                return str(data[key])[:MESSAGE_MAX]
    return " ".join(text.split())[:MESSAGE_MAX]


def classify(
    status: int, body: bytes | str | None, retry_after: str | None = None
) -> WriteError | None:
    if 200 <= status < 300:
        return None
    message = server_message(body) or http.client.responses.get(status, "error")
    if status in (401, 403):
        return WriteError("config", f"credentials refused: {message}", status)
    if status == 404:
        return WriteError("config", f"not found: {message}", status)
    if status == 413:
        return WriteError("too_large", message, status)
    if status == 429 or status >= 500:
        delay = float(retry_after) if retry_after and retry_after.isdigit() else None
        return WriteError("retry", message, status, delay)
    if 400 <= status < 500:
        return WriteError("rejected", message, status)
    return WriteError("config", f"unexpected answer: {message}", status)  # e.g. a redirect


def unreachable(where: str, exc: BaseException) -> WriteError:
    return WriteError("retry", f"cannot reach {where}: {describe(exc)}")


def describe(exc: BaseException) -> str:
    """An OS or HTTP client error in words, without a traceback."""
    while isinstance(exc, urllib3.exceptions.HTTPError) and exc.__context__ is not None:
        exc = exc.__context__
    if isinstance(exc, socket.gaierror):
        return f"host name not resolved ({exc.strerror})"
    if isinstance(exc, TimeoutError | socket.timeout | urllib3.exceptions.TimeoutError):
        return "no answer in time"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    reason = getattr(exc, "reason", None)
    if reason is not None:
        return describe(reason) if isinstance(reason, BaseException) else str(reason)
    return str(exc) or type(exc).__name__


class Endpoint:
    """One keep-alive HTTP(S) connection to a base URL (which may carry a path prefix)."""

    def __init__(
        self,
        url: str,
        timeout_s: float,
        ca_file: str | None = None,
        verify_tls: bool = True,
    ) -> None:
        parts = urlsplit(url)
        self.https = parts.scheme == "https"
        self.host = parts.hostname or "localhost"
        self.port = parts.port or (443 if self.https else 80)
        self.base = parts.path.rstrip("/")
        self.where = host_port(self.host, self.port)
        self.timeout_s = timeout_s
        self._context: ssl.SSLContext | None = None
        if self.https:
            self._context = ssl.create_default_context(cafile=ca_file)
            if not verify_tls:
                self._context.check_hostname = False
                self._context.verify_mode = ssl.CERT_NONE
        self._conn: http.client.HTTPConnection | None = None

    def _connect(self) -> http.client.HTTPConnection:
        if self.https:
            return http.client.HTTPSConnection(
                self.host, self.port, timeout=self.timeout_s, context=self._context
            )
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: Mapping[str, str] = {}
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        """Status, headers and body; raises OSError or http.client.HTTPException when there
        is no answer. A kept-alive connection the server closed meanwhile is retried once."""
        for attempt in (1, 2):
            reused = self._conn is not None
            conn = self._conn or self._connect()
            try:
                conn.request(method, self.base + path, body, dict(headers))
                response = conn.getresponse()
                data = response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if reused and attempt == 1:
                    continue
                raise
            except (OSError, http.client.HTTPException):
                self.close()
                raise
            self._conn = None if response.will_close else conn
            if response.will_close:
                conn.close()
            return response.status, response.headers, data
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def basic_auth(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


class V1Transport:
    """InfluxDB 1.x: POST /write?db=…&rp=…&precision=ns, gzip, basic authentication."""

    def __init__(self, settings: InfluxV1) -> None:
        self.settings = settings
        self.endpoint = Endpoint(
            settings.url,
            settings.timeout_s,
            str(settings.ca_file) if settings.ca_file else None,
            settings.verify_tls,
        )
        params = {"db": settings.database, "precision": "ns"}
        if settings.retention_policy:
            params["rp"] = settings.retention_policy
        self.path = f"/write?{urlencode(params)}"
        self.headers = {"Content-Type": "text/plain; charset=utf-8"}
        if settings.gzip:
            self.headers["Content-Encoding"] = "gzip"
        if settings.username is not None:
            self.headers["Authorization"] = basic_auth(settings.username, settings.password() or "")

    def write(self, body: bytes) -> WriteError | None:
        data = gzip.compress(body, GZIP_LEVEL) if self.settings.gzip else body
        try:
            status, headers, answer = self.endpoint.request("POST", self.path, data, self.headers)
        except (OSError, http.client.HTTPException) as exc:
            return unreachable(self.endpoint.where, exc)
        return classify(status, answer, headers.get("Retry-After"))

    def close(self) -> None:
        self.endpoint.close()


class V2Transport:
    """The InfluxDB v2 write API through influxdb-client: our own batches of pre-built line
    protocol (not `Point` objects), gzipped here at level 1 (the client's own gzip is level 9:
    3-5 times the CPU for a few percent smaller bodies)."""

    def __init__(self, settings: InfluxV2) -> None:
        from influxdb_client.client.influxdb_client import InfluxDBClient  # 0.2 s: only here
        from influxdb_client.rest import ApiException
        from influxdb_client.service.write_service import WriteService

        self.settings = settings
        self.where = urlsplit(settings.url).netloc
        self.refused = ApiException
        self.client = InfluxDBClient(
            url=settings.url,
            token=settings.token() or "",  # empty: no Authorization header
            org=settings.org,
            timeout=int(settings.timeout_s * 1000),
            verify_ssl=settings.verify_tls,
            ssl_ca_cert=str(settings.ca_file) if settings.ca_file else None,
        )
        self.service = WriteService(self.client.api_client)  # type: ignore[no-untyped-call]
        self.encoding = {"content_encoding": "gzip"} if settings.gzip else {}

    def write(self, body: bytes) -> WriteError | None:
        data = gzip.compress(body, GZIP_LEVEL) if self.settings.gzip else body
        try:
            self.service.post_write(  # type: ignore[no-untyped-call]
                org=self.settings.org,
                bucket=self.settings.bucket,
                body=data,
                precision="ns",
                content_type="text/plain; charset=utf-8",
                **self.encoding,
            )
        except self.refused as exc:
            headers: Mapping[str, str] = exc.headers or {}
            return classify(exc.status or 0, exc.body, headers.get("Retry-After"))
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            return unreachable(self.where, exc)
        return None

    def close(self) -> None:
        self.client.close()  # type: ignore[no-untyped-call]


def make_transport(settings: InfluxSettings) -> Transport:
    """Raises `SecretError` when the token or password cannot be read."""
    if isinstance(settings, InfluxV1):
        return V1Transport(settings)
    return V2Transport(settings)
