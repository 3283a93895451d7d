"""msgpack decoding with one error type, and typed field access for dstack's msgpack formats.

``msgpack.unpackb`` raises half a dozen exception types (``ValueError``, ``ExtraData``,
``FormatError``, ``StackError``, ``UnicodeDecodeError``, ``TypeError`` ...); callers of the
sans-IO layer want exactly one, :class:`CodecError`. Its built-in size limits default to the
input length, so a hostile length prefix cannot allocate more than the input holds.
"""

from __future__ import annotations

from typing import Any

import msgpack  # type: ignore[import-untyped]

from gateway.protocol.errors import CodecError

__all__ = ["as_bytes", "as_int", "as_list", "as_map", "as_str", "field", "pack", "unpack"]

_MAX_INPUT = 4 * 1024 * 1024


def unpack(data: bytes, what: str) -> Any:
    """One complete msgpack value (maps with string keys only; no trailing bytes)."""
    if len(data) > _MAX_INPUT:
        raise CodecError(f"{what}: {len(data)} bytes is larger than the {_MAX_INPUT} limit")
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises many unrelated types
        raise CodecError(f"{what}: not valid msgpack: {type(exc).__name__}: {exc}") from None


def pack(value: Any) -> bytes:
    """msgpack with bin for ``bytes`` and str for ``str`` (rmp_serde's choices)."""
    out: bytes = msgpack.packb(value, use_bin_type=True)
    return out


def as_map(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise CodecError(f"{what}: expected a map, got {type(value).__name__}")
    return value


def as_list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise CodecError(f"{what}: expected an array, got {type(value).__name__}")
    return value


def as_str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise CodecError(f"{what}: expected a string, got {type(value).__name__}")
    return value


def as_int(value: Any, what: str, *, lo: int = 0, hi: int = 2**64 - 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise CodecError(f"{what}: expected an integer in [{lo}, {hi}], got {value!r:.40}")
    return value


def as_bytes(value: Any, what: str) -> bytes:
    """A byte string sent either as msgpack bin or as an array of u8 (serde's ``Vec<u8>``)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, list):
        if not all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b <= 255 for b in value):
            raise CodecError(f"{what}: expected bytes (bin or an array of u8)")
        return bytes(value)
    raise CodecError(f"{what}: expected bytes, got {type(value).__name__}")


def field(m: dict[str, Any], key: str, what: str) -> Any:
    """``m[key]`` or a CodecError naming the missing key."""
    try:
        return m[key]
    except KeyError:
        raise CodecError(f"{what}: missing key {key!r}") from None
