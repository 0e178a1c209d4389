"""rtsp:// URLs of camera streams: parsed without the RTSP codec, so that a camera's
`connection:` is checked when a config loads without loading the probe itself."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote, urlsplit

DEFAULT_PORT: Final = 554


@dataclass(frozen=True, slots=True)
class RtspTarget:
    host: str
    port: int
    url: str  # what goes on the request line: the configured URL without user:password@
    username: str | None = None
    password: str | None = None


def parse_url(url: str) -> RtspTarget:
    """rtsp://[user:password@]host[:port]/path; ValueError for anything else."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "rtsp":
        raise ValueError(f"{url!r} is not an rtsp:// URL")
    try:
        host, port = parts.hostname, parts.port
    except ValueError as error:
        raise ValueError(f"{url!r}: {error}") from None
    if not host:
        raise ValueError(f"{url!r} has no host")
    port = port or DEFAULT_PORT
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{port}"
    clean = f"rtsp://{netloc}{parts.path or '/'}" + (f"?{parts.query}" if parts.query else "")
    username = None if parts.username is None else unquote(parts.username)
    password = None if parts.password is None else unquote(parts.password)
    return RtspTarget(host, port, clean, username, password)
