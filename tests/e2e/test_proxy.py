"""End to end: a real ``gateway serve`` (2 workers) between real clients and the demo origin.

Mirrors upstream's ``test_proxy.sh`` data-path groups (fetch, concurrency, half-close,
close_notify, idle) and adds names, alerts, port policy, PROXY headers, h2, reload and drain.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from gateway.certs.devca import DevCa, issue_wildcard, write_cert_dir
from gateway.protocol.hello_builder import build_client_hello
from gateway.protocol.proxy_header import ProxyHeader, encode_proxy_header
from gateway.proxy.origin import pattern_bytes
from tests.helpers.gateway import (
    BASE,
    Gateway,
    Origin,
    get,
    make_certs,
    read_response,
    read_until_eof,
    recv_alert,
    run_gateway,
    run_origin,
    tls_connect,
    worker_pids,
    write_config,
)
from tests.helpers.processes import free_port, port_open, wait_until

pytestmark = pytest.mark.slow

ALERT_UNRECOGNIZED_NAME = bytes([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 112])
ALERT_HANDSHAKE_FAILURE = bytes([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 40])


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gw")


@pytest.fixture(scope="module")
def ca(root: Path) -> Path:
    return make_certs(root)[0]


@pytest.fixture(scope="module")
def origin(root: Path, ca: Path) -> Iterator[Origin]:
    with run_origin(root) as o:
        yield o


V6_PORT = free_port("::1")


@pytest.fixture(scope="module")
def gw(root: Path, origin: Origin) -> Iterator[Gateway]:
    cfg = write_config(root, "main", origin)
    text = cfg.read_text()
    v4 = text.split("listen = ", 1)[1].split("\n", 1)[0]
    cfg.write_text(text.replace(v4, v4[:-1] + f', "[::1]:{V6_PORT}"]'))
    with run_gateway(cfg) as g:
        yield g


def sni(label: str) -> str:
    return f"{label}.{BASE}"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- data path ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1024, 1 << 20])
@pytest.mark.parametrize("mode", ["terminate", "passthrough"])
def test_fetch_is_intact(gw: Gateway, origin: Origin, ca: Path, mode: str, size: int) -> None:
    label = f"app-{origin.http}" if mode == "terminate" else f"app-{origin.tls}s"
    with tls_connect(gw.port, sni(label), ca) as s:
        head, body = get(s, f"/bytes/{size}")
        assert head.startswith(b"HTTP/1.1 200")
        assert sha(body) == sha(pattern_bytes(size))
        # keep-alive: a second request on the same connection
        _, body2 = get(s, "/bytes/10")
        assert body2 == pattern_bytes(10)


def test_ipv6_listener(gw: Gateway, origin: Origin, ca: Path) -> None:
    raw = socket.create_connection(("::1", V6_PORT), timeout=10)
    ctx = ssl.create_default_context(cafile=str(ca))
    with ctx.wrap_socket(raw, server_hostname=sni(f"app-{origin.http}")) as s:
        assert get(s, "/health")[1] == b"ok"


def test_app_connection_limit(root: Path, origin: Origin, ca: Path) -> None:
    cfg = write_config(root, "limit", origin, workers=1, max_connections_per_app=2)
    with run_gateway(cfg) as g:
        name = sni(f"app-{origin.http}")
        held = [tls_connect(g.port, name, ca) for _ in range(2)]
        for s in held:
            assert get(s, "/health")[1] == b"ok"
        assert recv_alert(g.port, build_client_hello(name)) == ALERT_HANDSHAKE_FAILURE
        held.pop().close()
        wait_until(lambda: _can_fetch(g.port, name, ca), g.proc, 5, "a free slot")
        held[0].close()


def _can_fetch(port: int, name: str, ca: Path) -> bool:
    try:
        with tls_connect(port, name, ca) as s:
            return get(s, "/health")[1] == b"ok"
    except (ssl.SSLError, OSError):
        return False


def test_tls12_client_and_session_resumption(gw: Gateway, origin: Origin, ca: Path) -> None:
    name = sni(f"app-{origin.http}")
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        ctx = ssl.create_default_context(cafile=str(ca))
        ctx.maximum_version = version
        session = None
        reused = []
        for _ in range(3):  # one worker of two may differ; tickets are shared (same keys)
            raw = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
            with ctx.wrap_socket(raw, server_hostname=name, session=session) as s:
                assert s.version() == (
                    "TLSv1.2" if version == ssl.TLSVersion.TLSv1_2 else "TLSv1.3"
                )
                assert get(s, "/bytes/100000")[1] == pattern_bytes(100000)
                reused.append(s.session_reused)
                session = s.session
        assert reused == [False, True, True]


def test_upload_is_intact(gw: Gateway, origin: Origin, ca: Path) -> None:
    payload = os.urandom(1 << 20)
    with tls_connect(gw.port, sni(f"app-{origin.http}"), ca) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(payload))
        s.sendall(payload)
        _, body = read_response(s)
    assert json.loads(body) == {"length": len(payload), "sha256": sha(payload)}


def test_curl_terminate_and_passthrough(gw: Gateway, origin: Origin, ca: Path) -> None:
    for label in (f"app-{origin.http}", f"app-{origin.tls}s"):
        name = sni(label)
        out = subprocess.run(
            [
                "curl",
                "-sS",
                "--fail",
                "--cacert",
                str(ca),
                "--resolve",
                f"{name}:{gw.port}:127.0.0.1",
                f"https://{name}:{gw.port}/bytes/5000",
            ],
            capture_output=True,
            timeout=20,
            check=True,
        )
        assert out.stdout == pattern_bytes(5000)


def test_sixteen_concurrent_transfers(gw: Gateway, origin: Origin, ca: Path) -> None:
    size = 256 * 1024

    def one(i: int) -> str:
        label = f"app-{origin.http}" if i % 2 else f"app-{origin.tls}s"
        with tls_connect(gw.port, sni(label), ca) as s:
            return sha(get(s, f"/bytes/{size}")[1])

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    assert results == [sha(pattern_bytes(size))] * 16


def test_instance_id_and_failover(gw: Gateway, origin: Origin, ca: Path) -> None:
    # "inst1" is app's instance; "multi" races 127.0.0.2/.1/.3 and only .1 listens
    for label in (f"inst1-{origin.http}", f"multi-{origin.http}"):
        with tls_connect(gw.port, sni(label), ca) as s:
            assert get(s, "/health")[1] == b"ok"


# -- half-close and close_notify -------------------------------------------------------------


def _tls_halfclose(port: int, name: str, ca: Path) -> bytes:
    """Send a request, then close_notify + SHUT_WR at once; return what comes back."""
    ctx = ssl.create_default_context(cafile=str(ca))
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=name)

    def pump_out() -> None:
        data = out.read()
        if data:
            raw.sendall(data)

    while True:
        try:
            obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            pump_out()
            inc.write(raw.recv(65536))
    obj.write(b"GET /halfclose HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        obj.unwrap()
    except ssl.SSLWantReadError:
        pass
    pump_out()
    raw.shutdown(socket.SHUT_WR)
    got = b""
    while True:
        chunk = raw.recv(65536)
        if not chunk:
            break
        inc.write(chunk)
        while True:
            try:
                data = obj.read(65536)
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                break
            if not data:
                break
            got += data
    raw.close()
    return got


@pytest.mark.parametrize("mode", ["terminate", "passthrough"])
def test_halfclose_returns_full_reply(gw: Gateway, origin: Origin, ca: Path, mode: str) -> None:
    label = f"app-{origin.http}" if mode == "terminate" else f"app-{origin.tls}s"
    assert _tls_halfclose(gw.port, sni(label), ca) == pattern_bytes(4096)


@pytest.mark.parametrize("mode", ["terminate", "passthrough"])
def test_close_notify_after_app_closes(gw: Gateway, origin: Origin, ca: Path, mode: str) -> None:
    label = f"app-{origin.http}" if mode == "terminate" else f"app-{origin.tls}s"
    with tls_connect(gw.port, sni(label), ca) as s:
        s.sendall(b"GET /close/1048576 HTTP/1.1\r\nHost: x\r\n\r\n")
        data = read_until_eof(s)  # raises SSLEOFError on a truncated (ragged) end
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert sha(body) == sha(pattern_bytes(1 << 20))


# -- timeouts --------------------------------------------------------------------------------


def test_idle_connection_is_reaped(gw: Gateway, origin: Origin, ca: Path) -> None:
    with tls_connect(gw.port, sni(f"app-{origin.http}"), ca) as s:
        assert get(s, "/health")[1] == b"ok"
        start = time.monotonic()
        s.settimeout(10)
        assert s.recv(10) == b""  # close_notify then EOF, after idle (1.5 s) .. 2 x idle
        assert 1.2 < time.monotonic() - start < 4.5


def test_slow_hello_is_dropped_after_handshake_timeout(gw: Gateway) -> None:
    hello = build_client_hello(sni(f"app-{80}"))
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(hello[:10])  # slowloris: part of a hello, then silence
        start = time.monotonic()
        assert s.recv(100) == b""
        assert 0.8 < time.monotonic() - start < 3.0


def test_stalled_tls_handshake_is_dropped(gw: Gateway, origin: Origin) -> None:
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        ctx = ssl.create_default_context()
        out = ssl.MemoryBIO()
        client = ctx.wrap_bio(ssl.MemoryBIO(), out, server_hostname=sni(f"app-{origin.http}"))
        with pytest.raises(ssl.SSLWantReadError):
            client.do_handshake()
        s.sendall(out.read())  # a real ClientHello, and then never another byte
        start = time.monotonic()
        first = s.recv(5)
        assert first[:1] == b"\x16"  # the ServerHello came back ...
        while s.recv(65536):
            pass
        assert 0.5 < time.monotonic() - start < 3.0  # ... and the handshake timeout hit
    wait_until(lambda: "reason=handshake_timeout" in gw.log_text(), gw.proc, 5, "log")


def test_trickled_hello_is_assembled(gw: Gateway, origin: Origin) -> None:
    hello = build_client_hello(sni(f"nope-{origin.http}"), fragment=100)
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        for i in range(0, len(hello), 37):
            s.sendall(hello[i : i + 37])
            time.sleep(0.01)
        assert s.recv(100) == ALERT_UNRECOGNIZED_NAME  # parsed whole, then routed


def test_refused_backend_closes_cleanly(gw: Gateway, ca: Path) -> None:
    port = free_port()  # nothing listens there
    with tls_connect(gw.port, sni(f"app-{port}"), ca) as s:
        s.settimeout(10)
        assert s.recv(10) == b""  # close_notify, then EOF
    wait_until(lambda: f"127.0.0.1:{port}: ECONNREFUSED" in gw.log_text(), gw.proc, 5, "log")


def test_connect_timeout(gw: Gateway, ca: Path) -> None:
    # a listener whose accept queue is full drops further SYNs: connects hang
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    port = hole.getsockname()[1]
    fillers = []
    for _ in range(3):
        f = socket.socket()
        f.setblocking(False)
        f.connect_ex(("127.0.0.1", port))
        fillers.append(f)
    time.sleep(0.2)
    try:
        with tls_connect(gw.port, sni(f"app-{port}"), ca) as s:
            start = time.monotonic()
            s.settimeout(10)
            assert s.recv(10) == b""  # closed once the connect timeout (1 s) passes
            assert 0.5 < time.monotonic() - start < 3.0
    finally:
        for f in fillers:
            f.close()
        hole.close()
    wait_until(lambda: "reason=connect_timeout" in gw.log_text(), gw.proc, 5, "log line")


# -- names, alerts, policy -------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["nope.gw.test", "a-b-c.gw.test", "example.com", "x.y.gw.test"],
)
def test_unrouted_names_get_unrecognized_name(gw: Gateway, name: str) -> None:
    assert recv_alert(gw.port, build_client_hello(name)) == ALERT_UNRECOGNIZED_NAME


def test_python_client_sees_the_alert(gw: Gateway, ca: Path) -> None:
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        tls_connect(gw.port, "nope.gw.test", ca)


def test_openssl_s_client_sees_the_alert(gw: Gateway) -> None:
    out = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{gw.port}", "-servername", "nope.gw.test"],
        input=b"",
        capture_output=True,
        timeout=20,
    )
    assert b"unrecognized name" in out.stdout + out.stderr


def test_malformed_and_oversized_hellos_get_alerts(gw: Gateway) -> None:
    answer = recv_alert(gw.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer[:1] == b"\x15" and len(answer) == 7
    big = build_client_hello(sni("app"), padding=8000)  # over hello_limit = 4096
    answer = recv_alert(gw.port, big)
    assert answer[:1] == b"\x15" and len(answer) == 7
    no_sni = build_client_hello(None)
    assert recv_alert(gw.port, no_sni) == ALERT_UNRECOGNIZED_NAME


def test_port_policy_denies_unlisted_ports(gw: Gateway, origin: Origin) -> None:
    assert recv_alert(gw.port, build_client_hello(sni(f"locked-{origin.http}"))) == (
        ALERT_HANDSHAKE_FAILURE
    )
    assert recv_alert(gw.port, build_client_hello(sni("pp-9"))) == ALERT_HANDSHAKE_FAILURE


def test_gateway_endpoints(gw: Gateway, ca: Path) -> None:
    with tls_connect(gw.port, sni("gateway"), ca) as s:
        head, body = get(s, "/index")
    assert head.startswith(b"HTTP/1.1 200")
    assert json.loads(body)["type"] == "dstack gateway"
    with tls_connect(gw.port, sni("gateway"), ca) as s:
        assert get(s, "/health")[0].startswith(b"HTTP/1.1 200")
    with tls_connect(gw.port, sni("gateway"), ca) as s:
        assert get(s, "/nope")[0].startswith(b"HTTP/1.1 404")


def test_h2_only_for_g_names(gw: Gateway, origin: Origin, ca: Path) -> None:
    with tls_connect(gw.port, sni(f"app-{origin.http}g"), ca, alpn=["h2", "http/1.1"]) as s:
        assert s.selected_alpn_protocol() == "h2"
    with tls_connect(gw.port, sni(f"app-{origin.http}"), ca, alpn=["h2", "http/1.1"]) as s:
        assert s.selected_alpn_protocol() == "http/1.1"
    name = sni(f"app-{origin.http}g")
    transport = httpx.HTTPTransport(http2=True, verify=client_ctx(ca))
    with httpx.Client(transport=transport, http2=True) as client:
        resp = client.get(
            f"https://127.0.0.1:{gw.port}/bytes/100000",
            headers={"host": name},
            extensions={"sni_hostname": name},
        )
    assert resp.http_version == "HTTP/2"
    assert resp.content == pattern_bytes(100000)


def client_ctx(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


# -- PROXY protocol --------------------------------------------------------------------------


def test_outbound_proxy_header_reaches_the_app(gw: Gateway, origin: Origin, ca: Path) -> None:
    for label in (f"pp-{origin.http}", f"pp-{origin.tls}s"):
        with tls_connect(gw.port, sni(label), ca) as s:
            local = s.getsockname()
            doc = json.loads(get(s, "/pp")[1])
        assert doc["version"] == 2
        assert doc["source"] == [local[0], local[1]]
        assert doc["destination"] == ["127.0.0.1", gw.port]


@pytest.fixture(scope="module")
def gw_pp(root: Path, origin: Origin) -> Iterator[Gateway]:
    cfg = write_config(root, "inbound", origin, inbound_proxy_protocol=True, workers=1)
    with run_gateway(cfg) as g:
        yield g


@pytest.mark.parametrize("version", [1, 2])
def test_inbound_proxy_header_is_forwarded(
    gw_pp: Gateway, origin: Origin, ca: Path, version: int
) -> None:
    header = encode_proxy_header(
        ProxyHeader.for_connection(("203.0.113.7", 4242), ("198.51.100.1", 443), version)
    )
    raw = socket.create_connection(("127.0.0.1", gw_pp.port), timeout=10)
    raw.sendall(header)
    ctx = ssl.create_default_context(cafile=str(ca))
    with ctx.wrap_socket(raw, server_hostname=sni(f"pp-{origin.http}")) as s:
        doc = json.loads(get(s, "/pp")[1])
    assert doc["source"] == ["203.0.113.7", 4242]
    assert doc["version"] == version


def test_inbound_proxy_header_required(gw_pp: Gateway) -> None:
    assert recv_alert(gw_pp.port, build_client_hello(sni("app"))) == b""
    with socket.create_connection(("127.0.0.1", gw_pp.port), timeout=10) as s:
        start = time.monotonic()
        assert s.recv(10) == b""  # nothing sent: the proxy_header timeout closes it
        assert 0.8 < time.monotonic() - start < 3.0


# -- reload, drain, restart ------------------------------------------------------------------


def _leaf_serial(port: int, name: str, ca: Path) -> int:
    from cryptography import x509

    with tls_connect(port, name, ca) as s:
        der = s.getpeercert(binary_form=True)
    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


def test_sighup_reloads_certs_without_dropping(root: Path, origin: Origin, ca: Path) -> None:
    certs = root / "hup-certs"
    shutil.copytree(root / "certs", certs)
    cfg = write_config(root, "hup", origin, certs_dir=str(certs), workers=1)
    with run_gateway(cfg) as g:
        name = sni(f"app-{origin.http}")
        before = _leaf_serial(g.port, name, ca)
        live = tls_connect(g.port, name, ca)
        assert get(live, "/health")[1] == b"ok"
        dev = DevCa(root / "ca" / "ca.pem", root / "ca" / "ca.key")
        cert, key = issue_wildcard(dev, [f"*.{BASE}", BASE])
        write_cert_dir(certs, BASE, [cert, dev.load()[0]], key)
        pid = int((g.data_dir / "run" / "gateway.pid").read_text())
        assert pid == g.proc.pid
        os.kill(pid, signal.SIGHUP)
        wait_until(
            lambda: _leaf_serial(g.port, name, ca) == cert.serial_number, g.proc, 10, "new cert"
        )
        assert before != cert.serial_number
        assert get(live, "/bytes/1000")[1] == pattern_bytes(1000)  # the old connection lives on
        live.close()
        # routes come from the same file on SIGHUP
        newname = sni(f"fresh-{origin.http}")
        assert recv_alert(g.port, build_client_hello(newname)) == ALERT_UNRECOGNIZED_NAME
        with cfg.open("a") as fh:
            fh.write('\n[[proxy.routes]]\napp_id = "fresh"\nbackends = ["127.0.0.1"]\n')
        os.kill(pid, signal.SIGHUP)
        wait_until(lambda: _can_fetch(g.port, newname, ca), g.proc, 10, "the new route")


def test_sigterm_drains_a_transfer_in_flight(root: Path, origin: Origin, ca: Path) -> None:
    cfg = write_config(root, "drain", origin, workers=1)
    with run_gateway(cfg) as g:
        s = tls_connect(g.port, sni(f"app-{origin.http}"), ca)
        s.sendall(b"GET /trickle/1280 HTTP/1.1\r\nHost: x\r\n\r\n")  # ~1 s of trickle
        assert s.recv(5) == b"HTTP/"
        silent = socket.create_connection(("127.0.0.1", g.port), timeout=10)  # no hello yet
        time.sleep(0.1)
        os.kill(g.proc.pid, signal.SIGTERM)
        start = time.monotonic()
        assert silent.recv(10) == b""  # not relaying yet: closed at once, not after drain
        assert time.monotonic() - start < 0.8
        silent.close()
        data = read_until_eof(s)
        s.close()
        assert data.endswith(pattern_bytes(1280))
        assert g.proc.wait(timeout=10) == 0
        assert "drained: 0 connections closed at the deadline" in g.log_text()
        assert not (g.data_dir / "run" / "gateway.pid").exists()


def test_killed_worker_is_replaced(root: Path, origin: Origin, ca: Path) -> None:
    cfg = write_config(root, "restart", origin, workers=2)
    with run_gateway(cfg) as g:
        wait_until(lambda: len(worker_pids(g)) == 2, g.proc, 10, "two workers")
        old = worker_pids(g)
        os.kill(old[0], signal.SIGKILL)
        wait_until(lambda: worker_pids(g).get(0, old[0]) != old[0], g.proc, 10, "worker 0 replaced")
        for _ in range(6):
            with tls_connect(g.port, sni(f"app-{origin.http}"), ca) as s:
                assert get(s, "/health")[1] == b"ok"
        assert "restarting" in g.log_text()


# -- abuse -----------------------------------------------------------------------------------


def _abuse(port: int, names: list[str], ca: Path, seed: int, until: float) -> int:
    import random
    import struct

    rng = random.Random(seed)
    rst = struct.pack("ii", 1, 0)  # SO_LINGER 0: close() sends RST
    n = 0
    while time.monotonic() < until:
        n += 1
        kind = rng.randrange(6)
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        t: ssl.SSLSocket | None = None
        try:
            if kind == 0:
                s.sendall(os.urandom(rng.randrange(1, 3000)))
                s.recv(100)
            elif kind == 1:
                hello = build_client_hello(rng.choice(names))
                s.sendall(hello[: rng.randrange(1, len(hello))])
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, rst)
            elif kind == 2:
                mutated = bytearray(build_client_hello(rng.choice(names)))
                for _ in range(rng.randrange(1, 5)):
                    mutated[rng.randrange(len(mutated))] = rng.randrange(256)
                s.sendall(bytes(mutated))
                s.recv(100)
            else:
                ctx = ssl.create_default_context(cafile=str(ca))
                t = ctx.wrap_socket(s, server_hostname=rng.choice(names[:2]))
                size = rng.choice([10, 100_000, 1_000_000])
                t.sendall(f"GET /bytes/{size} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                t.recv(rng.choice([10, 65536]))
                if rng.random() < 0.5:
                    t.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, rst)
        except (OSError, ssl.SSLError):
            pass
        finally:
            if t is not None:
                t.close()
            s.close()
    return n


def test_abuse_never_breaks_a_worker(gw: Gateway, origin: Origin, ca: Path) -> None:
    """Garbage, torn and mutated hellos, resets mid-handshake and mid-transfer, for 2 s."""
    names = [sni(f"app-{origin.http}"), sni(f"app-{origin.tls}s"), sni("nope"), sni("gateway")]
    until = time.monotonic() + 2.0
    with ThreadPoolExecutor(4) as pool:
        counts = list(pool.map(lambda i: _abuse(gw.port, names, ca, i, until), range(4)))
    assert sum(counts) > 20
    with tls_connect(gw.port, names[0], ca) as s:  # still serving
        assert get(s, "/bytes/1000")[1] == pattern_bytes(1000)

    def settled() -> bool:
        from gateway.proxy.stats import read_stats

        total = read_stats(gw.data_dir / "run" / "proxy")
        return total["open"] == 0 and not total["app_open"]

    wait_until(settled, gw.proc, 10, "every connection closed and accounted for")
    assert "Traceback" not in gw.log_text()
    assert "Exception in callback" not in gw.log_text()


# -- configuration at the edge ---------------------------------------------------------------


def _free_range(n: int) -> int:
    for _ in range(50):
        first = free_port()
        socks = []
        try:
            for p in range(first, first + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return first
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


def test_listen_port_range(root: Path, origin: Origin, ca: Path) -> None:
    first = _free_range(3)
    cfg = write_config(root, "range", origin, workers=1, listen=[f"127.0.0.1:{first}-{first + 2}"])
    with run_gateway(cfg) as g:
        for port in range(first, first + 3):
            wait_until(functools.partial(port_open, "127.0.0.1", port), g.proc, 10, f"port {port}")
            with tls_connect(port, sni(f"app-{origin.http}"), ca) as s:
                assert get(s, "/health")[1] == b"ok"


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("[proxy]\nlisten = ['127.0.0.1:1-3', '127.0.0.1:2']\n", "proxy: listen entries"),
        ("[proxy]\nworkerz = 2\n", "proxy.workerz: unknown key (hint: did you mean 'workers'?)"),
        ("[proxy.timeouts]\nidle = -1\n", "proxy.timeouts: timeouts.idle must be > 0"),
    ],
)
def test_serve_rejects_bad_config_before_binding(tmp_path: Path, body: str, needle: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(body)
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(cfg)],
        capture_output=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert needle in out.stderr.decode()


def test_client_bytes_sent_while_the_backend_connects_are_relayed(
    root: Path, origin: Origin, ca: Path
) -> None:
    """The handshake ends long before the backend accepts (its SYN is dropped once): the
    client's early request waits in the kernel, the parked fd does not spin, and the relay
    delivers the request once the connect completes."""
    cfg = write_config(root, "slowconnect", origin, workers=1)
    cfg.write_text(cfg.read_text().replace("connect = 1.0", "connect = 5.0"))
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    port = hole.getsockname()[1]
    fillers = []
    for _ in range(3):  # fill the accept queue: further SYNs are dropped, then retried ~1 s
        f = socket.socket()
        f.setblocking(False)
        f.connect_ex(("127.0.0.1", port))
        fillers.append(f)
    time.sleep(0.2)
    try:
        with run_gateway(cfg) as g:
            wait_until(lambda: bool(worker_pids(g)), g.proc, 10, "worker stats")
            (pid,) = worker_pids(g).values()
            with tls_connect(g.port, sni(f"app-{port}"), ca) as s:
                s.sendall(b"early request")
                cpu0 = _cpu_seconds(pid)
                time.sleep(0.5)
                assert _cpu_seconds(pid) - cpu0 < 0.2  # waiting, not polling a readable fd
                hole.settimeout(10)
                ours = {f.getsockname() for f in fillers}
                while True:  # make room: the gateway's retried SYN gets in
                    conn, peer = hole.accept()
                    if peer not in ours:
                        break
                    conn.close()
                with conn:
                    conn.settimeout(10)
                    assert read_exactly(conn, 13) == b"early request"
                    conn.sendall(b"late reply")
                    s.settimeout(10)
                    assert read_exactly(s, 10) == b"late reply"
    finally:
        for f in fillers:
            f.close()
        hole.close()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def read_exactly(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf
