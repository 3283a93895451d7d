"""Start and stop the servers of a run, each as a child in its own session, stopped by PID.

A :class:`Target` is what the load generator aims at: the ports for terminate and
passthrough, and the PID whose process tree is charged for the CPU and memory.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


class ServerError(RuntimeError):
    """A server did not start, or exited; the message carries the tail of its log."""


@dataclass(slots=True)
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    leader: int  # the PID whose group and descendants are accounted
    term_port: int
    pass_port: int
    child: Child


def pinned(cmd: Sequence[str], cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus, *cmd] if cpus else list(cmd)


def start(name: str, cmd: Sequence[str], log: Path, cwd: Path | None = None) -> Child:
    """Start ``cmd`` in a new session (its PID is its process group) with output to ``log``."""
    with log.open("ab") as fh:
        proc = subprocess.Popen(
            list(cmd),
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=cwd,
        )
    return Child(name, proc, log)


def stop(child: Child, grace: float = 5.0) -> None:
    """SIGTERM the child's process group, wait, then SIGKILL the group (by our own PID)."""
    proc = child.proc
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_listening(child: Child, ports: Sequence[int], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    pending = list(ports)
    while pending:
        if not child.alive():
            raise ServerError(f"{child.name} exited with {child.proc.returncode}:\n{child.tail()}")
        if time.monotonic() > deadline:
            raise ServerError(f"{child.name} not listening on {pending} after {timeout}s")
        if port_open(pending[0]):
            pending.pop(0)
        else:
            time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True, slots=True)
class Probe:
    status: int
    body_len: int
    resumed: bool  # the second connection resumed the first one's session


def _get(
    ctx: ssl.SSLContext, port: int, sni: str, path: str, session: ssl.SSLSession | None
) -> tuple[bytes, ssl.SSLSocket]:
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    tls = ctx.wrap_socket(raw, server_hostname=sni, session=session)
    request = f"GET {path} HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n"
    tls.sendall(request.encode())
    chunks = []
    while chunk := tls.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks), tls


def probe(port: int, sni: str, path: str) -> Probe:
    """GET ``path`` twice over TLS, the second time offering the first session.

    Shows that the route works (status, body length) and whether the server lets a client
    resume (it sent a ticket, or kept the session); with TLS 1.3 the ticket arrives after the
    handshake, so the first response is read to the end before the session is taken.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # throw-away bench CA; this checks routing, not trust
    first, tls = _get(ctx, port, sni, path, None)
    session = tls.session
    tls.close()
    _, tls2 = _get(ctx, port, sni, path, session)
    resumed = bool(tls2.session_reused)
    tls2.close()
    head, _, body = first.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        status = 0
    return Probe(status=status, body_len=len(body), resumed=resumed)
