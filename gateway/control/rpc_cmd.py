"""``gateway rpc --config FILE``: the tunnel node alone (registration RPC + WireGuard).

The same node as ``gateway control`` (:func:`gateway.control.node.run_node`: the RPC built
by :mod:`gateway.control.rpc_server`, with the attested RA-TLS identity of
``[rpc_identity] tee`` or ``rpc.cert_file``, the tunnel's device, registry and maintenance,
the admission policy of the operator state), with the admin API and the certbot switched
off whatever ``[admin]`` and ``[acme]`` say. For a node that only admits CVMs, the lab and
tests; a gateway runs ``gateway serve``, whose one control child is ``gateway control``.
Runs until SIGTERM/SIGINT, then stops the listener, the maintenance task and our
wireguard-go (by PID). Exit codes as ``gateway control``'s; 2 also when no RPC identity is
configured.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gateway.config import ConfigError, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="the TOML configuration")


def run(args: argparse.Namespace) -> int:
    from gateway.control.cli import run_node_process
    from gateway.control.roles import NodeRoles, rpc_identity_kind

    try:
        cfg = load_config(args.config)
    except (ConfigError, ValueError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    kind = rpc_identity_kind(cfg)
    if not kind:
        sys.stderr.write(
            "error: set [rpc_identity] tee, or rpc.cert_file and rpc.key_file "
            "(with rpc.enabled = true)\n"
        )
        return 2
    return run_node_process(cfg, roles=NodeRoles(kind, admin=False, acme=False))
