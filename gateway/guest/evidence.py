"""Evidence from the guest's own TEE: attestations and RA-TLS certificates.

Used by the agent (GetQuote, Attest, GetTlsKey) and by the KMS client, whose temporary
client certificate carries the CVM's attestation bound to the certificate's key.
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.guest import ccel, certs
from gateway.protocol.attestation import (
    Attestation,
    AttestedEvent,
    TdxEvent,
    encode_attestation_v0,
    strip_attestation,
)
from gateway.protocol.errors import CodecError
from gateway.tee.base import TeeBackend

__all__ = [
    "CCEL_PATH",
    "event_log",
    "make_attestation",
    "ratls_client_cert",
    "read_attestation_ext",
    "read_boot_log",
]

logger = logging.getLogger(__name__)
CCEL_PATH = Path("/sys/firmware/acpi/tables/data/CCEL")


def runtime_events(tee: TeeBackend) -> tuple[AttestedEvent, ...]:
    return tuple(AttestedEvent(e.name, e.payload) for e in tee.runtime_events())


def event_log(tee: TeeBackend, boot_log: tuple[TdxEvent, ...] = ()) -> tuple[TdxEvent, ...]:
    """Boot (CCEL) events, then runtime events with their true digests."""
    return boot_log + tuple(TdxEvent.runtime(e) for e in runtime_events(tee))


def read_boot_log(path: Path) -> tuple[TdxEvent, ...]:
    """The CCEL boot events at ``path``; empty (with a warning) if absent or unreadable,
    so that a firmware quirk costs replayable boot events, not the agent."""
    try:
        return ccel.parse_ccel(path.read_bytes())
    except FileNotFoundError:
        return ()
    except (OSError, CodecError) as exc:
        logger.warning("boot event log %s not used: %s", path, exc)
        return ()


def make_attestation(
    tee: TeeBackend, report_data: bytes, vm_config: str, boot_log: tuple[TdxEvent, ...] = ()
) -> Attestation:
    """Quote + full log + runtime events for 64-byte ``report_data`` (blocking)."""
    return Attestation(
        quote=tee.get_quote(report_data),
        event_log=event_log(tee, boot_log),
        runtime_events=runtime_events(tee),
        report_data=report_data,
        config=vm_config,
    )


def ratls_client_cert(
    tee: TeeBackend,
    key: ec.EllipticCurvePrivateKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    vm_config: str,
    now: dt.datetime,
) -> x509.Certificate:
    """dstack's "RA-TLS TEMP Cert": client auth, attestation (1.8) bound to ``key``."""
    att = make_attestation(tee, certs.ratls_report_data(certs.spki_der(key)), vm_config)
    ext = certs.der_octet_string(encode_attestation_v0(strip_attestation(att)))
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "RA-TLS TEMP Cert")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(secrets.randbits(127) + 1)
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.UnrecognizedExtension(certs.OID_ATTESTATION, ext), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def read_der_octet_string(data: bytes) -> bytes:
    """The content of a DER OCTET STRING that spans all of ``data``; raises CodecError."""
    if len(data) < 2 or data[0] != 0x04:
        raise CodecError("extension value is not an OCTET STRING")
    first = data[1]
    if first < 0x80:
        length, off = first, 2
    else:
        n = first & 0x7F
        if n == 0 or n > 4 or len(data) < 2 + n:
            raise CodecError("bad OCTET STRING length")
        length, off = int.from_bytes(data[2 : 2 + n], "big"), 2 + n
    if off + length != len(data):
        raise CodecError("OCTET STRING length does not match the extension value")
    return data[off:]


def read_attestation_ext(cert: x509.Certificate) -> bytes | None:
    """The raw attestation bytes of extension 1.8, or ``None`` if absent."""
    try:
        ext = cert.extensions.get_extension_for_oid(certs.OID_ATTESTATION).value
    except x509.ExtensionNotFound:
        return None
    if not isinstance(ext, x509.UnrecognizedExtension):
        return None
    return read_der_octet_string(ext.value)


def special_usage(cert: x509.Certificate) -> str | None:
    """The special-usage (1.4) string, e.g. ``kms:rpc``."""
    try:
        ext = cert.extensions.get_extension_for_oid(certs.OID_SPECIAL_USAGE).value
    except x509.ExtensionNotFound:
        return None
    if not isinstance(ext, x509.UnrecognizedExtension):
        return None
    try:
        return read_der_octet_string(ext.value).decode("utf-8")
    except (CodecError, UnicodeDecodeError):
        return None
