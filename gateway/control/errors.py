"""API errors as RFC 9457 problem documents (``application/problem+json``).

Handlers raise :class:`ApiError`; one middleware renders it. Unexpected exceptions become a
500 problem whose detail says nothing about internals (the log has the traceback).
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

logger = logging.getLogger(__name__)
access = logging.getLogger("gateway.admin.access")
_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
REQUEST_ID = web.RequestKey("request_id", str)

PROBLEM_TYPE = "application/problem+json"


class ApiError(Exception):
    """A client-visible error: HTTP ``status``, a stable machine ``code``, a human ``detail``."""

    def __init__(self, status: int, code: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.extra = extra


def problem_response(
    status: int, code: str, detail: str, *, headers: dict[str, str] | None = None, **extra: Any
) -> web.Response:
    body = {
        "type": f"about:blank#{code}",
        "title": code.replace("_", " "),
        "status": status,
        "code": code,
        "detail": detail,
        **extra,
    }
    return web.Response(
        status=status, text=json.dumps(body), content_type=PROBLEM_TYPE, headers=headers
    )


_ids = itertools.count(1)
_PREFIX = secrets.token_hex(3)


@web.middleware
async def request_id_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Give every request an id (echoed as ``X-Request-Id``) and log one line when it ends.

    A caller-supplied id is kept only if it is short and plain, so logs cannot be forged.
    """
    supplied = request.headers.get("X-Request-Id", "")
    rid = supplied if _SAFE_ID.match(supplied) else f"{_PREFIX}-{next(_ids)}"
    request[REQUEST_ID] = rid
    start = time.monotonic()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        response.headers["X-Request-Id"] = rid
        return response
    finally:
        access.info(
            "%s %s %s %.1fms",
            request.method,
            request.path,
            status,
            (time.monotonic() - start) * 1000,
            extra={"request_id": rid, "remote": request.remote or "unix"},
        )


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return problem_response(exc.status, exc.code, exc.detail, **exc.extra)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_")
        return problem_response(exc.status, code, exc.text or exc.reason)
    except Exception:
        logger.exception(
            "admin API: unhandled error on %s %s (request %s)",
            request.method,
            request.path,
            request.get(REQUEST_ID, "-"),
        )
        return problem_response(500, "internal_error", "internal error; see the gateway log")
