"""One entry point for the registration RPC: evidence in, verdict out.

``verify_evidence`` takes what a CVM presented (its TLS client certificate chain, or an
attestation blob plus the report_data it must carry), the trust anchors from configuration
and the admission policy current at the time of the call, and returns an
:class:`EvidenceResult`: always a :class:`Verdict`, and the :class:`VerifiedEvidence` when
verification itself passed (so a refusal by policy still says who was refused).

Which path: a certificate carrying an attestation (1.8) or a legacy quote (1.1) is verified
as RA-TLS (the quote decides); one carrying only app info (1.9) is verified as a KMS-signed
certificate, if a KMS root is configured. The work is CPU-bound (about 1 ms in dcap-qvl,
well under 1 ms for the rest), so :func:`verify_evidence_async` runs it in an executor.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, replace

from cryptography import x509

from gateway.attest import ratls
from gateway.attest.collateral import CollateralSource
from gateway.attest.evidence import EvidenceError, RejectReason, VerifiedEvidence
from gateway.attest.policy import Verdict, evaluate
from gateway.attest.policy_settings import AdmissionPolicy
from gateway.attest.tcb import TcbPolicy
from gateway.protocol.attestation import decode_attestation
from gateway.protocol.errors import CodecError

__all__ = [
    "EvidenceResult",
    "TrustAnchors",
    "presented_quote",
    "verify_evidence",
    "verify_evidence_async",
    "verify_with_source",
]


@dataclass(frozen=True, slots=True)
class TrustAnchors:
    """What evidence must chain to.

    ``root_ca_der`` is the DCAP root (``None``: Intel's SGX Root CA; the simulator's root
    only when configuration names it); ``collateral`` is the collateral object (or a
    function of the raw quote returning it); ``kms_root`` enables KMS-signed certificates.
    ``tcb_policy`` is the static floor from ``[attest] allowed_tcb_statuses``: a status must
    be allowed there *and* by the (runtime-replaceable) admission policy.
    """

    collateral: ratls.CollateralSource
    root_ca_der: bytes | None = None
    kms_root: x509.Certificate | None = None
    tcb_policy: TcbPolicy = ratls.PERMISSIVE_TCB


@dataclass(frozen=True, slots=True)
class EvidenceResult:
    verdict: Verdict
    evidence: VerifiedEvidence | None

    def to_json(self) -> dict[str, object]:
        return {
            "verdict": self.verdict.to_json(),
            "evidence": None if self.evidence is None else self.evidence.to_json(),
        }


def _verify(
    *,
    cert_chain: Sequence[x509.Certificate] | None,
    attestation: bytes | None,
    expected_report_data: bytes | None,
    anchors: TrustAnchors,
    now: int,
) -> VerifiedEvidence:
    if cert_chain is not None:
        if not cert_chain:
            raise EvidenceError(RejectReason.NO_EVIDENCE, "no client certificate")
        leaf = cert_chain[0]
        try:
            has_quote = (
                ratls.read_extension(leaf, ratls.OID_ATTESTATION) is not None
                or ratls.read_extension(leaf, ratls.OID_QUOTE) is not None
            )
            has_info = ratls.read_extension(leaf, ratls.OID_APP_INFO) is not None
        except CodecError as exc:
            raise EvidenceError(RejectReason.MALFORMED, str(exc)) from None
        if has_quote:
            return ratls.verify_ratls_cert(
                leaf,
                collateral=anchors.collateral,
                root_ca_der=anchors.root_ca_der,
                now=now,
                tcb_policy=anchors.tcb_policy,
            )
        if has_info:
            if anchors.kms_root is None:
                raise EvidenceError(
                    RejectReason.CHAIN_INVALID,
                    "a KMS-signed certificate was presented but no KMS root CA is configured",
                )
            return ratls.verify_kms_cert(cert_chain, anchors.kms_root, now=now)
        raise EvidenceError(
            RejectReason.NO_EVIDENCE,
            "the certificate carries neither an attestation nor app info (not RA-TLS)",
        )
    if attestation is None or expected_report_data is None:
        raise EvidenceError(
            RejectReason.NO_EVIDENCE,
            "pass a certificate, or an attestation with the report_data it must carry",
        )
    try:
        att = decode_attestation(attestation)
    except CodecError as exc:
        raise EvidenceError(RejectReason.MALFORMED, f"attestation: {exc}") from None
    return ratls.verify_attestation(
        att,
        expected_report_data,
        collateral=anchors.collateral,
        root_ca_der=anchors.root_ca_der,
        now=now,
        tcb_policy=anchors.tcb_policy,
    )


def verify_evidence(
    *,
    anchors: TrustAnchors,
    policy: AdmissionPolicy,
    now: int,
    cert: bytes | x509.Certificate | Sequence[x509.Certificate] | None = None,
    attestation: bytes | None = None,
    expected_report_data: bytes | None = None,
) -> EvidenceResult:
    """Verify what a CVM presented and apply ``policy``. Never raises for bad evidence.

    ``cert``: PEM (a chain, leaf first) or DER bytes, a parsed certificate or a chain.
    Otherwise ``attestation`` (V0/V1 bytes) with ``expected_report_data`` (64 bytes).
    """
    try:
        chain: Sequence[x509.Certificate] | None
        if cert is None:
            chain = None
        elif isinstance(cert, bytes):
            chain = ratls.load_chain(cert)
        elif isinstance(cert, x509.Certificate):
            chain = [cert]
        else:
            chain = list(cert)
        evidence = _verify(
            cert_chain=chain,
            attestation=attestation,
            expected_report_data=expected_report_data,
            anchors=anchors,
            now=now,
        )
    except EvidenceError as exc:
        return EvidenceResult(Verdict.from_error(exc), None)
    return EvidenceResult(evaluate(policy, evidence), evidence)


async def verify_evidence_async(
    *,
    anchors: TrustAnchors,
    policy: AdmissionPolicy,
    now: int,
    cert: bytes | x509.Certificate | Sequence[x509.Certificate] | None = None,
    attestation: bytes | None = None,
    expected_report_data: bytes | None = None,
    executor: Executor | None = None,
) -> EvidenceResult:
    """:func:`verify_evidence` off the event loop (in ``executor``, default: the loop's)."""
    call = functools.partial(
        verify_evidence,
        anchors=anchors,
        policy=policy,
        now=now,
        cert=cert,
        attestation=attestation,
        expected_report_data=expected_report_data,
    )
    return await asyncio.get_running_loop().run_in_executor(executor, call)


def presented_quote(
    *,
    cert: bytes | x509.Certificate | Sequence[x509.Certificate] | None = None,
    attestation: bytes | None = None,
) -> bytes | None:
    """The raw quote inside presented evidence (unverified), to look its collateral up.

    ``None`` when there is none or it does not decode: verification then reports why.
    """
    try:
        if attestation is not None and cert is None:
            return decode_attestation(attestation).quote
        if cert is None:
            return None
        if isinstance(cert, bytes):
            leaf = ratls.load_chain(cert)[0]
        elif isinstance(cert, x509.Certificate):
            leaf = cert
        else:
            leaf = list(cert)[0]
        blob = ratls.read_extension(leaf, ratls.OID_ATTESTATION)
        if blob is not None:
            return decode_attestation(blob).quote
        return ratls.read_extension(leaf, ratls.OID_QUOTE)
    except (CodecError, EvidenceError, IndexError):
        return None


async def verify_with_source(
    *,
    source: CollateralSource,
    anchors: TrustAnchors,
    policy: AdmissionPolicy,
    now: int,
    cert: bytes | x509.Certificate | Sequence[x509.Certificate] | None = None,
    attestation: bytes | None = None,
    expected_report_data: bytes | None = None,
    executor: Executor | None = None,
) -> EvidenceResult:
    """What the registration RPC calls: fetch the quote's collateral from ``source`` (a
    cache hit normally; ``CollateralError`` propagates, as it is not the evidence's fault),
    then verify off the event loop. ``anchors.collateral`` is ignored."""
    quote = presented_quote(cert=cert, attestation=attestation)
    if quote is not None:
        anchors = replace(anchors, collateral=await source.get(quote))
    return await verify_evidence_async(
        anchors=anchors,
        policy=policy,
        now=now,
        cert=cert,
        attestation=attestation,
        expected_report_data=expected_report_data,
        executor=executor,
    )
