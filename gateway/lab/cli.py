"""``gateway lab up|down|status``: the WireGuard lab by hand.

``up`` builds a lab (gateway namespace + ``--cvms`` CVM namespaces), registers every CVM in a
registry under ``--workdir`` and connects its tunnel, prints how to reach the origins, then
stays in the foreground until SIGINT/SIGTERM and tears everything down. ``down`` sends SIGTERM
to the owners of running labs (by the PID in their owner file) and removes leftovers;
``status`` lists labs and whether their owner is alive.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from gateway.lab.harness import OWNER_DIR, Lab, cleanup_leftovers
from gateway.registry.service import Registration, Registry
from gateway.registry.sqlite import SqliteStore
from gateway.tunnel.errors import TunnelError
from gateway.tunnel.ipalloc import AddressPlan


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--cvms", type=int, default=2, help="simulated CVMs (default 2)")
    parser.add_argument(
        "--prefix", default="gwl", help="3-character name prefix for namespaces and links"
    )
    parser.add_argument(
        "--workdir", type=Path, default=Path("/tmp/gateway-lab"), help="logs and registry"
    )


def _owners(prefix: str) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for marker in sorted(OWNER_DIR.glob(f"{prefix}*")) if OWNER_DIR.exists() else []:
        text = marker.read_text().strip()
        out[marker.name] = int(text) if text.isdigit() else None
    return out


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _up(args: argparse.Namespace) -> int:
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with Lab(cvms=args.cvms, workdir=args.workdir, prefix=args.prefix) as lab:
        assert lab.gateway is not None
        net = lab.wg_address.network
        plan = AddressPlan(lab.wg_address, net, (type(net)(f"{lab.wg_address.ip}/32"),))
        with SqliteStore(args.workdir / f"{lab.base}-registry.sqlite3") as store:
            registry = Registry(store, plan, device=lab.gateway, clock=time.time)
            for node in lab.nodes:
                rec = registry.register(Registration(node.netns, "lab-app", node.public_key))
                lab.connect(node, rec.ip)
            sys.stdout.write(json.dumps(lab.status(), indent=2) + "\n")
            for node in lab.nodes:
                sys.stdout.write(
                    f"try: ip netns exec {lab.gw_netns} curl http://{node.tunnel_ip}:"
                    f"{lab.origin_port}/\n"
                )
            sys.stdout.write("running; Ctrl-C or `gateway lab down` to stop\n")
            sys.stdout.flush()
            while not stop:
                time.sleep(0.2)
    return 0


def _down(args: argparse.Namespace) -> int:
    owners = _owners(args.prefix)
    for pid in {p for p in owners.values() if p is not None and p != os.getpid()}:
        if _alive(pid):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in owners.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    removed = cleanup_leftovers(args.prefix)
    sys.stdout.write(json.dumps({"stopped": sorted(owners), "removed": removed}) + "\n")
    return 0


def _status(args: argparse.Namespace) -> int:
    labs = [
        {"base": base, "owner_pid": pid, "owner_alive": _alive(pid)}
        for base, pid in _owners(args.prefix).items()
    ]
    sys.stdout.write(json.dumps({"labs": labs}, indent=2) + "\n")
    return 0


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        sys.stderr.write("error: the lab needs root (network namespaces, TUN devices)\n")
        return 2
    if len(args.prefix) != 3:
        sys.stderr.write("error: --prefix must be 3 characters\n")
        return 2
    try:
        if args.action == "up":
            return _up(args)
        if args.action == "down":
            return _down(args)
        return _status(args)
    except TunnelError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
