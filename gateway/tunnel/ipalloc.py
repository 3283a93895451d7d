"""Tunnel address allocation: pure logic over the registry's allocated set.

The plan (:class:`AddressPlan`) is the gateway interface's address (``ip``, e.g.
``10.0.0.1/24``), the range clients are given (``client_ip_range``, e.g. ``10.0.0.0/25``,
inside the interface's network) and reserved nets (``reserved_net``) never handed out. An
address is assignable iff it lies in the client range, is neither the network nor the
broadcast address of the client range or of the interface network, is not the gateway's own
address and lies in no reserved net (upstream's rules, ``main_service.rs`` ``alloc_ip``).

:func:`choose` keeps an instance's current address when it is still assignable and not held
by someone else (re-registration keeps the IP) and otherwise picks a free one: the lowest
(upstream's order, deterministic) or, with an injected ``random.Random``, a random start
probed linearly, so that 10 000 allocations do not each rescan the low end of the range.
Exhaustion raises :class:`PoolExhausted`. State lives in the registry; nothing here stores it.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Container
from dataclasses import dataclass

__all__ = ["AddressPlan", "AllocationError", "PoolExhausted", "choose"]

IPv4 = ipaddress.IPv4Address


class AllocationError(ValueError):
    """The address plan is inconsistent (raised at configuration load)."""


class PoolExhausted(Exception):
    """No free address is left in the client range."""

    def __init__(self, client_range: ipaddress.IPv4Network, in_use: int) -> None:
        self.client_range = client_range
        self.in_use = in_use
        super().__init__(
            f"IP pool exhausted: no free address in client_ip_range {client_range} "
            f"({in_use} in use); recycle stale instances or widen client_ip_range"
        )


@dataclass(frozen=True, slots=True)
class AddressPlan:
    """The gateway's address, the client range and reserved nets; validated at birth."""

    interface: ipaddress.IPv4Interface
    client_range: ipaddress.IPv4Network
    reserved: tuple[ipaddress.IPv4Network, ...] = ()

    def __post_init__(self) -> None:
        net = self.interface.network
        if not self.client_range.subnet_of(net):
            raise AllocationError(
                f"client_ip_range {self.client_range} is not inside the interface network {net}"
            )
        for r in self.reserved:
            if not r.subnet_of(net):
                raise AllocationError(f"reserved_net {r} is not inside the interface network {net}")

    @property
    def gateway_ip(self) -> IPv4:
        return self.interface.ip

    def _bounds(self) -> tuple[int, int]:
        """First and last candidate as ints (network and broadcast of the range excluded)."""
        lo = int(self.client_range.network_address)
        hi = int(self.client_range.broadcast_address)
        if self.client_range.prefixlen < 31:
            lo, hi = lo + 1, hi - 1
        return lo, hi

    def assignable(self, ip: IPv4) -> bool:
        """True if ``ip`` may be given to a client (ignoring who holds it now)."""
        lo, hi = self._bounds()
        value = int(ip)
        if not lo <= value <= hi:
            return False
        net = self.interface.network
        if ip in (self.interface.ip, net.network_address, net.broadcast_address):
            return False
        return not any(ip in r for r in self.reserved)

    def capacity(self) -> int:
        """How many addresses can be assigned in total."""
        lo, hi = self._bounds()
        return sum(1 for v in range(lo, hi + 1) if self.assignable(IPv4(v)))


def choose(
    plan: AddressPlan,
    taken: Container[IPv4],
    *,
    current: IPv4 | None = None,
    rng: random.Random | None = None,
    scan_from: IPv4 | None = None,
) -> IPv4:
    """The address for one instance.

    ``taken`` holds every address allocated to *other* instances. ``current`` is the
    instance's address from an earlier registration: kept if still assignable and not taken.
    Otherwise the lowest free address, or a random free one when ``rng`` is given.
    ``scan_from`` (lowest order only) starts the scan there instead of at the bottom,
    wrapping around, so a caller that knows everything below is taken (the registry
    remembers where its last scan ended) does not test thousands of held addresses, one
    store query each, per new instance. Raises :class:`PoolExhausted` when nothing is free.
    """
    if current is not None and plan.assignable(current) and current not in taken:
        return current
    lo, hi = plan._bounds()
    size = hi - lo + 1
    if rng is not None and size > 0:
        start = rng.randrange(size)
    elif scan_from is not None and lo <= int(scan_from) <= hi:
        start = int(scan_from) - lo
    else:
        start = 0
    in_use = 0
    for step in range(size):
        candidate = IPv4(lo + (start + step) % size)
        if not plan.assignable(candidate):
            continue
        if candidate in taken:
            in_use += 1
            continue
        return candidate
    raise PoolExhausted(plan.client_range, in_use)
