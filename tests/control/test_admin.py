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
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import ConfigError
from gateway.control.admin import ENDPOINTS_KEY, create_admin_app, json_response, read_json
from gateway.control.auth import (
    Authenticator,
    BasicCred,
    Credentials,
    Problem,
    Refused,
    TokenCred,
    load_credentials,
    parse_credentials,
    parse_htpasswd,
    peer_key,
)
from gateway.control.ratelimit import RateLimiter
from gateway.control.readiness import Readiness
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


_FUZZ_CREDS = _creds()


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
    valid = "$2y$04$" + "a" * 53
    assert parse_htpasswd(f"# c\nbob:{valid}\n")[0][1].startswith(b"$2b$")


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
        {"Authorization": "Basic " + base64.b64encode(f"{TOKEN}:".encode()).decode()},
    ],
    ids=["x-admin-token", "bearer", "basic-htpasswd", "basic-token", "basic-token-as-user"],
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
        ({"Authorization": "Basic !!!notbase64"}, "malformed"),
        ({"Authorization": "Basic " + base64.b64encode(b"no-colon").decode()}, "malformed"),
        ({"Authorization": "Bearer"}, "malformed"),
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
        r = await client.get("/ready")
        assert r.status_code == 503 and r.json()["not_ready"] == ["store"]

    ready = Readiness()
    ready.require("store", "not open")
    run(check, readiness=ready)


def test_failed_attempts_are_rate_limited_and_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    basic_ok = "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()

    async def check(client: httpx.AsyncClient) -> None:
        for _ in range(3):
            r = await client.get("/api/v1/status", headers={"X-Admin-Token": "guess-secret-123"})
            assert r.status_code == 401
        r = await client.get("/api/v1/status", headers={"X-Admin-Token": "guess-secret-124"})
        assert r.status_code == 429  # over budget: a wrong token is not even compared
        assert int(r.headers["retry-after"]) >= 1
        r = await client.get("/api/v1/status", headers={"Authorization": basic_ok})
        assert r.status_code == 429  # nor an htpasswd password (bcrypt, guessable)
        # the admin token still passes: a neighbour behind the same address cannot lock
        # the operator out, and a constant-time compare of a >= 16 char token tells a
        # guesser nothing the budget was protecting
        r = await client.get("/api/v1/status", headers={"X-Admin-Token": TOKEN})
        assert r.status_code == 200

    with caplog.at_level(logging.WARNING, logger="gateway.control.auth"):
        run(check, failures_per_minute=3)
    assert "invalid credentials from 127.0.0.1" in caplog.text
    assert "guess-secret-12" not in caplog.text and TOKEN not in caplog.text
    assert PASSWORD not in caplog.text


def test_missing_credentials_are_not_counted() -> None:
    async def check(client: httpx.AsyncClient) -> None:
        for _ in range(5):  # a browser's first, credential-less request guesses nothing
            assert (await client.get("/api/v1/status")).status_code == 401
        basic = "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
        r = await client.get("/api/v1/status", headers={"Authorization": basic})
        assert r.status_code == 200

    run(check, failures_per_minute=2)


def test_budget_is_per_client_address() -> None:
    """Exhausting 127.0.0.2's budget leaves 127.0.0.1 (another TCP peer) untouched."""
    basic_ok = "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()

    async def check(client: httpx.AsyncClient) -> None:
        transport = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
        async with httpx.AsyncClient(base_url=client.base_url, transport=transport) as other:
            for _ in range(3):
                await other.get("/api/v1/status", headers={"X-Admin-Token": "x" * 20})
            r = await other.get("/api/v1/status", headers={"Authorization": basic_ok})
            assert r.status_code == 429
        r = await client.get("/api/v1/status", headers={"Authorization": basic_ok})
        assert r.status_code == 200

    run(check, failures_per_minute=2)


def test_failures_from_many_addresses_hit_the_node_wide_budget() -> None:
    """An attacker with many addresses (here 127.0.0.10-19, 2 failures each with a
    per-address budget of 2) exhausts the node-wide budget (10x): passwords are then not
    checked for anyone, even a fresh address; the token still passes."""
    basic_ok = "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()

    async def check(client: httpx.AsyncClient) -> None:
        async def from_addr(addr: str, headers: dict[str, str]) -> int:
            transport = httpx.AsyncHTTPTransport(local_address=addr)
            async with httpx.AsyncClient(base_url=client.base_url, transport=transport) as c:
                return (await c.get("/api/v1/status", headers=headers)).status_code

        statuses = [
            await from_addr(f"127.0.0.{10 + i}", {"X-Admin-Token": "wrong-" + "w" * 20})
            for i in range(10)
            for _ in range(2)
        ]
        assert statuses == [401] * 20
        assert await from_addr("127.0.0.50", {"Authorization": basic_ok}) == 429
        assert await from_addr("127.0.0.50", {"X-Admin-Token": TOKEN}) == 200

    run(check, failures_per_minute=2)


def test_limiter_reads_do_not_evict_exhausted_clients() -> None:
    now = [0.0]
    limiter = RateLimiter(1, 60.0, max_keys=2, clock=lambda: now[0])
    assert limiter.hit("attacker") and not limiter.allowed("attacker")
    for i in range(100):  # lookups for many other keys (requests that failed nothing)
        assert limiter.allowed(f"10.0.0.{i}") and limiter.retry_after(f"10.0.0.{i}") == 0
    assert not limiter.allowed("attacker")  # still remembered
    now[0] = 61.0
    assert limiter.allowed("attacker")


def _basic(user: bytes, password: bytes) -> bytes:
    return b"Basic " + base64.b64encode(user + b":" + password)


UNDECODABLE: list[tuple[bytes, bytes]] = [
    (b"X-Admin-Token", b"\xff\xfe\xfd-not-utf8-token"),
    (b"X-Admin-Token", "caf\u00e9-token-".encode("latin-1")),
    (b"Authorization", b"Bearer \xff\xfe\x80\x81"),
    (b"Authorization", b"Bearer caf\xc3\xa9"),
    (b"Authorization", _basic("\u00e4lice".encode(), b"pw")),  # non-ASCII user vs htpasswd
    (b"Authorization", _basic(b"\xff\xfe", b"\xff")),
    (b"Authorization", _basic(b"alice", b"p" * 100)),  # longer than bcrypt takes
    (b"Authorization", b"Basic \xff\xfe=="),
    (b"Authorization", b"\xc3\xa9 scheme"),  # an unknown scheme: 401, not counted
]


async def raw_get(port: int, header: bytes, value: bytes, path: bytes = b"/api/v1/status") -> int:
    """One request with exactly these header bytes (httpx would re-encode); the status."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"GET %s HTTP/1.1\r\nHost: t\r\n%s: %s\r\nConnection: close\r\n\r\n"
            % (path, header, value)
        )
        line = await reader.readline()
        await reader.read()
    finally:
        writer.close()
    return int(line.split()[1])


def test_undecodable_credentials_are_invalid_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Non-UTF-8 tokens, a non-ASCII Basic user with htpasswd, an over-long password: 401
    (counted, so the budget ends in 429), never 500, no traceback, no secret logged."""

    async def check(client: httpx.AsyncClient) -> None:
        port = client.base_url.port
        assert port is not None
        statuses = [await raw_get(port, h, v) for h, v in UNDECODABLE]
        statuses += [await raw_get(port, h, v) for h, v in UNDECODABLE[:4]]
        # 8 counted + 1 not, then 2 more fill the budget of 10; the rest are over it
        assert statuses == [401] * 11 + [429] * 2, statuses

    with caplog.at_level(logging.INFO):
        run(check, failures_per_minute=10)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert "Traceback" not in caplog.text
    assert "not-utf8" not in caplog.text and "pppp" not in caplog.text
    assert caplog.text.count("malformed credentials") >= 1
    assert caplog.text.count("invalid credentials") >= 5


def test_long_htpasswd_password_is_truncated_like_apache() -> None:
    """``htpasswd -B`` hashed the first 72 bytes; the same password must still log in."""
    long_pw = "x" * 72 + "ignored-tail"
    hashed = bcrypt.hashpw(long_pw.encode()[:72], bcrypt.gensalt(rounds=4)).decode()
    creds = Credentials(htpasswd=parse_htpasswd(f"bob:{hashed}\n"))

    async def check(client: httpx.AsyncClient) -> None:
        h = {"Authorization": "Basic " + base64.b64encode(f"bob:{long_pw}".encode()).decode()}
        assert (await client.get("/api/v1/status", headers=h)).status_code == 200

    run(check, creds=creds)


def test_malformed_htpasswd_hash_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="malformed bcrypt hash"):
        parse_htpasswd("bob:$2b$abc\n")


@pytest.mark.parametrize(
    "host,key",
    [
        ("192.0.2.7", "192.0.2.7"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("", "unix"),
        (None, "unix"),
    ],
)
def test_peer_key(host: str | None, key: str) -> None:
    assert peer_key(host) == key


_ALLOWED = frozenset([0x09, *range(0x20, 0x7F), *range(0x80, 0x100)])
_HEADER_VALUE = st.binary(max_size=80).map(
    lambda b: bytes(c for c in b if c in _ALLOWED)  # what an HTTP parser lets through
)


@settings(max_examples=300, deadline=None)
@given(
    token=st.one_of(st.none(), st.binary(max_size=64)),
    authorization=st.one_of(
        st.none(),
        st.binary(max_size=64),
        st.builds(
            lambda s, b: s + b,
            st.sampled_from([b"Basic ", b"Bearer ", b"bAsIc "]),
            st.binary(max_size=64),
        ),
        st.builds(_basic, st.binary(max_size=24), st.binary(max_size=90)),
    ),
)
def test_parse_credentials_is_total(token: bytes | None, authorization: bytes | None) -> None:
    """Any header bytes (as aiohttp hands them over) parse to a value, never an exception,
    and the Authenticator answers None or Refused for every one of them."""

    def dec(b: bytes | None) -> str | None:
        return None if b is None else b.decode("utf-8", "surrogateescape")

    presented = parse_credentials(dec(token), dec(authorization))
    assert isinstance(presented, TokenCred | BasicCred | Refused)
    auth = Authenticator(_FUZZ_CREDS, RateLimiter(1000))
    outcome = asyncio.run(auth.check(presented))
    assert outcome is None or isinstance(outcome, Refused)
    if outcome is None:  # only the real token (or alice's password) gets in
        assert TOKEN.encode() in (token or b"") + (authorization or b"") or isinstance(
            presented, BasicCred
        )


def test_parse_credentials_lone_surrogate() -> None:
    assert parse_credentials("\ud800", None) == Refused(
        Problem.MALFORMED, "X-Admin-Token is not a header value"
    )
    assert isinstance(parse_credentials(None, "Bearer \ud800"), Refused)


def test_fuzzed_headers_on_the_real_server_never_500() -> None:
    """Hypothesis-drawn header bytes against a real aiohttp server: 401 or 429, never 500."""
    values: list[tuple[bytes, bytes]] = []

    @settings(max_examples=150, deadline=None, database=None)
    @given(
        name=st.sampled_from([b"X-Admin-Token", b"Authorization"]),
        prefix=st.sampled_from([b"", b"Basic ", b"Bearer ", b"basic "]),
        value=_HEADER_VALUE,
        basic=st.tuples(_HEADER_VALUE, _HEADER_VALUE),
        use_basic=st.booleans(),
    )
    def collect(
        name: bytes, prefix: bytes, value: bytes, basic: tuple[bytes, bytes], use_basic: bool
    ) -> None:
        raw = _basic(*basic) if use_basic else prefix + value
        values.append((name, raw.strip(b" \t") or b"x"))

    collect()

    async def check(client: httpx.AsyncClient) -> None:
        port = client.base_url.port
        assert port is not None
        for name, raw in values:
            status = await raw_get(port, name, raw)
            assert status in (401, 429), (name, raw, status)

    run(check, failures_per_minute=20)


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
