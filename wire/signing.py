"""Ed25519 signatures over canonical JSON: what the fleet pushes is what the gateway runs.

A signed document carries its body, the SHA-256 of the body's canonical JSON, and a signature over
the canonical JSON of everything else in the envelope (kind, site, gateway, version, issue time,
key id, body hash). Canonical JSON = sorted keys, no spaces, UTF-8: the same data always gives the
same bytes, in Python and in any other client.

Keys are files: the private key PEM (PKCS#8, mode 0600) stays with the fleet service; the public key
(PEM, SubjectPublicKeyInfo) goes into every gateway's bootstrap bundle. Gateways verify with
`wire.verify`, which does not need the `cryptography` package.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from wire.control import SignedDocument
from wire.verify import (
    KeyFileError,
    PublicKey,
    SignatureError,
    body_hash,
    canonical,
    key_id_of,
    signed_part,
)
from wire.verify import verify as verify_raw_keys

__all__ = [
    "KeyFileError",
    "SignatureError",
    "body_hash",
    "canonical",
    "generate_key",
    "key_id",
    "load_private_key",
    "load_public_key",
    "load_public_key_file",
    "public_path",
    "public_pem",
    "sign",
    "verify",
]


def key_id(public_key: Ed25519PublicKey) -> str:
    """First 16 hex digits of the SHA-256 of the raw public key: names the key in documents."""
    return key_id_of(raw_public(public_key))


def raw_public(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _signed_part(document: SignedDocument) -> bytes:
    return signed_part(document)


def sign(
    private_key: Ed25519PrivateKey,
    *,
    kind: Literal["config", "policy"],
    site: str,
    gateway: str,
    version: int,
    issued_ns: int,
    body: dict[str, Any],
) -> SignedDocument:
    unsigned = SignedDocument(
        kind=kind,
        site=site,
        gateway=gateway,
        version=version,
        issued_ns=issued_ns,
        key_id=key_id(private_key.public_key()),
        sha256=body_hash(body),
        body=body,
        signature="",
    )
    signature = private_key.sign(_signed_part(unsigned))
    return unsigned.model_copy(update={"signature": base64.b64encode(signature).decode()})


def verify(document: SignedDocument, public_keys: Sequence[PublicKey | Ed25519PublicKey]) -> None:
    """`wire.verify.verify` for keys of either kind (raw, or `cryptography`'s)."""
    verify_raw_keys(
        document,
        [key if isinstance(key, PublicKey) else PublicKey(raw_public(key)) for key in public_keys],
    )


def generate_key(path: Path) -> Ed25519PublicKey:
    """Writes a new private key (0600) at `path` and its public key at `path.pub`."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    public = key.public_key()
    public_path(path).write_bytes(public_pem(public))
    return public


def public_path(private_path: Path) -> Path:
    return private_path.with_name(private_path.name + ".pub")


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise KeyFileError(f"signing key {path}: {exc.strerror or exc}") from None
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"signing key {path}: not a PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"signing key {path}: not an Ed25519 key")
    return key


def load_public_key(data: bytes, where: str) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"public key {where}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"public key {where}: not an Ed25519 key")
    return key


def load_public_key_file(path: Path) -> Ed25519PublicKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"public key {path}: {exc.strerror or exc}") from None
    return load_public_key(data, str(path))
