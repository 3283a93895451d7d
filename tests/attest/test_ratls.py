"""RA-TLS certificates built on the simulated TDX and verified through dcap-qvl."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from hypothesis import given
from hypothesis import strategies as st

from gateway.attest import ratls
from gateway.attest.evidence import EvidenceError, EvidenceMethod, RejectReason, VerifiedEvidence
from gateway.protocol.appinfo import AppInfo, encode_app_info
from gateway.protocol.attestation import (
    AttestedEvent,
    decode_attestation,
    encode_attestation_v0,
)
from gateway.tee.base import RuntimeEvent
from gateway.tee.sim import SimImage, SimTee
from gateway.tee.sim_pki import SimPki

APP_ID = bytes.fromhex("5bb4ff9a3837357f19dc176407a5709c62eb6c56")
BOOT = [
    ("system-preparing", b""),
    ("app-id", APP_ID),
    ("compose-hash", b"\xc1" * 32),
    ("instance-id", b"\x16" * 20),
    ("boot-mr-done", b""),
    ("key-provider", b'{"name":"none","id":""}'),
    ("storage-fs", b"zfs"),
    ("system-ready", b""),
]


def boot_tee(pki: SimPki, tmp: Path, image: SimImage | None = None) -> SimTee:
    tee = SimTee(pki, tmp / "cvm", image)
    for name, payload in BOOT:
        tee.emit_event(RuntimeEvent(name, payload))
    return tee


def when(now: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(now, dt.UTC)


@pytest.fixture
def tee(sim_pki: SimPki, tmp_path: Path) -> SimTee:
    return boot_tee(sim_pki, tmp_path)


@pytest.fixture
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def verify(cert: x509.Certificate | bytes, pki: SimPki, now: int, **col: Any) -> VerifiedEvidence:
    return ratls.verify_ratls_cert(
        cert,
        collateral=pki.collateral(now, **col),
        root_ca_der=pki.root_ca_der,
        now=now,
    )


def reissue(
    cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, **ext: bytes
) -> x509.Certificate:
    """The same certificate for ``key``, with extension contents replaced by OID suffix."""
    b = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(key.public_key())
        .serial_number(cert.serial_number)
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
    )
    for e in cert.extensions:
        value = e.value
        suffix = e.oid.dotted_string.rsplit(".", 1)[1]
        if e.oid.dotted_string.startswith("1.3.6.1.4.1.62397.1.") and f"x{suffix}" in ext:
            value = ratls._ext(e.oid, ext[f"x{suffix}"])
        b = b.add_extension(value, critical=e.critical)
    return b.sign(key, hashes.SHA256())


def without_attestation(
    cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> x509.Certificate:
    """The same certificate with only the legacy 1.1/1.2 evidence left."""
    b = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(key.public_key())
        .serial_number(cert.serial_number)
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
    )
    for e in cert.extensions:
        if e.oid != ratls.OID_ATTESTATION:
            b = b.add_extension(e.value, critical=e.critical)
    return b.sign(key, hashes.SHA256())


def test_round_trip(
    tee: SimTee, key: ec.EllipticCurvePrivateKey, sim_pki: SimPki, sim_now: int
) -> None:
    req = ratls.CertRequest("dstack-guest", alt_names=("app.example", "127.0.0.1"), app_id=APP_ID)
    cert = ratls.build_ratls_cert(key, tee, req, now=when(sim_now))
    # extension encoding: non-critical, extnValue = DER OCTET STRING(content)
    ext = cert.extensions.get_extension_for_oid(ratls.OID_ATTESTATION)
    assert not ext.critical and isinstance(ext.value, x509.UnrecognizedExtension)
    assert ext.value.value[0] == 0x04
    assert ratls.read_extension(cert, ratls.OID_APP_ID) == APP_ID
    assert ratls.read_extension(cert, ratls.OID_SPECIAL_USAGE) == b"app:custom"
    att = decode_attestation(ratls.read_extension(cert, ratls.OID_ATTESTATION) or b"")
    assert att.wire_version == 0 and all(e.digest == b"" for e in att.event_log)  # stripped
    ev = verify(cert, sim_pki, sim_now)
    assert ev.method is EvidenceMethod.RATLS
    assert ev.identity.app_id == APP_ID
    assert ev.identity.compose_hash == b"\xc1" * 32
    assert ev.tcb_status == "UpToDate"
    assert ev.measurements is not None and ev.measurements.rtmr3 == tee.rtmrs()[3]
    assert ev.measurements.mr_td == tee.mrtd()
    # PEM and DER bytes verify the same
    der = cert.public_bytes(serialization.Encoding.DER)
    pem = cert.public_bytes(serialization.Encoding.PEM)
    assert verify(der, sim_pki, sim_now) == ev == verify(pem, sim_pki, sim_now)


@pytest.mark.parametrize("gz", [False, True])
def test_legacy_extensions_verify(
    tee: SimTee, key: ec.EllipticCurvePrivateKey, sim_pki: SimPki, sim_now: int, gz: bool
) -> None:
    req = ratls.CertRequest("legacy", legacy=True, legacy_gzip=gz)
    cert = ratls.build_ratls_cert(key, tee, req, now=when(sim_now))
    legacy_cert = without_attestation(cert, key)
    ev = verify(legacy_cert, sim_pki, sim_now)
    assert ev.identity.app_id == APP_ID


def test_key_not_bound(
    tee: SimTee, key: ec.EllipticCurvePrivateKey, sim_pki: SimPki, sim_now: int
) -> None:
    cert = ratls.build_ratls_cert(key, tee, ratls.CertRequest("x"), now=when(sim_now))
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(EvidenceError) as err:
        verify(reissue(cert, other), sim_pki, sim_now)
    assert err.value.reason is RejectReason.KEY_BINDING


EditEvents = Callable[[list[AttestedEvent]], list[AttestedEvent]]


def _with_events(
    cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, edit: EditEvents
) -> x509.Certificate:
    att = decode_attestation(ratls.read_extension(cert, ratls.OID_ATTESTATION) or b"")
    att = replace(att, runtime_events=tuple(edit(list(att.runtime_events))))
    return reissue(cert, key, x8=encode_attestation_v0(att))


@pytest.mark.parametrize(
    ("edit", "detail"),
    [
        (lambda evs: [e for e in evs if e.name != "instance-id"], "missing, edited"),
        (lambda evs: [*evs[:2], replace(evs[2], payload=b"\x00" * 32), *evs[3:]], "missing"),
        (lambda evs: [*evs, replace(evs[0], name="late")], "matches after the first 8"),
    ],
    ids=["removed", "edited", "appended"],
)
def test_rtmr3_mismatch(
    tee: SimTee,
    key: ec.EllipticCurvePrivateKey,
    sim_pki: SimPki,
    sim_now: int,
    edit: EditEvents,
    detail: str,
) -> None:
    cert = ratls.build_ratls_cert(key, tee, ratls.CertRequest("x"), now=when(sim_now))
    with pytest.raises(EvidenceError) as err:
        verify(_with_events(cert, key, edit), sim_pki, sim_now)
    assert err.value.reason is RejectReason.RTMR_MISMATCH
    assert detail in err.value.detail


def test_edited_event_in_a_legacy_log_is_named(
    tee: SimTee, key: ec.EllipticCurvePrivateKey, sim_pki: SimPki, sim_now: int
) -> None:
    from gateway.protocol.attestation import decode_legacy_event_log, encode_legacy_event_log

    cert = ratls.build_ratls_cert(key, tee, ratls.CertRequest("x", legacy=True), now=when(sim_now))
    log = list(decode_legacy_event_log(ratls.read_extension(cert, ratls.OID_EVENT_LOG) or b""))
    log[2] = replace(log[2], event_payload=b"\x00" * 32)  # compose-hash, digest kept
    bad = without_attestation(reissue(cert, key, x2=encode_legacy_event_log(tuple(log))), key)
    with pytest.raises(EvidenceError) as err:
        verify(bad, sim_pki, sim_now)
    assert err.value.reason is RejectReason.RTMR_MISMATCH
    assert "compose-hash" in err.value.detail and "edited" in err.value.detail


def test_quote_from_another_root(
    tee: SimTee, key: ec.EllipticCurvePrivateKey, sim_pki: SimPki, sim_now: int
) -> None:
    cert = ratls.build_ratls_cert(key, tee, ratls.CertRequest("x"), now=when(sim_now))
    other = SimPki.create(not_before=sim_now - 86400)
    with pytest.raises(EvidenceError) as err:
        verify(cert, other, sim_now)
    assert err.value.reason is RejectReason.QUOTE_INVALID
    assert err.value.quote_reason in ("wrong_root", "untrusted_chain")


def test_debug_td_refused(
    sim_pki: SimPki, tmp_path: Path, key: ec.EllipticCurvePrivateKey, sim_now: int
) -> None:
    img = replace(SimImage.named(), td_attributes=bytes([1, 0, 0, 0x10, 0, 0, 0, 0]))
    tee = boot_tee(sim_pki, tmp_path, img)
    cert = ratls.build_ratls_cert(key, tee, ratls.CertRequest("x"), now=when(sim_now))
    with pytest.raises(EvidenceError) as err:
        verify(cert, sim_pki, sim_now)
    assert err.value.reason is RejectReason.DEBUG_TD


def test_tcb_status_reported_for_policy(
    tee: SimTee, key: ec.EllipticCurvePrivateKey, sim_pki: SimPki, sim_now: int
) -> None:
    cert = ratls.build_ratls_cert(key, tee, ratls.CertRequest("x"), now=when(sim_now))
    ev = verify(cert, sim_pki, sim_now, tcb_status="OutOfDate", advisory_ids=("INTEL-SA-00001",))
    assert ev.tcb_status == "OutOfDate" and ev.advisory_ids == ("INTEL-SA-00001",)


def test_not_ratls(key: ec.EllipticCurvePrivateKey, sim_pki: SimPki, sim_now: int) -> None:
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "plain")])
    plain = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(when(sim_now - 60))
        .not_valid_after(when(sim_now + 60))
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(EvidenceError) as err:
        verify(plain, sim_pki, sim_now)
    assert err.value.reason is RejectReason.NO_EVIDENCE
    with pytest.raises(EvidenceError) as err:
        verify(b"not a certificate", sim_pki, sim_now)
    assert err.value.reason is RejectReason.MALFORMED


def test_garbage_attestation_extension(
    tee: SimTee, key: ec.EllipticCurvePrivateKey, sim_pki: SimPki, sim_now: int
) -> None:
    cert = ratls.build_ratls_cert(key, tee, ratls.CertRequest("x"), now=when(sim_now))
    with pytest.raises(EvidenceError) as err:
        verify(reissue(cert, key, x8=b"\x00\x00\xff"), sim_pki, sim_now)
    assert err.value.reason is RejectReason.MALFORMED


@pytest.mark.parametrize(
    "value", [b"", b"\x05\x00", b"\x04\x05ab", b"\x04\x81\x01a", b"\x04\x85" + b"\x00" * 9]
)
def test_bad_octet_string(value: bytes) -> None:
    from gateway.protocol.errors import CodecError

    with pytest.raises(CodecError):
        ratls._parse_der_octet_string(value, "x")


def test_octet_string_long_form() -> None:
    for n in (0, 127, 128, 255, 256, 70000):
        assert ratls._parse_der_octet_string(ratls.der_octet_string(b"a" * n), "x") == b"a" * n


# --- KMS-signed certificates ------------------------------------------------------------


def _ca(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    now: int,
    pathlen: int | None,
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)])
    iss_name, iss_key = (subject, key) if issuer is None else (issuer[0].subject, issuer[1])
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(iss_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(when(now - 3600))
        .not_valid_after(when(now + 86400 * 365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=pathlen), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(iss_key, hashes.SHA256())
    )


INFO = AppInfo(
    APP_ID,
    b"\xc1" * 32,
    b"\x16" * 20,
    b"\x00" * 32,
    b"\x01" * 32,
    b"\x02" * 32,
    b"\x03" * 32,
    b'{"name":"kms","id":"aa"}',
)


@pytest.fixture
def kms(sim_now: int) -> tuple[x509.Certificate, list[x509.Certificate]]:
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _ca("Dstack KMS CA", root_key, None, sim_now, None)
    app_key = ec.generate_private_key(ec.SECP256R1())
    app_ca = _ca("Dstack App CA", app_key, (root, root_key), sim_now, 0)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "dstack-guest-agent")])
    leaf = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(app_ca.subject)
        .public_key(leaf_key.public_key())
        .serial_number(7)
        .not_valid_before(when(sim_now - 60))
        .not_valid_after(when(sim_now + 86400 * 10))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(ratls._ext(ratls.OID_APP_ID, APP_ID), critical=False)
        .add_extension(
            ratls._ext(
                ratls.OID_APP_INFO,
                encode_app_info(INFO),
            ),
            critical=False,
        )
        .sign(app_key, hashes.SHA256())
    )
    return root, [leaf, app_ca]


def test_kms_cert_app_info(
    kms: tuple[x509.Certificate, list[x509.Certificate]], sim_now: int
) -> None:
    root, chain = kms
    ev = ratls.verify_kms_cert(chain, root, now=sim_now)
    assert ev.method is EvidenceMethod.KMS_CERT and ev.measurements is None
    assert ev.identity.app_id == APP_ID and ev.identity.os_image_hash == b"\x03" * 32
    assert ev.identity.key_provider is not None and ev.identity.key_provider.name == "kms"
    assert ev.mr_aggregated == b"\x02" * 32


def test_kms_cert_refused_under_another_root_or_after_expiry(
    kms: tuple[x509.Certificate, list[x509.Certificate]], sim_now: int
) -> None:
    _, chain = kms
    other = _ca("Other", ec.generate_private_key(ec.SECP256R1()), None, sim_now, None)
    for root, now in ((other, sim_now), (kms[0], sim_now + 86400 * 30)):
        with pytest.raises(EvidenceError) as err:
            ratls.verify_kms_cert(chain, root, now=now)
        assert err.value.reason is RejectReason.CHAIN_INVALID


@given(st.binary(max_size=40))
def test_octet_string_parser_raises_only_codec_error(data: bytes) -> None:
    from gateway.protocol.errors import CodecError

    try:
        ratls._parse_der_octet_string(data, "x")
    except CodecError:
        pass
