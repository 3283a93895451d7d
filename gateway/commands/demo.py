"""``gateway demo``: the gateway with a demo app on loopback, no configuration needed.

It creates (once) a development CA and a ``*.demo.localhost`` certificate under the data
directory, starts the demo origin (plain HTTP + h2c on one port, HTTPS on another), starts the
gateway proxy on 127.0.0.1:8443 (or a free port if that one is taken) with a static route
``demo`` -> 127.0.0.1, and prints curl commands that reach the app through the gateway:
terminated (``demo-<port>``), passed through (``demo-<port>s``) and HTTP/2 (``demo-<port>g``).
Ctrl-C drains the gateway and stops the origin.

``gateway demo --lab`` (the default when running as root with network namespaces,
wireguard-go and iptables available) runs the whole system instead: a gateway namespace with
``gateway serve`` (proxy + registration RPC + WireGuard) and two simulated CVMs that boot,
register and are reached over HTTPS through the tunnel (:mod:`gateway.commands.demo_lab`).
``--loopback`` forces the loopback demo.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import subprocess
import sys
from pathlib import Path

from gateway.proxy.settings import PortRule, ProxySettings, StaticRoute, Timeouts
from gateway.util.logs import setup_logging

BASE = "demo.localhost"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir", type=Path, default=Path("data/demo"), help="where the dev CA and certs go"
    )
    parser.add_argument("--port", type=int, default=8443, help="gateway port (busy: pick one)")
    parser.add_argument("--workers", type=int, default=1, help="gateway worker processes")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--lab",
        action="store_true",
        help="gateway + simulated CVMs in network namespaces (default when root and possible)",
    )
    mode.add_argument("--loopback", action="store_true", help="the loopback-only demo")
    parser.add_argument(
        "--lab-prefix", default="gwd", help="3-character prefix of the lab's namespace names"
    )


def _pick_port(wanted: int) -> int:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", wanted))
            return wanted
        except OSError:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])


def _start_origin(cert_dir: Path) -> tuple[subprocess.Popen[bytes], int, int]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway.proxy.origin",
            "--http",
            "0",
            "--tls",
            "0",
            "--cert",
            str(cert_dir / "fullchain.pem"),
            "--key",
            str(cert_dir / "privkey.pem"),
        ],
        stdout=subprocess.PIPE,  # same process group: Ctrl-C (or a group kill) stops it too
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        raise RuntimeError("the demo origin did not start")
    ports = json.loads(line)
    return proc, int(ports["http"]), int(ports["tls"])


def run(args: argparse.Namespace) -> int:
    from gateway.commands.demo_lab import lab_available, run_lab

    if not args.loopback:
        why_not = lab_available()
        if why_not is None:
            print("gateway demo: lab mode (network namespaces, WireGuard tunnels)", flush=True)
            setup_logging("info", "text")
            return run_lab(args.data_dir.resolve(), prefix=args.lab_prefix)
        if args.lab:
            print(f"error: --lab: {why_not}", file=sys.stderr)
            return 2
        print(f"gateway demo: loopback mode ({why_not}; use --lab for the full lab)", flush=True)
    else:
        print("gateway demo: loopback mode", flush=True)
    return _run_loopback(args)


def _run_loopback(args: argparse.Namespace) -> int:
    from gateway.certs.devca import ensure_dev_wildcard
    from gateway.proxy.stats import stats_dir_of
    from gateway.proxy.workers import Supervisor

    setup_logging("info", "text")
    data = args.data_dir.resolve()
    ca, cert_dir = ensure_dev_wildcard(data / "ca", data / "certs", BASE)
    port = _pick_port(args.port)
    origin, http_port, tls_port = _start_origin(cert_dir)
    try:
        settings = ProxySettings(
            listen=(f"127.0.0.1:{port}",),
            workers=args.workers,
            base_domains=(BASE,),
            certs_dir=data / "certs",
            timeouts=Timeouts(drain=3.0),
            routes=(
                StaticRoute(
                    app_id="demo",
                    backends=("127.0.0.1",),
                    restrict_mode=True,
                    ports=(PortRule(http_port), PortRule(tls_port)),
                ),
            ),
        )
        cacert = ca.cert_path
        lines = ["", "The gateway is starting. Try (Ctrl-C stops everything):", ""]
        for label, what, extra in (
            (f"demo-{http_port}", "TLS terminated by the gateway", ""),
            (f"demo-{tls_port}s", "TLS passed through to the app", ""),
            (f"demo-{http_port}g", "HTTP/2 (ALPN h2), h2c to the app", " --http2"),
            ("gateway", "the gateway's own endpoints", ""),
        ):
            name = f"{label}.{BASE}"
            path = "/index" if label == "gateway" else "/"
            lines.append(f"  # {what}")
            lines.append(
                f"  curl{extra} --cacert {cacert} --resolve {name}:{port}:127.0.0.1 "
                f"https://{name}:{port}{path}"
            )
        print("\n".join(lines) + "\n", flush=True)
        return Supervisor(settings, stats_dir=stats_dir_of(data)).run()
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        origin.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            origin.wait(timeout=5)
        if origin.poll() is None:
            origin.kill()
            origin.wait()
