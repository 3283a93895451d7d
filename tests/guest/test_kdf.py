"""Key derivation and signatures against upstream dstack's vectors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.guest import kdf
from gateway.guest.keccak import keccak256

DATA = Path(__file__).resolve().parents[1] / "data"
VECTORS = json.loads((DATA / "guest" / "signature_chain.json").read_text())
# The generator's inputs (dstack/guest-agent/tests/signature_chain_vectors.rs)
KMS_ROOT_SCALAR = b"KMS-root-test-key-do-not-use!!!\x01"
APP_ID = bytes.fromhex(VECTORS["app_id"])


def test_keccak256_known_digests() -> None:
    assert keccak256(b"").hex() == (
        "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470"
    )
    assert keccak256(b"abc").hex() == (
        "4e03657aea45a94fc7d47ba826c8d667c0d1e6e33a64a036ec44f58fa12d6c45"
    )


@pytest.mark.parametrize("length", [0, 1, 135, 136, 137, 271, 272, 1000])
def test_keccak256_block_boundaries_differ_from_sha3(length: int) -> None:
    import hashlib

    data = bytes(range(256)) * 4
    digest = keccak256(data[:length])
    assert len(digest) == 32
    assert digest != hashlib.sha3_256(data[:length]).digest()


def test_derive_dh_secret_upstream_vector() -> None:
    """ra-tls kdf.rs test_derive_dh_secret_stable_output."""
    der = bytes.fromhex(
        "308187020100301306072a8648ce3d020106082a8648ce3d030107046d306b02"
        "01010420f57527cea4ab7ffb49af99b158cdc0e3ec06398f528349ea236b7d2a"
        "fe19cec1a1440342000491f50522407ce29dce3ed7d31a15d80c1c42f13a2355"
        "2d2b33a0ce09ee11e47bce95936f3e7f80d195f879e28e1b144ef37ac9ab8e36"
        "a690cbf930b775897b27"
    )
    root = serialization.load_der_private_key(der, None)
    assert isinstance(root, ec.EllipticCurvePrivateKey)
    secret = kdf.derive_dh_secret(root, [b"context one", b"context two"])
    assert secret.hex() == "663afd58820be8ad645f9c035e93199d114ab16f738db62393bc1d7d623e8813"


def test_kms_root_and_app_root_keys_match_vectors() -> None:
    root = kdf.k256_key(KMS_ROOT_SCALAR)
    assert kdf.compressed_k256_pub(root).hex() == VECTORS["kms_root_pubkey"]
    app = kdf.k256_key(kdf.derive_key(KMS_ROOT_SCALAR, [APP_ID, b"app-key"]))
    assert kdf.compressed_k256_pub(app).hex() == VECTORS["app_root_pubkey"]
    kms_sig = kdf.kms_issued_signature(root, APP_ID, kdf.compressed_k256_pub(app))
    for case in VECTORS["cases"]:
        assert case["signature_chain"][2] == kms_sig.hex()


@pytest.mark.parametrize("case", VECTORS["cases"], ids=lambda c: c["algorithm"])
def test_sign_and_chain_match_vectors(case: dict[str, object]) -> None:
    app_scalar = kdf.derive_key(KMS_ROOT_SCALAR, [APP_ID, b"app-key"])
    derived = kdf.derive_key(app_scalar, [VECTORS["path"].encode()])
    data = bytes.fromhex(str(case["data"]))
    if case["algorithm"] == "ed25519":
        sk = kdf.ed25519_key(derived)
        pub = kdf.ed25519_pub(sk)
        sig = sk.sign(data)
    else:
        k = kdf.k256_key(derived)
        pub = kdf.compressed_k256_pub(k)
        sig = kdf.sign_k256(k, data, prehashed=case["algorithm"] == "secp256k1_prehashed")
        assert kdf.verify_k256(pub, data, sig, prehashed=case["algorithm"] == "secp256k1_prehashed")
    assert pub.hex() == case["public_key"]
    assert sig.hex() == case["signature"]
    app_sig = kdf.sign_k256_recoverable(
        kdf.k256_key(app_scalar), keccak256(f"{VECTORS['purpose']}:{pub.hex()}".encode())
    )
    chain = case["signature_chain"]
    assert isinstance(chain, list)
    assert app_sig.hex() == chain[1]


def test_verify_k256_refuses_high_s_and_wrong_data() -> None:
    bad = {c["name"]: c for c in VECTORS["invalid_cases"]}
    high = bad["secp256k1_high_s"]
    with pytest.raises(kdf.KdfError, match="high-S"):
        kdf.verify_k256(
            bytes.fromhex(high["public_key"]),
            bytes.fromhex(high["data"]),
            bytes.fromhex(high["signature"]),
            prehashed=False,
        )
    wrong = bad["secp256k1_wrong_data"]
    assert not kdf.verify_k256(
        bytes.fromhex(wrong["public_key"]),
        bytes.fromhex(wrong["data"]),
        bytes.fromhex(wrong["signature"]),
        prehashed=False,
    )


@settings(max_examples=15, deadline=None)
@given(scalar=st.integers(1, 2**255), msg=st.binary(max_size=64))
def test_recoverable_signature_recovers_the_signer(scalar: int, msg: bytes) -> None:
    key = kdf.k256_key(scalar.to_bytes(32, "big"))
    digest = keccak256(msg)
    sig = kdf.sign_k256_recoverable(key, digest)
    assert sig[64] in (0, 1)
    assert int.from_bytes(sig[32:64], "big") <= kdf._N // 2
    assert kdf.recover_k256_pub(digest, sig) == kdf.compressed_k256_pub(key)


def test_recover_rejects_garbage() -> None:
    with pytest.raises(kdf.KdfError):
        kdf.recover_k256_pub(bytes(32), bytes(65))
    with pytest.raises(kdf.KdfError):
        kdf.recover_k256_pub(bytes(31), bytes(65))
