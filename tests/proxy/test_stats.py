from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from gateway.proxy.stats import (
    MAX_TLS_REASONS,
    WorkerState,
    read_stats,
    tls_failure_reason,
    write_stats,
)


def test_worker_snapshots_are_summed(tmp_path: Path) -> None:
    a, b = WorkerState(0, 100), WorkerState(1, 101)
    a.accepted, a.bytes_up, b.accepted, b.bytes_down = 3, 10, 4, 20
    a.error("idle_timeout")
    b.error("idle_timeout")
    b.error("bad_hello")
    a.app_open["app"] += 2
    b.app_open["app"] += 1
    b.app_open["gone"] += 0
    write_stats(tmp_path, a)
    write_stats(tmp_path, b)
    (tmp_path / "worker-9.json").write_text("{torn")  # ignored, not fatal
    total = read_stats(tmp_path)
    assert total["accepted"] == 7 and total["bytes_up"] == 10 and total["bytes_down"] == 20
    assert total["errors"] == {"idle_timeout": 2, "bad_hello": 1}
    assert total["app_open"] == {"app": 3}
    assert [w["pid"] for w in total["workers"]] == [100, 101]
    assert not list(tmp_path.glob(".*.tmp"))


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> BaseException | None:
    """Run a real OpenSSL handshake in memory; the server side's exception (None: done)."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="app.gw.test")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client_done = server_done = False
    for _ in range(20):
        if not client_done:
            try:
                client.do_handshake()
                client_done = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError:
                client_done = True  # the client gave up (and queued its alert)
        s_in.write(c_out.read())
        if not server_done:
            try:
                server.do_handshake()
                server_done = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                return exc
        c_in.write(s_out.read())
        if client_done and server_done:
            return None
    raise AssertionError("handshake did not settle")


@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, Path]:
    """A TLS 1.3-only server context for ``*.gw.test`` and its dev CA file."""
    from gateway.certs.devca import ensure_dev_wildcard

    root = tmp_path_factory.mktemp("tls")
    ca, cert_dir = ensure_dev_wildcard(root / "ca", root / "certs", "gw.test")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_dir / "fullchain.pem", cert_dir / "privkey.pem")
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx, ca.cert_path


def test_tls_failure_reasons_from_real_openssl_errors(
    tls_pair: tuple[ssl.SSLContext, Path],
) -> None:
    server, ca = tls_pair
    assert _handshake(server, ssl.create_default_context(cafile=str(ca))) is None
    old = ssl.create_default_context(cafile=str(ca))
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    exc = _handshake(server, old)
    assert exc is not None and tls_failure_reason(exc) == "unsupported_protocol"
    untrusting = ssl.create_default_context()  # the dev CA is not in the system store
    exc = _handshake(server, untrusting)
    assert exc is not None and tls_failure_reason(exc) == "tlsv1_alert_unknown_ca"
    assert tls_failure_reason(ssl.SSLEOFError(8, "EOF occurred")) == "eof"
    assert tls_failure_reason(ConnectionResetError()) == "reset"
    assert tls_failure_reason(OSError(5, "EIO")) == "io_error"
    assert tls_failure_reason("timeout") == "timeout"


def test_tls_counters_are_summed_and_bounded(tmp_path: Path) -> None:
    a, b = WorkerState(0, 1), WorkerState(1, 2)
    a.tls_done(False)
    a.tls_done(True)
    b.tls_done(False)
    a.tls_failed("timeout")
    b.tls_failed("timeout")
    b.tls_failed(ConnectionResetError())
    for i in range(MAX_TLS_REASONS + 5):  # a flood of distinct reasons stays bounded
        a.tls_failed(f"r{i}")
    assert len(a.tls_failures) == MAX_TLS_REASONS + 1 and a.tls_failures["other"] == 6
    write_stats(tmp_path, a)
    write_stats(tmp_path, b)
    total = read_stats(tmp_path)
    assert (total["tls_handshakes"], total["tls_resumed"]) == (3, 1)
    assert total["tls_failures"]["timeout"] == 2 and total["tls_failures"]["reset"] == 1
