"""Open the configured store and build the registry service from configuration."""

from __future__ import annotations

import random
import time
from pathlib import Path

from gateway.registry.service import PeerDevice, Registry
from gateway.registry.settings import RegistrySettings
from gateway.registry.sqlite import SqliteStore
from gateway.registry.store import Store
from gateway.tunnel.settings import WgSettings

__all__ = ["build_registry", "open_store", "store_path"]


def store_path(settings: RegistrySettings, data_dir: Path) -> Path:
    return Path(settings.path) if settings.path else data_dir / "registry.sqlite3"


def open_store(settings: RegistrySettings, data_dir: Path) -> Store:
    """The store named by ``[registry] backend`` (only ``sqlite`` today)."""
    return SqliteStore(store_path(settings, data_dir))


def build_registry(
    store: Store,
    wg: WgSettings,
    registry: RegistrySettings,
    device: PeerDevice | None,
) -> Registry:
    """A :class:`Registry` with the real clock and, for ``ip_order = random``, OS randomness."""
    return Registry(
        store,
        wg.plan(),
        device=device,
        clock=time.time,
        rng=random.SystemRandom() if wg.ip_order == "random" else None,
        node_id=registry.node_id,
        recycle_timeout=wg.recycle_timeout,
        persistent_keepalive=wg.persistent_keepalive or None,
    )
