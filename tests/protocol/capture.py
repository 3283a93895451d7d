"""Capture real ClientHellos: from curl and openssl over loopback, from Python ssl in memory.

Used two ways: the tests call these functions to check the parser against the clients installed
right now, and ``python -m tests.protocol.capture`` (re)writes the stored vectors in
``tests/protocol/data/`` so that a fixed set of real hellos is checked everywhere, whatever the
local client versions.

The listener accepts one connection on 127.0.0.1, reads until :class:`HelloSniffer` has a
complete ClientHello, and closes; the client, started in its own session, is stopped by PID.
"""

from __future__ import annotations

import contextlib
import datetime
import shlex
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway.protocol.clienthello import HelloSniffer
from tests.helpers.processes import start, stop_by_pid

DATA = Path(__file__).parent / "data"
SNI = "app1-8443s.gw.example"


@dataclass(frozen=True)
class Capture:
    """A captured hello and how it was made."""

    name: str
    data: bytes
    how: str


def python_ssl_hello(
    server_hostname: str | None = SNI,
    alpn: Sequence[str] = ("h2", "http/1.1"),
    *,
    maximum_version: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED,
    minimum_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
) -> bytes:
    """The first flight of a Python ssl client, produced in memory (ssl.MemoryBIO)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = minimum_version
    ctx.maximum_version = maximum_version
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_side=False, server_hostname=server_hostname)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def capture_command(argv: Callable[[int], list[str]], *, timeout: float = 10.0) -> bytes:
    """Run ``argv(port)`` against a one-shot loopback listener; return the hello it sent."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(timeout)
        port = server.getsockname()[1]
        result: list[bytes] = []
        errors: list[BaseException] = []

        def serve() -> None:
            try:
                conn, _ = server.accept()
                with conn:
                    conn.settimeout(timeout)
                    sniffer = HelloSniffer()
                    while sniffer.feed(chunk := conn.recv(65536)) is None:
                        if not chunk:
                            raise EOFError("client closed before a complete ClientHello")
                    result.append(sniffer.buffered)
            except BaseException as exc:  # handed to the caller below
                errors.append(exc)

        thread = threading.Thread(target=serve, name="capture-hello", daemon=True)
        thread.start()
        with tempfile.TemporaryDirectory(prefix="gwa-capture-") as tmp:
            log = Path(tmp) / "client.log"
            proc = start(argv(port), log)
            try:
                thread.join(timeout + 1)
            finally:
                stop_by_pid(proc, grace=2)
            if errors or not result:
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"no ClientHello captured from {argv(port)}: {errors}\n{tail}")
        return result[0]


LONG_ALPN = ",".join(["h2", "http/1.1"] + [f"x-long-protocol-name-{i:02d}" for i in range(40)])


def openssl_argv(*extra: str, alpn: str = "h2,http/1.1") -> Callable[[int], list[str]]:
    """``openssl s_client`` towards the capture port, with SNI and ALPN, plus ``extra``."""
    return lambda port: [
        "openssl",
        "s_client",
        "-connect",
        f"127.0.0.1:{port}",
        "-servername",
        SNI,
        "-alpn",
        alpn,
        *extra,
    ]


def curl_argv(*extra: str) -> Callable[[int], list[str]]:
    """``curl`` fetching https://SNI:port/ with the name resolved to loopback, plus ``extra``."""
    return lambda port: [
        "curl",
        "--silent",
        "--insecure",
        "--max-time",
        "5",
        "--resolve",
        f"{SNI}:{port}:127.0.0.1",
        *extra,
        f"https://{SNI}:{port}/",
    ]


HAPROXY_CONFIG = """\
global
    maxconn 16
defaults
    mode tcp
    timeout connect 2s
    timeout client 5s
    timeout server 5s
    unique-id-format gwa-%ci-%cp
frontend gwa_fe
    bind 127.0.0.1:{front}
    default_backend gwa_be
backend gwa_be
    server origin 127.0.0.1:{back} {send}
"""
HAPROXY_SEND = {
    "v1": "send-proxy",
    "v2": "send-proxy-v2",
    "v2_tlvs": "send-proxy-v2 proxy-v2-options crc32c,unique-id",
}


@dataclass(frozen=True)
class HaproxyCapture:
    """What haproxy sent upstream for one client connection, and that connection's ends."""

    data: bytes  # PROXY header followed by the client's payload
    payload: bytes
    client: tuple[str, int]
    frontend: tuple[str, int]


def capture_haproxy(send: str, *, timeout: float = 10.0) -> HaproxyCapture:
    """Run haproxy with ``server ... <send>`` in front of a loopback listener; connect through it.

    ``send`` is a key of :data:`HAPROXY_SEND`. Readiness probes may reach the listener too
    (haproxy connects upstream for them as well), so the connection carrying our payload is
    the one kept.
    """
    payload = b"gwa-payload-" + send.encode()
    with (
        socket.create_server(("127.0.0.1", 0)) as server,
        tempfile.TemporaryDirectory(prefix="gwa-haproxy-") as tmp,
    ):
        server.settimeout(timeout)
        back = server.getsockname()[1]
        with socket.create_server(("127.0.0.1", 0)) as probe:
            front = probe.getsockname()[1]  # released just before haproxy binds it
        config = Path(tmp) / "haproxy.cfg"
        config.write_text(HAPROXY_CONFIG.format(front=front, back=back, send=HAPROXY_SEND[send]))
        log = Path(tmp) / "haproxy.log"
        proc = start(["haproxy", "-db", "-f", str(config)], log)
        try:
            client = _connect_retrying(("127.0.0.1", front), proc, timeout)
            with client:
                client.sendall(payload)
                ends = (client.getsockname()[:2], client.getpeername()[:2])
                while True:
                    conn, _ = server.accept()
                    with conn:
                        conn.settimeout(timeout)
                        data = b""
                        while payload not in data and (chunk := conn.recv(4096)):
                            data += chunk
                    if payload in data:
                        return HaproxyCapture(data, payload, ends[0], ends[1])
        finally:
            stop_by_pid(proc, grace=2)


def _connect_retrying(
    addr: tuple[str, int], proc: subprocess.Popen[bytes], timeout: float
) -> socket.socket:
    for _ in range(int(timeout / 0.05)):
        if proc.poll() is not None:
            raise RuntimeError(f"haproxy exited with {proc.returncode}")
        try:
            return socket.create_connection(addr, timeout=timeout)
        except ConnectionRefusedError:
            threading.Event().wait(0.05)
    raise TimeoutError(f"haproxy did not listen on {addr}")


def _version(argv: list[str]) -> str:
    out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=10).stdout
    return out.splitlines()[0] if out else "?"


def capture_all() -> list[Capture]:
    """Every stored vector, captured afresh."""
    openssl = _version(["openssl", "version"])
    curl = _version(["curl", "--version"])
    python = f"Python {sys.version.split()[0]} ssl, {ssl.OPENSSL_VERSION}"
    port_note = "(port: a one-shot 127.0.0.1 listener in tests/protocol/capture.py)"
    captures = []
    for name, extra, alpn in [
        ("openssl_s_client", (), "h2,http/1.1"),
        ("openssl_s_client_tls12", ("-tls1_2",), "h2,http/1.1"),
        # a 1.2 KB hello that openssl itself splits into 512-byte handshake records
        ("openssl_s_client_frag512", ("-max_send_frag", "512"), LONG_ALPN),
    ]:
        argv = openssl_argv(*extra, alpn=alpn)
        cmd = shlex.join(argv(0)).replace("127.0.0.1:0", "127.0.0.1:PORT")
        captures.append(Capture(name, capture_command(argv), f"{openssl}: {cmd} {port_note}"))
    for name, extra in [("curl", ("--http2",)), ("curl_tls12", ("--tlsv1.2", "--tls-max", "1.2"))]:
        argv = curl_argv(*extra)
        cmd = shlex.join(argv(0)).replace(":0", ":PORT")
        captures.append(Capture(name, capture_command(argv), f"{curl}: {cmd} {port_note}"))
    captures.append(
        Capture(
            "python_ssl",
            python_ssl_hello(),
            f"{python}: create_default_context(), ALPN h2,http/1.1, server_hostname={SNI}, "
            "wrap_bio(MemoryBIO, MemoryBIO).do_handshake(), first flight read from outgoing",
        )
    )
    captures.append(
        Capture(
            "python_ssl_no_sni_tls12",
            python_ssl_hello(None, (), maximum_version=ssl.TLSVersion.TLSv1_2),
            f"{python}: as python_ssl but server_hostname=None, no ALPN, maximum_version=TLSv1_2",
        )
    )
    return captures


def write_hex(path: Path, data: bytes, how: str) -> None:
    """Store ``data`` as commented hex: record headers on their own lines, 32 bytes a line."""
    lines = [f"# {how}", f"# captured {datetime.date.today().isoformat()}; {len(data)} bytes"]
    pos = 0
    while pos + 5 <= len(data):
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        lines.append(f"# record at {pos}: type {data[pos]}, {length} bytes")
        lines.append(data[pos : pos + 5].hex())
        body = data[pos + 5 : pos + 5 + length]
        lines.extend(body[i : i + 32].hex() for i in range(0, len(body), 32))
        pos += 5 + length
    if pos < len(data):
        lines.append(data[pos:].hex())
    path.write_text("\n".join(lines) + "\n")


def read_hex(name: str) -> bytes:
    """Load ``tests/protocol/data/<name>.hex`` (``#`` comments and whitespace ignored)."""
    text = (DATA / f"{name}.hex").read_text()
    return bytes.fromhex("".join(line for line in text.splitlines() if not line.startswith("#")))


def write_haproxy_vectors() -> None:
    """Store haproxy's PROXY headers (v1, v2, v2 with TLVs) with the addresses they describe."""
    version = _version(["haproxy", "-v"])
    for name in HAPROXY_SEND:
        cap = capture_haproxy(name)
        header = cap.data[: cap.data.index(cap.payload)]
        lines = [
            f"# {version}: tcp frontend 127.0.0.1:PORT -> server 127.0.0.1:PORT "
            f"{HAPROXY_SEND[name]} (tests/protocol/capture.py HAPROXY_CONFIG)",
            f"# client {cap.client[0]}:{cap.client[1]} -> {cap.frontend[0]}:{cap.frontend[1]}",
            f"# captured {datetime.date.today().isoformat()}; {len(header)} header bytes",
            header.hex(),
        ]
        (DATA / f"haproxy_{name}.hex").write_text("\n".join(lines) + "\n")
        print(f"haproxy_{name}: {len(header)} bytes")


def main() -> int:
    DATA.mkdir(exist_ok=True)
    for capture in capture_all():
        write_hex(DATA / f"{capture.name}.hex", capture.data, capture.how)
        print(f"{capture.name}: {len(capture.data)} bytes")
    write_haproxy_vectors()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
