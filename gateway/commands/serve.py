"""``gateway serve --config FILE``: run the gateway: proxy supervisor, workers, control plane.

Configuration errors are reported before anything binds (exit code 2). SIGHUP re-reads
certificates and the ``[[proxy.routes]]`` of the same file in every worker; SIGTERM or Ctrl-C
drains (see ``docs/proxy.md``). With ``proxy.registry_routes`` (the default) every worker also
follows the tunnel registry's SQLite file (``[registry]``) and routes to registered CVMs.
The supervisor's PID is in ``<core.data_dir>/run/gateway.pid`` while it runs.

The control process (``gateway control``: registration RPC + tunnel with an attested RA-TLS
identity from ``[rpc_identity] tee`` or ``rpc.cert_file``, certbot, admin API) runs as ONE
supervised child (spawned, restarted with back-off if it dies, stopped by PID after the
workers drained; :mod:`gateway.commands.control_process`); it signals the supervisor
(SIGHUP) after a certificate is installed or the operator changed routes, drains or port
policies, and every worker's route reload applies the routing overlay it publishes
(``docs/operations.md``). It starts when it has something to run
(:func:`gateway.control.roles.node_roles`): a registration RPC, ``[acme]``, or an admin API
with credentials. The admin API is never served without credentials: without, the RPC and
certbot run and a warning says the API is off (``admin.required = true`` makes that exit 2
instead); a proxy-only configuration runs without the child. ``--no-control`` never starts
it (the proxy alone, e.g. when the control node runs elsewhere).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from gateway.commands.control_process import ControlProcess, control_child
from gateway.config import Config, ConfigError, load_config
from gateway.proxy.listeners import RouteFeed
from gateway.proxy.routes import RouteTable, StaticRoutes
from gateway.proxy.stats import stats_dir_of
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
        help="do not start the control child (registration RPC, tunnel, certbot, admin API)",
    )


def registry_feed_factory(cfg: Config) -> Callable[[], RouteFeed] | None:
    """What each worker calls (after the fork) to follow the tunnel registry, if enabled."""
    if not cfg.proxy.registry_routes:
        return None
    from gateway.control.state import port_policy_overrides
    from gateway.proxy.registry_routes import feed_for_sqlite
    from gateway.registry.factory import store_path

    db = store_path(cfg.registry, cfg.core.data_dir)
    proxy = cfg.proxy

    def factory() -> RouteFeed:
        return feed_for_sqlite(
            db,
            refresh_every=proxy.registry_refresh_interval,
            stale_after=proxy.registry_stale_after,
            overrides=port_policy_overrides,  # the operator's port policies win
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
    try:
        control = not args.no_control and wants_control(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from gateway.control.overlay import OverlayRoutes, overlay_path, read_overlay

    overlay_file = overlay_path(cfg.core.data_dir)
    stats_dir = stats_dir_of(cfg.core.data_dir)

    def reload_routes() -> RouteTable:
        routes = load_config(path).proxy.routes if path is not None else cfg.proxy.routes
        return OverlayRoutes(StaticRoutes(routes), read_overlay(overlay_file))

    sidecars: list[ControlProcess] = []
    if control:  # at most one: the RPC, tunnel, certbot and admin API share its process
        sidecars.append(control_child(path, supervisor_pid, stats_dir))
    supervisor = Supervisor(
        cfg.proxy,
        stats_dir=stats_dir,
        reload_routes=reload_routes if path is not None or control else None,
        resolver=cfg.dns.resolver,
        registry_feed=registry_feed_factory(cfg),
        sidecars=sidecars,
    )
    if control:
        try:
            supervisor.routes = reload_routes()  # the overlay from the last run applies at once
        except ValueError as exc:
            logger.error("routing overlay unreadable, starting without it: %s", exc)
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
            for sidecar in sidecars:
                sidecar.stop()  # no-op after a normal shutdown
            pid_file.unlink(missing_ok=True)


def wants_control(cfg: Config) -> bool:
    """Whether to run the control child; ConfigError if its configuration must not run
    (the child decides the same way and logs why the admin API is off, if it is)."""
    from gateway.control.roles import node_roles

    roles = node_roles(cfg)
    if not roles.runs_anything and roles.admin_off:
        logger.warning("%s", roles.admin_off)  # no child to say so
    return roles.runs_anything
