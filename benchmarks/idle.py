"""Open N TLS connections to a server, complete each handshake, then hold them idle.

Run as ``python -m benchmarks.idle --port P --sni NAME --count N``. Prints ``READY <opened>
<failed>`` once every attempt has finished, then keeps the connections open until stdin is
closed (the harness reads the server's memory in between), and exits.

The handshake runs over an ``ssl.SSLObject`` on memory BIOs; afterwards the client drops the
TLS object and keeps only the socket, so 10 000 connections cost the client a few MB instead
of several hundred. The server cannot tell: it holds an established TLS 1.3 session with no
request pending. The client never reads the server's session tickets (they stay in the
kernel's receive buffer, not in the server's memory).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import socket
import ssl
import sys


async def _handshake(
    loop: asyncio.AbstractEventLoop, ctx: ssl.SSLContext, host: str, port: int, sni: str
) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, (host, port))
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = ctx.wrap_bio(incoming, outgoing, server_side=False, server_hostname=sni)
        while True:
            try:
                tls.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            pending = outgoing.read()
            if pending:
                await loop.sock_sendall(sock, pending)
            if done:
                return sock
            data = await loop.sock_recv(sock, 65536)
            if not data:
                raise ConnectionError("server closed during the handshake")
            incoming.write(data)
    except BaseException:
        sock.close()
        raise


async def open_idle(
    host: str, port: int, sni: str, count: int, concurrency: int
) -> tuple[list[socket.socket], int]:
    """Open ``count`` handshaken connections, ``concurrency`` at a time; (sockets, failures)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the bench CA is throw-away; we measure the server side
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(concurrency)
    opened: list[socket.socket] = []
    failed = 0

    async def one() -> None:
        nonlocal failed
        async with sem:
            try:
                opened.append(await asyncio.wait_for(_handshake(loop, ctx, host, port, sni), 30))
            except (OSError, ssl.SSLError, TimeoutError, ConnectionError):
                failed += 1

    async with asyncio.TaskGroup() as tg:
        for _ in range(count):
            tg.create_task(one())
    return opened, failed


def raise_nofile(want: int) -> None:
    """Raise RLIMIT_NOFILE to ``want`` (hard limit too when running as root)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
        return
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--sni", required=True)
    parser.add_argument("--count", type=int, default=10000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args(argv)
    if not args.host.startswith("127."):
        parser.error("only loopback targets are allowed")
    raise_nofile(args.count + 1024)
    socks, failed = asyncio.run(
        open_idle(args.host, args.port, args.sni, args.count, args.concurrency)
    )
    sys.stdout.write(f"READY {len(socks)} {failed}\n")
    sys.stdout.flush()
    sys.stdin.read()  # hold until the harness closes our stdin
    for s in socks:
        s.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
