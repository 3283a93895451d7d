"""Certificates the guest makes: the app CA (non-KMS providers) and GetTlsKey leaves.

Extensions follow dstack's RA-TLS layout (arc 1.3.6.1.4.1.62397.1): each value is a DER
OCTET STRING inside ``extnValue`` (double-wrapped), non-critical. A leaf asked for with
``usage_ra_tls`` carries the attestation (1.8) bound to its own key by
``report_data = SHA512("ratls-cert:" || SPKI DER)``; the caller supplies those bytes so
this module needs no TEE.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# one definition of dstack's RA-TLS vocabulary: the attestation core's (re-exported here)
from gateway.attest.ratls import (
    OID_APP_ID,
    OID_APP_INFO,
    OID_ATTESTATION,
    OID_SPECIAL_USAGE,
    der_octet_string,
    ratls_report_data,
)

__all__ = [
    "OID_APP_ID",
    "OID_APP_INFO",
    "OID_ATTESTATION",
    "OID_SPECIAL_USAGE",
    "LeafRequest",
    "der_octet_string",
    "issue_leaf",
    "make_app_ca",
    "ratls_report_data",
    "spki_der",
]

# rcgen's default not_before, which dstack leaves in place
DEFAULT_NOT_BEFORE = dt.datetime(1975, 1, 1, tzinfo=dt.UTC)


def spki_der(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> bytes:
    pub = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    return pub.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _ext(oid: x509.ObjectIdentifier, content: bytes) -> x509.UnrecognizedExtension:
    return x509.UnrecognizedExtension(oid, der_octet_string(content))


def make_app_ca(
    key: ec.EllipticCurvePrivateKey, *, attestation: bytes | None = None
) -> x509.Certificate:
    """dstack's self-signed "App Root Cert" for non-KMS providers (pathlen 1)."""
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Dstack"),
            x509.NameAttribute(NameOID.COMMON_NAME, "App Root Cert"),
        ]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(int.from_bytes(hashlib.sha256(spki_der(key)).digest()[:16], "big") >> 1)
        .not_valid_before(DEFAULT_NOT_BEFORE)
        .not_valid_after(dt.datetime(4096, 1, 1, tzinfo=dt.UTC))
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
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
        .add_extension(_ext(OID_SPECIAL_USAGE, b"app:ca"), critical=False)
    )
    if attestation is not None:
        builder = builder.add_extension(_ext(OID_ATTESTATION, attestation), critical=False)
    return builder.sign(key, hashes.SHA256())


@dataclass(frozen=True, slots=True)
class LeafRequest:
    """What GetTlsKey asked for (already validated)."""

    subject: str
    alt_names: tuple[str, ...] = ()
    usage_server_auth: bool = True
    usage_client_auth: bool = False
    not_before: int | None = None
    not_after: int | None = None
    attestation: bytes | None = None  # RA-TLS: the stripped VersionedAttestation
    app_info: bytes | None = None  # msgpack AppInfo
    app_id: bytes | None = None


def _san(names: Sequence[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for name in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


def issue_leaf(
    req: LeafRequest,
    key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    now: dt.datetime,
    serial: int,
) -> x509.Certificate:
    """Sign a leaf for ``key`` with the app CA, with dstack's extensions."""
    nb = (
        dt.datetime.fromtimestamp(req.not_before, dt.UTC)
        if req.not_before is not None
        else DEFAULT_NOT_BEFORE
    )
    na = (
        dt.datetime.fromtimestamp(req.not_after, dt.UTC)
        if req.not_after is not None
        else now + dt.timedelta(days=3650)
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, req.subject or "dstack")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key)
        .serial_number(serial)
        .not_valid_before(nb)
        .not_valid_after(na)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(_ext(OID_SPECIAL_USAGE, b"app:custom"), critical=False)
    )
    ekus = []
    if req.usage_server_auth:
        ekus.append(ExtendedKeyUsageOID.SERVER_AUTH)
    if req.usage_client_auth:
        ekus.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    if ekus:
        builder = builder.add_extension(x509.ExtendedKeyUsage(ekus), critical=False)
    if req.alt_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(_san(req.alt_names)), critical=False
        )
    if req.app_id is not None:
        builder = builder.add_extension(_ext(OID_APP_ID, req.app_id), critical=False)
    if req.attestation is not None:
        builder = builder.add_extension(_ext(OID_ATTESTATION, req.attestation), critical=False)
    if req.app_info is not None:
        builder = builder.add_extension(_ext(OID_APP_INFO, req.app_info), critical=False)
    return builder.sign(ca_key, hashes.SHA256())
