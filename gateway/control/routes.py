"""A route table that is also the API's description.

Each :class:`Endpoint` carries its method, path, handler and the OpenAPI facts about it
(summary, request and response schemas, whether it is public). The aiohttp router and the
OpenAPI document are both generated from the same table, so they cannot disagree; a test
checks that the served document lists exactly the routes the app answers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Schema = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Endpoint:
    method: str
    path: str
    handler: Handler
    summary: str
    tag: str
    request: Schema | None = None
    response: Schema | None = None
    public: bool = False
    status: int = 200
    extra_statuses: tuple[int, ...] = field(default=())
    action: str | None = None  # the `gateway ctl <tag> <action>` name; derived when None

    def cli_action(self) -> str:
        """The ctl verb: explicit, else list/get/add/set/remove by method and path shape."""
        if self.action:
            return self.action
        item = self.path.endswith("}")
        return {
            ("GET", False): "list",
            ("GET", True): "get",
            ("POST", False): "add",
            ("PUT", True): "set",
            ("PATCH", True): "update",
            ("DELETE", True): "remove",
        }.get((self.method, item), self.path.rsplit("/", 1)[-1])


def add_endpoints(app: web.Application, endpoints: Sequence[Endpoint]) -> None:
    app.router.add_routes([web.route(e.method, e.path, e.handler) for e in endpoints])


def _params(path: str) -> list[Schema]:
    return [
        {"name": part[1:-1], "in": "path", "required": True, "schema": {"type": "string"}}
        for part in path.split("/")
        if part.startswith("{") and part.endswith("}")
    ]


def openapi_document(title: str, version: str, endpoints: Sequence[Endpoint]) -> Schema:
    """An OpenAPI 3.1 document describing ``endpoints``."""
    paths: dict[str, dict[str, Any]] = {}
    problem = {"$ref": "#/components/schemas/Problem"}
    for e in endpoints:
        op: Schema = {
            "summary": e.summary,
            "tags": [e.tag],
            "x-cli-action": e.cli_action(),
            "operationId": f"{e.method.lower()}_{e.path.strip('/').replace('/', '_')}".replace(
                "{", ""
            ).replace("}", ""),
            "responses": {
                str(e.status): {
                    "description": "success",
                    **(
                        {"content": {"application/json": {"schema": e.response}}}
                        if e.response is not None
                        else {}
                    ),
                },
                "default": {
                    "description": "error",
                    "content": {"application/problem+json": {"schema": problem}},
                },
            },
        }
        if not e.public:
            op["security"] = [{"token": []}, {"bearer": []}, {"basic": []}]
        else:
            op["security"] = []
        if params := _params(e.path):
            op["parameters"] = params
        if e.request is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": e.request}},
            }
        paths.setdefault(e.path, {})[e.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {
            "securitySchemes": {
                "token": {"type": "apiKey", "in": "header", "name": "X-Admin-Token"},
                "bearer": {"type": "http", "scheme": "bearer"},
                "basic": {"type": "http", "scheme": "basic"},
            },
            "schemas": {
                "Problem": {
                    "type": "object",
                    "required": ["status", "code", "detail"],
                    "properties": {
                        "type": {"type": "string"},
                        "title": {"type": "string"},
                        "status": {"type": "integer"},
                        "code": {"type": "string"},
                        "detail": {"type": "string"},
                    },
                }
            },
        },
    }
