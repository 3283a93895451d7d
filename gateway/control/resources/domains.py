"""Base domains (``/api/v1/domains``): add, update, remove; each with its certificate status.

Upstream's ZT domains (``AddZtDomain`` ...): a base domain names the DNS credential that can
publish its ACME challenges and the public port apps are reached on. Domains from the
configuration file are listed read-only. A change reaches the certbot at once (it issues for
a new domain without waiting for the next check).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from gateway.control.admin import json_response, read_json
from gateway.control.models import BaseDomain
from gateway.control.resources.common import (
    BOOL,
    DELETED,
    INT,
    NULLABLE_NUM,
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

CertStatus = Callable[[str], dict[str, Any]]

CERT_STATUS = obj(
    {
        "domain": STR,
        "has_cert": BOOL,
        "serial": {"type": ["string", "null"]},
        "names": array(STR),
        "not_before": NULLABLE_NUM,
        "not_after": NULLABLE_NUM,
        "acme": BOOL,
        "next_check": NULLABLE_NUM,
        "failures": INT,
        "last_error": {"type": ["string", "null"]},
    },
    extra=True,
)
DOMAIN = obj(
    {
        "domain": STR,
        "dns_credential": STR,
        "port": PORT,
        "source": {"enum": ["config", "admin"]},
        "revision": INT,
        "certificate": CERT_STATUS,
    },
    ("domain", "dns_credential", "port", "source"),
)
CREATE = obj({"domain": STR, "dns_credential": STR, "port": PORT}, ("domain", "dns_credential"))
UPDATE = obj({"dns_credential": STR, "port": PORT}, ("dns_credential",))


def domain_endpoints(state: OperatorState, cert_status: CertStatus) -> list[Endpoint]:
    """``cert_status(domain)`` is the certificate manager's status for one domain."""

    def render(d: BaseDomain) -> dict[str, Any]:
        return {**d.to_json(), "certificate": cert_status(d.domain)}

    async def list_domains(_: web.Request) -> web.Response:
        return json_response([render(d) for d in state.domains()])

    async def get_domain(request: web.Request) -> web.Response:
        d = state.domain(request.match_info["domain"])
        return with_etag(render(d), d.revision)

    async def add_domain(request: web.Request) -> web.Response:
        d = state.put_domain(BaseDomain.from_json(await read_json(request)), create=True)
        return with_etag(render(d), d.revision, 201)

    async def update_domain(request: web.Request) -> web.Response:
        expect = if_match(request)
        body = BaseDomain.from_json(await read_json(request), request.match_info["domain"])
        d = state.put_domain(body, create=False, expect=expect)
        return with_etag(render(d), d.revision)

    async def remove_domain(request: web.Request) -> web.Response:
        name = request.match_info["domain"]
        state.delete_domain(name, if_match(request))
        return deleted("domain", name)

    base, item = "/api/v1/domains", "/api/v1/domains/{domain}"
    return [
        Endpoint(
            "GET",
            base,
            guarded(list_domains),
            "List base domains",
            "domains",
            response={"type": "array", "items": DOMAIN},
        ),
        Endpoint(
            "POST",
            base,
            guarded(add_domain),
            "Add a base domain",
            "domains",
            request=CREATE,
            response=DOMAIN,
            status=201,
        ),
        Endpoint("GET", item, guarded(get_domain), "One base domain", "domains", response=DOMAIN),
        Endpoint(
            "PUT",
            item,
            guarded(update_domain),
            "Change a base domain's credential/port",
            "domains",
            request=UPDATE,
            response=DOMAIN,
        ),
        Endpoint(
            "DELETE",
            item,
            guarded(remove_domain),
            "Remove a base domain (its certificates stay on disk)",
            "domains",
            response=DELETED,
        ),
    ]
