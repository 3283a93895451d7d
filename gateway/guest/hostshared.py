"""Reading the host-shared folder without trusting the host.

The VMM writes these files; only ``app-compose.json`` is measured (its hash goes into
RTMR3), so every other file is hostile input. Each file is opened relative to a directory
descriptor with ``O_NOFOLLOW`` (a symlink planted by the host is refused, not followed),
must be a regular file, and is read up to its cap plus one byte so that a file that grows
while being read is still caught. Sizes follow upstream (``system_setup.rs``).
"""

from __future__ import annotations

import errno
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "APP_COMPOSE",
    "LIMITS",
    "HostShared",
    "HostSharedError",
    "SysConfig",
    "read_file_capped",
    "read_host_shared",
]

APP_COMPOSE = "app-compose.json"
SYS_CONFIG = ".sys-config.json"
INSTANCE_INFO = ".instance_info"
ENCRYPTED_ENV = ".encrypted-env"
USER_CONFIG = ".user-config"

MiB = 1024 * 1024
# name -> (size cap in bytes, required)
LIMITS: dict[str, tuple[int, bool]] = {
    APP_COMPOSE: (50 * MiB, True),
    SYS_CONFIG: (32 * 1024, True),
    INSTANCE_INFO: (10 * 1024, False),
    ENCRYPTED_ENV: (256 * 1024, False),
    USER_CONFIG: (50 * MiB, False),
}


class HostSharedError(ValueError):
    """A host-shared file is missing, unsafe or invalid; names the file and the reason."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"host-shared {name}: {reason}")


def read_file_capped(dir_fd: int, name: str, cap: int) -> bytes | None:
    """The file's bytes, ``None`` if absent; refuses symlinks, non-files and oversize."""
    try:
        fd = os.open(
            name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
        )
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise HostSharedError(
                name, "is a symlink; refused (host files are never followed)"
            ) from None
        raise HostSharedError(name, f"cannot open: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise HostSharedError(name, "is not a regular file")
        if st.st_size > cap:
            raise HostSharedError(name, f"is {st.st_size} bytes, over the {cap}-byte limit")
        chunks: list[bytes] = []
        total = 0
        while True:
            chunk = os.read(fd, min(1 << 20, cap + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > cap:
                raise HostSharedError(name, f"grew past the {cap}-byte limit while being read")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _str_list(doc: dict[str, Any], key: str) -> tuple[str, ...]:
    value = doc.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise HostSharedError(SYS_CONFIG, f"{key} must be a list of strings")
    return tuple(value)


def _str(doc: dict[str, Any], key: str) -> str:
    value = doc.get(key) or ""
    if not isinstance(value, str):
        raise HostSharedError(SYS_CONFIG, f"{key} must be a string")
    return value


@dataclass(frozen=True, slots=True)
class SysConfig:
    """``.sys-config.json`` (not measured: URLs and VM facts the host claims)."""

    kms_urls: tuple[str, ...] = ()
    gateway_urls: tuple[str, ...] = ()
    pccs_url: str = ""
    docker_registry: str = ""
    host_api_url: str = ""
    vm_config: str = ""
    os_image_hash: bytes = b""

    @classmethod
    def parse(cls, raw: bytes) -> SysConfig:
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise HostSharedError(SYS_CONFIG, f"is not valid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise HostSharedError(SYS_CONFIG, "must be a JSON object")
        gateway = _str_list(doc, "gateway_urls") or _str_list(doc, "tproxy_urls")
        for url in (*_str_list(doc, "kms_urls"), *gateway):
            if not url.startswith(("https://", "http://")):
                raise HostSharedError(SYS_CONFIG, f"URL {url[:80]!r} is not http(s)")
        vm_config = _str(doc, "vm_config")
        os_image_hash = b""
        if vm_config:
            try:
                vm = json.loads(vm_config)
            except (json.JSONDecodeError, RecursionError):
                raise HostSharedError(SYS_CONFIG, "vm_config is not a JSON string") from None
            if not isinstance(vm, dict):
                raise HostSharedError(SYS_CONFIG, "vm_config must hold a JSON object")
            try:
                os_image_hash = bytes.fromhex(str(vm.get("os_image_hash") or ""))
            except ValueError:
                raise HostSharedError(SYS_CONFIG, "vm_config.os_image_hash is not hex") from None
        return cls(
            kms_urls=_str_list(doc, "kms_urls"),
            gateway_urls=gateway,
            pccs_url=_str(doc, "pccs_url"),
            docker_registry=_str(doc, "docker_registry"),
            host_api_url=_str(doc, "host_api_url"),
            vm_config=vm_config,
            os_image_hash=os_image_hash,
        )


@dataclass(frozen=True, slots=True)
class HostShared:
    """The raw host-shared files, size-checked; parse them with the identity/env code."""

    app_compose: bytes
    sys_config: SysConfig
    sys_config_raw: bytes
    instance_info: bytes = b""
    encrypted_env: bytes = b""
    user_config: bytes = b""
    files: tuple[str, ...] = field(default=())


def read_host_shared(directory: Path) -> HostShared:
    """Read and validate the folder; raises :class:`HostSharedError` for the first problem."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise HostSharedError(str(directory), f"cannot open the folder: {exc.strerror}") from None
    try:
        data: dict[str, bytes] = {}
        for name, (cap, required) in LIMITS.items():
            content = read_file_capped(dir_fd, name, cap)
            if content is None:
                if required:
                    raise HostSharedError(name, "is missing (the VMM must provide it)")
                continue
            data[name] = content
    finally:
        os.close(dir_fd)
    return HostShared(
        app_compose=data[APP_COMPOSE],
        sys_config=SysConfig.parse(data[SYS_CONFIG]),
        sys_config_raw=data[SYS_CONFIG],
        instance_info=data.get(INSTANCE_INFO, b""),
        encrypted_env=data.get(ENCRYPTED_ENV, b""),
        user_config=data.get(USER_CONFIG, b""),
        files=tuple(sorted(data)),
    )
