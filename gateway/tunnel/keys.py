"""WireGuard keys: X25519, written as standard base64 exactly like ``wg genkey``/``wg pubkey``.

The registration RPC receives a CVM's public key as base64 text; :func:`decode_key` is the one
place that text becomes 32 bytes, so a key that is not strict base64 of exactly 32 bytes is
rejected with the same message everywhere. The UAPI protocol wants the same bytes as hex
(:func:`key_hex`).
"""

from __future__ import annotations

import base64
import binascii

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

__all__ = [
    "KEY_LEN",
    "WgKeyError",
    "decode_key",
    "encode_key",
    "generate_private_key",
    "key_from_hex",
    "key_hex",
    "public_key",
]

KEY_LEN = 32


class WgKeyError(ValueError):
    """The text is not a WireGuard key (standard base64 of exactly 32 bytes)."""


def decode_key(text: str) -> bytes:
    """Base64 key text -> 32 bytes; raises :class:`WgKeyError` saying what is wrong."""
    if not isinstance(text, str):
        raise WgKeyError(f"a WireGuard key must be a base64 string, got {type(text).__name__}")
    stripped = text.strip()
    if len(stripped) != 44 or not stripped.endswith("="):
        raise WgKeyError(
            f"a WireGuard key is 44 characters of base64 (32 bytes), got {len(stripped)} characters"
        )
    try:
        raw = base64.b64decode(stripped, validate=True)
    except (binascii.Error, ValueError):
        raise WgKeyError("a WireGuard key must be standard base64 (A-Z a-z 0-9 + /)") from None
    if len(raw) != KEY_LEN:
        raise WgKeyError(f"a WireGuard key decodes to 32 bytes, got {len(raw)}")
    return raw


def encode_key(raw: bytes) -> str:
    """32 bytes -> base64 text as ``wg`` prints it."""
    if len(raw) != KEY_LEN:
        raise WgKeyError(f"a WireGuard key is 32 bytes, got {len(raw)}")
    return base64.b64encode(raw).decode("ascii")


def key_hex(text: str) -> str:
    """Base64 key text -> the lowercase hex form used by the UAPI protocol."""
    return decode_key(text).hex()


def key_from_hex(hex_text: str) -> str:
    """UAPI hex -> base64 key text; raises :class:`WgKeyError`."""
    try:
        raw = bytes.fromhex(hex_text)
    except ValueError:
        raise WgKeyError(f"not a hex key: {hex_text[:16]!r}...") from None
    return encode_key(raw)


def generate_private_key() -> str:
    """A fresh private key, base64 (as ``wg genkey``; X25519 clamps when it is used)."""
    raw = X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return encode_key(raw)


def public_key(private_key: str) -> str:
    """The public key of a base64 private key, base64 (as ``wg pubkey``)."""
    priv = X25519PrivateKey.from_private_bytes(decode_key(private_key))
    raw = priv.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return encode_key(raw)
