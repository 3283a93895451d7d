"""Every admin resource through a real aiohttp server and a real HTTP client (httpx).

One server per module (on a background loop) over a real SQLite store and registry; each
test uses its own ids so the order does not matter. Certificates are installed on disk by
hand here (ACME is off); issuance through the API runs against pebble in test_plane.py.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import logging
import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from gateway.certs import disk
from gateway.certs.settings import AcmeSettings, DnsCredential
from gateway.control.admin import ENDPOINTS_KEY
from gateway.control.auth import Credentials
from gateway.control.certmanager import CertManager
from gateway.control.models import BaseDomain, Topic
from gateway.control.plane import build_admin_app
from gateway.control.state import OperatorState
from gateway.registry.records import HandshakeObservation
from gateway.registry.service import Registration, Registry
from gateway.registry.sqlite import SqliteStore
from gateway.tunnel.keys import generate_private_key, public_key
from gateway.tunnel.settings import WgSettings
from tests.certs.test_disk import make_cert
from tests.control.schema_check import errors, operation

TOKEN = "res-token-" + "r" * 22
TSIG_SECRET = base64.b64encode(secrets.token_bytes(32)).decode()
CF_TOKEN = "cf-" + secrets.token_hex(20)


@dataclass
class Admin:
    client: httpx.Client
    app: web.Application
    store: SqliteStore
    registry: Registry
    state: OperatorState
    certs_dir: Path
    db: Path
    events: list[str] = field(default_factory=list)

    def register(self, instance_id: str, app_id: str, **kw: Any) -> None:
        self.registry.register(
            Registration(instance_id, app_id, public_key(generate_private_key()), **kw)
        )


@pytest.fixture(scope="module")
def admin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Admin]:
    tmp = tmp_path_factory.mktemp("admin")
    db = tmp / "registry.sqlite3"
    store = SqliteStore(db)
    registry = Registry(store, WgSettings().plan(), clock=time.time)
    state = OperatorState(
        store,
        config_domains={"cfg.test": BaseDomain("cfg.test", "file-cred", source="config")},
        config_credentials={"file-cred": DnsCredential(kind="cloudflare", token_env="GW_T_CF")},
    )
    certs_dir = tmp / "certs"
    certs = CertManager(
        AcmeSettings(), state=state, certs_dir=certs_dir, acme=None, on_change=lambda: None
    )
    creds = Credentials(token_digest=hashlib.sha256(TOKEN.encode()).digest())
    env = Admin(httpx.Client(), web.Application(), store, registry, state, certs_dir, db)
    for topic in Topic:
        state.subscribe(topic, functools.partial(env.events.append, topic.value))
    app = build_admin_app(
        creds=creds,
        state=state,
        registry=registry,
        certs=certs,
        node={"id": "test-node", "version": "0.1.0"},
        counters=lambda: {"open": 3, "accepted": 10, "errors": {"connect-refused": 2}},
        accel=lambda: {"ktls_mode": "off"},
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runner = web.AppRunner(app)

    async def start() -> int:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return int(runner.addresses[0][1])

    port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    env.app = app
    base_url = f"http://127.0.0.1:{port}"
    doc = httpx.get(base_url + "/api/v1/openapi.json", headers={"X-Admin-Token": TOKEN}).json()
    env.client.close()  # the placeholder from construction
    env.client = httpx.Client(
        base_url=base_url,
        headers={"X-Admin-Token": TOKEN},
        timeout=10,
        event_hooks={"response": [functools.partial(conforms, doc)]},
    )
    try:
        yield env
    finally:
        env.client.close()
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        store.close()


def conforms(doc: dict[str, Any], r: httpx.Response) -> None:
    """Every answer the tests get must match what the OpenAPI document promises."""
    r.read()
    op = operation(doc, r.request.method, r.request.url.path)
    if op is None:
        assert r.status_code in (404, 405), f"{r.request.method} {r.request.url.path} undocumented"
        return
    if r.status_code >= 400:
        assert r.headers["content-type"].startswith("application/problem+json")
        assert {"status", "code", "detail"} <= set(r.json())
        return
    declared = op["responses"].get(str(r.status_code))
    assert declared is not None, f"{r.status_code} not declared for {r.request.url.path}"
    content = declared.get("content", {}).get("application/json")
    if content is not None:
        found = errors(content["schema"], r.json())
        assert not found, f"{r.request.method} {r.request.url.path}: {found}"


def problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = r.json()
    assert body["code"] == code, body
    return body


def test_openapi_describes_exactly_the_served_routes(admin: Admin) -> None:
    doc = admin.client.get("/api/v1/openapi.json").json()
    described = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    served = {
        (r.method, r.resource.canonical)
        for r in admin.app.router.routes()
        if r.resource is not None and r.method != "HEAD"
    }
    assert described == served
    assert served == {(e.method, e.path) for e in admin.app[ENDPOINTS_KEY]}
    tags = {op["tags"][0] for ops in doc["paths"].values() for op in ops.values()}
    assert {
        "instances",
        "apps",
        "port-policy",
        "domains",
        "dns-credentials",
        "certificates",
        "custom-domains",
        "admission",
        "acme",
        "status",
        "metrics",
        "prpc",
    } <= tags
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if (
                path.startswith("/api/v1/")
                and method in ("post", "put")
                and not path.endswith(("/renew", "/drain"))
            ):
                assert "requestBody" in op, (method, path)
            if path.startswith("/api/v1/"):
                assert "content" in op["responses"][next(iter(op["responses"]))], (method, path)
    # every resource operation has its own `gateway ctl <tag> <action>` (the public probes
    # of the core's "meta" group are not resource operations)
    ops = [op for ops in doc["paths"].values() for op in ops.values() if op["tags"] != ["meta"]]
    actions = {(op["tags"][0], op["x-cli-action"]) for op in ops}
    assert len(actions) == len(ops)


def test_instances_apps_drain_and_remove(admin: Admin) -> None:
    app_id = "a1" * 20
    admin.register("inst-a1", app_id)
    admin.register(
        "inst-a2", app_id, port_policy={"ports": [{"port": 80, "pp": False}], "restrict_mode": True}
    )
    admin.store.record_handshakes(
        [HandshakeObservation("inst-a1", "local", time.time() - 5, time.time())]
    )
    rows = {i["instance_id"]: i for i in admin.client.get("/api/v1/instances").json()}
    assert rows["inst-a1"]["online"] is True and rows["inst-a2"]["online"] is False
    assert rows["inst-a2"]["port_policy_source"] == "instance"
    r = admin.client.get("/api/v1/instances/inst-a1")
    assert r.json()["handshakes"][0]["node_id"] == "local" and r.headers["etag"]
    problem(admin.client.get("/api/v1/instances/nope"), 404, "not_found")

    r = admin.client.post("/api/v1/instances/inst-a1/drain")
    assert r.json()["draining"] is True and r.json()["since"] > 0
    assert "drain" in admin.events
    assert admin.client.get("/api/v1/instances/inst-a1").json()["draining"] is True
    problem(admin.client.post("/api/v1/instances/ghost/drain"), 404, "not_found")
    apps = {a["app_id"]: a for a in admin.client.get("/api/v1/apps").json()}
    assert apps[app_id]["instances"] == 2 and apps[app_id]["online"] == 1
    assert apps[app_id]["draining"] == 1
    one = admin.client.get(f"/api/v1/apps/{app_id}").json()
    assert sorted(i["instance_id"] for i in one["instances"]) == ["inst-a1", "inst-a2"]
    problem(admin.client.get("/api/v1/apps/ffff"), 404, "not_found")
    assert admin.client.delete("/api/v1/instances/inst-a1/drain").json()["draining"] is False

    r = admin.client.delete("/api/v1/instances/inst-a2")
    assert r.json() == {"deleted": "instance", "id": "inst-a2"}
    assert admin.store.get_instance("inst-a2") is None
    problem(admin.client.delete("/api/v1/instances/inst-a2"), 404, "not_found")


def test_port_policy_overrides(admin: Admin) -> None:
    admin.register("inst-pp", "b2" * 20)
    base = "/api/v1/instances/inst-pp/port-policy"
    r = admin.client.get(base).json()
    assert r == {
        "instance_id": "inst-pp",
        "effective": None,
        "source": "none",
        "instance_reported": None,
        "admin_override": None,
        "revision": 0,
    }
    policy = {"ports": [{"port": 443, "pp": True}], "restrict_mode": True}
    r = admin.client.put(base, json=policy)
    assert r.status_code == 200 and r.json()["source"] == "admin"
    assert r.json()["effective"] == policy and "port_policy" in admin.events
    etag = r.headers["etag"]
    problem(
        admin.client.put(base, json=policy, headers={"If-Match": '"1"'}), 412, "revision_mismatch"
    )
    assert admin.client.put(base, json=policy, headers={"If-Match": etag}).status_code == 200
    body = problem(admin.client.put(base, json={"ports": [{"port": 0}]}), 400, "invalid_field")
    assert body["field"] == "ports[0].port"
    problem(admin.client.put(base, json={"ports": "x"}), 400, "invalid_field")
    problem(admin.client.put(base, content=b"{oops"), 400, "invalid_json")
    problem(admin.client.put("/api/v1/instances/ghost/port-policy", json=policy), 404, "not_found")
    rows = {i["instance_id"]: i for i in admin.client.get("/api/v1/instances").json()}
    assert rows["inst-pp"]["port_policy_source"] == "admin"
    assert admin.client.delete(base).json()["source"] == "none"
    problem(admin.client.delete(base), 404, "not_found")


def test_dns_credentials_never_reveal_secrets(
    admin: Admin, caplog: pytest.LogCaptureFixture
) -> None:
    base = "/api/v1/dns-credentials"
    responses: list[httpx.Response] = []
    with caplog.at_level(logging.DEBUG):
        knot = {
            "id": "knot-res",
            "kind": "rfc2136",
            "server": "127.0.0.1",
            "port": 5353,
            "zone": "res.test",
            "tsig_key_name": "gw-key",
            "tsig_secret": TSIG_SECRET,
        }
        r = admin.client.post(base, json=knot)
        responses.append(r)
        assert r.status_code == 201, r.text
        assert r.json()["tsig_secret"] == f"{TSIG_SECRET[:4]}...{TSIG_SECRET[-4:]}"
        problem(admin.client.post(base, json=knot), 409, "exists")
        cf = {"id": "cf-res", "kind": "cloudflare", "api_token": CF_TOKEN}
        responses.append(admin.client.post(base, json=cf))
        responses.append(admin.client.get(base))
        responses.append(admin.client.get(f"{base}/cf-res"))
        r = admin.client.put(f"{base}/cf-res", json={"kind": "cloudflare", "ttl": 120})
        responses.append(r)
        assert r.json()["ttl"] == 120 and r.json()["api_token"].startswith(CF_TOKEN[:4])
        # a bad body is refused without echoing the secret it carried
        bad = {**knot, "id": "bad", "server": "not-an-ip"}
        responses.append(problem_r := admin.client.post(base, json=bad))
        problem(problem_r, 400, "invalid_field")
        bad2 = {"id": "bad2", "kind": "rfc2136", "tsig_secret": CF_TOKEN + "!!"}
        responses.append(problem_r := admin.client.post(base, json=bad2))
        problem(problem_r, 400, "invalid_field")
        problem(
            admin.client.post(base, json={"id": "Bad Id", "kind": "cloudflare"}),
            400,
            "invalid_field",
        )
        problem(admin.client.post(base, json={"id": "x", "kind": "ldap"}), 400, "invalid_field")
        listed = {c["id"]: c for c in admin.client.get(base).json()}
        assert listed["file-cred"]["api_token"] == "env:GW_T_CF"
        problem(admin.client.delete(f"{base}/file-cred"), 409, "read_only")
        problem(admin.client.get(f"{base}/missing"), 404, "not_found")
        assert admin.client.delete(f"{base}/cf-res").json()["id"] == "cf-res"
    for r in responses:
        assert TSIG_SECRET not in r.text and CF_TOKEN not in r.text
    assert TSIG_SECRET not in caplog.text and CF_TOKEN not in caplog.text
    assert "operator state: op_dns/knot-res set" in caplog.text  # audited, without the value
    # but the store has it, for the DNS provider
    assert admin.state.credential("knot-res").secret == TSIG_SECRET


def test_base_domains_crud_with_revisions(admin: Admin) -> None:
    cred = {
        "id": "knot-dom",
        "kind": "rfc2136",
        "server": "127.0.0.1",
        "zone": "dom.test",
        "tsig_key_name": "k",
        "tsig_secret": TSIG_SECRET,
    }
    assert admin.client.post("/api/v1/dns-credentials", json=cred).status_code == 201
    base = "/api/v1/domains"
    r = admin.client.post(base, json={"domain": "*.Apps.Dom.Test.", "dns_credential": "knot-dom"})
    assert r.status_code == 201, r.text
    d = r.json()
    assert d["domain"] == "apps.dom.test" and d["port"] == 443 and d["source"] == "admin"
    assert d["certificate"]["has_cert"] is False and "domains" in admin.events
    problem(
        admin.client.post(base, json={"domain": "apps.dom.test", "dns_credential": "knot-dom"}),
        409,
        "exists",
    )
    body = problem(
        admin.client.post(base, json={"domain": "x.dom.test", "dns_credential": "nope"}),
        400,
        "invalid_field",
    )
    assert body["field"] == "dns_credential" and "add it first" in body["detail"]
    body = problem(
        admin.client.post(base, json={"domain": "bad_label!.test", "dns_credential": "knot-dom"}),
        400,
        "invalid_field",
    )
    assert body["field"] == "domain"
    item = f"{base}/apps.dom.test"
    etag = admin.client.get(item).headers["etag"]
    r = admin.client.put(
        item, json={"dns_credential": "knot-dom", "port": 8443}, headers={"If-Match": etag}
    )
    assert r.status_code == 200 and r.json()["port"] == 8443
    problem(
        admin.client.put(item, json={"dns_credential": "knot-dom"}, headers={"If-Match": etag}),
        412,
        "revision_mismatch",
    )
    problem(
        admin.client.put(item, json={"dns_credential": "knot-dom"}, headers={"If-Match": "W/x"}),
        400,
        "invalid_if_match",
    )
    problem(
        admin.client.put(f"{base}/other.dom.test", json={"dns_credential": "knot-dom"}),
        404,
        "not_found",
    )
    problem(admin.client.delete("/api/v1/dns-credentials/knot-dom"), 409, "in_use")
    problem(admin.client.delete(f"{base}/cfg.test"), 409, "read_only")
    listed = [x["domain"] for x in admin.client.get(base).json()]
    assert "apps.dom.test" in listed and "cfg.test" in listed
    assert admin.client.delete(item).json()["id"] == "apps.dom.test"
    problem(admin.client.get(item), 404, "not_found")


def test_custom_domain_routes(admin: Admin) -> None:
    base = "/api/v1/custom-domains"
    app_id = "c3" * 20
    r = admin.client.post(
        base, json={"domain": "Shop.Customer.Example.", "app_id": app_id, "port": 8080}
    )
    assert r.status_code == 201 and r.json()["domain"] == "shop.customer.example"
    assert "routes" in admin.events
    problem(
        admin.client.post(base, json={"domain": "www.cfg.test", "app_id": app_id, "port": 1}),
        409,
        "in_use",
    )
    body = problem(
        admin.client.post(base, json={"domain": "a.example", "app_id": app_id}),
        400,
        "invalid_field",
    )
    assert body["field"] == "port"
    body = problem(
        admin.client.post(base, json={"domain": "a.example", "app_id": "../x", "port": 1}),
        400,
        "invalid_field",
    )
    assert body["field"] == "app_id"
    item = f"{base}/shop.customer.example"
    r = admin.client.put(item, json={"app_id": app_id, "port": 9090})
    assert r.json()["port"] == 9090
    assert admin.client.get(base).json()[0]["port"] == 9090
    assert admin.client.delete(item).status_code == 200
    problem(admin.client.delete(item), 404, "not_found")


def test_admission_policy_changes_at_runtime_and_persists(admin: Admin) -> None:
    path = "/api/v1/admission-policy"
    r = admin.client.get(path)
    assert r.json()["source"] == "config" and "UpToDate" in r.json()["tcb_statuses"]
    app_id = "d4" * 20
    policy = {
        "app_ids": [app_id.upper()],
        "allowed_tcb_statuses": ["UpToDate", "SWHardeningNeeded"],
    }
    r = admin.client.put(path, json=policy)
    assert r.status_code == 200, r.text
    assert r.json()["source"] == "admin" and r.json()["policy"]["app_ids"] == [app_id]
    assert admin.state.admission_policy().app_ids == (app_id,)  # what the verifier reads
    assert "admission" in admin.events
    for bad, field_name in (
        ({"app_ids": ["zz"]}, "app_ids[0]"),
        ({"allowed_tcb_statuses": ["Fine"]}, "allowed_tcb_statuses"),
        ({"allow_any_app": "yes"}, "allow_any_app"),
        ({"nonsense": 1}, "policy"),
    ):
        body = problem(admin.client.put(path, json=bad), 400, "invalid_field")
        assert body["field"] == field_name, body
    problem(
        admin.client.put(path, json=policy, headers={"If-Match": '"1"'}), 412, "revision_mismatch"
    )
    # another process opening the same database sees the runtime policy
    with SqliteStore(admin.db) as other:
        assert OperatorState(other).admission()[0].app_ids == (app_id,)
    r = admin.client.delete(path)
    assert r.json()["source"] == "config" and admin.state.admission_policy().app_ids == ()
    problem(admin.client.delete(path), 404, "not_found")


def test_certificates_status_history_and_renew_without_acme(admin: Admin) -> None:
    c1, k1 = make_cert(0xAA01, minutes_ago=10)
    c2, k2 = make_cert(0xAA02)
    disk.install(admin.certs_dir, "cfg.test", c1, k1, serial=0xAA01)
    disk.install(admin.certs_dir, "cfg.test", c2, k2, serial=0xAA02)
    st = admin.client.get("/api/v1/certificates/cfg.test").json()
    assert st["has_cert"] and st["serial"] == "aa02" and st["acme"] is False
    hist = admin.client.get("/api/v1/certificates/cfg.test/history").json()
    assert [(h["serial"], h["current"]) for h in hist] == [("aa02", True), ("aa01", False)]
    assert any(c["domain"] == "cfg.test" for c in admin.client.get("/api/v1/certificates").json())
    problem(
        admin.client.post("/api/v1/certificates/cfg.test/renew", json={"force": True}),
        409,
        "acme_disabled",
    )
    problem(
        admin.client.post("/api/v1/certificates/cfg.test/renew", json={"force": "yes"}),
        400,
        "invalid_field",
    )
    problem(admin.client.post("/api/v1/certificates/unknown.test/renew"), 404, "not_found")
    problem(admin.client.get("/api/v1/certificates/unknown.test/history"), 404, "not_found")
    acme = admin.client.get("/api/v1/acme").json()
    assert acme["enabled"] is False and len(acme["quoted_hist_keys"]) == 2


def test_status_metrics_and_prpc_aliases(admin: Admin) -> None:
    admin.register("inst-st", "e5" * 20)
    s = admin.client.get("/api/v1/status").json()
    assert s["node"]["id"] == "test-node" and s["node"]["uptime_s"] >= 0
    assert s["connections"] == 3 and s["accel"] == {"ktls_mode": "off"}
    assert s["counters"]["accepted"] == 10 and s["counters"]["instances_registered"] >= 1
    assert any(i["instance_id"] == "inst-st" for i in s["instances"])
    assert any(d["domain"] == "cfg.test" for d in s["domains"])
    assert httpx.get(str(admin.client.base_url) + "/api/v1/status").status_code == 401
    text = admin.client.get("/metrics").text
    assert "gateway_instances_registered " in text
    assert 'gateway_connection_errors_total{reason="connect-refused"} 2' in text
    assert 'gateway_admin_auth_failures_total{reason="unauthorized"}' in text
    assert 'gateway_admin_auth_failures_total{reason="unauthorized"} 0' not in text
    meta = admin.client.post("/prpc/GetMeta").json()
    assert meta["registered"] >= 1 and set(meta) == {"registered", "online"}
    st = admin.client.get("/prpc/Status").json()
    assert st["num_connections"] == 3 and any(h["instance_id"] == "inst-st" for h in st["hosts"])
    zt = admin.client.post("/prpc/ListZtDomains").json()["domains"]
    assert any(z["config"]["domain"] == "cfg.test" for z in zt)
    problem(admin.client.post("/prpc/RenewCert"), 409, "acme_disabled")


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="Debian chromium is installed by scripts/setup.sh"
)
def test_dashboard_renders_the_real_status(admin: Admin, tmp_path: Path) -> None:
    from tests.control.test_dashboard import chromium

    admin.register("inst-dash", "0d" * 20)
    authed = str(admin.client.base_url).replace("http://", f"http://admin:{TOKEN}@")
    dom = chromium(authed + "/", tmp_path, "--dump-dom")
    assert "id: test-node" in dom
    assert "<span>instances_registered</span>" in dom and "<span>accepted</span>" in dom
    assert "<td>inst-dash</td><td>" + "0d" * 20 + "</td>" in dom
    assert "<td>cfg.test</td>" in dom
