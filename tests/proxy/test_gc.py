"""A connection through a real worker leaves no reference cycles behind (the worker raises
the GC threshold on that basis)."""

from __future__ import annotations

import asyncio
import gc
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvloop

from gateway.certs.custom_domains import AppAddressResolver
from gateway.certs.devca import ensure_dev_wildcard
from gateway.certs.settings import ResolverSettings
from gateway.certs.store import CertStore
from gateway.proxy.listeners import Worker
from gateway.proxy.origin import Origin
from gateway.proxy.routes import StaticRoutes
from gateway.proxy.settings import ProxySettings, StaticRoute
from gateway.proxy.stats import WorkerState
from tests.helpers.processes import free_port


@pytest.fixture
def origin() -> Iterator[int]:
    o = Origin()
    port = o.listen(0)
    yield port
    o.close()


@pytest.mark.parametrize("path", ["terminate", "no_hello", "reject", "gateway", "custom_miss"])
def test_closed_connections_leave_no_cycles(tmp_path: Path, origin: int, path: str) -> None:
    ca, _ = ensure_dev_wildcard(tmp_path / "ca", tmp_path / "certs", "gw.test")
    port = free_port()
    settings = ProxySettings(
        listen=(f"127.0.0.1:{port}",),
        workers=1,
        base_domains=("gw.test",),
        certs_dir=tmp_path / "certs",
        routes=(StaticRoute("app", ("127.0.0.1",)),),
        access_log=False,
    )
    loop = uvloop.new_event_loop()
    worker = Worker(
        loop,
        settings,
        CertStore(settings.certs_dir, settings.tls_versions),
        StaticRoutes(settings.routes),
        WorkerState(),
    )
    # a name server that never answers, and a short lookup timeout: the RESOLVING path
    worker.resolver = AppAddressResolver(
        ResolverSettings(nameservers=(f"127.0.0.1:{free_port()}",), timeout=0.05)
    )
    worker.listen()
    name = {
        "gateway": "gateway.gw.test",
        "reject": "nope.gw.test",
        "custom_miss": "shop.example.test",
    }.get(path, f"app-{origin}.gw.test")
    errors: list[BaseException] = []

    def client() -> None:
        try:
            ctx = ssl.create_default_context(cafile=str(ca.cert_path))
            for _ in range(20):
                raw = socket.create_connection(("127.0.0.1", port), timeout=5)
                if path == "no_hello":
                    raw.close()
                    continue
                if path in ("reject", "custom_miss"):
                    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
                        ctx.wrap_socket(raw, server_hostname=name)
                    raw.close()
                    continue
                with ctx.wrap_socket(raw, server_hostname=name) as s:
                    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                    assert b"200 OK" in s.recv(1000)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            loop.call_soon_threadsafe(loop.stop)

    gc.collect()
    gc.disable()
    try:
        t = threading.Thread(target=client)
        t.start()
        loop.run_forever()
        t.join()

        async def settle() -> None:  # lookups and closes finish on the loop: wait for them
            for _ in range(100):
                pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
                if worker.state.open == 0 and not pending:
                    return
                await asyncio.sleep(0.05)

        loop.run_until_complete(settle())
        assert not errors, errors
        assert worker.state.accepted == 20 and worker.state.open == 0
        if path == "custom_miss":
            assert worker.state.errors["custom_timeout"] == 20
        assert gc.collect() == 0
    finally:
        gc.enable()
        for sock, _ in worker.listeners:
            loop.remove_reader(sock.fileno())
            sock.close()
        worker.pipes.close()
        loop.close()
