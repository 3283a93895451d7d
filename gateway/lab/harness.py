"""Build and tear down a WireGuard lab: one gateway namespace, N simulated CVM namespaces.

Layout (``base`` = prefix + a 6-character tag, e.g. ``gwh1234a0``)::

    <base>g  gateway netns: bridge <base>br 172.30.0.1/24, wireguard-go <base>wg 10.0.0.1/24
      |-- veth <base>v<i> (bridge port)  <->  <base>e<i> 172.30.0.<10+i>/24 in <base>c<i>
    <base>c<i>  CVM netns: wireguard-go <base>w<i> (address set once "registered"),
                HTTP origin (gateway.lab.origin) on 0.0.0.0:<origin_port>

Addresses exist only inside these namespaces, which have no default route, so nothing can
leave the machine. Interface names are unique per lab because wireguard-go's control sockets
share ``/var/run/wireguard`` across namespaces.

Teardown (:meth:`Lab.down`, also on any exception inside ``with Lab(...)``) stops every
process we started by its PID, closes devices and deletes the namespaces. A crashed run is
cleaned by :func:`cleanup_leftovers`: each lab writes an owner file
``/run/gateway-lab/<base>`` (the owning PID) *before* creating anything; leftovers are labs of
our prefix whose owner is dead (or namespaces of our prefix with no owner file at all).
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from gateway.tunnel.commands import OwnedProcess, in_netns, run
from gateway.tunnel.control import UAPI_DIR, socket_listening
from gateway.tunnel.errors import TunnelError
from gateway.tunnel.keys import generate_private_key, public_key
from gateway.tunnel.uapi import PeerConfig, PeerRemoval
from gateway.tunnel.wg import Backend, DeviceSpec, WgDevice

logger = logging.getLogger(__name__)

__all__ = ["OWNER_DIR", "Lab", "LabCvm", "LabError", "cleanup_leftovers", "new_tag"]

OWNER_DIR = Path("/run/gateway-lab")
BASE_LEN = 9  # prefix (3) + tag (6)
_counter = itertools.count()
_B36 = "0123456789abcdefghijklmnopqrstuvwxyz"


class LabError(TunnelError):
    """The lab could not be built; the message names the failing step."""


def new_tag() -> str:
    """A tag unique on this machine for this process: 4 digits of our PID + a counter."""
    n = next(_counter) % 1296
    return f"{os.getpid() % 10000:04d}{_B36[n // 36]}{_B36[n % 36]}"


@dataclass
class LabCvm:
    """One simulated CVM: namespace, WireGuard device (own key) and origin app."""

    index: int
    netns: str
    underlay_ip: ipaddress.IPv4Address
    device: WgDevice
    origin: OwnedProcess | None = None
    tunnel_ip: ipaddress.IPv4Address | None = None

    @property
    def private_key(self) -> str:
        return self.device.spec.private_key

    @property
    def public_key(self) -> str:
        return public_key(self.device.spec.private_key)


@dataclass
class Lab:
    """The lab; ``with Lab(...) as lab:`` builds it and always tears it down."""

    cvms: int
    workdir: Path
    prefix: str = "gwh"
    tag: str = field(default_factory=new_tag)
    underlay: ipaddress.IPv4Interface = ipaddress.IPv4Interface("172.30.0.1/24")
    wg_address: ipaddress.IPv4Interface = ipaddress.IPv4Interface("10.0.0.1/24")
    wg_port: int = 51820
    origin_port: int = 8080
    gateway_device: bool = True
    gateway_private_key: str = field(default_factory=generate_private_key)
    wireguard_go: str = "wireguard-go"
    gateway: WgDevice | None = field(default=None, init=False)
    nodes: list[LabCvm] = field(default_factory=list, init=False)
    namespaces: list[str] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        if len(self.prefix) != 3 or len(self.tag) != 6:
            raise ValueError("prefix must be 3 characters and tag 6 (interface names <= 15)")
        if not 0 <= self.cvms <= 200:
            raise ValueError("a lab has 0-200 CVMs")

    # --- names ---------------------------------------------------------------------------

    @property
    def base(self) -> str:
        return self.prefix + self.tag

    @property
    def gw_netns(self) -> str:
        return f"{self.base}g"

    @property
    def gw_iface(self) -> str:
        return f"{self.base}wg"

    @property
    def endpoint(self) -> str:
        """Where CVMs reach the gateway's WireGuard port."""
        return f"{self.underlay.ip}:{self.wg_port}"

    @property
    def gateway_public_key(self) -> str:
        return public_key(self.gateway_private_key)

    def gateway_spec(self, private_key: str | None = None) -> DeviceSpec:
        """The gateway device's spec (tests open their own device from it after a restart)."""
        return DeviceSpec(
            name=self.gw_iface,
            private_key=private_key or self.gateway_private_key,
            listen_port=self.wg_port,
            address=self.wg_address,
            netns=self.gw_netns,
            backend=Backend.WIREGUARD_GO,
            wireguard_go=self.wireguard_go,
        )

    # --- build ---------------------------------------------------------------------------

    def up(self) -> Lab:
        self.workdir.mkdir(parents=True, exist_ok=True)
        OWNER_DIR.mkdir(parents=True, exist_ok=True)
        (OWNER_DIR / self.base).write_text(str(os.getpid()))
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        return self

    def _add_netns(self, name: str) -> None:
        run(["ip", "netns", "add", name])
        self.namespaces.append(name)
        run(["ip", "-n", name, "link", "set", "lo", "up"])

    def _build(self) -> None:
        gw, br = self.gw_netns, f"{self.base}br"
        self._add_netns(gw)
        run(["ip", "-n", gw, "link", "add", br, "type", "bridge"])
        run(["ip", "-n", gw, "addr", "add", str(self.underlay), "dev", br])
        run(["ip", "-n", gw, "link", "set", br, "up"])
        if self.gateway_device:
            self.gateway = WgDevice(self.gateway_spec(), log_dir=self.workdir).open()
        for i in range(1, self.cvms + 1):
            self.nodes.append(self._add_cvm(i, br))
        for node in self.nodes:
            self._wait_origin(node)

    def _add_cvm(self, i: int, bridge: str) -> LabCvm:
        ns, gw = f"{self.base}c{i}", self.gw_netns
        self._add_netns(ns)
        outer, inner = f"{self.base}v{i}", f"{self.base}e{i}"
        run(["ip", "link", "add", outer, "netns", gw, "type", "veth", "peer", inner, "netns", ns])
        run(["ip", "-n", gw, "link", "set", outer, "master", bridge, "up"])
        ip = self.underlay.network.network_address + 9 + i
        run(
            ["ip", "-n", ns, "addr", "add", f"{ip}/{self.underlay.network.prefixlen}", "dev", inner]
        )
        run(["ip", "-n", ns, "link", "set", inner, "up"])
        spec = DeviceSpec(
            name=f"{self.base}w{i}",
            private_key=generate_private_key(),
            netns=ns,
            backend=Backend.WIREGUARD_GO,
            wireguard_go=self.wireguard_go,
        )
        node = LabCvm(i, ns, ip, WgDevice(spec, log_dir=self.workdir).open())
        ready = self.workdir / f"origin-{ns}.ready"
        ready.unlink(missing_ok=True)
        node.origin = OwnedProcess(
            in_netns(
                ns,
                [
                    sys.executable,
                    "-m",
                    "gateway.lab.origin",
                    "--port",
                    str(self.origin_port),
                    "--name",
                    ns,
                    "--ready-file",
                    str(ready),
                ],
            ),
            log_path=self.workdir / f"origin-{ns}.log",
        )
        return node

    def _wait_origin(self, node: LabCvm, timeout: float = 15.0) -> None:
        ready = self.workdir / f"origin-{node.netns}.ready"
        deadline = time.monotonic() + timeout
        while not ready.exists():
            assert node.origin is not None
            if not node.origin.alive():
                raise LabError(f"origin in {node.netns} exited: {node.origin.log_tail()}")
            if time.monotonic() > deadline:
                raise LabError(f"origin in {node.netns} not ready after {timeout}s")
            time.sleep(0.02)

    # --- guest side ----------------------------------------------------------------------

    def connect(
        self,
        node: LabCvm,
        tunnel_ip: ipaddress.IPv4Address,
        *,
        server_public_key: str | None = None,
        keepalive: int = 5,
    ) -> None:
        """What a CVM does with a registration answer: address, route, gateway peer."""
        gw_ip = ipaddress.IPv4Network(f"{self.wg_address.ip}/32")
        node.device.set_address(ipaddress.IPv4Interface(f"{tunnel_ip}/32"), routes=[gw_ip])
        key = server_public_key or self.gateway_public_key
        peer = PeerConfig(key, (gw_ip,), endpoint=self.endpoint, persistent_keepalive=keepalive)
        # a fresh peer, as after wg-quick down/up: its first keepalive starts the handshake now
        node.device.apply([PeerRemoval(key), peer])
        node.tunnel_ip = tunnel_ip

    # --- probes --------------------------------------------------------------------------

    def http_get(self, netns: str, url: str, *, timeout: float = 3.0) -> tuple[int, bytes]:
        """``curl`` inside ``netns``; returns (status, body), status 0 if it could not connect."""
        argv = ["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", "-m", str(timeout), url]
        done = subprocess.run(
            in_netns(netns, argv), capture_output=True, timeout=timeout + 5, check=False
        )
        body, _, code = done.stdout.rpartition(b"\n")
        return (int(code) if code.isdigit() else 0), body

    def fetch_instance(self, node: LabCvm, *, timeout: float = 3.0) -> str | None:
        """The instance name the origin behind ``node.tunnel_ip`` reports, via the gateway."""
        status, body = self.http_get(
            self.gw_netns, f"http://{node.tunnel_ip}:{self.origin_port}/", timeout=timeout
        )
        if status != 200:
            return None
        name = json.loads(body)["instance"]
        return str(name)

    def status(self) -> dict[str, object]:
        """A summary for ``gateway lab status`` and failing-test reports."""
        out: dict[str, object] = {"base": self.base, "gateway_netns": self.gw_netns}
        if self.gateway is not None:
            with contextlib.suppress(TunnelError):
                state = self.gateway.state()
                out["peers"] = [
                    {"public_key": p.public_key, "handshake": p.last_handshake, "rx": p.rx_bytes}
                    for p in state.peers
                ]
        out["cvms"] = [
            {"netns": n.netns, "underlay": str(n.underlay_ip), "tunnel_ip": str(n.tunnel_ip)}
            for n in self.nodes
        ]
        return out

    # --- teardown ------------------------------------------------------------------------

    def down(self) -> None:
        """Stop processes by PID, close devices, delete namespaces, remove the owner file."""
        for node in self.nodes:
            if node.origin is not None:
                node.origin.stop(grace=2)
            node.device.close()
        if self.gateway is not None:
            self.gateway.close()
        for ns in reversed(self.namespaces):
            _delete_netns(ns)
        self.nodes.clear()
        self.namespaces.clear()
        self.gateway = None
        (OWNER_DIR / self.base).unlink(missing_ok=True)

    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.down()


def _netns_pids(ns: str) -> list[int]:
    done = run(["ip", "netns", "pids", ns], check=False)
    return [int(p) for p in done.stdout.split() if p.isdigit()]


def _delete_netns(ns: str) -> None:
    """Kill what still runs inside ``ns`` (by PID: only processes in our namespace), delete it."""
    for pid in _netns_pids(ns):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
    run(["ip", "netns", "del", ns], check=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner(base: str) -> int | None:
    try:
        text = (OWNER_DIR / base).read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def cleanup_leftovers(prefix: str = "gwh") -> list[str]:
    """Delete labs of ``prefix`` whose owner process is gone; returns what was removed.

    Labs of live processes (another test run, a ``gateway lab up``) are left alone.
    """
    removed: list[str] = []
    listing = run(["ip", "netns", "list"], check=False).stdout.split("\n")
    names = [line.split()[0] for line in listing if line.startswith(prefix)]
    for ns in names:
        base = ns[:BASE_LEN]
        owner = _owner(base)
        if owner is None or not _alive(owner):
            _delete_netns(ns)
            removed.append(ns)
    if OWNER_DIR.exists():
        for marker in OWNER_DIR.glob(f"{prefix}*"):
            owner = _owner(marker.name)
            if owner is None or not _alive(owner):
                marker.unlink(missing_ok=True)
    for sock in UAPI_DIR.glob(f"{prefix}*.sock") if UAPI_DIR.exists() else ():
        if not socket_listening(sock):  # its daemon is gone (busy daemons still accept)
            sock.unlink(missing_ok=True)
            removed.append(str(sock))
    if removed:
        logger.info("removed lab leftovers: %s", ", ".join(removed))
    return removed
