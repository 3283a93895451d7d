"""Quote verification and simulated-quote costs, plus the tamper matrix (not a test).

    .venv/bin/python benchmarks/attest_bench.py            # costs (a few seconds)
    .venv/bin/python benchmarks/attest_bench.py --matrix   # tamper matrix as a Markdown table

Figures are per call, in milliseconds: median / min / max over ``--n`` runs. Throughput is
sequential verifications per second in one process, then with 2 threads (dcap-qvl holds
the GIL, so expect no gain) and with a 2-process pool (collateral passed as JSON).
Results are recorded in docs/attestation.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import dcap_qvl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.attest.quote import (  # noqa: E402
    QuoteVerificationError,
    RejectReason,
    TcbPolicy,
    verify_quote,
)
from gateway.protocol.tdx_quote import QUOTE_OFFSETS, parse_tdx_quote  # noqa: E402
from gateway.tee.sim_pki import TD_ATTRIBUTES_DEBUG, SimPki  # noqa: E402

SAMPLE = ROOT / "tests" / "data" / "tdx-sample"


def timed(fn: Callable[[], object], n: int) -> tuple[float, float, float]:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples), min(samples), max(samples)


def throughput(fn: Callable[[], object], seconds: float) -> float:
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        count += 1
    return count / (time.perf_counter() - t0)


# Process-pool worker state (set once per worker by the initializer).
_WORKER: list[tuple[bytes, dcap_qvl.QuoteCollateralV3, bytes, int]] = []


def _init_worker(quote: bytes, col_json: str, root: bytes, now: int) -> None:
    _WORKER.append((quote, dcap_qvl.QuoteCollateralV3.from_json(col_json), root, now))


def _verify_batch(n: int) -> int:
    quote, col, root, now = _WORKER[0]
    for _ in range(n):
        verify_quote(quote, col, root_ca_der=root, now=now)
    return n


def costs(n: int, seconds: float) -> None:
    now = int(time.time())
    rows: list[tuple[str, tuple[float, float, float]]] = []
    rows.append(("SimPki.create() (4 keys, 4 certs)", timed(SimPki.create, max(n // 10, 10))))
    pki = SimPki.create(not_before=now - 86400)
    rows.append(("pki.collateral() (2 CRLs, 2 signed JSON)", timed(lambda: pki.collateral(now), n)))
    rd = hashlib.sha512(b"bench").digest()
    pki.forge_quote(rd)  # create the QE's attestation key once
    rows.append(
        ("forge_quote() (QE key cached: 1 signature)", timed(lambda: pki.forge_quote(rd), n))
    )
    rows.append(
        (
            "forge_quote(fresh_attestation_key=True)",
            timed(lambda: pki.forge_quote(rd, fresh_attestation_key=True), n),
        )
    )
    quote = pki.forge_quote(rd)
    col = pki.collateral(now)
    root = pki.root_ca_der
    rows.append(("parse_tdx_quote() (our codec)", timed(lambda: parse_tdx_quote(quote), n)))
    rows.append(
        (
            "dcap_qvl.verify_with_root_ca() (sim quote)",
            timed(lambda: dcap_qvl.verify_with_root_ca(quote, col, root, now), n),
        )
    )
    rows.append(
        (
            "verify_quote() (sim quote, full path)",
            timed(lambda: verify_quote(quote, col, root_ca_der=root, now=now), n),
        )
    )
    sample = (SAMPLE / "tdx_quote").read_bytes()
    sample_col = dcap_qvl.QuoteCollateralV3.from_json(
        (SAMPLE / "tdx_quote_collateral.json").read_text()
    )
    rows.append(
        (
            "verify_quote() (real Intel sample)",
            timed(lambda: verify_quote(sample, sample_col, now=1751500000), n),
        )
    )
    col_json = col.to_json()
    rows.append(
        (
            "verify_quote() with collateral JSON (from_json each time)",
            timed(lambda: verify_quote(quote, col_json, root_ca_der=root, now=now), n),
        )
    )

    print(
        f"machine: {platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()},"
        f" dcap-qvl {dcap_qvl.__version__}, n={n}"
    )
    print()
    print("| operation | median ms | min ms | max ms |")
    print("|---|---|---|---|")
    for name, (med, lo, hi) in rows:
        print(f"| {name} | {med:.3f} | {lo:.3f} | {hi:.3f} |")

    def one() -> None:
        verify_quote(quote, col, root_ca_der=root, now=now)

    seq = throughput(one, seconds)
    with ThreadPoolExecutor(2) as pool:
        t0 = time.perf_counter()
        done = 0
        while time.perf_counter() - t0 < seconds:
            list(pool.map(lambda _: one(), range(50)))
            done += 50
        threaded = done / (time.perf_counter() - t0)
    with ProcessPoolExecutor(
        2, initializer=_init_worker, initargs=(quote, col_json, root, now)
    ) as procs:
        list(procs.map(_verify_batch, [1, 1]))  # warm up both workers
        t0 = time.perf_counter()
        done = 0
        while time.perf_counter() - t0 < seconds:
            done += sum(procs.map(_verify_batch, [100, 100]))
        pooled = done / (time.perf_counter() - t0)
    print()
    print("| verifications per second | value |")
    print("|---|---|")
    print(f"| one process, sequential | {seq:.0f} |")
    print(f"| one process, 2 threads | {threaded:.0f} |")
    print(f"| 2-process pool | {pooled:.0f} |")


def matrix() -> None:
    """Every tamper case against one sim PKI; prints expected vs. observed reasons."""
    now = int(time.time())
    pki = SimPki.create(not_before=now - 86400)
    good = pki.forge_quote(hashlib.sha512(b"key").digest())

    def flip(field: str, pos: int = 0) -> bytes:
        b = bytearray(good)
        b[QUOTE_OFFSETS[field][0] + pos] ^= 1
        return bytes(b)

    def swap_key() -> bytes:
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        key = ec.generate_private_key(ec.SECP256R1())
        r, s = decode_dss_signature(key.sign(good[:632], ec.ECDSA(hashes.SHA256())))
        pub = key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )[1:]
        return good[:636] + r.to_bytes(32, "big") + s.to_bytes(32, "big") + pub + good[764:]

    other = SimPki.create(not_before=now - 86400)
    col = pki.collateral(now)
    win = (now - 7200, now - 1)
    long_crl = (now - 7200, now + 86400)
    cases: list[tuple[str, bytes, object, bytes | None, TcbPolicy | None, RejectReason | None]] = [
        ("genuine sim quote", good, col, pki.root_ca_der, None, None),
        (
            "report_data byte 63 flipped",
            flip("report_data", 63),
            col,
            pki.root_ca_der,
            None,
            RejectReason.BAD_SIGNATURE,
        ),
        ("RTMR0 flipped", flip("rt_mr0"), col, pki.root_ca_der, None, RejectReason.BAD_SIGNATURE),
        ("RTMR1 flipped", flip("rt_mr1"), col, pki.root_ca_der, None, RejectReason.BAD_SIGNATURE),
        ("RTMR2 flipped", flip("rt_mr2"), col, pki.root_ca_der, None, RejectReason.BAD_SIGNATURE),
        (
            "RTMR3 flipped",
            flip("rt_mr3", 17),
            col,
            pki.root_ca_der,
            None,
            RejectReason.BAD_SIGNATURE,
        ),
        ("MRTD flipped", flip("mr_td", 47), col, pki.root_ca_der, None, RejectReason.BAD_SIGNATURE),
        (
            "quote signature flipped",
            flip("quote_signature", 3),
            col,
            pki.root_ca_der,
            None,
            RejectReason.BAD_SIGNATURE,
        ),
        (
            "QE report flipped",
            flip("qe_report", 64),
            col,
            pki.root_ca_der,
            None,
            RejectReason.BAD_QE_REPORT,
        ),
        (
            "QE report signature flipped",
            flip("qe_report_signature"),
            col,
            pki.root_ca_der,
            None,
            RejectReason.BAD_QE_REPORT,
        ),
        (
            "attestation key swapped, quote re-signed",
            swap_key(),
            col,
            pki.root_ca_der,
            None,
            RejectReason.ATTESTATION_KEY_MISMATCH,
        ),
        (
            "outer cert data type changed (re-framed)",
            flip("cert_data_type"),
            col,
            pki.root_ca_der,
            None,
            RejectReason.MALFORMED,
        ),
        ("verified under Intel's root", good, col, None, None, RejectReason.WRONG_ROOT),
        (
            "verified under another test root",
            good,
            col,
            other.root_ca_der,
            None,
            RejectReason.WRONG_ROOT,
        ),
        (
            "another PKI's quote, this PKI's root",
            other.forge_quote(bytes(64)),
            col,
            pki.root_ca_der,
            None,
            RejectReason.UNTRUSTED_CHAIN,
        ),
        (
            "CRL nextUpdate passed",
            good,
            pki.collateral(now, crl_window=win),
            pki.root_ca_der,
            None,
            RejectReason.CRL_EXPIRED,
        ),
        (
            "PCK certificate on the PCK CRL",
            good,
            pki.collateral(now, revoke_pck=True),
            pki.root_ca_der,
            None,
            RejectReason.REVOKED,
        ),
        (
            "TCB level Revoked",
            good,
            pki.collateral(now, tcb_status="Revoked"),
            pki.root_ca_der,
            None,
            RejectReason.REVOKED,
        ),
        (
            "debug TD",
            pki.forge_quote(bytes(64), td_attributes=TD_ATTRIBUTES_DEBUG),
            col,
            pki.root_ca_der,
            None,
            RejectReason.DEBUG_TD,
        ),
        (
            "TD without SEPT_VE_DISABLE",
            pki.forge_quote(bytes(64), td_attributes=bytes(8)),
            col,
            pki.root_ca_der,
            None,
            RejectReason.BAD_TD_ATTRIBUTES,
        ),
        (
            "TCB OutOfDate, default policy",
            good,
            pki.collateral(now, tcb_status="OutOfDate"),
            pki.root_ca_der,
            None,
            RejectReason.TCB_STATUS_NOT_ALLOWED,
        ),
        (
            "TCB OutOfDate, OutOfDate allowed",
            good,
            pki.collateral(now, tcb_status="OutOfDate"),
            pki.root_ca_der,
            TcbPolicy.from_names(["OutOfDate"]),
            None,
        ),
        (
            "QE TCB OutOfDate, default policy",
            good,
            pki.collateral(now, qe_tcb_status="OutOfDate"),
            pki.root_ca_der,
            None,
            RejectReason.TCB_STATUS_NOT_ALLOWED,
        ),
        (
            "TCB info nextUpdate passed (CRLs valid)",
            good,
            pki.collateral(now, crl_window=long_crl, tcb_info_window=win),
            pki.root_ca_der,
            None,
            RejectReason.TCB_EXPIRED,
        ),
        (
            "QE identity nextUpdate passed",
            good,
            pki.collateral(now, qe_identity_window=win),
            pki.root_ca_der,
            None,
            RejectReason.TCB_EXPIRED,
        ),
        (
            "TCB info edited after signing",
            good,
            col.to_json().replace('tcbEvaluationDataNumber\\":17', 'tcbEvaluationDataNumber\\":18'),
            pki.root_ca_der,
            None,
            RejectReason.BAD_COLLATERAL,
        ),
        (
            "rogue QE (MRSIGNER not in QE identity)",
            pki.with_platform(qe_mrsigner=b"\x01" * 32).forge_quote(bytes(64)),
            col,
            pki.root_ca_der,
            None,
            RejectReason.QE_IDENTITY_MISMATCH,
        ),
        (
            "collateral for another FMSPC",
            good,
            pki.with_platform(fmspc=b"\x01" * 6).collateral(now),
            pki.root_ca_der,
            None,
            RejectReason.COLLATERAL_MISMATCH,
        ),
        (
            "platform CPUSVN below every TCB level",
            good,
            pki.with_platform(cpusvn=b"\xff" * 16).collateral(now),
            pki.root_ca_der,
            None,
            RejectReason.TCB_LEVEL_NOT_FOUND,
        ),
        (
            "verified before the PKI's notBefore",
            good,
            pki.collateral(pki.not_before - 10),
            pki.root_ca_der,
            None,
            RejectReason.CERT_EXPIRED,
        ),
        ("garbage bytes", b"garbage", col, pki.root_ca_der, None, RejectReason.MALFORMED),
    ]
    print("| case | expected | observed | dcap-qvl / our message |")
    print("|---|---|---|---|")
    failures = 0
    for name, quote, collateral, root, policy, expected in cases:
        at = pki.not_before - 10 if "notBefore" in name else now
        try:
            v = verify_quote(quote, collateral, root_ca_der=root, now=at, policy=policy)
            observed, message = "accepted", f"status {v.status.value}"
        except QuoteVerificationError as exc:
            observed, message = exc.reason.value, exc.message
        want = "accepted" if expected is None else expected.value
        failures += observed != want
        print(f"| {name} | {want} | {observed} | {message[:90].replace('|', '/')} |")
    if failures:
        print(f"\n{failures} case(s) differ from expectation", file=sys.stderr)
        sys.exit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="samples per cost figure")
    parser.add_argument("--seconds", type=float, default=2.0, help="per throughput figure")
    parser.add_argument("--matrix", action="store_true", help="print the tamper matrix")
    args = parser.parse_args()
    if args.matrix:
        matrix()
    else:
        costs(args.n, args.seconds)


if __name__ == "__main__":
    main()
