"""dstack's key derivations, byte-for-byte.

- ``derive_key``: HKDF-SHA256 with salt ``b"RATLS"`` and ``info = b"".join(context)``
  (``ra-tls/src/kdf.rs``), used for every app key the KMS and the guest agent hand out.
- ``derive_p256``: the HKDF output used as a P-256 scalar (the app CA, the disk key, ...).
- ``derive_dh_secret``: SHA256 of the derived P-256 key's 138-byte PKCS#8 DER; this is how
  the KMS makes ``env_crypt_key`` and ``disk_crypt_key``.
- secp256k1 recoverable signatures (``r || s || recid``, RFC 6979 nonces, low S) as the
  Rust ``k256`` crate makes them, for the GetKey signature chain and the KMS's
  ``dstack-kms-issued`` signature. The private-key operation runs inside OpenSSL (via
  ``cryptography``); only the recovery id is computed here, from public values.

Why byte-exactness matters: apps pin the KMS root and verify the signature chain (the SDKs
share vectors for it), and an app's keys must be the same on our shim as on a dstack CVM.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import (
    Prehashed,
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gateway.guest.keccak import keccak256

__all__ = [
    "KdfError",
    "compressed_k256_pub",
    "derive_dh_secret",
    "derive_key",
    "derive_p256",
    "k256_key",
    "p256_scalar",
    "recover_k256_pub",
    "sign_k256",
    "sign_k256_recoverable",
    "verify_k256",
]

RATLS_SALT = b"RATLS"

# secp256k1 domain parameters (SEC 2)
_P = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEFFFFFC2F
_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
_G = (
    0x79BE667EF9DCBBAC55A06295CE870B07029BFCDB2DCE28D959F2815B16F81798,
    0x483ADA7726A3C4655DA4FBFC0E1108A8FD17B448A68554199C47D08FFB10D4B8,
)
_P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


class KdfError(ValueError):
    """A derivation or signature could not be made (an invalid scalar, a bad signature)."""


def derive_key(ikm: bytes, context: Sequence[bytes], length: int = 32) -> bytes:
    """HKDF-SHA256(salt="RATLS", ikm, info=concat(context)) -> ``length`` bytes."""
    return HKDF(
        algorithm=hashes.SHA256(), length=length, salt=RATLS_SALT, info=b"".join(context)
    ).derive(ikm)


def derive_p256(ikm: bytes, context: Sequence[bytes]) -> ec.EllipticCurvePrivateKey:
    """The P-256 key whose big-endian scalar is ``derive_key(ikm, context, 32)``."""
    scalar = int.from_bytes(derive_key(ikm, context, 32), "big")
    if not 0 < scalar < _P256_N:  # p256::SecretKey::from_slice refuses these too
        raise KdfError("derived P-256 scalar is out of range; use another context")
    return ec.derive_private_key(scalar, ec.SECP256R1())


def p256_scalar(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The 32-byte big-endian private scalar (the ``ikm`` for keys derived from ``key``)."""
    return key.private_numbers().private_value.to_bytes(32, "big")


def derive_dh_secret(root: ec.EllipticCurvePrivateKey, context: Sequence[bytes]) -> bytes:
    """SHA256 of the PKCS#8 DER of ``derive_p256(scalar(root), context)`` (32 bytes)."""
    derived = derive_p256(p256_scalar(root), context)
    der = derived.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return hashlib.sha256(der).digest()


# --- secp256k1 --------------------------------------------------------------------------


def k256_key(scalar: bytes) -> ec.EllipticCurvePrivateKey:
    """The secp256k1 private key with this 32-byte big-endian scalar."""
    if len(scalar) != 32:
        raise KdfError(f"a secp256k1 key is 32 bytes, got {len(scalar)}")
    value = int.from_bytes(scalar, "big")
    if not 0 < value < _N:
        raise KdfError("secp256k1 scalar is out of range")
    return ec.derive_private_key(value, ec.SECP256K1())


def compressed_k256_pub(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> bytes:
    """The 33-byte SEC1 compressed public key."""
    pub = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    return pub.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)


_Jac = tuple[int, int, int]  # Jacobian coordinates (X, Y, Z); Z == 0 is infinity
_INF: _Jac = (0, 1, 0)


def _jdouble(p: _Jac) -> _Jac:
    x, y, z = p
    if z == 0 or y == 0:
        return _INF
    yy = y * y % _P
    s = 4 * x * yy % _P
    m = 3 * x * x % _P  # a = 0 for secp256k1
    x3 = (m * m - 2 * s) % _P
    return x3, (m * (s - x3) - 8 * yy * yy) % _P, 2 * y * z % _P


def _jadd(p: _Jac, q: _Jac) -> _Jac:
    if p[2] == 0:
        return q
    if q[2] == 0:
        return p
    z1z1, z2z2 = p[2] * p[2] % _P, q[2] * q[2] % _P
    u1, u2 = p[0] * z2z2 % _P, q[0] * z1z1 % _P
    s1, s2 = p[1] * q[2] * z2z2 % _P, q[1] * p[2] * z1z1 % _P
    if u1 == u2:
        return _jdouble(p) if s1 == s2 else _INF
    h, r = (u2 - u1) % _P, (s2 - s1) % _P
    hh = h * h % _P
    hhh = h * hh % _P
    v = u1 * hh % _P
    x3 = (r * r - hhh - 2 * v) % _P
    return x3, (r * (v - x3) - s1 * hhh) % _P, h * p[2] * q[2] % _P


def _affine(p: _Jac) -> tuple[int, int] | None:
    if p[2] == 0:
        return None
    zi = pow(p[2], -1, _P)
    zi2 = zi * zi % _P
    return p[0] * zi2 % _P, p[1] * zi2 * zi % _P


def _mul2(a: int, pa: tuple[int, int], b: int, pb: tuple[int, int]) -> tuple[int, int] | None:
    """``a*pa + b*pb`` with one shared doubling chain (Shamir's trick)."""
    ja: _Jac = (pa[0], pa[1], 1)
    jb: _Jac = (pb[0], pb[1], 1)
    both = _jadd(ja, jb)
    acc = _INF
    for i in range(max(a.bit_length(), b.bit_length()) - 1, -1, -1):
        acc = _jdouble(acc)
        bits = ((a >> i) & 1, (b >> i) & 1)
        if bits == (1, 1):
            acc = _jadd(acc, both)
        elif bits == (1, 0):
            acc = _jadd(acc, ja)
        elif bits == (0, 1):
            acc = _jadd(acc, jb)
    return _affine(acc)


def recover_k256_pub(digest: bytes, signature: bytes) -> bytes:
    """The compressed public key that made the 65-byte ``r || s || recid`` over ``digest``.

    Raises :class:`KdfError` if the signature is malformed or recovers no key.
    """
    if len(signature) != 65 or len(digest) != 32:
        raise KdfError("a recoverable signature is 65 bytes over a 32-byte digest")
    r = int.from_bytes(signature[:32], "big")
    s = int.from_bytes(signature[32:64], "big")
    recid = signature[64]
    if recid > 3 or not (0 < r < _N and 0 < s < _N):
        raise KdfError("signature scalars or recovery id out of range")
    x = r + _N * (recid >> 1)
    if x >= _P:
        raise KdfError("recovery id points outside the field")
    y = pow((x * x * x + 7) % _P, (_P + 1) // 4, _P)
    if (y * y - (x * x * x + 7)) % _P:
        raise KdfError("r is not the x coordinate of a curve point")
    if y & 1 != recid & 1:
        y = _P - y
    z = int.from_bytes(digest, "big") % _N
    r_inv = pow(r, -1, _N)
    q = _mul2(s * r_inv % _N, (x, y), (-z * r_inv) % _N, _G)
    if q is None:
        raise KdfError("signature recovers the point at infinity")
    return bytes([2 + (q[1] & 1)]) + q[0].to_bytes(32, "big")


def _low_s(r: int, s: int) -> tuple[int, int, bool]:
    if s > _N // 2:
        return r, _N - s, True
    return r, s, False


def sign_k256(key: ec.EllipticCurvePrivateKey, data: bytes, *, prehashed: bool = False) -> bytes:
    """A 64-byte ``r || s`` ECDSA signature, RFC 6979 nonce, normalized to low S.

    ``prehashed``: ``data`` is already a 32-byte digest; otherwise SHA-256 of ``data`` is
    signed (as ``k256``'s ``Signer::sign`` does).
    """
    if prehashed and len(data) != 32:
        raise KdfError(f"a pre-hashed message is a 32-byte digest, got {len(data)} bytes")
    algo = Prehashed(hashes.SHA256()) if prehashed else hashes.SHA256()
    der = key.sign(data, ec.ECDSA(algo, deterministic_signing=True))
    r, s, _ = _low_s(*decode_dss_signature(der))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def sign_k256_recoverable(key: ec.EllipticCurvePrivateKey, digest: bytes) -> bytes:
    """``r || s || recid`` (65 bytes) over ``digest``, as k256 ``sign_digest_recoverable``."""
    sig64 = sign_k256(key, digest, prehashed=True)
    want = compressed_k256_pub(key)
    for recid in (0, 1):
        candidate = sig64 + bytes([recid])
        try:
            if recover_k256_pub(digest, candidate) == want:
                return candidate
        except KdfError:
            continue
    raise KdfError("could not determine the recovery id (r wrapped the curve order)")


def verify_k256(public_key: bytes, data: bytes, signature: bytes, *, prehashed: bool) -> bool:
    """Check a 64-byte low-S ``r || s`` signature; high S is refused as malformed."""
    if len(signature) != 64:
        raise KdfError("a secp256k1 signature is 64 raw bytes (r || s)")
    r = int.from_bytes(signature[:32], "big")
    s = int.from_bytes(signature[32:], "big")
    if s > _N // 2:
        raise KdfError("high-S signature refused (malleable encoding)")
    if prehashed and len(data) != 32:
        raise KdfError("a pre-hashed message is a 32-byte digest")
    try:
        pub = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256K1(), public_key)
    except ValueError as exc:
        raise KdfError(f"invalid secp256k1 public key: {exc}") from None
    algo = Prehashed(hashes.SHA256()) if prehashed else hashes.SHA256()
    try:
        pub.verify(encode_dss_signature(r, s), data, ec.ECDSA(algo))
    except Exception:  # InvalidSignature, or r/s out of range inside OpenSSL
        return False
    return True


def ed25519_key(seed: bytes) -> ed25519.Ed25519PrivateKey:
    """The Ed25519 key whose 32-byte seed is ``seed``."""
    return ed25519.Ed25519PrivateKey.from_private_bytes(seed)


def ed25519_pub(key: ed25519.Ed25519PrivateKey) -> bytes:
    """The raw 32-byte Ed25519 public key."""
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def kms_issued_signature(
    root_k256: ec.EllipticCurvePrivateKey, app_id: bytes, app_pub: bytes
) -> bytes:
    """The KMS's signature over an app's k256 key: ``dstack-kms-issued:`` ‖ app_id ‖ pub."""
    return sign_k256_recoverable(root_k256, keccak256(b"dstack-kms-issued:" + app_id + app_pub))
