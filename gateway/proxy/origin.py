"""A small origin app for the demo and the end-to-end tests (not part of the data plane).

Blocking sockets, one thread per connection: simple and obviously correct, which is what a
reference peer should be. Every listener first looks for an optional PROXY v1/v2 header (with
``MSG_PEEK``, so a TLS ClientHello stays untouched) and remembers it for ``/pp``. The same
plain port also speaks HTTP/2 with prior knowledge (h2c) when a client sends the h2 preface.

Endpoints (HTTP/1.1, keep-alive unless stated):

====================  ===============================================================
``GET /``             a hello page naming the port, TLS or not, and the client
``GET /health``       ``ok``
``GET /bytes/<n>``    ``n`` bytes of a fixed pattern (:data:`PATTERN` repeated)
``GET /close/<n>``    ``n`` pattern bytes without Content-Length, then close
``GET /halfclose``    wait for the client's EOF, then send 4096 pattern bytes and close
``GET /blackhole``    wait for the client's EOF, never answer
``GET /trickle/<n>``  ``n`` bytes, 64 at a time every 50 ms, then close
``GET /pp``           the PROXY header this connection started with, as JSON (or null)
``POST /echo``        ``{"length": n, "sha256": ...}`` of the request body
====================  ===============================================================
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import signal
import socket
import ssl
import sys
import threading
import time
from pathlib import Path
from typing import Any

from gateway.protocol.errors import ProxyHeaderError
from gateway.protocol.proxy_header import ProxyHeader, parse_proxy_header

__all__ = ["PATTERN", "Origin", "pattern_bytes"]

logger = logging.getLogger(__name__)

PATTERN = b"dstack-gateway-proxy-test-0123456789abcdef"
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def pattern_bytes(n: int) -> bytes:
    """The first ``n`` bytes of :data:`PATTERN` repeated (what ``/bytes/<n>`` returns)."""
    reps = n // len(PATTERN) + 1
    return (PATTERN * reps)[:n]


def _pp_json(pp: ProxyHeader | None) -> bytes:
    if pp is None:
        return b"null"
    return json.dumps(
        {
            "version": pp.version,
            "command": pp.command.name,
            "source": list(pp.source) if pp.source else None,
            "destination": list(pp.destination) if pp.destination else None,
        }
    ).encode()


def _read_proxy_header(sock: socket.socket) -> ProxyHeader | None:
    """Consume a PROXY header if the stream starts with one; leave other bytes in place."""
    sock.settimeout(5.0)
    while True:
        data = sock.recv(4096, socket.MSG_PEEK)
        if not data:
            return None
        v1 = data[:5] == b"PROXY"[: len(data[:5])]
        v2 = data[:12] == _V2_SIG[: len(data[:12])]
        if not (v1 or v2):
            return None
        if (v1 and len(data) >= 5) or (v2 and len(data) >= 12):
            try:
                parsed = parse_proxy_header(data)
            except ProxyHeaderError:
                return None
            if parsed is not None:
                header, used = parsed
                sock.recv(used)
                return header
        time.sleep(0.01)


class _Conn:
    def __init__(self, origin: Origin, sock: Any, tls: bool, pp: ProxyHeader | None) -> None:
        self.origin = origin
        self.sock = sock
        self.tls = tls
        self.pp = pp
        self.buf = b""

    def read_head(self) -> bytes | None:
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buf += chunk
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        return head

    def read_body(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.buf += chunk
        body, self.buf = self.buf[:n], self.buf[n:]
        return body

    def wait_eof(self) -> None:
        while True:
            try:
                chunk = self.sock.recv(65536)
            except (ssl.SSLError, OSError):
                return
            if not chunk:
                return

    def send(self, status: str, body: bytes, ctype: str = "text/plain") -> None:
        head = f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\nContent-Type: {ctype}\r\n\r\n"
        self.sock.sendall(head.encode() + body)

    def serve(self) -> None:
        while True:
            head = self.read_head()
            if head is None:
                return
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = (lines[0].split(" ") + ["", ""])[:3]
            headers = {}
            for line in lines[1:]:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
            body = b""
            if "content-length" in headers:
                body = self.read_body(int(headers["content-length"]))
            if not self.route(method, target, body):
                return

    def route(self, method: str, target: str, body: bytes) -> bool:
        """Answer one request; False when the connection must end."""
        parts = target.strip("/").split("/")
        name = parts[0]
        arg = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        if name == "":
            peer = self.sock.getpeername()
            page = (
                f"<h1>Hello from the demo app</h1><p>port {self.origin_port()}, "
                f"{'TLS' if self.tls else 'plain TCP'}, peer {peer[0]}:{peer[1]}</p>\n"
            )
            self.send("200 OK", page.encode(), "text/html")
        elif name == "health":
            self.send("200 OK", b"ok")
        elif name == "bytes":
            self.send("200 OK", pattern_bytes(arg), "application/octet-stream")
        elif name == "close":
            self.sock.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + pattern_bytes(arg))
            return False
        elif name == "halfclose":
            self.wait_eof()
            self.sock.sendall(pattern_bytes(4096))
            return False
        elif name == "blackhole":
            self.wait_eof()
            return False
        elif name == "trickle":
            self.sock.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
            data = pattern_bytes(arg)
            for i in range(0, len(data), 64):
                self.sock.sendall(data[i : i + 64])
                time.sleep(0.05)
            return False
        elif name == "pp":
            self.send("200 OK", _pp_json(self.pp), "application/json")
        elif name == "echo" and method == "POST":
            doc = {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}
            self.send("200 OK", json.dumps(doc).encode(), "application/json")
        else:
            self.send("404 Not Found", b"not found\n")
        return True

    def origin_port(self) -> int:
        return int(self.sock.getsockname()[1])


def _serve_h2c(sock: socket.socket, pp: ProxyHeader | None) -> None:
    """HTTP/2 with prior knowledge: answers every stream like the HTTP/1.1 routes it knows."""
    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    paths: dict[int, str] = {}
    while True:
        data = sock.recv(65536)
        if not data:
            return
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                hdrs = {k.decode() if isinstance(k, bytes) else k: v for k, v in event.headers}
                path = hdrs.get(":path", "/")
                paths[event.stream_id] = path.decode() if isinstance(path, bytes) else path
            elif isinstance(event, h2.events.StreamEnded):
                path = paths.pop(event.stream_id, "/")
                parts = path.strip("/").split("/")
                if parts[0] == "bytes" and len(parts) > 1 and parts[1].isdigit():
                    body = pattern_bytes(int(parts[1]))
                elif parts[0] == "pp":
                    body = _pp_json(pp)
                else:
                    body = b"hello over h2c\n"
                conn.send_headers(
                    event.stream_id,
                    [(":status", "200"), ("content-length", str(len(body)))],
                )
                # respect flow control: send in windows, pumping incoming WINDOW_UPDATEs
                sent = 0
                while sent < len(body):
                    window = min(conn.local_flow_control_window(event.stream_id), 16384)
                    if window <= 0:
                        sock.sendall(conn.data_to_send())
                        more = sock.recv(65536)
                        if not more:
                            return
                        conn.receive_data(more)
                        continue
                    conn.send_data(event.stream_id, body[sent : sent + window])
                    sent += window
                conn.end_stream(event.stream_id)
            elif isinstance(event, h2.events.ConnectionTerminated):
                sock.sendall(conn.data_to_send())
                return
        sock.sendall(conn.data_to_send())


class Origin:
    """Plain and TLS listeners on loopback, each connection in its own daemon thread."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.listeners: list[socket.socket] = []
        self.stopping = threading.Event()

    def listen(self, port: int, context: ssl.SSLContext | None = None) -> int:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, port))
        sock.listen(256)
        self.listeners.append(sock)
        threading.Thread(target=self._accept, args=(sock, context), daemon=True).start()
        return int(sock.getsockname()[1])

    def _accept(self, lsock: socket.socket, context: ssl.SSLContext | None) -> None:
        while not self.stopping.is_set():
            try:
                sock, _ = lsock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(sock, context), daemon=True).start()

    def _handle(self, sock: socket.socket, context: ssl.SSLContext | None) -> None:
        try:
            pp = _read_proxy_header(sock)
            sock.settimeout(60.0)
            if context is not None:
                conn = _Conn(self, context.wrap_socket(sock, server_side=True), True, pp)
                conn.serve()
                with contextlib.suppress(ssl.SSLError, OSError, ValueError):
                    conn.sock.unwrap()
                return
            head = sock.recv(len(H2_PREFACE), socket.MSG_PEEK)
            if head == H2_PREFACE:
                _serve_h2c(sock, pp)
                return
            _Conn(self, sock, False, pp).serve()
        except (ssl.SSLError, OSError, ValueError) as exc:
            logger.debug("origin connection ended: %s", exc)
        finally:
            with contextlib.suppress(OSError):
                sock.close()

    def close(self) -> None:
        self.stopping.set()
        for sock in self.listeners:
            with contextlib.suppress(OSError):
                sock.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="demo/test origin app")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--http", type=int, default=0, help="plain HTTP/1.1 + h2c port")
    parser.add_argument(
        "--tls", type=int, default=None, help="HTTPS port, 0 = any (needs --cert, --key)"
    )
    parser.add_argument("--cert", type=Path)
    parser.add_argument("--key", type=Path)
    args = parser.parse_args(argv)
    origin = Origin(args.host)
    ports = {"http": origin.listen(args.http)}
    if args.tls is not None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(args.cert), str(args.key))
        ports["tls"] = origin.listen(args.tls, ctx)
    sys.stdout.write(json.dumps(ports) + "\n")
    sys.stdout.flush()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.wait(0.2):
        pass
    origin.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
