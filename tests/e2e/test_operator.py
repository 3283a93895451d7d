"""``gateway serve`` with its control plane: the admin API changes what the proxy does.

A real ``gateway serve`` (supervisor, two workers, the ``gateway control`` child) in front of
the demo origin. Draining an instance or overriding its port policy through the admin API
reaches every worker (overlay file + SIGHUP) and new connections are refused; undoing it
restores them. Status and ``/metrics`` show the workers' counters. A killed control plane is
restarted by the supervisor. SIGTERM stops all of it.
"""

from __future__ import annotations

import os
import re
import signal
import ssl
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.registry.service import Registration, Registry
from gateway.registry.sqlite import SqliteStore
from gateway.tunnel.keys import generate_private_key, public_key
from gateway.tunnel.settings import WgSettings
from tests.helpers.gateway import (
    BASE,
    Origin,
    gateway_port,
    get,
    make_certs,
    run_origin,
    tls_connect,
    write_config,
)
from tests.helpers.processes import free_port, start, stop_by_pid, wait_listening, wait_until

pytestmark = pytest.mark.slow
TOKEN = "op-e2e-token-" + "e" * 19


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("operator")


@pytest.fixture(scope="module")
def origin(root: Path) -> Iterator[Origin]:
    make_certs(root)
    with run_origin(root) as o:
        yield o


def reachable(port: int, label: str, ca: Path) -> bool:
    try:
        with tls_connect(port, f"{label}.{BASE}", ca, timeout=3) as s:
            return get(s, "/health")[1] == b"ok"
    except (ssl.SSLError, OSError):
        return False


def test_admin_changes_reach_the_workers(root: Path, origin: Origin) -> None:
    ca, _ = make_certs(root)  # the dev CA the origin fixture created (idempotent)
    admin_port = free_port()
    cfg = write_config(
        root,
        "op",
        origin,
        extra=f"[admin]\nlisten = '127.0.0.1:{admin_port}'\ntoken_env = 'GW_TEST_OP_TOKEN'\n",
    )
    data_dir = root / "op"
    log = root / "op.log"
    port = gateway_port(cfg)
    env = {**os.environ, "GW_TEST_OP_TOKEN": TOKEN}
    proc = start([sys.executable, "-m", "gateway", "serve", "--config", str(cfg)], log, env=env)
    admin = httpx.Client(
        base_url=f"http://127.0.0.1:{admin_port}", headers={"X-Admin-Token": TOKEN}, timeout=10
    )
    label = f"inst1-{origin.http}"
    try:
        wait_listening(proc, "127.0.0.1", port, timeout=20, log=log)
        wait_listening(proc, "127.0.0.1", admin_port, timeout=20, log=log)
        assert reachable(port, label, ca)

        # counters: the workers' stats files, summed by the control process
        def accepted() -> int:
            return int(admin.get("/api/v1/status").json()["counters"].get("accepted", 0))

        wait_until(lambda: accepted() >= 1, proc, 10, "worker counters in status", log)
        assert "gateway_connections_accepted_total" in admin.get("/metrics").text

        # the static route's instance, registered as the tunnel would (same database)
        with SqliteStore(data_dir / "registry.sqlite3") as store:
            Registry(store, WgSettings().plan(), clock=time.time).register(
                Registration("inst1", "app", public_key(generate_private_key()))
            )

        assert admin.post("/api/v1/instances/inst1/drain").json()["draining"] is True
        wait_until(lambda: not reachable(port, label, ca), proc, 10, "drain in workers", log)
        assert not reachable(port, f"app-{origin.http}", ca)  # the app has no other instance
        assert admin.delete("/api/v1/instances/inst1/drain").status_code == 200
        wait_until(lambda: reachable(port, label, ca), proc, 10, "undrain in workers", log)

        closed = {"ports": [], "restrict_mode": True}
        assert admin.put("/api/v1/instances/inst1/port-policy", json=closed).status_code == 200
        wait_until(lambda: not reachable(port, label, ca), proc, 10, "override in workers", log)
        assert admin.delete("/api/v1/instances/inst1/port-policy").status_code == 200
        wait_until(lambda: reachable(port, label, ca), proc, 10, "override cleared", log)

        def control_pids() -> list[int]:
            return [
                int(p) for p in re.findall(r"control process started, pid (\d+)", log.read_text())
            ]

        assert control_pids(), log.read_text()[-3000:]
        first = control_pids()[-1]
        os.kill(first, signal.SIGKILL)  # the supervisor restarts a dead control plane

        def admin_back() -> bool:
            try:
                return admin.get("/api/v1/status").status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(lambda: len(control_pids()) >= 2, proc, 20, "control plane restart", log)
        wait_until(admin_back, proc, 20, "admin API back after the restart", log)
        control_pid = control_pids()[-1]
        assert control_pid != first
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()[-3000:]
        with pytest.raises(ProcessLookupError):
            os.kill(control_pid, 0)
        assert TOKEN not in log.read_text()
    finally:
        admin.close()
        stop_by_pid(proc, grace=10)
