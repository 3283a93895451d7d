"""One entry point for the registration RPC: evidence in, verdict out.

``verify_evidence`` takes what a CVM presented (its TLS client certificate chain, or an
attestation blob plus the report_data it must carry), the trust anchors from configuration
and the admission policy current at the time of the call, and returns an
:class:`EvidenceResult`: always a :class:`Verdict`, and the :class:`VerifiedEvidence` when
verification itself passed (so a refusal by policy still says who was refused).

Which path: a certificate carrying an attestation (1.8) or a legacy quote (1.1) is verified
as RA-TLS (the quote decides); one carrying only app info (1.9) is verified as a KMS-signed
certificate, if a KMS root is configured. The work is CPU-bound (about 0.75 ms in dcap-qvl,
0.2 ms for the rest). :func:`verify_with_source`, what the registration RPC calls, runs it on
the event loop: dcap-qvl holds the GIL while it verifies, so a worker thread would let
nothing else run meanwhile and only add two thread switches and GIL hand-offs per call
(measured: ~0.1 ms of CPU per registration). :func:`verify_evidence_async` still offers an
executor (a process pool, say).
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
from gateway.protocol.attestation import Attestation, decode_attestation
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
    decoded: Attestation | None = None,
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
                attestation=decoded,
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
        att = decode_attestation(attestation) if decoded is None else decoded
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
        chain = None if cert is None else _as_chain(cert)
    except EvidenceError as exc:
        return EvidenceResult(Verdict.from_error(exc), None)
    return _judge(anchors, policy, now, chain, attestation, expected_report_data, None)


def _as_chain(
    cert: bytes | x509.Certificate | Sequence[x509.Certificate],
) -> Sequence[x509.Certificate]:
    if isinstance(cert, bytes):
        return ratls.load_chain(cert)
    if isinstance(cert, x509.Certificate):
        return [cert]
    return list(cert)


def _judge(
    anchors: TrustAnchors,
    policy: AdmissionPolicy,
    now: int,
    chain: Sequence[x509.Certificate] | None,
    attestation: bytes | None,
    expected_report_data: bytes | None,
    decoded: Attestation | None,
) -> EvidenceResult:
    """Verify, then apply the policy. ``decoded`` is the attestation already decoded from
    this same ``chain[0]`` object (or ``attestation`` bytes), never from other evidence."""
    try:
        evidence = _verify(
            cert_chain=chain,
            attestation=attestation,
            expected_report_data=expected_report_data,
            anchors=anchors,
            now=now,
            decoded=decoded,
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
        chain = None if cert is None else _as_chain(cert)
    except EvidenceError:
        return None
    return _presented(chain, attestation)[0]


def _presented(
    chain: Sequence[x509.Certificate] | None, attestation: bytes | None
) -> tuple[bytes | None, Attestation | None]:
    """The presented quote and, when it came from a decoded attestation, that attestation
    (handed on to verification so that it is not decoded again)."""
    try:
        if attestation is not None and chain is None:
            att = decode_attestation(attestation)
            return att.quote, att
        if not chain:
            return None, None
        leaf = chain[0]
        blob = ratls.read_extension(leaf, ratls.OID_ATTESTATION)
        if blob is not None:
            att = decode_attestation(blob)
            return att.quote, att
        return ratls.read_extension(leaf, ratls.OID_QUOTE), None
    except (CodecError, EvidenceError):
        return None, None


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
    then verify: on the loop (see the module's docstring for why), or in ``executor``.
    ``anchors.collateral`` is ignored. The attestation is decoded once, for both steps."""
    try:
        chain = None if cert is None else _as_chain(cert)
    except EvidenceError as exc:
        return EvidenceResult(Verdict.from_error(exc), None)
    quote, decoded = _presented(chain, attestation)
    if quote is not None:
        anchors = replace(anchors, collateral=await source.get(quote))
    if executor is None:
        return _judge(anchors, policy, now, chain, attestation, expected_report_data, decoded)
    return await verify_evidence_async(
        anchors=anchors,
        policy=policy,
        now=now,
        cert=cert,
        attestation=attestation,
        expected_report_data=expected_report_data,
        executor=executor,
    )
