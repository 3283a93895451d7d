"""The public HTTP port (8090 in dstack): app info, a dashboard, metrics.

It reveals only what app-compose makes public: the tcb_info (and vm_config) only with
``public_tcbinfo``, system facts and ``/metrics`` only with ``public_sysinfo``, container
logs (``/logs/<name>?tail=N``, plain text) only with ``public_logs``; never keys or env.
Every response
carries ``X-App-Version``; each client address gets a token bucket so that a flood from one
peer cannot starve the agent (HTTP 429 with ``Retry-After``).
"""

from __future__ import annotations

import html
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import quote

from aiohttp import web

from gateway.guest import prpc, sysinfo
from gateway.guest.runner import AppRunner
from gateway.guest.service import AGENT_VERSION, AgentService

__all__ = ["RateLimiter", "create_public_app"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class RateLimiter:
    """Per-client token buckets (``rate`` per second, bursts of ``burst``)."""

    rate: float = 10.0
    burst: float = 30.0
    clock: Callable[[], float] = time.monotonic
    max_clients: int = 10_000
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)

    def allow(self, client: str) -> bool:
        now = self.clock()
        tokens, last = self._buckets.get(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if len(self._buckets) >= self.max_clients and client not in self._buckets:
            self._buckets.clear()  # bounded memory: forget everyone rather than grow
        if tokens < 1.0:
            self._buckets[client] = (tokens, now)
            return False
        self._buckets[client] = (tokens - 1.0, now)
        return True


def _dashboard(svc: AgentService, containers: list[dict[str, str]]) -> str:
    info = svc.info(external=True)
    compose = svc.state.compose
    rows = [
        ("App name", info["app_name"]),
        ("App ID", info["app_id"]),
        ("Instance ID", info["instance_id"]),
        ("Device ID", info["device_id"]),
        ("Compose hash", info["compose_hash"]),
        ("Key provider", info["key_provider_info"]),
    ]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Node Information</title>",
        "<style>body{font-family:sans-serif;margin:2em}td{padding:2px 8px}"
        "textarea{width:100%;height:20em}</style></head><body><h1>Node Information</h1><table>",
    ]
    parts += [f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows]
    parts.append("</table>")
    if compose.public_sysinfo:
        si = sysinfo.sys_info()
        parts.append("<h2>System</h2><table>")
        for key in ("os_name", "kernel_version", "cpu_model", "num_cpus", "total_memory", "uptime"):
            parts.append(f"<tr><th>{key}</th><td>{html.escape(str(si[key]))}</td></tr>")
        parts.append("</table>")
    parts.append("<h2>Containers</h2><table><tr><th>Name</th><th>Status</th></tr>")
    for c in containers:
        name = html.escape(c["name"])
        if compose.public_logs:
            href = html.escape(f"/logs/{quote(c['name'], safe='')}?tail=20")
            name = f"<a href='{href}'>{name}</a>"
        parts.append(f"<tr><td>{name}</td><td>{html.escape(c['status'])}</td></tr>")
    parts.append("</table><h2>TCB Info</h2>")
    if info["tcb_info"]:
        parts.append(f"<textarea readonly>{html.escape(info['tcb_info'])}</textarea>")
    else:
        parts.append("<p>TCB info is not public</p>")
    parts.append("</body></html>")
    return "".join(parts)


def create_public_app(
    svc: AgentService, runner: AppRunner | None = None, limiter: RateLimiter | None = None
) -> web.Application:
    """``/``, ``/prpc/[Worker.]Info|Version``, and ``/metrics`` when public_sysinfo."""
    bucket = limiter or RateLimiter()

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        peer = request.remote or "?"
        if not bucket.allow(peer):
            resp: web.StreamResponse = web.Response(
                status=429, text="too many requests\n", headers={"Retry-After": "1"}
            )
        else:
            try:
                resp = await handler(request)
            except web.HTTPException as exc:
                resp = exc
        resp.headers["X-App-Version"] = AGENT_VERSION
        return resp

    async def containers() -> list[dict[str, str]]:
        if runner is None:
            return []
        return [{"name": ",".join(c.names), "status": c.status} for c in await runner.list()]

    async def index(request: web.Request) -> web.StreamResponse:
        return web.Response(text=_dashboard(svc, await containers()), content_type="text/html")

    async def metrics(request: web.Request) -> web.StreamResponse:
        if not svc.state.compose.public_sysinfo:
            raise web.HTTPNotFound(text="metrics are not public for this app\n")
        return web.Response(
            text=sysinfo.metrics_text(sysinfo.sys_info()), content_type="text/plain"
        )

    async def logs(request: web.Request) -> web.StreamResponse:
        if not svc.state.compose.public_logs or runner is None:
            raise web.HTTPNotFound(text="logs are not public for this app\n")
        try:
            tail = min(max(int(request.query.get("tail", "100")), 0), 10_000)
        except ValueError:
            raise web.HTTPBadRequest(text="tail must be an integer\n") from None
        data = await runner.logs(request.match_info["name"], tail)
        if data is None:
            raise web.HTTPNotFound(text="no such container\n")
        return web.Response(body=data, content_type="text/plain", charset="utf-8")

    async def worker_info(args: prpc.Args) -> object:
        return svc.info(external=True)

    async def worker_version(args: prpc.Args) -> object:
        return svc.version()

    async def attestation_for_app_key(args: prpc.Args) -> object:
        return await svc.attestation_for_app_key(prpc.get_str(args, "algorithm"))

    methods = {
        "Info": worker_info,
        "Version": worker_version,
        "GetAttestationForAppKey": attestation_for_app_key,
    }

    async def rpc(request: web.Request) -> web.StreamResponse:
        return await prpc.dispatch(
            request, methods, request.match_info["method"].removeprefix("Worker.")
        )

    app = web.Application(middlewares=[guard], client_max_size=64 * 1024)
    app.router.add_routes(
        [
            web.get("/", index),
            web.get("/metrics", metrics),
            web.get("/logs/{name}", logs),
            web.get("/prpc/{method}", rpc),
            web.post("/prpc/{method}", rpc),
        ]
    )
    return app
