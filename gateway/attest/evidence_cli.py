"""The evidence half of ``gateway attest``: ``verify --cert/--attestation`` and ``replay``.

Kept apart from ``gateway/attest/cli.py`` (which owns the command, ``verify --quote`` and
``sim-quote``) so each half stays small; that module wires these functions in.

Output is one JSON document on stdout. Exit codes: 0 accepted (``verify``) or the replay
matches the quote (``replay``); 1 invalid, refused or mismatching; 2 usage errors
(unreadable files, bad hex, a bad policy file).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import sys
from pathlib import Path
from typing import Any

from gateway.attest.cli import UsageError
from gateway.attest.eventlog import (
    ReplayError,
    check_boot_rtmrs,
    decode_app_identity,
    explain_rtmr3_mismatch,
    replay_rtmr3,
)
from gateway.attest.policy_settings import TCB_STATUSES, AdmissionPolicy, PolicyError
from gateway.attest.verifier import TrustAnchors, verify_evidence
from gateway.protocol.attestation import (
    AttestedEvent,
    TdxEvent,
    decode_attestation,
    decode_event_log_json,
)
from gateway.protocol.errors import CodecError
from gateway.protocol.tdx_quote import parse_tdx_quote

__all__ = [
    "add_replay_arguments",
    "add_verify_evidence_arguments",
    "run_replay",
    "run_verify_evidence",
]


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror}") from None


def _emit(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")


# --- verify ----------------------------------------------------------------------------------


def add_verify_evidence_arguments(
    parser: argparse.ArgumentParser, sources: argparse._MutuallyExclusiveGroup
) -> None:
    """Options that ``attest verify`` gains; ``sources`` is its group of evidence inputs."""
    sources.add_argument(
        "--cert", metavar="FILE", help="RA-TLS or KMS-signed certificate (PEM/DER)"
    )
    sources.add_argument(
        "--attestation", metavar="FILE", help="dstack attestation (V0 SCALE or V1 msgpack)"
    )
    parser.add_argument(
        "--report-data",
        metavar="HEX",
        help="with --attestation: the 64-byte report_data it must carry (default: its own)",
    )
    parser.add_argument(
        "--policy", metavar="FILE", help="admission policy JSON (default: admit any app)"
    )
    parser.add_argument(
        "--kms-root", metavar="FILE", help="KMS root CA (PEM/DER) for KMS-signed certificates"
    )


def load_policy(path: str | None) -> AdmissionPolicy:
    """The policy file, or (for inspection from a shell) one that admits any app and leaves
    TCB statuses to the quote verifier's ``--allow-status``."""
    if path is None:
        return AdmissionPolicy(allow_any_app=True, allowed_tcb_statuses=TCB_STATUSES)
    try:
        return AdmissionPolicy.from_json(_read(path, "policy"))
    except PolicyError as exc:
        raise UsageError(f"policy {path}: {exc}") from None


def run_verify_evidence(
    args: argparse.Namespace,
    *,
    collateral: Any,
    root_ca_der: bytes | None,
    now: int,
    anchors_extra: dict[str, Any] | None = None,
) -> int:
    """Verify ``--cert`` or ``--attestation`` and print the report. Raises UsageError."""
    from cryptography import x509

    policy = load_policy(args.policy)
    kms_root = None
    if args.kms_root:
        raw = _read(args.kms_root, "KMS root")
        try:
            kms_root = (
                x509.load_pem_x509_certificate(raw)
                if raw.lstrip().startswith(b"-----BEGIN")
                else x509.load_der_x509_certificate(raw)
            )
        except ValueError as exc:
            raise UsageError(f"KMS root {args.kms_root}: {exc}") from None
    anchors = TrustAnchors(
        collateral=collateral, root_ca_der=root_ca_der, kms_root=kms_root, **(anchors_extra or {})
    )
    if args.cert:
        result = verify_evidence(
            anchors=anchors, policy=policy, now=now, cert=_read(args.cert, "certificate")
        )
    else:
        blob = _read(args.attestation, "attestation")
        if args.report_data:
            try:
                rd = bytes.fromhex(args.report_data.removeprefix("0x"))
            except ValueError:
                raise UsageError("--report-data is not hex") from None
            if len(rd) != 64:
                raise UsageError(f"--report-data must be 64 bytes, got {len(rd)}")
        else:
            try:
                rd = decode_attestation(blob).report_data
            except CodecError:
                rd = bytes(64)  # the verifier reports the decode error itself
        result = verify_evidence(
            anchors=anchors, policy=policy, now=now, attestation=blob, expected_report_data=rd
        )
    verdict = result.verdict
    doc: dict[str, Any] = {
        "verdict": "accepted" if verdict.accepted else "rejected",
        "reason": None if verdict.reason is None else verdict.reason.value,
        "detail": verdict.detail,
    }
    if verdict.quote_reason is not None:
        doc["quote_reason"] = verdict.quote_reason
    if result.evidence is not None:
        ev = result.evidence.to_json()
        doc["method"] = ev.pop("method")
        doc["status"] = ev.pop("tcb_status")
        doc.update(ev)
    doc["policy"] = policy.to_json()
    _emit(doc)
    return 0 if verdict.accepted else 1


# --- replay ----------------------------------------------------------------------------------


def add_replay_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--attestation", metavar="FILE", help="dstack attestation (V0/V1)")
    src.add_argument(
        "--event-log",
        metavar="FILE",
        help="TdxEvent JSON array (GetQuote/Info) or runtime_events.log lines",
    )
    parser.add_argument("--expect-rtmr3", metavar="HEX", help="compare the replay with this RTMR3")


def _events_from_log_file(data: bytes) -> tuple[tuple[AttestedEvent, ...], tuple[TdxEvent, ...]]:
    text = data.strip()
    if text.startswith(b"["):
        log = decode_event_log_json(text)
        events = tuple(
            AttestedEvent(e.event, e.event_payload, e.version)
            for e in log
            if e.imr == 3 and e.is_runtime
        )
        return events, log
    events_list = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            name, payload = obj["event"], base64.b64decode(obj.get("payload", ""), validate=True)
            version = obj.get("version", 1)
            if not isinstance(name, str) or version not in (1, 2):
                raise ValueError("event must be a string and version 1 or 2")
            events_list.append(AttestedEvent(name, payload, version))
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise CodecError(f"runtime event log line {number}: {exc}") from None
    return tuple(events_list), ()


def run_replay(args: argparse.Namespace) -> int:
    """Replay an event log; print RTMR3, the identity and, with a quote, the comparison."""
    quoted: tuple[bytes, ...] | None = None
    try:
        if args.attestation:
            att = decode_attestation(_read(args.attestation, "attestation"))
            events, log = att.runtime_events, att.event_log
            report = parse_tdx_quote(att.quote).report
            quoted = (report.rt_mr0, report.rt_mr1, report.rt_mr2, report.rt_mr3)
        else:
            events, log = _events_from_log_file(_read(args.event_log, "event log"))
    except CodecError as exc:
        _emit({"status": "invalid", "error": str(exc)})
        return 1
    expected = quoted[3] if quoted is not None else None
    if args.expect_rtmr3:
        try:
            expected = bytes.fromhex(args.expect_rtmr3.removeprefix("0x"))
        except ValueError:
            raise UsageError("--expect-rtmr3 is not hex") from None
    rtmr3 = replay_rtmr3(events)
    doc: dict[str, Any] = {
        "rtmr3": rtmr3.hex(),
        "identity": decode_app_identity(events).to_json(),
        "events": [
            {"event": e.name, "payload": e.payload.hex(), "digest": e.digest().hex()}
            for e in events
        ],
    }
    ok = True
    if expected is not None:
        doc["expected_rtmr3"] = expected.hex()
        doc["rtmr3_matches"] = rtmr3 == expected
        if rtmr3 != expected:
            ok = False
            doc["mismatch"] = explain_rtmr3_mismatch(events, expected, log).detail
    if quoted is not None and any(e.imr < 3 for e in log):
        try:
            check_boot_rtmrs(log, quoted[:3])
            doc["boot_rtmrs_match"] = True
        except ReplayError as exc:
            doc["boot_rtmrs_match"] = False
            doc["boot_mismatch"] = str(exc)
    doc["status"] = "match" if ok else "mismatch"
    if expected is None:
        doc["status"] = "replayed"
    _emit(doc)
    return 0 if ok else 1
