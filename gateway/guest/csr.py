"""dstack's certificate signing request (``CertSigningRequestV2``), SCALE, sans-IO.

Layout (``ra-tls/src/cert.rs``)::

    confirm: String ("please sign cert:") || pubkey: Vec<u8> (SPKI DER) ||
    config: CertConfigV2 || attestation: VersionedAttestation (raw, to the end)

    CertConfigV2 = org_name: Option<String> || subject: String ||
        subject_alt_names: Vec<String> || usage_server_auth: bool ||
        usage_client_auth: bool || ext_quote: bool || ext_app_info: bool ||
        not_before: Option<u64> || not_after: Option<u64>

The requester signs the encoded bytes with the certificate key (ECDSA P-256 SHA-256,
ASN.1 DER); the KMS checks that signature, the confirm word and the attestation bound to
``pubkey`` before it issues a certificate from the app's CA (``SignCert``).
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.protocol import scale
from gateway.protocol.errors import CodecError

__all__ = ["CONFIRM", "CertConfigV2", "CertSigningRequestV2", "decode_csr", "encode_csr"]

CONFIRM = "please sign cert:"
MAX_NAMES = 64
MAX_STR = 4096


@dataclass(frozen=True, slots=True)
class CertConfigV2:
    subject: str
    org_name: str | None = None
    subject_alt_names: tuple[str, ...] = ()
    usage_server_auth: bool = False
    usage_client_auth: bool = False
    ext_quote: bool = False
    ext_app_info: bool = False
    not_before: int | None = None
    not_after: int | None = None


@dataclass(frozen=True, slots=True)
class CertSigningRequestV2:
    pubkey: bytes  # SubjectPublicKeyInfo DER
    config: CertConfigV2
    attestation: bytes  # VersionedAttestation bytes
    confirm: str = CONFIRM

    def encode(self) -> bytes:
        return encode_csr(self)

    def sign(self, key: ec.EllipticCurvePrivateKey) -> bytes:
        """DER ECDSA-P256-SHA256 signature over the encoded request."""
        return key.sign(self.encode(), ec.ECDSA(hashes.SHA256()))

    def verify(self, signature: bytes) -> bool:
        """The signature is by the key in ``pubkey`` (P-256 only)."""
        try:
            pub = serialization.load_der_public_key(self.pubkey)
        except ValueError:
            return False
        if not isinstance(pub, ec.EllipticCurvePublicKey) or not isinstance(
            pub.curve, ec.SECP256R1
        ):
            return False
        try:
            pub.verify(signature, self.encode(), ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            return False
        return True


def encode_csr(csr: CertSigningRequestV2) -> bytes:
    c = csr.config
    return b"".join(
        [
            scale.encode_str(csr.confirm),
            scale.encode_bytes(csr.pubkey),
            scale.encode_option(c.org_name, scale.encode_str),
            scale.encode_str(c.subject),
            scale.encode_vec(list(c.subject_alt_names), scale.encode_str),
            scale.encode_bool(c.usage_server_auth),
            scale.encode_bool(c.usage_client_auth),
            scale.encode_bool(c.ext_quote),
            scale.encode_bool(c.ext_app_info),
            scale.encode_option(c.not_before, scale.encode_u64),
            scale.encode_option(c.not_after, scale.encode_u64),
            csr.attestation,
        ]
    )


def _str(r: scale.Reader, what: str) -> str:
    return r.read_str(what, MAX_STR)


def _u64(r: scale.Reader, what: str) -> int:
    return r.read_u64(what)


def decode_csr(data: bytes) -> CertSigningRequestV2:
    """Decode a request; raises :class:`CodecError` naming the field."""
    r = scale.Reader(data)
    confirm = r.read_str("csr.confirm", 64)
    pubkey = r.read_bytes("csr.pubkey", MAX_STR)
    config = CertConfigV2(
        org_name=r.read_option(_str, "csr.config.org_name"),
        subject=_str(r, "csr.config.subject"),
        subject_alt_names=tuple(r.read_vec(_str, "csr.config.subject_alt_names", MAX_NAMES)),
        usage_server_auth=r.read_bool("csr.config.usage_server_auth"),
        usage_client_auth=r.read_bool("csr.config.usage_client_auth"),
        ext_quote=r.read_bool("csr.config.ext_quote"),
        ext_app_info=r.read_bool("csr.config.ext_app_info"),
        not_before=r.read_option(_u64, "csr.config.not_before"),
        not_after=r.read_option(_u64, "csr.config.not_after"),
    )
    attestation = r.read_fixed(r.remaining, "csr.attestation")
    if not attestation:
        raise CodecError("csr.attestation: missing")
    return CertSigningRequestV2(
        pubkey=pubkey, config=config, attestation=attestation, confirm=confirm
    )
