"""A worker follows the tunnel registry: polled on a timer, combined with static routes."""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Callable
from pathlib import Path

from gateway.certs.store import CertStore
from gateway.proxy.listeners import Worker
from gateway.proxy.registry_routes import feed_for_sqlite
from gateway.proxy.routes import StaticRoutes
from gateway.proxy.settings import ProxySettings, StaticRoute
from gateway.proxy.stats import WorkerState
from gateway.registry.records import InstanceRecord
from gateway.registry.sqlite import SqliteStore


def record(iid: str, app: str, last: int, handshake: float | None) -> InstanceRecord:
    now = time.time()
    return InstanceRecord(
        instance_id=iid,
        app_id=app,
        public_key=f"{last:02d}" + "B" * 41 + "=",
        ip=ipaddress.IPv4Address(f"10.9.0.{last}"),
        registered_at=now,
        last_seen=now,
        last_handshake=handshake,
        port_policy={"restrict_mode": False, "ports": []},
    )


def make_worker(tmp_path: Path, db: Path, loop: asyncio.AbstractEventLoop) -> Worker:
    settings = ProxySettings(
        listen=("127.0.0.1:1",), workers=1, certs_dir=tmp_path / "certs",
        registry_poll_interval=0.02, registry_refresh_interval=0.2,
    )  # fmt: skip
    static = [StaticRoute(app_id="pinned", backends=("127.0.0.1",))]
    return Worker(
        loop,
        settings,
        CertStore(settings.certs_dir, settings.tls_versions),
        StaticRoutes(static),
        WorkerState(),
        reload_routes=lambda: StaticRoutes(
            [StaticRoute(app_id="reloaded", backends=("127.0.0.2",))]
        ),
        registry_feed=feed_for_sqlite(db, refresh_every=0.2),
    )


def test_worker_picks_up_registry_changes_and_keeps_static_first(tmp_path: Path) -> None:
    db = tmp_path / "registry.sqlite3"
    loop = asyncio.new_event_loop()
    try:
        worker = make_worker(tmp_path, db, loop)
    except BaseException:
        loop.close()
        raise

    def hosts(ident: str) -> list[str]:
        return [c.host for c in worker.snapshot.routes.lookup(ident, 3)]

    async def until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
        """Poll (the worker polls the registry every 50 ms) instead of a fixed sleep, so a
        loaded machine is slow, not wrong."""
        deadline = loop.time() + timeout
        while not check():
            assert loop.time() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.02)

    async def main() -> None:
        worker.start_registry_polling()  # no database yet: static routes only, no error
        await asyncio.sleep(0.1)
        assert hosts("pinned") == ["127.0.0.1"] and hosts("cvm") == []
        assert not db.exists()  # a worker never creates the control plane's file
        store = SqliteStore(db)
        try:
            store.put_instance(record("i1", "cvm", 2, time.time()), expect_revision=0)
            store.put_instance(record("pinned", "other", 3, time.time()), expect_revision=0)
            await until(lambda: hosts("cvm") == ["10.9.0.2"], "the first instances")
            assert hosts("i1") == ["10.9.0.2"]
            assert hosts("pinned") == ["127.0.0.1"]  # static wins over an instance id
            # never handshaken -> app traffic only once the handshake shows up (refresh)
            store.put_instance(record("i2", "cvm", 4, None), expect_revision=0)
            await until(lambda: hosts("i2") == ["10.9.0.4"], "the instance without handshake")
            assert hosts("cvm") == ["10.9.0.2"]
            # SIGHUP: static routes re-read, registry routes kept
            worker.reload()
            assert hosts("reloaded") == ["127.0.0.2"] and hosts("cvm") == ["10.9.0.2"]
            store.delete_instance("i1")
            await until(lambda: hosts("cvm") == [] and hosts("i1") == [], "the removal")
        finally:
            store.close()
        await worker.drain()

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    assert worker.registry_feed is not None


def test_a_broken_registry_file_keeps_the_worker_serving(tmp_path: Path) -> None:
    db = tmp_path / "registry.sqlite3"
    db.write_bytes(b"this is not a database" * 100)
    loop = asyncio.new_event_loop()
    try:
        worker = make_worker(tmp_path, db, loop)
    except BaseException:
        loop.close()
        raise

    async def main() -> None:
        worker.start_registry_polling()
        await asyncio.sleep(0.1)
        assert [c.host for c in worker.snapshot.routes.lookup("pinned", 3)] == ["127.0.0.1"]
        await worker.drain()

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


def test_base_domains_added_by_the_operator_are_routed_after_a_reload(tmp_path: Path) -> None:
    """The control plane publishes API-added base domains in its overlay; a reload (SIGHUP)
    makes every worker route names under them, configured domains first."""
    from gateway.control.overlay import Overlay, OverlayRoutes

    overlays = [Overlay(), Overlay(base_domains=("added.test", "conf.test"))]
    loop = asyncio.new_event_loop()
    try:
        settings = ProxySettings(
            listen=("127.0.0.1:1",), workers=1, certs_dir=tmp_path / "certs",
            base_domains=("conf.test",),
        )  # fmt: skip
        static = StaticRoutes([StaticRoute(app_id="app", backends=("127.0.0.1",))])
        worker = Worker(
            loop,
            settings,
            CertStore(settings.certs_dir, settings.tls_versions),
            OverlayRoutes(static, overlays[0]),
            WorkerState(),
            reload_routes=lambda: OverlayRoutes(static, overlays[-1]),
        )
        assert worker.snapshot.base_domains == ("conf.test",)
        worker.reload()
        after: tuple[str, ...] = worker.snapshot.base_domains  # re-read after the reload
        assert after == ("conf.test", "added.test")
    finally:
        loop.close()


def test_the_operators_overlay_applies_to_registry_instances_too(tmp_path: Path) -> None:
    """Drains and custom-domain routes reach CVMs found in the registry, not only static
    routes (the overlay once wrapped the static table alone, so a drained CVM kept getting
    connections and `ctl custom-domains` routes were ignored whenever registry routes were
    on); here through a real worker's reload and registry polling."""
    from gateway.control.overlay import Overlay, OverlayRoutes, RouteTarget
    from gateway.proxy.decide import CustomRouteTable

    db = tmp_path / "registry.sqlite3"
    overlay = Overlay(drained=frozenset({"i1"}), routes={"shop.test": RouteTarget("cvm", 443)})
    loop = asyncio.new_event_loop()
    try:
        worker = make_worker(tmp_path, db, loop)
        worker.reload_routes = lambda: OverlayRoutes(
            StaticRoutes([StaticRoute(app_id="pinned", backends=("127.0.0.1",))]), overlay
        )
    except BaseException:
        loop.close()
        raise

    def hosts(ident: str) -> list[str]:
        return [c.host for c in worker.snapshot.routes.lookup(ident, 3)]

    async def main() -> None:
        store = SqliteStore(db)
        try:
            store.put_instance(record("i1", "cvm", 2, time.time()), expect_revision=0)
            store.put_instance(record("i2", "cvm", 3, time.time() - 1), expect_revision=0)
            worker.reload()
            worker.start_registry_polling()
            await asyncio.sleep(0.15)
            assert hosts("cvm") == ["10.9.0.3"] and hosts("i2") == ["10.9.0.3"]
            routes = worker.snapshot.routes
            # asked for by its own id, a drained instance comes back flagged, for decide()
            assert [c.drained for c in routes.lookup("i1", 3)] == [True]
            assert isinstance(routes, CustomRouteTable)
            assert routes.custom_route("shop.test") == RouteTarget("cvm", 443)
            assert hosts("pinned") == ["127.0.0.1"]
        finally:
            store.close()
        await worker.drain()

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
