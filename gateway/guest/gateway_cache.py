"""The CVM's gateway credentials: RA-TLS client certificate and WireGuard key pair, cached.

Upstream keeps them in ``/run/dstack/gateway-cache.json`` (0600)::

    {"client_cert": PEM chain, "client_cert_with_quote": PEM chain, "client_key": PEM,
     "cert_not_after": unix seconds, "wg_sk": base64, "wg_pk": base64}

We write the same file. The certificate is reused while more than ``RENEW_MARGIN`` (10 min)
of it remains, as upstream does; a new one gets a new key. The WireGuard pair is made once
(``wg genkey | wg pubkey`` equivalent) and kept across certificate renewals, so a renewal
does not change the tunnel. The file is saved *before* registering, so retries never ask
the TEE (or a KMS) again.

Our client certificate always carries the quote (RA-TLS: the gateway verifies it), so
``client_cert`` and ``client_cert_with_quote`` hold the same chain.

Certificates come from a :class:`CertIssuer`: :class:`TeeCertIssuer` builds one through the
TEE backend (self-signed, or signed by a local CA such as a non-KMS app CA);
:class:`KmsCertIssuer` sends a CSR with the attestation to the KMS's ``SignCert`` (dstack).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.attest import ratls
from gateway.guest.csr import CertConfigV2, CertSigningRequestV2
from gateway.guest.evidence import make_attestation
from gateway.guest.files import write_atomic
from gateway.guest.service import KmsSigner
from gateway.protocol.attestation import encode_attestation_v0, strip_attestation
from gateway.tee.base import TeeBackend
from gateway.tunnel.keys import WgKeyError, decode_key, generate_private_key, public_key

logger = logging.getLogger(__name__)

__all__ = [
    "CACHE_FILE",
    "CERT_VALIDITY",
    "RENEW_MARGIN",
    "CacheError",
    "CertIssuer",
    "GatewayKeyStore",
    "GatewayKeys",
    "KmsCertIssuer",
    "TeeCertIssuer",
]

CACHE_FILE = "gateway-cache.json"
RENEW_MARGIN = 600
CERT_VALIDITY = 864000  # 10 days, upstream's CERT_VALIDITY_SECS
SUBJECT = "dstack-guest-agent"
MAX_CACHE = 256 * 1024


class CacheError(RuntimeError):
    """Credentials could not be made or read; the message says which and why."""


@dataclass(frozen=True, slots=True)
class GatewayKeys:
    """The cached credentials (``__repr__`` hides the keys)."""

    client_cert: str
    client_key: str
    cert_not_after: int
    wg_sk: str
    wg_pk: str
    client_cert_with_quote: str = ""

    def __repr__(self) -> str:
        return f"GatewayKeys(wg_pk={self.wg_pk!r}, cert_not_after={self.cert_not_after})"

    def to_json(self) -> bytes:
        doc = {
            "client_cert": self.client_cert,
            "client_cert_with_quote": self.client_cert_with_quote or self.client_cert,
            "client_key": self.client_key,
            "cert_not_after": self.cert_not_after,
            "wg_sk": self.wg_sk,
            "wg_pk": self.wg_pk,
        }
        return json.dumps(doc, indent=2).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> GatewayKeys:
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict):
                raise ValueError("not an object")
            keys = cls(
                client_cert=_text(doc, "client_cert"),
                client_key=_text(doc, "client_key"),
                cert_not_after=int(doc["cert_not_after"]),
                wg_sk=_text(doc, "wg_sk"),
                wg_pk=_text(doc, "wg_pk"),
                client_cert_with_quote=str(doc.get("client_cert_with_quote") or ""),
            )
            decode_key(keys.wg_sk)
            if public_key(keys.wg_sk) != keys.wg_pk:
                raise ValueError("wg_pk is not the public key of wg_sk")
        except (ValueError, KeyError, TypeError, RecursionError, WgKeyError) as exc:
            raise CacheError(f"{CACHE_FILE} is unreadable ({exc}); delete it") from None
        return keys

    def usable(self, now: int, margin: int = RENEW_MARGIN) -> bool:
        return now + margin < self.cert_not_after


def _text(doc: dict[str, Any], name: str) -> str:
    value = doc[name]
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string")
    return value


class CertIssuer(Protocol):
    """Makes a client certificate chain (PEM, leaf first) for ``key``."""

    async def issue(self, key: ec.EllipticCurvePrivateKey, now: int) -> list[str]: ...


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


@dataclass(frozen=True, slots=True)
class TeeCertIssuer:
    """An RA-TLS client certificate built through the TEE backend.

    ``issuer`` (a CA certificate and key) signs it, so that a gateway that asks for client
    certificates of that CA at the TLS layer accepts the handshake; ``None`` self-signs.
    """

    tee: TeeBackend
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None
    vm_config: str = ""
    validity: int = CERT_VALIDITY

    async def issue(self, key: ec.EllipticCurvePrivateKey, now: int) -> list[str]:
        request = ratls.CertRequest(
            SUBJECT,
            special_usage=None,
            server_auth=False,
            client_auth=True,
            vm_config=self.vm_config,
            validity=dt.timedelta(seconds=self.validity),
            issuer=self.issuer,
        )
        cert = ratls.build_ratls_cert(
            key, self.tee, request, now=dt.datetime.fromtimestamp(now, dt.UTC)
        )
        return [_pem(cert)] + ([_pem(self.issuer[0])] if self.issuer is not None else [])


@dataclass(frozen=True, slots=True)
class KmsCertIssuer:
    """dstack's way: a CSR carrying our attestation, signed by the KMS (``SignCert``).

    ``ext_quote`` asks the KMS to copy the attestation into the certificate, which is what
    a gateway that verifies evidence needs (upstream's ``client_cert_with_quote``).
    """

    tee: TeeBackend
    signer: KmsSigner
    vm_config: str = ""
    validity: int = CERT_VALIDITY

    async def issue(self, key: ec.EllipticCurvePrivateKey, now: int) -> list[str]:
        spki = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        att = make_attestation(self.tee, ratls.ratls_report_data(spki), self.vm_config)
        csr = CertSigningRequestV2(
            pubkey=spki,
            config=CertConfigV2(
                subject=SUBJECT,
                usage_client_auth=True,
                ext_quote=True,
                ext_app_info=True,
                not_after=now + self.validity,
            ),
            attestation=encode_attestation_v0(strip_attestation(att)),
        )
        return await self.signer(csr, csr.sign(key))


class GatewayKeyStore:
    """``gateway-cache.json`` in ``directory`` (0600, written atomically)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @property
    def path(self) -> Path:
        return self.directory / CACHE_FILE

    def load(self) -> GatewayKeys | None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        if len(raw) > MAX_CACHE:
            raise CacheError(f"{self.path} is larger than {MAX_CACHE} bytes; delete it")
        return GatewayKeys.from_json(raw)

    def save(self, keys: GatewayKeys) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(self.path, keys.to_json(), 0o600)

    async def get_or_create(self, issuer: CertIssuer, now: int) -> GatewayKeys:
        """The cached credentials, renewing the certificate when it is about to expire.

        An unreadable cache is replaced (it holds nothing that cannot be made again, but
        the WireGuard key then changes: the gateway updates the peer on re-registration).
        """
        try:
            cached = self.load()
        except CacheError as exc:
            logger.warning("%s; making new credentials", exc)
            cached = None
        if cached is not None and cached.usable(now):
            return cached
        wg_sk = cached.wg_sk if cached is not None else generate_private_key()
        key = ec.generate_private_key(ec.SECP256R1())
        chain = await issuer.issue(key, now)
        try:
            leaf = x509.load_pem_x509_certificate(chain[0].encode())
        except (ValueError, IndexError) as exc:
            raise CacheError(
                f"the certificate issuer returned no usable certificate: {exc}"
            ) from None
        keys = GatewayKeys(
            client_cert="".join(chain),
            client_cert_with_quote="".join(chain),
            client_key=key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ).decode(),
            cert_not_after=int(leaf.not_valid_after_utc.timestamp()),
            wg_sk=wg_sk,
            wg_pk=public_key(wg_sk),
        )
        self.save(keys)
        logger.info("new gateway client certificate, valid until %d", keys.cert_not_after)
        return keys
