"""dstack's pRPC-over-HTTP transport rules, for aiohttp handlers.

Upstream (``ra-rpc``/``prpc``): the method is the last path segment; the body is JSON when
the request is a GET, has a ``json`` query key, or says ``Content-Type: application/json``,
and protobuf otherwise. This shim speaks JSON only: a protobuf request gets HTTP 415 with a
message saying how to send JSON instead. Byte fields are lowercase hex (``0x`` accepted on
input); missing fields take defaults and unknown fields are ignored; an ``Empty`` response
is the body ``null``; errors are HTTP 400 ``{"error": "..."}`` (pretty-printed, as upstream).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from gateway.util.bodies import BodyTooLarge, read_bounded

__all__ = [
    "MAX_BODY",
    "Args",
    "Method",
    "RpcError",
    "dispatch",
    "error_response",
    "get_bool",
    "get_bytes",
    "get_int",
    "get_str",
    "get_str_list",
    "read_args",
    "wants_json",
]

MAX_BODY = 1024 * 1024
Args = Mapping[str, Any]
Method = Callable[[Args], Awaitable[Any]]


class RpcError(Exception):
    """A request the method refuses; rendered as ``{"error": message}`` with ``status``."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def wants_json(request: web.Request) -> bool:
    """Upstream's rule for choosing JSON over protobuf."""
    return (
        request.method == "GET"
        or "json" in request.query
        or request.content_type == "application/json"
    )


async def read_args(request: web.Request) -> dict[str, Any]:
    """The request's arguments as a dict (query string for GET, JSON body otherwise)."""
    if request.method == "GET":
        return {k: v for k, v in request.query.items() if k != "json"}
    if not wants_json(request):
        raise RpcError(
            "protobuf requests are not supported by this guest agent: send JSON with "
            "'Content-Type: application/json' or add '?json' to the URL",
            status=415,
        )
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise RpcError(f"request body is larger than {MAX_BODY} bytes", status=413)
    try:
        body = await read_bounded(request.content, MAX_BODY)
    except BodyTooLarge:
        raise RpcError(f"request body is larger than {MAX_BODY} bytes", status=413) from None
    if not body.strip():
        return {}
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise RpcError(f"invalid JSON body: {exc}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise RpcError("the JSON body must be an object")
    return doc


def error_response(message: str, status: int = 400) -> web.Response:
    return web.Response(
        status=status,
        text=json.dumps({"error": message}, indent=2),
        content_type="application/json",
    )


def json_response(result: Any) -> web.Response:
    return web.Response(
        text=json.dumps(result, separators=(",", ":")), content_type="application/json"
    )


async def dispatch(
    request: web.Request, methods: Mapping[str, Method], method: str
) -> web.Response:
    """Run ``methods[method]`` with the decoded arguments; errors become JSON responses."""
    handler = methods.get(method)
    if handler is None:
        return error_response(f"Service not found: {method}")
    try:
        args = await read_args(request)
        return json_response(await handler(args))
    except RpcError as exc:
        return error_response(str(exc), exc.status)


# --- argument decoding (defaults for missing fields, type errors are 400s) ----------------


def get_str(args: Args, name: str, default: str = "") -> str:
    value = args.get(name, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise RpcError(f"{name} must be a string")
    return value


def get_bool(args: Args, name: str, default: bool = False) -> bool:
    value = args.get(name, default)
    if value is None:
        return default
    if isinstance(value, str) and value in ("true", "false"):  # GET query strings
        return value == "true"
    if not isinstance(value, bool):
        raise RpcError(f"{name} must be a boolean")
    return value


def get_int(args: Args, name: str) -> int | None:
    value = args.get(name)
    if value is None:
        return None
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**64:
        raise RpcError(f"{name} must be an unsigned 64-bit integer")
    return value


def get_bytes(args: Args, name: str, max_len: int = MAX_BODY) -> bytes:
    text = get_str(args, name)
    text = text.removeprefix("0x")
    try:
        out = bytes.fromhex(text)
    except ValueError:
        raise RpcError(f"{name} must be hex") from None
    if len(out) > max_len:
        raise RpcError(f"{name} is longer than {max_len} bytes")
    return out


def get_str_list(args: Args, name: str) -> tuple[str, ...]:
    value = args.get(name) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RpcError(f"{name} must be a list of strings")
    return tuple(value)
