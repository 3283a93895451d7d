from __future__ import annotations

import ipaddress
import os
import threading
from pathlib import Path

import pytest

from gateway.config import parse_config
from gateway.tunnel.errors import TunnelError
from gateway.tunnel.keys import decode_key
from gateway.tunnel.service import device_spec, key_file_path, load_or_create_private_key


def test_key_file_created_once_0600_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "wg.key"
    keys: list[str] = []
    threads = [
        threading.Thread(target=lambda: keys.append(load_or_create_private_key(path)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(keys)) == 1 and len(decode_key(keys[0])) == 32
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_or_create_private_key(path) == keys[0]


def test_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "wg.key"
    load_or_create_private_key(path)
    os.chmod(path, 0o644)
    with pytest.raises(TunnelError, match="chmod 600"):
        load_or_create_private_key(path)


def test_garbage_key_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "wg.key"
    path.write_text("hello\n")
    os.chmod(path, 0o600)
    with pytest.raises(TunnelError, match="does not hold a WireGuard private key"):
        load_or_create_private_key(path)


def test_device_spec_from_config(tmp_path: Path) -> None:
    cfg = parse_config("[wg]\ninterface = 'wg-x'\nnetns = 'gw'\nlisten_port = 1234\n")
    key = load_or_create_private_key(key_file_path(cfg.wg, tmp_path))
    spec = device_spec(cfg.wg, key)
    assert (spec.name, spec.netns, spec.listen_port) == ("wg-x", "gw", 1234)
    assert spec.address == ipaddress.IPv4Interface("10.0.0.1/24")
    assert key not in repr(spec)
    assert key_file_path(cfg.wg, tmp_path) == tmp_path / "wg.key"
