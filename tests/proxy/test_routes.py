"""Static and combined route tables."""

from __future__ import annotations

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
