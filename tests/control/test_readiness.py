"""``/ready`` of a real control plane: milestones, live checks, and what node.py must mark.

The plane is started for real (SQLite store, certificate manager, admin listener) and probed
over HTTP. Before this, ``/ready`` answered 200 whatever the state.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.config import Config
from gateway.control.admin import create_admin_app
from gateway.control.plane import ControlPlane
from gateway.control.readiness import Readiness, store_check
from gateway.control.registration_settings import RpcSettings
from gateway.control.rpc_identity_settings import RpcIdentitySettings
from gateway.control.settings import AdminSettings
from gateway.registry.sqlite import SqliteStore
from gateway.settings import CoreSettings
from tests.control.test_admin import _creds, serve
from tests.control.test_plane import CREDS, running
from tests.helpers.processes import free_port


def _config(tmp_path: Path, rpc: bool = False) -> Config:
    return Config(
        core=CoreSettings(data_dir=tmp_path / "data"),
        admin=AdminSettings(listen=f"127.0.0.1:{free_port()}"),
        rpc=RpcSettings(cert_file="rpc.pem", key_file="rpc.key") if rpc else RpcSettings(),
    )


def _probe(plane: ControlPlane) -> httpx.Response:
    assert isinstance(plane.address, tuple)
    host, port = plane.address
    return httpx.get(f"http://{host}:{port}/ready", timeout=10)


def test_plane_alone_is_ready_once_started(tmp_path: Path) -> None:
    with running(ControlPlane(_config(tmp_path), creds=CREDS)) as plane:
        r = _probe(plane)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["ready"] is True and body["not_ready"] == []
        assert set(body["checks"]) == {"store", "certbot"}
        assert body["checks"]["store"] == {"ready": True, "detail": "ok"}


def test_rpc_configured_waits_for_peers_and_the_rpc_listener(tmp_path: Path) -> None:
    """With ``[rpc]`` the tunnel runs: 503 until the peers are restored (a registry handed
    in by ``open_tunnel`` is) and whoever binds the RPC marks ``registration_rpc``."""
    with running(ControlPlane(_config(tmp_path, rpc=True), creds=CREDS)) as plane:
        r = _probe(plane)
        assert r.status_code == 503
        body = r.json()
        assert body["ready"] is False
        assert body["not_ready"] == ["peers_restored", "registration_rpc"]
        assert "not bound" in body["checks"]["registration_rpc"]["detail"]
        plane.readiness.mark("peers_restored")
        plane.readiness.mark("registration_rpc")  # what gateway/control/node.py calls
        assert _probe(plane).status_code == 200
        plane.readiness.unmark("registration_rpc", "listener closed")
        r = _probe(plane)
        assert r.status_code == 503 and r.json()["checks"]["registration_rpc"] == {
            "ready": False,
            "detail": "listener closed",
        }


def test_a_tunnel_registry_counts_as_restored(tmp_path: Path) -> None:
    cfg = _config(tmp_path, rpc=True)
    store = SqliteStore(tmp_path / "tunnel.sqlite3")
    try:
        from gateway.registry.factory import build_registry

        registry = build_registry(store, cfg.wg, cfg.registry, None)
        with running(ControlPlane(cfg, creds=CREDS, registry=registry)) as plane:
            assert _probe(plane).json()["not_ready"] == ["registration_rpc"]
    finally:
        store.close()


def test_a_broken_store_makes_the_node_unready(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "given.sqlite3")
    with running(ControlPlane(_config(tmp_path), creds=CREDS, store=store)) as plane:
        assert _probe(plane).status_code == 200
        store.close()  # e.g. the disk went away under it
        r = _probe(plane)
        assert r.status_code == 503
        assert r.json()["not_ready"] == ["store"]
        assert "does not answer" in r.json()["checks"]["store"]["detail"]


def test_readiness_report_and_probe_without_credentials() -> None:
    ready = Readiness()
    ready.require("certbot", "not started")

    def flaky() -> str | None:
        raise ZeroDivisionError("boom")

    ready.check("flaky", flaky)  # a raising check is a failing check
    report = ready.report()
    assert not report.ready
    assert report.checks["flaky"]["ready"] is False
    assert "ZeroDivisionError" in report.checks["flaky"]["detail"]

    async def main() -> None:
        app = create_admin_app(_creds(), status=dict, readiness=ready)
        async with serve(app) as client:
            r = await client.get("/ready")  # public: no credentials
            assert r.status_code == 503
            assert r.json()["not_ready"] == ["certbot", "flaky"]
            ready.mark("certbot")
            ready.check("flaky", lambda: None)
            r = await client.get("/ready")
            assert r.status_code == 200 and r.json()["ready"] is True

    asyncio.run(main())


def test_store_check_names_the_failure(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.sqlite3")
    check = store_check(store)
    assert check() is None
    store.close()
    problem = check()
    assert problem is not None and "ProgrammingError" in problem


def test_default_app_without_readiness_is_ready() -> None:
    async def main() -> None:
        async with serve(create_admin_app(_creds(), status=dict)) as client:
            assert (await client.get("/ready")).json() == {
                "ready": True,
                "not_ready": [],
                "checks": {},
            }

    asyncio.run(main())


@pytest.mark.parametrize(
    "identity,expected",
    [
        ({}, ["certbot"]),
        ({"rpc": RpcSettings(cert_file="rpc.pem", key_file="rpc.key")}, None),
        ({"rpc_identity": RpcIdentitySettings(tee="sim", sim_dir="/nonexistent")}, None),
    ],
    ids=["no-rpc", "rpc-files", "rpc-attested"],
)
def test_the_plan_follows_the_rpc_identity(
    tmp_path: Path, identity: dict[str, Any], expected: list[str] | None
) -> None:
    """Either RPC identity (files or an attested one) means a tunnel and an RPC to wait for."""
    cfg = dataclasses.replace(_config(tmp_path), **identity)
    pending = ControlPlane(cfg, creds=CREDS).readiness.report().to_json()["not_ready"]
    assert pending == (expected or ["certbot", "peers_restored", "registration_rpc"])
