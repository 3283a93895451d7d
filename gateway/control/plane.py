"""The control plane of one gateway process: store, registry, operator state, certbot, admin API.

``async with ControlPlane(config, ...) as plane:`` opens the registry store, builds the
:class:`~gateway.registry.service.Registry`, the :class:`OperatorState` (the configuration's
base domains, DNS credentials and admission policy merged with the runtime ones), the
certificate manager (a certbot only with ``[acme] enabled``), and serves the admin API, the
dashboard and ``/metrics`` on ``admin.listen`` (``host:port`` or ``unix:/path``). Leaving the
block stops them in reverse order. ``gateway serve`` runs it in the supervisor process.

Hooks for the data plane, all optional:

* ``counters()``: the proxy's summed worker counters (``gateway.proxy.stats.read_stats``);
* ``accel()``: its acceleration modes (shown as upstream's ``accel``);
* ``on_cert_change()``: called after a certificate is installed or the ACME account changed
  (the proxy's reload), once ``/acme-info`` and ``/app-info`` are republished
  (:mod:`gateway.control.gateway_info`, read by the workers on that reload);
* ``on_routes_change()``: called after custom-domain routes, drains or port-policy overrides
  change, once the routing overlay file (:mod:`gateway.control.overlay`) has been rewritten;
  the proxy workers re-read it.

The registration RPC takes :meth:`ControlPlane.admission_policy` as its policy getter and
:meth:`ControlPlane.instrument` around its evidence check, so a policy changed through the
API applies to the next registration and verification latency shows in ``/metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import time
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from pathlib import Path
from types import TracebackType
from typing import Any

from aiohttp import web

from gateway.attest.policy_settings import AdmissionPolicy
from gateway.certs.acme import AcmeClient, PropagationCheck
from gateway.certs.certbot import certs_dir_of
from gateway.certs.settings import AcmeSettings
from gateway.config import Config
from gateway.control.admin import create_admin_app
from gateway.control.auth import Credentials, load_credentials
from gateway.control.auth_webhook import WebhookStats
from gateway.control.certmanager import CertManager
from gateway.control.collectors import (
    AdminStats,
    EvidenceCheck,
    RegistrationStats,
    VerificationStats,
    admin_stats_middleware,
    certificate_collector,
    instance_collector,
    instrument_check,
    proxy_collector,
)
from gateway.control.dashboard import DASHBOARD
from gateway.control.gateway_info import InfoPublisher
from gateway.control.metrics import metrics_endpoint
from gateway.control.models import BaseDomain, Topic
from gateway.control.overlay import Overlay, overlay_path, write_overlay
from gateway.control.readiness import Readiness, store_check
from gateway.control.resources.acme import acme_endpoints
from gateway.control.resources.admission import admission_endpoints
from gateway.control.resources.certificates import certificate_endpoints
from gateway.control.resources.dns import dns_endpoints
from gateway.control.resources.domains import domain_endpoints
from gateway.control.resources.instances import instance_endpoints
from gateway.control.resources.routes import route_endpoints
from gateway.control.resources.status import prpc_endpoints, status_document
from gateway.control.roles import rpc_identity_kind
from gateway.control.rpc_identity import tee_from_settings
from gateway.control.state import OperatorState
from gateway.proxy.info_file import info_path
from gateway.registry.factory import build_registry, open_store, store_path
from gateway.registry.service import PeerDevice, Registry
from gateway.registry.store import Store
from gateway.tee.base import TeeBackend

logger = logging.getLogger(__name__)

__all__ = ["ControlPlane", "build_admin_app", "parse_listen"]

VERSION = "0.1.0"
Hook = Callable[[], Any]


def parse_listen(listen: str) -> tuple[str, int] | Path:
    """``host:port`` (``[::1]:port``) -> (host, port); ``unix:/path`` -> Path."""
    if listen.startswith("unix:"):
        return Path(listen[5:])
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def build_admin_app(
    *,
    creds: Credentials,
    state: OperatorState,
    registry: Registry,
    certs: CertManager,
    node: Mapping[str, Any],
    counters: Callable[[], Mapping[str, Any]] = dict,
    accel: Callable[[], Mapping[str, Any]] = dict,
    verification: VerificationStats | None = None,
    registrations: RegistrationStats | None = None,
    webhook: WebhookStats | None = None,
    failures_per_minute: int = 10,
    clock: Callable[[], float] = time.time,
    readiness: Readiness | None = None,
) -> web.Application:
    """The admin app with every resource, the dashboard and ``/metrics`` (tests use it too)."""
    status = status_document(
        node=node,
        registry=registry,
        state=state,
        certs=certs,
        counters=counters,
        accel=accel,
        clock=clock,
    )
    admin_stats = AdminStats()
    collectors = [
        instance_collector(registry, state, clock),
        certificate_collector(certs),
        proxy_collector(counters),
        admin_stats.collect,
    ]
    if verification is not None:
        collectors.append(verification.collect)
    if registrations is not None:
        collectors.append(registrations.collect)
    if webhook is not None:
        collectors.append(webhook.collect)
    resources = [
        *instance_endpoints(state, registry, clock),
        *domain_endpoints(state, certs.status),
        *dns_endpoints(state),
        *certificate_endpoints(certs),
        *acme_endpoints(certs),
        *route_endpoints(state),
        *admission_endpoints(state),
        *prpc_endpoints(status, state, certs),
        metrics_endpoint(collectors),
    ]
    app = create_admin_app(
        creds,
        status=status,
        resources=resources,
        dashboard=DASHBOARD,
        failures_per_minute=failures_per_minute,
        readiness=readiness,
    )
    app.middlewares.insert(0, admin_stats_middleware(admin_stats))
    return app


def restrict_store_files(path: Path) -> None:
    """Make the registry database owner-only: it holds the DNS credentials' secrets.

    SQLite creates the ``-wal`` and ``-shm`` files with the database file's mode, so fixing
    the main file (and any that exist already) covers them.
    """
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            if p.stat().st_mode & 0o077:
                os.chmod(p, 0o600)
        except FileNotFoundError:
            continue
        except OSError as exc:
            logger.warning("cannot make %s owner-only (it holds DNS secrets): %s", p, exc)


class ControlPlane:
    """See the module docstring. Attributes are valid inside the ``async with`` block."""

    def __init__(
        self,
        config: Config,
        *,
        counters: Callable[[], Mapping[str, Any]] = dict,
        accel: Callable[[], Mapping[str, Any]] = dict,
        on_cert_change: Hook = lambda: None,
        on_routes_change: Hook = lambda: None,
        device: PeerDevice | None = None,
        tee: TeeBackend | None = None,
        propagation: PropagationCheck | None = None,
        creds: Credentials | None = None,
        store: Store | None = None,
        registry: Registry | None = None,
    ) -> None:
        """``store``/``registry``: the tunnel's (``gateway.registry.runtime.open_tunnel``) when
        it runs in the same process; otherwise the plane opens the store itself (and closes
        it) and builds a registry without a device (instances listed and removed from the
        store only)."""
        self.config = config
        self._given_store = store
        self._given_registry = registry
        self._counters = counters
        self._accel = accel
        self._on_cert_change = on_cert_change
        self._on_routes_change = on_routes_change
        self._device = device
        self._tee = tee
        self._propagation = propagation
        self._creds = creds
        self._stack = AsyncExitStack()
        self.verification = VerificationStats()
        self.registrations = RegistrationStats()  # count_registrations(rpc_app, this)
        self.webhook_stats = WebhookStats()  # the RPC's [auth_webhook] outcomes
        self.store: Store
        self.registry: Registry
        self.state: OperatorState
        self.certs: CertManager
        self.runner: web.AppRunner | None = None
        self.address: tuple[str, int] | Path | None = None
        self.overlay_file: Path = overlay_path(config.core.data_dir)
        self.info_file: Path = info_path(config.core.data_dir)
        self.info: InfoPublisher
        self.readiness = self._readiness_plan()

    def _readiness_plan(self) -> Readiness:
        """What ``/ready`` waits for. The plane marks its own steps; with a registration RPC
        configured (:func:`~gateway.control.roles.rpc_identity_kind`: the tunnel runs) the
        peers must be restored, which a registry handed in from ``open_tunnel`` has done
        before yielding, and whoever binds the registration RPC must call
        ``plane.readiness.mark("registration_rpc")`` once it listens."""
        ready = Readiness()
        ready.require("certbot", "the certificate manager has not started")
        if rpc_identity_kind(self.config):
            if self._given_registry is None:
                ready.require("peers_restored", "no tunnel: WireGuard peers not restored")
            else:
                ready.mark("peers_restored")
            ready.require("registration_rpc", "the registration RPC listener is not bound")
        return ready

    def admission_policy(self) -> AdmissionPolicy:
        """The policy in force (pass as the registration RPC's ``policy`` getter)."""
        return self.state.admission_policy()

    def instrument(self, check: EvidenceCheck) -> EvidenceCheck:
        """``check`` recording verification latency and outcomes for ``/metrics``."""
        return instrument_check(check, self.verification)

    async def __aenter__(self) -> ControlPlane:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stack.aclose()

    async def _start(self) -> None:
        cfg = self.config
        creds = self._creds or (load_credentials(cfg.admin) if cfg.admin.enabled else None)
        if self._given_registry is not None:
            self.registry = self._given_registry
            self.store = self._given_registry.store
        else:
            if self._given_store is not None:
                self.store = self._given_store
            else:
                self.store = await asyncio.to_thread(open_store, cfg.registry, cfg.core.data_dir)
                self._stack.callback(self.store.close)
            self.registry = build_registry(self.store, cfg.wg, cfg.registry, self._device)
        restrict_store_files(store_path(cfg.registry, cfg.core.data_dir))
        self.readiness.check("store", store_check(self.store))
        self.state = OperatorState(
            self.store,
            config_domains={
                d.base_domain: BaseDomain(d.base_domain, d.dns, source="config")
                for d in cfg.acme.domains
            },
            config_credentials=cfg.dns.credentials,
            config_policy=cfg.admission,
        )
        if self._tee is None:  # the gateway's own TEE: app-info, quotes over certificate keys
            self._tee = tee_from_settings(cfg.rpc_identity)

        def acme_client(s: AcmeSettings) -> AcmeClient:
            return AcmeClient(
                directory_url=s.directory_url,
                state_dir=cfg.core.data_dir / "acme",
                contact_email=s.contact_email,
                ca_bundle=Path(s.ca_bundle) if s.ca_bundle else None,
                poll_interval=s.poll_interval,
                propagation_wait=s.propagation_wait,
            )

        certs_dir = certs_dir_of(cfg)
        if cfg.acme.enabled and certs_dir != cfg.proxy.certs_dir:
            logger.warning(
                "acme.certs_dir (%s) is not proxy.certs_dir (%s): the proxy will not serve the "
                "certificates the certbot writes; leave both empty to use <data_dir>/certs",
                certs_dir,
                cfg.proxy.certs_dir,
            )
        self.certs = CertManager(
            cfg.acme,
            state=self.state,
            certs_dir=certs_dir,
            acme=acme_client(cfg.acme) if cfg.acme.enabled else None,
            acme_factory=acme_client,
            on_change=self._cert_changed,
            tee=self._tee,
            propagation=self._propagation,
        )
        self.info = InfoPublisher(self.info_file, self.certs.acme_info, self._tee)
        if self.info.publish():  # workers forked before this see it on the reload
            changed = self._on_cert_change()
            if inspect.isawaitable(changed):
                await changed
        await self.certs.start()
        self._stack.push_async_callback(self.certs.stop)
        self.readiness.mark("certbot")
        self.state.subscribe(Topic.DOMAINS, self.certs.reconfigure)
        self.state.subscribe(Topic.DOMAINS, self.info.publish)  # acme-info lists their keys
        self.state.subscribe(Topic.DOMAINS, self._routes_changed)  # base domains in the overlay
        self.state.subscribe(Topic.DNS, self.certs.reconfigure)
        self._publish_overlay()
        for topic in (Topic.ROUTES, Topic.DRAIN, Topic.PORT_POLICY):
            self.state.subscribe(topic, self._routes_changed)
        if creds is not None:
            await self._serve_admin(creds)

    def _cert_changed(self) -> Any:
        """A certificate was installed or the ACME account changed: republish the documents
        the workers serve, then tell the proxy (its reload re-reads them and the certs)."""
        self.info.publish()
        return self._on_cert_change()

    def _publish_overlay(self) -> None:
        write_overlay(self.overlay_file, Overlay.from_state(self.state))

    def _routes_changed(self) -> None:
        """Routes, drains or port policies changed: publish the overlay, then tell the proxy."""
        self._publish_overlay()
        self._on_routes_change()

    async def _serve_admin(self, creds: Credentials) -> None:
        cfg = self.config
        app = build_admin_app(
            creds=creds,
            state=self.state,
            registry=self.registry,
            certs=self.certs,
            node={"id": cfg.registry.node_id, "version": VERSION, "pid": os.getpid()},
            counters=self._counters,
            accel=self._accel,
            verification=self.verification,
            registrations=self.registrations,
            webhook=self.webhook_stats if cfg.auth_webhook.enabled else None,
            failures_per_minute=cfg.admin.auth_failures_per_minute,
            readiness=self.readiness,
        )
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        self._stack.push_async_callback(runner.cleanup)
        where = parse_listen(cfg.admin.listen)
        site: web.BaseSite
        if isinstance(where, Path):
            where.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                where.unlink()  # a stale socket from a previous run
            site = web.UnixSite(runner, str(where))
            await site.start()
            os.chmod(where, 0o660)
            self.address = where
        else:
            site = web.TCPSite(runner, where[0], where[1])
            await site.start()
            addr = runner.addresses[0]
            self.address = (str(addr[0]), int(addr[1]))
        self.runner = runner
        logger.info("admin API listening on %s", cfg.admin.listen)
