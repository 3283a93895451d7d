"""The guest agent's operations as a plain object (the aiohttp apps only decode/encode).

Every key it hands out derives from the boot's ``AppKeys``; every quote comes from the TEE
backend, and the identity it reports (app id, compose hash, instance id, key provider) is
read back from the runtime events in RTMR3, so Info can never claim something the quote
does not back. Blocking TEE calls run in a thread so one slow quote does not stall other
clients (the SDK gives up after 3 s).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import json
import logging
import os
import secrets
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from gateway.attest import eventlog
from gateway.guest import certs, evidence, kdf
from gateway.guest.csr import CertConfigV2, CertSigningRequestV2
from gateway.guest.identity import AppCompose
from gateway.guest.keccak import keccak256
from gateway.guest.keys import AppKeys, KeyProviderError
from gateway.guest.prpc import RpcError
from gateway.protocol import appinfo
from gateway.protocol.attestation import (
    Attestation,
    AttestedEvent,
    TdxEvent,
    encode_attestation_v0,
    encode_event_log_json,
    strip_attestation,
)
from gateway.tee.base import REPORT_DATA_SIZE, RuntimeEvent, TeeBackend, TeeError

logger = logging.getLogger(__name__)

__all__ = ["AGENT_VERSION", "AgentService", "GuestState", "KmsSigner"]

# (csr, DER signature) -> PEM chain, from the KMS's SignCert
KmsSigner = Callable[[CertSigningRequestV2, bytes], Awaitable[list[str]]]

AGENT_VERSION = "0.5.8"  # the dstack guest-agent API level this agent implements
AGENT_REV = "gateway-guest"
MAX_CERT_TIME = 253402300799  # 9999-12-31T23:59:59Z, the last X.509 GeneralizedTime
MAX_EVENT_NAME = 256
MAX_EVENT_PAYLOAD = 64 * 1024
_EMPTY_SHA256 = hashlib.sha256(b"").digest()


@dataclass(frozen=True, slots=True)
class GuestState:
    """What the boot established and the agent serves from."""

    compose: AppCompose
    keys: AppKeys
    vm_config: str = ""
    os_image_hash: bytes = b""
    cloud_vendor: str = ""
    cloud_product: str = ""


def _pad_report_data(data: bytes) -> bytes:
    if len(data) > REPORT_DATA_SIZE:
        raise RpcError("Report data is too long, it should be at most 64 bytes")
    return data.ljust(REPORT_DATA_SIZE, b"\0")


class AgentService:
    """GetQuote, GetKey, GetTlsKey, Info, EmitEvent, Attest, Sign, Verify, Version."""

    def __init__(
        self,
        state: GuestState,
        tee: TeeBackend,
        *,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        rng: Callable[[int], bytes] = os.urandom,
        kms_signer: KmsSigner | None = None,
        boot_log: tuple[TdxEvent, ...] = (),
    ) -> None:
        self._boot_log = boot_log
        self.state = state
        self.tee = tee
        self._kms_signer = kms_signer
        self._app_cert = ""
        self._clock = clock
        self._rng = rng
        # one quote and the log it is shown with must agree: no emit between the two
        self._evidence_lock = threading.Lock()

    # --- evidence -------------------------------------------------------------------------

    def runtime_events(self) -> tuple[AttestedEvent, ...]:
        return evidence.runtime_events(self.tee)

    def event_log(self) -> tuple[TdxEvent, ...]:
        """The full log: boot events, then runtime events with their true digests.

        Upstream empties imr-3 digests in GetQuote, which breaks SDK 0.5.4's
        ``replay_rtmrs``; verifiers recompute runtime digests anyway, so we keep them.
        """
        return evidence.event_log(self.tee, self._boot_log)

    def _quote_and_log(self, report_data: bytes) -> tuple[bytes, tuple[TdxEvent, ...]]:
        with self._evidence_lock:
            return self.tee.get_quote(report_data), self.event_log()

    async def _quote(self, report_data: bytes) -> tuple[bytes, tuple[TdxEvent, ...]]:
        try:
            return await asyncio.to_thread(self._quote_and_log, report_data)
        except TeeError as exc:
            raise RpcError(f"failed to get quote: {exc}") from None

    def _locked_attestation(self, report_data: bytes) -> Attestation:
        with self._evidence_lock:
            return evidence.make_attestation(
                self.tee, report_data, self.state.vm_config, self._boot_log
            )

    async def attestation(self, report_data: bytes) -> Attestation:
        """A fresh ``VersionedAttestation`` (full event log) for 64-byte ``report_data``."""
        try:
            return await asyncio.to_thread(self._locked_attestation, report_data)
        except TeeError as exc:
            raise RpcError(f"failed to get quote: {exc}") from None

    def identity(self) -> eventlog.AppIdentity:
        return eventlog.decode_app_identity(self.runtime_events())

    def _mr_aggregated(self) -> bytes:
        rtmrs = self.tee.rtmrs()
        return eventlog.mr_aggregated(self.tee.mrtd(), rtmrs, bytes(48), bytes(48), bytes(48))

    # --- dstack.sock ----------------------------------------------------------------------

    async def get_quote(self, report_data: bytes) -> dict[str, Any]:
        rd = _pad_report_data(report_data)
        quote, log = await self._quote(rd)
        return {
            "quote": quote.hex(),
            "event_log": encode_event_log_json(log),
            "report_data": rd.hex(),
            "vm_config": self.state.vm_config,
        }

    async def attest(self, report_data: bytes) -> dict[str, Any]:
        att = await self.attestation(_pad_report_data(report_data))
        return {"attestation": encode_attestation_v0(att).hex()}

    def tcb_info(self) -> dict[str, Any]:
        rtmrs = self.tee.rtmrs()
        ident = self.identity()
        return {
            "app_compose": self.state.compose.text,
            "compose_hash": ident.compose_hash.hex(),
            "device_id": _EMPTY_SHA256.hex(),
            "event_log": [e.to_json() for e in self.event_log()],
            "mr_aggregated": self._mr_aggregated().hex(),
            "mrtd": self.tee.mrtd().hex(),
            "os_image_hash": self.state.os_image_hash.hex(),
            "rtmr0": rtmrs[0].hex(),
            "rtmr1": rtmrs[1].hex(),
            "rtmr2": rtmrs[2].hex(),
            "rtmr3": rtmrs[3].hex(),
        }

    def info(self, *, external: bool = False) -> dict[str, Any]:
        """AppInfo; ``external`` hides tcb_info and vm_config unless app-compose allows."""
        ident = self.identity()
        public_tcb = self.state.compose.public_tcbinfo or not external
        return {
            "app_id": ident.app_id.hex(),
            "instance_id": ident.instance_id.hex(),
            "app_cert": self._app_cert,
            "tcb_info": json.dumps(self.tcb_info(), indent=2, sort_keys=True) if public_tcb else "",
            "app_name": self.state.compose.name,
            "device_id": _EMPTY_SHA256.hex(),
            "mr_aggregated": self._mr_aggregated().hex(),
            "os_image_hash": self.state.os_image_hash.hex(),
            "key_provider_info": ident.key_provider_payload.decode("utf-8", "replace"),
            "compose_hash": ident.compose_hash.hex(),
            "vm_config": self.state.vm_config if public_tcb else "",
            "cloud_vendor": self.state.cloud_vendor,
            "cloud_product": self.state.cloud_product,
        }

    async def emit_event(self, name: str, payload: bytes) -> None:
        if not name or len(name.encode()) > MAX_EVENT_NAME:
            raise RpcError(f"event name must be 1..{MAX_EVENT_NAME} bytes")
        if len(payload) > MAX_EVENT_PAYLOAD:
            raise RpcError(f"event payload is larger than {MAX_EVENT_PAYLOAD} bytes")

        def emit() -> None:
            with self._evidence_lock:
                self.tee.emit_event(RuntimeEvent(name, payload))

        try:
            await asyncio.to_thread(emit)
        except TeeError as exc:
            raise RpcError(f"failed to emit event: {exc}") from None

    def _derived_pub(self, derived: bytes, algorithm: str) -> bytes:
        if algorithm in ("secp256k1", "k256", ""):
            return kdf.compressed_k256_pub(kdf.k256_key(derived))
        if algorithm == "ed25519":
            return kdf.ed25519_pub(kdf.ed25519_key(derived))
        if algorithm == "secp256k1_prehashed":
            raise RpcError("secp256k1_prehashed is a signing mode, not a key algorithm")
        raise RpcError(f"Unsupported algorithm: {algorithm}")

    def get_key(self, path: str, purpose: str, algorithm: str) -> dict[str, Any]:
        """HKDF(k256_key, path); chain = [app sig over "purpose:pubhex", KMS sig]."""
        keys = self.state.keys
        derived = kdf.derive_key(keys.k256_key, [path.encode()])
        pub = self._derived_pub(derived, algorithm)
        app_key = kdf.k256_key(keys.k256_key)
        sig0 = kdf.sign_k256_recoverable(app_key, keccak256(f"{purpose}:{pub.hex()}".encode()))
        return {"key": derived.hex(), "signature_chain": [sig0.hex(), keys.k256_signature.hex()]}

    def sign(self, algorithm: str, data: bytes) -> dict[str, Any]:
        """Sign with the key of GetKey(path "vms", purpose "signing")."""
        keys = self.state.keys
        derived = kdf.derive_key(keys.k256_key, [b"vms"])
        if algorithm == "ed25519":
            ed = kdf.ed25519_key(derived)
            pub, signature = kdf.ed25519_pub(ed), ed.sign(data)
        elif algorithm in ("secp256k1", "secp256k1_prehashed"):
            k = kdf.k256_key(derived)
            pub = kdf.compressed_k256_pub(k)
            try:
                signature = kdf.sign_k256(k, data, prehashed=algorithm == "secp256k1_prehashed")
            except kdf.KdfError as exc:
                raise RpcError(str(exc)) from None
        else:
            raise RpcError(f"Unsupported algorithm: {algorithm}")
        app_sig = kdf.sign_k256_recoverable(
            kdf.k256_key(keys.k256_key), keccak256(f"signing:{pub.hex()}".encode())
        )
        return {
            "signature": signature.hex(),
            "signature_chain": [signature.hex(), app_sig.hex(), keys.k256_signature.hex()],
            "public_key": pub.hex(),
        }

    def verify(self, algorithm: str, data: bytes, signature: bytes, public_key: bytes) -> bool:
        if algorithm == "ed25519":
            if len(public_key) != 32 or len(signature) != 64:
                raise RpcError("ed25519 needs a 32-byte public key and a 64-byte signature")
            try:
                ed25519.Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
            except InvalidSignature:
                return False
            return True
        if algorithm in ("secp256k1", "k256", "secp256k1_prehashed"):
            try:
                return kdf.verify_k256(
                    public_key, data, signature, prehashed=algorithm == "secp256k1_prehashed"
                )
            except kdf.KdfError as exc:
                raise RpcError(str(exc)) from None
        raise RpcError(f"Unsupported algorithm: {algorithm}")

    async def get_tls_key(
        self,
        req: certs.LeafRequest,
        *,
        usage_ra_tls: bool,
        with_app_info: bool,
        key: ec.EllipticCurvePrivateKey | None = None,
    ) -> dict[str, Any]:
        """A fresh P-256 key and a certificate chain from the app CA."""
        if len(req.subject) > 64:
            raise RpcError("subject must be at most 64 characters (X.509 common name)")
        for name, value in (("not_before", req.not_before), ("not_after", req.not_after)):
            if value is not None and value > MAX_CERT_TIME:
                raise RpcError(f"{name} must be a unix time before the year 10000")
        if req.not_before is not None and req.not_after is not None:
            if req.not_before >= req.not_after:
                raise RpcError("not_before must be earlier than not_after")
        if key is None:
            key = kdf.derive_p256(self._rng(32), [])
        spki = certs.spki_der(key)
        attestation = None
        if usage_ra_tls:
            att = await self.attestation(certs.ratls_report_data(spki))
            attestation = encode_attestation_v0(strip_attestation(att))
        info = None
        if with_app_info:
            ident = self.identity()
            rtmrs = self.tee.rtmrs()
            info = appinfo.encode_app_info(
                appinfo.AppInfo(
                    app_id=ident.app_id,
                    compose_hash=ident.compose_hash,
                    instance_id=ident.instance_id,
                    device_id=_EMPTY_SHA256,
                    mr_system=eventlog.mr_system(
                        self.tee.mrtd(), rtmrs, ident.key_provider_payload
                    ),
                    mr_aggregated=self._mr_aggregated(),
                    os_image_hash=self.state.os_image_hash,
                    key_provider_info=ident.key_provider_payload,
                )
            )
        keys = self.state.keys
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        if not keys.ca_key:
            chain = await self._sign_at_kms(req, key, attestation, usage_ra_tls, with_app_info)
            return {"key": key_pem, "certificate_chain": chain}
        try:
            leaf = certs.issue_leaf(
                replace(req, attestation=attestation, app_info=info),
                key,
                keys.ca_private_key(),
                keys.signing_ca_cert(),
                self._clock(),
                secrets.randbits(127) + 1,
            )
        except ValueError as exc:  # a name X.509 cannot carry
            raise RpcError(f"cannot issue this certificate: {exc}") from None
        chain = [leaf.public_bytes(serialization.Encoding.PEM).decode(), *keys.chain_pems()]
        return {"key": key_pem, "certificate_chain": chain}

    async def _sign_at_kms(
        self,
        req: certs.LeafRequest,
        key: ec.EllipticCurvePrivateKey,
        attestation: bytes | None,
        usage_ra_tls: bool,
        with_app_info: bool,
    ) -> list[str]:
        """Upstream's path with a KMS: a CSR (with our attestation) to ``SignCert``."""
        if self._kms_signer is None:
            raise RpcError(
                "this app's certificates are issued by its KMS, and no KMS signer is configured"
            )
        if attestation is None:
            rd = certs.ratls_report_data(certs.spki_der(key))
            attestation = encode_attestation_v0(strip_attestation(await self.attestation(rd)))
        csr = CertSigningRequestV2(
            pubkey=certs.spki_der(key),
            config=CertConfigV2(
                subject=req.subject,
                subject_alt_names=req.alt_names,
                usage_server_auth=req.usage_server_auth,
                usage_client_auth=req.usage_client_auth,
                ext_quote=usage_ra_tls,
                ext_app_info=with_app_info,
                not_before=req.not_before,
                not_after=req.not_after,
            ),
            attestation=attestation,
        )
        try:
            return await self._kms_signer(csr, csr.sign(key))
        except KeyProviderError as exc:
            raise RpcError(f"KMS SignCert failed: {exc}") from None

    async def attestation_for_app_key(self, algorithm: str) -> dict[str, Any]:
        """Worker.GetAttestationForAppKey: a quote committing to the Sign key (DIP-1).

        ``report_data = prefix || base64url_nopad(pub)`` zero-padded to 64, with prefix
        ``dip1::ed25519-pk:`` or ``dip1::secp256k1c-pk:`` (compressed point).
        """
        derived = kdf.derive_key(self.state.keys.k256_key, [b"vms"])
        if algorithm == "ed25519":
            prefix, pub = "dip1::ed25519-pk:", kdf.ed25519_pub(kdf.ed25519_key(derived))
        elif algorithm in ("secp256k1", "k256", "secp256k1_prehashed"):
            prefix, pub = "dip1::secp256k1c-pk:", kdf.compressed_k256_pub(kdf.k256_key(derived))
        else:
            raise RpcError("Unsupported algorithm")
        text = (prefix + base64.urlsafe_b64encode(pub).decode().rstrip("=")).encode()
        if len(text) > REPORT_DATA_SIZE:
            raise RpcError(f"report data for {algorithm} does not fit in 64 bytes")
        return await self.get_quote(text)

    async def refresh_app_cert(self) -> None:
        """Info's ``app_cert``: upstream's "demo cert" (client auth, RA-TLS), made once at
        start in the background so that Info never waits for the KMS."""
        try:
            got = await self.get_tls_key(
                certs.LeafRequest(
                    subject="demo-cert", usage_server_auth=False, usage_client_auth=True
                ),
                usage_ra_tls=True,
                with_app_info=False,
            )
        except RpcError as exc:
            logger.warning("no app_cert for Info: %s", exc)
            return
        self._app_cert = got["certificate_chain"][0]

    @staticmethod
    def version() -> dict[str, str]:
        return {"version": AGENT_VERSION, "rev": AGENT_REV}

    # --- tappd (legacy) -------------------------------------------------------------------

    async def tdx_quote(self, data: bytes, hash_algorithm: str, prefix: str) -> dict[str, Any]:
        """Tappd.TdxQuote: ``H(tag ":" data)`` zero-padded, or ``raw`` (exactly 64 bytes)."""
        algo = hash_algorithm or "sha512"
        if algo == "raw":
            if len(data) != REPORT_DATA_SIZE:
                raise RpcError("Invalid report data length: raw report data must be 64 bytes")
            rd, tag = data, ""
        else:
            tag = prefix or "app-data"
            msg = tag.encode() + b":" + data
            names = {
                "sha256": "sha256",
                "sha384": "sha384",
                "sha512": "sha512",
                "sha3-256": "sha3_256",
                "sha3-384": "sha3_384",
                "sha3-512": "sha3_512",
            }
            if algo in names:
                rd = hashlib.new(names[algo], msg).digest()
            elif algo == "keccak256":
                rd = keccak256(msg)
            else:
                raise RpcError(f"Unsupported hash algorithm: {algo}")
            rd = rd.ljust(REPORT_DATA_SIZE, b"\0")
        out = await self.get_quote(rd)
        out.pop("report_data", None)
        out.pop("vm_config", None)
        out["hash_algorithm"] = algo
        out["prefix"] = tag
        return out

    def derive_k256_key(self, path: str, purpose: str) -> dict[str, Any]:
        got = self.get_key(path, purpose, "secp256k1")
        return {"k256_key": got["key"], "k256_signature_chain": got["signature_chain"]}
