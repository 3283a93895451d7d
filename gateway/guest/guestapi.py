"""The Guest API the VMM calls (dstack: vsock port 8000, ``/api/<Method>``).

``Info`` (the external view, so tcb_info stays hidden unless public), ``SysInfo``,
``ListContainers`` and ``Shutdown``. Served on vsock where it exists, else on a unix
socket in the lab. Shutdown calls the function passed in (the CLI stops the app and
exits; production would power off).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.guest import prpc, sysinfo
from gateway.guest.runner import AppRunner
from gateway.guest.service import AgentService

__all__ = ["GUEST_API_VSOCK_PORT", "VsockSite", "create_guest_api_app", "vsock_socket"]

GUEST_API_VSOCK_PORT = 8000


def create_guest_api_app(
    svc: AgentService,
    runner: AppRunner | None,
    shutdown: Callable[[], Awaitable[None]],
    data_disks: tuple[str, ...] = ("/",),
) -> web.Application:
    async def info(args: prpc.Args) -> object:
        full = svc.info(external=True)
        return {
            "version": svc.version()["version"],
            "app_id": full["app_id"],
            "instance_id": full["instance_id"],
            "app_cert": full["app_cert"],
            "tcb_info": full["tcb_info"],
            "device_id": full["device_id"],
        }

    async def sys_info(args: prpc.Args) -> object:
        return sysinfo.sys_info(data_disks)

    async def list_containers(args: prpc.Args) -> object:
        rows = await runner.list() if runner is not None else []
        return {
            "containers": [
                {
                    "id": c.id,
                    "names": list(c.names),
                    "image": c.image,
                    "image_id": "",
                    "created": 0,
                    "state": c.state,
                    "status": c.status,
                }
                for c in rows
            ]
        }

    async def do_shutdown(args: prpc.Args) -> object:
        await shutdown()
        return None

    methods: dict[str, prpc.Method] = {
        "Info": info,
        "SysInfo": sys_info,
        "ListContainers": list_containers,
        "Shutdown": do_shutdown,
    }

    async def handler(request: web.Request) -> web.StreamResponse:
        return await prpc.dispatch(request, methods, request.match_info["method"])

    app = web.Application(client_max_size=64 * 1024)
    app.router.add_routes([web.post("/api/{method}", handler), web.get("/api/{method}", handler)])
    return app


def vsock_socket(port: int = GUEST_API_VSOCK_PORT) -> socket.socket | None:
    """A listening vsock socket on any CID, or ``None`` where vsock does not exist."""
    family = getattr(socket, "AF_VSOCK", None)
    if family is None:
        return None
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.bind((0xFFFFFFFF, port))
        sock.listen(16)
    except OSError:
        return None
    sock.setblocking(False)
    return sock


class VsockSite(web.BaseSite):
    """An aiohttp site on a listening vsock socket (``SockSite`` cannot name one)."""

    __slots__ = ("_sock",)

    def __init__(self, runner: web.BaseRunner, sock: socket.socket) -> None:
        super().__init__(runner)
        self._sock = sock

    @property
    def name(self) -> str:
        cid, port = self._sock.getsockname()[:2]
        return f"vsock://{cid}:{port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(server, sock=self._sock)
