"""``DSTACK_WG``: only the gateways' endpoints may reach the CVM's WireGuard port.

Upstream (``system_setup.rs``, PR #68) keeps an iptables chain ``DSTACK_WG``, jumped to from
``INPUT -p udp --dport 9182``, holding one ``ACCEPT`` per gateway endpoint IP and a final
``DROP``. Without it anyone on the host network could send handshakes to the port, and a
NAT that rewrites the source would let the host impersonate a gateway endpoint. With it an
app can tell tunnel traffic (arriving on the WireGuard interface) from the untrusted host
network.

Backends: ``iptables`` (the chain replaced in one ``iptables-restore --noflush``
transaction, so the port is never open in between; the jump added once) or ``nftables``
(table ``inet dstack_wg`` replaced in one ``nft -f`` transaction). ``auto`` prefers iptables
like upstream and falls back to nft. IPv4 endpoints only (the tunnel is IPv4); a host name
is resolved once when the rules are written.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import shutil
import socket
from collections.abc import Iterable

from gateway.tunnel.commands import run
from gateway.tunnel.errors import CommandError

logger = logging.getLogger(__name__)

__all__ = ["CHAIN", "NFT_TABLE", "FilterBackend", "apply_wg_filter", "endpoint_ips", "remove"]

CHAIN = "DSTACK_WG"
NFT_TABLE = "dstack_wg"


class FilterBackend(enum.StrEnum):
    AUTO = "auto"
    IPTABLES = "iptables"
    NFTABLES = "nftables"
    NONE = "none"


def endpoint_ips(hosts: Iterable[str]) -> tuple[ipaddress.IPv4Address, ...]:
    """IPv4 addresses of the gateways' endpoints (names resolved), sorted, deduplicated."""
    out: set[ipaddress.IPv4Address] = set()
    for host in hosts:
        try:
            out.add(ipaddress.IPv4Address(host))
            continue
        except ValueError:
            pass
        try:
            infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_DGRAM)
        except OSError as exc:
            logger.warning("cannot resolve gateway endpoint %r (%s): it stays blocked", host, exc)
            continue
        out.update(ipaddress.IPv4Address(info[4][0]) for info in infos)
    return tuple(sorted(out))


def _resolve(backend: FilterBackend) -> FilterBackend:
    if backend is not FilterBackend.AUTO:
        return backend
    if shutil.which("iptables-restore") and shutil.which("iptables"):
        return FilterBackend.IPTABLES
    if shutil.which("nft"):
        return FilterBackend.NFTABLES
    raise CommandError(["iptables"], 127, "neither iptables nor nft is installed")


def iptables_rules(port: int, sources: Iterable[ipaddress.IPv4Address]) -> str:
    """The ``iptables-restore --noflush`` input that replaces the chain's rules."""
    lines = ["*filter", f":{CHAIN} - [0:0]", f"-F {CHAIN}"]
    lines += [f"-A {CHAIN} -s {ip}/32 -j ACCEPT" for ip in sources]
    lines += [f"-A {CHAIN} -j DROP", "COMMIT", ""]
    return "\n".join(lines)


def nft_rules(port: int, sources: Iterable[ipaddress.IPv4Address]) -> str:
    """The ``nft -f`` input: (re)create table ``inet dstack_wg`` in one transaction."""
    allowed = ", ".join(str(ip) for ip in sources)
    accept = f"        udp dport {port} ip saddr {{ {allowed} }} accept\n" if allowed else ""
    return (
        f"table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n"
        f"table inet {NFT_TABLE} {{\n"
        "    chain input {\n"
        "        type filter hook input priority filter; policy accept;\n"
        f"{accept}"
        f"        udp dport {port} counter drop\n"
        "    }\n}\n"
    )


def apply_wg_filter(
    port: int,
    sources: Iterable[ipaddress.IPv4Address],
    *,
    backend: FilterBackend = FilterBackend.AUTO,
    netns: str | None = None,
) -> FilterBackend:
    """Allow ``port``/udp only from ``sources``; returns the backend used.

    Raises CommandError if the rules cannot be installed: the caller must not bring the
    interface up unfiltered (fail closed).
    """
    chosen = _resolve(backend)
    src = tuple(sources)
    if chosen is FilterBackend.IPTABLES:
        run(["iptables-restore", "--noflush"], input_text=iptables_rules(port, src), netns=netns)
        jump = ["INPUT", "-p", "udp", "--dport", str(port), "-j", CHAIN]
        if run(["iptables", "-C", *jump], netns=netns, check=False).returncode != 0:
            run(["iptables", "-I", *jump], netns=netns)
    elif chosen is FilterBackend.NFTABLES:
        run(["nft", "-f", "-"], input_text=nft_rules(port, src), netns=netns)
    logger.info("%s: udp/%d only from %s (%s)", CHAIN, port, ", ".join(map(str, src)), chosen)
    return chosen


def remove(port: int, *, backend: FilterBackend, netns: str | None = None) -> None:
    """Remove the rules (for tests and tear-down); missing rules are not an error."""
    chosen = _resolve(backend)
    if chosen is FilterBackend.IPTABLES:
        jump = ["INPUT", "-p", "udp", "--dport", str(port), "-j", CHAIN]
        run(["iptables", "-D", *jump], netns=netns, check=False)
        run(["iptables", "-F", CHAIN], netns=netns, check=False)
        run(["iptables", "-X", CHAIN], netns=netns, check=False)
    elif chosen is FilterBackend.NFTABLES:
        run(["nft", "delete", "table", "inet", NFT_TABLE], netns=netns, check=False)
