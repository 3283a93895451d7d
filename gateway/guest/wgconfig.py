"""The CVM's WireGuard configuration: upstream's file, byte for byte, and bringing it up.

The file (upstream ``/etc/wireguard/dstack-wg0.conf``, mode 0600) is rendered exactly as
``dstack-util`` renders it, peers sorted by public key::

    [Interface]\\nPrivateKey = {wg_sk}\\nListenPort = 9182\\nAddress = {client_ip}/32\\n\\n
    [Peer]\\nPublicKey = {pk}\\nAllowedIPs = {gateway ip, no prefix}/32\\n
    Endpoint = {endpoint}\\nPersistentKeepalive = 25\\n          (per peer, no blank line)

If the rendered text equals the file on disk and the refresh is not forced, nothing is
touched. Otherwise the interface is bounced (upstream: ``wg-quick down``, filter, ``wg-quick
up``): the device is closed and opened again from the same values with
:class:`gateway.tunnel.wg.WgDevice` (kernel WireGuard if present, else ``wireguard-go``),
address ``/32``, a route per gateway IP, one peer per gateway with endpoint and keepalive.
The ``DSTACK_WG`` filter (:mod:`gateway.guest.wgfilter`) is applied before the link comes up.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path

from gateway.guest.files import write_atomic
from gateway.guest.gateway_client import RegisterResponse, WgServer
from gateway.guest.wgfilter import FilterBackend, apply_wg_filter, endpoint_ips
from gateway.tunnel.commands import run
from gateway.tunnel.uapi import PeerConfig
from gateway.tunnel.wg import Backend, DeviceSpec, WgDevice, link_exists

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_CONFIG", "DEFAULT_IFACE", "LISTEN_PORT", "Tunnel", "render_wg_config"]

LISTEN_PORT = 9182
KEEPALIVE = 25
DEFAULT_IFACE = "dstack-wg0"
DEFAULT_CONFIG = Path("/etc/wireguard") / f"{DEFAULT_IFACE}.conf"


def render_wg_config(
    private_key: str,
    client_ip: ipaddress.IPv4Address,
    servers: tuple[WgServer, ...],
    listen_port: int = LISTEN_PORT,
) -> str:
    """Upstream's exact text (``system_setup.rs``: ``setup_wireguard``)."""
    out = (
        f"[Interface]\nPrivateKey = {private_key}\nListenPort = {listen_port}\n"
        f"Address = {client_ip}/32\n\n"
    )
    for s in sorted(servers, key=lambda s: s.pk):
        out += (
            f"[Peer]\nPublicKey = {s.pk}\nAllowedIPs = {s.ip.ip}/32\n"
            f"Endpoint = {s.endpoint}\nPersistentKeepalive = {KEEPALIVE}\n"
        )
    return out


@dataclass
class Tunnel:
    """The CVM's tunnel interface: config file, filter and device.

    ``netns`` runs everything inside a network namespace (the lab); ``firewall`` picks
    iptables or nftables for ``DSTACK_WG`` (``none`` only for tests that check the device
    alone).
    """

    config_path: Path = DEFAULT_CONFIG
    iface: str = DEFAULT_IFACE
    listen_port: int = LISTEN_PORT
    netns: str | None = None
    backend: Backend = Backend.AUTO
    firewall: FilterBackend = FilterBackend.AUTO
    log_dir: Path | None = None
    device: WgDevice | None = None
    applied: RegisterResponse | None = None

    def render(self, private_key: str, answer: RegisterResponse) -> str:
        return render_wg_config(private_key, answer.client_ip, answer.servers, self.listen_port)

    def apply(self, private_key: str, answer: RegisterResponse, *, force: bool) -> bool:
        """Write the config and (re)start the interface if it changed or ``force``.

        Returns True if the interface was (re)started. Raises TunnelError/CommandError (and
        OSError for the file) on failure; the old file is then left as it was if the
        rendering failed, or replaced atomically.
        """
        text = self.render(private_key, answer)
        try:
            unchanged = self.config_path.read_text() == text
        except (OSError, UnicodeDecodeError):
            unchanged = False
        if unchanged and not force and self.device is not None:
            return False
        self.config_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(self.config_path, text.encode(), 0o600)
        self.down()
        if link_exists(self.iface, self.netns):  # left by an earlier run: start clean
            logger.info("removing the existing %s before bringing it up", self.iface)
            run(["ip", *(["-n", self.netns] if self.netns else []), "link", "del", self.iface])
        sources = endpoint_ips(s.endpoint_host for s in answer.servers)
        apply_wg_filter(self.listen_port, sources, backend=self.firewall, netns=self.netns)
        gw_nets = tuple(
            ipaddress.IPv4Network(f"{s.ip.ip}/32") for s in sorted(answer.servers, key=_pk)
        )
        spec = DeviceSpec(
            name=self.iface,
            private_key=private_key,
            listen_port=self.listen_port,
            address=ipaddress.IPv4Interface(f"{answer.client_ip}/32"),
            netns=self.netns,
            routes=gw_nets,
            backend=self.backend,
        )
        device = WgDevice(spec, log_dir=self.log_dir).open()
        try:
            device.apply(
                PeerConfig(
                    s.pk,
                    (ipaddress.IPv4Network(f"{s.ip.ip}/32"),),
                    endpoint=s.endpoint,
                    persistent_keepalive=KEEPALIVE,
                )
                for s in sorted(answer.servers, key=_pk)
            )
        except BaseException:
            device.delete()
            raise
        self.device, self.applied = device, answer
        logger.info("%s up: %s/32, %d gateway peer(s)", self.iface, answer.client_ip, len(gw_nets))
        return True

    def last_handshake(self) -> float | None:
        """The newest handshake with any gateway peer (unix seconds), None if none yet."""
        if self.device is None:
            return None
        times = [p.last_handshake for p in self.device.state().peers if p.last_handshake]
        return max(times) if times else None

    def down(self) -> None:
        """``wg-quick down``: stop our device (and delete a kernel link)."""
        if self.device is not None:
            self.device.delete()
            self.device = None


def _pk(s: WgServer) -> str:
    return s.pk
