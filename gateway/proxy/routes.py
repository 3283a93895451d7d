"""Where an app or instance id leads: candidate backends, freshest first.

:class:`RouteTable` is the interface the data plane reads; :class:`StaticRoutes` serves the
``[[proxy.routes]]`` config section, :class:`~gateway.proxy.registry_routes.RegistryRoutes`
the tunnel registry, and :class:`CombinedRoutes` puts the two together (static first).
Either way a table is an immutable snapshot: the control plane builds a new one and the worker
swaps it in whole, so a connection never sees a half-updated table.

Lookup rules (from the upstream gateway, ``select_top_n_hosts``):

1. ``id`` names an instance -> exactly that instance, whatever its freshness;
2. else ``id`` names an app -> its instances that have ever been seen (finite freshness),
   sorted freshest first, at most ``top_n``; those past the stale window come last, flagged
   ``fallback`` (``decide`` uses them only when no fresh instance is eligible);
3. else nothing.

Port policy is fail-closed: a candidate whose policy is unknown (``None``) is never used.
A drained candidate (``drained``, set by the operator's overlay) is returned flagged rather
than dropped when nothing else is left, so that ``decide`` can say "drained" instead of
"unknown", and so that a drained static app does not fall through to the registry's table.
How the candidates are then spread over connections is ``decide``'s and the edge's business
(``proxy.balance``; docs/proxy.md, "Balancing and drains").
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

from gateway.proxy.settings import StaticRoute

__all__ = [
    "OPEN_POLICY",
    "Candidate",
    "CombinedRoutes",
    "Overlaying",
    "PortPolicy",
    "RouteTable",
    "StaticRoutes",
    "combine",
]


@dataclass(frozen=True, slots=True)
class PortPolicy:
    """Which ports of an instance are reachable, and which want an outbound PROXY header."""

    restrict_mode: bool = False
    pp_ports: Mapping[int, bool] = field(default_factory=lambda: MappingProxyType({}))

    def allows(self, port: int) -> bool:
        return not self.restrict_mode or port in self.pp_ports

    def wants_pp(self, port: int) -> bool:
        return self.pp_ports.get(port, False)


OPEN_POLICY = PortPolicy()


@dataclass(frozen=True, slots=True)
class Candidate:
    """One backend an id may lead to.

    ``freshness`` is the age in seconds of the instance's last sign of life (the WireGuard
    handshake); ``math.inf`` means never seen. ``policy`` ``None`` means unknown and
    therefore denied. ``fallback``: seen, but not within the stale window (used for an app
    only when no fresh instance is eligible). ``drained``: the operator drained it (no new
    connections).
    """

    instance_id: str
    app_id: str
    host: str
    policy: PortPolicy | None
    freshness: float = 0.0
    fallback: bool = False
    drained: bool = False


class RouteTable(Protocol):
    """Read-only routing snapshot used by :func:`gateway.proxy.decide.decide`.

    Workers cache decisions per SNI for as long as a snapshot is installed, so a table's
    answers must not change while it is in use: when instances, freshness or policies change,
    build a new table and install it with ``Worker.swap_snapshot``.
    """

    def lookup(self, ident: str, top_n: int) -> tuple[Candidate, ...]:
        """Candidates for an instance or app id, best first (empty: unknown id)."""
        ...


class StaticRoutes:
    """Routes from configuration; freshness is 0 for every backend (always eligible)."""

    __slots__ = ("_by_app", "_by_instance")

    def __init__(self, routes: Iterable[StaticRoute]) -> None:
        by_app: dict[str, tuple[Candidate, ...]] = {}
        by_instance: dict[str, Candidate] = {}
        for route in routes:
            policy = PortPolicy(
                route.restrict_mode, MappingProxyType({r.port: r.pp for r in route.ports})
            )
            ids = route.instance_ids or tuple("" for _ in route.backends)
            cands = tuple(
                Candidate(instance_id=iid, app_id=route.app_id, host=host, policy=policy)
                for iid, host in zip(ids, route.backends, strict=True)
            )
            by_app[route.app_id] = tuple(
                sorted((c for c in cands if not math.isinf(c.freshness)), key=_age)
            )
            for cand in cands:
                if cand.instance_id:
                    by_instance[cand.instance_id] = cand
        self._by_app: Mapping[str, tuple[Candidate, ...]] = MappingProxyType(by_app)
        self._by_instance: Mapping[str, Candidate] = MappingProxyType(by_instance)

    def lookup(self, ident: str, top_n: int) -> tuple[Candidate, ...]:
        inst = self._by_instance.get(ident)
        if inst is not None:
            return (inst,)
        cands = self._by_app.get(ident, ())
        return cands if len(cands) <= top_n else cands[:top_n]


class CombinedRoutes:
    """Several tables asked in order; the first that knows an id answers for it alone.

    Static routes come first so that an operator's ``[[proxy.routes]]`` entry can pin an app
    (or shadow a registered one) without touching the registry. Ids are not merged across
    tables: mixing candidates of different sources would make their freshness incomparable.
    Operator custom-domain routes (``custom_route``) come from the first table that has them,
    so they keep working once a registry table is installed behind the static one.
    """

    __slots__ = ("tables",)

    def __init__(self, *tables: RouteTable) -> None:
        self.tables = tables

    def lookup(self, ident: str, top_n: int) -> tuple[Candidate, ...]:
        for table in self.tables:
            found = table.lookup(ident, top_n)
            if found:
                return found
        return ()

    def custom_route(self, sni: str) -> Any:
        """The first table's operator route for ``sni`` (``decide``'s ``CustomRouteTable``)."""
        for table in self.tables:
            find = getattr(table, "custom_route", None)
            if find is not None:
                found = find(sni)
                if found is not None:
                    return found
        return None


@runtime_checkable
class Overlaying(Protocol):
    """A table that carries the operator's overlay (drains, port-policy overrides) and can
    lay it over another table (``gateway.control.overlay.OverlayRoutes``)."""

    def overlay_on(self, table: RouteTable) -> RouteTable: ...


def combine(static: RouteTable, registry: RouteTable | None) -> RouteTable:
    """What a worker routes with: static routes first, then the registry's. The operator's
    overlay, which arrives with the static table on reload, applies to the registry's
    instances too, so a drain through the admin API reaches registered CVMs."""
    if registry is None:
        return static
    if isinstance(static, Overlaying):
        registry = static.overlay_on(registry)
    return CombinedRoutes(static, registry)


def _age(c: Candidate) -> float:
    return c.freshness
