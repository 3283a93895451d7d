"""One control process: tunnel, registration RPC and control plane over one store.

``gateway control`` runs :func:`run_node`. With ``[rpc] cert_file`` set it opens the tunnel
(:func:`gateway.registry.runtime.open_tunnel`: key, WireGuard device, store, restore,
maintenance), hands its store and registry to the :class:`ControlPlane`, and serves the
registration RPC with the plane's hooks: the admission policy is read from the operator
state per registration (a ``PUT /api/v1/admission-policy`` applies to the next CVM, no
restart), verification latency and outcomes go to ``/metrics``, and the base domain told to
CVMs (``Info``, ``RegisterCvm``'s ``agent.domain``) follows the base domains added through
the API. Without ``[rpc]`` it is the control plane alone. Shutdown runs in reverse: RPC
listener, admin API and certbot, then the tunnel (device stopped by PID, store closed).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.attest.collateral import collateral_source_from_settings
from gateway.attest.evidence import EvidenceError, RejectReason
from gateway.attest.quote import verifier_from_settings
from gateway.attest.verifier import TrustAnchors
from gateway.config import Config
from gateway.control.models import Topic
from gateway.control.plane import ControlPlane
from gateway.control.registration import (
    RegistrationService,
    advertised_from_config,
    create_rpc_app,
    evidence_check,
    load_kms_root,
)
from gateway.control.tls_server import TlsCredentials, TlsSite
from gateway.registry.runtime import Tunnel, open_tunnel

logger = logging.getLogger(__name__)

__all__ = ["run_node"]


def _undecodable(quote: bytes) -> object:
    """Placeholder collateral: only reached when the presented quote did not decode."""
    raise EvidenceError(RejectReason.MALFORMED, "the presented quote does not decode")


async def _serve_rpc(
    cfg: Config, plane: ControlPlane, tunnel: Tunnel, stack: AsyncExitStack
) -> None:
    rpc = cfg.rpc
    creds = TlsCredentials(  # pyOpenSSL: self-signed RA-TLS and KMS chains reach the check
        Path(rpc.cert_file),
        Path(rpc.key_file),
        Path(rpc.client_ca_file) if rpc.client_ca_file else None,
    )
    verifier = verifier_from_settings(cfg.attest)
    anchors = TrustAnchors(
        collateral=_undecodable,
        root_ca_der=None if verifier.uses_intel_root else verifier.root_ca_der,
        kms_root=load_kms_root(rpc.kms_root_file),
        tcb_policy=cfg.attest.tcb_policy(),
    )
    check = evidence_check(
        source=collateral_source_from_settings(cfg.attest),
        anchors=anchors,
        policy=plane.admission_policy,  # read per registration: runtime changes apply
    )
    base = advertised_from_config(cfg, tunnel.public_key)
    service = RegistrationService(tunnel.registry, plane.instrument(check), base)

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
    runner = web.AppRunner(create_rpc_app(service), access_log=None)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    await TlsSite(
        runner, rpc.address, rpc.port, creds, handshake_timeout=rpc.handshake_timeout
    ).start()
    logger.info("registration RPC on https://%s:%d", rpc.address, rpc.port)


async def run_node(
    cfg: Config,
    stop: asyncio.Event,
    *,
    counters: Callable[[], Mapping[str, Any]] = dict,
    notify: Callable[[], Any] = lambda: None,
) -> None:
    """Run until ``stop`` is set; start-up failures raise with nothing left running."""
    async with AsyncExitStack() as stack:
        tunnel = await stack.enter_async_context(open_tunnel(cfg)) if cfg.rpc.cert_file else None
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
        if tunnel is not None:
            await _serve_rpc(cfg, plane, tunnel, stack)
        logger.info("control plane running")
        await stop.wait()
        logger.info("control plane stopping")
