"""TDX quote verification: one code path through ``dcap_qvl.verify_with_root_ca``.

What is verified (by dcap-qvl, see docs/attestation.md): the PCK chain up to ``root_ca_der``
with CRLs, the signed TCB info and QE identity, the QE report signed by the PCK key, the
attestation key bound into the QE report, and the quote signature over header ‖ TD report;
then the platform and QE TCB status. What we add on top: the TCB status policy (dcap-qvl
raises only for ``Revoked``), a debug-TD refusal that does not depend on the library, and
machine-readable rejection reasons.

The root is Intel's unless a caller passes another DER certificate: the simulated TDX
(``gateway.tee.sim``) differs from real hardware only in that anchor. Verification time is
always passed in (``now``), so audits can re-verify evidence as of a past moment.

Which measurements to expect (MRTD, RTMR0..3 via event-log replay, report_data binding) is
the caller's business (``gateway.attest`` admission); this module only says what the quote
proves.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import dcap_qvl
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.attest.intel_root import INTEL_SGX_ROOT_CA_DER
from gateway.attest.settings import AttestSettings
from gateway.attest.tcb import TcbPolicy, TcbStatus
from gateway.protocol.errors import CodecError
from gateway.protocol.tdx_quote import QUOTE_VERSION_4, parse_tdx_quote

__all__ = [
    "Collateral",
    "QuoteVerificationError",
    "QuoteVerifier",
    "RejectReason",
    "TcbPolicy",
    "TcbStatus",
    "VerifiedQuote",
    "classify_dcap_error",
    "load_collateral_json",
    "load_root_ca",
    "verify_quote",
    "verifier_from_settings",
    "verify_quote_async",
]

logger = logging.getLogger(__name__)

Collateral: TypeAlias = "dcap_qvl.QuoteCollateralV3 | str | bytes"
"""A dcap-qvl collateral object, or its JSON (``QuoteCollateralV3.to_json`` format)."""


class RejectReason(enum.StrEnum):
    """Why evidence was rejected: stable, machine-readable (logs, API answers, metrics)."""

    MALFORMED = "malformed"  # not a decodable TDX quote (or bad argument shapes)
    BAD_SIGNATURE = "bad_signature"  # quote signature over header ‖ TD report invalid
    BAD_QE_REPORT = "bad_qe_report"  # QE report not signed by the PCK key
    ATTESTATION_KEY_MISMATCH = "attestation_key_mismatch"  # QE report does not bind the key
    WRONG_ROOT = "wrong_root"  # evidence does not chain to the configured root
    UNTRUSTED_CHAIN = "untrusted_chain"  # certificate chain invalid for another reason
    CRL_EXPIRED = "crl_expired"
    REVOKED = "revoked"  # a certificate on a CRL, or TCB status Revoked
    CERT_EXPIRED = "cert_expired"  # a certificate outside its validity at ``now``
    TCB_EXPIRED = "tcb_expired"  # TCB info / QE identity past nextUpdate
    COLLATERAL_NOT_YET_VALID = "collateral_not_yet_valid"
    BAD_COLLATERAL = "bad_collateral"  # unparseable or badly signed collateral
    COLLATERAL_MISMATCH = "collateral_mismatch"  # collateral is for another platform/TEE
    QE_IDENTITY_MISMATCH = "qe_identity_mismatch"
    TCB_LEVEL_NOT_FOUND = "tcb_level_not_found"
    DEBUG_TD = "debug_td"
    BAD_TD_ATTRIBUTES = "bad_td_attributes"
    TCB_STATUS_NOT_ALLOWED = "tcb_status_not_allowed"
    VERIFICATION_FAILED = "verification_failed"  # anything dcap-qvl said that we do not map


class QuoteVerificationError(Exception):
    """The quote is not acceptable evidence. ``reason`` is for machines, the message for
    people (it carries dcap-qvl's own text where there is one)."""

    def __init__(self, reason: RejectReason, message: str) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason
        self.message = message

    def __reduce__(self) -> tuple[type[QuoteVerificationError], tuple[RejectReason, str]]:
        # Survives a ProcessPoolExecutor round trip (the default pickling would call
        # __init__ with the formatted text as the only argument).
        return (type(self), (self.reason, self.message))


# Ordered: the first needle found in dcap-qvl's message (its whole cause chain) wins.
_DCAP_REASONS: tuple[tuple[str, RejectReason], ...] = (
    ("CrlExpired", RejectReason.CRL_EXPIRED),
    ("certificate revocation list expired", RejectReason.CRL_EXPIRED),
    ("CertRevoked", RejectReason.REVOKED),
    ("TCB status is invalid: Revoked", RejectReason.REVOKED),
    ("InvalidCrlSignatureForPublicKey", RejectReason.WRONG_ROOT),
    ("UnknownIssuer", RejectReason.WRONG_ROOT),
    ("Failed to parse root CA certificate", RejectReason.WRONG_ROOT),
    ("CertNotValidYet", RejectReason.CERT_EXPIRED),
    ("CertExpired", RejectReason.CERT_EXPIRED),
    ("certificate expired", RejectReason.CERT_EXPIRED),
    ("ISV enclave report signature is invalid", RejectReason.BAD_SIGNATURE),
    ("Signature is invalid for qe_report", RejectReason.BAD_QE_REPORT),
    ("QE report hash mismatch", RejectReason.ATTESTATION_KEY_MISMATCH),
    ("Signature is invalid for tcb_info", RejectReason.BAD_COLLATERAL),
    ("Signature is invalid for qe_identity", RejectReason.BAD_COLLATERAL),
    ("TCBInfo expired", RejectReason.TCB_EXPIRED),
    ("QE Identity expired", RejectReason.TCB_EXPIRED),
    ("Collateral expired", RejectReason.TCB_EXPIRED),
    ("issue date is in the future", RejectReason.COLLATERAL_NOT_YET_VALID),
    ("Debug mode is enabled", RejectReason.DEBUG_TD),
    ("Fmspc mismatch", RejectReason.COLLATERAL_MISMATCH),
    ("with non-TDX TCB info", RejectReason.COLLATERAL_MISMATCH),
    ("with non-SGX TCB info", RejectReason.COLLATERAL_MISMATCH),
    ("QE MRSIGNER mismatch", RejectReason.QE_IDENTITY_MISMATCH),
    ("QE ISVPRODID mismatch", RejectReason.QE_IDENTITY_MISMATCH),
    ("QE ATTRIBUTES mismatch", RejectReason.QE_IDENTITY_MISMATCH),
    ("QE MISCSELECT mismatch", RejectReason.QE_IDENTITY_MISMATCH),
    ("Unsupported QE Identity", RejectReason.QE_IDENTITY_MISMATCH),
    ("No matching TCB level", RejectReason.TCB_LEVEL_NOT_FOUND),
    ("TCB level mismatch", RejectReason.TCB_LEVEL_NOT_FOUND),
    ("TDX module", RejectReason.TCB_LEVEL_NOT_FOUND),
    ("is below minimum required", RejectReason.TCB_LEVEL_NOT_FOUND),
    ("component count mismatch", RejectReason.BAD_COLLATERAL),
    ("Failed to decode quote", RejectReason.MALFORMED),
    ("Invalid TEE type", RejectReason.MALFORMED),
    ("Unsupported TEE type", RejectReason.MALFORMED),
    ("Unsupported DCAP quote version", RejectReason.MALFORMED),
    ("must have version", RejectReason.MALFORMED),
    ("Unsupported DCAP attestation key type", RejectReason.MALFORMED),
    ("Unknown QE vendor ID", RejectReason.MALFORMED),
    ("Invalid QE auth data length", RejectReason.MALFORMED),
    ("Unsupported cert", RejectReason.MALFORMED),
    ("Unsupported certification data type", RejectReason.MALFORMED),
    ("Failed to parse root CA CRL", RejectReason.BAD_COLLATERAL),
    ("Failed to parse PCK CRL", RejectReason.BAD_COLLATERAL),
    ("Failed to decode TcbInfo", RejectReason.BAD_COLLATERAL),
    ("Failed to decode QE", RejectReason.BAD_COLLATERAL),
    ("Failed to parse", RejectReason.BAD_COLLATERAL),
    ("Failed to verify certificate chain", RejectReason.UNTRUSTED_CHAIN),
    ("InvalidSignatureForPublicKey", RejectReason.UNTRUSTED_CHAIN),
    ("UnknownRevocationStatus", RejectReason.UNTRUSTED_CHAIN),
    ("CaUsedAsEndEntity", RejectReason.UNTRUSTED_CHAIN),
    ("SEPT_VE", RejectReason.BAD_TD_ATTRIBUTES),
    ("TD attributes", RejectReason.BAD_TD_ATTRIBUTES),
    ("Reserved", RejectReason.BAD_TD_ATTRIBUTES),
)


def classify_dcap_error(message: str) -> RejectReason:
    """Map a dcap-qvl failure message to a :class:`RejectReason` (``VERIFICATION_FAILED``
    when nothing matches: the caller keeps the message for people)."""
    for needle, reason in _DCAP_REASONS:
        if needle in message:
            return reason
    return RejectReason.VERIFICATION_FAILED


def _one_line(message: str) -> str:
    """dcap-qvl's "X\\n\\nCaused by:\\n    Y" as "X; caused by: Y" (log lines are one line)."""
    text = message.removeprefix("Verification failed: ")
    head, _, causes = text.partition("\n\nCaused by:")
    parts = [head.strip()] + [c.strip() for c in causes.strip().splitlines() if c.strip()]
    return "; caused by: ".join(p for p in parts if p)


@dataclass(frozen=True, slots=True)
class VerifiedQuote:
    """What a verified quote proves. Byte fields are raw bytes; ``raw_json`` is dcap-qvl's
    full report (kept for audit logs and for fields not lifted here)."""

    status: TcbStatus
    advisory_ids: tuple[str, ...]
    mr_td: bytes
    rt_mr0: bytes
    rt_mr1: bytes
    rt_mr2: bytes
    rt_mr3: bytes
    report_data: bytes
    td_attributes: bytes
    xfam: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    mr_seam: bytes
    tee_tcb_svn: bytes
    ppid: bytes
    is_debug: bool
    verified_at: int
    raw_json: str = field(repr=False)

    @property
    def rtmrs(self) -> tuple[bytes, bytes, bytes, bytes]:
        return (self.rt_mr0, self.rt_mr1, self.rt_mr2, self.rt_mr3)

    def summary(self) -> dict[str, Any]:
        """JSON-friendly view (hex for bytes) for CLI output and audit logs."""
        return {
            "status": self.status.value,
            "advisory_ids": list(self.advisory_ids),
            "mr_td": self.mr_td.hex(),
            "rt_mr0": self.rt_mr0.hex(),
            "rt_mr1": self.rt_mr1.hex(),
            "rt_mr2": self.rt_mr2.hex(),
            "rt_mr3": self.rt_mr3.hex(),
            "report_data": self.report_data.hex(),
            "td_attributes": self.td_attributes.hex(),
            "xfam": self.xfam.hex(),
            "mr_config_id": self.mr_config_id.hex(),
            "mr_owner": self.mr_owner.hex(),
            "mr_owner_config": self.mr_owner_config.hex(),
            "mr_seam": self.mr_seam.hex(),
            "tee_tcb_svn": self.tee_tcb_svn.hex(),
            "ppid": self.ppid.hex(),
            "is_debug": self.is_debug,
            "verified_at": self.verified_at,
        }


def load_collateral_json(text: str | bytes) -> dcap_qvl.QuoteCollateralV3:
    """Collateral from its JSON (dcap-qvl's ``to_json`` format: byte fields as hex).

    Raises :class:`QuoteVerificationError` (``bad_collateral``) when it does not decode.
    """
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return dcap_qvl.QuoteCollateralV3.from_json(text)
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        raise QuoteVerificationError(
            RejectReason.BAD_COLLATERAL, f"collateral JSON does not decode: {exc}"
        ) from None


def _hex_field(td: dict[str, Any], name: str, size: int) -> bytes:
    value = bytes.fromhex(td[name])
    if len(value) != size:
        raise ValueError(f"{name} is {len(value)} bytes, expected {size}")
    return value


def _verified_from_json(raw: str, ppid: bytes, now: int) -> VerifiedQuote:
    try:
        doc = json.loads(raw)
        report = doc["report"]
        td = report.get("TD10") or report.get("TD15")
        if not isinstance(td, dict):
            raise QuoteVerificationError(
                RejectReason.MALFORMED, f"not a TDX quote (report kind {sorted(report)})"
            )
        status_name = doc["status"]
        advisories = tuple(str(a) for a in doc.get("advisory_ids", ()))
        fields = {
            name: _hex_field(td, name, size)
            for name, size in (
                ("mr_td", 48),
                ("rt_mr0", 48),
                ("rt_mr1", 48),
                ("rt_mr2", 48),
                ("rt_mr3", 48),
                ("report_data", 64),
                ("td_attributes", 8),
                ("xfam", 8),
                ("mr_config_id", 48),
                ("mr_owner", 48),
                ("mr_owner_config", 48),
                ("mr_seam", 48),
                ("tee_tcb_svn", 16),
            )
        }
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise QuoteVerificationError(
            RejectReason.VERIFICATION_FAILED, f"unexpected dcap-qvl report shape: {exc!r}"
        ) from None
    try:
        status = TcbStatus(status_name)
    except ValueError:
        raise QuoteVerificationError(
            RejectReason.TCB_STATUS_NOT_ALLOWED, f"unknown TCB status {status_name!r}"
        ) from None
    return VerifiedQuote(
        status=status,
        advisory_ids=advisories,
        ppid=bytes(ppid),
        is_debug=bool(fields["td_attributes"][0] & 1),
        verified_at=now,
        raw_json=raw,
        **fields,
    )


def _precheck(quote: bytes) -> None:
    """Refuse v4 quotes whose framing is inconsistent before dcap-qvl sees them.

    dcap-qvl ignores some unauthenticated framing (the outer certification data type, a
    PCK chain size that disagrees with ``sig_data_len``); our strict parser does not, so a
    re-framed quote is ``malformed`` rather than silently accepted. Other versions go to
    dcap-qvl unchanged (it rejects or handles them itself).
    """
    if len(quote) >= 2 and quote[0] == QUOTE_VERSION_4 and quote[1] == 0:
        try:
            parse_tdx_quote(quote)
        except CodecError as exc:
            raise QuoteVerificationError(RejectReason.MALFORMED, str(exc)) from None


def verify_quote(
    quote: bytes,
    collateral: Collateral,
    *,
    root_ca_der: bytes | None = None,
    now: int,
    policy: TcbPolicy | None = None,
    prechecked: bool = False,
) -> VerifiedQuote:
    """Verify ``quote`` against ``collateral`` at unix time ``now`` under ``root_ca_der``
    (Intel's SGX Root CA when ``None``), then apply ``policy`` (default: UpToDate only)
    and refuse debug TDs.

    ``prechecked``: the caller has just parsed exactly these bytes with
    :func:`~gateway.protocol.tdx_quote.parse_tdx_quote` (the RA-TLS path does), so the
    strict framing check is not repeated.

    Returns a :class:`VerifiedQuote`; raises :class:`QuoteVerificationError` with a
    :class:`RejectReason`. Blocks for about a millisecond (use :func:`verify_quote_async`
    from a coroutine).
    """
    if isinstance(now, bool) or not isinstance(now, int | float):
        raise TypeError("now must be a unix time in seconds (int)")
    now = int(now)
    if not 0 <= now < 2**63:
        raise ValueError(f"verification time {now} is out of range")
    if not isinstance(quote, bytes | bytearray | memoryview) or len(quote) == 0:
        raise QuoteVerificationError(RejectReason.MALFORMED, "the quote is empty or not bytes")
    if not prechecked:
        _precheck(bytes(quote))
    col = load_collateral_json(collateral) if isinstance(collateral, str | bytes) else collateral
    root = INTEL_SGX_ROOT_CA_DER if root_ca_der is None else bytes(root_ca_der)
    try:
        report = dcap_qvl.verify_with_root_ca(bytes(quote), col, root, now)
    except ValueError as exc:
        text = str(exc)
        raise QuoteVerificationError(classify_dcap_error(text), _one_line(text)) from None
    except (TypeError, OverflowError) as exc:
        raise QuoteVerificationError(RejectReason.MALFORMED, f"dcap-qvl refused: {exc}") from None
    verified = _verified_from_json(report.to_json(), report.ppid, now)
    if verified.is_debug:  # dcap-qvl refuses these too; we do not rely on it alone
        raise QuoteVerificationError(RejectReason.DEBUG_TD, "the TD has DEBUG set")
    if verified.status is TcbStatus.REVOKED:
        raise QuoteVerificationError(RejectReason.REVOKED, "TCB status is Revoked")
    pol = policy if policy is not None else TcbPolicy()
    if not pol.admits(verified.status):
        allowed = ", ".join(sorted(s.value for s in pol.allowed))
        advisories = ", ".join(verified.advisory_ids) or "none"
        raise QuoteVerificationError(
            RejectReason.TCB_STATUS_NOT_ALLOWED,
            f"TCB status {verified.status.value} (advisories: {advisories}) is not in the "
            f"allowed set ({allowed}); allow it in [attest] allowed_tcb_statuses if acceptable",
        )
    return verified


async def verify_quote_async(
    quote: bytes,
    collateral: Collateral,
    *,
    root_ca_der: bytes | None = None,
    now: int,
    policy: TcbPolicy | None = None,
    executor: Executor | None = None,
) -> VerifiedQuote:
    """:func:`verify_quote` in ``executor`` (the loop's default thread pool when ``None``),
    so the event loop keeps serving while dcap-qvl works.

    dcap-qvl holds the GIL, so threads add no parallelism; for throughput pass a
    ``ProcessPoolExecutor`` and collateral as JSON text (the dcap-qvl object does not pickle).
    """
    loop = asyncio.get_running_loop()
    call = functools.partial(
        verify_quote, bytes(quote), collateral, root_ca_der=root_ca_der, now=now, policy=policy
    )
    return await loop.run_in_executor(executor, call)


@dataclass(frozen=True, slots=True)
class QuoteVerifier:
    """Verification settings bundled once (root, policy, clock) and passed to whoever
    verifies. ``fixed_time`` pins the verification time (audits, tests); otherwise
    ``clock`` is read per verification."""

    root_ca_der: bytes | None = None
    policy: TcbPolicy = field(default_factory=TcbPolicy)
    fixed_time: int | None = None
    clock: Callable[[], float] = time.time
    executor: Executor | None = None

    @property
    def uses_intel_root(self) -> bool:
        return self.root_ca_der is None or bytes(self.root_ca_der) == INTEL_SGX_ROOT_CA_DER

    def now(self) -> int:
        return self.fixed_time if self.fixed_time is not None else int(self.clock())

    def verify(self, quote: bytes, collateral: Collateral) -> VerifiedQuote:
        return verify_quote(
            quote, collateral, root_ca_der=self.root_ca_der, now=self.now(), policy=self.policy
        )

    async def verify_async(self, quote: bytes, collateral: Collateral) -> VerifiedQuote:
        return await verify_quote_async(
            quote,
            collateral,
            root_ca_der=self.root_ca_der,
            now=self.now(),
            policy=self.policy,
            executor=self.executor,
        )


def load_root_ca(path: Path) -> bytes:
    """A root certificate file (DER or PEM) as DER. Raises ``ValueError`` saying why."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read root CA {path}: {exc.strerror}") from None
    try:
        cert = (
            x509.load_pem_x509_certificate(data)
            if data.lstrip().startswith(b"-----BEGIN")
            else x509.load_der_x509_certificate(data)
        )
    except ValueError as exc:
        raise ValueError(f"{path} is not a DER or PEM certificate: {exc}") from None
    return cert.public_bytes(serialization.Encoding.DER)


def verifier_from_settings(
    settings: AttestSettings, *, clock: Callable[[], float] = time.time
) -> QuoteVerifier:
    """The :class:`QuoteVerifier` ``[attest]`` describes. A non-Intel root is logged at
    WARNING: from then on this gateway accepts quotes no TDX hardware produced."""
    root: bytes | None = None
    if not settings.uses_intel_root:
        root = load_root_ca(Path(settings.root_ca))
        if root == INTEL_SGX_ROOT_CA_DER:
            root = None
        else:
            fingerprint = hashlib.sha256(root).hexdigest()
            logger.warning(
                "attest: trusting the NON-INTEL root CA %s (sha256 %s): quotes from a "
                "simulated TDX will be accepted; never use this in production",
                settings.root_ca,
                fingerprint,
            )
    return QuoteVerifier(
        root_ca_der=root,
        policy=settings.tcb_policy(),
        fixed_time=settings.verification_time or None,
        clock=clock,
    )
