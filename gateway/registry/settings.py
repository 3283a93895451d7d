"""The ``[registry]`` section: where instances, allocations, routes and policies are kept."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from gateway.registry.records import check_id

__all__ = ["RegistrySettings"]


@dataclass(frozen=True, slots=True)
class RegistrySettings:
    """``backend`` is the store (``sqlite``; etcd for cluster mode follows the same Store).

    ``path`` empty means ``<core.data_dir>/registry.sqlite3``. ``node_id`` names this gateway
    node in handshake observations (cluster mode: unique per node).
    """

    backend: Literal["sqlite"] = "sqlite"
    path: str = ""
    node_id: str = "local"

    def __post_init__(self) -> None:
        check_id("registry.node_id", self.node_id)
