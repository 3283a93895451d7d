"""One control process: tunnel, registration RPC and control plane over one store.

``gateway control`` (alone, or as ``gateway serve``'s one control child) runs
:func:`run_node`; ``gateway rpc`` runs it too, without the admin API and the certbot. What
runs is decided by :func:`gateway.control.roles.node_roles`. With a registration RPC
configured (an attested RA-TLS identity from ``[rpc_identity] tee``, or ``rpc.cert_file``)
it prepares the RPC's certificate and trust anchors (:func:`gateway.control.rpc_server.
prepare_rpc`: a TEE or file problem fails before anything runs), opens the tunnel
(:func:`gateway.registry.runtime.open_tunnel`: key, WireGuard device, store, restore,
maintenance), hands its store and registry to the :class:`ControlPlane`, and serves the RPC
with the plane's hooks, whichever identity it presents: the admission policy is read from
the operator state per registration (a ``PUT /api/v1/admission-policy`` applies to the next
CVM, no restart), verification latency and outcomes go to ``/metrics``, and the base domain
told to CVMs (``Info``, ``RegisterCvm``'s ``agent.domain``) follows the base domains added
through the API. Without an RPC it is the control plane alone. The admin API is served only
with credentials (see :mod:`gateway.control.roles` for what happens without). Shutdown runs
in reverse: RPC listener and renewal task, admin API and certbot, then the tunnel (device
stopped by PID, store closed).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from typing import Any

from gateway.config import Config, ConfigError
from gateway.control.collectors import count_registrations
from gateway.control.models import Topic
from gateway.control.plane import ControlPlane
from gateway.control.registration import RegistrationService
from gateway.control.roles import NodeRoles, node_roles
from gateway.control.rpc_server import prepare_rpc, start_rpc
from gateway.registry.runtime import open_tunnel

logger = logging.getLogger(__name__)

__all__ = ["node_config", "run_node"]


def node_config(cfg: Config, roles: NodeRoles) -> Config:
    """``cfg`` as the node runs it: the admin API switched off when it is not to be served
    (the plane then never asks for credentials), the certbot off when not wanted."""
    if roles.admin == cfg.admin.enabled and roles.acme == cfg.acme.enabled:
        return cfg
    return dataclasses.replace(
        cfg,
        admin=dataclasses.replace(cfg.admin, enabled=roles.admin),
        acme=dataclasses.replace(cfg.acme, enabled=roles.acme),
    )


def _follow_base_domains(plane: ControlPlane) -> Callable[[RegistrationService], None]:
    """Keep what the RPC tells CVMs in step with the base domains added through the API."""

    def configure(service: RegistrationService) -> None:
        base = service.advertised

        def advertise() -> None:
            domains = plane.state.domains()
            first = domains[0] if domains else None
            service.advertised = dataclasses.replace(
                base,
                base_domain=first.domain if first else base.base_domain,
                external_port=first.port if first else base.external_port,
            )

        advertise()
        plane.state.subscribe(Topic.DOMAINS, advertise)

    return configure


async def run_node(
    cfg: Config,
    stop: asyncio.Event,
    *,
    roles: NodeRoles | None = None,
    counters: Callable[[], Mapping[str, Any]] = dict,
    notify: Callable[[], Any] = lambda: None,
) -> None:
    """Run until ``stop`` is set; start-up failures raise with nothing left running.

    ``roles`` defaults to :func:`node_roles` of ``cfg`` (``gateway rpc`` passes its own);
    a node with nothing to run raises the admin API's credential error (ConfigError).
    """
    if roles is None:
        roles = node_roles(cfg)
    if not roles.runs_anything:
        raise ConfigError(
            "admin",
            "nothing to run: the admin API has no credentials, and neither a registration "
            "RPC ([rpc_identity] tee or rpc.cert_file) nor [acme] is configured",
            f"set the {cfg.admin.token_env} environment variable, admin.token_file or "
            "admin.htpasswd_file",
        )
    if roles.admin_off:
        logger.warning("%s", roles.admin_off)
    cfg = node_config(cfg, roles)
    plan = await asyncio.to_thread(prepare_rpc, cfg) if roles.rpc else None
    async with AsyncExitStack() as stack:
        tunnel = await stack.enter_async_context(open_tunnel(cfg)) if plan else None
        plane = ControlPlane(
            cfg,
            counters=counters,
            accel=lambda: {
                "ktls": False,
                "splice_after_bytes": cfg.proxy.splice_after,
                "buffer_size": cfg.proxy.buffer_size,
            },
            on_cert_change=notify,
            on_routes_change=notify,
            store=tunnel.store if tunnel else None,
            registry=tunnel.registry if tunnel else None,
        )
        await stack.enter_async_context(plane)
        if plan is not None and tunnel is not None:
            await start_rpc(
                cfg,
                plan,
                tunnel,
                stack,
                policy=plane.admission_policy,  # read per registration: runtime changes apply
                instrument=plane.instrument,
                configure=_follow_base_domains(plane),
                observe=lambda app: count_registrations(app, plane.registrations),
                webhook_stats=plane.webhook_stats,
            )
            plane.readiness.mark("registration_rpc")
        logger.info(
            "control plane running (admin API %s, certbot %s, registration RPC %s)",
            "on" if roles.admin else "OFF",
            "on" if roles.acme else "off",
            roles.rpc or "off",
        )
        await stop.wait()
        logger.info("control plane stopping")
