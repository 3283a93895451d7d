"""What every resource module shares: error mapping, ``If-Match``/ETag, schema fragments."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from gateway.control.admin import json_response
from gateway.control.errors import ApiError
from gateway.control.models import (
    Exists,
    FieldError,
    InUse,
    NotFound,
    ReadOnly,
    RevisionMismatch,
    StateError,
)

Schema = dict[str, Any]
_ETAG = re.compile(r'^(?:W/)?"(\d{1,19})"$')


def api_error(exc: StateError) -> ApiError:
    """The problem document for a state error (400/404/409/412)."""
    if isinstance(exc, FieldError):
        return ApiError(400, "invalid_field", str(exc), field=exc.field)
    if isinstance(exc, NotFound):
        return ApiError(404, "not_found", str(exc))
    if isinstance(exc, Exists):
        return ApiError(409, "exists", f"{exc}; use PUT to change it")
    if isinstance(exc, InUse):
        return ApiError(409, "in_use", str(exc))
    if isinstance(exc, ReadOnly):
        return ApiError(409, "read_only", f"{exc}; edit the file and restart to change it")
    if isinstance(exc, RevisionMismatch):
        return ApiError(
            412, "revision_mismatch", f"{exc}; re-read the item (ETag) and send its revision"
        )
    return ApiError(400, "invalid", str(exc))


def guarded(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Turn :class:`StateError` raised by ``handler`` into problem documents."""

    async def wrapper(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except StateError as exc:
            raise api_error(exc) from None

    wrapper.__name__ = getattr(handler, "__name__", "handler")
    wrapper.__doc__ = handler.__doc__
    return wrapper


def if_match(request: web.Request) -> int | None:
    """The revision ``If-Match`` asks for (None: unconditional; ``*`` too)."""
    raw = request.headers.get("If-Match")
    if raw is None or raw.strip() == "*":
        return None
    m = _ETAG.match(raw.strip())
    if m is None:
        raise ApiError(400, "invalid_if_match", 'If-Match must be one ETag, e.g. "12" (from a GET)')
    return int(m.group(1))


def with_etag(data: Any, revision: int, status: int = 200) -> web.Response:
    resp = json_response(data, status)
    if revision:
        resp.headers["ETag"] = f'"{revision}"'
    return resp


def deleted(what: str, ident: str) -> web.Response:
    return json_response({"deleted": what, "id": ident})


def obj(properties: Schema, required: tuple[str, ...] = (), extra: bool = False) -> Schema:
    out: Schema = {"type": "object", "properties": properties, "additionalProperties": extra}
    if required:
        out["required"] = list(required)
    return out


def array(items: Schema) -> Schema:
    return {"type": "array", "items": items}


STR: Schema = {"type": "string"}
INT: Schema = {"type": "integer"}
NUM: Schema = {"type": "number"}
BOOL: Schema = {"type": "boolean"}
PORT: Schema = {"type": "integer", "minimum": 1, "maximum": 65535}
NULLABLE_NUM: Schema = {"type": ["number", "null"]}
DELETED = obj({"deleted": STR, "id": STR}, ("deleted", "id"))
PORT_POLICY = obj(
    {
        "ports": array(obj({"port": PORT, "pp": BOOL}, ("port",))),
        "restrict_mode": BOOL,
    }
)
