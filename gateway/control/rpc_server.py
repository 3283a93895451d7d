"""The registration RPC of a control node, built in one place for every way it runs.

``gateway control`` (and ``gateway serve``'s control child, and ``gateway rpc``, which is the
same node without the admin API and the certbot: :mod:`gateway.control.node`) serve
``/prpc/RegisterCvm`` and ``/prpc/Info`` with what this module builds:

* the server identity: the attested RA-TLS certificate of ``[rpc_identity] tee`` (issued
  through our own TEE backend and renewed by a task that reloads the listener, see
  :mod:`gateway.control.rpc_identity`), or else the static ``rpc.cert_file``/``key_file``;
* the evidence check: the quote verifier and trust anchors of ``[attest]``, the KMS root of
  ``rpc.kms_root_file``, and the admission policy *getter* the caller passes (the control
  plane's operator state, so a policy changed through the admin API applies to the next
  registration), then, when ``[auth_webhook]`` is enabled, the operator's webhook
  (:mod:`gateway.control.auth_webhook`), all wrapped by the caller's ``instrument``
  (``/metrics``);
* the :class:`~gateway.control.registration.RegistrationService` over the tunnel's registry,
  and the pyOpenSSL :class:`~gateway.control.tls_server.TlsSite` that serves it.

It is split in two steps so that failures come before anything runs: :func:`prepare_rpc`
(no tunnel yet) issues or loads the certificate, checks that the pair loads, reads the trust
anchors; :func:`start_rpc` (with the tunnel open) starts the listener and the renewal task.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from gateway.attest.collateral import CollateralSource, collateral_source_from_settings
from gateway.attest.evidence import EvidenceError, RejectReason
from gateway.attest.policy_settings import AdmissionPolicy
from gateway.attest.quote import verifier_from_settings
from gateway.attest.verifier import TrustAnchors
from gateway.config import Config
from gateway.control.auth_webhook import (
    AuthWebhook,
    WebhookStats,
    WebhookTarget,
    load_webhook_target,
)
from gateway.control.policy_fetch import PortPolicyFetcher
from gateway.control.registration import (
    EvidenceCheck,
    RegistrationService,
    advertised_from_config,
    create_rpc_app,
    evidence_check,
    load_kms_root,
)
from gateway.control.rpc_identity import (
    RpcIdentity,
    identity_from_settings,
    rpc_server_credentials,
)
from gateway.control.tls_server import TlsCredentials, TlsSite, server_context
from gateway.registry.runtime import Tunnel
from gateway.util.tasks import spawn

logger = logging.getLogger(__name__)

__all__ = ["RpcPlan", "prepare_rpc", "start_rpc"]


def _undecodable(quote: bytes) -> object:
    """Placeholder collateral: only reached when the presented quote did not decode."""
    raise EvidenceError(RejectReason.MALFORMED, "the presented quote does not decode")


@dataclass(frozen=True, slots=True)
class RpcPlan:
    """What the RPC needs that does not need the tunnel (see :func:`prepare_rpc`)."""

    identity: RpcIdentity | None  # the attested identity to renew, or None (static files)
    creds: TlsCredentials
    anchors: TrustAnchors
    source: CollateralSource
    webhook: WebhookTarget | None = None  # [auth_webhook], token and CA read


def prepare_rpc(cfg: Config) -> RpcPlan:
    """Issue or load the server certificate, read the trust anchors and the webhook's token
    and CA, failing (with ``RpcIdentityError``, ``TlsServerError``, ``CollateralError``,
    ``ConfigError``, ``ValueError``) before
    any tunnel, listener or admin API exists. Blocking: the quote may take a while."""
    rpc = cfg.rpc
    identity = identity_from_settings(cfg.rpc_identity, cfg.core.data_dir)
    client_ca = Path(rpc.client_ca_file) if rpc.client_ca_file else None
    creds = rpc_server_credentials(identity, rpc.cert_file, rpc.key_file, client_ca)
    server_context(creds)  # unreadable or mismatched files: fail now, not at the first CVM
    verifier = verifier_from_settings(cfg.attest)  # logs a non-Intel root loudly
    anchors = TrustAnchors(
        collateral=_undecodable,
        root_ca_der=None if verifier.uses_intel_root else verifier.root_ca_der,
        kms_root=load_kms_root(rpc.kms_root_file),
        tcb_policy=cfg.attest.tcb_policy(),
    )
    source = collateral_source_from_settings(cfg.attest)
    return RpcPlan(identity, creds, anchors, source, load_webhook_target(cfg.auth_webhook))


async def start_rpc(
    cfg: Config,
    plan: RpcPlan,
    tunnel: Tunnel,
    stack: AsyncExitStack,
    *,
    policy: Callable[[], AdmissionPolicy],
    instrument: Callable[[EvidenceCheck], EvidenceCheck] = lambda check: check,
    configure: Callable[[RegistrationService], None] = lambda service: None,
    observe: Callable[[web.Application], web.Application] = lambda app: app,
    webhook_stats: WebhookStats | None = None,
) -> TlsSite:
    """Serve the RPC until ``stack`` closes (listener first, then the renewal task).

    ``policy`` is read per registration; ``configure`` sees the service before the first
    connection (the node keeps ``service.advertised`` in step with its base domains);
    ``observe`` may wrap the aiohttp app (the node counts registrations by outcome).
    """
    rpc = cfg.rpc
    check = evidence_check(source=plan.source, anchors=plan.anchors, policy=policy)
    if plan.webhook is not None:  # asked after the policy admits; inside instrument's timing
        webhook = AuthWebhook(plan.webhook, webhook_stats)
        stack.push_async_callback(webhook.close)  # after the listener stops (LIFO)
        check = webhook.wrap(check)
    service = RegistrationService(
        tunnel.registry, instrument(check), advertised_from_config(cfg, tunnel.public_key)
    )
    fetcher = PortPolicyFetcher(tunnel.store)  # CVMs that register without a port policy
    service.policy_fetch = fetcher.schedule
    stack.push_async_callback(fetcher.close)  # after the listener stops (LIFO)
    configure(service)
    runner = web.AppRunner(observe(create_rpc_app(service)), access_log=None)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    site = TlsSite(
        runner, rpc.address, rpc.port, plan.creds, handshake_timeout=rpc.handshake_timeout
    )
    await site.start()
    if plan.identity is not None:
        renew = spawn(plan.identity.run(site.reload), name="rpc-identity")

        async def stop_renewal() -> None:
            renew.cancel()
            await asyncio.wait([renew])  # no reload may race the listener's cleanup

        stack.push_async_callback(stop_renewal)  # runs before the runner's cleanup: LIFO
    kind = "attested RA-TLS" if plan.identity is not None else "certificate file"
    logger.info("registration RPC on https://%s:%d (%s identity)", rpc.address, rpc.port, kind)
    return site
