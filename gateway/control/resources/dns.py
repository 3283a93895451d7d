"""DNS credentials (``/api/v1/dns-credentials``): what publishes ACME DNS-01 challenges.

A credential created here carries its secret (the TSIG secret or the Cloudflare API token) in
the request; it is stored and never returned: responses show it as ``abcd...wxyz``. Updating
without the secret keeps the stored one. Credentials from the configuration file are listed
with where their secret is read (``env:NAME`` / ``file:PATH``), read-only. A credential used
by a base domain cannot be deleted (409).
"""

from __future__ import annotations

from aiohttp import web

from gateway.control.admin import json_response, read_json
from gateway.control.models import StoredCredential
from gateway.control.resources.common import (
    DELETED,
    INT,
    NUM,
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

KIND = {"enum": ["rfc2136", "cloudflare"]}
ALGORITHM = {"enum": ["hmac-sha256", "hmac-sha384", "hmac-sha512"]}
_FIELDS = {
    "kind": KIND,
    "server": STR,
    "port": PORT,
    "zone": STR,
    "tsig_key_name": STR,
    "tsig_algorithm": ALGORITHM,
    "api_url": STR,
    "ttl": {"type": "integer", "minimum": 1, "maximum": 86400},
    "check_port": PORT,
    "check_servers": array(STR),
}
CREDENTIAL = obj(
    {
        "id": STR,
        **_FIELDS,
        "tsig_secret": {"type": "string", "description": "redacted"},
        "api_token": {"type": "string", "description": "redacted"},
        "source": {"enum": ["config", "admin"]},
        "created_at": NUM,
        "updated_at": NUM,
        "revision": INT,
    },
    ("id", "kind", "source"),
)
CREATE = obj(
    {
        "id": STR,
        **_FIELDS,
        "tsig_secret": {"type": "string", "description": "base64 TSIG secret (rfc2136)"},
        "api_token": {"type": "string", "description": "API token (cloudflare)"},
    },
    ("id", "kind"),
)
UPDATE = obj({k: v for k, v in CREATE["properties"].items() if k != "id"})


def dns_endpoints(state: OperatorState) -> list[Endpoint]:
    async def list_creds(_: web.Request) -> web.Response:
        return json_response(state.credentials_json())

    async def get_cred(request: web.Request) -> web.Response:
        data = state.credential_json(request.match_info["id"])
        return with_etag(data, int(data.get("revision", 0)))

    async def add_cred(request: web.Request) -> web.Response:
        cred = StoredCredential.from_json(await read_json(request))
        saved = state.put_credential(cred, create=True)
        return with_etag(saved.to_json(), saved.revision, 201)

    async def update_cred(request: web.Request) -> web.Response:
        expect = if_match(request)
        cred_id = request.match_info["id"]
        body = await read_json(request)
        previous = state.credential(cred_id)
        cred = StoredCredential.from_json(body, cred_id=cred_id, previous=previous)
        saved = state.put_credential(
            cred, create=False, expect=expect if expect is not None else previous.revision
        )
        return with_etag(saved.to_json(), saved.revision)

    async def remove_cred(request: web.Request) -> web.Response:
        cred_id = request.match_info["id"]
        state.delete_credential(cred_id, if_match(request))
        return deleted("dns_credential", cred_id)

    base, item = "/api/v1/dns-credentials", "/api/v1/dns-credentials/{id}"
    tag = "dns-credentials"
    return [
        Endpoint(
            "GET",
            base,
            guarded(list_creds),
            "List DNS credentials (secrets redacted)",
            tag,
            response=array(CREDENTIAL),
        ),
        Endpoint(
            "POST",
            base,
            guarded(add_cred),
            "Add a DNS credential",
            tag,
            request=CREATE,
            response=CREDENTIAL,
            status=201,
        ),
        Endpoint(
            "GET",
            item,
            guarded(get_cred),
            "One DNS credential (secret redacted)",
            tag,
            response=CREDENTIAL,
        ),
        Endpoint(
            "PUT",
            item,
            guarded(update_cred),
            "Change a DNS credential (omit the secret to keep it)",
            tag,
            request=UPDATE,
            response=CREDENTIAL,
        ),
        Endpoint(
            "DELETE",
            item,
            guarded(remove_cred),
            "Remove an unused DNS credential",
            tag,
            response=DELETED,
        ),
    ]
