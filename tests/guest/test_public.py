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
from tests.helpers.processes import free_port

from .conftest import serve_tcp, serve_unix


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
