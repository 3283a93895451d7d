"""verify_evidence: evidence + anchors + policy -> one verdict, off the event loop."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.attest import ratls
from gateway.attest.evidence import RejectReason
from gateway.attest.policy_settings import AdmissionPolicy
from gateway.attest.tcb import TcbPolicy, TcbStatus
from gateway.attest.verifier import TrustAnchors, verify_evidence, verify_evidence_async
from gateway.protocol.attestation import Attestation, AttestedEvent, encode_attestation_v1
from gateway.tee.base import RuntimeEvent
from gateway.tee.sim import SimTee
from gateway.tee.sim_pki import SimPki

APP = "5bb4ff9a3837357f19dc176407a5709c62eb6c56"
ALLOW = AdmissionPolicy(app_ids=(APP,))


@pytest.fixture
def tee(sim_pki: SimPki, tmp_path: Path) -> SimTee:
    tee = SimTee(sim_pki, tmp_path / "cvm")
    for name, payload in [
        ("system-preparing", b""),
        ("app-id", bytes.fromhex(APP)),
        ("compose-hash", b"\xc1" * 32),
        ("instance-id", b"\x16" * 20),
        ("boot-mr-done", b""),
        ("system-ready", b""),
    ]:
        tee.emit_event(RuntimeEvent(name, payload))
    return tee


@pytest.fixture
def cert_der(tee: SimTee, sim_now: int) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.fromtimestamp(sim_now, dt.UTC)
    cert = ratls.build_ratls_cert(key, tee, ratls.CertRequest("cvm", client_auth=True), now=now)
    return cert.public_bytes(serialization.Encoding.DER)


def anchors(pki: SimPki, now: int, **col: object) -> TrustAnchors:
    return TrustAnchors(collateral=pki.collateral(now, **col), root_ca_der=pki.root_ca_der)  # type: ignore[arg-type]


def test_accepted_and_refused_by_policy(cert_der: bytes, sim_pki: SimPki, sim_now: int) -> None:
    a = anchors(sim_pki, sim_now)
    ok = verify_evidence(anchors=a, policy=ALLOW, now=sim_now, cert=cert_der)
    assert ok.verdict.accepted and ok.evidence is not None
    assert ok.to_json()["verdict"] == {
        "accepted": True,
        "reason": None,
        "detail": ok.verdict.detail,
        "quote_reason": None,
    }
    other = AdmissionPolicy(app_ids=("00" * 20,))
    no = verify_evidence(anchors=a, policy=other, now=sim_now, cert=cert_der)
    assert not no.verdict.accepted and no.verdict.reason is RejectReason.APP_NOT_ALLOWED
    assert no.evidence is not None  # who was refused is still known


def test_tcb_status_refused_by_admission_or_by_attest_floor(
    cert_der: bytes, sim_pki: SimPki, sim_now: int
) -> None:
    a = anchors(sim_pki, sim_now, tcb_status="SWHardeningNeeded")
    r = verify_evidence(anchors=a, policy=ALLOW, now=sim_now, cert=cert_der)
    assert r.verdict.reason is RejectReason.TCB_STATUS
    loose = AdmissionPolicy(app_ids=(APP,), allowed_tcb_statuses=("UpToDate", "SWHardeningNeeded"))
    assert verify_evidence(anchors=a, policy=loose, now=sim_now, cert=cert_der).verdict.accepted
    strict_floor = TrustAnchors(a.collateral, a.root_ca_der, tcb_policy=TcbPolicy())
    r = verify_evidence(anchors=strict_floor, policy=loose, now=sim_now, cert=cert_der)
    assert r.verdict.reason is RejectReason.TCB_STATUS
    assert r.verdict.quote_reason == "tcb_status_not_allowed"
    assert TcbStatus.REVOKED not in a.tcb_policy.allowed


def test_bare_attestation_with_expected_report_data(
    tee: SimTee, sim_pki: SimPki, sim_now: int
) -> None:
    rd = bytes(range(64))
    events = tuple(AttestedEvent(e.name, e.payload) for e in tee.runtime_events())
    att = Attestation(tee.get_quote(rd), (), events, rd, "{}")
    blob = encode_attestation_v1(att)
    a = anchors(sim_pki, sim_now)
    r = verify_evidence(
        anchors=a, policy=ALLOW, now=sim_now, attestation=blob, expected_report_data=rd
    )
    assert r.verdict.accepted and r.evidence is not None
    assert r.evidence.method.value == "attestation"
    wrong = verify_evidence(
        anchors=a, policy=ALLOW, now=sim_now, attestation=blob, expected_report_data=bytes(64)
    )
    assert wrong.verdict.reason is RejectReason.KEY_BINDING
    junk = verify_evidence(
        anchors=a, policy=ALLOW, now=sim_now, attestation=b"\x00\x07", expected_report_data=rd
    )
    assert junk.verdict.reason is RejectReason.MALFORMED
    none = verify_evidence(anchors=a, policy=ALLOW, now=sim_now)
    assert none.verdict.reason is RejectReason.NO_EVIDENCE


def test_quote_report_data_must_match_attestation(
    tee: SimTee, sim_pki: SimPki, sim_now: int
) -> None:
    rd = bytes(range(64))
    events = tuple(AttestedEvent(e.name, e.payload) for e in tee.runtime_events())
    att = Attestation(tee.get_quote(bytes(64)), (), events, rd, "{}")
    r = verify_evidence(
        anchors=anchors(sim_pki, sim_now),
        policy=ALLOW,
        now=sim_now,
        attestation=encode_attestation_v1(att),
        expected_report_data=rd,
    )
    assert r.verdict.reason is RejectReason.REPORT_DATA_MISMATCH


def test_kms_cert_needs_a_configured_root(sim_pki: SimPki, sim_now: int) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    from gateway.protocol.appinfo import encode_app_info
    from tests.attest.test_ratls import INFO, _ca  # the same KMS fixtures

    key = ec.generate_private_key(ec.SECP256R1())
    root = _ca("KMS", key, None, sim_now, None)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    when = dt.datetime.fromtimestamp(sim_now, dt.UTC)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(root.subject)
        .issuer_name(root.subject)
        .public_key(leaf_key.public_key())
        .serial_number(3)
        .not_valid_before(when - dt.timedelta(hours=1))
        .not_valid_after(when + dt.timedelta(days=1))
        .add_extension(ratls._ext(ratls.OID_APP_INFO, encode_app_info(INFO)), critical=False)
        .sign(key, hashes.SHA256())
    )
    a = anchors(sim_pki, sim_now)
    r = verify_evidence(anchors=a, policy=ALLOW, now=sim_now, cert=[leaf])
    assert r.verdict.reason is RejectReason.CHAIN_INVALID
    with_root = TrustAnchors(a.collateral, a.root_ca_der, kms_root=root)
    r = verify_evidence(anchors=with_root, policy=ALLOW, now=sim_now, cert=[leaf])
    assert r.verdict.reason is RejectReason.KMS_CERT_NOT_ALLOWED
    kms_ok = AdmissionPolicy(app_ids=(APP,), allow_kms_cert=True)
    assert verify_evidence(
        anchors=with_root, policy=kms_ok, now=sim_now, cert=[leaf]
    ).verdict.accepted


def test_async_variant_runs_off_the_loop(cert_der: bytes, sim_pki: SimPki, sim_now: int) -> None:
    a = anchors(sim_pki, sim_now)

    async def main() -> list[bool]:
        results = await asyncio.gather(
            *(
                verify_evidence_async(anchors=a, policy=ALLOW, now=sim_now, cert=cert_der)
                for _ in range(4)
            )
        )
        return [r.verdict.accepted for r in results]

    assert asyncio.run(main()) == [True] * 4


def test_collateral_can_be_looked_up_per_quote(
    cert_der: bytes, sim_pki: SimPki, sim_now: int
) -> None:
    seen: list[bytes] = []
    col = sim_pki.collateral(sim_now)

    def lookup(quote: bytes) -> object:
        seen.append(quote)
        return col

    a = TrustAnchors(collateral=lookup, root_ca_der=sim_pki.root_ca_der)
    assert verify_evidence(anchors=a, policy=ALLOW, now=sim_now, cert=cert_der).verdict.accepted
    assert len(seen) == 1 and seen[0][:2] == b"\x04\x00"


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_mutated_certificates_never_raise(
    data: st.DataObject, cert_der: bytes, sim_pki: SimPki, sim_now: int
) -> None:
    """Whatever bytes arrive, the verifier answers with a verdict (fail closed)."""
    wire = bytearray(cert_der)
    for _ in range(data.draw(st.integers(1, 6))):
        wire[data.draw(st.integers(0, len(wire) - 1))] = data.draw(st.integers(0, 255))
    a = _ANCHORS.get(id(sim_pki)) or _ANCHORS.setdefault(id(sim_pki), anchors(sim_pki, sim_now))
    r = verify_evidence(anchors=a, policy=ALLOW, now=sim_now, cert=bytes(wire))
    assert r.verdict.accepted is (r.verdict.reason is None)
    if r.verdict.accepted:  # only mutations outside what is signed/bound may pass
        assert r.evidence is not None and r.evidence.identity.app_id.hex() == APP


_ANCHORS: dict[int, TrustAnchors] = {}


def test_verify_with_an_async_collateral_source(
    cert_der: bytes, sim_pki: SimPki, sim_now: int
) -> None:
    from gateway.attest.collateral import SimCollateralSource
    from gateway.attest.verifier import presented_quote, verify_with_source

    source = SimCollateralSource(sim_pki, clock=lambda: sim_now)
    base = TrustAnchors(collateral=None, root_ca_der=sim_pki.root_ca_der)
    quote = presented_quote(cert=cert_der)
    assert quote is not None and quote[:2] == b"\x04\x00"
    assert presented_quote(cert=b"junk") is None and presented_quote() is None

    async def main() -> tuple[bool, RejectReason | None]:
        ok = await verify_with_source(
            source=source, anchors=base, policy=ALLOW, now=sim_now, cert=cert_der
        )
        junk = await verify_with_source(
            source=source, anchors=base, policy=ALLOW, now=sim_now, cert=b"junk"
        )
        return ok.verdict.accepted, junk.verdict.reason

    assert asyncio.run(main()) == (True, RejectReason.MALFORMED)


def test_negative_serial_is_refused_not_warned(
    cert_der: bytes, sim_pki: SimPki, sim_now: int
) -> None:
    """Found by the mutation test: a serial with its sign bit set used to escape as a
    CryptographyDeprecationWarning; it is malformed evidence."""
    wire = bytearray(cert_der)
    at = wire.index(b"\xa0\x03\x02\x01\x02\x02") + 6  # version [0] v3, then the serial INTEGER
    wire[at + 1] |= 0x80  # first content byte: negative number
    r = verify_evidence(anchors=anchors(sim_pki, sim_now), policy=ALLOW, now=sim_now,
                        cert=bytes(wire))  # fmt: skip
    assert not r.verdict.accepted
    assert r.verdict.reason is not None and r.verdict.reason.value == "malformed"
