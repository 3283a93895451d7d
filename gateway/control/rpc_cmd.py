"""``gateway rpc --config FILE``: the tunnel node alone (registration RPC + WireGuard).

Serves ``/prpc/RegisterCvm`` and ``/prpc/Info`` on ``[rpc]`` over TLS (pyOpenSSL,
:class:`gateway.control.tls_server.TlsSite`, so self-signed RA-TLS client certificates and
KMS chains reach the evidence check), with the device,
registry and maintenance task of :func:`gateway.registry.runtime.open_tunnel`; evidence is
checked against ``[attest]`` and ``[admission]``. Runs until SIGTERM/SIGINT, then stops the
listener, the maintenance task and our wireguard-go (by PID). Useful on its own (a gateway
node that only admits CVMs), for the lab and the demo; ``gateway serve`` composes the same
pieces with the proxy and the admin API.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from aiohttp import web

from gateway.attest.collateral import CollateralError, collateral_source_from_settings
from gateway.attest.evidence import EvidenceError, RejectReason
from gateway.attest.quote import verifier_from_settings
from gateway.attest.verifier import TrustAnchors
from gateway.config import Config, ConfigError, load_config
from gateway.control.registration import (
    RegistrationService,
    advertised_from_config,
    create_rpc_app,
    evidence_check,
    load_kms_root,
)
from gateway.control.rpc_identity import (
    RpcIdentityError,
    identity_from_settings,
    rpc_server_credentials,
)
from gateway.control.tls_server import TlsServerError, TlsSite, server_context
from gateway.registry.runtime import open_tunnel
from gateway.tunnel.errors import TunnelError
from gateway.util.tasks import spawn

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="the TOML configuration")


def _undecodable(quote: bytes) -> object:
    """Placeholder collateral: only reached when the presented quote did not decode."""
    raise EvidenceError(RejectReason.MALFORMED, "the presented quote does not decode")


async def serve(cfg: Config, stop: asyncio.Event) -> None:
    """Run until ``stop`` is set; raises on start-up failures (nothing is left running)."""
    rpc = cfg.rpc
    identity = identity_from_settings(cfg.rpc_identity, cfg.core.data_dir)  # RA-TLS, renewed
    client_ca = Path(rpc.client_ca_file) if rpc.client_ca_file else None
    creds = rpc_server_credentials(identity, rpc.cert_file, rpc.key_file, client_ca)
    server_context(creds)  # unreadable or mismatched files: fail before opening the tunnel
    verifier = verifier_from_settings(cfg.attest)  # logs a non-Intel root loudly
    anchors = TrustAnchors(
        collateral=_undecodable,
        root_ca_der=None if verifier.uses_intel_root else verifier.root_ca_der,
        kms_root=load_kms_root(rpc.kms_root_file),
        tcb_policy=cfg.attest.tcb_policy(),
    )
    check = evidence_check(
        source=collateral_source_from_settings(cfg.attest),
        anchors=anchors,
        policy=lambda: cfg.admission,
    )
    async with open_tunnel(cfg) as tunnel:
        service = RegistrationService(
            tunnel.registry, check, advertised_from_config(cfg, tunnel.public_key)
        )
        runner = web.AppRunner(create_rpc_app(service), access_log=None)
        await runner.setup()
        renew = None
        try:
            site = TlsSite(
                runner, rpc.address, rpc.port, creds, handshake_timeout=rpc.handshake_timeout
            )
            await site.start()
            logger.info("registration RPC on https://%s:%d", rpc.address, rpc.port)
            renew = spawn(identity.run(site.reload), name="rpc-identity") if identity else None
            await stop.wait()
        finally:
            if renew is not None:
                renew.cancel()
            await runner.cleanup()


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    if not cfg.rpc.cert_file and not cfg.rpc_identity.tee:
        sys.stderr.write("error: set [rpc_identity] tee, or rpc.cert_file and rpc.key_file\n")
        return 2

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(cfg, stop)

    try:
        asyncio.run(main())
    except (
        TunnelError,
        CollateralError,
        RpcIdentityError,
        TlsServerError,
        OSError,
        ValueError,
    ) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    return 0
