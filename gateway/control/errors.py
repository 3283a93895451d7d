"""API errors as RFC 9457 problem documents (``application/problem+json``).

Handlers raise :class:`ApiError`; one middleware renders it. Unexpected exceptions become a
500 problem whose detail says nothing about internals (the log has the traceback).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

logger = logging.getLogger(__name__)

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
        logger.exception("admin API: unhandled error on %s %s", request.method, request.path)
        return problem_response(500, "internal_error", "internal error; see the gateway log")
