"""From configuration to a running tunnel: the private key file and the device spec.

The gateway's WireGuard private key lives in a file (``wg.private_key_file``, default
``<data_dir>/wg.key``) so that a restart keeps the key CVMs already trust. It is created on
first start with mode 0600, written whole and then linked into place (two starters at once
cannot write two different keys, nor read a half-written one); an existing file readable
by group or others is refused.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import stat
from pathlib import Path

from gateway.tunnel.errors import TunnelError
from gateway.tunnel.keys import WgKeyError, decode_key, generate_private_key
from gateway.tunnel.settings import WgSettings
from gateway.tunnel.wg import DeviceSpec

__all__ = ["device_spec", "key_file_path", "load_or_create_private_key"]


def key_file_path(settings: WgSettings, data_dir: Path) -> Path:
    return Path(settings.private_key_file) if settings.private_key_file else data_dir / "wg.key"


def load_or_create_private_key(path: Path) -> str:
    """The base64 private key in ``path``, generated there (0600) if the file does not exist.

    Raises :class:`TunnelError` if the file is not a key or is readable by others.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        # Write a complete key to a private temporary file, then link it into place: link(2)
        # fails if the name exists, so exactly one starter wins and nobody can ever read a
        # half-written (or empty) key file.
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(generate_private_key() + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TunnelError(
            f"{path} is accessible by group/others (mode {mode & 0o777:o}): chmod 600"
        )
    text = path.read_text(encoding="ascii", errors="replace").strip()
    try:
        decode_key(text)
    except WgKeyError as exc:
        raise TunnelError(f"{path} does not hold a WireGuard private key: {exc}") from None
    return text


def device_spec(settings: WgSettings, private_key: str) -> DeviceSpec:
    """The gateway device as configured in ``[wg]``."""
    return DeviceSpec(
        name=settings.interface,
        private_key=private_key,
        listen_port=settings.listen_port,
        address=ipaddress.IPv4Interface(settings.ip),
        netns=settings.netns or None,
        backend=settings.backend,
        wireguard_go=settings.wireguard_go,
    )
