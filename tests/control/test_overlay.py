"""The routing overlay file the proxy workers read: round trip, atomic replace, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.control.models import CustomRoute, PortPolicyOverride
from gateway.control.overlay import (
    Overlay,
    OverlayRoutes,
    RouteTarget,
    overlay_path,
    read_overlay,
    write_overlay,
)
from gateway.control.state import OperatorState, drained_instances, port_policy_overrides
from gateway.proxy.decide import CustomRouteTable
from gateway.proxy.routes import StaticRoutes
from gateway.registry.sqlite import SqliteStore

APP = "9a" * 20


def test_overlay_round_trip_from_state(tmp_path: Path) -> None:
    path = overlay_path(tmp_path)
    assert read_overlay(path) == Overlay()  # nothing published yet: nothing overridden
    with SqliteStore(tmp_path / "r.sqlite3") as store:
        state = OperatorState(store)
        state.put_route(CustomRoute("shop.example.org", APP, 8443), create=True)
        state.set_drain("inst-1", True)
        state.put_port_policy(
            PortPolicyOverride.from_json("inst-2", {"ports": [{"port": 80, "pp": True}]})
        )
        overlay = Overlay.from_state(state)
        write_overlay(path, overlay)
    back = read_overlay(path)
    assert back == overlay and back.revision > 0
    route = back.custom_route("SHOP.example.org.")
    assert route is not None and (route.app_id, route.port) == (APP, 8443)
    assert back.custom_route("other.example.org") is None
    assert "inst-1" in back.drained and back.base_domains == ()
    policy = back.port_policy("inst-2")
    assert policy is not None and policy.ports[0].pp is True
    assert [p.name for p in path.parent.iterdir()] == ["routing.json"]  # no temp debris


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        '{"version": 99}',
        '{"version": 1, "revision": 1, "routes": {"a": {"port": 1}}, "drained": [], '
        '"port_policies": {}}',
        '{"version": 1, "revision": 1, "routes": {}, "drained": [], '
        '"port_policies": {"i": {"ports": [{"port": 0}]}}}',
    ],
)
def test_corrupt_overlay_is_a_value_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "routing.json"
    path.write_text(text)
    with pytest.raises(ValueError, match="routing overlay"):
        read_overlay(path)


def test_registry_routes_take_admin_overrides_and_drains_from_the_store(tmp_path: Path) -> None:
    """What a worker's registry route feed reads: overrides replace reported policies (an
    instance that reported none becomes reachable), drained instances are skipped."""
    import time

    from gateway.proxy.registry_routes import RegistryRouteFeed
    from gateway.registry.service import Registration, Registry
    from gateway.tunnel.keys import generate_private_key, public_key
    from gateway.tunnel.settings import WgSettings

    db = tmp_path / "r.sqlite3"
    with SqliteStore(db) as store:
        registry = Registry(store, WgSettings().plan(), clock=time.time)
        for inst in ("i-a", "i-b"):
            registry.register(Registration(inst, APP, public_key(generate_private_key())))
        state = OperatorState(store)
        state.put_port_policy(PortPolicyOverride.from_json("i-a", {"restrict_mode": False}))
        state.set_drain("i-b", True)
    feed = RegistryRouteFeed(lambda: SqliteStore(db), overrides=port_policy_overrides)
    table = feed.poll()
    assert table is not None
    (a,) = table.lookup("i-a", 3)
    assert a.policy is not None and a.policy.allows(8080)  # the override, not "unknown"
    (b,) = table.lookup("i-b", 3)
    assert b.policy is None  # reported none, no override: denied
    with SqliteStore(db) as store:
        drained = drained_instances(store)
    overlay = Overlay(drained=drained)
    # drained: returned flagged (decide refuses it as "drained"), never as a live candidate
    (held,) = OverlayRoutes(table, overlay).lookup("i-b", 3)
    assert held.drained and held.instance_id == "i-b"
    assert OverlayRoutes(table, overlay).lookup("i-a", 3) == (a,)
    feed.close()


def test_overlay_routes_carry_custom_routes_for_the_proxy() -> None:
    """The workers' table answers ``custom_route``, which ``decide`` checks before DNS."""
    from types import MappingProxyType

    overlay = Overlay(routes=MappingProxyType({"shop.example.org": RouteTarget(APP, 443)}))
    table = OverlayRoutes(StaticRoutes(()), overlay)
    assert isinstance(table, CustomRouteTable)
    assert table.custom_route("Shop.example.org") == RouteTarget(APP, 443)
    assert table.custom_route("other.example.org") is None
