"""Certificates (``/api/v1/certificates``) and the ACME account (``/api/v1/acme``).

Status reads what is served from the certificates directory (``gateway.certs.disk``) and
the certbot's renewal state. ``POST .../renew`` with ``{"force": true}`` really re-issues
(a new key and serial from the CA) even if the certificate is far from expiry; with
``force: false`` it issues only when due (upstream's ``RenewCert`` always behaved like this,
whatever its comment said). A failed issuance keeps the served certificate and answers 502
with the CA's or DNS provider's reason.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.certs.errors import CertError
from gateway.control.admin import json_response, read_json
from gateway.control.certmanager import AcmeDisabled, CertManager, UnknownDomain
from gateway.control.errors import ApiError
from gateway.control.models import parse_domain
from gateway.control.resources.common import (
    BOOL,
    NULLABLE_NUM,
    NUM,
    STR,
    array,
    guarded,
    obj,
)
from gateway.control.resources.domains import CERT_STATUS
from gateway.control.routes import Endpoint

RENEW_REQUEST = obj({"force": BOOL})
RENEW_RESULT = obj(
    {
        "domain": STR,
        "renewed": BOOL,
        "serial": {"type": ["string", "null"]},
        "not_after": NULLABLE_NUM,
    },
    ("domain", "renewed"),
)
HISTORY = obj(
    {
        "serial": STR,
        "not_before": NUM,
        "not_after": NUM,
        "names": array(STR),
        "current": BOOL,
        "directory": STR,
    },
    ("serial", "not_before", "not_after", "current"),
)
ACME = obj(
    {
        "enabled": BOOL,
        "directory_url": {"type": ["string", "null"]},
        "account_uri": STR,
        "quoted_hist_keys": array(obj({}, extra=True)),
        "account_quote": STR,
        "account_attestation": STR,
    },
    ("enabled",),
    extra=True,
)


def certificate_endpoints(certs: CertManager) -> list[Endpoint]:
    def known(raw: str) -> str:
        domain = parse_domain(raw)
        if domain not in {d.domain for d in certs.state.domains()}:
            raise ApiError(404, "not_found", f"{domain} is not a base domain")
        return domain

    async def list_certs(_: web.Request) -> web.Response:
        return json_response([certs.status(d.domain) for d in certs.state.domains()])

    async def get_cert(request: web.Request) -> web.Response:
        return json_response(certs.status(known(request.match_info["domain"])))

    async def renew(request: web.Request) -> web.Response:
        domain = known(request.match_info["domain"])
        body: Any = await read_json(request) if request.can_read_body else {}
        if not isinstance(body, dict) or set(body) - {"force"}:
            raise ApiError(
                400, "invalid_field", 'body: expected {"force": true|false}', field="body"
            )
        force = body.get("force", False)
        if not isinstance(force, bool):
            raise ApiError(400, "invalid_field", "force: expected true or false", field="force")
        try:
            result = await certs.renew(domain, force)
        except AcmeDisabled as exc:
            raise ApiError(409, "acme_disabled", f"{exc}; enable [acme] to renew") from None
        except UnknownDomain as exc:
            raise ApiError(404, "not_found", str(exc)) from None
        except CertError as exc:
            raise ApiError(
                502, "issuance_failed", f"{domain}: {exc} (the served certificate is unchanged)"
            ) from None
        return json_response(
            {
                "domain": domain,
                "renewed": result.renewed,
                "serial": f"{result.serial:x}" if result.serial is not None else None,
                "not_after": result.not_after,
            }
        )

    async def history(request: web.Request) -> web.Response:
        domain = known(request.match_info["domain"])
        served = certs.status(domain)["serial"]
        entries = certs.history(domain)
        return json_response(
            [
                {
                    "serial": f"{c.serial:x}",
                    "not_before": c.not_before,
                    "not_after": c.not_after,
                    "names": list(c.names),
                    "current": f"{c.serial:x}" == served,
                    "directory": c.path.name,
                }
                for c in reversed(entries)
            ]
        )

    async def acme(_: web.Request) -> web.Response:
        return json_response(certs.acme_info())

    base, item = "/api/v1/certificates", "/api/v1/certificates/{domain}"
    tag = "certificates"
    return [
        Endpoint(
            "GET",
            base,
            guarded(list_certs),
            "Certificate status of every base domain",
            tag,
            response=array(CERT_STATUS),
        ),
        Endpoint(
            "GET",
            item,
            guarded(get_cert),
            "Certificate status of one base domain",
            tag,
            response=CERT_STATUS,
        ),
        Endpoint(
            "POST",
            item + "/renew",
            guarded(renew),
            "Renew now (force: re-issue even if not due)",
            tag,
            request=RENEW_REQUEST,
            response=RENEW_RESULT,
            action="renew",
            extra_statuses=(409, 502),
        ),
        Endpoint(
            "GET",
            item + "/history",
            guarded(history),
            "Every stored certificate, newest first",
            tag,
            response=array(HISTORY),
            action="history",
        ),
        Endpoint(
            "GET",
            "/api/v1/acme",
            guarded(acme),
            "ACME account and quoted keys",
            "acme",
            response=ACME,
            action="get",
        ),
    ]
