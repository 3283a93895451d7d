"""The gateway's own HTTPS endpoints on the proxy port (``gateway.<base>``), as in upstream.

=========================  =================================================================
``GET /health``            200, empty
``GET /index``             ``{"type":"dstack gateway","paths":["/index","/app-info","/acme-info"]}``
``GET /app-info``          the gateway CVM's own app info (JSON), 503 until one is provided
``GET /acme-info``         ACME account and quoted certificate keys (JSON), 503 until provided
other methods              405
other paths                404
=========================  =================================================================

``/.dstack/<name>`` is accepted for each of the three JSON paths. The legacy ``health.<base>``
name answers ``GET /`` with 200 and everything else with 404. One request per connection
(``Connection: close``); this is a pure function over the request head, tested by tables.
The documents come from the control plane through :mod:`gateway.proxy.info_file`; a 503
says why one is missing (e.g. no TEE backend for ``app-info``) when the control plane said.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

__all__ = ["GatewayInfo", "MAX_HEAD", "respond"]

MAX_HEAD = 8192

INDEX = {"type": "dstack gateway", "paths": ["/index", "/app-info", "/acme-info"]}


@dataclass(frozen=True, slots=True)
class GatewayInfo:
    """JSON documents the control plane provides (``app-info``, ``acme-info``), as bytes,
    and for a missing one, why (``unavailable``: shown in its 503)."""

    documents: Mapping[str, bytes] = field(default_factory=lambda: MappingProxyType({}))
    unavailable: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


def _response(status: int, body: bytes = b"", ctype: str = "application/json") -> bytes:
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n"
    )
    if body:
        head += f"Content-Type: {ctype}\r\n"
    return head.encode("ascii") + b"\r\n" + body


def _error(status: int, message: str) -> bytes:
    return _response(status, json.dumps({"error": message}).encode())


def respond(head: bytes, info: GatewayInfo, legacy_health: bool = False) -> bytes | None:
    """The full response for a request head, or ``None`` if the head is still incomplete."""
    end = head.find(b"\r\n\r\n")
    if end < 0:
        if len(head) >= MAX_HEAD:
            return _error(431, "request head too large")
        return None
    line = head[: head.find(b"\r\n")].decode("latin-1")
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return _error(400, "malformed request line")
    method, target, _ = parts
    path = target.split("?", 1)[0]
    if legacy_health:
        if method == "GET" and path == "/":
            return _response(200)
        return _error(404, "not found")
    if path.startswith("/.dstack/"):
        path = "/" + path[len("/.dstack/") :]
    if path not in ("/health", "/index", "/app-info", "/acme-info"):
        return _error(404, f"no such endpoint {path!r}")
    if method != "GET":
        return _error(405, "only GET is allowed")
    if path == "/health":
        return _response(200)
    if path == "/index":
        return _response(200, json.dumps(INDEX, separators=(",", ":")).encode())
    name = path[1:]
    doc = info.documents.get(name)
    if doc is None:
        why = info.unavailable.get(name) or "the control plane has not published it (yet)"
        return _error(503, f"{name} is not available on this gateway: {why}")
    return _response(200, doc)
