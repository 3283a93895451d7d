from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
from aiohttp import web

from gateway.control.admin import create_admin_app, json_response
from gateway.control.auth import Credentials
from gateway.control.ctl import render
from gateway.control.routes import Endpoint
from tests.control.conftest import ServeApp

TOKEN = "ctl-token-" + "z" * 22


async def _list(_: web.Request) -> web.Response:
    return json_response([{"id": "a1", "ip": "10.0.0.2"}, {"id": "b2", "ip": None}])


async def _get(request: web.Request) -> web.Response:
    return json_response({"id": request.match_info["id"], "app": "x"})


@pytest.fixture
def admin_url(serve_app: ServeApp) -> str:
    creds = Credentials(token_digest=hashlib.sha256(TOKEN.encode()).digest())
    app = create_admin_app(
        creds,
        status=lambda: {"connections": 3},
        resources=[
            Endpoint("GET", "/api/v1/instances", _list, "list instances", "instances"),
            Endpoint("GET", "/api/v1/instances/{id}", _get, "one instance", "instances"),
        ],
    )
    return serve_app(app)


def ctl(url: str, *words: str, token: str | None = TOKEN) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("GATEWAY_ADMIN_TOKEN", None)
    if token:
        env["GATEWAY_ADMIN_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "gateway", "ctl", "--url", url, *words],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )


def test_ctl_lists_commands_from_the_api(admin_url: str) -> None:
    out = ctl(admin_url, "commands")
    assert out.returncode == 0, out.stderr
    assert "instances list" in out.stdout and "instances get" in out.stdout
    assert "status list" in out.stdout


def test_ctl_renders_tables_and_json(admin_url: str) -> None:
    out = ctl(admin_url, "instances", "list")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["ID", "IP"]
    assert lines[2].split() == ["b2", "-"]
    out = ctl(admin_url, "--json", "instances", "get", "a1")
    assert out.returncode == 0 and '"app": "x"' in out.stdout


def test_ctl_errors_are_actionable(admin_url: str) -> None:
    out = ctl(admin_url, "status", "list", token=None)
    assert out.returncode == 1 and "HTTP 401" in out.stderr and "--token-env" in out.stderr
    out = ctl(admin_url, "instances", "get")
    assert out.returncode == 2 and "takes 1 argument(s): ID" in out.stderr
    out = ctl(admin_url, "nope", "list")
    assert out.returncode == 2 and "gateway ctl commands" in out.stderr
    out = ctl("http://127.0.0.1:9", "status", "list")
    assert out.returncode == 1 and "cannot reach the admin API" in out.stderr


def test_render_shapes() -> None:
    assert render({"a": 1, "long_key": [1]}) == "a         1\nlong_key  [1]"
    assert render([]) == "(none)" and render({}) == "(empty)"
