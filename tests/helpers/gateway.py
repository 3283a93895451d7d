"""Run a real ``gateway serve`` and the demo origin for end-to-end tests, plus small clients.

Everything listens on 127.0.0.1 at ports from :func:`free_port`; every process is stopped by
its PID through :mod:`tests.helpers.processes`.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from gateway.certs.devca import ensure_dev_wildcard
from tests.helpers.processes import free_port, start, stop_by_pid, wait_listening, wait_until

BASE = "gw.test"


@dataclass
class Origin:
    proc: subprocess.Popen[bytes]
    http: int
    tls: int
    log: Path


@dataclass
class Gateway:
    proc: subprocess.Popen[bytes]
    port: int
    config: Path
    log: Path
    data_dir: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def make_certs(root: Path) -> tuple[Path, Path]:
    """A dev CA and ``*.gw.test`` in ``root/certs``; returns (ca.pem, certs_dir)."""
    ca, _ = ensure_dev_wildcard(root / "ca", root / "certs", BASE)
    return ca.cert_path, root / "certs"


@contextmanager
def run_origin(root: Path) -> Iterator[Origin]:
    log = root / "origin.log"
    cert = root / "certs" / BASE
    cmd = [
        sys.executable,
        "-m",
        "gateway.proxy.origin",
        "--http",
        "0",
        "--tls",
        "0",
        "--cert",
        str(cert / "fullchain.pem"),
        "--key",
        str(cert / "privkey.pem"),
    ]
    proc = start(cmd, log)
    try:
        wait_until(lambda: log.exists() and b"{" in log.read_bytes(), proc, 10, "origin", log)
        ports = json.loads(log.read_text().splitlines()[0])
        yield Origin(proc, ports["http"], ports["tls"], log)
    finally:
        stop_by_pid(proc)


def write_config(root: Path, name: str, origin: Origin, extra: str = "", **proxy: object) -> Path:
    """A gateway config with short timeouts and the test routes; ``proxy`` overrides keys."""
    port = free_port()
    values: dict[str, object] = {
        "listen": [f"127.0.0.1:{port}"],
        "workers": 2,
        "base_domains": [BASE],
        "certs_dir": str(root / "certs"),
        "stats_interval": 0.2,
        "hello_limit": 4096,
        "insecure_localhost_backend": True,
    }
    values.update(proxy)
    lines = [
        "[core]",
        f'data_dir = "{root / name}"',
        "log_level = 'info'",
        "[proxy]",
    ]
    lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    lines += [
        "[proxy.timeouts]",
        "connect = 1.0",
        "handshake = 1.0",
        "idle = 1.5",
        "proxy_header = 1.0",
        "drain = 4.0",
        "[[proxy.routes]]",
        'app_id = "app"',
        'backends = ["127.0.0.1"]',
        'instance_ids = ["inst1"]',
        "[[proxy.routes]]",
        'app_id = "pp"',
        'backends = ["127.0.0.1"]',
        "restrict_mode = true",
        f"ports = [{{ port = {origin.http}, pp = true }}, {{ port = {origin.tls}, pp = true }}]",
        "[[proxy.routes]]",
        'app_id = "locked"',
        'backends = ["127.0.0.1"]',
        "restrict_mode = true",
        "[[proxy.routes]]",
        'app_id = "multi"',
        'backends = ["127.0.0.2", "127.0.0.1", "127.0.0.3"]',
        extra,
    ]
    path = root / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def gateway_port(config: Path) -> int:
    import tomllib

    listen = tomllib.loads(config.read_text())["proxy"]["listen"][0]
    return int(listen.rsplit(":", 1)[1].split("-")[0])  # the first port of a range


@contextmanager
def run_gateway(config: Path) -> Iterator[Gateway]:
    import tomllib

    data_dir = Path(tomllib.loads(config.read_text())["core"]["data_dir"])
    log = config.with_suffix(".log")
    port = gateway_port(config)
    proc = start([sys.executable, "-m", "gateway", "serve", "--config", str(config)], log)
    try:
        wait_listening(proc, "127.0.0.1", port, timeout=15, log=log)
        yield Gateway(proc, port, config, log, data_dir)
    finally:
        stop_by_pid(proc, grace=10)


def worker_pids(gw: Gateway) -> dict[int, int]:
    """Worker index -> pid, from the workers' stats files."""
    out: dict[int, int] = {}
    for path in (gw.data_dir / "run" / "proxy").glob("worker-*.json"):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        out[int(doc["index"])] = int(doc["pid"])
    return out


def client_context(ca: Path, alpn: list[str] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def tls_connect(
    port: int, sni: str, ca: Path, alpn: list[str] | None = None, timeout: float = 10.0
) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    ctx = client_context(ca, alpn)
    return ctx.wrap_socket(raw, server_hostname=sni, suppress_ragged_eofs=False)


def read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """Read one HTTP/1.1 response with Content-Length; returns (head, body)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"EOF before the response head: {buf[:200]!r}")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"EOF after {len(body)} of {length} body bytes")
        body += chunk
    return head, body


def get(sock: socket.socket, path: str, host: str = "x") -> tuple[bytes, bytes]:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    return read_response(sock)


def read_until_eof(sock: socket.socket, limit: float = 10.0) -> bytes:
    out = b""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            return out
        out += chunk
    raise TimeoutError("no EOF")


def recv_alert(port: int, payload: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, return everything the gateway answers before it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        out = b""
        while True:
            try:
                chunk = s.recv(4096)
            except ConnectionResetError:
                return out
            if not chunk:
                return out
            out += chunk
