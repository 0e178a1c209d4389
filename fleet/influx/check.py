"""`campus-fleet influx check`: can the sink write where the config says, and if not, why.

Rules: steps run in order and stop at the first failure (later ones would only fail with it);
each failure carries the exit code of fleet/clikit.py: 1 the server cannot be reached, 2 the
configuration is wrong (secret, credentials, mode), 3 the bucket, org, database or retention
policy does not exist. Nothing is written: v2 asks the buckets API (or, on servers without one,
posts an empty body), v1 asks /query. Secrets go into headers only, never into messages.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from fleet.influx.settings import InfluxSettings, InfluxV1, InfluxV2, SecretError
from fleet.influx.transport import Endpoint, basic_auth, describe, server_message

RUNTIME, CONFIG, NOT_FOUND = 1, 2, 3


@dataclass(frozen=True, slots=True)
class Step:
    name: str
    ok: bool
    message: str
    code: int = 0


class _Failed(Exception):
    def __init__(self, step: Step) -> None:
        self.step = step


def run_check(settings: InfluxSettings) -> list[Step]:
    """The steps that ran; the last one failed unless all passed."""
    endpoint = Endpoint(
        settings.url,
        settings.timeout_s,
        str(settings.ca_file) if settings.ca_file else None,
        settings.verify_tls,
    )
    steps: list[Step] = []
    checks = _v1(settings, endpoint) if isinstance(settings, InfluxV1) else _v2(settings, endpoint)
    try:
        for step in checks:
            steps.append(step)
    except _Failed as failure:
        steps.append(failure.step)
    finally:
        endpoint.close()
    return steps


def _get(
    endpoint: Endpoint,
    method: str,
    path: str,
    headers: Mapping[str, str],
    body: bytes | None = None,
) -> tuple[int, http.client.HTTPMessage, bytes]:
    try:
        return endpoint.request(method, path, body, headers)
    except (OSError, http.client.HTTPException) as exc:
        raise _Failed(
            Step("reachable", False, f"cannot reach {endpoint.where}: {describe(exc)}", RUNTIME)
        ) from None


def _secret(read: Callable[[], str | None], what: str) -> tuple[Step, str | None]:
    try:
        value = read()
    except SecretError as exc:
        raise _Failed(Step(what, False, str(exc), CONFIG)) from None
    message = f"{what} read" if value else f"no {what} configured"
    return Step(what, True, message), value


def _ping(endpoint: Endpoint) -> tuple[Step, str]:
    status, headers, body = _get(endpoint, "GET", "/ping", {})
    version = headers.get("X-Influxdb-Version", "")
    if not 200 <= status < 300:
        message = f"{endpoint.where} answered /ping with HTTP {status}: {server_message(body)}"
        raise _Failed(Step("reachable", False, message, RUNTIME))
    server = f"InfluxDB {version}" if version else "the server"
    return Step("reachable", True, f"{server} answered /ping at {endpoint.where}"), version


def _v2(settings: InfluxV2, endpoint: Endpoint) -> Iterator[Step]:
    step, token = _secret(settings.token, "token")
    yield step
    step, version = _ping(endpoint)
    yield step
    headers = {"Authorization": f"Token {token}"} if token else {}
    query = urlencode({"name": settings.bucket, "org": settings.org})
    status, _, body = _get(endpoint, "GET", f"/api/v2/buckets?{query}", headers)
    data = _json(body)
    if status in (401, 403):
        raise _Failed(Step("credentials", False, _refused(status, body, "token"), CONFIG))
    if status == 200 and isinstance(data, dict):
        names = [b.get("name") for b in data.get("buckets", []) if isinstance(b, dict)]
        if settings.bucket in names:
            yield Step("credentials", True, "the token may read buckets")
            yield Step("bucket", True, f"bucket {settings.bucket!r} exists in org {settings.org!r}")
            return
        # Not listed: missing, or a write-only token that may not list buckets.
    elif status == 404 and isinstance(data, dict) and "code" in data:  # InfluxDB 2.x: the org
        raise _Failed(Step("bucket", False, server_message(body), NOT_FOUND))
    yield from _v2_probe(settings, endpoint, headers, version)


def _v2_probe(
    settings: InfluxV2, endpoint: Endpoint, headers: dict[str, str], version: str
) -> Iterator[Step]:
    """An empty write, for servers without a buckets API (VictoriaMetrics, InfluxDB 3, 1.x) and
    tokens that may write but not list buckets: auth and bucket are checked before the body."""
    query = urlencode({"org": settings.org, "bucket": settings.bucket, "precision": "ns"})
    status, _, body = _get(endpoint, "POST", f"/api/v2/write?{query}", headers, b"")
    if status in (401, 403):
        raise _Failed(Step("credentials", False, _refused(status, body, "token"), CONFIG))
    if status == 404:
        if version.startswith("1."):
            message = f"InfluxDB {version} has no /api/v2 API: use mode: v1 with a database"
            raise _Failed(Step("bucket", False, message, CONFIG))
        message = f"bucket {settings.bucket!r} not found: {server_message(body)}"
        raise _Failed(Step("bucket", False, message, NOT_FOUND))
    if not (200 <= status < 300 or status == 400):  # 400: an empty body, after auth and bucket
        message = f"/api/v2/write answered HTTP {status}: {server_message(body)}"
        raise _Failed(Step("bucket", False, message, RUNTIME))
    yield Step("credentials", True, "the write endpoint accepted the token")
    yield Step(
        "bucket",
        True,
        f"the write endpoint accepts bucket {settings.bucket!r} "
        "(no buckets API, or the token may not list buckets)",
    )


def _v1(settings: InfluxV1, endpoint: Endpoint) -> Iterator[Step]:
    password: str | None = None
    if settings.username is not None:
        step, password = _secret(settings.password, "password")
        yield step
    step, version = _ping(endpoint)
    if version and not version.startswith("1."):
        message = (
            f"{step.message}; InfluxDB {version} takes mode: v1 writes only with a DBRP mapping"
        )
        step = Step(step.name, True, message)
    yield step
    headers = (
        {"Authorization": basic_auth(settings.username, password or "")}
        if settings.username is not None
        else {}
    )
    who = f"user {settings.username!r}" if settings.username else None
    databases = _query(endpoint, headers, "SHOW DATABASES", who)
    yield Step("credentials", True, f"{who or 'no user configured'}: SHOW DATABASES answered")
    if settings.database not in databases:
        shown = ", ".join(databases) or "none visible"
        message = f"no database {settings.database!r} (databases: {shown})"
        raise _Failed(Step("database", False, message, NOT_FOUND))
    yield Step("database", True, f"database {settings.database!r} exists")
    if settings.retention_policy:
        database = settings.database.replace('"', '\\"')
        policies = _query(endpoint, headers, f'SHOW RETENTION POLICIES ON "{database}"', who)
        if settings.retention_policy not in policies:
            message = f"no retention policy {settings.retention_policy!r} on {settings.database!r}"
            raise _Failed(Step("retention policy", False, message, NOT_FOUND))
        yield Step("retention policy", True, f"{settings.retention_policy!r} exists")


def _query(endpoint: Endpoint, headers: Mapping[str, str], q: str, who: str | None) -> list[str]:
    """First column of an InfluxQL SHOW query's rows."""
    status, _, body = _get(endpoint, "GET", f"/query?{urlencode({'q': q})}", headers)
    if status in (401, 403):
        message = (
            _refused(status, body, who)
            if who
            else f"the server requires a user (HTTP {status}): set username and password_file"
        )
        raise _Failed(Step("credentials", False, message, CONFIG))
    data = _json(body)
    results = data.get("results") if isinstance(data, dict) else None
    if status != 200 or not isinstance(results, list) or not results:
        message = f"/query answered HTTP {status}: {server_message(body)}"
        raise _Failed(Step("credentials", False, message, RUNTIME))
    first = results[0]
    if "error" in first:
        message = f"{who or 'no user configured'}: {first['error']}"
        raise _Failed(Step("credentials", False, message, CONFIG))
    return [str(row[0]) for series in first.get("series", []) for row in series["values"]]


def _refused(status: int, body: bytes, who: str) -> str:
    return f"the server refused the {who} (HTTP {status}): {server_message(body)}"


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None
