"""RTSP probe codec (RFC 2326 / RFC 7826 message syntax), pure: OPTIONS and DESCRIBE only.

A probe asks whether the stream exists and what it carries (the SDP's media lines), then
closes: never SETUP or PLAY, so no video ever flows. Answers are parsed with the HTTP
codec's parser in RTSP mode; digest authentication is the HTTP codec's (RTSP uses RFC 2617's
scheme, often without qop, with the full rtsp:// URL as the digest uri).
"""

from __future__ import annotations

from typing import Final

from drivers.camera.http import USER_AGENT, ProtocolError, Response, format_request

VERSION: Final = "RTSP/1.0"


def request(
    method: str, url: str, cseq: int, *, authorization: str | None = None, accept: str | None = None
) -> bytes:
    headers = [("CSeq", str(cseq))]
    if accept is not None:
        headers.append(("Accept", accept))
    if authorization is not None:
        headers.append(("Authorization", authorization))
    headers.append(("User-Agent", USER_AGENT))
    return format_request(method, url, headers, version=VERSION)


def options(url: str, cseq: int, authorization: str | None = None) -> bytes:
    return request("OPTIONS", url, cseq, authorization=authorization)


def describe(url: str, cseq: int, authorization: str | None = None) -> bytes:
    return request("DESCRIBE", url, cseq, authorization=authorization, accept="application/sdp")


def check_cseq(response: Response, cseq: int) -> None:
    """ProtocolError when the answer carries another request's CSeq (a stale answer)."""
    answered = response.get("CSeq")
    if answered is not None and answered.strip() != str(cseq):
        raise ProtocolError(f"RTSP answer has CSeq {answered.strip()!r}, expected {cseq}")


def count_tracks(sdp: bytes) -> int:
    """How many media descriptions (`m=` lines) the SDP (RFC 4566) has; ProtocolError when the
    body is not an SDP session description."""
    lines = [line.strip() for line in sdp.decode("utf-8", "replace").splitlines()]
    lines = [line for line in lines if line]
    if not lines or lines[0] != "v=0":
        first = lines[0][:40] if lines else "an empty body"
        raise ProtocolError(f"DESCRIBE answer is not an SDP description (starts with {first!r})")
    return sum(1 for line in lines if line.startswith("m="))
