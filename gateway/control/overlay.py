"""The routing overlay: what the operator set that the proxy workers must apply.

Custom-domain routes, drained instances and port-policy overrides live in the registry
store, which the workers (separate processes) do not open. After every change of those the
control plane writes them as one JSON document, ``<data_dir>/run/control/routing.json``
(temp file, fsync, rename: a reader sees the old or the new document, never a mix), and
signals the supervisor; each worker re-reads it on ``SIGHUP`` with :func:`read_overlay`
into an immutable :class:`Overlay` and swaps it in with its route snapshot.

It also lists the base domains (configuration and API) so the workers' SNI split can follow
domains added at runtime. Lookups for the proxy's decisions: ``custom_route(sni)`` (checked
before the TXT lookup),
``drained`` (skip these candidates for new connections; open ones are untouched) and
``port_policy(instance_id)`` (an admin override replaces the instance-reported policy).
The worker lays the overlay over its static routes and, through
:meth:`OverlayRoutes.overlay_on` (``gateway.proxy.routes.combine``), over the registry's
routes too, so draining a registered CVM instance takes effect at the next ``SIGHUP``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from gateway.control.registration import PortPolicy
from gateway.control.state import OperatorState
from gateway.proxy import routes as proxy_routes

__all__ = [
    "Overlay",
    "OverlayRoutes",
    "RouteTarget",
    "overlay_path",
    "read_overlay",
    "write_overlay",
]

VERSION = 1


def overlay_path(data_dir: Path) -> Path:
    return data_dir / "run" / "control" / "routing.json"


@dataclass(frozen=True, slots=True)
class RouteTarget:
    app_id: str
    port: int


def _empty() -> Mapping[str, Any]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Overlay:
    """An immutable snapshot of the operator's routing decisions (``revision``: the store's)."""

    revision: int = 0
    base_domains: tuple[str, ...] = ()
    routes: Mapping[str, RouteTarget] = field(default_factory=_empty)
    drained: frozenset[str] = frozenset()
    port_policies: Mapping[str, PortPolicy] = field(default_factory=_empty)

    def custom_route(self, sni: str) -> RouteTarget | None:
        return self.routes.get(sni.lower().rstrip("."))

    def port_policy(self, instance_id: str) -> PortPolicy | None:
        return self.port_policies.get(instance_id)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "revision": self.revision,
            "base_domains": list(self.base_domains),
            "routes": {d: {"app_id": t.app_id, "port": t.port} for d, t in self.routes.items()},
            "drained": sorted(self.drained),
            "port_policies": {k: p.to_json() for k, p in self.port_policies.items()},
        }

    @classmethod
    def from_state(cls, state: OperatorState) -> Overlay:
        return cls(
            revision=state.store.revision(),
            base_domains=tuple(d.domain for d in state.domains()),
            routes=MappingProxyType(
                {r.domain: RouteTarget(r.app_id, r.port) for r in state.routes()}
            ),
            drained=frozenset(state.drained()),
            port_policies=MappingProxyType(
                {o.instance_id: o.policy for o in state.port_policy_overrides()}
            ),
        )

    @classmethod
    def from_json(cls, doc: Any) -> Overlay:
        """Decode; raises ValueError for anything but a document :meth:`to_json` wrote."""
        if not isinstance(doc, dict) or doc.get("version") != VERSION:
            raise ValueError(f"routing overlay: expected version {VERSION}")
        try:
            routes = {
                str(d): RouteTarget(str(t["app_id"]), int(t["port"]))
                for d, t in doc["routes"].items()
            }
            policies = {str(k): PortPolicy.from_json(v) for k, v in doc["port_policies"].items()}
            return cls(
                revision=int(doc["revision"]),
                base_domains=tuple(str(d) for d in doc.get("base_domains", ())),
                routes=MappingProxyType(routes),
                drained=frozenset(str(i) for i in doc["drained"]),
                port_policies=MappingProxyType(policies),
            )
        except Exception as exc:  # noqa: BLE001 - any shape error is one ValueError
            raise ValueError(f"routing overlay: malformed ({type(exc).__name__}: {exc})") from None


def write_overlay(path: Path, overlay: Overlay) -> None:
    """Atomically replace ``path`` with ``overlay``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    data = json.dumps(overlay.to_json(), sort_keys=True).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_overlay(path: Path) -> Overlay:
    """The overlay at ``path``; an empty one if there is none yet. ValueError if corrupt."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return Overlay()
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"routing overlay {path}: not JSON ({exc})") from None
    return Overlay.from_json(doc)


class OverlayRoutes:
    """A proxy :class:`~gateway.proxy.routes.RouteTable` with the overlay applied.

    Drained instances are left out while any other candidate remains (so no new connection
    reaches them; connections already open are untouched); when every candidate is drained
    they come back flagged ``drained``, so that ``decide`` refuses with a reason that says so
    (and a drained static app does not fall through to another table). An instance with an
    admin port-policy override gets that policy instead of its own. Immutable, like the
    table it wraps.
    """

    __slots__ = ("_inner", "_overlay", "_policies")

    def __init__(
        self,
        inner: proxy_routes.RouteTable,
        overlay: Overlay,
        policies: Mapping[str, proxy_routes.PortPolicy] | None = None,
    ) -> None:
        self._inner = inner
        self._overlay = overlay
        if policies is None:
            policies = {
                k: proxy_routes.PortPolicy(
                    p.restrict_mode, MappingProxyType({a.port: a.pp for a in p.ports})
                )
                for k, p in overlay.port_policies.items()
            }
        self._policies = policies

    def overlay_on(self, table: proxy_routes.RouteTable) -> OverlayRoutes:
        """The same overlay laid over another table (the workers' registry routes)."""
        return OverlayRoutes(table, self._overlay, self._policies)

    @property
    def base_domains(self) -> tuple[str, ...]:
        """Base domains added through the admin API; the workers route them like the
        configured ones (``Worker.base_domains``)."""
        return self._overlay.base_domains

    def custom_route(self, sni: str) -> RouteTarget | None:
        """The operator's route for a custom domain (``decide`` checks it before DNS)."""
        return self._overlay.custom_route(sni)

    def lookup(self, ident: str, top_n: int) -> tuple[proxy_routes.Candidate, ...]:
        drained = self._overlay.drained
        policies = self._policies
        if not drained and not policies:
            return self._inner.lookup(ident, top_n)
        found = self._inner.lookup(ident, top_n + len(drained))
        out = []
        held = []
        for cand in found:
            if cand.instance_id and cand.instance_id in drained:
                held.append(dataclasses.replace(cand, drained=True))
                continue
            policy = policies.get(cand.instance_id) if cand.instance_id else None
            out.append(dataclasses.replace(cand, policy=policy) if policy is not None else cand)
        if not out:
            return tuple(held)  # every candidate is drained: decide says so
        return tuple(out[:top_n])
