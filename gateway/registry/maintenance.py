"""The registry's timer task: handshake polling, recycling and peer reconcile.

The poll also hands the keepalive to restored peers once they have shaken hands
(:meth:`Registry.settle_keepalives`: a restart restore leaves it off peers without a known
endpoint, where it would only make wireguard-go send undeliverable handshakes).

Reading the device (a UAPI round-trip, ~0.7 s for 10 000 peers on this machine) happens
here on a timer and never on a connection's path. Each step runs in a worker thread
(``asyncio.to_thread``) because the store and the device calls are blocking. A failing step
is logged and retried at the next tick; it never ends the loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from gateway.registry.service import Registry
from gateway.tunnel.errors import TunnelError
from gateway.tunnel.uapi import DeviceState

logger = logging.getLogger(__name__)

__all__ = ["Maintenance", "StateSource"]


class StateSource(Protocol):
    def state(self) -> DeviceState: ...


@dataclass
class Maintenance:
    """Poll handshakes every ``poll_interval``; recycle and reconcile every ``recycle_interval``."""

    registry: Registry
    device: StateSource
    poll_interval: float
    recycle_interval: float
    monotonic: Callable[[], float] = time.monotonic
    recycle_now: bool = True  # False: the caller just restored; first pass after an interval
    _next_recycle: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        if not self.recycle_now:
            self._next_recycle = self.monotonic() + self.recycle_interval

    def tick(self) -> None:
        """One pass (blocking): observe handshakes; recycle and reconcile when due."""
        try:
            state = self.device.state()
            self.registry.observe(state)
            self.registry.settle_keepalives(state)  # restored peers that have dialled in
        except TunnelError as exc:
            logger.warning("handshake poll failed: %s", exc)
        now = self.monotonic()
        if now >= self._next_recycle:
            self._next_recycle = now + self.recycle_interval
            self.registry.recycle()
            self.registry.restore()  # re-adds peers a failed registration left out

    async def run(self) -> None:
        """Run until cancelled (owned by the app's cleanup context)."""
        while True:
            try:
                await asyncio.to_thread(self.tick)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("registry maintenance pass failed; retrying next tick")
            await asyncio.sleep(self.poll_interval)
