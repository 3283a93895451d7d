"""The on-disk layout: atomic symlink swaps, history, pruning, hand-placed directories."""

from __future__ import annotations

import datetime
import os
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.certs import disk


def make_cert(serial: int, days: int = 30, minutes_ago: int = 0) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=minutes_ago)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "*.d.test")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("*.d.test"), x509.DNSName("d.test")]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def key_matches(chain: bytes, key: bytes) -> bool:
    leaf = x509.load_pem_x509_certificates(chain)[0]
    priv = serialization.load_pem_private_key(key, None)
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return leaf.public_key().public_bytes(*fmt) == priv.public_key().public_bytes(*fmt)


def test_install_swaps_symlink_and_keeps_history(tmp_path: Path) -> None:
    c1, k1 = make_cert(0x1111, minutes_ago=10)
    c2, k2 = make_cert(0x2222)
    p1 = disk.install(tmp_path, "d.test", c1, k1, serial=0x1111, extra={"meta.json": b"{}"})
    assert os.readlink(tmp_path / "d.test") == ".history/d.test/1111"
    assert disk.read_current(tmp_path, "d.test") == (p1, c1, k1)
    assert (p1 / "meta.json").read_bytes() == b"{}"
    assert (p1 / "privkey.pem").stat().st_mode & 0o777 == 0o600
    p2 = disk.install(tmp_path, "d.test", c2, k2, serial=0x2222)
    cur = disk.current(tmp_path, "d.test")
    assert cur is not None and cur.serial == 0x2222 and cur.path == p2
    assert cur.names == ("*.d.test", "d.test")
    assert [h.serial for h in disk.history(tmp_path, "d.test")] == [0x1111, 0x2222]
    assert p1.is_dir()  # history kept
    assert disk.served_names(tmp_path) == ["d.test"]
    assert disk.served_names(tmp_path / "nope") == []
    # no temp files or links left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == [".history", "d.test"]
    assert not list((tmp_path / ".history" / "d.test").glob(".tmp-*"))


def test_prune_never_removes_the_served_one(tmp_path: Path) -> None:
    for i, serial in enumerate((1, 2, 3)):
        c, k = make_cert(serial, minutes_ago=30 - i)
        disk.install(tmp_path, "d.test", c, k, serial=serial)
    # serve the oldest again by re-installing it (e.g. a rollback): new dir, same serial
    c, k = make_cert(1, minutes_ago=40)
    served = disk.install(tmp_path, "d.test", c, k, serial=1)
    assert served.name.startswith("1-")
    removed = disk.prune(tmp_path, "d.test", keep=0)
    assert served not in removed and served.is_dir()
    assert [h.path for h in disk.history(tmp_path, "d.test")] == [served]


def test_hand_placed_directory_is_kept_as_history(tmp_path: Path) -> None:
    c0, k0 = make_cert(7, minutes_ago=5)
    manual = tmp_path / "d.test"
    manual.mkdir()
    (manual / "fullchain.pem").write_bytes(c0)
    (manual / "privkey.pem").write_bytes(k0)
    c1, k1 = make_cert(8)
    disk.install(tmp_path, "d.test", c1, k1, serial=8)
    assert (tmp_path / "d.test").is_symlink()
    assert sorted(h.serial for h in disk.history(tmp_path, "d.test")) == [7, 8]


def test_bad_names_are_refused(tmp_path: Path) -> None:
    c, k = make_cert(1)
    for bad in ("", ".history", "../x", "a/b"):
        with pytest.raises(ValueError):
            disk.install(tmp_path, bad, c, k, serial=1)
    assert disk.current(tmp_path, "missing.test") is None
    assert disk.read_current(tmp_path, "missing.test") is None
    assert disk.history(tmp_path, "missing.test") == []


def test_readers_never_see_a_mixed_pair(tmp_path: Path) -> None:
    """A reader resolving the link once always gets a chain and key that belong together."""
    pairs = [make_cert(s) for s in range(1, 5)]
    disk.install(tmp_path, "d.test", *pairs[0], serial=1)
    stop = threading.Event()
    bad: list[str] = []
    reads = 0

    def reader() -> None:
        nonlocal reads
        while not stop.is_set():
            found = disk.read_current(tmp_path, "d.test")
            if found is None:
                bad.append("missing")
            elif not key_matches(found[1], found[2]):
                bad.append(found[0].name)
            reads += 1

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(40):
            chain, key = pairs[i % len(pairs)]
            disk.install(tmp_path, "d.test", chain, key, serial=100 + i)
    finally:
        stop.set()
        thread.join()
    assert bad == []
    assert reads > 0
