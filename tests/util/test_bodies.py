"""Bodies that arrive in pieces are read whole (admin API, guest agent), and limits hold.

A real aiohttp server on loopback and a raw socket client that sends the headers and the
body's halves in separate writes, 150 ms apart: before ``read_bounded`` the server saw only
the first piece and answered "not JSON".
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from aiohttp import web

from gateway.control.admin import read_json
from gateway.control.errors import ApiError
from gateway.util.bodies import BodyTooLarge, read_bounded


async def _echo(request: web.Request) -> web.Response:
    try:
        doc = await read_json(request, max_bytes=4096)
    except ApiError as exc:
        return web.json_response({"error": str(exc)}, status=exc.status)
    return web.json_response(doc)


@pytest.fixture
def server() -> Iterator[int]:
    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_post("/echo", _echo)
    runner = web.AppRunner(app, access_log=None)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def _post_in_pieces(port: int, body: bytes, pieces: int) -> tuple[int, bytes]:
    head = (
        f"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(head)
        step = max(1, len(body) // pieces)
        for i in range(0, len(body), step):
            time.sleep(0.15)
            sock.sendall(body[i : i + step])
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.partition(b"\r\n\r\n")[2]


def test_a_body_in_pieces_is_read_whole(server: int) -> None:
    doc = {"name": "x" * 300, "n": list(range(50))}
    status, reply = _post_in_pieces(server, json.dumps(doc).encode(), pieces=3)
    assert status == 200, reply
    assert json.loads(reply) == doc


def test_a_body_over_the_limit_in_pieces_is_413(server: int) -> None:
    body = json.dumps({"x": "y" * 5000}).encode()
    head = (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    chunked = (
        b"".join(
            f"{len(body[i : i + 1000]):x}\r\n".encode() + body[i : i + 1000] + b"\r\n"
            for i in range(0, len(body), 1000)
        )
        + b"0\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", server), timeout=10) as sock:
        sock.sendall(head + chunked)  # no Content-Length: only reading finds the size
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert int(data.split(b" ", 2)[1]) == 413, data[:200]


class _Pieces:
    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    async def read(self, n: int = -1) -> bytes:
        if not self.pieces:
            return b""
        piece = self.pieces.pop(0)
        if 0 < n < len(piece):  # hand back the rest next time, as a stream would
            self.pieces.insert(0, piece[n:])
            piece = piece[:n]
        return piece


def test_read_bounded_limits_exactly() -> None:
    assert asyncio.run(read_bounded(_Pieces([b"ab", b"cd"]), 4)) == b"abcd"
    with pytest.raises(BodyTooLarge):
        asyncio.run(read_bounded(_Pieces([b"ab", b"cd", b"e"]), 4))
    assert asyncio.run(read_bounded(_Pieces([]), 4)) == b""
