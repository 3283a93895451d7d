"""ACME (RFC 8555) DNS-01 issuance of ``*.<base>`` + ``<base>`` over the ``acme`` library.

``acme`` (certbot's protocol library) is synchronous, so every call to the CA runs in a
worker thread (``asyncio.to_thread``) while DNS work stays on the event loop. Its types never
leave this module: callers get :class:`IssuedCertificate` or a :class:`~gateway.certs.errors.
CertError`.

What we add around the library, and why:

* **One deadline, handed down.** :meth:`AcmeClient.issue` takes an absolute deadline (on the
  injected monotonic clock); each HTTP request gets ``min(remaining, request_timeout)`` and
  every poll sleep is capped by it, so there are no stacked timeouts.
* **Our own polling.** The library sleeps a fixed second per poll; we poll from 50 ms up to
  ``poll_interval`` (honouring ``Retry-After`` within the deadline).
* **badNonce retried several times** (the library retries once; a CA may reject a nonce at
  random, pebble does so for 5 % by default).
* **One account, persisted.** The EC P-256 account key is stored under ``state_dir`` per
  directory URL; each issuance asks ``newAccount`` with that key, which returns the existing
  account (or re-creates it if the CA forgot it), and records the account URL.
* **A fresh certificate key per issuance** (EC P-256), as dstack does.
* **Credential rotation** (:meth:`AcmeClient.rotate_account`): upstream's
  ``RotateAcmeCredentials`` registers a new account under a new key; we do that by default,
  or roll the existing account to a new key (RFC 8555 section 7.3.5 ``keyChange``, which the
  ``acme`` library does not implement: the inner JWS signed by the new key is the payload of
  an ordinary request signed by the old one), keeping the account URI that CAA pins. The old
  key is kept beside the new one as ``account-key.pem.<unix time>.old``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import functools
import hashlib
import json
import logging
import os
import threading
import time
import typing
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import requests
from acme import challenges, client, crypto_util, errors, jws, messages
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from josepy import errors as jose_errors
from josepy import jwa, jwk

from gateway.certs.dns.base import DnsProvider, NameServer
from gateway.certs.dns.propagation import wait_for_txt
from gateway.certs.errors import (
    PROBLEM_CA_UNREACHABLE,
    PROBLEM_DNS_PROPAGATION,
    PROBLEM_INVALID_RESPONSE,
    PROBLEM_TIMEOUT,
    CertError,
    IssuanceError,
)

__all__ = ["AcmeClient", "IssuedCertificate", "PropagationCheck", "load_certificate_info"]

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: ``(name, expected values, servers, deadline) -> servers still lacking them``
PropagationCheck = Callable[
    [str, Collection[str], Sequence[NameServer], float], Awaitable[list[NameServer]]
]


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    """A certificate the CA issued: PEM chain (leaf first), its PEM key and parsed facts."""

    domain: str
    fullchain_pem: bytes = dataclasses.field(repr=False)
    key_pem: bytes = dataclasses.field(repr=False)
    serial: int
    not_before: float
    not_after: float
    names: tuple[str, ...]
    spki_der: bytes = dataclasses.field(repr=False)


def load_certificate_info(domain: str, fullchain_pem: bytes, key_pem: bytes) -> IssuedCertificate:
    """Parse a chain + key; raise ValueError if the key does not belong to the leaf."""
    chain = x509.load_pem_x509_certificates(fullchain_pem)
    leaf = chain[0]
    key = serialization.load_pem_private_key(key_pem, password=None)
    spki = leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if (
        key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        != spki
    ):
        raise ValueError("the private key does not match the certificate")
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = tuple(san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = ()
    return IssuedCertificate(
        domain=domain,
        fullchain_pem=fullchain_pem,
        key_pem=key_pem,
        serial=leaf.serial_number,
        not_before=leaf.not_valid_before_utc.timestamp(),
        not_after=leaf.not_valid_after_utc.timestamp(),
        names=names,
        spki_der=spki,
    )


class _DeadlinePassed(Exception):
    pass


class _Network(client.ClientNetwork):
    """The library's network layer with a per-request deadline and repeated badNonce retries."""

    def __init__(
        self,
        key: jwk.JWK,
        *,
        verify: bool | str,
        deadline: float,
        clock: Callable[[], float],
        request_timeout: float,
        nonce_retries: int,
    ) -> None:
        # verify is passed to requests' ``verify=``: a CA bundle path works (typed as bool)
        super().__init__(
            key, alg=jwa.ES256, verify_ssl=typing.cast(bool, verify), user_agent="gateway-certbot"
        )
        self._deadline = deadline
        self._clock = clock
        self._request_timeout = request_timeout
        self._nonce_retries = nonce_retries

    def _send_request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        remaining = self._deadline - self._clock()
        if remaining <= 0:
            raise _DeadlinePassed()
        kwargs["timeout"] = min(remaining, self._request_timeout)
        return super()._send_request(method, url, *args, **kwargs)

    def post(self, *args: Any, **kwargs: Any) -> Any:
        for attempt in range(self._nonce_retries + 1):
            try:
                return self._post_once(*args, **kwargs)
            except messages.Error as exc:
                if exc.code != "badNonce" or attempt == self._nonce_retries:
                    raise
                logger.debug("retrying after badNonce (%d)", attempt + 1)
        raise AssertionError("unreachable")


@dataclass(slots=True)
class _Session:
    net: _Network
    acme: client.ClientV2
    account_uri: str


def _problem(domain: str, exc: BaseException) -> CertError:
    """Map whatever the library or the transport raised to our typed error."""
    if isinstance(exc, CertError):
        return exc
    if isinstance(exc, _DeadlinePassed | errors.TimeoutError):
        return IssuanceError(domain, PROBLEM_TIMEOUT, "the issuance deadline passed")
    if isinstance(exc, requests.exceptions.RequestException):
        return IssuanceError(domain, PROBLEM_CA_UNREACHABLE, f"{type(exc).__name__}: {exc}")
    if isinstance(exc, messages.Error):
        return IssuanceError(domain, exc.typ or PROBLEM_INVALID_RESPONSE, exc.detail or "")
    if isinstance(exc, errors.Error | jose_errors.DeserializationError | ValueError | KeyError):
        return IssuanceError(domain, PROBLEM_INVALID_RESPONSE, f"{type(exc).__name__}: {exc}")
    raise exc


def _slug(url: str) -> str:
    """A directory name per ACME directory URL: readable host plus a short hash."""
    host = url.split("://", 1)[-1].split("/", 1)[0].replace(":", "_")
    return f"{host}-{hashlib.sha256(url.encode()).hexdigest()[:12]}"


def _retry_after(response: requests.Response, default: float) -> float:
    value = response.headers.get("Retry-After")
    if not value:
        return default
    try:
        return max(0.0, float(int(value)))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value)
        return max(0.0, parsed.timestamp() - time.time())


class AcmeClient:
    """Talks to one ACME directory with one persisted account."""

    def __init__(
        self,
        *,
        directory_url: str,
        state_dir: Path,
        contact_email: str = "",
        ca_bundle: Path | None = None,
        poll_interval: float = 1.0,
        propagation_wait: float = 60.0,
        request_timeout: float = 30.0,
        nonce_retries: int = 5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.directory_url = directory_url
        self._dir = state_dir / _slug(directory_url)
        self._contact = contact_email
        self._verify: bool | str = str(ca_bundle) if ca_bundle else True
        self._poll_interval = poll_interval
        self._propagation_wait = propagation_wait
        self._request_timeout = request_timeout
        self._nonce_retries = nonce_retries
        self._clock = clock
        self._key_lock = threading.Lock()

    # --- account -------------------------------------------------------------------------

    @property
    def account_file(self) -> Path:
        return self._dir / "account.json"

    def stored_account_uri(self) -> str | None:
        """The account URL recorded by an earlier registration, if any."""
        try:
            data = json.loads(self.account_file.read_text())
        except (OSError, ValueError):
            return None
        uri = data.get("uri") if isinstance(data, dict) else None
        return uri if isinstance(uri, str) else None

    def _account_key(self) -> jwk.JWK:
        """Load the account key, creating it (0600, atomically) on first use."""
        path = self._dir / "account-key.pem"
        with self._key_lock:
            if not path.exists():
                self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
                key = ec.generate_private_key(ec.SECP256R1())
                pem = key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
                _write_private(path, pem)
            loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise CertError(f"{path} is not an EC account key; move it away to create a new one")
        return jwk.JWKEC(key=loaded)

    def _open(self, deadline: float) -> _Session:
        """Fetch the directory and find (or create) our account. Runs in a worker thread."""
        key = self._account_key()
        net = _Network(
            key,
            verify=self._verify,
            deadline=deadline,
            clock=self._clock,
            request_timeout=self._request_timeout,
            nonce_retries=self._nonce_retries,
        )
        directory = client.ClientV2.get_directory(self.directory_url, net)
        acme = client.ClientV2(directory, net)
        registration = messages.NewRegistration.from_data(
            email=self._contact or None, terms_of_service_agreed=True
        )
        try:
            regr = acme.new_account(registration)
            uri = regr.uri
        except errors.ConflictError as exc:  # the key already has an account: reuse it
            uri = exc.location
            net.account = messages.RegistrationResource(uri=uri, body=messages.Registration())
        if uri != self.stored_account_uri():
            record = {"directory_url": self.directory_url, "uri": uri, "recorded_at": time.time()}
            _write_private(self.account_file, json.dumps(record, indent=2).encode())
            logger.info("ACME account %s recorded", uri)
        return _Session(net, acme, uri)

    def _rotate(self, deadline: float, key_change: bool) -> str:
        """New key; a new account (default) or keyChange on the current one. In a thread."""
        new_key = ec.generate_private_key(ec.SECP256R1())
        new_jwk = jwk.JWKEC(key=new_key)
        if key_change:
            session = self._open(deadline)
            url = session.acme.directory["keyChange"]
            old_key = session.net.key
            assert old_key is not None  # _open signs with it
            inner = jws.JWS.sign(
                json.dumps(
                    {
                        "account": session.account_uri,
                        "oldKey": old_key.public_key().to_json(),
                    }
                ).encode(),
                key=new_jwk,
                alg=jwa.ES256,
                nonce=None,
                url=url,
            )
            session.net.post(url, inner, new_nonce_url=session.acme.directory["newNonce"])
            uri = session.account_uri
        else:
            net = _Network(
                new_jwk,
                verify=self._verify,
                deadline=deadline,
                clock=self._clock,
                request_timeout=self._request_timeout,
                nonce_retries=self._nonce_retries,
            )
            acme = client.ClientV2(client.ClientV2.get_directory(self.directory_url, net), net)
            registration = messages.NewRegistration.from_data(
                email=self._contact or None, terms_of_service_agreed=True
            )
            uri = acme.new_account(registration).uri
        path = self._dir / "account-key.pem"
        with self._key_lock:
            if path.exists():
                os.replace(path, path.with_name(f"{path.name}.{int(time.time())}.old"))
            pem = new_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            _write_private(path, pem)
        record = {"directory_url": self.directory_url, "uri": uri, "recorded_at": time.time()}
        _write_private(self.account_file, json.dumps(record, indent=2).encode())
        how = "rolled to a new key (keyChange)" if key_change else "registered with a new key"
        logger.info("ACME account %s %s", uri, how)
        return uri

    async def rotate_account(self, deadline: float, *, key_change: bool = False) -> str:
        """Replace the account key (see the module doc); returns the account URI in use.

        Raises :class:`IssuanceError` (labelled with the directory URL) if the CA refuses;
        the stored key and account are then unchanged.
        """
        return await self._thread(self.directory_url, self._rotate, deadline, key_change)

    async def account_uri(self, deadline: float, domain: str = "") -> str:
        """The account URL (registering the account if needed); ``domain`` labels errors."""
        session = await self._thread(domain or self.directory_url, self._open, deadline)
        return session.account_uri

    # --- issuance ------------------------------------------------------------------------

    async def _thread(self, domain: str, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.to_thread(fn, *args)
        except Exception as exc:  # noqa: BLE001 - mapped to our types, or re-raised
            raise _problem(domain, exc) from exc

    async def _sleep(self, delay: float, deadline: float, domain: str) -> None:
        remaining = deadline - self._clock()
        if remaining <= 0:
            raise IssuanceError(domain, PROBLEM_TIMEOUT, "the issuance deadline passed")
        await asyncio.sleep(min(delay, remaining))

    async def issue(
        self,
        domain: str,
        provider: DnsProvider,
        deadline: float,
        *,
        propagation: PropagationCheck | None = None,
    ) -> IssuedCertificate:
        """Obtain a certificate for ``*.domain`` and ``domain`` by DNS-01 before ``deadline``.

        Challenge TXT records are removed again whatever happens. Raises
        :class:`IssuanceError` or :class:`DnsProviderError`.
        """
        check = propagation or self._wait_for_txt
        session = await self._thread(domain, self._open, deadline)
        key = ec.generate_private_key(ec.SECP256R1())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        names = [f"*.{domain}", domain]
        csr = crypto_util.make_csr(key_pem, names)
        order = await self._thread(domain, session.acme.new_order, csr)

        todo: list[tuple[messages.AuthorizationResource, messages.ChallengeBody, str, str]] = []
        for authzr in order.authorizations:
            if authzr.body.status == messages.STATUS_VALID:
                continue  # the CA reused an earlier validation
            challb = next(
                (c for c in authzr.body.challenges if isinstance(c.chall, challenges.DNS01)), None
            )
            if challb is None:
                raise IssuanceError(domain, PROBLEM_INVALID_RESPONSE, "CA offered no dns-01")
            name = challb.chall.validation_domain_name(authzr.body.identifier.value)
            todo.append((authzr, challb, name, challb.chall.validation(session.net.key)))

        published: list[tuple[str, str]] = []
        try:
            for _, _, name, value in todo:
                # recorded first: if we are cancelled while the server applies the update,
                # the cleanup below still removes it (removing an absent value is harmless)
                published.append((name, value))
                await provider.add_txt(name, value)
            by_name: dict[str, set[str]] = {}
            for name, value in published:
                by_name.setdefault(name, set()).add(value)
            for name, values in by_name.items():
                servers = await provider.authoritative_servers(name)
                lagging = await check(name, values, servers, deadline)
                if lagging:
                    raise IssuanceError(
                        domain,
                        PROBLEM_DNS_PROPAGATION,
                        f"{name} TXT not visible on {', '.join(map(str, lagging))}",
                    )
            for _authzr, challb, _, _ in todo:
                await self._thread(
                    domain, session.acme.answer_challenge, challb, challb.response(session.net.key)
                )
            for authzr, _, _, _ in todo:
                await self._await_authz(domain, session, authzr, deadline)
        finally:
            for name, value in published:
                try:
                    await provider.remove_txt(name, value)
                except CertError as exc:
                    logger.warning("could not remove challenge TXT at %s: %s", name, exc)
        fullchain = await self._finalize(domain, session, order, deadline)
        try:
            issued = load_certificate_info(domain, fullchain.encode(), key_pem)
        except ValueError as exc:
            raise IssuanceError(domain, PROBLEM_INVALID_RESPONSE, str(exc)) from None
        if set(issued.names) != set(names):
            raise IssuanceError(
                domain, PROBLEM_INVALID_RESPONSE, f"certificate names {issued.names} != {names}"
            )
        logger.info("issued certificate for %s serial %x", domain, issued.serial)
        return issued

    async def _wait_for_txt(
        self, name: str, values: Collection[str], servers: Sequence[NameServer], deadline: float
    ) -> list[NameServer]:
        return await wait_for_txt(
            name,
            values,
            servers,
            deadline,
            poll_interval=self._poll_interval,
            skip_silent=self._clock() + self._propagation_wait,
            clock=self._clock,
        )

    async def _await_authz(
        self,
        domain: str,
        session: _Session,
        authzr: messages.AuthorizationResource,
        deadline: float,
    ) -> None:
        delay = 0.05
        while True:
            authzr, response = await self._thread(domain, session.acme.poll, authzr)
            status = authzr.body.status
            if status == messages.STATUS_VALID:
                return
            if status != messages.STATUS_PENDING:
                errs = [c.error for c in authzr.body.challenges if c.error is not None]
                if errs:
                    raise IssuanceError(domain, errs[0].typ, errs[0].detail or "")
                raise IssuanceError(domain, PROBLEM_INVALID_RESPONSE, f"authorization {status}")
            await self._sleep(_retry_after(response, delay), deadline, domain)
            delay = min(delay * 2, self._poll_interval)

    async def _finalize(
        self,
        domain: str,
        session: _Session,
        order: messages.OrderResource,
        deadline: float,
    ) -> str:
        try:
            await self._thread(domain, session.acme.begin_finalization, order)
        except IssuanceError as exc:
            if not exc.problem.endswith(":orderNotReady"):
                raise
        nonce_url = session.acme.directory["newNonce"]
        delay = 0.05
        while True:
            response = await self._thread(
                domain,
                functools.partial(session.net.post, new_nonce_url=nonce_url),
                order.uri,
                None,
            )
            body = messages.Order.from_json(response.json())
            if body.status == messages.STATUS_VALID and body.certificate:
                # POST-as-GET; the answer is application/pem-certificate-chain
                download = functools.partial(session.net.post, new_nonce_url=nonce_url)
                cert = await self._thread(domain, download, body.certificate, None)
                return str(cert.text)
            if body.status == messages.STATUS_INVALID:
                err = body.error
                raise IssuanceError(
                    domain,
                    err.typ if err is not None else PROBLEM_INVALID_RESPONSE,
                    (err.detail or "") if err is not None else "order became invalid",
                )
            if body.status == messages.STATUS_READY:
                await self._thread(domain, session.acme.begin_finalization, order)
            await self._sleep(_retry_after(response, delay), deadline, domain)
            delay = min(delay * 2, self._poll_interval)


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (mode 0600) via a temp file, fsync and rename."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
