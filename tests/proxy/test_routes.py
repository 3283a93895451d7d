"""Static and combined route tables."""

from __future__ import annotations

from types import MappingProxyType

from gateway.proxy.routes import CombinedRoutes, StaticRoutes
from gateway.proxy.settings import StaticRoute


def table(app: str, *hosts: str, ids: tuple[str, ...] = ()) -> StaticRoutes:
    return StaticRoutes([StaticRoute(app_id=app, backends=hosts, instance_ids=ids)])


def test_first_table_that_knows_an_id_answers_alone() -> None:
    static = table("app", "127.0.0.1")
    registry = StaticRoutes(
        [
            StaticRoute(app_id="app", backends=("10.0.0.2",)),
            StaticRoute(app_id="cvm", backends=("10.0.0.3", "10.0.0.4"), instance_ids=("i3", "i4")),
        ]
    )
    combined = CombinedRoutes(static, registry)
    assert [c.host for c in combined.lookup("app", 3)] == ["127.0.0.1"]  # static wins, no mix
    assert [c.host for c in combined.lookup("cvm", 3)] == ["10.0.0.3", "10.0.0.4"]
    assert [c.host for c in combined.lookup("cvm", 1)] == ["10.0.0.3"]  # top_n still applies
    assert [c.host for c in combined.lookup("i4", 3)] == ["10.0.0.4"]
    assert combined.lookup("nobody", 3) == ()
    assert CombinedRoutes().lookup("app", 3) == ()


def test_combine_lays_the_operator_overlay_over_the_registry_and_keeps_custom_routes() -> None:
    """What a worker routes with: a drain published in the overlay (which arrives with the
    static table) applies to registry instances too, and operator custom-domain routes are
    still found once a registry table sits behind the static one."""
    from gateway.control.overlay import Overlay, OverlayRoutes, RouteTarget
    from gateway.proxy.decide import CustomRouteTable
    from gateway.proxy.routes import combine

    overlay = Overlay(
        drained=frozenset({"i3"}),
        routes=MappingProxyType({"shop.example.org": RouteTarget("cvm", 443)}),
    )
    static = OverlayRoutes(table("app", "127.0.0.1"), overlay)
    registry = table("cvm", "10.0.0.3", "10.0.0.4", ids=("i3", "i4"))
    assert combine(static, None) is static
    routes = combine(static, registry)
    assert [c.host for c in routes.lookup("cvm", 3)] == ["10.0.0.4"]  # i3 drained
    (held,) = routes.lookup("i3", 3)
    assert held.drained  # by instance id: refused as drained, not "unknown"
    assert isinstance(routes, CustomRouteTable)
    assert routes.custom_route("shop.example.org") == RouteTarget("cvm", 443)
    assert routes.custom_route("other.example.org") is None
    # without an overlay (no control plane) the registry table is used as it is
    plain = combine(table("app", "127.0.0.1"), registry)
    assert [c.host for c in plain.lookup("cvm", 3)] == ["10.0.0.3", "10.0.0.4"]
