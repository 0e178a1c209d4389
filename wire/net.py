"""Host names and addresses as people write them in config files and as logs should show them."""

from __future__ import annotations


def host_port(host: str, port: int) -> str:
    """`host:port`, with an IPv6 literal in brackets (`[fd00::1]:1883`)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bare_host(value: str) -> str:
    """A host name or address; an IPv6 literal written in brackets is accepted without them."""
    value = value.strip()
    if value.startswith("[") and value.endswith("]"):
        value = value[1:-1]
    if not value or any(c in value for c in " /[]"):
        raise ValueError(f"{value!r} is not a host name or address")
    return value
