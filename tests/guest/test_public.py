"""Public port visibility and rate limiting; host API notifications during a boot."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from gateway.guest.boot import Boot, BootError
from gateway.guest.hostapi import HostApi
from gateway.guest.keys import NoneKeyProvider
from gateway.guest.public import RateLimiter, create_public_app
from gateway.guest.service import AgentService
from gateway.tee.sim import SimTee
from gateway.tee.sim_pki import SimPki
from tests.helpers.processes import free_port, wait_until

from .conftest import serve_tcp, serve_unix, verify


def test_rate_limiter_refills() -> None:
    now = [0.0]
    limiter = RateLimiter(rate=2.0, burst=3.0, clock=lambda: now[0])
    assert [limiter.allow("a") for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("b")  # per client
    now[0] += 0.5
    assert limiter.allow("a") and not limiter.allow("a")


@pytest.fixture
def public(service: AgentService) -> Iterator[str]:
    port = free_port()
    app = create_public_app(service, None, RateLimiter(rate=1.0, burst=5.0))
    with serve_tcp(app, port):
        yield f"http://127.0.0.1:{port}"


def test_public_port_hides_what_compose_keeps_private(public: str) -> None:
    with httpx.Client(base_url=public) as http:
        info = http.get("/prpc/Worker.Info").json()
        assert info["tcb_info"] == "" and info["vm_config"] == ""  # public_tcbinfo: false
        assert http.post("/prpc/Info?json", content=b"{}").json()["app_id"] == info["app_id"]
        assert http.get("/metrics").status_code == 404  # public_sysinfo: false
        page = http.get("/")
        assert page.headers["X-App-Version"] and "TCB info is not public" in page.text
        statuses = [http.get("/prpc/Worker.Version").status_code for _ in range(5)]
        assert statuses[-1] == 429


def test_boot_reports_progress_to_the_host_api(tmp_path: Path, tee: SimTee) -> None:
    seen: list[tuple[str, str]] = []

    async def notify(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append((body["event"], body["payload"]))
        return web.json_response(None)

    app = web.Application()
    app.router.add_post("/api/Notify", notify)
    host_sock = tmp_path / "host-api.sock"
    shared = tmp_path / "shared"
    shared.mkdir()
    compose = {"manifest_version": 2, "name": "n", "runner": "bash", "key_provider": "none"}
    (shared / "app-compose.json").write_text(json.dumps(compose))
    (shared / ".sys-config.json").write_text("{}")
    with serve_unix(app, host_sock):
        asyncio.run(
            Boot(
                host_shared=shared,
                work_dir=tmp_path / "work",
                tee=tee,
                key_provider=lambda c: NoneKeyProvider(),
                host_api=HostApi(f"unix:{host_sock}"),
            ).run()
        )
        broken = shared / "app-compose.json"
        broken.write_text("{")
        with pytest.raises(BootError, match="not valid JSON"):
            asyncio.run(
                Boot(
                    host_shared=shared,
                    work_dir=tmp_path / "work2",
                    tee=tee,
                    key_provider=lambda c: NoneKeyProvider(),
                    host_api=HostApi(f"unix:{host_sock}"),
                ).run()
            )
    events = [e for e, _ in seen]
    assert events[:3] == ["boot.progress", "instance.info", "boot.progress"]
    assert seen[0][1] == "requesting app keys" and seen[2][1] == "done"
    info = json.loads(seen[1][1])
    assert list(info) == ["instance_id_seed", "instance_id", "app_id"]
    assert seen[-1][0] == "boot.error" and "not valid JSON" in seen[-1][1]


def test_host_api_from_sys_config_must_be_vsock(tmp_path: Path, tee: SimTee) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    compose = {"manifest_version": 2, "name": "n", "runner": "bash", "key_provider": "none"}
    (shared / "app-compose.json").write_text(json.dumps(compose))
    (shared / ".sys-config.json").write_text(json.dumps({"host_api_url": "http://10.0.0.1/api"}))
    b = Boot(
        host_shared=shared,
        work_dir=tmp_path / "work",
        tee=tee,
        key_provider=lambda c: NoneKeyProvider(),
        host_api_from_sys_config=True,
    )
    asyncio.run(b.run())
    assert b.host_api is None  # a hostile host cannot point notifications at anything else


@pytest.mark.parametrize(
    ("algorithm", "prefix"), [("ed25519", b"dip1::ed25519-pk:"), ("k256", b"dip1::secp256k1c-pk:")]
)
def test_attestation_for_app_key(
    public: str, service: AgentService, sim_pki: SimPki, algorithm: str, prefix: bytes
) -> None:
    import base64

    with httpx.Client(base_url=public) as http:
        got = http.post(
            "/prpc/Worker.GetAttestationForAppKey?json", json={"algorithm": algorithm}
        ).json()
        assert (
            http.post("/prpc/GetAttestationForAppKey?json", json={"algorithm": "rsa"}).status_code
            == 400
        )
    signed = service.sign("ed25519" if algorithm == "ed25519" else "secp256k1", b"x")
    pub = bytes.fromhex(signed["public_key"])
    want = (prefix + base64.urlsafe_b64encode(pub).rstrip(b"=")).ljust(64, b"\0")
    assert bytes.fromhex(got["report_data"]) == want
    assert verify(bytes.fromhex(got["quote"]), sim_pki).report_data == want


def test_logs_only_when_public(tmp_path: Path, service: AgentService) -> None:
    from dataclasses import replace

    from gateway.guest.identity import AppCompose
    from gateway.guest.runner import LocalProcessRunner

    work = tmp_path / "work"
    work.mkdir()
    script = "for i in 1 2 3; do echo line$i; done; echo stderr=$K >&2"
    doc = {
        "manifest_version": 2,
        "name": "logger",
        "runner": "bash",
        "public_logs": True,
        "bash_script": script,
    }
    compose = AppCompose.parse(json.dumps(doc).encode())
    runner = LocalProcessRunner()
    asyncio.run(runner.start(compose, {"K": "v"}, work))
    svc = AgentService(replace(service.state, compose=compose), service.tee)
    port = free_port()
    try:
        with serve_tcp(create_public_app(svc, runner), port), httpx.Client() as http:
            base = f"http://127.0.0.1:{port}"
            wait_until(lambda: b"stderr" in (work / "app.log").read_bytes(), None, 10, "output")
            assert http.get(f"{base}/logs/logger?tail=2").text == "line3\nstderr=v\n"
            assert http.get(f"{base}/logs/other").status_code == 404
            assert "<a href='/logs/logger?tail=20'>logger</a>" in http.get(base + "/").text
        private = AgentService(service.state, service.tee)  # public_logs absent
        port2 = free_port()
        with serve_tcp(create_public_app(private, runner), port2), httpx.Client() as http:
            assert http.get(f"http://127.0.0.1:{port2}/logs/logger").status_code == 404
    finally:
        asyncio.run(runner.stop())
