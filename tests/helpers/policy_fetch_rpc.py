"""``python -m tests.helpers.policy_fetch_rpc``: the registration RPC with the port-policy
fetcher wired in, as a process in a lab's gateway namespace.

The fetcher connects to CVMs' tunnel addresses, which exist only inside the lab's gateway
namespace, so it must run there (never in the test's own namespace). It is
``tests.helpers.gateway_rpc``'s server (tunnel's RPC app, attested RA-TLS identity through
the simulated TDX, real SQLite registry) driving the lab's existing WireGuard device, with
``RegistrationService.policy_fetch`` set to a :class:`PortPolicyFetcher` on the registry's
store (short back-off: the CVM's tunnel comes up right after its registration answer).
"""

from __future__ import annotations

import argparse
import ipaddress
import signal
import sys
import threading
import time
from pathlib import Path

from gateway.control.policy_fetch import FetchSettings, PortPolicyFetcher
from gateway.control.registration import Advertised
from gateway.control.rpc_identity import RpcIdentity
from gateway.registry.service import Registry
from gateway.registry.sqlite import SqliteStore
from gateway.tee.sim_pki import SimPki
from gateway.tunnel.keys import public_key
from gateway.tunnel.wg import Backend, DeviceSpec, WgDevice
from gateway.util.logs import setup_logging
from tests.helpers.gateway_rpc import GW_APP, PLAN, measured_tee, serve_rpc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--pki", type=Path, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--allow-app", action="append", required=True)
    p.add_argument("--wg-iface", required=True, help="the lab's running gateway device")
    p.add_argument("--wg-key-file", type=Path, required=True)
    p.add_argument("--wg-ip", default="10.0.0.1/24")
    p.add_argument("--wg-port", type=int, required=True)
    p.add_argument("--wg-endpoint", required=True)
    p.add_argument("--agent-port", type=int, default=8090)
    p.add_argument("--ready-file", type=Path, required=True)
    args = p.parse_args(argv)
    setup_logging("info")
    pki = SimPki.load(args.pki)
    tee = measured_tee(pki, args.dir / "tee", GW_APP, b"\x99" * 20)
    creds = RpcIdentity(tee, args.dir / "rpc").credentials(None)
    wg_key = args.wg_key_file.read_text().strip()
    spec = DeviceSpec(
        args.wg_iface,
        wg_key,
        listen_port=args.wg_port,
        address=ipaddress.IPv4Interface(args.wg_ip),
        backend=Backend.WIREGUARD_GO,
    )
    device = WgDevice(spec).open()  # adopts the running device (its daemon is not ours)
    store = SqliteStore(args.dir / "registry.sqlite3")
    registry = Registry(store, PLAN, device=device, clock=time.time)
    adv = Advertised(public_key(wg_key), args.wg_ip, args.wg_endpoint)
    fetcher = PortPolicyFetcher(
        store, FetchSettings(agent_port=args.agent_port, timeout=3.0, backoff_max=2.0)
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    allowed = tuple(args.allow_app)
    with serve_rpc(
        creds, pki, registry, adv, host="0.0.0.0", port=args.port, allowed_apps=allowed
    ) as server:
        server.service.policy_fetch = fetcher.schedule
        args.ready_file.write_text("ready")
        while not stop.wait(0.2):
            pass
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
