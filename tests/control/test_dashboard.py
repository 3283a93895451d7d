"""The dashboard rendered by a real browser (Debian's chromium, headless).

Two looks at the same page: ``--dump-dom`` (the DOM after the page's script fetched the
status and built its tables) for exact content, and ``--screenshot`` decoded here (a minimal
PNG reader on zlib, no image library) to prove the pixels are a rendered page: the page
background, white tables, dark text, enough distinct colours, not a blank or error page.
"""

from __future__ import annotations

import hashlib
import shutil
import struct
import subprocess
import zlib
from collections import Counter
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
    "apps": [
        {"app_id": "app-two", "instances": 1, "online": 1, "connections": 17},
    ],
    "instances": [
        {"instance_id": "inst0001", "app_id": "<img src=x onerror=alert(1)>", "ip": "10.4.0.2"},
        {"instance_id": "inst0002", "app_id": "app-two", "ip": "10.4.0.3", "app_connections": 17},
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
    assert "<td>inst0002</td><td>app-two</td><td>10.4.0.3</td><td>17</td>" in dom
    assert "<th>app_connections</th>" in dom
    assert "<th>app_id</th><th>instances</th><th>online</th><th>connections</th>" in dom
    assert "<td>app-two</td><td>1</td><td>1</td><td>17</td>" in dom
    assert "<td>apps.example.test</td>" in dom
    # hostile strings are text, never markup
    assert "<td>&lt;img src=x onerror=alert(1)&gt;</td>" in dom
    shot = tmp_path / "dashboard.png"
    chromium(authed + "/", tmp_path, f"--screenshot={shot}", "--window-size=1000,700")
    width, height, pixels = decode_png(shot.read_bytes())
    assert (width, height) == (1000, 700)
    assert_rendered_page(pixels)


def test_screenshot_check_rejects_a_page_without_data(serve_app: ServeApp, tmp_path: Path) -> None:
    """The pixel check is not a formality: the same page whose status fetch fails (so no
    tiles or tables are drawn) fails it, and so does a blank image."""

    def broken() -> dict[str, Any]:
        raise RuntimeError("status source down")

    creds = Credentials(token_digest=hashlib.sha256(TOKEN.encode()).digest())
    url = serve_app(create_admin_app(creds, status=broken, dashboard=DASHBOARD))
    authed = url.replace("http://", f"http://admin:{TOKEN}@")
    assert "status unavailable: HTTP 500" in chromium(authed + "/", tmp_path, "--dump-dom")
    shot = tmp_path / "empty.png"
    chromium(authed + "/", tmp_path, f"--screenshot={shot}", "--window-size=1000,700")
    _, _, pixels = decode_png(shot.read_bytes())
    with pytest.raises(AssertionError, match="no tables"):
        assert_rendered_page(pixels)
    with pytest.raises(AssertionError):
        assert_rendered_page([(255, 255, 255)] * (100 * 100))


PAGE_BG = (0xF6, 0xF7, 0xF9)  # body background in dashboard.html
TABLE_BG = (0xFF, 0xFF, 0xFF)  # tables and tiles


def assert_rendered_page(pixels: list[tuple[int, int, int]]) -> None:
    """The screenshot shows the dashboard: its background, white tables, dark text."""
    counts = Counter(pixels)
    n = len(pixels)
    assert counts[PAGE_BG] > 0.3 * n, "the page background is missing"
    assert counts[TABLE_BG] > 0.03 * n, "no tables or tiles were drawn"
    dark = sum(c for (r, g, b), c in counts.items() if r + g + b < 300)
    assert dark > 0.005 * n, "no text was drawn"
    assert len(counts) >= 16, "too few colours for a rendered page"


def decode_png(data: bytes) -> tuple[int, int, list[tuple[int, int, int]]]:
    """Width, height and RGB pixels of an 8-bit, non-interlaced RGB or RGBA PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, bytearray(), b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        assert zlib.crc32(kind + body) == struct.unpack(">I", data[pos + 8 + length :][:4])[0]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
        pos += 12 + length
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and color in (2, 6) and interlace == 0, (depth, color, interlace)
    bpp = 3 if color == 2 else 4
    stride = width * bpp
    raw = zlib.decompress(bytes(idat))
    prev = bytearray(stride)
    pixels: list[tuple[int, int, int]] = []
    for y in range(height):
        ftype = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if ftype == 1:
                line[i] = (line[i] + a) & 0xFF
            elif ftype == 2:
                line[i] = (line[i] + b) & 0xFF
            elif ftype == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif ftype == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
                line[i] = (line[i] + pred) & 0xFF
        pixels.extend((line[x * bpp], line[x * bpp + 1], line[x * bpp + 2]) for x in range(width))
        prev = line
    return width, height, pixels


def test_dashboard_needs_credentials(dashboard_url: str, tmp_path: Path) -> None:
    import httpx

    assert httpx.get(dashboard_url + "/").status_code == 401
    dom = chromium(dashboard_url + "/", tmp_path, "--dump-dom")  # the browser gets no page
    assert "gw-test-node" not in dom and "Counters" not in dom
