"""The gateway's RPC server certificate: RA-TLS, bound to this gateway's own quote.

CVMs get the gateway's URLs from the untrusted ``.sys-config.json``, so a URL proves
nothing. What a CVM trusts is the certificate the RPC port presents in the TLS handshake:
an RA-TLS certificate (``gateway.attest.ratls``) whose quote, made through the gateway's
own TEE backend (``SimTee`` in the lab, ``TdxTee`` in a CVM), commits to the certificate's
key (``report_data = SHA512("ratls-cert:" || SPKI)``) and whose runtime events replay to
RTMR3 and name the gateway's app id. The TLS handshake proves the server holds that key,
so a CVM that verifies the quote and the app id knows it talks to an attested gateway of
the pinned app, whatever the host did to DNS or routing.

The certificate is short-lived (``validity``, default 7 days) and re-issued with a fresh key
when less than ``renew_before`` remains (:meth:`RpcIdentity.ensure`); :meth:`RpcIdentity.run`
does that on a timer and then calls the listener's reload (``TlsSite.reload``: new handshakes
present the new pair, open connections are untouched). Files: ``rpc-cert.pem`` (0644)
and ``rpc-key.pem`` (0600) in ``directory``, written atomically, key first.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.attest import ratls
from gateway.control.registration import rpc_ssl_context
from gateway.control.rpc_identity_settings import RpcIdentitySettings
from gateway.control.tls_server import TlsCredentials, TlsServerError
from gateway.tee.base import TeeBackend, TeeError

logger = logging.getLogger(__name__)

__all__ = [
    "CERT_FILE",
    "KEY_FILE",
    "RpcIdentity",
    "RpcIdentityError",
    "RpcIdentityOptions",
    "identity_from_settings",
    "rpc_server_context",
    "rpc_server_credentials",
    "tee_from_settings",
]

CERT_FILE = "rpc-cert.pem"
KEY_FILE = "rpc-key.pem"


class RpcIdentityError(RuntimeError):
    """The RPC certificate could not be issued or loaded; the message says why."""


@dataclass(frozen=True, slots=True)
class RpcIdentityOptions:
    """What goes into the certificate and when it is renewed.

    ``alt_names`` are informational (CVMs trust the quote, not names); ``vm_config`` is
    carried in the attestation as dstack does.
    """

    subject: str = "dstack-gateway-rpc"
    alt_names: tuple[str, ...] = ()
    validity: dt.timedelta = dt.timedelta(days=7)
    renew_before: dt.timedelta = dt.timedelta(days=1)
    check_interval: float = 3600.0
    vm_config: str = ""

    def __post_init__(self) -> None:
        if self.renew_before >= self.validity:
            raise ValueError("renew_before must be shorter than validity")


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


class RpcIdentity:
    """Issues and renews the RPC certificate through ``tee``."""

    def __init__(
        self,
        tee: TeeBackend,
        directory: Path,
        options: RpcIdentityOptions | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.tee = tee
        self.directory = directory
        self.options = options or RpcIdentityOptions()
        self.clock = clock

    @property
    def cert_file(self) -> Path:
        return self.directory / CERT_FILE

    @property
    def key_file(self) -> Path:
        return self.directory / KEY_FILE

    def current(self) -> x509.Certificate | None:
        """The certificate on disk, or ``None`` if there is none (or it is unreadable)."""
        try:
            return x509.load_pem_x509_certificate(self.cert_file.read_bytes())
        except (OSError, ValueError):
            return None

    def needs_renewal(self) -> bool:
        cert = self.current()
        if cert is None or not self.key_file.exists():
            return True
        now = dt.datetime.fromtimestamp(self.clock(), dt.UTC)
        return now >= cert.not_valid_after_utc - self.options.renew_before

    def issue(self) -> x509.Certificate:
        """A fresh key and certificate (quote through the TEE backend), written to disk."""
        opts = self.options
        key = ec.generate_private_key(ec.SECP256R1())
        request = ratls.CertRequest(
            opts.subject,
            alt_names=opts.alt_names,
            special_usage=None,
            server_auth=True,
            client_auth=False,
            vm_config=opts.vm_config,
            validity=opts.validity,
        )
        now = dt.datetime.fromtimestamp(self.clock(), dt.UTC)
        try:
            cert = ratls.build_ratls_cert(key, self.tee, request, now=now)
        except TeeError as exc:
            raise RpcIdentityError(
                f"no quote from the {self.tee.name} TEE backend: {exc}"
            ) from None
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _write(self.key_file, key_pem, 0o600)
        _write(self.cert_file, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        logger.info(
            "issued the RA-TLS RPC certificate (%s backend), valid until %s",
            self.tee.name,
            cert.not_valid_after_utc.isoformat(),
        )
        return cert

    def ensure(self) -> bool:
        """Issue a certificate if there is none or it expires within ``renew_before``.

        Returns True when a new one was written.
        """
        if not self.needs_renewal():
            return False
        self.issue()
        return True

    def ssl_context(self, client_ca_file: Path | None) -> ssl.SSLContext:
        """The RPC listener's context (``rpc_ssl_context``) with a valid certificate."""
        self.ensure()
        return rpc_ssl_context(self.cert_file, self.key_file, client_ca_file)

    def credentials(self, client_ca_file: Path | None) -> TlsCredentials:
        """What :class:`gateway.control.tls_server.TlsSite` serves, with a valid certificate."""
        self.ensure()
        return TlsCredentials(self.cert_file, self.key_file, client_ca_file)

    def reload(self, ctx: ssl.SSLContext) -> None:
        """Load the current pair into a live context: new handshakes present it."""
        try:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise RpcIdentityError(f"cannot load {self.cert_file}: {exc}") from None

    async def run(self, reload: Callable[[], None]) -> None:
        """Renew before expiry for as long as the listener runs (cancel to stop); after a
        renewal, ``reload()`` makes the listener present the new pair (``TlsSite.reload``,
        or ``lambda: identity.reload(ctx)`` for a stdlib context).

        A failed renewal is logged and retried at the next check; the old certificate
        stays in use until it expires.
        """
        while True:
            try:
                if await asyncio.to_thread(self.ensure):
                    reload()
            except (RpcIdentityError, TlsServerError, OSError) as exc:
                logger.error("RPC certificate renewal failed, retrying later: %s", exc)
            await asyncio.sleep(self.options.check_interval)


def tee_from_settings(settings: RpcIdentitySettings) -> TeeBackend | None:
    """The gateway's own TEE backend (``[rpc_identity] tee``), or ``None`` when not set."""
    if not settings.tee:
        return None
    if settings.tee == "tdx":
        from gateway.tee.tdx import TdxTee

        return TdxTee()
    from gateway.tee.sim import SimTee

    sim = Path(settings.sim_dir)
    return SimTee.open(sim / "pki", sim / "tee")


def identity_from_settings(settings: RpcIdentitySettings, data_dir: Path) -> RpcIdentity | None:
    """The configured identity (``[rpc_identity]``), or ``None`` when ``tee`` is empty."""
    tee = tee_from_settings(settings)
    if tee is None:
        return None
    directory = Path(settings.directory) if settings.directory else data_dir / "rpc-identity"
    options = RpcIdentityOptions(
        alt_names=settings.alt_names,
        validity=dt.timedelta(days=settings.validity_days),
        renew_before=dt.timedelta(hours=settings.renew_before_hours),
    )
    return RpcIdentity(tee, directory, options)


def rpc_server_context(
    identity: RpcIdentity | None,
    cert_file: str,
    key_file: str,
    client_ca_file: Path | None,
) -> ssl.SSLContext:
    """The RPC listener's context: attested when ``identity`` is set, else the files."""
    if identity is not None:
        return identity.ssl_context(client_ca_file)
    if not cert_file:
        raise RpcIdentityError(
            "the RPC listener needs a certificate: set [rpc_identity] tee, or [rpc] cert_file "
            "and key_file"
        )
    return rpc_ssl_context(Path(cert_file), Path(key_file), client_ca_file)


def rpc_server_credentials(
    identity: RpcIdentity | None,
    cert_file: str,
    key_file: str,
    client_ca_file: Path | None,
) -> TlsCredentials:
    """What the RPC listener serves: the attested identity when set, else the files."""
    if identity is not None:
        return identity.credentials(client_ca_file)
    if not cert_file:
        raise RpcIdentityError(
            "the RPC listener needs a certificate: set [rpc_identity] tee, or [rpc] cert_file "
            "and key_file"
        )
    return TlsCredentials(Path(cert_file), Path(key_file), client_ca_file)
