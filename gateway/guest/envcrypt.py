"""The encrypted environment: dstack's wire format, filtering and output files.

Wire format (``dstack-util/src/crypto.rs``), the bytes of ``.encrypted-env``::

    ephemeral_x25519_pub[32] || iv[12] || AES-256-GCM(plaintext) || tag[16]

The raw X25519 shared secret is the AES key (no KDF) and there is no AAD; an all-zero
shared secret (a low-order ephemeral key) is refused. The plaintext is JSON
``{"env":[{"key":..,"value":..},..]}`` as ``dstack_sdk.encrypt_env_vars`` makes it.

Only names listed in the measured ``allowed_envs`` survive; the host chooses the file, so
everything else in it is hostile: names are checked against ``^[A-Za-z_][A-Za-z0-9_]*$``
and sizes are capped exactly as upstream (``parse_env_file.rs``). Pure functions: the
boot writes the results.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "MAX_ENTRIES",
    "EnvError",
    "ParsedEnv",
    "decrypt_env",
    "encrypt_env",
    "env_public_key",
    "filter_env",
    "render_env_file",
    "render_env_json",
]

MAX_ENTRIES = 1024
MAX_KEY_BYTES = 255
MAX_VALUE_BYTES = 128 * 1024
MAX_TOTAL_BYTES = 1024 * 1024
_HEADER = 32 + 12
_TAG = 16
_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_QUOTE_TRIGGERS = frozenset(" \t|&;<>()$`\\\"'\n")


class EnvError(ValueError):
    """The encrypted environment is unusable; the message says why and what to check."""


@dataclass(frozen=True, slots=True)
class ParsedEnv:
    """The environment the app gets, and the names that were dropped (not allowed)."""

    env: Mapping[str, str]
    skipped: tuple[str, ...]


def env_public_key(env_crypt_key: bytes) -> bytes:
    """The X25519 public key deployers encrypt to (``GetAppEnvEncryptPubKey``)."""
    return (
        X25519PrivateKey.from_private_bytes(env_crypt_key)
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )


def encrypt_env(
    public_key: bytes, env: Iterable[tuple[str, str]], *, iv: bytes | None = None
) -> bytes:
    """Encrypt like ``dstack_sdk.encrypt_env_vars`` (returns raw bytes, not hex)."""
    plaintext = json.dumps({"env": [{"key": k, "value": v} for k, v in env]}).encode()
    eph = X25519PrivateKey.generate()
    shared = eph.exchange(X25519PublicKey.from_public_bytes(public_key))
    nonce = iv if iv is not None else secrets.token_bytes(12)
    eph_pub = eph.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return eph_pub + nonce + AESGCM(shared).encrypt(nonce, plaintext, None)


def decrypt_env(env_crypt_key: bytes, blob: bytes) -> bytes:
    """The plaintext of an ``.encrypted-env`` blob; raises :class:`EnvError`."""
    if len(env_crypt_key) != 32:
        raise EnvError(f"env_crypt_key is {len(env_crypt_key)} bytes, expected 32")
    if len(blob) < _HEADER + _TAG:
        raise EnvError(
            f".encrypted-env is truncated ({len(blob)} bytes; at least {_HEADER + _TAG} "
            "needed for key, IV and tag): re-encrypt and redeploy it"
        )
    try:
        peer = X25519PublicKey.from_public_bytes(blob[:32])
        shared = X25519PrivateKey.from_private_bytes(env_crypt_key).exchange(peer)
    except ValueError:  # cryptography refuses an all-zero shared secret
        raise EnvError(".encrypted-env carries a low-order ephemeral key; refused") from None
    if shared == bytes(32):
        raise EnvError(".encrypted-env carries a low-order ephemeral key; refused")
    try:
        return AESGCM(shared).decrypt(blob[32:_HEADER], blob[_HEADER:], None)
    except InvalidTag:
        raise EnvError(
            ".encrypted-env does not decrypt with this app's env key (wrong key, or the "
            "file was tampered with): encrypt it to the app's current env public key"
        ) from None


def filter_env(plaintext: bytes, allowed_envs: Iterable[str]) -> ParsedEnv:
    """Parse the decrypted JSON and keep only allowed, valid variables.

    Limits as upstream: at most 1024 entries (counted before filtering); allowed names
    must match ``^[a-zA-Z_][a-zA-Z0-9_]*$`` and be at most 255 bytes; values at most
    128 KiB; keys and values together at most 1 MiB. A later duplicate wins.
    """
    try:
        doc = json.loads(plaintext)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise EnvError(f"decrypted env is not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("env"), list):
        raise EnvError('decrypted env must be {"env": [{"key": ..., "value": ...}, ...]}')
    entries = doc["env"]
    if len(entries) > MAX_ENTRIES:
        raise EnvError(f"decrypted env has {len(entries)} entries, at most {MAX_ENTRIES}")
    allowed = frozenset(allowed_envs)
    env: dict[str, str] = {}
    skipped: list[str] = []
    for i, item in enumerate(entries):
        if not isinstance(item, dict):
            raise EnvError(f"env[{i}] is not an object")
        key, value = item.get("key"), item.get("value")
        if not isinstance(key, str) or not isinstance(value, str):
            raise EnvError(f"env[{i}]: key and value must be strings")
        if key not in allowed:
            skipped.append(key)
            continue
        if len(key.encode()) > MAX_KEY_BYTES:
            raise EnvError(f"env name {key[:32]!r}... is longer than {MAX_KEY_BYTES} bytes")
        if not _NAME.fullmatch(key):
            raise EnvError(f"env name {key!r} is not a valid name ([A-Za-z_][A-Za-z0-9_]*)")
        if len(value.encode()) > MAX_VALUE_BYTES:
            raise EnvError(f"value of {key} is larger than {MAX_VALUE_BYTES} bytes")
        env[key] = value
    total = sum(len(k.encode()) + len(v.encode()) for k, v in env.items())
    if total > MAX_TOTAL_BYTES:
        raise EnvError(f"env is {total} bytes in total, at most {MAX_TOTAL_BYTES}")
    return ParsedEnv(env=dict(sorted(env.items())), skipped=tuple(skipped))


def _escape(value: str) -> str:
    quote = any(ch in _QUOTE_TRIGGERS for ch in value)
    out = value.replace("\n", "\\n").replace('"', '\\"').replace("$", "\\$").replace("`", "\\`")
    return f'"{out}"' if quote else out


def render_env_file(env: Mapping[str, str]) -> str:
    """``.decrypted-env``: ``KEY=value`` lines, sorted, escaped like upstream."""
    return "".join(f"{k}={_escape(env[k])}\n" for k in sorted(env))


def render_env_json(env: Mapping[str, str]) -> bytes:
    """``.decrypted-env.json``: compact, sorted JSON object."""
    return json.dumps(dict(sorted(env.items())), separators=(",", ":"), ensure_ascii=False).encode()
