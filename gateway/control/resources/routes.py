"""Custom-domain routes (``/api/v1/custom-domains``): a static alternative to TXT records.

``shop.example.com -> <app_id>:<port>`` here is what ``_dstack-app-address.shop.example.com``
TXT ``"<app_id>:<port>"`` says in DNS; the proxy checks these first. A name under one of our
base domains is refused (409): apps there are addressed by their name.
"""

from __future__ import annotations

from aiohttp import web

from gateway.control.admin import json_response, read_json
from gateway.control.models import CustomRoute
from gateway.control.resources.common import (
    DELETED,
    INT,
    PORT,
    STR,
    array,
    deleted,
    guarded,
    if_match,
    obj,
    with_etag,
)
from gateway.control.routes import Endpoint
from gateway.control.state import OperatorState

ROUTE = obj(
    {"domain": STR, "app_id": STR, "port": PORT, "revision": INT}, ("domain", "app_id", "port")
)
CREATE = obj({"domain": STR, "app_id": STR, "port": PORT}, ("domain", "app_id", "port"))
UPDATE = obj({"app_id": STR, "port": PORT}, ("app_id", "port"))


def route_endpoints(state: OperatorState) -> list[Endpoint]:
    async def list_routes(_: web.Request) -> web.Response:
        return json_response([r.to_json() for r in state.routes()])

    async def get_route(request: web.Request) -> web.Response:
        r = state.route(request.match_info["domain"])
        return with_etag(r.to_json(), r.revision)

    async def add_route(request: web.Request) -> web.Response:
        r = state.put_route(CustomRoute.from_json(await read_json(request)), create=True)
        return with_etag(r.to_json(), r.revision, 201)

    async def update_route(request: web.Request) -> web.Response:
        expect = if_match(request)
        body = CustomRoute.from_json(await read_json(request), request.match_info["domain"])
        r = state.put_route(body, create=False, expect=expect)
        return with_etag(r.to_json(), r.revision)

    async def remove_route(request: web.Request) -> web.Response:
        name = request.match_info["domain"]
        state.delete_route(name, if_match(request))
        return deleted("custom_domain", name)

    base, item = "/api/v1/custom-domains", "/api/v1/custom-domains/{domain}"
    tag = "custom-domains"
    return [
        Endpoint(
            "GET",
            base,
            guarded(list_routes),
            "List static custom-domain routes",
            tag,
            response=array(ROUTE),
        ),
        Endpoint(
            "POST",
            base,
            guarded(add_route),
            "Route a custom domain to an app",
            tag,
            request=CREATE,
            response=ROUTE,
            status=201,
        ),
        Endpoint("GET", item, guarded(get_route), "One custom-domain route", tag, response=ROUTE),
        Endpoint(
            "PUT",
            item,
            guarded(update_route),
            "Change a custom-domain route",
            tag,
            request=UPDATE,
            response=ROUTE,
        ),
        Endpoint(
            "DELETE",
            item,
            guarded(remove_route),
            "Remove a custom-domain route",
            tag,
            response=DELETED,
        ),
    ]
