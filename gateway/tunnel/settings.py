"""The ``[wg]`` section: the gateway's WireGuard interface and its address plan.

Mirrors upstream's ``[core.wg]`` (``interface``, ``listen_port``, ``ip``, ``reserved_net``,
``client_ip_range``, ``endpoint``) plus what a Python gateway needs to choose and run the
device itself (``backend``, ``wireguard_go``, ``netns``) and the timers of the handshake poll
and stale-instance recycling (upstream ``[core.recycle]``). Durations are seconds.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal

from gateway.tunnel.ipalloc import AddressPlan, AllocationError
from gateway.tunnel.wg import Backend, max_iface_len

__all__ = ["WgSettings"]


@dataclass(frozen=True, slots=True)
class WgSettings:
    """WireGuard device, addresses and tunnel timers.

    ``private_key_file`` empty means ``<core.data_dir>/wg.key``, generated (0600) on first
    start. ``ip`` is the interface address with the prefix that covers every client
    (``10.0.0.1/24``); clients get addresses from ``client_ip_range`` minus ``reserved_net``.
    ``endpoint`` is the ``host:port`` CVMs dial, sent back at registration. ``ip_order``
    ``random`` picks a random free address (constant time on a busy pool), ``lowest`` the
    lowest free one (upstream's order). ``netns`` runs the device in that network namespace
    (empty: the gateway's own).
    """

    interface: str = "wg-gw"
    private_key_file: str = ""
    listen_port: int = 51820
    ip: str = "10.0.0.1/24"
    client_ip_range: ipaddress.IPv4Network = ipaddress.IPv4Network("10.0.0.0/25")
    reserved_net: tuple[ipaddress.IPv4Network, ...] = (ipaddress.IPv4Network("10.0.0.1/32"),)
    endpoint: str = "10.0.2.2:51820"
    backend: Backend = Backend.AUTO
    wireguard_go: str = "wireguard-go"
    netns: str = ""
    persistent_keepalive: int = 25
    ip_order: Literal["random", "lowest"] = "random"
    handshake_poll_interval: float = 10.0
    recycle_interval: float = 300.0
    recycle_timeout: float = 36000.0

    def __post_init__(self) -> None:
        if not self.interface or len(self.interface.encode()) > max_iface_len:
            raise ValueError(f"wg.interface {self.interface!r} must be 1-15 bytes")
        if not 0 <= self.listen_port <= 65535:
            raise ValueError(f"wg.listen_port {self.listen_port} is not a port")
        if not 0 <= self.persistent_keepalive <= 65535:
            raise ValueError("wg.persistent_keepalive must be 0-65535 seconds (0: off)")
        for name in ("handshake_poll_interval", "recycle_interval", "recycle_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"wg.{name} must be a positive number of seconds")
        host, sep, port = self.endpoint.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"wg.endpoint {self.endpoint!r} must be host:port")
        try:
            self.plan()
        except (AllocationError, ValueError) as exc:
            raise ValueError(f"wg address plan: {exc}") from None

    def interface_address(self) -> ipaddress.IPv4Interface:
        try:
            return ipaddress.IPv4Interface(self.ip)
        except ValueError:
            raise ValueError(f"wg.ip {self.ip!r} is not an IPv4 address/prefix") from None

    def plan(self) -> AddressPlan:
        return AddressPlan(self.interface_address(), self.client_ip_range, self.reserved_net)
