"""``gateway serve --config FILE``: run the data plane (supervisor plus worker processes).

Configuration errors are reported before anything binds (exit code 2). SIGHUP re-reads
certificates and the ``[[proxy.routes]]`` of the same file in every worker; SIGTERM or Ctrl-C
drains (see ``docs/proxy.md``). With ``proxy.registry_routes`` (the default) every worker also
follows the tunnel registry's SQLite file (``[registry]``) and routes to registered CVMs.
When the registration RPC has an identity (``[rpc_identity] tee`` or ``rpc.cert_file``), the
supervisor also runs ``gateway rpc`` as a supervised child (registration RPC, WireGuard device,
registry maintenance; :mod:`gateway.commands.control_process`); ``--no-control`` opts out.
The supervisor's PID is in ``<core.data_dir>/run/gateway.pid`` while it runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from gateway.commands.control_process import ControlProcess, wants_control
from gateway.config import Config, ConfigError, load_config
from gateway.proxy.listeners import RouteFeed
from gateway.proxy.routes import RouteTable, StaticRoutes
from gateway.util.logs import setup_logging

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="TOML configuration file")
    parser.add_argument(
        "--workers", type=int, default=None, help="override proxy.workers (0 = one per CPU)"
    )
    parser.add_argument(
        "--no-control",
        action="store_true",
        help="do not start the registration RPC + WireGuard child even if [rpc] is configured",
    )


def registry_feed_factory(cfg: Config) -> Callable[[], RouteFeed] | None:
    """What each worker calls (after the fork) to follow the tunnel registry, if enabled."""
    if not cfg.proxy.registry_routes:
        return None
    from gateway.proxy.registry_routes import feed_for_sqlite
    from gateway.registry.factory import store_path

    db = store_path(cfg.registry, cfg.core.data_dir)
    proxy = cfg.proxy

    def factory() -> RouteFeed:
        return feed_for_sqlite(
            db,
            refresh_every=proxy.registry_refresh_interval,
            stale_after=proxy.registry_stale_after,
        )

    return factory


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from gateway.proxy.workers import Supervisor

    try:
        cfg = load_config(args.config)
        if args.workers is not None:
            cfg = replace(cfg, proxy=replace(cfg.proxy, workers=args.workers))
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    setup_logging(cfg.core.log_level, cfg.core.log_format)
    path = args.config
    supervisor_pid = os.getpid()

    def reload_routes() -> RouteTable:
        return StaticRoutes(load_config(path).proxy.routes)

    control = None
    if path is not None and wants_control(cfg) and not args.no_control:
        control = ControlProcess(path.resolve())
    supervisor = Supervisor(
        cfg.proxy,
        stats_dir=cfg.core.data_dir / "run" / "proxy",
        reload_routes=reload_routes if path is not None else None,
        registry_feed=registry_feed_factory(cfg),
        sidecars=(control,) if control is not None else (),
    )
    pid_file = cfg.core.data_dir / "run" / "gateway.pid"
    try:
        pid_file.parent.mkdir(parents=True, exist_ok=True)
        pid_file.write_text(f"{os.getpid()}\n")  # for `kill -HUP $(cat .../gateway.pid)`
    except OSError as exc:
        logger.warning("cannot write %s: %s", pid_file, exc)
    try:
        return supervisor.run()
    except OSError as exc:
        logger.error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if os.getpid() == supervisor_pid:  # never from a forked worker
            if control is not None:
                control.stop()  # no-op after a normal shutdown
            pid_file.unlink(missing_ok=True)
