"""dstack's app-info certificate extension (OID 1.3.6.1.4.1.62397.1.9).

A KMS-signed certificate may carry the app's identity as ``rmp_serde::to_vec(AppInfo)``: a
msgpack **array** in field order (rmp_serde's default, positional)::

    [app_id bin, compose_hash bin, instance_id bin, device_id bin, mr_system bin32,
     mr_aggregated bin32, os_image_hash bin, key_provider_info bin,
     init_script_hashes (nil | [bin, ...])]

Older writers stop after ``key_provider_info``; named writers (``to_vec_named``) send a map
with the same keys. We accept all three, and byte fields as bin or as arrays of u8. These
values are the issuer's claims: they are trusted only as far as the certificate chain is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.protocol import mpack
from gateway.protocol.errors import CodecError

__all__ = ["AppInfo", "decode_app_info", "encode_app_info"]

_FIELDS = (
    "app_id",
    "compose_hash",
    "instance_id",
    "device_id",
    "mr_system",
    "mr_aggregated",
    "os_image_hash",
    "key_provider_info",
)
_MAX_FIELD = 64 * 1024
_MAX_SCRIPTS = 64


@dataclass(frozen=True, slots=True)
class AppInfo:
    """The decoded app info; ``init_script_hashes`` is ``None`` when the writer had none."""

    app_id: bytes
    compose_hash: bytes
    instance_id: bytes
    device_id: bytes
    mr_system: bytes
    mr_aggregated: bytes
    os_image_hash: bytes
    key_provider_info: bytes
    init_script_hashes: tuple[bytes, ...] | None = None


def _field_bytes(value: Any, what: str) -> bytes:
    out = mpack.as_bytes(value, what)
    if len(out) > _MAX_FIELD:
        raise CodecError(f"{what}: {len(out)} bytes exceeds the limit {_MAX_FIELD}")
    return out


def _scripts(value: Any, what: str) -> tuple[bytes, ...] | None:
    if value is None:
        return None
    items = mpack.as_list(value, what)
    if len(items) > _MAX_SCRIPTS:
        raise CodecError(f"{what}: {len(items)} hashes exceeds the limit {_MAX_SCRIPTS}")
    return tuple(_field_bytes(v, f"{what}[{i}]") for i, v in enumerate(items))


def decode_app_info(data: bytes) -> AppInfo:
    """Decode the 1.9 extension content; raises CodecError."""
    value = mpack.unpack(data, "app info")
    if isinstance(value, list):
        if len(value) not in (len(_FIELDS), len(_FIELDS) + 1):
            raise CodecError(
                f"app info: expected {len(_FIELDS)} or {len(_FIELDS) + 1} items, got {len(value)}"
            )
        fields = [_field_bytes(v, f"app info.{n}") for n, v in zip(_FIELDS, value, strict=False)]
        scripts = _scripts(value[8], "app info.init_script_hashes") if len(value) == 9 else None
    elif isinstance(value, dict):
        fields = [_field_bytes(mpack.field(value, n, "app info"), f"app info.{n}") for n in _FIELDS]
        scripts = _scripts(value.get("init_script_hashes"), "app info.init_script_hashes")
    else:
        raise CodecError(f"app info: expected an array or a map, got {type(value).__name__}")
    app_id, compose_hash, instance_id, device_id, mr_sys, mr_agg, os_image, kp = fields
    return AppInfo(
        app_id, compose_hash, instance_id, device_id, mr_sys, mr_agg, os_image, kp, scripts
    )


def encode_app_info(info: AppInfo, *, named: bool = False) -> bytes:
    """The positional array form (as dstack writes it), or the map form with ``named``."""
    values: list[Any] = [getattr(info, n) for n in _FIELDS]
    scripts = None if info.init_script_hashes is None else list(info.init_script_hashes)
    if named:
        doc = dict(zip(_FIELDS, values, strict=True))
        doc["init_script_hashes"] = scripts
        return mpack.pack(doc)
    return mpack.pack([*values, scripts])
