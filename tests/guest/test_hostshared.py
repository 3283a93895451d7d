"""Hostile host-shared folders: every refusal names the file and the reason."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.guest import hostshared
from gateway.guest.hostshared import HostSharedError, read_host_shared

DATA = Path(__file__).resolve().parents[1] / "data" / "dstack-simulator"


def _folder(tmp_path: Path) -> Path:
    d = tmp_path / "shared"
    d.mkdir()
    (d / "app-compose.json").write_bytes((DATA / "app-compose.json").read_bytes())
    (d / ".sys-config.json").write_bytes((DATA / "sys-config.json").read_bytes())
    return d


def test_reads_the_fixture_folder(tmp_path: Path) -> None:
    shared = read_host_shared(_folder(tmp_path))
    assert shared.app_compose == (DATA / "app-compose.json").read_bytes()
    assert shared.sys_config.kms_urls == ("https://kms.1022.dstack.org:12001",)
    assert shared.sys_config.host_api_url == "vsock://2:12000/api"
    assert shared.sys_config.os_image_hash.hex().startswith("64f0d154")
    assert shared.encrypted_env == b"" and shared.instance_info == b""


def test_symlink_is_refused(tmp_path: Path) -> None:
    d = _folder(tmp_path)
    secret = tmp_path / "secret"
    secret.write_bytes(b"guest secret")
    os.symlink(secret, d / ".encrypted-env")
    with pytest.raises(HostSharedError, match=r"\.encrypted-env: is a symlink"):
        read_host_shared(d)


def test_symlinked_folder_is_refused(tmp_path: Path) -> None:
    d = _folder(tmp_path)
    link = tmp_path / "link"
    os.symlink(d, link)
    with pytest.raises(HostSharedError, match="cannot open the folder"):
        read_host_shared(link)


def test_oversized_file_is_refused(tmp_path: Path) -> None:
    d = _folder(tmp_path)
    (d / ".encrypted-env").write_bytes(b"\0" * (256 * 1024 + 1))
    with pytest.raises(HostSharedError, match="over the 262144-byte limit"):
        read_host_shared(d)
    (d / ".encrypted-env").unlink()
    (d / ".sys-config.json").write_bytes(b" " * (32 * 1024 + 1))
    with pytest.raises(HostSharedError, match=r"\.sys-config\.json: is 32769 bytes"):
        read_host_shared(d)


def test_fifo_and_directory_are_refused(tmp_path: Path) -> None:
    d = _folder(tmp_path)
    os.mkfifo(d / ".user-config")
    with pytest.raises(HostSharedError, match="not a regular file"):
        read_host_shared(d)
    (d / ".user-config").unlink()
    (d / ".instance_info").mkdir()
    with pytest.raises(HostSharedError, match="not a regular file"):
        read_host_shared(d)


def test_missing_required_files(tmp_path: Path) -> None:
    d = _folder(tmp_path)
    (d / ".sys-config.json").unlink()
    with pytest.raises(HostSharedError, match="sys-config.json: is missing"):
        read_host_shared(d)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"{", "not valid JSON"),
        (b"[1]", "JSON object"),
        (b'{"kms_urls": "https://x"}', "list of strings"),
        (b'{"kms_urls": ["file:///etc/passwd"]}', "not http"),
        (b'{"vm_config": "{"}', "vm_config is not"),
        (b'{"vm_config": "{\\"os_image_hash\\": \\"zz\\"}"}', "not hex"),
        (b'{"host_api_url": 5}', "must be a string"),
    ],
)
def test_invalid_sys_config(tmp_path: Path, content: bytes, reason: str) -> None:
    d = _folder(tmp_path)
    (d / ".sys-config.json").write_bytes(content)
    with pytest.raises(HostSharedError, match=reason):
        read_host_shared(d)


def test_limits_match_upstream() -> None:
    assert hostshared.LIMITS["app-compose.json"] == (50 * 1024 * 1024, True)
    assert hostshared.LIMITS[".instance_info"] == (10 * 1024, False)
