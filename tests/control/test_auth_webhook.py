"""The registration webhook (``[auth_webhook]``, upstream's ``[core.auth]``).

The webhook is a real aiohttp server on 127.0.0.1 (plain HTTP, and HTTPS with a private
CA); the client is ours with its real session. Each answer the contract names is served and
its outcome checked: 2xx admits, 403/404/redirect refuse (``webhook_denied``), 500/429,
timeout, a closed port and a TLS failure refuse for now (``webhook_unavailable``, 503), an
endless body is not read. The last test runs the real registration RPC (``prepare_rpc`` +
``start_rpc``, TLS, simulated-TDX CVM, SQLite registry) with the webhook enabled.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from gateway.attest.eventlog import AppIdentity, parse_key_provider
from gateway.attest.evidence import EvidenceMethod, RejectReason, VerifiedEvidence
from gateway.attest.policy import Verdict
from gateway.attest.policy_settings import AdmissionPolicy
from gateway.attest.verifier import EvidenceResult
from gateway.config import Config, ConfigError, parse_config
from gateway.control.auth_webhook import (
    EXCERPT_CHARS,
    AppInfo,
    AuthWebhook,
    WebhookTarget,
    WebhookUnavailable,
    app_info_from_evidence,
    load_webhook_target,
    sanitize_excerpt,
)
from gateway.control.auth_webhook_settings import AuthWebhookSettings
from gateway.control.registration import RpcError
from gateway.control.rpc_server import prepare_rpc, start_rpc
from gateway.tee.sim_pki import SimPki
from tests.control.test_registration import APP, make_cvm
from tests.control.test_rpc_server import _config, _tunnel
from tests.helpers.gateway_rpc import make_ca, plain_server_files, write_ca
from tests.helpers.processes import free_port

TOKEN = "wh-s3cret-Token.0123456789"
UPSTREAM_FIELDS = [
    "app_id",
    "compose_hash",
    "instance_id",
    "device_id",
    "mr_system",
    "mr_aggregated",
    "os_image_hash",
    "key_provider_info",
    "init_script_hashes",
]
KP = b'{"name":"kms","id":"3059301306"}'


def _evidence(app: bytes = b"\x5b" * 20) -> VerifiedEvidence:
    ident = AppIdentity(
        app_id=app,
        compose_hash=b"\xc1" * 32,
        instance_id=b"\x16" * 20,
        os_image_hash=b"\xe6" * 32,
        key_provider=parse_key_provider(KP),
        key_provider_payload=KP,
        boot_rtmr3=b"\x01" * 48,
        rtmr3=b"\x02" * 48,
    )
    return VerifiedEvidence(
        EvidenceMethod.RATLS, ident, None, "UpToDate", (), b"\x51" * 32, b"\x85" * 32
    )


@dataclass
class Hook:
    """The webhook server: records each request, answers by path."""

    url: str
    requests: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)
    switch: str = "allow"  # what /hook/switch answers
    dropped: int = 0  # endless answers whose client went away


async def _handler(request: web.Request) -> web.StreamResponse:
    hook: Hook = request.app[HOOK]
    body = await request.read()
    hook.requests.append((request.path, dict(request.headers), body))
    name = request.match_info["name"]
    if name == "switch":
        name = hook.switch
    if name == "allow":
        return web.Response(status=204)
    if name == "allow200":
        return web.json_response({"ok": True})
    if name == "deny":
        # a body with control characters, an ANSI escape and far more than an excerpt
        text = "app \x1b[31mnot\x1b[0m on the\r\nlist\x00 " + "x" * 5000
        return web.Response(status=403, text=text)
    if name == "notfound":
        return web.Response(status=404)
    if name == "fail":
        return web.Response(status=500, text="database down")
    if name == "busy":
        return web.Response(status=429)
    if name == "slow":
        await asyncio.sleep(5)
        return web.Response(status=200)
    if name == "redirect":
        raise web.HTTPFound("/hook/allow")
    if name in ("big", "bigdeny"):  # an endless body, until the client goes (or 30 s)
        resp = web.StreamResponse(status=200 if name == "big" else 403)
        await resp.prepare(request)
        deadline = time.monotonic() + 30
        try:
            while time.monotonic() < deadline:
                await resp.write(b"y" * 65536)
                await asyncio.sleep(0.005)
        except ConnectionError:
            hook.dropped += 1
        return resp
    return web.Response(status=400)


HOOK = web.AppKey("hook", Hook)


@asynccontextmanager
async def webhook_server(ssl_ctx: ssl.SSLContext | None = None) -> AsyncIterator[Hook]:
    port = free_port()
    scheme = "https" if ssl_ctx else "http"
    hook = Hook(f"{scheme}://127.0.0.1:{port}/hook/")
    app = web.Application()
    app[HOOK] = hook
    app.router.add_route("*", "/hook/{name}", _handler)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=ssl_ctx).start()
    try:
        yield hook
    finally:
        await runner.cleanup()


async def _ask(
    hook_url: str, *, timeout: float = 2.0, token: str | None = TOKEN, ctx: Any = None
) -> tuple[AuthWebhook, Callable[[], Awaitable[Verdict | None]]]:
    webhook = AuthWebhook(WebhookTarget(hook_url, timeout, token, ctx))
    info = app_info_from_evidence(_evidence())
    return webhook, lambda: webhook.ask(info)


def test_app_info_has_upstreams_fields_in_order_as_hex() -> None:
    info = app_info_from_evidence(_evidence())
    doc = info.to_json()
    assert list(doc) == UPSTREAM_FIELDS
    assert doc == {
        "app_id": "5b" * 20,
        "compose_hash": "c1" * 32,
        "instance_id": "16" * 20,
        "device_id": "",  # not in our verified identity (upstream: SHA256 of the PPID)
        "mr_system": "51" * 32,
        "mr_aggregated": "85" * 32,
        "os_image_hash": "e6" * 32,
        "key_provider_info": KP.hex(),  # upstream's hex_bytes of the event payload
        "init_script_hashes": None,  # upstream's "not bound by the evidence"
    }
    with_scripts = AppInfo(**{**doc, "init_script_hashes": ("aa" * 32,)})
    assert with_scripts.to_json()["init_script_hashes"] == ["aa" * 32]


def test_sanitize_excerpt_keeps_printable_text_only() -> None:
    assert sanitize_excerpt(b"not\r\n\tallowed\x00\x1b[0m \xff") == "not allowed??[0m \ufffd"
    long = sanitize_excerpt(b"z" * 1000)
    assert len(long) == EXCERPT_CHARS and long.endswith("...")
    assert sanitize_excerpt(b"") == ""


def test_answers_allow_deny_and_unavailable(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, aiohttp's too: the token must not appear

    async def scenario() -> None:
        async with webhook_server() as hook:
            outcomes: dict[str, Any] = {}
            webhook = AuthWebhook(WebhookTarget(hook.url + "x", 2.0, TOKEN))
            try:
                info = app_info_from_evidence(_evidence())
                for name in ("allow", "allow200", "deny", "notfound", "redirect"):
                    webhook._target = WebhookTarget(hook.url + name, 2.0, TOKEN)
                    outcomes[name] = await webhook.ask(info)
                for name in ("fail", "busy"):
                    webhook._target = WebhookTarget(hook.url + name, 2.0, TOKEN)
                    with pytest.raises(WebhookUnavailable) as exc:
                        await webhook.ask(info)
                    outcomes[name] = str(exc.value)
            finally:
                await webhook.close()
            assert outcomes["allow"] is None and outcomes["allow200"] is None
            deny = outcomes["deny"]
            assert isinstance(deny, Verdict) and deny.reason is RejectReason.WEBHOOK_DENIED
            assert deny.detail.startswith('the registration webhook answered 403: "app ?[31mnot')
            assert "\x1b" not in deny.detail and "\n" not in deny.detail
            assert len(deny.detail) < 250  # status + a short excerpt, not the 5 KB body
            assert outcomes["notfound"].detail == "the registration webhook answered 404"
            assert outcomes["redirect"].reason is RejectReason.WEBHOOK_DENIED
            assert "302 (redirects are not followed)" in outcomes["redirect"].detail
            assert outcomes["fail"] == "it answered 500" and outcomes["busy"] == "it answered 429"
            # the redirect was not followed: /hook/allow was asked only when named
            paths = [p for p, _, _ in hook.requests]
            names = ("allow", "allow200", "deny", "notfound", "redirect", "fail", "busy")
            assert paths == [f"/hook/{n}" for n in names]
            for _, headers, body in hook.requests:
                assert headers["Authorization"] == f"Bearer {TOKEN}"
                assert headers["Content-Type"] == "application/json"
                assert list(json.loads(body)) == UPSTREAM_FIELDS
                assert json.loads(body) == info.to_json()
            assert dict(webhook.stats.outcomes) == {"allowed": 2, "denied": 3, "unavailable": 2}
            assert TOKEN not in repr(webhook) and TOKEN not in repr(webhook._target)

    asyncio.run(scenario())
    assert "database down" in caplog.text  # the operator sees why (the CVM does not)
    assert TOKEN not in caplog.text


def test_timeout_and_unreachable_fail_closed_without_waiting_longer() -> None:
    async def scenario() -> None:
        async with webhook_server() as hook:
            webhook, ask = await _ask(hook.url + "slow", timeout=0.5)
            try:
                start = time.monotonic()
                with pytest.raises(WebhookUnavailable, match=r"no answer within 0.5 s"):
                    await ask()
                assert time.monotonic() - start < 2
            finally:
                await webhook.close()
        webhook, ask = await _ask(f"http://127.0.0.1:{free_port()}/hook", timeout=2)
        try:
            with pytest.raises(WebhookUnavailable, match="^not reachable$"):
                await ask()  # the CVM is not told where the webhook lives
        finally:
            await webhook.close()

    asyncio.run(scenario())


def test_an_endless_body_is_not_read() -> None:
    async def scenario() -> None:
        async with webhook_server() as hook:
            for name, allowed in (("big", True), ("bigdeny", False)):
                webhook, ask = await _ask(hook.url + name, timeout=10)
                try:
                    start = time.monotonic()
                    verdict = await ask()
                    elapsed = time.monotonic() - start
                finally:
                    await webhook.close()
                assert (verdict is None) is allowed
                if verdict is not None:
                    assert verdict.detail == (
                        'the registration webhook answered 403: "' + "y" * 157 + '..."'
                    )
                assert elapsed < 3, f"{name}: {elapsed:.1f} s (was the body read?)"
            deadline = time.monotonic() + 5
            while hook.dropped < 2:  # both connections dropped, not kept to be drained
                assert time.monotonic() < deadline, hook.dropped
                await asyncio.sleep(0.02)

    asyncio.run(scenario())


def test_https_with_the_configured_ca_and_refused_without(tmp_path: Path) -> None:
    ca = make_ca("webhook test CA")
    ca_file, _ = write_ca(ca, tmp_path, "ca")
    cert, key = plain_server_files(tmp_path / "srv", issuer=ca)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)

    async def scenario() -> None:
        async with webhook_server(server_ctx) as hook:
            settings = AuthWebhookSettings(
                enabled=True, url=hook.url + "allow", ca_file=str(ca_file)
            )
            target = load_webhook_target(settings)
            assert target is not None
            webhook = AuthWebhook(target)
            try:
                assert await webhook.ask(app_info_from_evidence(_evidence())) is None
            finally:
                await webhook.close()
            webhook, ask = await _ask(hook.url + "allow")  # system trust store: refused
            try:
                with pytest.raises(WebhookUnavailable, match="not reachable"):
                    await ask()
            finally:
                await webhook.close()
            assert len(hook.requests) == 1

    asyncio.run(scenario())


def test_wrap_asks_only_about_accepted_evidence() -> None:
    accepted = EvidenceResult(Verdict.accept("ok"), _evidence())
    refused = EvidenceResult(Verdict.reject(RejectReason.APP_NOT_ALLOWED, "no"), _evidence())

    async def scenario() -> None:
        async with webhook_server() as hook:
            for name, inner, want in (
                ("deny", refused, "app_not_allowed"),  # the webhook is not asked
                ("allow", accepted, None),
                ("deny", accepted, "webhook_denied"),
            ):

                async def check(chain: list[bytes], r: EvidenceResult = inner) -> EvidenceResult:
                    return r

                webhook, _ = await _ask(hook.url + name)
                try:
                    result = await webhook.wrap(check)([b"leaf"])
                finally:
                    await webhook.close()
                got = result.verdict.reason.value if result.verdict.reason else None
                assert got == want and result.evidence == inner.evidence
            assert [p for p, _, _ in hook.requests] == ["/hook/allow", "/hook/deny"]
            webhook, _ = await _ask(hook.url + "fail")

            async def ok(chain: list[bytes]) -> EvidenceResult:
                return accepted

            try:
                with pytest.raises(RpcError) as exc:
                    await webhook.wrap(ok)([b"leaf"])
            finally:
                await webhook.close()
            assert (exc.value.status, exc.value.reason) == (503, "webhook_unavailable")
            assert "try again later" in exc.value.message

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("enabled = true", "url is required"),
        ("url = 'ftp://h/x'", "expected http"),
        ("url = 'http://u:p@h/x'", "must not carry user:password"),
        ("url = 'http://h:99999/x'", "auth_webhook.url"),
        ("url = 'http://h/x'\nca_file = '/ca.pem'", "https url only"),
        ("token_env = 'A'\ntoken_file = '/t'", "not both"),
        ("timeout = 0", "timeout"),
    ],
)
def test_settings_refuse_mistakes(toml: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as exc:
        parse_config(f"[auth_webhook]\n{toml}\n")
    assert exc.value.path == "auth_webhook"


def test_token_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = "http://127.0.0.1:1/x"
    assert load_webhook_target(AuthWebhookSettings(url=url)) is None  # disabled
    monkeypatch.setenv("WH_TEST_TOKEN", f"  {TOKEN}\n")
    target = load_webhook_target(AuthWebhookSettings(True, url, token_env="WH_TEST_TOKEN"))
    assert target is not None and target.token == TOKEN and TOKEN not in repr(target)
    (tmp_path / "t").write_text(TOKEN + "\n")
    target = load_webhook_target(AuthWebhookSettings(True, url, token_file=str(tmp_path / "t")))
    assert target is not None and target.token == TOKEN
    for settings, message in (
        (AuthWebhookSettings(True, url, token_env="WH_TEST_UNSET"), "empty or unset"),
        (AuthWebhookSettings(True, url, token_file=str(tmp_path / "none")), "cannot read"),
        (AuthWebhookSettings(True, "https://h/x", ca_file=str(tmp_path / "t")), "CA bundle"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_webhook_target(settings)
    monkeypatch.setenv("WH_TEST_TOKEN", "two words")
    with pytest.raises(ConfigError, match="visible ASCII") as exc:
        load_webhook_target(AuthWebhookSettings(True, url, token_env="WH_TEST_TOKEN"))
    assert "two words" not in str(exc.value)


def _rpc_config(tmp_path: Path, port: int, hook_url: str) -> Config:
    cert, key = plain_server_files(tmp_path / "files")
    return _config(
        tmp_path,
        port,
        f"cert_file = '{cert}'\nkey_file = '{key}'\n"
        f"[auth_webhook]\nenabled = true\nurl = '{hook_url}'\ntimeout = 1.0\n"
        "token_env = 'WH_RPC_TOKEN'\n",
    )


def test_registration_rpc_with_the_webhook(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The real RPC: a denial is 403 ``webhook_denied`` and a webhook failure 503
    ``webhook_unavailable``, both leaving the registry empty; a policy refusal never
    reaches the webhook; an allowed CVM registers, and the webhook saw its verified
    identity (the values the registry keeps)."""
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("WH_RPC_TOKEN", TOKEN)
    port = free_port()
    policy = [AdmissionPolicy(app_ids=())]

    async def scenario() -> None:
        async with webhook_server() as hook:
            cfg = _rpc_config(tmp_path, port, hook.url + "switch")  # answers hook.switch
            plan = prepare_rpc(cfg)
            assert plan.webhook is not None and plan.webhook.token == TOKEN
            pki = SimPki.load(tmp_path / "sim" / "pki")
            cvm = make_cvm(pki, tmp_path / "cvm", b"\x22" * 20, None)
            ctx = ssl.create_default_context()
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            ctx.load_cert_chain(cvm.cert, cvm.key)
            tunnel = _tunnel(cfg)
            results = []
            try:
                async with AsyncExitStack() as stack:
                    await start_rpc(cfg, plan, tunnel, stack, policy=lambda: policy[0])
                    async with httpx.AsyncClient(
                        base_url=f"https://127.0.0.1:{port}", verify=ctx, timeout=10
                    ) as client:

                        async def register() -> tuple[int, dict[str, Any]]:
                            r = await client.post(
                                "/prpc/RegisterCvm", json={"client_public_key": "B" * 43 + "="}
                            )
                            return r.status_code, r.json()

                        code, body = await register()  # the policy refuses: webhook not asked
                        assert (code, body["reason"]) == (403, "app_not_allowed")
                        assert hook.requests == []
                        policy[0] = AdmissionPolicy(app_ids=(APP,))
                        for name in ("deny", "fail", "slow", "allow"):
                            hook.switch = name
                            results.append(await register())
                            if name != "allow":
                                assert tunnel.store.list_instances() == [], name
                registered = tunnel.store.list_instances()
            finally:
                tunnel.store.close()
            (c1, b1), (c2, b2), (c3, b3), (c4, b4) = results
            assert (c1, b1["reason"]) == (403, "webhook_denied"), b1
            assert "answered 403" in b1["error"] and "\x1b" not in b1["error"]
            assert (c2, b2["reason"]) == (503, "webhook_unavailable"), b2
            assert (c3, b3["reason"]) == (503, "webhook_unavailable"), b3
            assert "no answer within 1 s" in b3["error"]
            assert c4 == 200 and b4["wg"]["client_ip"], b4
            sent = [json.loads(body) for _, _, body in hook.requests]
            assert len(sent) == 4 and all(s == sent[0] for s in sent)
            assert list(sent[0]) == UPSTREAM_FIELDS
            assert sent[0]["app_id"] == APP and sent[0]["instance_id"] == "22" * 20
            assert sent[0]["compose_hash"] == "c1" * 32 and sent[0]["device_id"] == ""
            assert len(sent[0]["mr_system"]) == 64 and len(sent[0]["mr_aggregated"]) == 64
            assert all(h["Authorization"] == f"Bearer {TOKEN}" for _, h, _ in hook.requests)
            assert [(r.app_id, r.instance_id) for r in registered] == [(APP, "22" * 20)]
            assert registered[0].evidence["mr_aggregated"] == sent[0]["mr_aggregated"]

    asyncio.run(scenario())
    assert TOKEN not in caplog.text
