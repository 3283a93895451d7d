"""A PROTOCOL FAKE of the Cloudflare v4 API, for tests only.

The real API (api.cloudflare.com) is unreachable offline, so this small aiohttp server on
127.0.0.1 implements exactly the calls ``gateway.certs.dns.cloudflare`` makes, with the real
response envelope and a bearer-token check, and writes every record change through to the
test's knotd with RFC 2136. So a certificate issued "through Cloudflare" is really validated
by pebble against a real authoritative server. It is not Cloudflare: behaviour beyond these
endpoints (rate limits, record-type quirks, TTL rules) is not reproduced. Pages are capped at
two records so that our pagination is exercised.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import threading
from typing import Any

import dns.query
import dns.tsig
import dns.update
from aiohttp import web

PAGE_CAP = 2


class FakeCloudflare:
    """Serve the fake on a background thread (its own event loop); ``stop()`` to end."""

    def __init__(
        self, token: str, zones: dict[str, str], dns_port: int, tsig: tuple[str, str]
    ) -> None:
        self.token = token
        self.zones = zones  # zone name -> zone id
        self.dns_port = dns_port
        self.tsig = tsig
        self.records: dict[str, dict[str, Any]] = {}
        self.calls: list[str] = []
        self._ids = itertools.count(1)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/client/v4"

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)

    async def _start(self) -> None:
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/client/v4/zones", self._zones)
        app.router.add_get("/client/v4/zones/{zid}/dns_records", self._list)
        app.router.add_post("/client/v4/zones/{zid}/dns_records", self._create)
        app.router.add_delete("/client/v4/zones/{zid}/dns_records/{rid}", self._delete)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    # --- helpers --------------------------------------------------------------------------

    @staticmethod
    def _envelope(
        result: Any, status: int = 200, info: dict[str, int] | None = None
    ) -> web.Response:
        body: dict[str, Any] = {
            "success": 200 <= status < 300,
            "errors": [],
            "messages": [],
            "result": result,
        }
        if info is not None:
            body["result_info"] = info
        return web.json_response(body, status=status)

    @staticmethod
    def _error(status: int, code: int, message: str) -> web.Response:
        body = {
            "success": False,
            "errors": [{"code": code, "message": message}],
            "messages": [],
            "result": None,
        }
        return web.json_response(body, status=status)

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.calls.append(f"{request.method} {request.path}")
        header = request.headers.get("Authorization", "")
        if not hmac.compare_digest(header.encode(), f"Bearer {self.token}".encode()):
            return self._error(403, 9109, "Invalid access token")
        result: web.StreamResponse = await handler(request)
        return result

    def _zone_name(self, zid: str) -> str | None:
        return next((name for name, i in self.zones.items() if i == zid), None)

    def _rfc2136(self, zone: str, add: bool, rec: dict[str, Any]) -> None:
        key = dns.tsig.Key(self.tsig[0], self.tsig[1], dns.tsig.HMAC_SHA256)
        update = dns.update.UpdateMessage(zone, keyring=key)
        if rec["type"] == "TXT":
            text = '"' + rec["content"].replace('"', '\\"') + '"'
        else:
            d = rec["data"]
            text = f'{d["flags"]} {d["tag"]} "{d["value"]}"'
        name = rec["name"] + "."
        if add:
            update.add(name, rec["ttl"], rec["type"], text)
        else:
            update.delete(name, rec["type"], text)
        response = dns.query.tcp(update, "127.0.0.1", port=self.dns_port, timeout=3)
        assert response.rcode() == 0

    # --- endpoints ------------------------------------------------------------------------

    async def _zones(self, request: web.Request) -> web.Response:
        name = request.query.get("name", "")
        found = [
            {"id": zid, "name": zname, "status": "active", "name_servers": [f"ns1.{zname}"]}
            for zname, zid in self.zones.items()
            if zname == name
        ]
        return self._envelope(
            found,
            info={
                "page": 1,
                "per_page": 20,
                "count": len(found),
                "total_count": len(found),
                "total_pages": 1,
            },
        )

    async def _list(self, request: web.Request) -> web.Response:
        zone = self._zone_name(request.match_info["zid"])
        if zone is None:
            return self._error(
                404,
                7003,
                "Could not route to /zones/..., perhaps your object identifier is invalid?",
            )
        q = request.query
        rows = [
            r
            for r in self.records.values()
            if r["zone_id"] == request.match_info["zid"]
            and ("type" not in q or r["type"] == q["type"])
            and ("name" not in q or r["name"] == q["name"])
        ]
        per_page = min(int(q.get("per_page", "20")), PAGE_CAP)
        page = int(q.get("page", "1"))
        pages = max(1, -(-len(rows) // per_page))
        chunk = rows[(page - 1) * per_page : page * per_page]
        info = {
            "page": page,
            "per_page": per_page,
            "count": len(chunk),
            "total_count": len(rows),
            "total_pages": pages,
        }
        return self._envelope(chunk, info=info)

    async def _create(self, request: web.Request) -> web.Response:
        zid = request.match_info["zid"]
        zone = self._zone_name(zid)
        if zone is None:
            return self._error(404, 7003, "Could not route to zone")
        body = await request.json()
        if body.get("type") not in ("TXT", "CAA") or not str(body.get("name", "")).endswith(zone):
            return self._error(400, 1004, "DNS Validation Error")
        rid = f"rec{next(self._ids)}"
        rec = {
            "id": rid,
            "zone_id": zid,
            "type": body["type"],
            "name": body["name"],
            "ttl": int(body.get("ttl", 1)) if int(body.get("ttl", 1)) > 1 else 300,
        }
        if body["type"] == "TXT":
            rec["content"] = body["content"]
        else:
            rec["data"] = body["data"]
            rec["content"] = (
                f'{body["data"]["flags"]} {body["data"]["tag"]} "{body["data"]["value"]}"'
            )
        self._rfc2136(zone, True, rec)
        self.records[rid] = rec
        return self._envelope(rec)

    async def _delete(self, request: web.Request) -> web.Response:
        zone = self._zone_name(request.match_info["zid"])
        rec = self.records.pop(request.match_info["rid"], None)
        if zone is None or rec is None:
            return self._error(404, 81044, "Record does not exist.")
        self._rfc2136(zone, False, rec)
        return self._envelope({"id": rec["id"]})
