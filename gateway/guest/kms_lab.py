"""A small dstack-compatible KMS for the lab and the tests.

It speaks the part of the dstack KMS protocol a CVM uses at boot (``/prpc/<Method>``, JSON):

- ``GetTempCaCert`` (plain TLS): the temporary CA a CVM signs its RA-TLS client cert with.
  Its key is public by design: the trust comes from the attestation inside the client
  certificate, not from the CA.
- ``GetAppKey`` (mutual TLS with that client cert): verifies the certificate's attestation
  (report_data bound to the certificate key, the quote with dcap-qvl under the configured
  root, RTMR3 replayed from the runtime events), reads the app identity from the events and
  derives the app's keys exactly as upstream's KMS does:

  - ``env_crypt_key  = derive_dh_secret(root_ca_key, [app_id, "env-encrypt-key"])``
  - ``disk_crypt_key = derive_dh_secret(root_ca_key, [app_id, instance_id, "app-disk-crypt-key"])``
  - ``k256_key = HKDF(root_k256, app_id || "app-key")``, signed ``dstack-kms-issued``.

  The lab KMS also returns the app CA (``derive_p256(root_ca_key, [app_id, "app-ca"])``)
  as ``app_ca_cert``/``app_ca_key``, so that the guest can sign GetTlsKey certificates
  itself (upstream's KMS signs them through ``SignCert`` instead).
- ``GetAppEnvEncryptPubKey``: the X25519 key deployers encrypt ``.encrypted-env`` to, with
  the KMS's legacy and v1 signatures; ``GetMeta``.

Policy: ``allowed_compose_hashes`` (empty = any) and the quote verifier's TCB policy.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
import os
import ssl
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.attest import eventlog, ratls
from gateway.attest.evidence import EvidenceError
from gateway.attest.quote import Collateral, QuoteVerifier
from gateway.guest import certs, csr, envcrypt, kdf, prpc
from gateway.guest.files import write_atomic
from gateway.guest.keccak import keccak256
from gateway.protocol import appinfo
from gateway.protocol.attestation import decode_attestation
from gateway.protocol.errors import CodecError

__all__ = ["KmsRoot", "LabKms", "create_kms_app", "kms_ssl_context"]

logger = logging.getLogger(__name__)


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def _ca(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    usage: bytes,
    path_length: int,
    app_id: bytes | None = None,
) -> x509.Certificate:
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Dstack"),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    issuer_name, issuer_key = issuer if issuer else (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(int.from_bytes(hashlib.sha256(certs.spki_der(key)).digest()[:15], "big"))
        .not_valid_before(certs.DEFAULT_NOT_BEFORE)
        .not_valid_after(dt.datetime(4096, 1, 1, tzinfo=dt.UTC))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(
            x509.UnrecognizedExtension(certs.OID_SPECIAL_USAGE, certs.der_octet_string(usage)),
            critical=False,
        )
    )
    if app_id is not None:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(certs.OID_APP_ID, certs.der_octet_string(app_id)),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


@dataclass(frozen=True, slots=True)
class KmsRoot:
    """The KMS's long-lived secrets: the P-256 root CA and the secp256k1 root key."""

    ca_key: ec.EllipticCurvePrivateKey
    ca_cert: x509.Certificate
    k256_scalar: bytes

    def __repr__(self) -> str:
        return "KmsRoot(<secret>)"

    @classmethod
    def create(
        cls, ca_key: ec.EllipticCurvePrivateKey | None = None, k256_scalar: bytes | None = None
    ) -> KmsRoot:
        key = ca_key or ec.generate_private_key(ec.SECP256R1())
        scalar = k256_scalar or kdf.p256_scalar(ec.generate_private_key(ec.SECP256K1()))
        return cls(key, _ca("Dstack KMS CA", key, None, b"kms:ca", 2), scalar)

    @classmethod
    def load_or_create(cls, directory: Path) -> KmsRoot:
        """Keys in ``directory`` (0600 files), created on first use."""
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        key_path, k256_path = directory / "root-ca.key", directory / "root-k256.key"
        cert_path = directory / "root-ca.pem"
        if key_path.exists() and k256_path.exists() and cert_path.exists():
            key = serialization.load_pem_private_key(key_path.read_bytes(), None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{key_path} is not an EC private key")
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            return cls(key, cert, bytes.fromhex(k256_path.read_text().strip()))
        root = cls.create()
        write_atomic(key_path, _key_pem(root.ca_key).encode())
        write_atomic(k256_path, root.k256_scalar.hex().encode())
        write_atomic(cert_path, _pem(root.ca_cert).encode(), 0o644)
        return root

    @property
    def spki(self) -> bytes:
        return certs.spki_der(self.ca_key)

    @property
    def k256_pub(self) -> bytes:
        return kdf.compressed_k256_pub(kdf.k256_key(self.k256_scalar))


@dataclass
class LabKms:
    """The KMS's decisions, apart from HTTP (verify evidence, derive keys)."""

    root: KmsRoot
    verifier: QuoteVerifier
    collateral: Callable[[bytes], Collateral]
    allowed_compose_hashes: frozenset[bytes] = frozenset()
    gateway_app_id: str = "any"
    temp_ca_key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    _temp_ca_cert: x509.Certificate | None = None

    @property
    def temp_ca_cert(self) -> x509.Certificate:
        if self._temp_ca_cert is None:
            self._temp_ca_cert = _ca(
                "Dstack KMS Temp CA", self.temp_ca_key, None, b"kms:temp-ca", 0
            )
        return self._temp_ca_cert

    def app_ca(self, app_id: bytes) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = kdf.derive_p256(kdf.p256_scalar(self.root.ca_key), [app_id, b"app-ca"])
        cert = _ca(
            "Dstack App CA",
            key,
            (self.root.ca_cert.subject, self.root.ca_key),
            b"app:ca",
            0,
            app_id,
        )
        return key, cert

    def env_crypt_key(self, app_id: bytes) -> bytes:
        return kdf.derive_dh_secret(self.root.ca_key, [app_id, b"env-encrypt-key"])

    async def verify_client(self, cert_der: bytes) -> eventlog.AppIdentity:
        """Verify an RA-TLS client certificate with the attestation core.

        ``verify_ratls_cert`` checks the key binding, the quote's report_data, the RTMR3
        replay and the quote (dcap-qvl under the configured root and TCB policy). Then the
        KMS's own policy: an app id and compose hash must be measured, and the compose hash
        allowed if an allow-list is set.
        """
        try:
            verified = await asyncio.to_thread(
                ratls.verify_ratls_cert,
                cert_der,
                collateral=self.collateral,
                root_ca_der=self.verifier.root_ca_der,
                now=self.verifier.now(),
                tcb_policy=self.verifier.policy,
            )
        except EvidenceError as exc:
            raise prpc.RpcError(f"attestation rejected ({exc.reason.value}): {exc}", 403) from None
        except ValueError as exc:  # an unparsable certificate
            raise prpc.RpcError(f"bad client certificate: {exc}") from None
        ident = verified.identity
        if len(ident.app_id) != 20 or len(ident.compose_hash) != 32:
            raise prpc.RpcError("the attested events carry no app-id/compose-hash", 403)
        if self.allowed_compose_hashes and ident.compose_hash not in self.allowed_compose_hashes:
            raise prpc.RpcError(f"compose hash {ident.compose_hash.hex()} is not allowed", 403)
        return ident

    def app_keys(self, ident: eventlog.AppIdentity, vm_config: str) -> dict[str, Any]:
        app_id = ident.app_id
        root = self.root
        k256 = kdf.derive_key(root.k256_scalar, [app_id, b"app-key"])
        app_pub = kdf.compressed_k256_pub(kdf.k256_key(k256))
        os_image_hash = ""
        try:
            vm = json.loads(vm_config) if vm_config else {}
            os_image_hash = str(vm.get("os_image_hash", "")) if isinstance(vm, dict) else ""
            bytes.fromhex(os_image_hash)
        except (ValueError, RecursionError):
            os_image_hash = ""
        return {
            "ca_cert": _pem(root.ca_cert),
            "disk_crypt_key": kdf.derive_dh_secret(
                root.ca_key, [app_id, ident.instance_id, b"app-disk-crypt-key"]
            ).hex(),
            "env_crypt_key": self.env_crypt_key(app_id).hex(),
            "k256_key": k256.hex(),
            "k256_signature": kdf.kms_issued_signature(
                kdf.k256_key(root.k256_scalar), app_id, app_pub
            ).hex(),
            "tproxy_app_id": self.gateway_app_id,
            "gateway_app_id": self.gateway_app_id,
            "os_image_hash": os_image_hash,
        }

    async def sign_cert(self, csr_bytes: bytes, signature: bytes) -> list[str]:
        """``SignCert``: verify the CSR and its attestation, issue from the app's CA."""
        try:
            req = csr.decode_csr(csr_bytes)
            att = decode_attestation(req.attestation)
        except CodecError as exc:
            raise prpc.RpcError(f"invalid CSR: {exc}") from None
        if req.confirm != csr.CONFIRM:
            raise prpc.RpcError("invalid CSR: wrong confirm word")
        if not req.verify(signature):
            raise prpc.RpcError("the CSR signature does not verify with its public key", 403)
        try:
            verified = await asyncio.to_thread(
                ratls.verify_attestation,
                att,
                certs.ratls_report_data(req.pubkey),
                collateral=self.collateral,
                root_ca_der=self.verifier.root_ca_der,
                now=self.verifier.now(),
                tcb_policy=self.verifier.policy,
            )
        except EvidenceError as exc:
            raise prpc.RpcError(f"attestation rejected ({exc.reason.value}): {exc}", 403) from None
        ident = verified.identity
        if len(ident.app_id) != 20:
            raise prpc.RpcError("the attested events carry no app-id", 403)
        pub = serialization.load_der_public_key(req.pubkey)
        if not isinstance(pub, ec.EllipticCurvePublicKey):
            raise prpc.RpcError("only EC keys are signed")
        c = req.config
        info = None
        if c.ext_app_info:
            info = appinfo.encode_app_info(
                appinfo.AppInfo(
                    app_id=ident.app_id,
                    compose_hash=ident.compose_hash,
                    instance_id=ident.instance_id,
                    device_id=hashlib.sha256(b"").digest(),
                    mr_system=verified.mr_system,
                    mr_aggregated=verified.mr_aggregated,
                    os_image_hash=ident.os_image_hash,
                    key_provider_info=ident.key_provider_payload,
                )
            )
        ca_key, ca_cert = self.app_ca(ident.app_id)
        try:
            leaf = certs.issue_leaf(
                certs.LeafRequest(
                    subject=c.subject,
                    alt_names=c.subject_alt_names,
                    usage_server_auth=c.usage_server_auth,
                    usage_client_auth=c.usage_client_auth,
                    not_before=c.not_before,
                    not_after=c.not_after,
                    attestation=req.attestation if c.ext_quote else None,
                    app_info=info,
                    app_id=ident.app_id,
                ),
                pub,
                ca_key,
                ca_cert,
                dt.datetime.now(dt.UTC),
                int.from_bytes(os.urandom(15), "big") + 1,
            )
        except ValueError as exc:  # a name or time X.509 cannot carry
            raise prpc.RpcError(f"cannot issue this certificate: {exc}") from None
        return [_pem(leaf), _pem(ca_cert), _pem(self.root.ca_cert)]

    def env_pubkey(self, app_id: bytes, now: int) -> dict[str, Any]:
        pub = envcrypt.env_public_key(self.env_crypt_key(app_id))
        root = kdf.k256_key(self.root.k256_scalar)
        prefix = b"dstack-env-encrypt-pubkey:"
        legacy = kdf.sign_k256_recoverable(root, keccak256(prefix + app_id + pub))
        v1 = kdf.sign_k256_recoverable(
            root, keccak256(prefix + app_id + now.to_bytes(8, "big") + pub)
        )
        return {
            "public_key": pub.hex(),
            "signature": legacy.hex(),
            "timestamp": now,
            "signature_v1": v1.hex(),
        }


def kms_ssl_context(
    kms: LabKms, hosts: tuple[str, ...] = ("localhost", "127.0.0.1")
) -> ssl.SSLContext:
    """Server TLS: a ``kms:rpc`` cert from the root CA; client certs from the temp CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = certs.issue_leaf(
        certs.LeafRequest(subject="Dstack KMS", alt_names=hosts, usage_server_auth=True),
        key,
        kms.root.ca_key,
        kms.root.ca_cert,
        dt.datetime.now(dt.UTC),
        int.from_bytes(hashlib.sha256(certs.spki_der(key)).digest()[:15], "big"),
    )
    # mark the leaf kms:rpc (issue_leaf writes app:custom): rebuild that one extension
    builder = x509.CertificateBuilder().subject_name(leaf.subject).issuer_name(leaf.issuer)
    builder = builder.public_key(key.public_key()).serial_number(leaf.serial_number)
    builder = builder.not_valid_before(leaf.not_valid_before_utc).not_valid_after(
        leaf.not_valid_after_utc
    )
    for ext in leaf.extensions:
        if ext.oid == certs.OID_SPECIAL_USAGE:
            continue
        builder = builder.add_extension(ext.value, ext.critical)
    builder = builder.add_extension(
        x509.UnrecognizedExtension(certs.OID_SPECIAL_USAGE, certs.der_octet_string(b"kms:rpc")),
        False,
    )
    leaf = builder.sign(kms.root.ca_key, hashes.SHA256())
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    with tempfile.TemporaryDirectory() as tmp:
        chain, keyfile = Path(tmp) / "chain.pem", Path(tmp) / "key.pem"
        chain.write_text(_pem(leaf) + _pem(kms.root.ca_cert))
        keyfile.write_text(_key_pem(key))
        keyfile.chmod(0o600)
        ctx.load_cert_chain(chain, keyfile)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.load_verify_locations(cadata=_pem(kms.temp_ca_cert))
    return ctx


KMS_KEY = web.AppKey("lab_kms", LabKms)


def create_kms_app(kms: LabKms, clock: Callable[[], float] = time.time) -> web.Application:
    """The KMS RPC app (serve it with :func:`kms_ssl_context`)."""

    async def get_temp_ca_cert(request: web.Request, args: prpc.Args) -> Any:
        return {
            "temp_ca_cert": _pem(kms.temp_ca_cert),
            "temp_ca_key": _key_pem(kms.temp_ca_key),
            "ca_cert": _pem(kms.root.ca_cert),
        }

    async def get_app_key(request: web.Request, args: prpc.Args) -> Any:
        ssl_obj = request.transport.get_extra_info("ssl_object") if request.transport else None
        der = ssl_obj.getpeercert(binary_form=True) if ssl_obj is not None else None
        if not der:
            raise prpc.RpcError("GetAppKey needs an RA-TLS client certificate", 401)
        ident = await kms.verify_client(der)
        logger.info(
            "issuing keys to app %s instance %s", ident.app_id.hex(), ident.instance_id.hex()
        )
        return kms.app_keys(ident, prpc.get_str(args, "vm_config"))

    async def get_env_pubkey(request: web.Request, args: prpc.Args) -> Any:
        app_id = prpc.get_bytes(args, "app_id", 20)
        if len(app_id) != 20:
            raise prpc.RpcError("app_id must be 20 bytes")
        return kms.env_pubkey(app_id, int(clock()))

    async def get_meta(request: web.Request, args: prpc.Args) -> Any:
        return {
            "ca_cert": _pem(kms.root.ca_cert),
            "allow_any_upgrade": not kms.allowed_compose_hashes,
            "k256_pubkey": kms.root.k256_pub.hex(),
            "is_dev": True,
            "gateway_app_id": kms.gateway_app_id,
        }

    async def sign_cert(request: web.Request, args: prpc.Args) -> Any:
        chain = await kms.sign_cert(
            prpc.get_bytes(args, "csr", 256 * 1024), prpc.get_bytes(args, "signature", 1024)
        )
        return {"certificate_chain": chain}

    methods = {
        "SignCert": sign_cert,
        "GetTempCaCert": get_temp_ca_cert,
        "GetAppKey": get_app_key,
        "GetAppEnvEncryptPubKey": get_env_pubkey,
        "GetMeta": get_meta,
    }

    async def handler(request: web.Request) -> web.StreamResponse:
        name = request.match_info["method"].removeprefix("KMS.")
        method = methods.get(name)
        if method is None:
            return prpc.error_response(f"Service not found: {name}")

        async def bound(args: prpc.Args) -> Any:
            return await method(request, args)

        return await prpc.dispatch(request, {name: bound}, name)

    app = web.Application(client_max_size=prpc.MAX_BODY)
    app[KMS_KEY] = kms
    app.router.add_routes([web.post("/prpc/{method}", handler), web.get("/prpc/{method}", handler)])
    return app
