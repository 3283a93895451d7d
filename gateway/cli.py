"""Command-line entry point: ``python -m gateway <command> ...``.

Each command lives in its own module that exposes ``add_arguments(parser)`` and
``run(args) -> int``; this file only lists them, so that adding a command is one line in
:data:`COMMANDS` and imports stay lazy (``--help`` does not import the data plane).

Exit codes: 0 success, 1 failure of the operation (for ``attest``: evidence rejected),
2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# (command, module, one-line help)
COMMANDS: tuple[tuple[str, str, str], ...] = (
    (
        "serve",
        "gateway.commands.serve",
        "run the gateway: proxy workers and, when configured, the control process",
    ),
    ("demo", "gateway.commands.demo", "run a demo workload: lab namespaces as root, else loopback"),
    ("config", "gateway.commands.config_cmd", "check a configuration file and print it resolved"),
    ("ctl", "gateway.control.ctl", "operate a running gateway through its admin API"),
    (
        "control",
        "gateway.control.cli",
        "the control process alone: registration RPC, WireGuard, admin API, certbot",
    ),
    (
        "certs",
        "gateway.commands.certs_cmd",
        "issue/renew ACME certificates, status, custom domains",
    ),
    ("attest", "gateway.attest.cli", "verify TDX quotes; create simulated TDX PKIs and quotes"),
    ("rpc", "gateway.control.rpc_cmd", "the registration RPC + WireGuard alone (no admin API)"),
    ("lab", "gateway.lab.cli", "WireGuard lab: gateway and CVM namespaces (up/down/status)"),
    ("guest", "gateway.guest.cli", "the CVM side: boot, guest agent, dstack simulator"),
    ("guest-register", "gateway.guest.register_cmd", "the CVM side: attested gateway tunnel"),
)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser. Only ``command``'s module is imported (each command module may
    pull in heavy dependencies; ``gateway ctl`` should not pay for the data plane's)."""
    parser = argparse.ArgumentParser(
        prog="gateway",
        description="Attested TLS gateway for confidential VMs (dstack-compatible).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module, help_text in COMMANDS:
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.set_defaults(_module=module)
        if name == command:
            importlib.import_module(module).add_arguments(cmd)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    names = {name for name, _, _ in COMMANDS}
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in names else None)
    args = parser.parse_args(argv)
    if not getattr(args, "_module", None):
        parser.print_help(sys.stderr)
        return 2
    module = importlib.import_module(args._module)
    result: int = module.run(args)
    return result
