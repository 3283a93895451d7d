"""The OpenAPI document as a contract the real server keeps, request side.

``test_resources`` checks that every answer matches its documented response schema and that
the document lists exactly the served routes, both true by construction of the route table.
Here each documented request body is exercised against the running server: an example
that the document's schema accepts must be accepted (2xx), and bodies derived from the
schema to break it (wrong type for each property, each required property dropped, an
unknown property where none is allowed, out-of-range numbers, values outside an enum or a
pattern, not an object at all) must be refused with a 400 problem document. A request
schema without an example here fails the test, so a new endpoint cannot skip the contract.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

from tests.control.schema_check import errors
from tests.control.test_resources import Admin, admin  # noqa: F401  (the server fixture)

APP = "c3" * 20
# (method, documented path) -> (concrete path, a valid example body, accepted statuses).
# Ordered: later operations use what earlier ones created.
EXAMPLES: dict[tuple[str, str], tuple[str, dict[str, Any], tuple[int, ...]]] = {
    ("POST", "/api/v1/dns-credentials"): (
        "/api/v1/dns-credentials",
        {"id": "oa-cred", "kind": "cloudflare", "api_token": "cf-" + "9" * 30},
        (201,),
    ),
    ("PUT", "/api/v1/dns-credentials/{id}"): (
        "/api/v1/dns-credentials/oa-cred",
        {"kind": "cloudflare", "api_token": "cf-" + "8" * 30, "ttl": 90},
        (200,),
    ),
    ("POST", "/api/v1/domains"): (
        "/api/v1/domains",
        {"domain": "oa.test", "dns_credential": "oa-cred", "port": 443},
        (201,),
    ),
    ("PUT", "/api/v1/domains/{domain}"): (
        "/api/v1/domains/oa.test",
        {"dns_credential": "oa-cred", "port": 8443},
        (200,),
    ),
    # ACME is off in this fixture: a valid body reaches the certbot check (409), not 400
    ("POST", "/api/v1/certificates/{domain}/renew"): (
        "/api/v1/certificates/oa.test/renew",
        {"force": True},
        (409,),
    ),
    ("POST", "/api/v1/custom-domains"): (
        "/api/v1/custom-domains",
        {"domain": "shop.oa-example.org", "app_id": APP, "port": 443},
        (201,),
    ),
    ("PUT", "/api/v1/custom-domains/{domain}"): (
        "/api/v1/custom-domains/shop.oa-example.org",
        {"app_id": APP, "port": 8080},
        (200,),
    ),
    ("PUT", "/api/v1/instances/{instance_id}/port-policy"): (
        "/api/v1/instances/oa-inst/port-policy",
        {"ports": [{"port": 80, "pp": False}, {"port": 443, "pp": True}], "restrict_mode": True},
        (200,),
    ),
    ("PUT", "/api/v1/acme/config"): (  # stored even with ACME off; applied when it is on
        "/api/v1/acme/config",
        {"renew_before": 86400.0, "jitter": None, "caa": True, "caa_issuer": "pebble.test"},
        (200,),
    ),
    # ACME is off here: valid bodies reach the "ACME disabled" check (409)
    ("POST", "/api/v1/acme/rotate-credentials"): (
        "/api/v1/acme/rotate-credentials",
        {"key_change": True},
        (409,),
    ),
    ("POST", "/api/v1/acme/caa"): ("/api/v1/acme/caa", {}, (409,)),
    ("PUT", "/api/v1/admission-policy"): (
        "/api/v1/admission-policy",
        {"allow_any_app": False, "app_ids": [APP], "allowed_tcb_statuses": ["UpToDate"]},
        (200,),
    ),
}


def _wrong(schema: dict[str, Any]) -> Iterator[Any]:
    """Values that break ``schema`` (a property's schema)."""
    kinds = schema.get("type")
    names = kinds if isinstance(kinds, list) else [kinds] if kinds else []
    if "enum" in schema:
        yield "not-one-of-the-enum"
    if names and "string" not in names:
        yield "a-string"
    if names and not {"integer", "number"} & set(names):
        yield 12345
    if names and "boolean" not in names:
        yield True  # a bool is an int to Python: the classic hole in hand-written checks
    if "minimum" in schema:
        yield schema["minimum"] - 1
    if "maximum" in schema:
        yield schema["maximum"] + 1
    if "pattern" in schema:
        yield "!! not matching !!"
    if "array" in names and isinstance(schema.get("items"), dict):
        for bad in _wrong(schema["items"]):
            yield [bad]


def invalid_bodies(schema: dict[str, Any], valid: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """(what is wrong, body) pairs derived from ``schema`` and a valid example."""
    yield "not an object", [valid]
    for name in schema.get("required", []):
        body = {k: v for k, v in valid.items() if k != name}
        yield f"missing {name}", body
    for name, prop in schema.get("properties", {}).items():
        for bad in _wrong(prop):
            body = copy.deepcopy(valid)
            body[name] = bad
            yield f"{name}={bad!r}", body
        items = prop.get("items", {})
        sample = valid.get(name)
        if items.get("type") == "object" and isinstance(sample, list) and sample:
            for what, bad_item in invalid_bodies(items, sample[0]):  # one level down
                body = copy.deepcopy(valid)
                body[name] = [bad_item, *sample[1:]]
                yield f"{name}[0]: {what}", body
    if schema.get("additionalProperties") is False:
        yield "unknown property", {**valid, "no_such_field": 1}


def test_every_request_schema_is_enforced_by_the_server(admin: Admin) -> None:  # noqa: F811
    admin.register("oa-inst", APP)
    doc = admin.client.get("/api/v1/openapi.json").json()
    documented = [
        (method.upper(), path, op["requestBody"]["content"]["application/json"]["schema"])
        for path, ops in doc["paths"].items()
        for method, op in ops.items()
        if "requestBody" in op
    ]
    assert {(m, p) for m, p, _ in documented} == set(EXAMPLES), "a request body lacks an example"
    schemas = {(m, p): s for m, p, s in documented}
    checked = 0
    for key, (path, example, accepted) in EXAMPLES.items():
        schema = schemas[key]
        assert errors(schema, example) == [], (key, errors(schema, example))
        for what, body in invalid_bodies(schema, example):
            assert errors(schema, body), f"{key} {what}: the derived body is not invalid"
            r = admin.client.request(key[0], path, json=body)
            assert r.status_code == 400, f"{key} {what}: {r.status_code} {r.text}"
            assert r.headers["content-type"].startswith("application/problem+json")
            checked += 1
        r = admin.client.request(key[0], path, json=example)
        assert r.status_code in accepted, f"{key} example: {r.status_code} {r.text}"
        if r.status_code >= 400:
            assert r.json()["code"] != "invalid_field"
    assert checked > 40
    # the examples took effect (and the refused bodies did not change anything)
    assert admin.client.get("/api/v1/domains/oa.test").json()["port"] == 8443
    route = admin.client.get("/api/v1/custom-domains/shop.oa-example.org").json()
    assert route["port"] == 8080
    policy = admin.client.get("/api/v1/instances/oa-inst/port-policy").json()
    assert policy["source"] == "admin" and len(policy["admin_override"]["ports"]) == 2
    assert admin.client.get("/api/v1/admission-policy").json()["policy"]["app_ids"] == [APP]
    for (method, _), (path, _, _) in EXAMPLES.items():  # and a body that is not JSON at all
        r = admin.client.request(
            method, path, content=b"{not json", headers={"Content-Type": "application/json"}
        )
        assert r.status_code == 400 and r.json()["code"] == "invalid_json", (path, r.text)
