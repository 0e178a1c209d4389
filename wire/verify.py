"""Checking the fleet's Ed25519 signatures, for the gateway: small in memory.

The gateway only verifies; the fleet signs (`wire.signing`, with the `cryptography` package).
Verification goes through the OpenSSL libcrypto that Python's `ssl` module has already loaded
(ctypes, EVP_DigestVerify), which costs the agent no memory, where importing `cryptography`
costs it about 8 MB of its 45 MB budget. Without a usable libcrypto (OpenSSL < 1.1.1) it falls
back to `cryptography`.

Documents are JSON made canonical (sorted keys, no spaces, UTF-8), so the same data always gives
the same bytes in any language: the signature covers the envelope (kind, site, gateway, version,
issue time, key id, body hash) and `sha256` covers the body.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import ctypes.util
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wire.control import SignedDocument
from wire.errors import WireError

# DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410): SEQUENCE { SEQUENCE { OID
# 1.3.101.112 }, BIT STRING (33 bytes: 0 unused bits + the 32-byte key) }.
_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
_PEM_LABEL = "PUBLIC KEY"
_EVP_PKEY_ED25519 = 1087  # NID_ED25519


class SignatureError(WireError):
    """A document that must not be applied: unsigned, tampered, or signed by an unknown key."""


class KeyFileError(WireError):
    """A key file that is missing, unreadable or not an Ed25519 key."""


def canonical(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def body_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(body)).hexdigest()


def key_id_of(raw: bytes) -> str:
    """First 16 hex digits of the SHA-256 of the raw public key: names the key in documents."""
    return hashlib.sha256(raw).hexdigest()[:16]


def signed_part(document: SignedDocument) -> bytes:
    return canonical(document.model_dump(mode="json", exclude={"signature", "body"}))


@dataclass(frozen=True)
class PublicKey:
    """A raw 32-byte Ed25519 public key."""

    raw: bytes

    @property
    def key_id(self) -> str:
        return key_id_of(self.raw)


def load_public_key(data: bytes, where: str) -> PublicKey:
    """An Ed25519 public key from PEM (SubjectPublicKeyInfo, as `keys generate` writes)."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise KeyFileError(f"public key {where}: not a PEM file (binary data)") from None
    begin, end = f"-----BEGIN {_PEM_LABEL}-----", f"-----END {_PEM_LABEL}-----"
    if begin not in text or end not in text:
        raise KeyFileError(f"public key {where}: not a PEM public key ({begin} … {end})")
    body = text.split(begin, 1)[1].split(end, 1)[0]
    try:
        der = base64.b64decode("".join(body.split()), validate=True)
    except (binascii.Error, ValueError):
        raise KeyFileError(f"public key {where}: the PEM body is not base64") from None
    if len(der) != len(_SPKI_PREFIX) + 32 or not der.startswith(_SPKI_PREFIX):
        raise KeyFileError(f"public key {where}: not an Ed25519 key")
    return PublicKey(der[len(_SPKI_PREFIX) :])


def load_public_key_file(path: Path) -> PublicKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"public key {path}: {exc.strerror or exc}") from None
    return load_public_key(data, str(path))


def verify(document: SignedDocument, public_keys: list[PublicKey]) -> None:
    """Raises `SignatureError` unless a known key signed exactly this envelope and body."""
    if not document.signature:
        raise SignatureError(f"{document.kind} version {document.version} is not signed")
    keys = {key.key_id: key for key in public_keys}
    key = keys.get(document.key_id)
    if key is None:
        raise SignatureError(
            f"{document.kind} version {document.version} is signed by key {document.key_id}, "
            f"which this gateway does not trust (trusted: {', '.join(keys) or 'none'})"
        )
    try:
        signature = base64.b64decode(document.signature, validate=True)
    except (binascii.Error, ValueError):
        signature = b""
    if len(signature) != 64 or not verify_raw(key.raw, signature, signed_part(document)):
        raise SignatureError(
            f"{document.kind} version {document.version}: the signature does not match "
            "(tampered or corrupted)"
        )
    if body_hash(document.body) != document.sha256:
        raise SignatureError(
            f"{document.kind} version {document.version}: the body does not match its signed "
            "hash (tampered)"
        )


def verify_raw(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """True when `signature` is `public_key`'s Ed25519 signature of `message`."""
    if _LIBCRYPTO is not None:
        return _LIBCRYPTO.verify(public_key, signature, message)
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


class _Libcrypto:
    """EVP_DigestVerify with Ed25519 through OpenSSL's libcrypto (1.1.1 and 3.x)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        p = ctypes.c_void_p
        self.new_key = lib.EVP_PKEY_new_raw_public_key
        self.new_key.argtypes = [ctypes.c_int, p, ctypes.c_char_p, ctypes.c_size_t]
        self.new_key.restype = p
        self.free_key = lib.EVP_PKEY_free
        self.free_key.argtypes = [p]
        self.free_key.restype = None
        self.new_ctx = lib.EVP_MD_CTX_new
        self.new_ctx.argtypes = []
        self.new_ctx.restype = p
        self.free_ctx = lib.EVP_MD_CTX_free
        self.free_ctx.argtypes = [p]
        self.free_ctx.restype = None
        self.init = lib.EVP_DigestVerifyInit
        self.init.argtypes = [p, p, p, p, p]
        self.init.restype = ctypes.c_int
        self.check = lib.EVP_DigestVerify
        self.check.argtypes = [
            p,
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_char_p,
            ctypes.c_size_t,
        ]
        self.check.restype = ctypes.c_int
        self.clear_errors = lib.ERR_clear_error
        self.clear_errors.argtypes = []
        self.clear_errors.restype = None

    def verify(self, public_key: bytes, signature: bytes, message: bytes) -> bool:
        if len(public_key) != 32:
            return False
        key = self.new_key(_EVP_PKEY_ED25519, None, public_key, len(public_key))
        if not key:
            self.clear_errors()
            return False
        ctx = self.new_ctx()
        try:
            if not ctx or self.init(ctx, None, None, None, key) != 1:
                return False
            return bool(self.check(ctx, signature, len(signature), message, len(message)) == 1)
        finally:
            if ctx:
                self.free_ctx(ctx)
            self.free_key(key)
            self.clear_errors()  # a failed verification leaves an error on OpenSSL's queue


def _load_libcrypto() -> _Libcrypto | None:
    name = ctypes.util.find_library("crypto")
    if name is None:
        return None
    try:
        return _Libcrypto(ctypes.CDLL(name))
    except (OSError, AttributeError):  # no such library, or older than OpenSSL 1.1.1
        return None


_LIBCRYPTO = _load_libcrypto()
