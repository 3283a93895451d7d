"""App keys and the key providers that produce them.

``AppKeys`` is what upstream writes as ``.appkeys.json``; the guest agent derives every
key it hands out from it (``k256_key`` for GetKey, the app CA for GetTlsKey). Providers:

- ``none``: a random 32-byte seed every boot (dev only: keys change on each boot, no
  encrypted env, no gateway);
- ``local``: dstack's SGX-sealed seed from the host API (``GetSealingKey``); needs an SGX
  sealing service and libsodium sealed boxes, so this shim refuses it with a clear error;
- ``kms``: the dstack KMS protocol (``gateway.guest.kms_client``).

Non-KMS keys come from one seed exactly as ``gen_app_keys_from_seed`` does upstream.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.guest import certs, kdf
from gateway.guest.hostshared import SysConfig
from gateway.guest.identity import AppCompose, KeyProviderKind
from gateway.tee.base import TeeBackend

__all__ = [
    "AppKeys",
    "KeyProvider",
    "KeyProviderError",
    "KeyRequest",
    "LocalKeyProvider",
    "NoneKeyProvider",
    "app_keys_from_seed",
]


class KeyProviderError(RuntimeError):
    """Keys could not be obtained; the message says from where and why."""


def _pem_key(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


@dataclass(frozen=True, slots=True)
class AppKeys:
    """The app's key material (never logged; ``__repr__`` hides it)."""

    disk_crypt_key: bytes
    env_crypt_key: bytes
    k256_key: bytes
    k256_signature: bytes
    gateway_app_id: str
    ca_cert: str  # PEM: the app CA (non-KMS) or the KMS root CA
    ca_key: str  # PEM: the key that signs GetTlsKey leaves ("" if none held locally)
    provider: KeyProviderKind
    provider_id: bytes = b""
    os_image_hash: bytes = b""
    kms_url: str = ""
    app_ca_cert: str = ""  # KMS mode: the app CA certificate (chain middle)

    def __repr__(self) -> str:
        return f"AppKeys(provider={self.provider.value}, id={self.provider_id.hex()[:16]}...)"

    def ca_private_key(self) -> ec.EllipticCurvePrivateKey:
        if not self.ca_key:
            raise KeyProviderError("no local CA key: certificates must be signed by the KMS")
        key = serialization.load_pem_private_key(self.ca_key.encode(), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise KeyProviderError("the CA key is not an EC key")
        return key

    def signing_ca_cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate((self.app_ca_cert or self.ca_cert).encode())

    def chain_pems(self) -> list[str]:
        """PEMs that follow a leaf in GetTlsKey's chain."""
        return [p for p in (self.app_ca_cert, self.ca_cert) if p]

    def to_json(self) -> bytes:
        """``.appkeys.json`` in upstream's shape (hex byte fields, tagged key provider)."""
        if self.provider is KeyProviderKind.KMS:
            kp: dict[str, Any] = {
                "Kms": {
                    "url": self.kms_url,
                    "pubkey": self.provider_id.hex(),
                    "tmp_ca_key": "",
                    "tmp_ca_cert": "",
                }
            }
        elif self.provider is KeyProviderKind.LOCAL:
            kp = {"Local": {"key": self.ca_key, "mr": self.provider_id.hex()}}
        else:
            kp = {"None": {"key": self.ca_key}}
        doc = {
            "disk_crypt_key": self.disk_crypt_key.hex(),
            "env_crypt_key": self.env_crypt_key.hex(),
            "k256_key": self.k256_key.hex(),
            "k256_signature": self.k256_signature.hex(),
            "gateway_app_id": self.gateway_app_id,
            "ca_cert": self.ca_cert,
            "key_provider": kp,
        }
        if self.app_ca_cert:
            doc["app_ca_cert"] = self.app_ca_cert
            doc["app_ca_key"] = self.ca_key
        if self.os_image_hash:
            doc["os_image_hash"] = self.os_image_hash.hex()
        return json.dumps(doc, indent=4).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> AppKeys:
        """Read back ``.appkeys.json`` (our own file, written 0600 by the boot)."""
        doc = json.loads(raw)
        kp = doc["key_provider"]
        ((tag, body),) = kp.items()
        provider = {"Kms": KeyProviderKind.KMS, "Local": KeyProviderKind.LOCAL}.get(
            tag, KeyProviderKind.NONE
        )
        if provider is KeyProviderKind.KMS:
            provider_id = bytes.fromhex(body["pubkey"])
            ca_key = doc.get("app_ca_key", "")
        else:
            provider_id = bytes.fromhex(body.get("mr", ""))
            ca_key = body["key"]
        return cls(
            disk_crypt_key=bytes.fromhex(doc["disk_crypt_key"]),
            env_crypt_key=bytes.fromhex(doc["env_crypt_key"]),
            k256_key=bytes.fromhex(doc["k256_key"]),
            k256_signature=bytes.fromhex(doc["k256_signature"]),
            gateway_app_id=doc["gateway_app_id"],
            ca_cert=doc["ca_cert"],
            ca_key=ca_key,
            provider=provider,
            provider_id=provider_id,
            os_image_hash=bytes.fromhex(doc.get("os_image_hash", "")),
            kms_url=body.get("url", "") if provider is KeyProviderKind.KMS else "",
            app_ca_cert=doc.get("app_ca_cert", ""),
        )


def app_keys_from_seed(seed: bytes, provider: KeyProviderKind, provider_id: bytes = b"") -> AppKeys:
    """Upstream's ``gen_app_keys_from_seed``: every non-KMS key from one 32-byte seed."""
    ca_key = kdf.derive_p256(seed, [b"app-key"])
    disk_key = kdf.derive_p256(seed, [b"app-disk-key"])
    disk_der = disk_key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    ca_cert = certs.make_app_ca(ca_key)
    return AppKeys(
        disk_crypt_key=hashlib.sha256(disk_der).digest(),
        env_crypt_key=b"",
        k256_key=kdf.derive_key(seed, [b"app-k256-key"]),
        k256_signature=b"",
        gateway_app_id="",
        ca_cert=ca_cert.public_bytes(serialization.Encoding.PEM).decode(),
        ca_key=_pem_key(ca_key),
        provider=provider,
        provider_id=provider_id,
    )


@dataclass(frozen=True, slots=True)
class KeyRequest:
    """What a provider may use: the measured identity and the (untrusted) sys-config."""

    app_id: bytes
    compose: AppCompose
    sys_config: SysConfig
    tee: TeeBackend


class KeyProvider(Protocol):
    """Obtains the app's keys after the identity is measured."""

    @property
    def kind(self) -> KeyProviderKind: ...

    async def get_app_keys(self, request: KeyRequest) -> AppKeys: ...


class NoneKeyProvider:
    """Random keys on every boot (development only)."""

    def __init__(self, rng: Callable[[int], bytes] = os.urandom) -> None:
        self._rng = rng

    @property
    def kind(self) -> KeyProviderKind:
        return KeyProviderKind.NONE

    async def get_app_keys(self, request: KeyRequest) -> AppKeys:
        return app_keys_from_seed(self._rng(32), KeyProviderKind.NONE)


class LocalKeyProvider:
    """dstack's SGX local key provider: refused (no SGX sealing service in this shim)."""

    @property
    def kind(self) -> KeyProviderKind:
        return KeyProviderKind.LOCAL

    async def get_app_keys(self, request: KeyRequest) -> AppKeys:
        raise KeyProviderError(
            "key_provider 'local' needs dstack's SGX sealing service (GetSealingKey with a "
            "libsodium sealed box and an SGX quote), which this shim does not support; "
            "use key_provider 'kms' (or 'none' for development)"
        )
