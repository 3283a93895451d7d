from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import bcrypt
import httpx
import pytest
from aiohttp import web

from gateway.config import ConfigError
from gateway.control.admin import ENDPOINTS_KEY, create_admin_app, json_response, read_json
from gateway.control.auth import Credentials, load_credentials, parse_htpasswd
from gateway.control.routes import Endpoint
from gateway.control.settings import AdminSettings

TOKEN = "t0ken-" + "x" * 26
PASSWORD = "correct horse battery staple"


def _creds(**kw: Any) -> Credentials:
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    return Credentials(
        token_digest=__import__("hashlib").sha256(TOKEN.encode()).digest(),
        htpasswd=parse_htpasswd(f"alice:{hashed}\n"),
        **kw,
    )


async def _echo(request: web.Request) -> web.Response:
    return json_response({"got": await read_json(request)})


ECHO = Endpoint(
    "POST",
    "/api/v1/echo",
    _echo,
    "echo a JSON body",
    "test",
    request={"type": "object"},
    response={"type": "object"},
)


@asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[httpx.AsyncClient]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            yield client
    finally:
        await runner.cleanup()


def run(fn: Callable[[httpx.AsyncClient], Awaitable[None]], **app_kw: Any) -> None:
    async def main() -> None:
        app = create_admin_app(
            app_kw.pop("creds", _creds()), status=lambda: {"node": "n1"}, resources=[ECHO], **app_kw
        )
        async with serve(app) as client:
            await fn(client)

    asyncio.run(main())


def test_no_credentials_refuses_to_start() -> None:
    with pytest.raises(ConfigError, match="no credentials") as err:
        load_credentials(AdminSettings(token_env="GW_TEST_UNSET_VAR"))
    assert "insecure_no_auth" in str(err.value)


def test_insecure_flag_allows_start() -> None:
    creds = load_credentials(AdminSettings(token_env="GW_TEST_UNSET_VAR", insecure_no_auth=True))
    assert creds.insecure and not creds.configured


def test_short_token_rejected(tmp_path: Path) -> None:
    f = tmp_path / "tok"
    f.write_text("short\n")
    with pytest.raises(ConfigError, match="shorter than 16"):
        load_credentials(AdminSettings(token_file=f))


def test_token_file_is_read(tmp_path: Path) -> None:
    f = tmp_path / "tok"
    f.write_text(TOKEN + "\n")
    assert load_credentials(AdminSettings(token_file=f)).token_digest is not None


def test_htpasswd_requires_bcrypt() -> None:
    with pytest.raises(ConfigError, match="bcrypt"):
        parse_htpasswd("bob:{SHA}abc\n")
    assert parse_htpasswd("# c\nbob:$2y$04$abc\n")[0][1].startswith(b"$2b$")


def test_listen_validated() -> None:
    with pytest.raises(ValueError, match="host:port"):
        AdminSettings(listen="localhost")
    AdminSettings(listen="unix:/run/gw.sock")
    AdminSettings(listen="[::1]:8001")


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Admin-Token": TOKEN},
        {"Authorization": f"Bearer {TOKEN}"},
        {"Authorization": "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()},
        {"Authorization": "Basic " + base64.b64encode(f"any:{TOKEN}".encode()).decode()},
    ],
    ids=["x-admin-token", "bearer", "basic-htpasswd", "basic-token"],
)
def test_accepted_credentials(headers: dict[str, str]) -> None:
    async def check(client: httpx.AsyncClient) -> None:
        r = await client.get("/api/v1/status", headers=headers)
        assert r.status_code == 200
        assert r.json() == {"node": "n1"}

    run(check)


@pytest.mark.parametrize(
    "headers,reason",
    [
        ({}, "missing"),
        ({"X-Admin-Token": TOKEN + "y"}, "invalid"),
        ({"Authorization": "Bearer nope"}, "invalid"),
        ({"Authorization": "Basic " + base64.b64encode(b"alice:wrong").decode()}, "invalid"),
        ({"Authorization": "Basic !!!notbase64"}, "invalid"),
        ({"Authorization": "Digest abc"}, "missing"),
    ],
)
def test_refused_credentials(headers: dict[str, str], reason: str) -> None:
    async def check(client: httpx.AsyncClient) -> None:
        r = await client.get("/api/v1/status", headers=headers)
        assert r.status_code == 401
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.headers["www-authenticate"].startswith("Basic realm=")
        assert r.json()["code"] == "unauthorized"
        assert r.json()["detail"].startswith(reason)

    run(check)


def test_public_probes_need_no_credentials() -> None:
    async def check(client: httpx.AsyncClient) -> None:
        assert (await client.get("/health")).text == "ok\n"
        assert (await client.get("/ready")).status_code == 503

    run(check, ready=lambda: False)


def test_failed_attempts_are_rate_limited_and_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    async def check(client: httpx.AsyncClient) -> None:
        for _ in range(3):
            r = await client.get("/api/v1/status", headers={"X-Admin-Token": "guess-secret-123"})
            assert r.status_code == 401
        r = await client.get("/api/v1/status", headers={"X-Admin-Token": TOKEN})
        assert r.status_code == 429  # over budget: not even a right token is checked
        assert int(r.headers["retry-after"]) >= 1

    with caplog.at_level(logging.WARNING, logger="gateway.control.auth"):
        run(check, failures_per_minute=3)
    assert "invalid credentials from 127.0.0.1" in caplog.text
    assert "guess-secret-123" not in caplog.text and TOKEN not in caplog.text


def test_problem_documents_for_bad_bodies() -> None:
    async def check(client: httpx.AsyncClient) -> None:
        h = {"X-Admin-Token": TOKEN}
        r = await client.post("/api/v1/echo", headers=h, content=b"{nope")
        assert r.status_code == 400 and r.json()["code"] == "invalid_json"
        r = await client.post("/api/v1/echo", headers=h, content=b"x" * (2 << 20))
        assert r.status_code == 413
        r = await client.post("/api/v1/echo", headers=h, json={"a": 1})
        assert r.json() == {"got": {"a": 1}}
        r = await client.get("/api/v1/nothing-here", headers=h)
        assert r.status_code == 404 and r.json()["code"] == "not_found"

    run(check)


def test_openapi_lists_exactly_the_served_routes() -> None:
    async def check(client: httpx.AsyncClient) -> None:
        doc = (await client.get("/api/v1/openapi.json", headers={"X-Admin-Token": TOKEN})).json()
        assert doc["openapi"].startswith("3.")
        described = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
        assert ("POST", "/api/v1/echo") in described
        assert doc["paths"]["/health"]["get"]["security"] == []
        assert doc["paths"]["/api/v1/status"]["get"]["security"]

    run(check)
    app = create_admin_app(_creds(), status=dict, resources=[ECHO])
    served = {
        (r.method, r.resource.canonical)
        for r in app.router.routes()
        if r.resource is not None and r.method != "HEAD"
    }
    assert served == {(e.method, e.path) for e in app[ENDPOINTS_KEY]}


def test_request_ids_are_echoed_and_sanitised(caplog: pytest.LogCaptureFixture) -> None:
    async def check(client: httpx.AsyncClient) -> None:
        h = {"X-Admin-Token": TOKEN}
        r = await client.get("/api/v1/status", headers={**h, "X-Request-Id": "abc-123"})
        assert r.headers["x-request-id"] == "abc-123"
        r = await client.get("/api/v1/status", headers={**h, "X-Request-Id": "bad id <script>"})
        assert r.headers["x-request-id"] != "bad id" and " " not in r.headers["x-request-id"]
        r = await client.get("/api/v1/status")
        assert r.status_code == 401 and r.headers["x-request-id"]

    with caplog.at_level(logging.INFO, logger="gateway.admin.access"):
        run(check)
    lines = [r for r in caplog.records if r.name == "gateway.admin.access"]
    assert [r.getMessage().split()[2] for r in lines] == ["200", "200", "401"]
    assert getattr(lines[0], "request_id", None) == "abc-123"  # set by extra={...}
