from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator

import pytest
from aiohttp import web

ServeApp = Callable[[web.Application], str]


@pytest.fixture
def serve_app() -> Iterator[ServeApp]:
    """Serve aiohttp apps on a background loop (for clients in other processes); stop after."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runners: list[web.AppRunner] = []

    def serve(app: web.Application) -> str:
        async def start() -> str:
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            runners.append(runner)
            return f"http://127.0.0.1:{runner.addresses[0][1]}"

        return asyncio.run_coroutine_threadsafe(start(), loop).result(10)

    try:
        yield serve
    finally:
        for runner in runners:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
