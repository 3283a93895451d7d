"""TlsSite with real clients: curl, openssl s_client and Python's ssl against a small app
that reports the chain it was given; big bodies both ways (back-pressure), keep-alive,
TLS versions, certificate reload, shutdown with handshakes pending."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import json
import random
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvloop
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.control.tls_server import (
    PEER_CERT_CHAIN,
    TlsCredentials,
    TlsServerError,
    TlsSite,
    server_context,
)
from tests.control.test_registration import make_intermediate, server_cert
from tests.helpers.gateway_rpc import make_ca, pem_key

BIG = 8 * 1024 * 1024


async def whoami(request: web.Request) -> web.Response:
    assert request.transport is not None
    chain = request.transport.get_extra_info(PEER_CERT_CHAIN)
    subjects = [x509.load_der_x509_certificate(der).subject.rfc4514_string() for der in chain or []]
    return web.json_response(
        {
            "chain": subjects,
            "secure": request.secure,
            "version": request.transport.get_extra_info("tls_version"),
        }
    )


async def upload(request: web.Request) -> web.Response:
    digest = hashlib.sha256()
    size = 0
    async for chunk in request.content.iter_chunked(65536):
        digest.update(chunk)
        size += len(chunk)
        await asyncio.sleep(0)  # a slow consumer: the reader must pause, not buffer it all
    return web.json_response({"size": size, "sha256": digest.hexdigest()})


async def download(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse()
    await resp.prepare(request)
    block = bytes(range(256)) * 256
    for _ in range(BIG // len(block)):
        await resp.write(block)  # drains: waits while the socket buffer is full
    await resp.write_eof()
    return resp


@dataclass
class Server:
    port: int
    ca_file: Path
    site: TlsSite
    loop: asyncio.AbstractEventLoop
    ca: Any

    def url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.port}{path}"


@dataclass
class Client:
    cert: Path
    key: Path


def _write_server_files(directory: Path, ca: Any) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = server_cert(ca)
    (directory / "cert.pem").write_bytes(cert)
    (directory / "key.pem").write_bytes(key)
    return directory / "cert.pem", directory / "key.pem"


@pytest.fixture
def server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Server]:
    """The site on a background loop: asyncio's, or uvloop's with ``indirect`` "uvloop"."""
    kind = getattr(request, "param", "asyncio")
    ca = make_ca("test server CA")
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca[0].public_bytes(serialization.Encoding.PEM))
    cert, key = _write_server_files(tmp_path / "server", ca)
    app = web.Application(client_max_size=BIG * 2)
    app.router.add_routes(
        [web.get("/whoami", whoami), web.post("/upload", upload), web.get("/big", download)]
    )
    loop = uvloop.new_event_loop() if kind == "uvloop" else asyncio.new_event_loop()
    errors: list[dict[str, Any]] = []  # anything that escaped to the loop is a server bug
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    runner = web.AppRunner(app)
    sites: list[TlsSite] = []

    async def start() -> None:
        await runner.setup()
        site = TlsSite(runner, "127.0.0.1", 0, TlsCredentials(cert, key), handshake_timeout=2)
        await site.start()
        sites.append(site)

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
    try:
        yield Server(sites[0].port, ca_file, sites[0], loop, ca)
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
    assert errors == []


@pytest.fixture
def client(tmp_path: Path) -> Client:
    """leaf + intermediate in one PEM file, signed by a root the server knows nothing of."""
    root = make_ca("client root")
    inter = make_intermediate(root, "client intermediate")
    cert_pem, key_pem = server_cert(inter)  # subject CN=gateway-rpc, any EKU-less leaf
    pem = serialization.Encoding.PEM
    (tmp_path / "client.pem").write_bytes(cert_pem + inter[0].public_bytes(pem))
    (tmp_path / "client.key").write_bytes(key_pem)
    return Client(tmp_path / "client.pem", tmp_path / "client.key")


def _get(server: Server, path: str, client: Client | None = None, **kw: Any) -> Any:
    ctx = ssl.create_default_context(cafile=str(server.ca_file))
    if "version" in kw:
        ctx.minimum_version = ctx.maximum_version = kw["version"]
    if client is not None:
        ctx.load_cert_chain(client.cert, client.key)
    conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=ctx, timeout=20)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        assert resp.status == 200
        return json.loads(resp.read())
    finally:
        conn.close()


@pytest.mark.parametrize("server", ["asyncio", "uvloop"], indirect=True)
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_whole_chain_reaches_the_handler(
    server: Server, client: Client, version: ssl.TLSVersion
) -> None:
    got = _get(server, "/whoami", client, version=version)
    assert got["chain"] == ["CN=gateway-rpc", "CN=client intermediate"]  # leaf first
    assert got["secure"] is True
    assert got["version"] == {"TLSv1_2": "TLSv1.2", "TLSv1_3": "TLSv1.3"}[version.name]
    assert _get(server, "/whoami", None, version=version)["chain"] == []


def test_tls_1_1_is_refused(server: Server) -> None:
    out = subprocess.run(
        [
            "openssl", "s_client", "-connect", f"127.0.0.1:{server.port}", "-tls1_1",
            "-cipher", "DEFAULT@SECLEVEL=0",  # so that it is the server that refuses
        ],
        input=b"", capture_output=True, timeout=20, check=False,
    )  # fmt: skip
    assert out.returncode != 0 and b"Cipher is (NONE)" in out.stdout
    assert b"alert protocol version" in out.stderr, out.stderr
    assert _get(server, "/whoami")["chain"] == []  # still serving


def test_curl_with_a_client_chain_and_keepalive(server: Server, client: Client) -> None:
    out = subprocess.run(
        [
            "curl", "-sS", "--fail-with-body", "--cacert", str(server.ca_file),
            "--cert", str(client.cert), "--key", str(client.key),
            server.url("/whoami"), server.url("/whoami"),  # two requests, one connection
            "-w", "\\n%{num_connects}\\n",
        ],
        capture_output=True, text=True, timeout=20, check=True,
    )  # fmt: skip
    lines = out.stdout.strip().splitlines()
    first, second = json.loads(lines[0]), json.loads(lines[2])
    assert first["chain"] == second["chain"] == ["CN=gateway-rpc", "CN=client intermediate"]
    assert lines[1] == "1" and lines[3] == "0"  # the second reused the connection


def test_openssl_s_client(server: Server, client: Client) -> None:
    request = b"GET /whoami HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    for version in ("-tls1_2", "-tls1_3"):
        out = subprocess.run(
            [
                "openssl", "s_client", "-connect", f"127.0.0.1:{server.port}", version,
                "-CAfile", str(server.ca_file), "-verify_return_error", "-quiet",
                "-cert", str(client.cert), "-key", str(client.key), "-cert_chain",
                str(client.cert), "-ign_eof",
            ],
            input=request, capture_output=True, timeout=20, check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        head, _, body = out.stdout.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), out.stdout
        assert json.loads(body)["chain"][0] == "CN=gateway-rpc"


def test_big_bodies_both_ways(server: Server) -> None:
    payload = bytes(range(256)) * (BIG // 256)
    ctx = ssl.create_default_context(cafile=str(server.ca_file))
    conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=ctx, timeout=30)
    try:
        conn.request("POST", "/upload", payload, {"Content-Type": "application/octet-stream"})
        resp = conn.getresponse()
        assert json.loads(resp.read()) == {
            "size": len(payload),
            "sha256": hashlib.sha256(payload).hexdigest(),
        }
        conn.request("GET", "/big")
        resp = conn.getresponse()
        received = hashlib.sha256()
        size = 0
        while chunk := resp.read(65536):
            received.update(chunk)
            size += len(chunk)
            if size < 1024 * 1024:
                time.sleep(0.001)  # a slow reader at first: the server must wait, not buffer
        assert size == BIG and received.hexdigest() == hashlib.sha256(payload).hexdigest()
    finally:
        conn.close()


def _served_cert(server: Server) -> x509.Certificate:
    ctx = ssl.create_default_context(cafile=str(server.ca_file))
    with (
        socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_reload_serves_the_new_certificate_to_new_connections(
    server: Server, tmp_path: Path
) -> None:
    before = _served_cert(server)
    cert_file = tmp_path / "server" / "cert.pem"
    key_file = tmp_path / "server" / "key.pem"
    old_cert, old_key = cert_file.read_bytes(), key_file.read_bytes()
    # bad files: the reload fails and the old context stays
    cert_file.write_bytes(b"not a certificate")
    with pytest.raises(TlsServerError, match="cert.pem"):
        server.site.reload()
    assert _served_cert(server) == before
    key_file.write_bytes(pem_key(make_ca("other")[1]))  # a key that does not match
    cert_file.write_bytes(old_cert)
    with pytest.raises(TlsServerError, match="does not match"):
        server.site.reload()
    key_file.write_bytes(old_key)
    # a renewal (same CA, new key): written, reloaded, served
    new_cert, new_key = server_cert(server.ca)
    cert_file.write_bytes(new_cert)
    key_file.write_bytes(new_key)
    asyncio.run_coroutine_threadsafe(_reload(server.site), server.loop).result(timeout=10)
    after = _served_cert(server)
    assert after != before and after == x509.load_pem_x509_certificate(new_cert)


async def _reload(site: TlsSite) -> None:
    site.reload()


def test_pending_handshakes_end_with_the_site(tmp_path: Path) -> None:
    ca = make_ca("ca")
    cert, key = _write_server_files(tmp_path / "s", ca)
    loop = asyncio.new_event_loop()
    try:

        async def scenario() -> tuple[bytes, float]:
            runner = web.AppRunner(web.Application())
            await runner.setup()
            site = TlsSite(runner, "127.0.0.1", 0, TlsCredentials(cert, key), handshake_timeout=60)
            await site.start()
            reader, writer = await asyncio.open_connection("127.0.0.1", site.port)
            writer.write(b"\x16\x03\x01\x00")  # the start of a record, nothing more
            await writer.drain()
            await asyncio.sleep(0.1)
            started = time.monotonic()
            await runner.cleanup()
            data = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            return data, time.monotonic() - started

        data, took = loop.run_until_complete(scenario())
        assert data == b"" and took < 5
    finally:
        loop.close()


def test_bad_credentials_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(TlsServerError, match="missing.pem"):
        server_context(TlsCredentials(tmp_path / "missing.pem", tmp_path / "k.pem"))
    ca = make_ca("ca")
    cert, key = _write_server_files(tmp_path / "s", ca)
    (tmp_path / "bad-ca.pem").write_text("junk")
    with pytest.raises(TlsServerError, match="client CA"):
        server_context(TlsCredentials(cert, key, tmp_path / "bad-ca.pem"))
    assert server_context(TlsCredentials(cert, key, tmp_path / "s" / "cert.pem")) is not None


def test_client_renegotiation_is_refused(server: Server) -> None:
    proc = subprocess.Popen(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{server.port}", "-tls1_2"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        assert proc.stdin is not None
        proc.stdin.write(b"R\n")  # s_client's command: renegotiate
        proc.stdin.flush()
        out, _ = proc.communicate(timeout=10)  # the server's alert ends it
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert b"RENEGOTIATING" in out and b"no renegotiation" in out, out
    assert _get(server, "/whoami")["chain"] == []


def test_mutated_client_hellos_never_break_the_server(server: Server) -> None:
    """Random byte flips, truncations and extensions of a real ClientHello, each on its own
    connection: each ends in an alert or a close, and the server keeps serving."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = outgoing.read()
    rng = random.Random(20261126)
    for i in range(60):
        data = bytearray(hello)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if i % 3 == 1:
            data = data[: rng.randrange(1, len(data))]
        elif i % 3 == 2:
            data += rng.randbytes(rng.randint(1, 2000))
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                sock.sendall(bytes(data))
                sock.shutdown(socket.SHUT_WR)
                while sock.recv(65536):
                    pass
    assert _get(server, "/whoami")["chain"] == []
    stats = dict(server.site.stats)
    assert sum(stats.values()) >= 59 and stats.get("established", 0) <= 1, stats


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_no_resumption_every_connection_is_a_full_handshake(
    server: Server, client: Client, version: ssl.TLSVersion
) -> None:
    """Tickets would each carry the client's whole chain (an RA-TLS leaf is ~7 KB) and no
    CVM resumes, so none are honoured: the second connection offers the first one's
    session, still does a full handshake and presents its certificate again."""
    ctx = ssl.create_default_context(cafile=str(server.ca_file))
    ctx.minimum_version = ctx.maximum_version = version
    ctx.load_cert_chain(client.cert, client.key)
    session = None
    for attempt in range(2):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1", session=session) as tls:
                tls.sendall(b"GET /whoami HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                reply = b""
                while chunk := tls.recv(65536):
                    reply += chunk
                assert b"CN=client intermediate" in reply
                assert not tls.session_reused, f"connection {attempt} resumed a session"
                session = tls.session
    assert session is not None


def test_tls13_ticket_waits_for_the_first_response(server: Server, client: Client) -> None:
    """After a TLS 1.3 handshake the server holds back its post-handshake ticket (the
    client needs nothing more) and sends it with the response: one socket write less per
    registration. The response still arrives whole."""
    ctx = ssl.create_default_context(cafile=str(server.ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(client.cert, client.key)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.version() == "TLSv1.3"
            with socket.fromfd(tls.fileno(), socket.AF_INET, socket.SOCK_STREAM) as peek:
                peek.settimeout(0.3)
                with pytest.raises(TimeoutError):  # nothing sent before we ask
                    peek.recv(1, socket.MSG_PEEK)
            tls.sendall(b"GET /whoami HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            reply = b""
            while chunk := tls.recv(65536):
                reply += chunk
    assert reply.startswith(b"HTTP/1.1 200")
    assert b"CN=gateway-rpc" in reply
