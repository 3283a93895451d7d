"""The dstack KMS protocol, client side (the ``kms`` key provider).

For each ``kms_urls[i]`` (from the untrusted sys-config) in order:

1. ``POST {url}/prpc/GetTempCaCert?json`` over TLS *without* server verification: it only
   returns the temporary CA and the KMS root CA certificate, nothing secret.
2. Make an RA-TLS client certificate: a fresh P-256 key, the CVM's attestation bound to it
   (``report_data = SHA512("ratls-cert:" || SPKI)``), signed by the temporary CA.
3. ``POST {url}/prpc/GetAppKey?json {"api_version":1,"vm_config":...}`` over mutual TLS,
   trusting only the KMS root CA from step 1 and requiring the server certificate's
   special usage ``kms:rpc``. A host that substitutes its own "KMS" is caught by the
   ``key_provider_id`` pin in app-compose (checked by the boot) and, for everyone else,
   by the ``key-provider`` event that records which root the keys came from.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import ssl
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.guest import certs, evidence
from gateway.guest.csr import CertSigningRequestV2
from gateway.guest.http1 import parse_http_reply
from gateway.guest.identity import KeyProviderKind
from gateway.guest.keys import AppKeys, KeyProviderError, KeyRequest
from gateway.guest.service import KmsSigner

__all__ = ["KmsKeyProvider", "kms_sign_cert", "kms_signer_for"]

MAX_REPLY = 1024 * 1024


logger = logging.getLogger(__name__)


def _hex(doc: dict[str, Any], name: str, size: int | None = None) -> bytes:
    value = doc.get(name) or ""
    if not isinstance(value, str):
        raise KeyProviderError(f"KMS reply: {name} is not a hex string")
    try:
        out = bytes.fromhex(value.removeprefix("0x"))
    except ValueError:
        raise KeyProviderError(f"KMS reply: {name} is not hex") from None
    if size is not None and len(out) != size:
        raise KeyProviderError(f"KMS reply: {name} is {len(out)} bytes, expected {size}")
    return out


async def https_post_json(
    url: str, body: dict[str, Any], ctx: ssl.SSLContext, timeout: float
) -> tuple[dict[str, Any], x509.Certificate | None]:
    """POST JSON over a fresh TLS connection; returns the reply and the server cert.

    A plain HTTP/1.1 exchange on our own connection, so that the server certificate
    the reply came over is known (needed for the ``kms:rpc`` check).
    """
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise KeyProviderError(f"KMS URL {url!r} must be https://")
    port = parts.port or 443
    data = json.dumps(body, separators=(",", ":")).encode()
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    head = (
        f"POST {target} HTTP/1.1\r\nHost: {parts.hostname}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()

    async def exchange() -> tuple[bytes, bytes | None]:
        reader, writer = await asyncio.open_connection(
            parts.hostname, port, ssl=ctx, server_hostname=parts.hostname
        )
        try:
            ssl_obj = writer.get_extra_info("ssl_object")
            peer = ssl_obj.getpeercert(binary_form=True) if ssl_obj is not None else None
            writer.write(head + data)
            await writer.drain()
            raw = await reader.read(MAX_REPLY + 1)
            while chunk := await reader.read(65536):
                raw += chunk
                if len(raw) > MAX_REPLY:
                    break
        finally:
            writer.close()
        return raw, peer

    try:
        raw, peer_der = await asyncio.wait_for(exchange(), timeout)
    except (OSError, ssl.SSLError) as exc:
        raise KeyProviderError(f"{url}: {exc}") from None
    if len(raw) > MAX_REPLY:
        raise KeyProviderError(f"{url}: reply larger than {MAX_REPLY} bytes")
    try:
        status, payload = parse_http_reply(raw)
    except ValueError as exc:
        raise KeyProviderError(f"{url}: bad HTTP reply: {exc}") from None
    text = payload.decode("utf-8", "replace")
    if status != 200:
        raise KeyProviderError(f"{url}: HTTP {status}: {text[:300]}")
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        raise KeyProviderError(f"{url}: reply is not JSON") from None
    if not isinstance(doc, dict):
        raise KeyProviderError(f"{url}: reply is not a JSON object")
    peer = x509.load_der_x509_certificate(peer_der) if peer_der else None
    return doc, peer


class KmsKeyProvider:
    """Gets app keys from a dstack KMS (or the lab KMS)."""

    def __init__(
        self,
        *,
        urls: tuple[str, ...] | None = None,
        timeout: float = 30.0,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self._urls = urls
        self._timeout = timeout
        self._clock = clock

    @property
    def kind(self) -> KeyProviderKind:
        return KeyProviderKind.KMS

    async def get_app_keys(self, request: KeyRequest) -> AppKeys:
        urls = self._urls if self._urls is not None else request.sys_config.kms_urls
        if not urls:
            raise KeyProviderError("key_provider is kms but .sys-config.json lists no kms_urls")
        errors = []
        for url in urls:
            try:
                return await self._from(url.rstrip("/"), request)
            except (KeyProviderError, ssl.SSLError, TimeoutError) as exc:
                logger.warning("KMS %s failed: %s", url, exc)
                errors.append(str(exc))
        raise KeyProviderError("no KMS gave keys: " + "; ".join(errors))

    async def _from(self, base: str, request: KeyRequest) -> AppKeys:
        insecure = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE
        temp, _ = await https_post_json(
            f"{base}/prpc/GetTempCaCert?json", {}, insecure, self._timeout
        )
        try:
            temp_cert = x509.load_pem_x509_certificate(str(temp["temp_ca_cert"]).encode())
            temp_key = serialization.load_pem_private_key(str(temp["temp_ca_key"]).encode(), None)
            ca_pem = str(temp["ca_cert"])
            root = x509.load_pem_x509_certificate(ca_pem.encode())
        except (KeyError, ValueError) as exc:
            raise KeyProviderError(f"GetTempCaCert reply is invalid: {exc}") from None
        if not isinstance(temp_key, ec.EllipticCurvePrivateKey):
            raise KeyProviderError("GetTempCaCert: the temp CA key is not an EC key")
        key = ec.generate_private_key(ec.SECP256R1())
        client_cert = await asyncio.to_thread(
            evidence.ratls_client_cert,
            request.tee,
            key,
            temp_key,
            temp_cert,
            request.sys_config.vm_config,
            self._clock(),
        )
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False  # the KMS is identified by its root CA, not a name
        ctx.load_verify_locations(cadata=ca_pem)
        with tempfile.TemporaryDirectory(prefix="kms-client-") as tmp:
            cert_file, key_file = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
            cert_file.write_bytes(client_cert.public_bytes(serialization.Encoding.PEM))
            key_file.touch(0o600)
            key_file.write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
            ctx.load_cert_chain(cert_file, key_file)
        body = {"api_version": 1, "vm_config": request.sys_config.vm_config}
        doc, peer = await https_post_json(f"{base}/prpc/GetAppKey?json", body, ctx, self._timeout)
        if peer is None or evidence.special_usage(peer) != "kms:rpc":
            raise KeyProviderError(f"{base}: the server certificate is not a KMS RPC certificate")
        logger.info("got app keys from KMS %s", base)
        return AppKeys(
            disk_crypt_key=_hex(doc, "disk_crypt_key"),
            env_crypt_key=_hex(doc, "env_crypt_key"),
            k256_key=_hex(doc, "k256_key", 32),
            k256_signature=_hex(doc, "k256_signature"),
            gateway_app_id=str(doc.get("gateway_app_id") or doc.get("tproxy_app_id") or ""),
            ca_cert=ca_pem,
            ca_key=str(doc.get("app_ca_key") or ""),
            provider=KeyProviderKind.KMS,
            provider_id=certs.spki_der(root.public_key()),  # type: ignore[arg-type]
            os_image_hash=_hex(doc, "os_image_hash"),
            kms_url=f"{base}/prpc",
            app_ca_cert=str(doc.get("app_ca_cert") or ""),
        )


async def kms_sign_cert(
    kms_url: str,
    ca_cert_pem: str,
    csr: CertSigningRequestV2,
    signature: bytes,
    vm_config: str,
    *,
    timeout: float = 10.0,
) -> list[str]:
    """``SignCert`` at the KMS that issued this app's keys; returns the PEM chain.

    The request carries its own attestation (bound to the certificate key), so it goes
    over TLS trusting only the KMS root CA, without a client certificate.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # the KMS is identified by its root CA, not a name
    ctx.load_verify_locations(cadata=ca_cert_pem)
    body = {
        "api_version": 2,
        "csr": csr.encode().hex(),
        "signature": signature.hex(),
        "vm_config": vm_config,
    }
    base = kms_url.rstrip("/").removesuffix("/prpc")
    doc, peer = await https_post_json(f"{base}/prpc/SignCert?json", body, ctx, timeout)
    if peer is None or evidence.special_usage(peer) != "kms:rpc":
        raise KeyProviderError(f"{base}: the server certificate is not a KMS RPC certificate")
    chain = doc.get("certificate_chain")
    if not isinstance(chain, list) or not chain or not all(isinstance(c, str) for c in chain):
        raise KeyProviderError("SignCert reply has no certificate_chain")
    return list(chain)


def kms_signer_for(keys: AppKeys, vm_config: str) -> KmsSigner | None:
    """The agent's SignCert hook for keys that came from a KMS (``None`` otherwise)."""
    if keys.provider is not KeyProviderKind.KMS or not keys.kms_url or keys.ca_key:
        return None
    url, root = keys.kms_url, keys.ca_cert

    async def sign(csr: CertSigningRequestV2, signature: bytes) -> list[str]:
        return await kms_sign_cert(url, root, csr, signature, vm_config)

    return sign
