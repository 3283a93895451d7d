from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import dcap_qvl
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.attest.intel_root import INTEL_SGX_ROOT_CA_DER, INTEL_SGX_ROOT_CA_SHA256
from gateway.attest.quote import (
    QuoteVerificationError,
    QuoteVerifier,
    RejectReason,
    TcbPolicy,
    TcbStatus,
    classify_dcap_error,
    load_root_ca,
    verifier_from_settings,
    verify_quote,
    verify_quote_async,
)
from gateway.attest.settings import AttestSettings
from gateway.protocol.tdx_quote import QUOTE_OFFSETS, parse_tdx_quote
from gateway.tee.sim_pki import TD_ATTRIBUTES_DEBUG, SimPki

DATA = Path(__file__).parents[1] / "data" / "tdx-sample"
SAMPLE_QUOTE = (DATA / "tdx_quote").read_bytes()
SAMPLE_COLLATERAL = (DATA / "tdx_quote_collateral.json").read_text()
SAMPLE_TIME = 1751500000
# nextUpdate of the sample's PCK CRL (the earliest expiry in its collateral).
SAMPLE_PCK_CRL_NEXT_UPDATE = 1752919235


# --- the real Intel-signed sample ----------------------------------------------------------


def test_intel_root_constant_is_intels_root() -> None:
    assert hashlib.sha256(INTEL_SGX_ROOT_CA_DER).hexdigest() == INTEL_SGX_ROOT_CA_SHA256
    chain = parse_tdx_quote(SAMPLE_QUOTE).signature_data.qe.pck_chain_pem  # type: ignore[union-attr]
    assert chain is not None
    root = x509.load_pem_x509_certificates(chain)[-1]
    assert root.public_bytes(serialization.Encoding.DER) == INTEL_SGX_ROOT_CA_DER


def test_sample_verifies_up_to_date_under_intel_root() -> None:
    v = verify_quote(SAMPLE_QUOTE, SAMPLE_COLLATERAL, now=SAMPLE_TIME)
    assert v.status is TcbStatus.UP_TO_DATE
    assert v.advisory_ids == ()
    assert not v.is_debug
    assert v.verified_at == SAMPLE_TIME
    assert len(v.ppid) == 16
    parsed = parse_tdx_quote(SAMPLE_QUOTE).report
    for name in ("mr_td", "rt_mr0", "rt_mr1", "rt_mr2", "rt_mr3", "report_data",
                 "td_attributes", "xfam", "mr_config_id", "mr_owner", "mr_owner_config",
                 "mr_seam", "tee_tcb_svn"):  # fmt: skip
        assert getattr(v, name) == getattr(parsed, name), name
    assert json.loads(v.raw_json)["status"] == "UpToDate"
    assert v.summary()["mr_td"] == parsed.mr_td.hex()


def test_sample_collateral_object_and_json_agree() -> None:
    col = dcap_qvl.QuoteCollateralV3.from_json(SAMPLE_COLLATERAL)
    a = verify_quote(SAMPLE_QUOTE, col, now=SAMPLE_TIME)
    b = verify_quote(SAMPLE_QUOTE, SAMPLE_COLLATERAL.encode(), now=SAMPLE_TIME, root_ca_der=None)
    assert a == b


def test_sample_crl_next_update_is_what_the_test_assumes() -> None:
    doc = json.loads(SAMPLE_COLLATERAL)
    crl = x509.load_der_x509_crl(bytes.fromhex(doc["pck_crl"]))
    assert crl.next_update_utc is not None
    assert int(crl.next_update_utc.timestamp()) == SAMPLE_PCK_CRL_NEXT_UPDATE


def test_sample_rejected_after_crl_next_update() -> None:
    verify_quote(SAMPLE_QUOTE, SAMPLE_COLLATERAL, now=SAMPLE_PCK_CRL_NEXT_UPDATE - 1)
    with pytest.raises(QuoteVerificationError) as err:
        verify_quote(SAMPLE_QUOTE, SAMPLE_COLLATERAL, now=SAMPLE_PCK_CRL_NEXT_UPDATE + 1)
    assert err.value.reason is RejectReason.CRL_EXPIRED
    assert "CrlExpired" in err.value.message and "\n" not in err.value.message


def test_sample_rejected_before_its_collateral_was_issued() -> None:
    with pytest.raises(QuoteVerificationError) as err:
        verify_quote(SAMPLE_QUOTE, SAMPLE_COLLATERAL, now=1700000000)
    assert err.value.reason is RejectReason.COLLATERAL_NOT_YET_VALID


def test_sample_rejected_under_a_test_root(sim_pki: SimPki) -> None:
    with pytest.raises(QuoteVerificationError) as err:
        verify_quote(SAMPLE_QUOTE, SAMPLE_COLLATERAL, now=SAMPLE_TIME,
                     root_ca_der=sim_pki.root_ca_der)  # fmt: skip
    assert err.value.reason is RejectReason.WRONG_ROOT


# --- the simulated TDX: accept, then the tamper matrix -------------------------------------


def _verify(pki: SimPki, now: int, quote: bytes, **kw: object) -> RejectReason | None:
    col = kw.pop("collateral", None) or pki.collateral(now)
    root = kw.pop("root", pki.root_ca_der)
    try:
        verify_quote(quote, col, root_ca_der=root, now=now, **kw)  # type: ignore[arg-type]
    except QuoteVerificationError as exc:
        return exc.reason
    return None


def _flip(quote: bytes, offset: int, mask: int = 0x01) -> bytes:
    b = bytearray(quote)
    b[offset] ^= mask
    return bytes(b)


@pytest.fixture(scope="module")
def good_quote(sim_pki: SimPki) -> bytes:
    return sim_pki.forge_quote(
        hashlib.sha512(b"key").digest(),
        mr_td=b"\x11" * 48,
        rtmrs=[b"\x20" * 48, b"\x21" * 48, b"\x22" * 48, b"\x23" * 48],
    )


def test_sim_quote_verifies_with_its_measurements(
    sim_pki: SimPki, sim_now: int, good_quote: bytes
) -> None:
    v = verify_quote(good_quote, sim_pki.collateral(sim_now), root_ca_der=sim_pki.root_ca_der,
                     now=sim_now)  # fmt: skip
    assert v.status is TcbStatus.UP_TO_DATE
    assert v.report_data == hashlib.sha512(b"key").digest()
    assert v.mr_td == b"\x11" * 48
    assert v.rtmrs == (b"\x20" * 48, b"\x21" * 48, b"\x22" * 48, b"\x23" * 48)
    assert v.ppid == sim_pki.platform.ppid


def test_sim_quote_with_fresh_attestation_key_verifies(sim_pki: SimPki, sim_now: int) -> None:
    q = sim_pki.forge_quote(bytes(64), fresh_attestation_key=True)
    assert _verify(sim_pki, sim_now, q) is None


@pytest.mark.parametrize(
    ("field", "positions"),
    [
        ("report_data", [0, 1, 31, 32, 63]),
        ("rt_mr0", [0, 47]),
        ("rt_mr1", [0, 47]),
        ("rt_mr2", [0, 47]),
        ("rt_mr3", [0, 17, 47]),
        ("mr_td", [0, 47]),
        ("mr_config_id", [0]),
        ("td_attributes", [3]),
        ("xfam", [0]),
        ("mr_seam", [5]),
        ("quote_signature", [0, 63]),
    ],
)
def test_sim_tampered_td_report_or_signature_rejected(
    sim_pki: SimPki, sim_now: int, good_quote: bytes, field: str, positions: list[int]
) -> None:
    offset, _ = QUOTE_OFFSETS[field]
    for pos in positions:
        assert _verify(sim_pki, sim_now, _flip(good_quote, offset + pos)) is (
            RejectReason.BAD_SIGNATURE
        ), (field, pos)


@pytest.mark.parametrize("pos", [0, 64, 128, 320, 383])
def test_sim_tampered_qe_report_rejected(
    sim_pki: SimPki, sim_now: int, good_quote: bytes, pos: int
) -> None:
    offset, _ = QUOTE_OFFSETS["qe_report"]
    assert _verify(sim_pki, sim_now, _flip(good_quote, offset + pos)) is RejectReason.BAD_QE_REPORT


def test_sim_tampered_qe_report_signature_rejected(
    sim_pki: SimPki, sim_now: int, good_quote: bytes
) -> None:
    offset, _ = QUOTE_OFFSETS["qe_report_signature"]
    assert _verify(sim_pki, sim_now, _flip(good_quote, offset + 5)) is RejectReason.BAD_QE_REPORT


def test_sim_attestation_key_swap_rejected(
    sim_pki: SimPki, sim_now: int, good_quote: bytes
) -> None:
    """A new attestation key re-signing the TD report: the QE report does not bind it."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    key = ec.generate_private_key(ec.SECP256R1())
    signed = good_quote[:632]
    r, s = decode_dss_signature(key.sign(signed, ec.ECDSA(hashes.SHA256())))
    pub = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )[1:]
    swapped = (
        good_quote[:636] + r.to_bytes(32, "big") + s.to_bytes(32, "big") + pub + (good_quote[764:])
    )
    assert _verify(sim_pki, sim_now, swapped) is RejectReason.ATTESTATION_KEY_MISMATCH


def test_sim_quote_rejected_under_intel_root(
    sim_pki: SimPki, sim_now: int, good_quote: bytes
) -> None:
    assert _verify(sim_pki, sim_now, good_quote, root=None) is RejectReason.WRONG_ROOT


def test_sim_quote_rejected_under_another_test_root(
    sim_pki: SimPki, sim_now: int, good_quote: bytes
) -> None:
    other = SimPki.create(not_before=sim_now - 86400)
    assert _verify(sim_pki, sim_now, good_quote, root=other.root_ca_der) is RejectReason.WRONG_ROOT
    # Another PKI's quote with our collateral and root: its chain does not reach our root.
    theirs = other.forge_quote(bytes(64))
    assert _verify(sim_pki, sim_now, theirs) is RejectReason.UNTRUSTED_CHAIN


def test_sim_expired_crl_rejected(sim_pki: SimPki, sim_now: int, good_quote: bytes) -> None:
    col = sim_pki.collateral(sim_now, crl_window=(sim_now - 7200, sim_now - 1))
    assert _verify(sim_pki, sim_now, good_quote, collateral=col) is RejectReason.CRL_EXPIRED
    col = sim_pki.collateral(sim_now, crl_window=(sim_now - 7200, sim_now + 1))
    assert _verify(sim_pki, sim_now, good_quote, collateral=col) is None


def test_sim_revoked_pck_rejected(sim_pki: SimPki, sim_now: int, good_quote: bytes) -> None:
    col = sim_pki.collateral(sim_now, revoke_pck=True)
    assert _verify(sim_pki, sim_now, good_quote, collateral=col) is RejectReason.REVOKED


def test_sim_revoked_tcb_level_rejected_even_if_allowed_by_name(
    sim_pki: SimPki, sim_now: int, good_quote: bytes
) -> None:
    col = sim_pki.collateral(sim_now, tcb_status="Revoked")
    assert _verify(sim_pki, sim_now, good_quote, collateral=col) is RejectReason.REVOKED
    with pytest.raises(ValueError, match="never"):
        TcbPolicy.from_names(["Revoked"])


def test_sim_debug_td_rejected(sim_pki: SimPki, sim_now: int) -> None:
    q = sim_pki.forge_quote(bytes(64), td_attributes=TD_ATTRIBUTES_DEBUG)
    assert _verify(sim_pki, sim_now, q) is RejectReason.DEBUG_TD


def test_sim_td_without_sept_ve_disable_rejected(sim_pki: SimPki, sim_now: int) -> None:
    q = sim_pki.forge_quote(bytes(64), td_attributes=bytes(8))
    assert _verify(sim_pki, sim_now, q) is RejectReason.BAD_TD_ATTRIBUTES


def test_sim_out_of_date_tcb_rejected_by_default_accepted_when_allowed(
    sim_pki: SimPki, sim_now: int, good_quote: bytes
) -> None:
    col = sim_pki.collateral(sim_now, tcb_status="OutOfDate", advisory_ids=["INTEL-SA-TEST"])
    with pytest.raises(QuoteVerificationError) as err:
        verify_quote(good_quote, col, root_ca_der=sim_pki.root_ca_der, now=sim_now)
    assert err.value.reason is RejectReason.TCB_STATUS_NOT_ALLOWED
    assert "OutOfDate" in err.value.message and "INTEL-SA-TEST" in err.value.message
    v = verify_quote(good_quote, col, root_ca_der=sim_pki.root_ca_der, now=sim_now,
                     policy=TcbPolicy.from_names(["OutOfDate"]))  # fmt: skip
    assert v.status is TcbStatus.OUT_OF_DATE
    assert v.advisory_ids == ("INTEL-SA-TEST",)
    # Allowing something else does not admit OutOfDate.
    assert (
        _verify(
            sim_pki,
            sim_now,
            good_quote,
            collateral=col,
            policy=TcbPolicy.from_names(["SWHardeningNeeded"]),
        )  # fmt: skip
        is RejectReason.TCB_STATUS_NOT_ALLOWED
    )


def test_sim_tcb_info_expiry_rejected(sim_pki: SimPki, sim_now: int, good_quote: bytes) -> None:
    # CRLs outlive the TCB info, so the JSON's own expiry is what fails (tdx-quotes.md 6.2).
    col = sim_pki.collateral(
        sim_now,
        crl_window=(sim_now - 7200, sim_now + 86400),
        tcb_info_window=(sim_now - 7200, sim_now - 1),
    )
    assert _verify(sim_pki, sim_now, good_quote, collateral=col) is RejectReason.TCB_EXPIRED
    col = sim_pki.collateral(sim_now, qe_identity_window=(sim_now - 7200, sim_now - 1))
    assert _verify(sim_pki, sim_now, good_quote, collateral=col) is RejectReason.TCB_EXPIRED


def test_sim_edited_tcb_info_rejected(sim_pki: SimPki, sim_now: int, good_quote: bytes) -> None:
    doc = json.loads(sim_pki.collateral(sim_now).to_json())
    doc["tcb_info"] = doc["tcb_info"].replace('"tcbEvaluationDataNumber":17', 
                                              '"tcbEvaluationDataNumber":18')  # fmt: skip
    assert (
        _verify(sim_pki, sim_now, good_quote, collateral=json.dumps(doc))
        is RejectReason.BAD_COLLATERAL
    )


def test_sim_verification_before_pki_exists_rejected(
    sim_pki: SimPki, sim_now: int, good_quote: bytes
) -> None:
    early = sim_pki.not_before - 10
    col = sim_pki.collateral(early)
    assert _verify(sim_pki, early, good_quote, collateral=col) is RejectReason.CERT_EXPIRED


def test_sim_reframed_quote_is_malformed(sim_pki: SimPki, sim_now: int, good_quote: bytes) -> None:
    """dcap-qvl ignores the outer certification data type; our framing check does not."""
    offset, _ = QUOTE_OFFSETS["cert_data_type"]
    assert _verify(sim_pki, sim_now, _flip(good_quote, offset)) is RejectReason.MALFORMED


def test_sim_qe_not_matching_qe_identity_rejected(sim_pki: SimPki, sim_now: int) -> None:
    rogue_qe = sim_pki.with_platform(qe_mrsigner=b"\x01" * 32).forge_quote(bytes(64))
    assert _verify(sim_pki, sim_now, rogue_qe) is RejectReason.QE_IDENTITY_MISMATCH


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"fmspc": b"\x01" * 6}, RejectReason.COLLATERAL_MISMATCH),
        ({"cpusvn": b"\xff" * 16}, RejectReason.TCB_LEVEL_NOT_FOUND),
        ({"tee_tcb_svn": bytes.fromhex("09010300" + "00" * 12)}, RejectReason.TCB_LEVEL_NOT_FOUND),
        ({"tee_tcb_svn": bytes.fromhex("07020300" + "00" * 12)}, RejectReason.TCB_LEVEL_NOT_FOUND),
        ({"qe_isvsvn": 9}, RejectReason.TCB_LEVEL_NOT_FOUND),
    ],
)
def test_sim_collateral_for_another_platform_rejected(
    sim_pki: SimPki,
    sim_now: int,
    good_quote: bytes,
    change: dict[str, object],
    reason: RejectReason,
) -> None:
    """Collateral signed by the right key, but describing a platform this quote is not."""
    col = sim_pki.with_platform(**change).collateral(sim_now)
    assert _verify(sim_pki, sim_now, good_quote, collateral=col) is reason


def test_sim_out_of_date_qe_rejected_by_default(
    sim_pki: SimPki, sim_now: int, good_quote: bytes
) -> None:
    col = sim_pki.collateral(sim_now, qe_tcb_status="OutOfDate")
    assert (
        _verify(sim_pki, sim_now, good_quote, collateral=col) is RejectReason.TCB_STATUS_NOT_ALLOWED
    )


@pytest.mark.parametrize(
    "blob", [b"", b"garbage", b"\x04\x00\x02\x00\x81\x00\x00\x00" + bytes(600), b"\x00" * 5000]
)
def test_garbage_is_malformed(sim_pki: SimPki, sim_now: int, blob: bytes) -> None:
    assert _verify(sim_pki, sim_now, blob) is RejectReason.MALFORMED


def test_bad_collateral_json_is_bad_collateral(sim_pki: SimPki, sim_now: int) -> None:
    assert _verify(sim_pki, sim_now, b"x", collateral="{}") is RejectReason.BAD_COLLATERAL
    assert _verify(sim_pki, sim_now, b"x", collateral=b"\xff") is RejectReason.BAD_COLLATERAL


def test_bad_now_is_a_programming_error(sim_pki: SimPki, good_quote: bytes) -> None:
    with pytest.raises(ValueError):
        verify_quote(good_quote, sim_pki.collateral(), now=-1)
    with pytest.raises(TypeError):
        verify_quote(good_quote, sim_pki.collateral(), now="now")  # type: ignore[arg-type]


@given(pos=st.integers(0, 4000), mask=st.integers(1, 255))
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_random_byte_flips_in_sim_quote_are_rejected(
    sim_pki: SimPki, sim_now: int, good_quote: bytes, pos: int, mask: int
) -> None:
    pos %= len(good_quote)
    col = _collateral_cache(sim_pki, sim_now)
    mutated = _flip(good_quote, pos, mask)
    try:
        v = verify_quote(mutated, col, root_ca_der=sim_pki.root_ca_der, now=sim_now)
    except QuoteVerificationError:
        return
    # Only the PEM text of the embedded chain tolerates changes (whitespace, armour lines,
    # the root copy dcap-qvl ignores in favour of the configured anchor), and then what the
    # quote proves is unchanged.
    chain_start = QUOTE_OFFSETS["qe_auth_data_len"][0] + 2 + 32 + 6
    assert pos >= chain_start, f"flip at {pos} (mask {mask:#x}) outside the PEM was accepted"
    base = verify_quote(good_quote, col, root_ca_der=sim_pki.root_ca_der, now=sim_now)
    assert v.summary() == base.summary()


_COLLATERAL: dict[int, str] = {}


def _collateral_cache(pki: SimPki, now: int) -> str:
    if id(pki) not in _COLLATERAL:
        _COLLATERAL[id(pki)] = pki.collateral(now).to_json()
    return _COLLATERAL[id(pki)]


# --- classification, async, settings -------------------------------------------------------


def test_unknown_dcap_message_maps_to_verification_failed() -> None:
    assert classify_dcap_error("something new") is RejectReason.VERIFICATION_FAILED
    assert classify_dcap_error(
        "Failed to verify certificate chain\n\nCaused by:\n    CertRevoked"
    ) is (RejectReason.REVOKED)


def test_async_verification_runs_off_the_loop(
    sim_pki: SimPki, sim_now: int, good_quote: bytes
) -> None:
    col = sim_pki.collateral(sim_now)

    async def main() -> list[TcbStatus]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        t = asyncio.ensure_future(ticker())
        with ThreadPoolExecutor(2) as pool:
            results = await asyncio.gather(*(
                verify_quote_async(good_quote, col, root_ca_der=sim_pki.root_ca_der,
                                   now=sim_now, executor=pool)
                for _ in range(8)
            ))  # fmt: skip
        t.cancel()
        assert ticks > 0
        return [r.status for r in results]

    assert asyncio.run(main()) == [TcbStatus.UP_TO_DATE] * 8


def test_async_rejection_propagates(sim_pki: SimPki, sim_now: int, good_quote: bytes) -> None:
    async def main() -> None:
        await verify_quote_async(good_quote, sim_pki.collateral(sim_now), now=sim_now)

    with pytest.raises(QuoteVerificationError) as err:
        asyncio.run(main())
    assert err.value.reason is RejectReason.WRONG_ROOT


def test_async_verification_in_a_process_pool(
    sim_pki: SimPki, sim_now: int, good_quote: bytes
) -> None:
    """The documented way to scale: a process pool, collateral passed as JSON."""
    col = sim_pki.collateral(sim_now).to_json()

    async def main() -> None:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(1, mp_context=ctx) as pool:
            ok = await verify_quote_async(good_quote, col, root_ca_der=sim_pki.root_ca_der,
                                          now=sim_now, executor=pool)  # fmt: skip
            assert ok.report_data == hashlib.sha512(b"key").digest()
            with pytest.raises(QuoteVerificationError) as err:
                await verify_quote_async(good_quote, col, now=sim_now, executor=pool)
            assert err.value.reason is RejectReason.WRONG_ROOT

    asyncio.run(main())


def test_verifier_fixed_time_and_clock(sim_pki: SimPki, sim_now: int, good_quote: bytes) -> None:
    col = sim_pki.collateral(sim_now).to_json()
    fixed = QuoteVerifier(root_ca_der=sim_pki.root_ca_der, fixed_time=sim_now, clock=lambda: 0.0)
    assert fixed.verify(good_quote, col).verified_at == sim_now
    late = QuoteVerifier(root_ca_der=sim_pki.root_ca_der, clock=lambda: sim_now + 90 * 86400.0)
    with pytest.raises(QuoteVerificationError) as err:
        late.verify(good_quote, col)
    assert err.value.reason is RejectReason.CRL_EXPIRED
    assert asyncio.run(fixed.verify_async(good_quote, col)).status is TcbStatus.UP_TO_DATE


def test_verifier_from_settings_warns_for_a_test_root(
    sim_pki: SimPki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    der = tmp_path / "root.der"
    der.write_bytes(sim_pki.root_ca_der)
    pem = tmp_path / "root.pem"
    pem.write_text(sim_pki.root_ca_pem)
    assert load_root_ca(der) == load_root_ca(pem) == sim_pki.root_ca_der
    with caplog.at_level(logging.WARNING, logger="gateway.attest.quote"):
        v = verifier_from_settings(AttestSettings(root_ca=str(pem), verification_time=123,
                                                  allowed_tcb_statuses=("OutOfDate",)))  # fmt: skip
    assert v.root_ca_der == sim_pki.root_ca_der and not v.uses_intel_root
    assert v.now() == 123
    assert TcbStatus.OUT_OF_DATE in v.policy.allowed
    assert any("NON-INTEL root" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gateway.attest.quote"):
        intel = verifier_from_settings(AttestSettings())
    assert intel.uses_intel_root and intel.root_ca_der is None
    assert not caplog.records


def test_load_root_ca_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read"):
        load_root_ca(tmp_path / "missing.der")
    (tmp_path / "junk").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a DER or PEM"):
        load_root_ca(tmp_path / "junk")


def test_settings_validate() -> None:
    with pytest.raises(ValueError, match="Revoked"):
        AttestSettings(allowed_tcb_statuses=("Revoked",))
    with pytest.raises(ValueError, match="unknown TCB status 'Bogus'"):
        AttestSettings(allowed_tcb_statuses=("Bogus",))
    with pytest.raises(ValueError, match="collateral_file"):
        AttestSettings(collateral_source="file")


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ("Verification failed: QE ISVPRODID mismatch: expected 2, got 3",
         RejectReason.QE_IDENTITY_MISMATCH),
        ("Verification failed: Unsupported DCAP quote version", RejectReason.MALFORMED),
        ("Verification failed: Unknown QE vendor ID", RejectReason.MALFORMED),
        ("Verification failed: Invalid QE auth data length", RejectReason.MALFORMED),
        ("Verification failed: Failed to verify certificate chain\n\nCaused by:\n"
         "    UnknownRevocationStatus", RejectReason.UNTRUSTED_CHAIN),
        ("Verification failed: Failed to verify certificate chain\n\nCaused by:\n"
         "    CaUsedAsEndEntity", RejectReason.UNTRUSTED_CHAIN),
        ("Verification failed: TDX quote with non-TDX TCB info in the collateral",
         RejectReason.COLLATERAL_MISMATCH),
        ("Verification failed: Failed to parse root CA CRL\n\nCaused by:\n    CrlExpired { }",
         RejectReason.CRL_EXPIRED),
        ("Verification failed: Failed to parse root CA CRL\n\nCaused by:\n    BadDer",
         RejectReason.BAD_COLLATERAL),
    ],
)  # fmt: skip
def test_dcap_messages_map_to_reasons(message: str, reason: RejectReason) -> None:
    assert classify_dcap_error(message) is reason


def test_header_fields_are_signed(sim_pki: SimPki, sim_now: int, good_quote: bytes) -> None:
    """qe_svn, pce_svn and user_data are unchecked by dcap-qvl but inside the signed region."""
    for field in ("qe_svn", "pce_svn", "user_data", "qe_vendor_id"):
        assert _verify(sim_pki, sim_now, _flip(good_quote, QUOTE_OFFSETS[field][0])) is not None
