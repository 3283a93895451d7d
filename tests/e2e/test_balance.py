"""Two instances of one app behind a real ``gateway serve``: even load, failover, drains.

Two loopback origins (127.0.0.1 and 127.0.0.2, the same port, each answering with its own
name) are registered as instances of one app in the registry file, as the registration RPC
would; the workers route the app id from the registry feed. Checked with real TLS clients:

* ``proxy.balance = "round_robin"`` splits new connections evenly, and ``"freshest"``
  (upstream's order) does not, which is why round robin is the default;
* with one origin down every connection still succeeds: a refusing one is passed at once,
  a silent one (SYNs dropped) costs the connect head start about once per worker;
* a drain through the admin API (overlay file + SIGHUP to the workers) sends new
  connections only to the other instance while a connection already open to the drained
  one keeps working; undrain restores it; draining both refuses the app the way an
  unknown app is refused, with ``reason=drained`` in the access log.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import socketserver
import ssl
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from gateway.proxy.balance import HEAD_START
from gateway.registry.records import InstanceRecord
from gateway.registry.sqlite import SqliteStore
from tests.helpers.gateway import (
    BASE,
    Gateway,
    gateway_port,
    get,
    make_certs,
    run_gateway,
    tls_connect,
)
from tests.helpers.processes import free_port, start, stop_by_pid, wait_listening, wait_until

pytestmark = pytest.mark.slow

APP = "7a1b2c3d4e5f60718293a4b5c6d7e8f901234567"
HOSTS = {"inst-a": "127.0.0.1", "inst-b": "127.0.0.2"}
TOKEN = "balance-e2e-token-" + "b" * 16


class Origin(socketserver.ThreadingTCPServer):
    """An HTTP/1.1 keep-alive origin that answers every request with its name."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, name: str, host: str, port: int) -> None:
        self.name = name
        self.connections = 0
        super().__init__((host, port), _Handler)


class _Handler(socketserver.StreamRequestHandler):
    server: Origin

    def handle(self) -> None:
        self.server.connections += 1
        body = self.server.name.encode()
        while True:
            line = self.rfile.readline(4096)
            if not line:
                return
            while self.rfile.readline(4096) not in (b"\r\n", b"\n", b""):
                pass  # headers
            head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            self.wfile.write(head + body)
            self.wfile.flush()


@contextmanager
def origins() -> Iterator[tuple[int, dict[str, Origin]]]:
    port = free_port()
    servers = {name: Origin(name, host, port) for name, host in HOSTS.items()}
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers.values()]
    for t in threads:
        t.start()
    try:
        yield port, servers
    finally:
        for s in servers.values():
            stop_origin(s)


def stop_origin(server: Origin) -> None:
    """Stop accepting: the address now refuses connections (idempotent)."""
    if server.socket.fileno() >= 0:
        server.shutdown()
        server.server_close()


@contextmanager
def silent(host: str, port: int) -> Iterator[None]:
    """An address whose SYNs go unanswered (a dead CVM behind WireGuard looks like this):
    a listener with a full accept queue drops new SYNs without a reset."""
    lsock = socket.socket()
    fillers = []
    try:
        lsock.bind((host, port))
        lsock.listen(0)
        for _ in range(2):  # backlog 0 still queues one; then the queue is full
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex((host, port))
            fillers.append(filler)
        time.sleep(0.1)
        probe = socket.socket()
        probe.settimeout(0.3)
        try:
            with pytest.raises(TimeoutError):
                probe.connect((host, port))
        finally:
            probe.close()
        yield
    finally:
        for filler in fillers:
            filler.close()
        lsock.close()


def write_config(root: Path, name: str, balance: str, extra: str = "") -> Path:
    port = free_port()
    path = root / f"{name}.toml"
    path.write_text(
        f"""
[core]
data_dir = "{root / name}"
log_level = "info"
[proxy]
listen = ["127.0.0.1:{port}"]
workers = 2
base_domains = ["{BASE}"]
certs_dir = "{root / "certs"}"
stats_interval = 0.2
registry_poll_interval = 0.1
registry_refresh_interval = 0.5
balance = "{balance}"
[proxy.timeouts]
connect = 1.0
handshake = 2.0
idle = 30.0
drain = 2.0
{extra}
"""
    )
    return path


def register(data_dir: Path, port: int, handshakes: dict[str, float]) -> None:
    """Both origins as instances of APP, as the registration RPC records them."""
    now = time.time()
    data_dir.mkdir(parents=True, exist_ok=True)
    with SqliteStore(data_dir / "registry.sqlite3") as store:
        for iid, host in HOSTS.items():
            store.put_instance(
                InstanceRecord(
                    instance_id=iid, app_id=APP, public_key=f"{iid[-1]}" * 43 + "=",
                    ip=ipaddress.IPv4Address(host), registered_at=now, last_seen=now,
                    last_handshake=now - handshakes[iid],
                    port_policy={"restrict_mode": True, "ports": [{"port": port}]},
                ),
                expect_revision=0,
            )  # fmt: skip


def serve(port: int, ca: Path, sni: str) -> str | None:
    """One new TLS connection, one request: the name of the origin that answered."""
    try:
        with tls_connect(port, sni, ca, timeout=3) as sock:
            head, body = get(sock, "/")
    except (OSError, ssl.SSLError):
        return None
    return body.decode() if head.startswith(b"HTTP/1.1 200") else None


def spread(port: int, ca: Path, sni: str, n: int) -> Counter[str | None]:
    return Counter(serve(port, ca, sni) for _ in range(n))


def both_workers_route(gw: Gateway, ca: Path, sni: str) -> None:
    wait_until(  # several in a row: each worker polls the registry on its own timer
        lambda: all(serve(gw.port, ca, sni) is not None for _ in range(6)),
        gw.proc,
        15,
        "registry routes in both workers",
        gw.log,
    )


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("balance")
    make_certs(root)
    return root


def test_round_robin_splits_evenly_and_fails_over(root: Path) -> None:
    ca = make_certs(root)[0]
    with origins() as (port, servers):
        # inst-a handshook recently, inst-b 10 minutes ago: both fresh (30 min window). The
        # registry exists before the gateway starts, as the control plane creates it first.
        register(root / "rr", port, {"inst-a": 1.0, "inst-b": 600.0})
        with run_gateway(write_config(root, "rr", "round_robin")) as gw:
            sni = f"{APP}-{port}.{BASE}"
            both_workers_route(gw, ca, sni)
            got = spread(gw.port, ca, sni, 100)
            print("round robin, 100 connections:", dict(got))
            assert got[None] == 0
            assert 40 <= got["inst-a"] <= 60 and 40 <= got["inst-b"] <= 60, got
            stop_origin(servers["inst-b"])
            with silent(HOSTS["inst-b"], port):  # inst-b drops SYNs: no refusal, no answer
                took = []
                for _ in range(20):
                    t0 = time.monotonic()
                    assert serve(gw.port, ca, sni) == "inst-a"
                    took.append(time.monotonic() - t0)
            waited = sum(1 for t in took if t >= HEAD_START)
            print(f"inst-b silent: {waited} of 20 connections waited for the head start")
            # each worker pays the head start once, then passes inst-b over as first choice
            # (without that, every other connection would wait; slack for a loaded machine)
            assert 1 <= waited <= 6, took
            # inst-b's address now refuses: every connection still succeeds
            got = spread(gw.port, ca, sni, 40)
            print("inst-b down, 40 connections:", dict(got))
            assert got == Counter({"inst-a": 40})


def test_freshest_order_sends_nearly_everything_to_one_instance(root: Path) -> None:
    """Upstream's order, kept as ``balance = "freshest"``: the freshest handshake is raced
    first, and on a fast network the first SYN sent is the first answered."""
    ca = make_certs(root)[0]
    with origins() as (port, _):
        register(root / "fresh", port, {"inst-a": 1.0, "inst-b": 600.0})
        with run_gateway(write_config(root, "fresh", "freshest")) as gw:
            sni = f"{APP}-{port}.{BASE}"
            both_workers_route(gw, ca, sni)
            got = spread(gw.port, ca, sni, 40)
            print("freshest, 40 connections:", dict(got))
            assert got[None] == 0 and got["inst-a"] >= 36, got


def test_admin_drain_moves_new_connections_to_the_other_instance(root: Path) -> None:
    ca = make_certs(root)[0]
    admin_port = free_port()
    extra = f"[admin]\nlisten = '127.0.0.1:{admin_port}'\ntoken_env = 'GW_TEST_BL_TOKEN'\n"
    cfg = write_config(root, "drain", "round_robin", extra)
    log = root / "drain.log"
    env = {**os.environ, "GW_TEST_BL_TOKEN": TOKEN}
    with origins() as (port, servers):
        register(root / "drain", port, {"inst-a": 1.0, "inst-b": 2.0})
        proc = start([sys.executable, "-m", "gateway", "serve", "--config", str(cfg)], log, env=env)
        admin = httpx.Client(
            base_url=f"http://127.0.0.1:{admin_port}", headers={"X-Admin-Token": TOKEN}, timeout=10
        )
        held: ssl.SSLSocket | None = None
        try:
            gw = Gateway(proc, gateway_port(cfg), cfg, log, root / "drain")
            wait_listening(proc, "127.0.0.1", gw.port, timeout=20, log=log)
            wait_listening(proc, "127.0.0.1", admin_port, timeout=20, log=log)
            sni = f"{APP}-{port}.{BASE}"
            both_workers_route(gw, ca, sni)

            # a connection already open to inst-b, kept across the drain
            for _ in range(20):
                sock = tls_connect(gw.port, sni, ca, timeout=3)
                if get(sock, "/")[1] == b"inst-b":
                    held = sock
                    break
                sock.close()
            assert held is not None, "no connection reached inst-b"

            assert admin.post("/api/v1/instances/inst-b/drain").json()["draining"] is True
            wait_until(
                lambda: spread(gw.port, ca, sni, 10) == Counter({"inst-a": 10}),
                proc,
                15,
                "the drain in both workers",
                log,
            )
            before = servers["inst-b"].connections
            got = spread(gw.port, ca, sni, 40)
            assert got == Counter({"inst-a": 40}), got  # only the other instance
            assert servers["inst-b"].connections == before  # not even raced
            assert get(held, "/")[1] == b"inst-b"  # the open connection continues

            def own_connections() -> dict[str, int]:
                rows = admin.get("/api/v1/status").json()["instances"]
                return {r["instance_id"]: r["connections"] for r in rows}

            # each instance's own open connections, from the workers' counters: the held one
            wait_until(
                lambda: own_connections() == {"inst-a": 0, "inst-b": 1},
                proc,
                15,
                "per-instance connection counts",
                log,
            )

            assert admin.delete("/api/v1/instances/inst-b/drain").status_code == 200
            wait_until(  # both workers: about half of the connections again
                lambda: spread(gw.port, ca, sni, 10)["inst-b"] >= 3, proc, 15, "undrain", log
            )
            got = spread(gw.port, ca, sni, 40)
            assert 10 <= got["inst-b"] <= 30 and got[None] == 0, got

            # every instance drained: refused like an unknown app (same TLS alert)
            for iid in HOSTS:
                assert admin.post(f"/api/v1/instances/{iid}/drain").status_code == 200
            wait_until(
                lambda: spread(gw.port, ca, sni, 6)[None] == 6, proc, 15, "both drained", log
            )
            errors = []
            for name in (sni, f"nosuchapp-{port}.{BASE}"):
                with pytest.raises(ssl.SSLError) as exc:
                    tls_connect(gw.port, name, ca, timeout=3).close()
                errors.append(exc.value.reason)
            assert errors == ["TLSV1_UNRECOGNIZED_NAME"] * 2
            assert "reason=drained" in log.read_text()
            assert get(held, "/")[1] == b"inst-b"  # still untouched
        finally:
            if held is not None:
                held.close()
            admin.close()
            stop_by_pid(proc, grace=10)


def test_origins_answer_on_both_loopback_addresses() -> None:
    """The fixture itself: two addresses, one port, distinct answers (else the split
    above would measure nothing)."""
    with origins() as (port, _):
        names = set()
        for host in HOSTS.values():
            with socket.create_connection((host, port), timeout=3) as s:
                names.add(get(s, "/")[1])
        assert names == {b"inst-a", b"inst-b"}
