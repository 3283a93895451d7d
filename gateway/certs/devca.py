"""A development CA and wildcard certificate, so the demo and tests need no ACME.

Keys are ECDSA P-256 (the cheapest signature for handshakes). ``fullchain.pem`` holds the leaf
and then the CA: with an explicit chain OpenSSL does not try to build one per handshake. Files
are written into a hidden temporary directory that is then renamed into place, the same
contract the ACME writer follows, so a concurrent reload never sees half a certificate.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["DevCa", "ensure_dev_ca", "issue_wildcard", "write_cert_dir"]


@dataclass(frozen=True, slots=True)
class DevCa:
    cert_path: Path
    key_path: Path

    def load(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        key = serialization.load_pem_private_key(self.key_path.read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cert, key


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def ensure_dev_ca(directory: Path, name: str = "gateway dev CA") -> DevCa:
    """Create ``directory/ca.pem`` and ``ca.key`` unless they exist; return their paths."""
    ca = DevCa(directory / "ca.pem", directory / "ca.key")
    if ca.cert_path.exists() and ca.key_path.exists():
        return ca
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(ca.key_path, _pem_key(key))
    ca.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return ca


def issue_wildcard(
    ca: DevCa, names: list[str], days: int = 825
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A leaf for ``names`` (e.g. ``["*.demo.localhost", "demo.localhost"]``) signed by ``ca``."""
    ca_cert, ca_key = ca.load()
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def write_cert_dir(
    certs_dir: Path,
    name: str,
    chain: list[x509.Certificate],
    key: ec.EllipticCurvePrivateKey,
) -> Path:
    """Write ``certs_dir/name/{fullchain,privkey}.pem`` atomically (temp dir, then rename)."""
    certs_dir.mkdir(parents=True, exist_ok=True)
    final = certs_dir / name
    tmp = certs_dir / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    (tmp / "fullchain.pem").write_bytes(
        b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
    )
    _write_private(tmp / "privkey.pem", _pem_key(key))
    if final.exists():
        old = certs_dir / f".{name}.old-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    return final


def ensure_dev_wildcard(ca_dir: Path, certs_dir: Path, base: str) -> tuple[DevCa, Path]:
    """The demo's one-call set-up: a dev CA and ``*.base`` + ``base`` in ``certs_dir/base``."""
    ca = ensure_dev_ca(ca_dir)
    target = certs_dir / base
    if not (target / "fullchain.pem").exists():
        cert, key = issue_wildcard(ca, [f"*.{base}", base])
        ca_cert, _ = ca.load()
        write_cert_dir(certs_dir, base, [cert, ca_cert], key)
    return ca, target
