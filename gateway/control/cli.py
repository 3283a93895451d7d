"""``gateway control --config FILE``: run the control plane as a process of its own.

With a registration RPC configured (an attested identity from ``[rpc_identity] tee``, or
``rpc.cert_file``) it is the whole control node (tunnel, registration RPC, admin API: see
:mod:`gateway.control.node`); without, the admin API and certbot alone. It serves the
admin API, the dashboard and ``/metrics`` (only with credentials: without, a node that has
an RPC or a certbot runs them and warns that the API is off, see
:mod:`gateway.control.roles`), keeps the certificates renewed and holds the
operator state (see :mod:`gateway.control.plane`). ``gateway serve`` starts it next
to the proxy's supervisor: a separate process, so the supervisor's forks never copy an event
loop, a SQLite connection or a thread, and a crash in one does not take the other down.

``--notify-pid PID`` (the proxy supervisor) gets ``SIGHUP`` after a certificate is installed
and after custom-domain routes, drains or port-policy overrides change: the supervisor
forwards it to its workers, which reload. ``--stats-dir DIR`` is where the proxy workers
write their counters (``worker-<n>.json``); status and ``/metrics`` show their sums.
SIGTERM or SIGINT stops it cleanly (exit 0).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.config import ConfigError, load_config
from gateway.util.logs import setup_logging

if TYPE_CHECKING:  # the plane pulls in aiohttp, acme, dnspython: only when it runs
    from gateway.config import Config
    from gateway.control.roles import NodeRoles

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="TOML configuration file")
    parser.add_argument(
        "--notify-pid", type=int, default=None, help="send SIGHUP here after changes to reload"
    )
    parser.add_argument(
        "--stats-dir", type=Path, default=None, help="the proxy workers' counter files"
    )


def signaller(pid: int | None) -> Callable[[], None]:
    """A hook that sends SIGHUP to ``pid`` (a gone process is logged, not fatal)."""

    def notify() -> None:
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGHUP)
        except ProcessLookupError:
            logger.warning("cannot notify pid %d of a change: no such process", pid)

    return notify


def stats_reader(stats_dir: Path | None) -> Callable[[], Mapping[str, Any]]:
    """The proxy workers' summed counters (they write them every ``stats_interval``)."""

    def read() -> Mapping[str, Any]:
        if stats_dir is None:
            return {}
        from gateway.proxy.stats import read_stats

        return read_stats(stats_dir)

    return read


async def serve(
    cfg: Config,
    *,
    roles: NodeRoles | None = None,
    notify_pid: int | None = None,
    stats_dir: Path | None = None,
) -> None:
    """Run the node until SIGTERM or SIGINT."""
    from gateway.control.node import run_node

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await run_node(
        cfg, stop, roles=roles, counters=stats_reader(stats_dir), notify=signaller(notify_pid)
    )


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run_node_process(cfg, notify_pid=args.notify_pid, stats_dir=args.stats_dir)


def run_node_process(
    cfg: Config,
    *,
    roles: NodeRoles | None = None,
    notify_pid: int | None = None,
    stats_dir: Path | None = None,
) -> int:
    """Run the node in this process until signalled; the exit code (2: configuration, 1: a
    start-up failure such as no quote from the TEE, an unusable certificate or tunnel)."""
    from gateway.attest.collateral import CollateralError
    from gateway.certs.errors import CertError
    from gateway.control.rpc_identity import RpcIdentityError
    from gateway.control.tls_server import TlsServerError
    from gateway.registry.store import StoreError
    from gateway.tunnel.errors import TunnelError

    setup_logging(cfg.core.log_level, cfg.core.log_format)
    try:
        asyncio.run(serve(cfg, roles=roles, notify_pid=notify_pid, stats_dir=stats_dir))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (
        CertError,
        StoreError,
        TunnelError,
        CollateralError,
        RpcIdentityError,
        TlsServerError,
        OSError,
        ValueError,
    ) as exc:
        logger.error("control plane failed: %s", exc)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
