"""A real ``gateway serve`` routes to instances it finds in the registry file (no root needed).

The control plane is played by this test: it writes instance records into the SQLite
registry under the gateway's data dir, as the registration RPC would, pointing at the demo
origin on 127.0.0.1. The workers must pick them up on their timer, keep static routes first,
and drop an instance once it is deleted.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.control.models import T_PORT_POLICY
from gateway.registry.records import InstanceRecord
from gateway.registry.sqlite import SqliteStore
from tests.helpers.gateway import (
    BASE,
    Gateway,
    Origin,
    get,
    make_certs,
    run_gateway,
    run_origin,
    tls_connect,
    write_config,
)
from tests.helpers.processes import wait_until

pytestmark = pytest.mark.slow

APP = "5bb4ff9a3837357f19dc176407a5709c62eb6c56"
INSTANCE = "0202020202020202020202020202020202020202"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, Origin, Path]]:
    root = tmp_path_factory.mktemp("regserve")
    ca, _ = make_certs(root)
    with run_origin(root) as origin:
        config = write_config(
            root, "gw", origin, registry_poll_interval=0.1, registry_refresh_interval=0.5
        )
        with run_gateway(config) as gw:
            yield gw, origin, ca


def fetch(gw: Gateway, ca: Path, name: str) -> bytes | None:
    try:
        with tls_connect(gw.port, f"{name}.{BASE}", ca, timeout=3) as sock:
            head, body = get(sock, "/")
    except OSError:
        return None
    return body if head.startswith(b"HTTP/1.1 200") else None


def test_workers_follow_the_registry_file(setup: tuple[Gateway, Origin, Path]) -> None:
    gw, origin, ca = setup
    name = f"{APP}-{origin.http}"
    assert fetch(gw, ca, name) is None  # no registry yet: unknown app, refused
    now = time.time()
    store = SqliteStore(gw.data_dir / "registry.sqlite3")
    try:
        store.put_instance(
            InstanceRecord(
                instance_id=INSTANCE, app_id=APP, public_key="A" * 43 + "=",
                ip=ipaddress.IPv4Address("127.0.0.1"), registered_at=now, last_seen=now,
                last_handshake=now,
                port_policy={"restrict_mode": True, "ports": [{"port": origin.http}]},
            ),
            expect_revision=0,
        )  # fmt: skip
        t0 = time.monotonic()
        wait_until(  # several in a row: every worker polls on its own timer
            lambda: all(fetch(gw, ca, name) is not None for _ in range(4)),
            gw.proc,
            10,
            "registry route",
            gw.log,
        )
        print(f"registry write -> routed by both workers' tables: {time.monotonic() - t0:.2f}s")
        for _ in range(6):  # every worker has it (connections spread over both)
            assert fetch(gw, ca, name) is not None
        assert fetch(gw, ca, f"{INSTANCE}-{origin.http}") is not None  # by instance id
        assert fetch(gw, ca, f"{APP}-{origin.tls}s") is None  # port not in the app's policy
        # the operator's port policy for the instance (admin API's table) wins over the app's
        policy = {"restrict_mode": True, "ports": [{"port": origin.tls, "pp": False}]}
        store.kv_put(T_PORT_POLICY, INSTANCE, policy)
        wait_until(
            lambda: all(fetch(gw, ca, f"{APP}-{origin.tls}s") is not None for _ in range(4)),
            gw.proc,
            10,
            "the admin port policy",
            gw.log,
        )
        assert fetch(gw, ca, name) is None  # 8080 is no longer allowed
        store.delete_instance(INSTANCE)
        wait_until(
            lambda: all(fetch(gw, ca, f"{APP}-{origin.tls}s") is None for _ in range(4)),
            gw.proc,
            10,
            "route removal",
            gw.log,
        )
        assert fetch(gw, ca, f"app-{origin.http}") is not None  # static routes unaffected
    finally:
        store.close()
