"""Throw-away test PKI for a run: one CA, a wildcard leaf for the proxies, one for the origin.

Both leaves are ECDSA P-256 (the key type the gateway serves in production) and the cert files
hold the leaf only, as in the reference measurements (docs/performance.md). Nothing here is
secret: the directory is a temporary one, deleted with the run.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True, slots=True)
class CertFiles:
    """PEM files of one leaf: cert, key, and cert+key in one file (HAProxy's ``crt``)."""

    cert: Path
    key: Path
    combined: Path


@dataclass(frozen=True, slots=True)
class Pki:
    ca: Path
    proxy: CertFiles  # *.<domain>, served by nginx, HAProxy and the gateway when terminating
    origin: CertFiles  # *.<domain>, served by the origin's TLS listener (passthrough, direct)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_leaf(
    out: Path,
    stem: str,
    cn: str,
    sans: list[str],
    ca_key: ec.EllipticCurvePrivateKey,
    ca: x509.Name,
) -> CertFiles:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(s) for s in sans]), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    files = CertFiles(out / f"{stem}.crt", out / f"{stem}.key", out / f"{stem}.pem")
    files.cert.write_bytes(cert_pem)
    files.key.write_bytes(key_pem)
    files.key.chmod(0o600)
    files.combined.write_bytes(cert_pem + key_pem)
    files.combined.chmod(0o600)
    return files


def make_pki(out: Path, domain: str) -> Pki:
    """Write a CA and two ``*.domain`` leaves (proxy, origin) into ``out``."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("gateway bench CA")
    now = dt.datetime.now(dt.UTC)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path = out / "ca.crt"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    sans = [f"*.{domain}", domain]
    proxy = _write_leaf(out, "proxy", f"*.{domain}", sans, ca_key, ca_name)
    origin = _write_leaf(out, "origin", f"origin.{domain}", sans, ca_key, ca_name)
    return Pki(ca=ca_path, proxy=proxy, origin=origin)
