"""The admission decision: verified evidence + policy -> verdict. Pure, no crypto, no I/O.

Checks run in a fixed order, cheapest and most fundamental first, and the first failure is
the verdict (one reason, one sentence): debug TD, TCB status, boot chain (MRTD + RTMR0-2),
OS image hash, app id, compose hash. Evidence established only by a KMS-signed certificate
has no quote: it is refused unless the policy allows KMS certificates, and a policy that
pins boot chains refuses it too (there are no measurements to compare).
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.attest.evidence import EvidenceError, EvidenceMethod, RejectReason, VerifiedEvidence
from gateway.attest.policy_settings import AdmissionPolicy

__all__ = ["Verdict", "evaluate"]


@dataclass(frozen=True, slots=True)
class Verdict:
    """``accepted`` with ``reason=None``, or refused with a machine-readable reason."""

    accepted: bool
    reason: RejectReason | None
    detail: str
    quote_reason: str | None = None  # the quote verifier's finer code, for quote_invalid

    @classmethod
    def accept(cls, detail: str) -> Verdict:
        return cls(True, None, detail)

    @classmethod
    def reject(cls, reason: RejectReason, detail: str) -> Verdict:
        return cls(False, reason, detail)

    @classmethod
    def from_error(cls, err: EvidenceError) -> Verdict:
        return cls(False, err.reason, err.detail, err.quote_reason)

    def to_json(self) -> dict[str, object]:
        return {
            "accepted": self.accepted,
            "reason": None if self.reason is None else self.reason.value,
            "detail": self.detail,
            "quote_reason": self.quote_reason,
        }


def evaluate(policy: AdmissionPolicy, evidence: VerifiedEvidence) -> Verdict:
    """Decide whether ``evidence`` is admitted under ``policy``."""
    ident = evidence.identity
    app = ident.app_id.hex() or "(none)"
    m = evidence.measurements
    if evidence.method is EvidenceMethod.KMS_CERT:
        if not policy.allow_kms_cert:
            return Verdict.reject(
                RejectReason.KMS_CERT_NOT_ALLOWED,
                f"app {app} presented only a KMS-signed certificate (no quote); the policy "
                "requires a quote (set allow_kms_cert to accept KMS-vouched apps)",
            )
        if policy.os_images:
            return Verdict.reject(
                RejectReason.MEASUREMENT_NOT_ALLOWED,
                f"app {app} has no quote, so its boot chain cannot be checked against the "
                f"{len(policy.os_images)} allowed OS images",
            )
    else:
        if m is None:  # a verifier bug; fail closed
            return Verdict.reject(RejectReason.MALFORMED, "evidence carries no measurements")
        if m.debug:
            return Verdict.reject(
                RejectReason.DEBUG_TD,
                f"app {app} runs in a debug TD (the host can read its memory); refused",
            )
        if evidence.tcb_status not in policy.allowed_tcb_statuses:
            return Verdict.reject(
                RejectReason.TCB_STATUS,
                f"platform TCB status is {evidence.tcb_status}; the policy allows "
                f"{', '.join(policy.allowed_tcb_statuses) or 'none'}",
            )
        if policy.os_images and not any(
            img.matches(m.mr_td, m.rtmr0, m.rtmr1, m.rtmr2) for img in policy.os_images
        ):
            return Verdict.reject(
                RejectReason.MEASUREMENT_NOT_ALLOWED,
                f"boot chain MRTD {m.mr_td.hex()[:16]}... / RTMR0-2 matches none of the "
                f"{len(policy.os_images)} allowed OS images",
            )
    if policy.os_image_hashes and ident.os_image_hash.hex() not in policy.os_image_hashes:
        shown = ident.os_image_hash.hex() or "(not measured: no KMS key provider)"
        return Verdict.reject(
            RejectReason.OS_IMAGE_NOT_ALLOWED, f"OS image hash {shown} is not allowed"
        )
    if not policy.allow_any_app and app not in policy.app_ids:
        hint = "" if policy.app_ids else " (the policy lists no apps and allow_any_app is off)"
        return Verdict.reject(RejectReason.APP_NOT_ALLOWED, f"app {app} is not allowed{hint}")
    if policy.compose_hashes and ident.compose_hash.hex() not in policy.compose_hashes:
        return Verdict.reject(
            RejectReason.COMPOSE_NOT_ALLOWED,
            f"app {app} runs compose hash {ident.compose_hash.hex() or '(none)'}, "
            "which is not allowed",
        )
    how = {
        EvidenceMethod.RATLS: "RA-TLS quote",
        EvidenceMethod.ATTESTATION: "attestation quote",
        EvidenceMethod.KMS_CERT: "KMS-signed certificate",
    }[evidence.method]
    return Verdict.accept(f"app {app} admitted ({how}, TCB {evidence.tcb_status or 'n/a'})")
