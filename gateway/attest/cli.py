"""``gateway attest ...``: verify evidence offline, and drive the simulated TDX.

Subcommands are rows of :data:`SUBCOMMANDS` (name, help, argument builder, runner), so a
new one is a function pair plus one row. Shared option groups (:func:`add_trust_options`)
and loaders (:func:`load_quote_file`, :func:`verifier_from_args`,
:func:`collateral_from_args`) are reusable by later subcommands.

Exit codes (``gateway.cli``): 0 evidence accepted / action done; 1 evidence rejected or
could not be checked (collateral unavailable); 2 usage error (bad option, unreadable file).
Reports are JSON on stdout; diagnostics go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dcap_qvl

from gateway.attest.collateral import (
    CollateralError,
    PccsCollateralSource,
    load_collateral_file,
)
from gateway.attest.intel_root import INTEL_SGX_ROOT_CA_DER
from gateway.attest.quote import (
    QuoteVerificationError,
    QuoteVerifier,
    TcbPolicy,
    VerifiedQuote,
    load_root_ca,
)
from gateway.tee.base import RuntimeEvent, replay

EXIT_OK = 0
EXIT_REJECTED = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """Bad arguments or unreadable inputs: exit code 2."""


@dataclass(frozen=True, slots=True)
class Subcommand:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _emit(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _warn(text: str) -> None:
    sys.stderr.write(f"warning: {text}\n")


# --- shared loaders ------------------------------------------------------------------------

_HEX = re.compile(rb"[0-9a-fA-F\s]+")


def load_quote_file(path: Path) -> bytes:
    """A quote from a file: raw bytes, or hex text (as dstack's APIs return it)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read quote file {path}: {exc.strerror}") from None
    stripped = data.strip().removeprefix(b"0x")
    if stripped and _HEX.fullmatch(stripped):
        return bytes.fromhex(stripped.decode())
    return data


def parse_hex(text: str, name: str, size: int | None = None, *, pad_to: int | None = None) -> bytes:
    try:
        value = bytes.fromhex(text.removeprefix("0x"))
    except ValueError:
        raise UsageError(f"{name} is not hex: {text!r}") from None
    if pad_to is not None:
        if len(value) > pad_to:
            raise UsageError(f"{name} is {len(value)} bytes, at most {pad_to}")
        value = value.ljust(pad_to, b"\x00")
    if size is not None and len(value) != size:
        raise UsageError(f"{name} must be {size} bytes ({2 * size} hex digits), got {len(value)}")
    return value


def add_trust_options(parser: argparse.ArgumentParser) -> None:
    """--root-ca, --allow-status, --at, --collateral, --pccs-url, --cache-dir."""
    g = parser.add_argument_group("trust and collateral")
    g.add_argument("--root-ca", type=Path, help="root CA (DER/PEM); default: Intel's SGX root")
    g.add_argument("--allow-status", action="extend", nargs="+", default=[], metavar="STATUS",
                   help="also admit these TCB statuses (repeatable; Revoked never)")  # fmt: skip
    g.add_argument("--at", type=int, metavar="UNIX_TIME", help="verify as of this time")
    g.add_argument("--collateral", type=Path, help="collateral JSON file (offline)")
    g.add_argument("--pccs-url", default="https://api.trustedservices.intel.com",
                   help="PCCS/PCS for collateral when --collateral is absent")  # fmt: skip
    g.add_argument("--cache-dir", type=Path, help="collateral cache directory for --pccs-url")


def verifier_from_args(args: argparse.Namespace) -> QuoteVerifier:
    try:
        policy = TcbPolicy.from_names(args.allow_status)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    root: bytes | None = None
    if args.root_ca is not None:
        try:
            root = load_root_ca(args.root_ca)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if root == INTEL_SGX_ROOT_CA_DER:
            root = None
        else:
            _warn(f"trusting the non-Intel root {args.root_ca} "
                  f"(sha256 {hashlib.sha256(root).hexdigest()})")  # fmt: skip
    if args.at is not None and args.at < 0:
        raise UsageError("--at must be a unix time >= 0")
    return QuoteVerifier(root_ca_der=root, policy=policy, fixed_time=args.at)


def collateral_from_args(args: argparse.Namespace, quote: bytes) -> dcap_qvl.QuoteCollateralV3:
    """The collateral file, or a PCCS fetch (raises CollateralError when unavailable)."""
    if args.collateral is not None:
        if not args.collateral.exists():
            raise UsageError(f"collateral file {args.collateral} does not exist")
        return load_collateral_file(args.collateral)
    cache = args.cache_dir or Path.home() / ".cache" / "gateway-collateral"
    source = PccsCollateralSource(args.pccs_url, cache, timeout=30)
    return asyncio.run(source.get(quote))


def _root_label(verifier: QuoteVerifier) -> str:
    if verifier.uses_intel_root or verifier.root_ca_der is None:
        return "intel"
    return "sha256:" + hashlib.sha256(verifier.root_ca_der).hexdigest()


def verification_report(
    verifier: QuoteVerifier,
    verified: VerifiedQuote | None,
    error: QuoteVerificationError | None,
) -> dict[str, Any]:
    """The JSON report of ``attest verify`` (shape shared by later evidence subcommands)."""
    out: dict[str, Any] = {
        "verdict": "accepted" if error is None else "rejected",
        "root": _root_label(verifier),
        "allowed_statuses": sorted(s.value for s in verifier.policy.allowed),
    }
    if verified is not None:
        summary = verified.summary()
        out["status"] = summary.pop("status")
        out["advisory_ids"] = summary.pop("advisory_ids")
        out["verified_at"] = summary.pop("verified_at")
        out["measurements"] = summary
    if error is not None:
        out["reason"] = error.reason.value
        out["message"] = error.message
    return out


# --- attest verify -------------------------------------------------------------------------


def _verify_arguments(p: argparse.ArgumentParser) -> None:
    from gateway.attest.evidence_cli import add_verify_evidence_arguments

    sources = p.add_mutually_exclusive_group(required=True)
    sources.add_argument("--quote", type=Path, help="TDX quote (raw or hex)")
    add_verify_evidence_arguments(p, sources)
    add_trust_options(p)


def _run_verify_evidence(args: argparse.Namespace) -> int:
    """``verify --cert/--attestation``: the whole evidence path plus the admission policy."""
    from gateway.attest.evidence_cli import run_verify_evidence

    verifier = verifier_from_args(args)

    def collateral(quote: bytes) -> dcap_qvl.QuoteCollateralV3:
        return collateral_from_args(args, quote)

    return run_verify_evidence(
        args,
        collateral=collateral,
        root_ca_der=verifier.root_ca_der,
        now=verifier.now(),
        anchors_extra={"tcb_policy": verifier.policy},
    )


def _run_verify(args: argparse.Namespace) -> int:
    if args.quote is None:
        return _run_verify_evidence(args)
    quote = load_quote_file(args.quote)
    verifier = verifier_from_args(args)
    try:
        collateral = collateral_from_args(args, quote)
    except CollateralError as exc:
        _emit({"verdict": "unchecked", "reason": "collateral_unavailable", "message": str(exc)})
        return EXIT_REJECTED
    verified: VerifiedQuote | None = None
    error: QuoteVerificationError | None = None
    try:
        verified = verifier.verify(quote, collateral)
    except QuoteVerificationError as exc:
        error = exc
    _emit(verification_report(verifier, verified, error))
    return EXIT_OK if error is None else EXIT_REJECTED


# --- attest sim-pki / sim-quote ------------------------------------------------------------


def _sim_pki_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", type=Path, required=True, help="PKI directory (created if empty)")


def _run_sim_pki(args: argparse.Namespace) -> int:
    from gateway.tee.sim_pki import SimPki

    existed = (args.dir / "platform.json").exists()
    pki = SimPki.load_or_create(args.dir)
    _emit(
        {
            "dir": str(args.dir),
            "created": not existed,
            "root_ca": str(args.dir / "root.der"),
            "root_sha256": hashlib.sha256(pki.root_ca_der).hexdigest(),
            "fmspc": pki.platform.fmspc.hex().upper(),
            "ppid": pki.platform.ppid.hex(),
            "not_before": pki.not_before,
            "hint": f'[attest] root_ca = "{args.dir / "root.der"}" makes a gateway accept '
            "this PKI's quotes (test setups only)",
        }
    )
    return EXIT_OK


def _event_arg(text: str) -> RuntimeEvent:
    name, sep, payload = text.partition(":")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME:HEX_PAYLOAD, got {text!r}")
    try:
        return RuntimeEvent(name, bytes.fromhex(payload))
    except ValueError:
        raise argparse.ArgumentTypeError(f"payload of {name!r} is not hex") from None


def _sim_quote_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pki-dir", type=Path, required=True, help="simulated PKI directory")
    p.add_argument("--report-data", required=True, help="hex, at most 64 bytes (zero-padded)")
    p.add_argument("--out", type=Path, required=True, help="where to write the raw quote")
    p.add_argument("--collateral-out", type=Path, help="also write matching collateral JSON")
    p.add_argument("--image", default="dstack-sim", help="simulated image (fixes MRTD, RTMR0-2)")
    for reg in ("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3"):
        p.add_argument(f"--{reg}", help=f"{reg.upper()} as hex (48 bytes); overrides the image")
    p.add_argument("--event", action="append", default=[], type=_event_arg, metavar="NAME:HEX",
                   help="runtime event replayed into RTMR3 (repeatable; no --rtmr3)")  # fmt: skip
    p.add_argument("--debug-td", action="store_true", help="set TD_ATTRIBUTES.DEBUG")
    p.add_argument("--at", type=int, metavar="UNIX_TIME", help="collateral issue time")


def _run_sim_quote(args: argparse.Namespace) -> int:
    from gateway.tee.sim import SimImage
    from gateway.tee.sim_pki import DEFAULT_TD_ATTRIBUTES, TD_ATTRIBUTES_DEBUG, SimPki

    if not (args.pki_dir / "platform.json").exists():
        raise UsageError(f"no simulated PKI in {args.pki_dir}; run `attest sim-pki --dir` first")
    if args.rtmr3 and args.event:
        raise UsageError("give either --rtmr3 or --event, not both")
    report_data = parse_hex(args.report_data, "--report-data", pad_to=64)
    image = SimImage.named(args.image)
    regs = {
        "mrtd": image.mr_td,
        "rtmr0": image.rt_mr0,
        "rtmr1": image.rt_mr1,
        "rtmr2": image.rt_mr2,
        "rtmr3": replay(args.event),
    }
    for reg in regs:
        value = getattr(args, reg)
        if value is not None:
            regs[reg] = parse_hex(value, f"--{reg}", 48)
    pki = SimPki.load(args.pki_dir)
    quote = pki.forge_quote(
        report_data,
        mr_td=regs["mrtd"],
        rtmrs=[regs["rtmr0"], regs["rtmr1"], regs["rtmr2"], regs["rtmr3"]],
        td_attributes=TD_ATTRIBUTES_DEBUG if args.debug_td else DEFAULT_TD_ATTRIBUTES,
    )
    try:
        args.out.write_bytes(quote)
        if args.collateral_out is not None:
            at = args.at if args.at is not None else int(time.time())
            args.collateral_out.write_text(pki.collateral(at).to_json())
    except OSError as exc:
        raise UsageError(f"cannot write output: {exc}") from None
    _emit(
        {
            "quote": str(args.out),
            "size": len(quote),
            "report_data": report_data.hex(),
            **{reg: value.hex() for reg, value in regs.items()},
            "collateral": str(args.collateral_out) if args.collateral_out else None,
        }
    )
    return EXIT_OK


# --- attest replay (gateway.attest.evidence_cli) ---------------------------------------------


def _replay_arguments(p: argparse.ArgumentParser) -> None:
    from gateway.attest.evidence_cli import add_replay_arguments

    add_replay_arguments(p)


def _run_replay(args: argparse.Namespace) -> int:
    from gateway.attest.evidence_cli import run_replay

    return run_replay(args)


SUBCOMMANDS: list[Subcommand] = [
    Subcommand(
        "verify",
        "verify a TDX quote, RA-TLS certificate or dstack attestation "
        "(JSON report; exit 0 only if accepted)",
        _verify_arguments,
        _run_verify,
    ),  # fmt: skip
    Subcommand(
        "replay",
        "replay an event log to RTMR3 and show the app identity",
        _replay_arguments,
        _run_replay,
    ),  # fmt: skip
    Subcommand(
        "sim-pki", "create or show a simulated TDX PKI directory", _sim_pki_arguments, _run_sim_pki
    ),  # fmt: skip
    Subcommand(
        "sim-quote",
        "forge a quote from a simulated PKI (tests, labs)",
        _sim_quote_arguments,
        _run_sim_quote,
    ),  # fmt: skip
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="attest_command", metavar="SUBCOMMAND", required=True)
    for command in SUBCOMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(p)
        p.set_defaults(_attest_run=command.run)


def run(args: argparse.Namespace) -> int:
    try:
        result: int = args._attest_run(args)
    except UsageError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_USAGE
    except CollateralError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_REJECTED
    return result
