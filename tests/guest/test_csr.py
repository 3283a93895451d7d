"""dstack's CertSigningRequestV2 codec and the lab KMS's SignCert checks."""

from __future__ import annotations

import asyncio
import time

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.attest.quote import QuoteVerifier
from gateway.guest import certs, csr, evidence, prpc
from gateway.guest.kms_lab import KmsRoot, LabKms
from gateway.protocol.attestation import encode_attestation_v0, strip_attestation
from gateway.protocol.errors import CodecError
from gateway.tee.sim import SimTee
from gateway.tee.sim_pki import SimPki

# ra-tls cert.rs test vector (CertConfigV2 before ext_app_info), with the ext_app_info byte
# (false) inserted after ext_quote, as in the current layout.
UPSTREAM = (
    "44706c65617365207369676e20636572743a0c0102030040746573742e6578616d706c652e636f6d00"
    "010001" + "00" + "0000" + "000004090000" + "00" * 64 + "00"
)


def test_encoding_matches_upstream_vector() -> None:
    attestation = bytes.fromhex("000004090000" + "00" * 64 + "00")
    req = csr.CertSigningRequestV2(
        pubkey=b"\x01\x02\x03",
        config=csr.CertConfigV2(subject="test.example.com", usage_server_auth=True, ext_quote=True),
        attestation=attestation,
    )
    assert req.encode().hex() == UPSTREAM
    assert csr.decode_csr(bytes.fromhex(UPSTREAM)) == req


@settings(max_examples=50, deadline=None)
@given(
    subject=st.text(max_size=30),
    names=st.lists(st.text(max_size=10), max_size=3),
    org=st.none() | st.text(max_size=5),
    flags=st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans()),
    nb=st.none() | st.integers(0, 2**64 - 1),
    att=st.binary(min_size=1, max_size=20),
)
def test_round_trip(
    subject: str,
    names: list[str],
    org: str | None,
    flags: tuple[bool, bool, bool, bool],
    nb: int | None,
    att: bytes,
) -> None:
    req = csr.CertSigningRequestV2(
        pubkey=b"k",
        config=csr.CertConfigV2(subject, org, tuple(names), *flags, not_before=nb),
        attestation=att,
    )
    assert csr.decode_csr(req.encode()) == req


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=120))
def test_random_bytes_only_raise_codec_error(data: bytes) -> None:
    try:
        csr.decode_csr(UPSTREAM_BYTES[: len(data) % 40] + data)
    except CodecError:
        pass


UPSTREAM_BYTES = bytes.fromhex(UPSTREAM)


def test_lab_kms_sign_cert_checks(sim_pki: SimPki, tee: SimTee) -> None:
    kms = LabKms(
        root=KmsRoot.create(),
        verifier=QuoteVerifier(root_ca_der=sim_pki.root_ca_der),
        collateral=lambda quote: sim_pki.collateral(int(time.time())),
    )
    from gateway.tee.base import RuntimeEvent

    tee.emit_event(RuntimeEvent("app-id", b"\x05" * 20))
    key = ec.generate_private_key(ec.SECP256R1())
    spki = certs.spki_der(key)
    att = encode_attestation_v0(
        strip_attestation(evidence.make_attestation(tee, certs.ratls_report_data(spki), ""))
    )
    req = csr.CertSigningRequestV2(spki, csr.CertConfigV2(subject="s"), att)
    chain = asyncio.run(kms.sign_cert(req.encode(), req.sign(key)))
    assert len(chain) == 3
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(prpc.RpcError, match="signature does not verify"):
        asyncio.run(kms.sign_cert(req.encode(), req.sign(other)))
    # an attestation bound to another key is refused even when the CSR is well signed
    stolen = csr.CertSigningRequestV2(certs.spki_der(other), csr.CertConfigV2(subject="s"), att)
    with pytest.raises(prpc.RpcError, match="key_binding"):
        asyncio.run(kms.sign_cert(stolen.encode(), stolen.sign(other)))
    bad = csr.CertSigningRequestV2(spki, csr.CertConfigV2(subject="s"), att, confirm="nope")
    with pytest.raises(prpc.RpcError, match="confirm"):
        asyncio.run(kms.sign_cert(bad.encode(), bad.sign(key)))
