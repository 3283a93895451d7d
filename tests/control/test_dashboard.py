"""The dashboard rendered by a real browser (Debian's chromium, headless)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from gateway.control.admin import create_admin_app
from gateway.control.auth import Credentials
from gateway.control.dashboard import DASHBOARD
from tests.control.conftest import ServeApp

TOKEN = "dash-token-" + "q" * 21
CHROMIUM = shutil.which("chromium")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is installed by scripts/setup.sh"),
]

STATUS: dict[str, Any] = {
    "node": {"id": "gw-test-node", "version": "0.1.0"},
    "counters": {"connections_total": 4242, "tls_errors": 3},
    "instances": [
        {"instance_id": "inst0001", "app_id": "<img src=x onerror=alert(1)>", "ip": "10.4.0.2"},
        {"instance_id": "inst0002", "app_id": "app-two", "ip": "10.4.0.3"},
    ],
    "domains": [{"domain": "apps.example.test", "not_after": "2027-01-01", "days_left": 36}],
}


def chromium(url: str, tmp: Path, *extra: str) -> str:
    assert CHROMIUM is not None
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp / 'profile'}",
        "--virtual-time-budget=5000",
        *extra,
        url,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    return out.stdout


@pytest.fixture
def dashboard_url(serve_app: ServeApp) -> str:
    creds = Credentials(token_digest=hashlib.sha256(TOKEN.encode()).digest())
    app = create_admin_app(creds, status=lambda: STATUS, dashboard=DASHBOARD)
    return serve_app(app)


def test_dashboard_renders_status(dashboard_url: str, tmp_path: Path) -> None:
    authed = dashboard_url.replace("http://", f"http://admin:{TOKEN}@")
    dom = chromium(authed + "/", tmp_path, "--dump-dom")
    assert "id: gw-test-node · version: 0.1.0" in dom
    assert "<b>4242</b><span>connections_total</span>" in dom
    assert "<td>inst0002</td><td>app-two</td><td>10.4.0.3</td>" in dom
    assert "<td>apps.example.test</td>" in dom
    # hostile strings are text, never markup
    assert "<td>&lt;img src=x onerror=alert(1)&gt;</td>" in dom
    shot = tmp_path / "dashboard.png"
    chromium(authed + "/", tmp_path, f"--screenshot={shot}", "--window-size=1000,700")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def test_dashboard_needs_credentials(dashboard_url: str, tmp_path: Path) -> None:
    import httpx

    assert httpx.get(dashboard_url + "/").status_code == 401
    dom = chromium(dashboard_url + "/", tmp_path, "--dump-dom")  # the browser gets no page
    assert "gw-test-node" not in dom and "Counters" not in dom
