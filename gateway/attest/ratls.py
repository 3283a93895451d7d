"""RA-TLS certificates: a TDX quote and its event log bound to the certificate's key.

dstack's extensions (arc 1.3.6.1.4.1.62397.1), each non-critical, each ``extnValue`` a DER
OCTET STRING that wraps the content (so the content is double-wrapped)::

    .1  raw TDX quote (legacy)              .2  TdxEvent JSON, maybe ELGZv1+gzip (legacy)
    .3  app id (20 bytes, KMS/app CA only)  .4  special usage, UTF-8 (``app:custom`` ...)
    .8  attestation: VersionedAttestation, stripped, V0 SCALE
    .9  app info: msgpack (an issuer's claim; see :func:`verify_kms_cert`)

Binding: ``report_data = SHA512(b"ratls-cert:" || SubjectPublicKeyInfo DER)``. Whoever holds
the key of a certificate whose quote carries that report_data is the TD that made the quote.

Verification (:func:`verify_ratls_cert`) checks, cheapest first, so that junk costs nothing:
the binding, that the quote's report_data equals the attestation's, that the runtime events
replay to the quote's RTMR3; then the DCAP signature chain (dcap-qvl, ~1 ms); then reads the
app identity from the replayed events.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import ipaddress
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeAlias

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from gateway.attest.eventlog import (
    AppIdentity,
    decode_app_identity,
    explain_rtmr3_mismatch,
    mr_aggregated,
    mr_system,
    parse_key_provider,
    replay_rtmr3,
)
from gateway.attest.evidence import (
    EvidenceError,
    EvidenceMethod,
    Measurements,
    RejectReason,
    VerifiedEvidence,
)
from gateway.attest.quote import (
    Collateral,
    QuoteVerificationError,
    VerifiedQuote,
    verify_quote,
)
from gateway.attest.quote import RejectReason as QuoteReject
from gateway.attest.tcb import TcbPolicy, TcbStatus
from gateway.protocol.appinfo import AppInfo, decode_app_info, encode_app_info
from gateway.protocol.attestation import (
    Attestation,
    AttestedEvent,
    TdxEvent,
    decode_attestation,
    decode_legacy_event_log,
    encode_attestation_v0,
    encode_legacy_event_log,
    strip_attestation,
)
from gateway.protocol.errors import CodecError
from gateway.protocol.tdx_quote import parse_tdx_quote
from gateway.tee.base import TeeBackend

__all__ = [
    "der_octet_string",
    "OID_APP_ID",
    "OID_APP_INFO",
    "OID_ATTESTATION",
    "OID_EVENT_LOG",
    "OID_QUOTE",
    "OID_SPECIAL_USAGE",
    "CertRequest",
    "build_ratls_cert",
    "load_certificate",
    "ratls_report_data",
    "read_extension",
    "verify_attestation",
    "verify_kms_cert",
    "verify_ratls_cert",
]

_ARC = "1.3.6.1.4.1.62397.1"
OID_QUOTE = x509.ObjectIdentifier(f"{_ARC}.1")
OID_EVENT_LOG = x509.ObjectIdentifier(f"{_ARC}.2")
OID_APP_ID = x509.ObjectIdentifier(f"{_ARC}.3")
OID_SPECIAL_USAGE = x509.ObjectIdentifier(f"{_ARC}.4")
OID_ATTESTATION = x509.ObjectIdentifier(f"{_ARC}.8")
OID_APP_INFO = x509.ObjectIdentifier(f"{_ARC}.9")

RATLS_TAG = b"ratls-cert:"

#: Every TCB status dcap-qvl can return except Revoked: the quote check proves the chain;
#: which statuses are acceptable is the admission policy's decision, changeable at runtime.
PERMISSIVE_TCB = TcbPolicy(frozenset(s for s in TcbStatus if s is not TcbStatus.REVOKED))

#: The collateral itself, or a function of the raw quote returning it (a PCCS lookup by FMSPC).
#: Errors it raises (``CollateralError``) propagate: they are not the evidence's fault.
CollateralSource: TypeAlias = "Collateral | Callable[[bytes], Collateral]"


def ratls_report_data(spki_der: bytes) -> bytes:
    """The 64 bytes an RA-TLS quote must carry for a key: ``SHA512("ratls-cert:" || SPKI)``."""
    return hashlib.sha512(RATLS_TAG + spki_der).digest()


def _spki(cert: x509.Certificate) -> bytes:
    """The certificate's SubjectPublicKeyInfo, re-encoded (DER) as dstack hashes it."""
    try:
        key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise EvidenceError(RejectReason.MALFORMED, f"unusable public key: {exc}") from None
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# --- DER OCTET STRING wrapping -------------------------------------------------------------


def der_octet_string(content: bytes) -> bytes:
    """DER ``OCTET STRING`` holding ``content`` (how dstack wraps its extension values)."""
    n = len(content)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return b"\x04" + length + content


def _parse_der_octet_string(data: bytes, what: str) -> bytes:
    """The content of exactly one definite-length DER OCTET STRING; raises CodecError."""
    if len(data) < 2 or data[0] != 0x04:
        raise CodecError(f"{what}: extension value is not a DER OCTET STRING")
    first = data[1]
    if first < 0x80:
        n, start = first, 2
    else:
        k = first & 0x7F
        if k == 0 or k > 4 or len(data) < 2 + k:
            raise CodecError(f"{what}: bad DER length")
        n, start = int.from_bytes(data[2 : 2 + k], "big"), 2 + k
        if n < 0x80 or data[2] == 0:
            raise CodecError(f"{what}: non-minimal DER length")
    if start + n != len(data):
        raise CodecError(f"{what}: DER length {n} does not match the {len(data) - start} bytes")
    return data[start:]


def read_extension(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> bytes | None:
    """The unwrapped content of one dstack extension, or ``None`` if absent."""
    try:
        ext = cert.extensions.get_extension_for_oid(oid)
    except x509.ExtensionNotFound:
        return None
    except (ValueError, x509.DuplicateExtension) as exc:  # malformed or repeated extensions
        raise CodecError(f"certificate extensions: {exc}") from None
    value = ext.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise CodecError(f"extension {oid.dotted_string}: unexpected type")
    return _parse_der_octet_string(value.value, oid.dotted_string)


def _is_pem(data: bytes) -> bool:
    # Not "contains": a DER RA-TLS certificate embeds the quote's PEM PCK chain.
    return data.lstrip().startswith(b"-----BEGIN")


def load_certificate(data: bytes) -> x509.Certificate:
    """A certificate from PEM or DER bytes (the first one of a PEM bundle)."""
    return load_chain(data)[0]


def load_chain(data: bytes) -> list[x509.Certificate]:
    """All certificates of a PEM bundle (leaf first), or one DER certificate.

    Certificates that ``cryptography`` only warns about (e.g. a non-positive serial, which
    RFC 5280 forbids and a future release will refuse) are refused here already: evidence
    is judged strictly and the same way whatever the library version.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", CryptographyDeprecationWarning)
            if _is_pem(data):
                chain = x509.load_pem_x509_certificates(data)
            else:
                chain = [x509.load_der_x509_certificate(data)]
    except (ValueError, x509.InvalidVersion, CryptographyDeprecationWarning) as exc:
        raise EvidenceError(RejectReason.MALFORMED, f"not an X.509 certificate: {exc}") from None
    if not chain:
        raise EvidenceError(RejectReason.MALFORMED, "no certificate in the PEM data")
    return chain


# --- building --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CertRequest:
    """What to put in an RA-TLS certificate besides the quote.

    ``alt_names`` become DNS SANs, or IP SANs when they parse as addresses. ``issuer`` signs
    the certificate (a CA certificate and its key); without it the certificate is
    self-signed. ``legacy`` also writes the 1.1 quote and 1.2 event-log extensions.
    """

    subject: str
    alt_names: tuple[str, ...] = ()
    app_id: bytes | None = None
    special_usage: str | None = "app:custom"
    server_auth: bool = True
    client_auth: bool = False
    vm_config: str = ""
    app_info: AppInfo | None = None
    legacy: bool = False
    legacy_gzip: bool = False
    validity: dt.timedelta = dt.timedelta(days=365)
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None


def _ext(oid: x509.ObjectIdentifier, content: bytes) -> x509.UnrecognizedExtension:
    return x509.UnrecognizedExtension(oid, der_octet_string(content))


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def build_ratls_cert(
    key: ec.EllipticCurvePrivateKey,
    tee: TeeBackend,
    request: CertRequest,
    *,
    now: dt.datetime,
) -> x509.Certificate:
    """Issue an RA-TLS certificate for ``key`` whose quote comes from ``tee``.

    The quote's report_data binds the key; the attestation (1.8) carries the runtime events
    so far, stripped (V0 SCALE, as dstack writes it).
    """
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    report_data = ratls_report_data(spki)
    quote = tee.get_quote(report_data)
    events = tuple(AttestedEvent(e.name, e.payload) for e in tee.runtime_events())
    att = Attestation(
        quote=quote,
        event_log=tuple(TdxEvent.runtime(e) for e in events),
        runtime_events=events,
        report_data=report_data,
        config=request.vm_config,
    )
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, request.subject)])
    if request.issuer is None:
        issuer_name, signing_key = subject, key
    else:
        issuer_name, signing_key = request.issuer[0].subject, request.issuer[1]
    usages = []
    if request.server_auth:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    if request.client_auth:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + request.validity)
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
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if request.alt_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_san(n) for n in request.alt_names]), critical=False
        )
    if request.issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(request.issuer[1].public_key()),
            critical=False,
        )
    if request.legacy:
        builder = builder.add_extension(_ext(OID_QUOTE, quote), critical=False)
        log = encode_legacy_event_log(att.event_log, gzip=request.legacy_gzip)
        builder = builder.add_extension(_ext(OID_EVENT_LOG, log), critical=False)
    if request.app_id is not None:
        builder = builder.add_extension(_ext(OID_APP_ID, request.app_id), critical=False)
    if request.special_usage is not None:
        usage = request.special_usage.encode()
        builder = builder.add_extension(_ext(OID_SPECIAL_USAGE, usage), critical=False)
    stripped = encode_attestation_v0(strip_attestation(att))
    builder = builder.add_extension(_ext(OID_ATTESTATION, stripped), critical=False)
    if request.app_info is not None:
        info = encode_app_info(request.app_info)
        builder = builder.add_extension(_ext(OID_APP_INFO, info), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


# --- verifying -------------------------------------------------------------------------------


def attestation_from_cert(cert: x509.Certificate) -> Attestation:
    """The (unverified) attestation an RA-TLS certificate carries: the 1.8 extension, or
    the legacy quote (1.1) and event log (1.2). Raises :class:`EvidenceError`."""
    try:
        blob = read_extension(cert, OID_ATTESTATION)
        if blob is not None:
            return decode_attestation(blob)
        quote = read_extension(cert, OID_QUOTE)
        log_blob = read_extension(cert, OID_EVENT_LOG)
        if quote is None or log_blob is None:
            raise EvidenceError(
                RejectReason.NO_EVIDENCE,
                "the certificate carries no attestation (1.3.6.1.4.1.62397.1.8) and no "
                "legacy quote + event log (.1 and .2)",
            )
        log = decode_legacy_event_log(log_blob)
        parsed = parse_tdx_quote(quote)
    except CodecError as exc:
        raise EvidenceError(RejectReason.MALFORMED, str(exc)) from None
    events = tuple(
        AttestedEvent(e.event, e.event_payload, e.version)
        for e in log
        if e.imr == 3 and e.is_runtime
    )
    return Attestation(quote, log, events, parsed.report.report_data, "")


def _measurements(vq: VerifiedQuote) -> Measurements:
    return Measurements(
        mr_td=vq.mr_td,
        rtmr0=vq.rt_mr0,
        rtmr1=vq.rt_mr1,
        rtmr2=vq.rt_mr2,
        rtmr3=vq.rt_mr3,
        mr_config_id=vq.mr_config_id,
        mr_owner=vq.mr_owner,
        mr_owner_config=vq.mr_owner_config,
        td_attributes=vq.td_attributes,
        report_data=vq.report_data,
    )


_QUOTE_REASONS = {
    QuoteReject.DEBUG_TD: RejectReason.DEBUG_TD,
    QuoteReject.TCB_STATUS_NOT_ALLOWED: RejectReason.TCB_STATUS,
    QuoteReject.MALFORMED: RejectReason.MALFORMED,
}


def verify_attestation(
    att: Attestation,
    expected_report_data: bytes,
    *,
    collateral: CollateralSource,
    root_ca_der: bytes | None,
    now: int,
    method: EvidenceMethod = EvidenceMethod.ATTESTATION,
    tcb_policy: TcbPolicy = PERMISSIVE_TCB,
) -> VerifiedEvidence:
    """Verify a decoded attestation whose report_data must be ``expected_report_data``.

    Raises :class:`EvidenceError`. Order: cheap structural checks, then dcap-qvl.
    """
    if not hmac.compare_digest(att.report_data, expected_report_data):
        raise EvidenceError(
            RejectReason.KEY_BINDING,
            "the attestation's report_data does not commit to the expected value (for RA-TLS: "
            "SHA512('ratls-cert:' || the certificate's public key))",
        )
    try:
        parsed = parse_tdx_quote(att.quote)
    except CodecError as exc:
        raise EvidenceError(RejectReason.MALFORMED, f"quote: {exc}") from None
    if not hmac.compare_digest(parsed.report.report_data, att.report_data):
        raise EvidenceError(
            RejectReason.REPORT_DATA_MISMATCH,
            "the quote's report_data differs from the attestation's: the quote was made for "
            "another key or request",
        )
    rtmr3 = replay_rtmr3(att.runtime_events)
    if rtmr3 != parsed.report.rt_mr3:
        err = explain_rtmr3_mismatch(att.runtime_events, parsed.report.rt_mr3, att.event_log)
        raise EvidenceError(RejectReason.RTMR_MISMATCH, str(err))
    col = collateral(att.quote) if callable(collateral) else collateral
    try:
        vq = verify_quote(
            att.quote, col, root_ca_der=root_ca_der, now=now, policy=tcb_policy, prechecked=True
        )
    except QuoteVerificationError as exc:
        reason = _QUOTE_REASONS.get(exc.reason, RejectReason.QUOTE_INVALID)
        raise EvidenceError(
            reason, f"quote: {exc.message}", quote_reason=exc.reason.value
        ) from None
    if vq.rt_mr3 != rtmr3 or vq.report_data != att.report_data:  # parse and dcap disagree
        raise EvidenceError(RejectReason.MALFORMED, "the quote parses inconsistently")
    identity = decode_app_identity(att.runtime_events)
    m = _measurements(vq)
    rtmrs = (m.rtmr0, m.rtmr1, m.rtmr2, m.rtmr3)
    return VerifiedEvidence(
        method=method,
        identity=identity,
        measurements=m,
        tcb_status=vq.status.value,
        advisory_ids=tuple(vq.advisory_ids),
        mr_system=mr_system(m.mr_td, rtmrs, identity.key_provider_payload),
        mr_aggregated=mr_aggregated(m.mr_td, rtmrs, m.mr_config_id, m.mr_owner, m.mr_owner_config),
    )


def verify_ratls_cert(
    cert: x509.Certificate | bytes,
    *,
    collateral: CollateralSource,
    root_ca_der: bytes | None,
    now: int,
    tcb_policy: TcbPolicy = PERMISSIVE_TCB,
    attestation: Attestation | None = None,
) -> VerifiedEvidence:
    """Verify an RA-TLS certificate (DER/PEM bytes or parsed); raises :class:`EvidenceError`.

    The certificate's own signature and validity are not what makes it trustworthy (it is
    usually self-signed): the quote bound to its key is. ``attestation``: what
    :func:`attestation_from_cert` returned for this same certificate object, when the
    caller needed it first (to look collateral up); it is then not decoded twice.
    """
    if isinstance(cert, bytes):
        cert = load_certificate(cert)
    att = attestation_from_cert(cert) if attestation is None else attestation
    return verify_attestation(
        att,
        ratls_report_data(_spki(cert)),
        collateral=collateral,
        root_ca_der=root_ca_der,
        now=now,
        method=EvidenceMethod.RATLS,
        tcb_policy=tcb_policy,
    )


# --- KMS-signed certificates (app info as an issuer claim) ---------------------------------


def _is_ca(value: x509.BasicConstraints | None) -> None:
    if value is None or not value.ca:
        raise ValueError("an issuing certificate must be a CA (basicConstraints CA:TRUE)")


def verify_kms_cert(
    chain: Sequence[x509.Certificate],
    kms_root: x509.Certificate,
    *,
    now: int,
) -> VerifiedEvidence:
    """Verify a KMS-issued client certificate and read its 1.9 app info.

    ``chain`` is leaf first (then the app CA, optionally the root). The chain must verify up
    to ``kms_root`` at ``now``; the app info is then the KMS's claim about the app. Raises
    :class:`EvidenceError`.
    """
    if not chain:
        raise EvidenceError(RejectReason.MALFORMED, "no certificate")
    leaf, intermediates = chain[0], list(chain[1:])
    ca_policy = ExtensionPolicy.permit_all().require_present(
        x509.BasicConstraints, Criticality.AGNOSTIC, lambda pol, cert, ext: _is_ca(ext)
    )
    when = dt.datetime.fromtimestamp(now, dt.UTC)
    verifier = (
        PolicyBuilder()
        .store(Store([kms_root]))
        .time(when)
        .max_chain_depth(4)
        .extension_policies(ca_policy=ca_policy, ee_policy=ExtensionPolicy.permit_all())
        .build_client_verifier()
    )
    try:
        verifier.verify(leaf, intermediates)
    except VerificationError as exc:
        raise EvidenceError(
            RejectReason.CHAIN_INVALID, f"the certificate does not chain to the KMS root: {exc}"
        ) from None
    try:
        raw = read_extension(leaf, OID_APP_INFO)
        if raw is None:
            raise EvidenceError(
                RejectReason.NO_EVIDENCE, "the KMS-signed certificate carries no app info (.9)"
            )
        info = decode_app_info(raw)
    except CodecError as exc:
        raise EvidenceError(RejectReason.MALFORMED, f"app info: {exc}") from None
    identity = AppIdentity(
        app_id=info.app_id,
        compose_hash=info.compose_hash,
        instance_id=info.instance_id,
        os_image_hash=info.os_image_hash,
        key_provider=parse_key_provider(info.key_provider_info),
        key_provider_payload=info.key_provider_info,
        boot_rtmr3=b"",
        rtmr3=b"",
    )
    return VerifiedEvidence(
        method=EvidenceMethod.KMS_CERT,
        identity=identity,
        measurements=None,
        tcb_status=None,
        advisory_ids=(),
        mr_system=info.mr_system,
        mr_aggregated=info.mr_aggregated,
    )
