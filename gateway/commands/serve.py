"""``gateway serve --config FILE``: run the gateway: proxy supervisor, workers, control plane.

Configuration errors are reported before anything binds (exit code 2). SIGHUP re-reads
certificates and the ``[[proxy.routes]]`` of the same file in every worker; SIGTERM or Ctrl-C
drains (see ``docs/proxy.md``). With ``proxy.registry_routes`` (the default) every worker also
follows the tunnel registry's SQLite file (``[registry]``) and routes to registered CVMs.
The supervisor's PID is in ``<core.data_dir>/run/gateway.pid`` while it runs.

The control plane (admin API, certbot, registration RPC and tunnel: ``gateway control``)
runs as a supervised child process (spawned, restarted with back-off if it dies, stopped by
PID after the workers drained);
it signals the supervisor (SIGHUP) after a certificate is installed or the operator changed
routes, drains or port policies, and every worker's route reload applies the routing overlay
it publishes (``docs/operations.md``). It starts when the admin API has credentials, or
``[acme]`` or ``[rpc]`` is enabled; ``[admin]`` enabled without credentials is an error
then (fail closed), and a proxy-only configuration runs without it (a warning says so).

An attested registration RPC (``[rpc_identity] tee`` without ``rpc.cert_file``, which
``gateway control`` does not serve) runs as another supervised child, ``gateway rpc``
(registration RPC with an RA-TLS identity, WireGuard device, registry maintenance;
:mod:`gateway.commands.control_process`), restarted if it dies; ``--no-control`` opts out.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from gateway.commands.control_process import ControlProcess, wants_tunnel_child
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
        help="do not start the attested registration RPC + WireGuard child ([rpc_identity])",
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
        control = wants_control(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from gateway.control.overlay import OverlayRoutes, overlay_path, read_overlay

    overlay_file = overlay_path(cfg.core.data_dir)
    stats_dir = cfg.core.data_dir / "run" / "proxy"

    def reload_routes() -> RouteTable:
        routes = load_config(path).proxy.routes if path is not None else cfg.proxy.routes
        return OverlayRoutes(StaticRoutes(routes), read_overlay(overlay_file))

    sidecars: list[ControlProcess] = []
    if control:
        sidecars.append(control_plane_child(path, supervisor_pid, stats_dir))
    if path is not None and wants_tunnel_child(cfg) and not args.no_control:
        sidecars.append(ControlProcess(path.resolve()))
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
    """Whether to run the control plane; ConfigError if the admin API would run open."""
    from gateway.control.auth import load_credentials

    needed = cfg.acme.enabled or bool(cfg.rpc.cert_file)
    if not cfg.admin.enabled:
        return needed
    try:
        load_credentials(cfg.admin)
    except ConfigError:
        if needed:
            raise  # a full gateway: refuse to start without admin credentials
        logger.warning(
            "admin API not started: no credentials (set %s, admin.token_file or "
            "admin.htpasswd_file); running the proxy only",
            cfg.admin.token_env,
        )
        return False
    return True


def control_plane_child(
    config: Path | None, supervisor_pid: int, stats_dir: Path
) -> ControlProcess:
    """``gateway control`` as a supervised child: spawned (its own interpreter, nothing of
    ours is forked), restarted with back-off if it dies, stopped by PID after the drain."""
    cmd = [sys.executable, "-m", "gateway", "control"]
    if config is not None:
        cmd += ["--config", str(config.resolve())]
    cmd += ["--notify-pid", str(supervisor_pid), "--stats-dir", str(stats_dir)]
    return ControlProcess(command=cmd, label="control plane", stop_grace=15.0)
