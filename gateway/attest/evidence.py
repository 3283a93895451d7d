"""What verification establishes about a CVM, and the one closed set of reasons to refuse it.

:class:`VerifiedEvidence` is produced only by the verifiers (``gateway.attest.ratls``,
``gateway.attest.verifier``) after every cryptographic check passed; the admission policy
(``gateway.attest.policy``) then decides on it without any further crypto. Both stages
report refusals with a :class:`RejectReason`, so a caller (the registration RPC, the CLI,
the admin API) gets one machine-readable code whichever stage said no, plus a sentence for
people.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from gateway.attest.eventlog import AppIdentity

__all__ = ["EvidenceError", "EvidenceMethod", "Measurements", "RejectReason", "VerifiedEvidence"]


class RejectReason(enum.StrEnum):
    """Why evidence was refused. Stable strings: they appear in RPC errors and logs."""

    # verification
    MALFORMED = "malformed"  # not decodable: bad certificate, extension or attestation
    NO_EVIDENCE = "no_evidence"  # a certificate with neither attestation nor app info
    KEY_BINDING = "key_binding"  # report_data does not commit to the certificate's key
    REPORT_DATA_MISMATCH = "report_data_mismatch"  # quote vs attestation vs expected
    QUOTE_INVALID = "quote_invalid"  # DCAP verification failed (signature, chain, root...)
    RTMR_MISMATCH = "rtmr_mismatch"  # the event log does not replay to the quote
    CHAIN_INVALID = "chain_invalid"  # KMS-signed certificate does not chain to the KMS root
    # policy
    DEBUG_TD = "debug_td"
    TCB_STATUS = "tcb_status_not_allowed"
    APP_NOT_ALLOWED = "app_not_allowed"
    COMPOSE_NOT_ALLOWED = "compose_not_allowed"
    OS_IMAGE_NOT_ALLOWED = "os_image_not_allowed"
    MEASUREMENT_NOT_ALLOWED = "measurement_not_allowed"
    KMS_CERT_NOT_ALLOWED = "kms_cert_not_allowed"
    # the operator's registration webhook (gateway.control.auth_webhook) answered non-2xx
    WEBHOOK_DENIED = "webhook_denied"


class EvidenceError(Exception):
    """Verification refused the evidence; ``reason`` is for machines, ``detail`` for people."""

    def __init__(self, reason: RejectReason, detail: str, *, quote_reason: str | None = None):
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
        self.quote_reason = quote_reason  # the quote verifier's finer code, for QUOTE_INVALID


class EvidenceMethod(enum.StrEnum):
    """How the identity was established."""

    RATLS = "ratls"  # a quote bound to the certificate key, event log replayed
    ATTESTATION = "attestation"  # a bare attestation bound to an expected report_data
    KMS_CERT = "kms_cert"  # app info claimed by a certificate chaining to the KMS root


@dataclass(frozen=True, slots=True)
class Measurements:
    """The TD's measurement registers from a verified quote (raw bytes)."""

    mr_td: bytes
    rtmr0: bytes
    rtmr1: bytes
    rtmr2: bytes
    rtmr3: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    td_attributes: bytes
    report_data: bytes

    @property
    def debug(self) -> bool:
        """TDATTRIBUTES.DEBUG (bit 0): the host can read and change the TD's memory."""
        return bool(self.td_attributes[0] & 1) if self.td_attributes else False

    def to_json(self) -> dict[str, str]:
        return {
            "mr_td": self.mr_td.hex(),
            "rtmr0": self.rtmr0.hex(),
            "rtmr1": self.rtmr1.hex(),
            "rtmr2": self.rtmr2.hex(),
            "rtmr3": self.rtmr3.hex(),
            "mr_config_id": self.mr_config_id.hex(),
            "mr_owner": self.mr_owner.hex(),
            "mr_owner_config": self.mr_owner_config.hex(),
            "td_attributes": self.td_attributes.hex(),
            "report_data": self.report_data.hex(),
        }


@dataclass(frozen=True, slots=True)
class VerifiedEvidence:
    """A CVM's verified identity.

    For ``ratls``/``attestation`` every field comes from a DCAP-verified quote and a replayed
    event log. For ``kms_cert`` there is no quote: ``measurements`` and ``tcb_status`` are
    ``None`` and the identity is the KMS's claim (``mr_system``/``mr_aggregated`` as claimed).
    """

    method: EvidenceMethod
    identity: AppIdentity
    measurements: Measurements | None
    tcb_status: str | None
    advisory_ids: tuple[str, ...]
    mr_system: bytes
    mr_aggregated: bytes

    def to_json(self) -> dict[str, object]:
        return {
            "method": self.method.value,
            "identity": self.identity.to_json(),
            "measurements": None if self.measurements is None else self.measurements.to_json(),
            "tcb_status": self.tcb_status,
            "advisory_ids": list(self.advisory_ids),
            "debug": None if self.measurements is None else self.measurements.debug,
            "mr_system": self.mr_system.hex(),
            "mr_aggregated": self.mr_aggregated.hex(),
        }
