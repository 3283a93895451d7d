"""App identity: app-compose, compose hash, app id, instance id and the boot events.

Only ``app-compose.json`` is measured, so it is the one host-shared input the boot trusts;
its hash is taken over the exact bytes on disk (never re-serialised), as the VMM and the
dstack guest do. Everything here is pure: bytes and values in, values out.

Upstream compatibility target: dstack v0.5.11's event set and order (the one the SDK
simulator fixture ``attestation.bin`` carries):
``system-preparing, app-id, compose-hash, instance-id, boot-mr-done, [os-image-hash],
key-provider, storage-fs, system-ready``; in v0.5.x the ``app-id`` event carries
``.instance_info.app_id`` only with the KMS key provider, otherwise ``compose_hash[:20]``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from gateway.guest.keccak import keccak256
from gateway.tee.base import RuntimeEvent

__all__ = [
    "AppCompose",
    "ComposeError",
    "InstanceInfo",
    "KeyProviderKind",
    "app_id_for",
    "boot_events_measure",
    "compose_hash",
    "instance_id_for",
    "key_provider_payload",
]

MAX_MANIFEST_VERSION = 3


class ComposeError(ValueError):
    """app-compose.json (or .instance_info) is invalid; the message names the field."""


class KeyProviderKind(StrEnum):
    """Where app keys come from (``key_provider`` in app-compose)."""

    NONE = "none"
    KMS = "kms"
    LOCAL = "local"
    TPM = "tpm"

    @property
    def event_name(self) -> str:
        """The ``name`` in the ``key-provider`` event payload."""
        return "local-sgx" if self is KeyProviderKind.LOCAL else self.value


def compose_hash(raw: bytes) -> bytes:
    """SHA256 of the exact app-compose bytes (32 bytes)."""
    return hashlib.sha256(raw).digest()


def _opt(doc: Mapping[str, Any], name: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = doc.get(name, default)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ComposeError(f"app-compose.json: {name} must be {names}, got {value!r}")
    return value


def _str_list(doc: Mapping[str, Any], name: str) -> tuple[str, ...]:
    value = _opt(doc, name, list, [])
    if not all(isinstance(v, str) for v in value):
        raise ComposeError(f"app-compose.json: {name} must be a list of strings")
    return tuple(value)


@dataclass(frozen=True, slots=True)
class AppCompose:
    """The fields of app-compose.json the shim acts on; ``raw`` is what gets hashed."""

    raw: bytes
    name: str
    runner: str
    manifest_version: int
    key_provider: KeyProviderKind
    key_provider_id: bytes = b""
    allowed_envs: tuple[str, ...] = ()
    no_instance_id: bool = False
    public_logs: bool = False
    public_sysinfo: bool = False
    public_tcbinfo: bool = True
    gateway_enabled: bool = False
    storage_fs: str = "zfs"
    docker_compose_file: str | None = None
    pre_launch_script: str | None = None
    bash_script: str | None = None
    init_scripts: tuple[str, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        """The document as text (for ``tcb_info.app_compose``)."""
        return self.raw.decode("utf-8")

    @property
    def hash(self) -> bytes:
        return compose_hash(self.raw)

    @classmethod
    def parse(cls, raw: bytes) -> AppCompose:
        """Validate app-compose bytes; raises :class:`ComposeError` naming the field."""
        try:
            doc = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise ComposeError("app-compose.json is not UTF-8") from None
        except (json.JSONDecodeError, RecursionError) as exc:
            raise ComposeError(f"app-compose.json is not valid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise ComposeError("app-compose.json must be a JSON object")
        mv = doc.get("manifest_version")
        if isinstance(mv, str) and mv.isascii() and mv.isdigit() and not mv.startswith("0"):
            mv = int(mv)
        if isinstance(mv, bool) or not isinstance(mv, int) or mv < 1:
            raise ComposeError("app-compose.json: manifest_version must be a positive integer")
        if mv > MAX_MANIFEST_VERSION:
            raise ComposeError(
                f"app-compose.json: manifest_version {mv} is newer than this shim supports "
                f"(at most {MAX_MANIFEST_VERSION})"
            )
        name = doc.get("name")
        runner = doc.get("runner")
        if not isinstance(name, str) or not isinstance(runner, str):
            raise ComposeError("app-compose.json: name and runner are required strings")
        kp_raw = _opt(doc, "key_provider", str, "")
        if kp_raw:
            try:
                kp = KeyProviderKind(kp_raw)
            except ValueError:
                raise ComposeError(
                    f"app-compose.json: key_provider {kp_raw!r} is not none/kms/local/tpm"
                ) from None
        elif _opt(doc, "kms_enabled", bool, False) or "kms" in _str_list(doc, "features"):
            kp = KeyProviderKind.KMS
        elif _opt(doc, "local_key_provider_enabled", bool, False):
            kp = KeyProviderKind.LOCAL
        else:
            kp = KeyProviderKind.NONE
        kp_id_hex = _opt(doc, "key_provider_id", str, "")
        try:
            kp_id = bytes.fromhex(kp_id_hex)
        except ValueError:
            raise ComposeError("app-compose.json: key_provider_id must be hex") from None
        storage_fs = _opt(doc, "storage_fs", str, "zfs")
        if storage_fs not in ("zfs", "ext4"):
            raise ComposeError("app-compose.json: storage_fs must be zfs or ext4")
        if _opt(doc, "event_log_version", int, 1) != 1:
            raise ComposeError(
                "app-compose.json: event_log_version 2 is not supported by this shim (use 1)"
            )
        init = doc.get("init_script")
        if isinstance(init, str):
            init_scripts: tuple[str, ...] = (init,) if init else ()
        else:
            init_scripts = _str_list(doc, "init_script")
        gateway = (
            _opt(doc, "gateway_enabled", bool, False)
            or _opt(doc, "tproxy_enabled", bool, False)
            or "tproxy-net" in _str_list(doc, "features")
        )
        return cls(
            raw=raw,
            name=name,
            runner=runner,
            manifest_version=mv,
            key_provider=kp,
            key_provider_id=kp_id,
            allowed_envs=_str_list(doc, "allowed_envs"),
            no_instance_id=_opt(doc, "no_instance_id", bool, False),
            public_logs=_opt(doc, "public_logs", bool, False),
            public_sysinfo=_opt(doc, "public_sysinfo", bool, False),
            public_tcbinfo=_opt(doc, "public_tcbinfo", bool, True),
            gateway_enabled=gateway,
            storage_fs=storage_fs,
            docker_compose_file=_opt(doc, "docker_compose_file", str, None),
            pre_launch_script=_opt(doc, "pre_launch_script", str, None) or None,
            bash_script=_opt(doc, "bash_script", str, None),
            init_scripts=init_scripts,
            extra=doc,
        )


def _hex_field(doc: Mapping[str, Any], name: str) -> bytes:
    value = doc.get(name, "")
    if value is None:
        return b""
    if not isinstance(value, str):
        raise ComposeError(f".instance_info: {name} must be a hex string")
    try:
        out = bytes.fromhex(value.removeprefix("0x"))
    except ValueError:
        raise ComposeError(f".instance_info: {name} is not hex") from None
    if out and len(out) != 20:
        raise ComposeError(f".instance_info: {name} must be 20 bytes, got {len(out)}")
    return out


@dataclass(frozen=True, slots=True)
class InstanceInfo:
    """``.instance_info``: written by the host, so every field is checked (20 bytes or empty)."""

    instance_id_seed: bytes = b""
    instance_id: bytes = b""
    app_id: bytes = b""

    @classmethod
    def parse(cls, raw: bytes) -> InstanceInfo:
        if not raw.strip():
            return cls()
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise ComposeError(f".instance_info is not valid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise ComposeError(".instance_info must be a JSON object")
        return cls(
            instance_id_seed=_hex_field(doc, "instance_id_seed"),
            instance_id=_hex_field(doc, "instance_id"),
            app_id=_hex_field(doc, "app_id"),
        )

    def to_json(self) -> bytes:
        """Compact JSON in upstream's key order (the ``instance.info`` notify body)."""
        return json.dumps(
            {
                "instance_id_seed": self.instance_id_seed.hex(),
                "instance_id": self.instance_id.hex(),
                "app_id": self.app_id.hex(),
            },
            separators=(",", ":"),
        ).encode()


def app_id_for(compose: AppCompose, info: InstanceInfo) -> bytes:
    """The app id measured in the ``app-id`` event (v0.5.x rule, see module docstring)."""
    if compose.key_provider is KeyProviderKind.KMS and info.app_id:
        return info.app_id
    return compose.hash[:20]


def instance_id_for(
    compose: AppCompose, info: InstanceInfo, random_seed: bytes
) -> tuple[bytes, bytes]:
    """``(seed, instance_id)``; a fresh seed every boot with the ``none`` provider.

    ``instance_id = SHA256(seed || app_id)[:20]`` where app_id is ``.instance_info.app_id``
    when given, else ``compose_hash[:20]``; empty when ``no_instance_id``.
    """
    seed = info.instance_id_seed
    if compose.key_provider is KeyProviderKind.NONE or not seed:
        if len(random_seed) != 20:
            raise ValueError("the instance id seed is 20 bytes")
        seed = random_seed
    if compose.no_instance_id:
        return seed, b""
    app_id = info.app_id or compose.hash[:20]
    return seed, hashlib.sha256(seed + app_id).digest()[:20]


def key_provider_payload(kind: KeyProviderKind, provider_id: bytes) -> bytes:
    """The ``key-provider`` event payload: compact ``{"name":..,"id":..}``."""
    return json.dumps(
        {"name": kind.event_name, "id": provider_id.hex()}, separators=(",", ":")
    ).encode()


_KP_BYTE = {
    KeyProviderKind.NONE: 0,
    KeyProviderKind.LOCAL: 1,
    KeyProviderKind.KMS: 2,
    KeyProviderKind.TPM: 3,
}


def check_mr_config_id(
    mr_config_id: bytes,
    compose_digest: bytes,
    app_id: bytes,
    kind: KeyProviderKind,
    provider_id: bytes,
) -> None:
    """Check the TD's MRCONFIGID against the app (dstack ``config_id_verifier``).

    All zeros: not bound, accepted. ``01 || compose_hash || 0^15``;
    ``02 || keccak256(compose_hash || app_id || kp_byte || provider_id) || 0^15``.
    Version 3 (a JCS config document) is refused: this shim cannot check it.
    Raises :class:`ComposeError` saying what differs.
    """
    if len(mr_config_id) != 48:
        raise ComposeError(f"MRCONFIGID is {len(mr_config_id)} bytes, expected 48")
    if not any(mr_config_id):
        return
    version = mr_config_id[0]
    if version == 1:
        want = b"\x01" + compose_digest + bytes(15)
    elif version == 2:
        digest = keccak256(compose_digest + app_id + bytes([_KP_BYTE[kind]]) + provider_id)
        want = b"\x02" + digest + bytes(15)
    else:
        raise ComposeError(f"MRCONFIGID version {version} is not supported by this shim")
    if mr_config_id != want:
        raise ComposeError(
            "MRCONFIGID does not match this app-compose (and key provider): the VM was "
            "launched for a different app configuration"
        )


def boot_events_measure(
    app_id: bytes, compose_digest: bytes, instance_id: bytes
) -> list[RuntimeEvent]:
    """The events measured before keys are requested, in order (through ``boot-mr-done``)."""
    return [
        RuntimeEvent("system-preparing", b""),
        RuntimeEvent("app-id", app_id),
        RuntimeEvent("compose-hash", compose_digest),
        RuntimeEvent("instance-id", instance_id),
        RuntimeEvent("boot-mr-done", b""),
    ]
