"""The admin API application: authentication, problem documents, OpenAPI and resources.

Resources are contributed as :class:`~gateway.control.routes.Endpoint` lists by the parts
that own the data (instances from the registry, certificates from the certbot, ...), so
this module knows none of them: it adds the cross-cutting layers and the few endpoints
every gateway has (health, readiness, status, the API description).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from aiohttp import web

from gateway.control.auth import GLOBAL_FACTOR, Authenticator, Credentials, auth_middleware
from gateway.control.errors import ApiError, error_middleware, request_id_middleware
from gateway.control.ratelimit import RateLimiter
from gateway.control.readiness import Readiness
from gateway.control.routes import Endpoint, add_endpoints, openapi_document
from gateway.util.bodies import BodyTooLarge, read_bounded

API_TITLE = "gateway admin API"
API_VERSION = "1"

StatusFn = Callable[[], Mapping[str, Any]]

_STATUS_SCHEMA = {"type": "object", "additionalProperties": True}
_READY_SCHEMA = {
    "type": "object",
    "required": ["ready", "not_ready", "checks"],
    "properties": {
        "ready": {"type": "boolean"},
        "not_ready": {"type": "array", "items": {"type": "string"}},
        "checks": {"type": "object", "additionalProperties": True},
    },
}


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        status=status, text=json.dumps(data, default=str), content_type="application/json"
    )


async def read_json(request: web.Request, max_bytes: int = 1 << 20) -> Any:
    """The request body as JSON, or a 4xx :class:`ApiError` saying what is wrong."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise ApiError(413, "body_too_large", f"request body over {max_bytes} bytes")
    try:
        raw = await read_bounded(request.content, max_bytes)
    except BodyTooLarge:
        raise ApiError(413, "body_too_large", f"request body over {max_bytes} bytes") from None
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, "invalid_json", f"request body is not valid JSON: {exc}") from None


def create_admin_app(
    creds: Credentials,
    *,
    status: StatusFn,
    readiness: Readiness | None = None,
    resources: Sequence[Endpoint] = (),
    failures_per_minute: int = 10,
    dashboard: Endpoint | None = None,
) -> web.Application:
    """Build the admin app. ``resources`` are the endpoints other parts contribute.

    ``readiness``: what ``/ready`` reports (None: nothing to wait for, always ready; the
    control plane passes its own, see :mod:`gateway.control.readiness`).
    """
    ready = readiness if readiness is not None else Readiness()

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def get_ready(_: web.Request) -> web.Response:
        report = ready.report()
        return json_response(report.to_json(), 200 if report.ready else 503)

    async def get_status(_: web.Request) -> web.Response:
        return json_response(dict(status()))

    async def get_openapi(_: web.Request) -> web.Response:
        return json_response(document)

    endpoints: list[Endpoint] = [
        Endpoint(
            "GET",
            "/health",
            health,
            "Liveness probe (public)",
            "meta",
            public=True,
            action="health",
        ),
        Endpoint(
            "GET",
            "/ready",
            get_ready,
            "Readiness probe (public): 503 names what is not ready yet",
            "meta",
            response=_READY_SCHEMA,
            public=True,
            extra_statuses=(503,),
            action="ready",
        ),
        Endpoint(
            "GET",
            "/api/v1/openapi.json",
            get_openapi,
            "This API description",
            "meta",
            response={"type": "object"},
            action="openapi",
        ),
        Endpoint(
            "GET",
            "/api/v1/status",
            get_status,
            "Node status and counters",
            "status",
            response=_STATUS_SCHEMA,
        ),
        *resources,
    ]
    if dashboard is not None:
        endpoints.append(dashboard)
    document = openapi_document(API_TITLE, API_VERSION, endpoints)
    public = frozenset(e.path for e in endpoints if e.public)
    auth = Authenticator(
        creds,
        RateLimiter(failures_per_minute, 60.0),
        everyone=RateLimiter(failures_per_minute * GLOBAL_FACTOR, 60.0, max_keys=1),
    )
    app = web.Application(
        middlewares=[request_id_middleware, error_middleware, auth_middleware(auth, public)],
        client_max_size=1 << 20,
    )
    add_endpoints(app, endpoints)
    app[ENDPOINTS_KEY] = tuple(endpoints)
    return app


ENDPOINTS_KEY = web.AppKey("endpoints", tuple)
