"""The ACME account and certbot settings (``/api/v1/acme/...``), upstream's admin RPCs.

=====================================  =========================================================
``POST /api/v1/acme/caa``              ``SetCaa``: pin ``caa_issuer`` and our account URI in CAA
                                       (``issue`` + ``issuewild``) on every base domain now
``POST /api/v1/acme/rotate-credentials``  ``RotateAcmeCredentials``: a new account under a new
                                       key (``{"key_change": true}``: the same account rolled
                                       to a new key by RFC 8555 keyChange), CAA re-pinned when
                                       ``caa`` is on, the account re-quoted, ``/acme-info``
                                       republished
``GET/PUT /api/v1/acme/config``        ``Get/SetCertbotConfig``: the renewal schedule and CA,
                                       persisted and applied without a restart (``If-Match``)
=====================================  =========================================================

Upstream-named aliases answer at ``/prpc/<Method>`` (GET or POST) with upstream's field
names: ``AcmeInfo``, ``SetCaa``, ``RotateAcmeCredentials`` (``{account_uri,
domains_updated}``), ``GetCertbotConfig`` and ``SetCertbotConfig`` (``renew_interval_secs``,
``renew_before_expiration_secs``, ``renew_timeout_secs``, ``acme_url``). Failures at the CA
or the DNS provider answer 502 with their reason; without ``[acme] enabled``, 409.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from gateway.certs.errors import CertError
from gateway.control.admin import json_response, read_json
from gateway.control.certmanager import (
    RUNTIME_FIELDS,
    AcmeDisabled,
    CertManager,
    NotConfigured,
)
from gateway.control.errors import ApiError
from gateway.control.gateway_info import upstream_acme_info
from gateway.control.resources.common import (
    BOOL,
    INT,
    NUM,
    STR,
    array,
    guarded,
    if_match,
    obj,
    with_etag,
)
from gateway.control.routes import Endpoint

__all__ = ["acme_endpoints"]

ACCOUNT_RESULT = obj({"account_uri": STR, "domains_updated": array(STR)})
_TYPES = {str: STR, float: NUM, bool: BOOL}
CONFIG_FIELDS = {name: _TYPES[kind] for name, kind in RUNTIME_FIELDS.items()}
CONFIG = obj(
    {**CONFIG_FIELDS, "enabled": BOOL, "overrides": array(STR), "revision": INT},
    tuple(CONFIG_FIELDS),
)
CONFIG_CHANGE = obj({k: {"type": [v["type"], "null"]} for k, v in CONFIG_FIELDS.items()})
ROTATE_REQUEST = obj({"key_change": BOOL})
#: upstream's GlobalCertbotConfig names -> ours
UPSTREAM_CONFIG = {
    "renew_interval_secs": "check_interval",
    "renew_before_expiration_secs": "renew_before",
    "renew_timeout_secs": "issue_timeout",
    "acme_url": "directory_url",
}


async def _body(request: web.Request, allowed: set[str]) -> dict[str, Any]:
    body: Any = await read_json(request) if request.can_read_body else {}
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_field", "body: expected a JSON object", field="body")
    unknown = set(body) - allowed
    if unknown:
        name = sorted(unknown)[0]
        raise ApiError(
            400,
            "invalid_field",
            f"{name}: unknown field; known: {', '.join(sorted(allowed))}",
            field=name,
        )
    return body


async def _acme_call(call: Callable[[], Awaitable[Any]]) -> Any:
    """Map the certificate manager's errors to problem documents."""
    try:
        return await call()
    except AcmeDisabled as exc:
        raise ApiError(409, "acme_disabled", f"{exc}; enable [acme] first") from None
    except NotConfigured as exc:
        raise ApiError(409, "not_configured", str(exc)) from None
    except CertError as exc:
        raise ApiError(502, "acme_failed", str(exc)) from None


def acme_endpoints(certs: CertManager) -> list[Endpoint]:
    async def caa(request: web.Request) -> web.Response:
        await _body(request, set())
        uri, domains = await _acme_call(certs.publish_caa)
        return json_response({"account_uri": uri, "domains_updated": domains})

    async def rotate(request: web.Request) -> web.Response:
        body = await _body(request, {"key_change"})
        key_change = body.get("key_change", False)
        if not isinstance(key_change, bool):
            raise ApiError(
                400, "invalid_field", "key_change: expected true or false", field="key_change"
            )
        uri, domains = await _acme_call(lambda: certs.rotate_account(key_change=key_change))
        return json_response({"account_uri": uri, "domains_updated": domains})

    async def get_config(_: web.Request) -> web.Response:
        doc = certs.config()
        return with_etag(doc, doc["revision"])

    async def put_config(request: web.Request) -> web.Response:
        body = await _body(request, set(RUNTIME_FIELDS))
        await certs.set_config(body, if_match(request))
        doc = certs.config()
        return with_etag(doc, doc["revision"])

    # --- upstream-named aliases ------------------------------------------------------------

    async def prpc_acme_info(_: web.Request) -> web.Response:
        return json_response(upstream_acme_info(certs.acme_info()))

    async def prpc_set_caa(request: web.Request) -> web.Response:
        await _acme_call(certs.publish_caa)
        return json_response({})

    async def prpc_rotate(request: web.Request) -> web.Response:
        uri, domains = await _acme_call(certs.rotate_account)
        return json_response({"account_uri": uri, "domains_updated": domains})

    async def prpc_get_config(_: web.Request) -> web.Response:
        doc = certs.config()
        return json_response(
            {
                name: int(doc[ours]) if name.endswith("_secs") else doc[ours]
                for name, ours in UPSTREAM_CONFIG.items()
            }
        )

    async def prpc_set_config(request: web.Request) -> web.Response:
        body = await _body(request, set(UPSTREAM_CONFIG))
        await certs.set_config({UPSTREAM_CONFIG[k]: v for k, v in body.items()})
        return json_response({})

    tag, base = "acme", "/api/v1/acme"
    out = [
        Endpoint(
            "POST",
            base + "/caa",
            guarded(caa),
            "Publish CAA records pinning the CA and our account on every base domain now",
            tag,
            request=obj({}),
            response=ACCOUNT_RESULT,
            action="caa",
            extra_statuses=(409, 502),
        ),
        Endpoint(
            "POST",
            base + "/rotate-credentials",
            guarded(rotate),
            "New ACME account key (new account; key_change: same account, new key)",
            tag,
            request=ROTATE_REQUEST,
            response=ACCOUNT_RESULT,
            action="rotate-credentials",
            extra_statuses=(409, 502),
        ),
        Endpoint(
            "GET",
            base + "/config",
            guarded(get_config),
            "Renewal schedule and CA in force (runtime overrides listed)",
            tag,
            response=CONFIG,
            action="config",
        ),
        Endpoint(
            "PUT",
            base + "/config",
            guarded(put_config),
            "Change the renewal schedule or CA at runtime (null: back to the file's value)",
            tag,
            request=CONFIG_CHANGE,
            response=CONFIG,
            action="set-config",
            extra_statuses=(400, 412),
        ),
    ]
    upstream_config = obj({"renew_interval_secs": INT, "renew_before_expiration_secs": INT,
                           "renew_timeout_secs": INT, "acme_url": STR})  # fmt: skip
    for name, handler, summary, schema in (
        ("AcmeInfo", prpc_acme_info, "Upstream AcmeInfo", obj({}, extra=True)),
        ("SetCaa", prpc_set_caa, "Upstream SetCaa", obj({})),
        ("RotateAcmeCredentials", prpc_rotate, "Upstream RotateAcmeCredentials", ACCOUNT_RESULT),
        ("GetCertbotConfig", prpc_get_config, "Upstream GetCertbotConfig", upstream_config),
        ("SetCertbotConfig", prpc_set_config, "Upstream SetCertbotConfig", obj({})),
    ):
        for method in ("GET", "POST"):
            if name.startswith(("Set", "Rotate")) and method == "GET":
                continue  # changes: POST only
            out.append(
                Endpoint(
                    method,
                    f"/prpc/{name}",
                    guarded(handler),
                    summary,
                    "prpc",
                    response=schema,
                    action=name if method == "POST" else f"{name}-get",
                )
            )
    return out
