"""Routes from the tunnel registry: every admitted CVM instance, reachable at its tunnel IP.

:class:`RegistryRoutes` is an immutable :class:`~gateway.proxy.routes.RouteTable` built from
the registry's instance records. :class:`RegistryRouteFeed` runs inside each proxy worker: it
opens the registry database read-only (SQLite WAL readers never block the control plane's
writer), and on every poll rebuilds the table when the store's revision moved or when the
freshness ordering is due for a refresh. The worker then swaps the new table in whole.

Choice rules follow upstream's ``select_top_n_hosts``:

* an instance id -> that instance, however stale (operators and apps address one replica);
* an app id -> its instances whose last WireGuard handshake is younger than
  ``stale_after`` (default 30 min), freshest first; then, flagged ``fallback``, those seen
  before that (``decide`` uses them only when no fresh instance is eligible, where upstream
  would fail the connection: a missed handshake observation must not black an app out); an
  instance that never completed a handshake is reachable only by its instance id;
* port policy fail-closed: an instance that reported no policy (and has no admin override)
  gets ``policy=None``, which the decision step refuses.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from gateway.proxy.routes import Candidate, PortPolicy
from gateway.registry.records import InstanceRecord
from gateway.registry.sqlite import SqliteStore
from gateway.registry.store import Store, StoreError

logger = logging.getLogger(__name__)

__all__ = ["RegistryRouteFeed", "RegistryRoutes", "feed_for_sqlite", "policy_from_json"]

DEFAULT_STALE_AFTER = 1800.0
"""Seconds after the last handshake at which an instance stops receiving app traffic."""


def policy_from_json(value: Mapping[str, Any] | None) -> PortPolicy | None:
    """The registry's JSON port policy (``{restrict_mode, ports: [{port, pp}]}``) as a
    :class:`PortPolicy`; ``None`` (unknown, so denied) for a missing or malformed one."""
    if value is None:
        return None
    try:
        restrict = value.get("restrict_mode", False)
        ports = value.get("ports", [])
        if not isinstance(restrict, bool) or not isinstance(ports, list):
            return None
        pp: dict[int, bool] = {}
        for entry in ports:
            port, flag = entry.get("port"), entry.get("pp", False)
            if not isinstance(port, int) or not 0 < port < 65536 or not isinstance(flag, bool):
                return None
            pp[port] = flag
    except AttributeError:  # an entry that is not an object
        return None
    return PortPolicy(restrict, MappingProxyType(pp))


class RegistryRoutes:
    """An immutable routing snapshot of registered instances."""

    __slots__ = ("_by_app", "_by_instance", "built_at", "revision")

    def __init__(
        self,
        records: Iterable[InstanceRecord],
        *,
        now: float,
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
        stale_after: float = DEFAULT_STALE_AFTER,
        revision: int = 0,
    ) -> None:
        overrides = overrides or {}
        by_app: dict[str, list[Candidate]] = {}
        by_instance: dict[str, Candidate] = {}
        for rec in records:
            age = math.inf if rec.last_handshake is None else max(0.0, now - rec.last_handshake)
            reported = overrides.get(rec.instance_id, rec.port_policy)
            cand = Candidate(
                instance_id=rec.instance_id,
                app_id=rec.app_id,
                host=str(rec.ip),
                policy=policy_from_json(reported),
                freshness=age,
                fallback=stale_after <= age < math.inf,
            )
            by_instance[rec.instance_id] = cand
            if age < math.inf:
                by_app.setdefault(rec.app_id, []).append(cand)
        self._by_instance: Mapping[str, Candidate] = MappingProxyType(by_instance)
        # sorted by age, fresh ones come first and stale ones (fallbacks) after them
        self._by_app: Mapping[str, tuple[Candidate, ...]] = MappingProxyType(
            {app: tuple(sorted(c, key=_age)) for app, c in by_app.items()}
        )
        self.built_at = now
        self.revision = revision

    def lookup(self, ident: str, top_n: int) -> tuple[Candidate, ...]:
        inst = self._by_instance.get(ident)
        if inst is not None:
            return (inst,)
        cands = self._by_app.get(ident, ())
        return cands if len(cands) <= top_n else cands[:top_n]

    def __len__(self) -> int:
        return len(self._by_instance)


def _age(c: Candidate) -> float:
    return c.freshness


class RegistryRouteFeed:
    """Builds :class:`RegistryRoutes` from a store when it changed or is due for a refresh.

    ``open_store`` is called lazily (and again after an error), so a worker started before
    the control plane created the database simply has no registry routes until it exists.
    ``overrides`` reads admin port-policy overrides from the same store.
    """

    def __init__(
        self,
        open_store: Callable[[], Store],
        *,
        refresh_every: float = 10.0,
        stale_after: float = DEFAULT_STALE_AFTER,
        overrides: Callable[[Store], Mapping[str, Mapping[str, Any]]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._open = open_store
        self._store: Store | None = None
        self._refresh_every = refresh_every
        self._stale_after = stale_after
        self._overrides = overrides
        self._clock = clock
        self._last: RegistryRoutes | None = None

    def poll(self) -> RegistryRoutes | None:
        """A new table if anything changed since the last one, else ``None``."""
        now = self._clock()
        try:
            if self._store is None:
                self._store = self._open()
            revision = self._store.revision()
            last = self._last
            if (
                last is not None
                and last.revision == revision
                and now - last.built_at < self._refresh_every
            ):
                return None
            records = self._store.list_instances()
            overrides = self._overrides(self._store) if self._overrides else None
        except FileNotFoundError:  # no registry yet (control plane not started): no routes
            self.close()
            return None
        except (StoreError, OSError) as exc:
            logger.warning("registry routes: cannot read the registry (%s); keeping the last", exc)
            self.close()
            return None
        table = RegistryRoutes(
            records,
            now=now,
            overrides=overrides,
            stale_after=self._stale_after,
            revision=revision,
        )
        self._last = table
        return table

    def close(self) -> None:
        if self._store is not None:
            try:
                self._store.close()
            finally:
                self._store = None


def feed_for_sqlite(
    path: Path,
    *,
    refresh_every: float = 10.0,
    stale_after: float = DEFAULT_STALE_AFTER,
    overrides: Callable[[Store], Mapping[str, Mapping[str, Any]]] | None = None,
) -> RegistryRouteFeed:
    """A feed reading the SQLite registry at ``path`` once it exists (never creating it: the
    control plane owns the file; a worker is only a WAL reader)."""

    def open_store() -> Store:
        if not path.exists():
            raise FileNotFoundError(path)
        return SqliteStore(path)

    return RegistryRouteFeed(
        open_store, refresh_every=refresh_every, stale_after=stale_after, overrides=overrides
    )
