"""``read_upto``: a body that arrives in pieces is read whole, and the limit still holds."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.control.admin import read_json
from gateway.util.bodies import read_upto
from tests.helpers.processes import free_port

BODY = json.dumps({"domain": "apps.example.com", "pad": "x" * 3000}).encode()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _serve(handler: Handler, port: int) -> web.AppRunner:
    app = web.Application()
    app.router.add_post("/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


def _post_in_pieces(port: int, body: bytes) -> bytes:
    """Headers, then the body in two writes 100 ms apart (as a slow or chatty client does)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body[:50]
        )
        time.sleep(0.1)
        s.sendall(body[50:])
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def test_a_body_in_pieces_is_read_whole_and_the_limit_holds() -> None:
    seen: list[object] = []

    async def admin_like(request: web.Request) -> web.Response:
        seen.append(await read_json(request))  # the admin API's reader
        return web.Response(text="ok")

    async def limited(request: web.Request) -> web.Response:
        seen.append(len(await read_upto(request.content, 1000)))
        return web.Response(text="ok")

    async def main() -> None:
        for handler in (admin_like, limited):
            port = free_port()
            runner = await _serve(handler, port)
            try:
                answer = await asyncio.to_thread(_post_in_pieces, port, BODY)
                assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
            finally:
                await runner.cleanup()

    asyncio.run(main())
    assert seen == [json.loads(BODY), 1001]  # whole; at most limit + 1 bytes
