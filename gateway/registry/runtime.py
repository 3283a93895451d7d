"""The tunnel side of a running gateway: device, store, registry and their timer, as one unit.

``async with open_tunnel(cfg) as tunnel:`` loads (or creates) the private key, opens the
WireGuard device, opens the store and re-applies every stored peer (restart restore). When
the block is entered every stored instance is a peer again, so nothing that serves afterwards
can take a not-yet-restored peer for gone. Peers with endpoint hints are then greeted by a
background task (slow when neighbours have vanished, so it must not hold up serving), and the
maintenance task starts, its first recycle pass one interval later. Leaving the block stops
both, closes the device (our wireguard-go is stopped by PID) and the store, in that order,
after a last handshake poll so that the next start has fresh endpoint hints. It fits
aiohttp's ``cleanup_ctx``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from gateway.config import Config
from gateway.registry.factory import build_registry, open_store
from gateway.registry.maintenance import Maintenance
from gateway.registry.service import Registry
from gateway.registry.store import Store
from gateway.tunnel.errors import TunnelError
from gateway.tunnel.keys import public_key
from gateway.tunnel.service import device_spec, key_file_path, load_or_create_private_key
from gateway.tunnel.wg import WgDevice
from gateway.util.tasks import spawn

logger = logging.getLogger(__name__)

__all__ = ["Tunnel", "open_tunnel"]


@dataclass
class Tunnel:
    device: WgDevice
    store: Store
    registry: Registry
    public_key: str


@contextlib.asynccontextmanager
async def open_tunnel(cfg: Config) -> AsyncIterator[Tunnel]:
    data_dir = cfg.core.data_dir
    key = load_or_create_private_key(key_file_path(cfg.wg, data_dir))
    device = WgDevice(device_spec(cfg.wg, key), log_dir=data_dir)
    await asyncio.to_thread(device.open)
    try:
        store = open_store(cfg.registry, data_dir)
        try:
            registry = build_registry(store, cfg.wg, cfg.registry, device)
            restored = await asyncio.to_thread(registry.restore, greet=False)
            stop_greeting = threading.Event()
            greeting = spawn(
                asyncio.to_thread(registry.greet, restored.added, stop=stop_greeting),
                name="registry-greet",
            )
            timer = Maintenance(
                registry,
                device,
                poll_interval=cfg.wg.handshake_poll_interval,
                recycle_interval=cfg.wg.recycle_interval,
                recycle_now=False,
            )
            task = spawn(timer.run(), name="registry-maintenance")
            try:
                yield Tunnel(device, store, registry, public_key(key))
            finally:
                stop_greeting.set()  # ends after the batch in flight; the thread cannot be killed
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                await asyncio.wait([greeting])  # a failure was logged by spawn
                try:  # last look before the device goes: fresh endpoint hints for the restart
                    await asyncio.to_thread(lambda: registry.observe(device.state()))
                except TunnelError as exc:
                    logger.warning("final handshake poll failed: %s", exc)
        finally:
            store.close()
    finally:
        await asyncio.to_thread(device.close)
