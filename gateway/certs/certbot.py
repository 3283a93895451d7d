"""Decides what to (re)issue and when, installs the result and tells the proxy.

Per base domain: issue if there is no certificate, renew when less than ``renew_before``
remains, otherwise look again after ``check_interval`` (each plus a random ``jitter``, so a
fleet does not hit the CA at the same second). A failure leaves the served certificate alone
and retries after ``backoff_initial`` doubling up to ``backoff_max``. ``renew_now`` re-issues
on demand. A successful issuance is written atomically (``disk.install``) and then
``on_change()`` is called, which the proxy hooks to its reload.

Optional extras, both off by default: CAA records pinning ``caa_issuer`` and our ACME account
(``issue``/``issuewild`` ``"<ca>;validationmethods=dns-01;accounturi=<uri>"``), published
before each order, and a TDX quote over each new key (see ``attestation.py``). If a quote is
required but the TEE fails, the new certificate is not installed (fail closed).

Wall-clock time (``clock``, for certificate validity) and the monotonic clock (for
deadlines) are injected.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import random
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.certs import attestation, disk
from gateway.certs.acme import AcmeClient, IssuedCertificate, PropagationCheck
from gateway.certs.dns.base import CaaRecord, DnsProvider
from gateway.certs.dns.factory import build_providers
from gateway.certs.errors import CertError
from gateway.certs.settings import AcmeSettings, resolve_certs_dir
from gateway.config import Config
from gateway.tee.base import TeeBackend, TeeError

__all__ = ["Certbot", "DomainStatus", "RenewResult", "caa_records", "certs_dir_of"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RenewResult:
    """The outcome of one check: whether a new certificate was installed, and what is served."""

    domain: str
    renewed: bool
    serial: int | None
    not_after: float | None


@dataclass(frozen=True, slots=True)
class DomainStatus:
    """For operators: what is served, when the next check is, and the last failure if any."""

    domain: str
    serial: int | None
    not_after: float | None
    next_check: float
    failures: int
    last_error: str | None


@dataclass(slots=True)
class _State:
    next_check: float = 0.0
    failures: int = 0
    last_error: str | None = None


def certs_dir_of(config: Config) -> Path:
    """``acme.certs_dir``, or ``<core.data_dir>/certs`` when it is empty (the proxy's
    ``certs_dir`` follows the same rule, :func:`~gateway.certs.settings.resolve_certs_dir`)."""
    return resolve_certs_dir(config.acme.certs_dir, config.core.data_dir)


def caa_records(issuer: str, account_uri: str) -> list[CaaRecord]:
    """``issue`` and ``issuewild`` pinning ``issuer``, DNS-01 and our account (RFC 8657)."""
    value = f"{issuer};validationmethods=dns-01;accounturi={account_uri}"
    return [CaaRecord(0, "issue", value), CaaRecord(0, "issuewild", value)]


class Certbot:
    """Keeps a ``*.<base>`` + ``<base>`` certificate current for every configured domain."""

    def __init__(
        self,
        settings: AcmeSettings,
        *,
        acme: AcmeClient,
        providers: Mapping[str, DnsProvider],
        certs_dir: Path,
        on_change: Callable[[], Any],
        tee: TeeBackend | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        propagation: PropagationCheck | None = None,
    ) -> None:
        for i, d in enumerate(settings.domains):
            if d.dns not in providers:
                raise ValueError(
                    f"acme.domains[{i}].dns = {d.dns!r} names no [dns.credentials] entry"
                )
        if settings.quote_binding and tee is None:
            raise ValueError("acme.quote_binding = true needs a TEE backend")
        self._settings = settings
        self._acme = acme
        self._providers = {d.base_domain: providers[d.dns] for d in settings.domains}
        self._certs_dir = certs_dir
        self._on_change = on_change
        self._tee = tee if settings.quote_binding else None
        self._clock = clock
        self._monotonic = monotonic
        self._rng = rng or random.Random()
        self._propagation = propagation
        self._state = {d: _State() for d in self._providers}
        self._locks = {d: asyncio.Lock() for d in self._providers}
        self._wake = asyncio.Event()

    @classmethod
    def from_config(
        cls,
        config: Config,
        *,
        on_change: Callable[[], Any],
        tee: TeeBackend | None = None,
    ) -> Certbot:
        """Wire a certbot from the whole configuration (providers read their secrets here)."""
        s = config.acme
        used = {d.dns for d in s.domains}
        creds = {k: v for k, v in config.dns.credentials.items() if k in used}
        missing = used - set(creds)
        if missing:
            raise CertError(f"acme.domains name unknown DNS credentials: {sorted(missing)}")
        acme = AcmeClient(
            directory_url=s.directory_url,
            state_dir=config.core.data_dir / "acme",
            contact_email=s.contact_email,
            ca_bundle=Path(s.ca_bundle) if s.ca_bundle else None,
            poll_interval=s.poll_interval,
            propagation_wait=s.propagation_wait,
        )
        return cls(
            s,
            acme=acme,
            providers=build_providers(creds),
            certs_dir=certs_dir_of(config),
            on_change=on_change,
            tee=tee,
        )

    async def close(self) -> None:
        """Close the providers' connections."""
        for provider in set(self._providers.values()):
            await provider.close()

    @property
    def domains(self) -> list[str]:
        return list(self._providers)

    def adopt_state(self, previous: Certbot, domains: Collection[str]) -> None:
        """Carry ``domains``' schedule, failure count and back-off over from ``previous``.

        A rebuild (the operator added a base domain elsewhere, or edited another credential)
        must not reset a failing domain's back-off: it would be retried at once, and
        repeated admin edits would turn into a stream of CA requests and spend its rate
        limits. The caller passes only the domains whose settings did not change: a domain
        whose credential was just fixed should be retried now.
        """
        for domain in domains:
            if domain in self._state and domain in previous._state:
                self._state[domain] = dataclasses.replace(previous._state[domain])

    def account_uri(self) -> str | None:
        return self._acme.stored_account_uri()

    def status(self) -> list[DomainStatus]:
        out = []
        for domain, st in self._state.items():
            cur = disk.current(self._certs_dir, domain)
            out.append(
                DomainStatus(
                    domain=domain,
                    serial=cur.serial if cur else None,
                    not_after=cur.not_after if cur else None,
                    next_check=st.next_check,
                    failures=st.failures,
                    last_error=st.last_error,
                )
            )
        return out

    def acme_info(self) -> dict[str, Any]:
        """The ``/acme-info`` JSON document (the proxy serves it)."""
        return attestation.acme_info(self._certs_dir, self.domains, self.account_uri())

    # --- account and CAA (upstream's SetCaa and RotateAcmeCredentials) ----------------------

    async def _pin_caa(self, issuer: str, uri: str) -> list[str]:
        """CAA pinning ``issuer`` and ``uri`` on every domain; CertError names the failures."""
        done, failed = [], []
        for domain, provider in self._providers.items():
            try:
                await provider.set_caa(domain, caa_records(issuer, uri))
                done.append(domain)
            except CertError as exc:
                failed.append(f"{domain}: {exc}")
        if failed:
            ok = f" (updated: {', '.join(done)})" if done else ""
            raise CertError(f"CAA not updated for {'; '.join(failed)}{ok}")
        return done

    async def publish_caa(self, issuer: str) -> tuple[str, list[str]]:
        """Pin ``issuer`` and our account (registered if needed) in CAA for every domain now.

        Returns (account URI, domains updated); raises CertError.
        """
        deadline = self._monotonic() + self._settings.issue_timeout
        uri = await self._acme.account_uri(deadline)
        return uri, await self._pin_caa(issuer, uri)

    async def rotate_account(self, *, key_change: bool = False) -> tuple[str, list[str]]:
        """A new account key (see ``AcmeClient.rotate_account``), then, as upstream does, the
        CAA records re-pinned to the account (when ``caa`` is on) and the account re-quoted
        (with ``quote_binding``); the proxy is told (``on_change``: ``/acme-info`` changed).

        Every domain's lock is held meanwhile, so no order runs under a key being replaced.
        Returns (account URI, domains whose CAA was updated); raises CertError.
        """
        deadline = self._monotonic() + self._settings.issue_timeout
        async with contextlib.AsyncExitStack() as stack:
            for lock in self._locks.values():
                await stack.enter_async_context(lock)
            uri = await self._acme.rotate_account(deadline, key_change=key_change)
            try:
                updated: list[str] = []
                if self._settings.caa:
                    updated = await self._pin_caa(self._settings.caa_issuer, uri)
                if self._tee is not None:
                    await self._quote_account(uri)
            except CertError as exc:
                await self._notify()
                raise CertError(f"the ACME account is now {uri}, but: {exc}") from exc
        await self._notify()
        return uri, updated

    def due(self, domain: str) -> bool:
        """True if ``domain`` has no readable certificate or it expires within renew_before."""
        cur = disk.current(self._certs_dir, domain)
        return cur is None or cur.not_after - self._clock() < self._settings.renew_before

    # --- one domain ------------------------------------------------------------------------

    async def renew_now(self, domain: str, force: bool = True) -> RenewResult:
        """Issue for ``domain`` now (if ``force`` or due); raise CertError, old cert kept."""
        if domain not in self._providers:
            raise CertError(f"{domain} is not a configured base domain")
        async with self._locks[domain]:
            st = self._state[domain]
            if not force and not self.due(domain):
                cur = disk.current(self._certs_dir, domain)
                assert cur is not None
                self._schedule_ok(domain, cur.not_after)
                return RenewResult(domain, False, cur.serial, cur.not_after)
            try:
                issued = await self._issue(domain)
            except CertError as exc:
                st.failures += 1
                st.last_error = str(exc)
                backoff = min(
                    self._settings.backoff_initial * 2 ** min(st.failures - 1, 32),
                    self._settings.backoff_max,
                )
                st.next_check = (
                    self._clock()
                    + backoff
                    + self._rng.uniform(0, min(self._settings.jitter, backoff / 2))
                )
                logger.warning(
                    "certificate for %s not renewed (attempt %d, retry in %.0fs): %s",
                    domain,
                    st.failures,
                    backoff,
                    exc,
                )
                raise
            st.failures, st.last_error = 0, None
            self._schedule_ok(domain, issued.not_after)
            await self._notify()
            return RenewResult(domain, True, issued.serial, issued.not_after)

    def _schedule_ok(self, domain: str, not_after: float) -> None:
        now = self._clock()
        s = self._settings
        due_at = not_after - s.renew_before
        # never sooner than backoff_initial (a CA whose certificates live shorter than
        # renew_before must not be asked in a tight loop), never later than check_interval
        at = max(min(due_at, now + s.check_interval), now + s.backoff_initial)
        self._state[domain].next_check = at + self._rng.uniform(0, s.jitter)

    async def _issue(self, domain: str) -> IssuedCertificate:
        deadline = self._monotonic() + self._settings.issue_timeout
        provider = self._providers[domain]
        if self._settings.caa:
            uri = await self._acme.account_uri(deadline, domain)
            await provider.set_caa(domain, caa_records(self._settings.caa_issuer, uri))
        issued = await self._acme.issue(domain, provider, deadline, propagation=self._propagation)
        account_uri = self._acme.stored_account_uri() or ""
        if self._tee is not None and account_uri:
            await self._quote_account(account_uri)
        extra = {
            "meta.json": disk.write_meta(
                {
                    "domain": domain,
                    "serial": f"{issued.serial:x}",
                    "names": list(issued.names),
                    "not_before": issued.not_before,
                    "not_after": issued.not_after,
                    "directory_url": self._acme.directory_url,
                    "account_uri": account_uri,
                    "issued_at": self._clock(),
                }
            )
        }
        if self._tee is not None:
            try:
                extra[attestation.QUOTE_FILE] = await attestation.make_quote_document(
                    self._tee,
                    attestation.cert_report_data(issued.spki_der),
                    'sha512("zt-cert:" || SubjectPublicKeyInfo DER)',
                    {"public_key": issued.spki_der.hex(), "domain": domain},
                )
            except TeeError as exc:
                raise CertError(f"quote for the new {domain} key failed: {exc}") from exc
        try:
            await asyncio.to_thread(
                disk.install,
                self._certs_dir,
                domain,
                issued.fullchain_pem,
                issued.key_pem,
                serial=issued.serial,
                extra=extra,
            )
        except OSError as exc:  # disk full, read-only, permissions: the old link is untouched
            raise CertError(f"cannot store the new {domain} certificate: {exc}") from exc
        return issued

    async def _quote_account(self, uri: str) -> None:
        path = self._certs_dir / attestation.ACCOUNT_QUOTE_FILE
        current = attestation.read_json(path)
        if current and current.get("account_uri") == uri:
            return
        assert self._tee is not None
        try:
            doc = await attestation.make_quote_document(
                self._tee,
                attestation.account_report_data(uri),
                'sha512("acme-account:" || account URI)',
                {"account_uri": uri},
            )
        except TeeError as exc:
            raise CertError(f"quote for the ACME account failed: {exc}") from exc
        self._certs_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(doc)
        tmp.replace(path)

    async def _notify(self) -> None:
        try:
            result = self._on_change()
            if inspect.isawaitable(result):
                await result
        except Exception:  # the cert is installed; a reload failure must not undo that
            logger.exception("on_change callback failed after installing a certificate")

    # --- the loop --------------------------------------------------------------------------

    async def check_all(self) -> list[RenewResult]:
        """Check every domain whose next check is due; failures are logged and rescheduled."""
        results = []
        now = self._clock()
        for domain, st in self._state.items():
            if st.next_check > now:
                continue
            try:
                results.append(await self.renew_now(domain, force=False))
            except CertError:
                pass  # logged and rescheduled by renew_now; the old certificate keeps serving
        return results

    def wake(self) -> None:
        """Make ``run`` look again now (e.g. after a configuration change)."""
        self._wake.set()

    async def run(self) -> None:
        """Check at start-up, then whenever the earliest domain is due. Cancel to stop."""
        while True:
            try:
                await self.check_all()
            except Exception:  # a bug must not end renewals for good: log, retry later
                logger.exception("certificate check failed unexpectedly")
            if not self._state:
                wait = self._settings.check_interval
            else:
                earliest = min(st.next_check for st in self._state.values())
                wait = min(max(earliest - self._clock(), 0.0), self._settings.check_interval)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=max(wait, 0.01))
            except TimeoutError:
                pass
