"""Keeps the certbot in step with the operator state: base domains and DNS credentials.

:class:`~gateway.certs.certbot.Certbot` takes its domains and DNS providers at construction,
so a change through the admin API (a base domain added, a credential's secret rotated)
rebuilds it: the new certbot is built first (a build error keeps the old one running and is
reported in :meth:`CertManager.status`), then the old renewal loop is cancelled and its
providers closed, and the new loop starts, which issues at once for a domain without a
certificate. Renewal state (failures, backoff) starts afresh; what is served stays on disk.

Secrets of credentials created through the API come from the operator state: the provider
factory is given a lookup that answers their placeholder names (``stored-dns-secret:<id>``)
from the store, and every other name from the environment as usual.

Without ``[acme] enabled`` there is no certbot: status and history still read the
certificates directory (certificates placed there by hand or by ``gateway certs``).

The renewal schedule and the CA (upstream's ``GetCertbotConfig``/``SetCertbotConfig``) can be
changed at runtime: :meth:`CertManager.set_config` stores the changed fields of ``[acme]``
(:data:`RUNTIME_FIELDS`) in the registry store (table ``op_acme``, key ``certbot_config``),
validates the merged settings as the configuration file would, and rebuilds the certbot
with them (a new ACME client when ``directory_url`` changes: accounts are kept per
directory). A restart applies the stored overrides again; ``null`` drops one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from gateway.certs import attestation, disk
from gateway.certs.acme import AcmeClient, PropagationCheck
from gateway.certs.certbot import Certbot, DomainStatus, RenewResult
from gateway.certs.dns.factory import build_providers
from gateway.certs.errors import CertError
from gateway.certs.settings import AcmeDomain, AcmeSettings, DnsCredential
from gateway.config import env_value
from gateway.control.models import FieldError, RevisionMismatch
from gateway.control.state import OperatorState
from gateway.registry.store import Conflict
from gateway.tee.base import TeeBackend
from gateway.util.tasks import spawn

logger = logging.getLogger(__name__)

__all__ = ["RUNTIME_FIELDS", "AcmeDisabled", "CertManager", "NotConfigured", "UnknownDomain"]

T_ACME = "op_acme"
CONFIG_KEY = "certbot_config"
#: ``[acme]`` fields settable at runtime, with their JSON types
RUNTIME_FIELDS: dict[str, type] = {
    "directory_url": str,
    "renew_before": float,
    "check_interval": float,
    "issue_timeout": float,
    "jitter": float,
    "backoff_initial": float,
    "backoff_max": float,
    "caa": bool,
    "caa_issuer": str,
}


class AcmeDisabled(Exception):
    """Renewal was asked for but ``[acme] enabled`` is false."""


class UnknownDomain(Exception):
    """The domain is not a base domain."""


class NotConfigured(Exception):
    """The operation needs a setting that is not set (the message names it)."""


def _check_value(name: str, value: Any) -> Any:
    kind = RUNTIME_FIELDS.get(name)
    if kind is None:
        raise FieldError(name, f"not a runtime setting; known: {', '.join(RUNTIME_FIELDS)}")
    if value is None:
        return None
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise FieldError(name, f"expected a number of seconds, got {value!r}")
        return float(value)
    if not isinstance(value, kind):
        raise FieldError(name, f"expected a {kind.__name__}, got {value!r}")
    return value


class CertManager:
    """Owns the current :class:`Certbot` (if ACME is enabled) and answers status queries."""

    def __init__(
        self,
        settings: AcmeSettings,
        *,
        state: OperatorState,
        certs_dir: Path,
        acme: AcmeClient | None,
        on_change: Callable[[], Any],
        tee: TeeBackend | None = None,
        propagation: PropagationCheck | None = None,
        env: Callable[[str], str | None] = env_value,
        acme_factory: Callable[[AcmeSettings], AcmeClient] | None = None,
    ) -> None:
        """``acme_factory`` builds a client for another directory URL (runtime config)."""
        self.file_settings = settings
        self.state = state
        self.certs_dir = certs_dir
        self._acme_factory = acme_factory
        self._acme = acme if settings.enabled else None
        self.settings = settings
        self._overrides: dict[str, Any] = {}
        self._config_revision = 0
        try:
            self._load_overrides()
        except (FieldError, ValueError) as exc:  # the file's settings apply; say why
            logger.error("stored ACME settings ignored (%s); using the configuration file's", exc)
            self.settings, self._overrides = settings, {}
        self._on_change = on_change
        self._tee = tee
        self._propagation = propagation
        self._env = env
        self._certbot: Certbot | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._pending: asyncio.Task[None] | None = None
        self.last_error: str | None = None
        self._fingerprints: dict[str, str] = {}  # domain -> what its renewal depends on
        self._next_fingerprints: dict[str, str] = {}

    @property
    def enabled(self) -> bool:
        return self._acme is not None

    @property
    def certbot(self) -> Certbot | None:
        return self._certbot

    def directory_url(self) -> str | None:
        return self._acme.directory_url if self._acme is not None else None

    # --- runtime settings ------------------------------------------------------------------

    def _load_overrides(self) -> None:
        entry = self.state.store.kv_get(T_ACME, CONFIG_KEY)
        if entry is None or not isinstance(entry.value, dict):
            return
        self._apply({k: _check_value(k, v) for k, v in entry.value.items()}, entry.revision)

    def _apply(self, overrides: dict[str, Any], revision: int) -> None:
        """Validate the merged settings (ValueError as the file would give) and switch."""
        merged = dataclasses.replace(self.file_settings, **overrides)
        if self._acme is not None and merged.directory_url != self._acme.directory_url:
            if self._acme_factory is None:
                raise ValueError("directory_url cannot change here (no ACME client factory)")
            self._acme = self._acme_factory(merged)
        self.settings, self._overrides, self._config_revision = merged, overrides, revision

    def config(self) -> dict[str, Any]:
        """The settings in force (:data:`RUNTIME_FIELDS`), which of them were set at runtime,
        and the stored revision (for ``If-Match``)."""
        return {
            **{name: getattr(self.settings, name) for name in RUNTIME_FIELDS},
            "enabled": self.enabled,
            "overrides": sorted(self._overrides),
            "revision": self._config_revision,
        }

    async def set_config(self, changes: Mapping[str, Any], expect: int | None = None) -> None:
        """Merge ``changes`` (``None`` drops an override), validate, persist, then rebuild.

        Raises FieldError (bad field or value), RevisionMismatch (``expect`` is stale).
        """
        overrides = dict(self._overrides)
        for name, value in changes.items():
            checked = _check_value(name, value)
            if checked is None:
                overrides.pop(name, None)
            else:
                overrides[name] = checked
        previous = (self.settings, self._acme)
        before = (self._overrides, self._config_revision)
        try:
            self._apply(overrides, self._config_revision)
        except ValueError as exc:
            self.settings, self._acme = previous
            raise FieldError("body", str(exc)) from None
        try:
            entry = self.state.store.kv_put(T_ACME, CONFIG_KEY, overrides, expect_revision=expect)
        except Conflict as exc:
            self.settings, self._acme = previous
            self._overrides, self._config_revision = before
            raise RevisionMismatch(str(exc)) from None
        self._config_revision = entry.revision
        logger.info("ACME settings changed at runtime: %s", ", ".join(sorted(changes)) or "none")
        if self._acme is not None:
            self.reconfigure()
            await self.settled()

    # --- lifecycle -------------------------------------------------------------------------

    def _build(self) -> Certbot:
        assert self._acme is not None
        domains = self.state.domains()
        settings = dataclasses.replace(
            self.settings, domains=tuple(AcmeDomain(d.domain, d.dns_credential) for d in domains)
        )
        used = {d.dns_credential for d in domains}
        creds: dict[str, DnsCredential] = {
            k: v for k, v in self.state.config_credentials.items() if k in used
        }
        creds.update({c.id: c.settings() for c in self.state.credentials() if c.id in used})
        secrets = self.state.secrets()

        def lookup(name: str) -> str | None:
            return secrets[name] if name in secrets else self._env(name)

        certbot = Certbot(
            settings,
            acme=self._acme,
            providers=build_providers(creds, lookup),
            certs_dir=self.certs_dir,
            on_change=self._on_change,
            tee=self._tee,
            propagation=self._propagation,
        )
        self._next_fingerprints = {
            d.domain: _fingerprint(self.settings, d.dns_credential, creds, secrets) for d in domains
        }
        return certbot

    async def start(self) -> None:
        """Build and start the certbot (if enabled). Raises CertError on a bad credential."""
        if self._acme is None:
            return
        self._certbot = self._build()
        self._fingerprints = self._next_fingerprints
        self._task = spawn(self._certbot.run(), name="certbot")

    def reconfigure(self) -> None:
        """Rebuild soon (subscribed to domain and credential changes; runs on the loop)."""
        if self._acme is None:
            return
        self._pending = spawn(self._rebuild(), name="certbot-rebuild")

    async def settled(self) -> None:
        """Wait for a pending rebuild (so a renew right after an API change sees it)."""
        pending = self._pending
        if pending is not None and not pending.done():
            await asyncio.shield(pending)

    async def _rebuild(self) -> None:
        async with self._lock:
            try:
                fresh = self._build()
            except (CertError, ValueError) as exc:
                self.last_error = f"certbot not reconfigured: {exc}"
                logger.error("%s; the previous domains keep renewing", self.last_error)
                return
            previous, before = self._certbot, self._fingerprints
            unchanged = [d for d, f in self._next_fingerprints.items() if before.get(d) == f]
            if previous is not None:
                fresh.adopt_state(previous, unchanged)  # back-off survives unrelated edits
            await self._stop_current()
            self.last_error = None
            self._certbot = fresh
            self._fingerprints = self._next_fingerprints
            self._task = spawn(fresh.run(), name="certbot")
            logger.info("certbot reconfigured: %s", ", ".join(fresh.domains) or "no domains")

    async def _stop_current(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._certbot is not None:
            await self._certbot.close()
            self._certbot = None

    async def stop(self) -> None:
        if self._pending is not None and not self._pending.done():
            self._pending.cancel()
        async with self._lock:
            await self._stop_current()

    # --- queries ---------------------------------------------------------------------------

    def _known(self, domain: str) -> None:
        if domain not in {d.domain for d in self.state.domains()}:
            raise UnknownDomain(f"{domain} is not a base domain")

    def status(self, domain: str) -> dict[str, Any]:
        """What is served for ``domain`` and, with ACME, the renewal state."""
        cur = disk.current(self.certs_dir, domain) if _safe(domain) else None
        out: dict[str, Any] = {
            "domain": domain,
            "has_cert": cur is not None,
            "serial": f"{cur.serial:x}" if cur else None,
            "names": list(cur.names) if cur else [],
            "not_before": cur.not_before if cur else None,
            "not_after": cur.not_after if cur else None,
            "acme": self.enabled,
            "next_check": None,
            "failures": 0,
            "last_error": None,
        }
        st = self._domain_status(domain)
        if st is not None:
            out.update(next_check=st.next_check, failures=st.failures, last_error=st.last_error)
        return out

    def _domain_status(self, domain: str) -> DomainStatus | None:
        if self._certbot is None:
            return None
        return next((s for s in self._certbot.status() if s.domain == domain), None)

    def history(self, domain: str) -> list[disk.StoredCert]:
        self._known(domain)
        return disk.history(self.certs_dir, domain)

    async def renew(self, domain: str, force: bool) -> RenewResult:
        """Issue now (``force``) or only if due; raises AcmeDisabled, UnknownDomain, CertError."""
        self._known(domain)
        if self._acme is None:
            raise AcmeDisabled("ACME is disabled ([acme] enabled = false)")
        await self.settled()
        if self._certbot is None or domain not in self._certbot.domains:
            raise CertError(self.last_error or f"{domain} is not managed by the certbot yet")
        return await self._certbot.renew_now(domain, force=force)

    async def _running_certbot(self) -> Certbot:
        if self._acme is None:
            raise AcmeDisabled("ACME is disabled ([acme] enabled = false)")
        await self.settled()
        if self._certbot is None:
            raise CertError(self.last_error or "the certbot is not running")
        return self._certbot

    async def publish_caa(self) -> tuple[str, list[str]]:
        """Upstream's ``SetCaa``: pin ``caa_issuer`` and our account in CAA for every base
        domain now. Returns (account URI, domains); raises AcmeDisabled, NotConfigured,
        CertError."""
        certbot = await self._running_certbot()
        if not self.settings.caa_issuer:
            raise NotConfigured(
                "caa_issuer is not set (the CA's CAA domain, e.g. letsencrypt.org): set it in "
                "[acme] or with PUT /api/v1/acme/config"
            )
        return await certbot.publish_caa(self.settings.caa_issuer)

    async def rotate_account(self, *, key_change: bool = False) -> tuple[str, list[str]]:
        """Upstream's ``RotateAcmeCredentials`` (see ``Certbot.rotate_account``)."""
        certbot = await self._running_certbot()
        return await certbot.rotate_account(key_change=key_change)

    def acme_info(self) -> dict[str, Any]:
        """Upstream's ``/acme-info`` document plus the directory and account in use.

        Keys of every current base domain (read from the operator state, so a domain added or
        removed through the API shows at once, before the certbot is rebuilt)."""
        names = [d.domain for d in self.state.domains()]
        uri = self._acme.stored_account_uri() if self._acme is not None else None
        return {
            "enabled": self.enabled,
            "directory_url": self.directory_url(),
            **attestation.acme_info(self.certs_dir, names, uri),
        }


def _fingerprint(
    settings: AcmeSettings,
    credential: str,
    creds: Mapping[str, DnsCredential],
    secrets: Mapping[str, str],
) -> str:
    """A digest of what one domain's renewal depends on: the ACME settings (domains aside),
    its DNS credential and the stored secrets. Equal digests: keep the domain's back-off."""
    material = repr(
        (
            dataclasses.replace(settings, domains=()),
            credential,
            creds.get(credential),
            sorted(secrets.items()),
        )
    )
    return hashlib.sha256(material.encode()).hexdigest()


def _safe(name: str) -> bool:
    return bool(name) and not name.startswith(".") and "/" not in name and "\0" not in name
