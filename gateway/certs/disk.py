"""The on-disk certificate layout shared with the proxy's cert store, and its atomic updates.

::

    <certs_dir>/<name>              symlink -> .history/<name>/<serial-hex>   (what is served)
    <certs_dir>/.history/<name>/<serial-hex>/
        fullchain.pem               leaf first, then intermediates
        privkey.pem                 PKCS#8, mode 0600
        meta.json                   serial, names, validity, issuer directory, account
        quote.json                  optional: TDX quote binding the key (see attestation.py)

A new certificate is written into a temporary directory under ``.history/<name>/``, every
file and the directory are fsynced, the directory is renamed to its serial, and finally a new
symlink is renamed over ``<certs_dir>/<name>``. ``rename(2)`` of a symlink over a symlink is
atomic, so a reader sees either the old or the new directory, never a mix, provided it
resolves ``<name>`` once and reads both files from the resolved directory
(:func:`read_current` does exactly that). Old directories stay as history; :func:`prune`
never removes the one currently linked.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

__all__ = [
    "CHAIN_FILE",
    "HISTORY_DIR",
    "KEY_FILE",
    "StoredCert",
    "current",
    "history",
    "install",
    "prune",
    "read_current",
    "served_names",
]

CHAIN_FILE = "fullchain.pem"
KEY_FILE = "privkey.pem"
META_FILE = "meta.json"
HISTORY_DIR = ".history"


@dataclass(frozen=True, slots=True)
class StoredCert:
    """What is served for ``name``: its directory and the leaf's serial and validity."""

    name: str
    path: Path
    serial: int
    not_before: float
    not_after: float
    names: tuple[str, ...]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_name(name: str) -> None:
    if not name or name.startswith(".") or "/" in name or "\0" in name:
        raise ValueError(f"bad certificate name {name!r}")


def install(
    certs_dir: Path,
    name: str,
    fullchain_pem: bytes,
    key_pem: bytes,
    *,
    serial: int,
    extra: Mapping[str, bytes] | None = None,
) -> Path:
    """Write a new certificate for ``name`` and atomically make it the served one.

    ``extra`` files (``meta.json``, ``quote.json``) land in the same directory before the
    swap. Returns the new history directory.
    """
    _check_name(name)
    hist = certs_dir / HISTORY_DIR / name
    hist.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = hist / f".tmp-{secrets.token_hex(6)}"
    tmp.mkdir(mode=0o700)
    try:
        _write(tmp / CHAIN_FILE, fullchain_pem, 0o644)
        _write(tmp / KEY_FILE, key_pem, 0o600)
        for fname, data in (extra or {}).items():
            _check_name(fname)
            _write(tmp / fname, data, 0o644)
        _fsync_dir(tmp)
        final = hist / f"{serial:x}"
        if final.exists():  # same serial again (another CA or a re-install): keep both
            final = hist / f"{serial:x}-{int(time.time())}-{secrets.token_hex(2)}"
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(hist)

    link = certs_dir / name
    if link.exists() and not link.is_symlink():
        # a directory placed by hand: keep it as history, then switch to the symlink layout
        link.rename(hist / f"manual-{int(time.time())}")
    tmp_link = certs_dir / f".{name}.{secrets.token_hex(4)}.link"
    os.symlink(os.path.relpath(final, certs_dir), tmp_link)
    os.replace(tmp_link, link)
    _fsync_dir(certs_dir)
    return final


def served_names(certs_dir: Path) -> list[str]:
    """The certificate names under ``certs_dir`` (entries not starting with a dot), sorted."""
    try:
        entries = list(certs_dir.iterdir())
    except FileNotFoundError:
        return []
    return sorted(p.name for p in entries if not p.name.startswith(".") and p.is_dir())


def read_current(certs_dir: Path, name: str) -> tuple[Path, bytes, bytes] | None:
    """``(directory, fullchain, key)`` served for ``name``, read from one resolved directory."""
    _check_name(name)
    try:
        path = (certs_dir / name).resolve(strict=True)
        return path, (path / CHAIN_FILE).read_bytes(), (path / KEY_FILE).read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _describe(name: str, path: Path) -> StoredCert | None:
    try:
        leaf = x509.load_pem_x509_certificate((path / CHAIN_FILE).read_bytes())
    except (OSError, ValueError):
        return None
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = tuple(san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = ()
    return StoredCert(
        name=name,
        path=path,
        serial=leaf.serial_number,
        not_before=leaf.not_valid_before_utc.timestamp(),
        not_after=leaf.not_valid_after_utc.timestamp(),
        names=names,
    )


def current(certs_dir: Path, name: str) -> StoredCert | None:
    """The certificate served for ``name``, or None if there is none (or it is unreadable)."""
    _check_name(name)
    try:
        path = (certs_dir / name).resolve(strict=True)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return _describe(name, path)


def history(certs_dir: Path, name: str) -> list[StoredCert]:
    """Every stored certificate for ``name``, oldest first (by notBefore, then install time)."""
    _check_name(name)
    hist = certs_dir / HISTORY_DIR / name
    if not hist.is_dir():
        return []
    found = [
        _describe(name, p) for p in hist.iterdir() if p.is_dir() and not p.name.startswith(".")
    ]
    # notBefore has one-second resolution; the rename time orders installs within a second
    return sorted(
        (c for c in found if c is not None), key=lambda c: (c.not_before, c.path.stat().st_ctime_ns)
    )


def prune(certs_dir: Path, name: str, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` history entries; the served one always stays."""
    served = current(certs_dir, name)
    entries = history(certs_dir, name)
    removed: list[Path] = []
    for entry in entries[: max(0, len(entries) - keep)]:
        if served is not None and entry.path == served.path:
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(entry.path)
    hist = certs_dir / HISTORY_DIR / name
    for leftover in hist.glob(".tmp-*") if hist.is_dir() else ():
        with contextlib.suppress(OSError):
            shutil.rmtree(leftover)
    return removed


def write_meta(values: Mapping[str, object]) -> bytes:
    """``meta.json`` content (sorted keys, for stable diffs)."""
    return json.dumps(dict(values), indent=2, sort_keys=True).encode()
