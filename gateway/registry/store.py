"""The storage contract of the registry, shaped so that an etcd-backed store can follow.

* Keyed records with a store-wide, monotonically increasing revision: every write gets the
  next revision and records it on what it wrote (etcd's ``mod_revision``).
* Compare-and-set where races matter: :meth:`Store.put_instance` and the ``kv_*`` writes take
  ``expect_revision`` (0 = must not exist yet). An address is claimed in the same atomic step
  as the instance that holds it, so two writers can never hand out one address
  (etcd: one transaction comparing the instance key and creating ``alloc/<ip>``).
* Watch-friendly: :meth:`Store.changes_since` lists what changed after a revision, so a
  watcher (another worker, a cluster peer, the proxy's route snapshot) re-reads only that.
* Health data (handshake observations) is merged by max and does not bump revisions: in
  cluster mode it is the ephemeral, per-node part of the state.

Methods are synchronous and short; async callers use ``asyncio.to_thread``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any, Protocol

from gateway.registry.records import Change, HandshakeObservation, InstanceRecord, KvEntry

__all__ = ["Conflict", "Store", "StoreError"]


class StoreError(Exception):
    """The store could not complete an operation (I/O, corruption, bad schema)."""


class Conflict(StoreError):
    """A compare-and-set failed: someone else wrote first. Re-read and retry."""


class Store(Protocol):
    def close(self) -> None: ...

    # --- instances and their addresses -------------------------------------------------------
    def get_instance(self, instance_id: str) -> InstanceRecord | None: ...

    def find_instance_by_key(self, public_key: str) -> InstanceRecord | None: ...

    def list_instances(self) -> list[InstanceRecord]: ...

    def instance_keys(self) -> dict[str, str]:
        """public key -> instance id for every instance (cheap: no record decoding)."""
        ...

    def put_instance(self, record: InstanceRecord, *, expect_revision: int) -> InstanceRecord:
        """Write ``record`` (and claim its IP) if the stored revision equals ``expect_revision``.

        Returns the record with its new revision. Raises :class:`Conflict` if the revision
        differs, or the IP or public key is held by another instance. ``last_handshake`` is
        health data and merges by max (handshakes are recorded without bumping revisions, so a
        CAS write from an earlier read must not erase a newer one).
        """
        ...

    def delete_instance(self, instance_id: str, *, expect_revision: int | None = None) -> bool:
        """Delete the instance and free its IP; False if absent. :class:`Conflict` on CAS."""
        ...

    def ip_holder(self, ip: ipaddress.IPv4Address) -> str | None:
        """The instance id holding ``ip``, or None."""
        ...

    def allocations(self) -> dict[ipaddress.IPv4Address, str]: ...

    # --- health ----------------------------------------------------------------------------
    def record_handshakes(self, observations: Sequence[HandshakeObservation]) -> int:
        """Merge observations (max per instance and node); returns how many were newer."""
        ...

    def handshakes(self, instance_id: str) -> list[HandshakeObservation]: ...

    def last_endpoints(self, node_id: str, since: float = 0.0) -> dict[str, str]:
        """instance id -> where ``node_id`` saw it shake hands at or after ``since``."""
        ...

    # --- generic tables --------------------------------------------------------------------
    def kv_get(self, table: str, key: str) -> KvEntry | None: ...

    def kv_put(
        self, table: str, key: str, value: Any, *, expect_revision: int | None = None
    ) -> KvEntry: ...

    def kv_delete(self, table: str, key: str, *, expect_revision: int | None = None) -> bool: ...

    def kv_list(self, table: str, prefix: str = "") -> list[KvEntry]: ...

    # --- watching --------------------------------------------------------------------------
    def revision(self) -> int: ...

    def changes_since(self, revision: int, limit: int = 1000) -> list[Change]:
        """Changes with revision > ``revision``, oldest first. Raises :class:`StoreError` if
        the feed was compacted past ``revision`` (the watcher must re-read everything)."""
        ...
