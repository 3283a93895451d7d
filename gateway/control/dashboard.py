"""The operator dashboard: one HTML page on the admin listener, behind the same auth.

The page is static; its script polls ``/api/v1/status`` (same origin, so the browser reuses
the credentials it already sent for the page) and renders whatever sections the status
document has: ``node``, ``counters``, ``apps`` (with their open connections),
``instances`` (with their app's connections) and ``domains``. Rendering uses
``textContent`` only, so nothing from the status (app ids, domains) can inject markup.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

from gateway.control.routes import Endpoint

_PAGE = (resources.files("gateway.control") / "static" / "dashboard.html").read_text("utf-8")


async def _dashboard(_: web.Request) -> web.Response:
    return web.Response(
        text=_PAGE,
        content_type="text/html",
        headers={
            "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
            "style-src 'unsafe-inline'; connect-src 'self'",
            "X-Frame-Options": "DENY",
            "Cache-Control": "no-store",
        },
    )


DASHBOARD = Endpoint(
    "GET", "/", _dashboard, "The operator dashboard (HTML)", "dashboard", action="open"
)
