from __future__ import annotations

import json

import pytest

from gateway.proxy.endpoints import MAX_HEAD, GatewayInfo, respond

INFO = GatewayInfo({"acme-info": b'{"account_uri":"x"}'})


def req(line: str) -> bytes:
    return f"{line}\r\nHost: gateway.example\r\n\r\n".encode()


@pytest.mark.parametrize(
    ("line", "status", "body"),
    [
        ("GET /health HTTP/1.1", 200, b""),
        (
            "GET /index HTTP/1.1",
            200,
            b'{"type":"dstack gateway","paths":["/index","/app-info","/acme-info"]}',
        ),
        ("GET /.dstack/index HTTP/1.1", 200, None),
        ("GET /acme-info HTTP/1.1", 200, b'{"account_uri":"x"}'),
        ("GET /.dstack/acme-info?x=1 HTTP/1.0", 200, b'{"account_uri":"x"}'),
        ("GET /app-info HTTP/1.1", 503, None),
        ("POST /index HTTP/1.1", 405, None),
        ("GET /nope HTTP/1.1", 404, None),
        ("GARBAGE", 400, None),
    ],
)
def test_routes(line: str, status: int, body: bytes | None) -> None:
    out = respond(req(line), INFO)
    assert out is not None
    head, _, got = out.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode())
    assert b"Connection: close" in head
    assert f"Content-Length: {len(got)}".encode() in head
    if body is not None:
        assert got == body
    if status >= 400:
        assert "error" in json.loads(got)


def test_incomplete_head_waits_and_oversized_head_is_refused() -> None:
    assert respond(b"GET /health HTTP/1.1\r\nHost: x\r\n", INFO) is None
    out = respond(b"GET /" + b"a" * MAX_HEAD, INFO)
    assert out is not None and out.startswith(b"HTTP/1.1 431")


@pytest.mark.parametrize(("line", "status"), [("GET / HTTP/1.1", 200), ("GET /x HTTP/1.1", 404)])
def test_legacy_health(line: str, status: int) -> None:
    out = respond(req(line), INFO, legacy_health=True)
    assert out is not None and out.startswith(f"HTTP/1.1 {status}".encode())


def test_a_missing_document_says_why() -> None:
    info = GatewayInfo({}, {"app-info": "no TEE backend is configured"})
    out = respond(req("GET /app-info HTTP/1.1"), info)
    assert out is not None and out.startswith(b"HTTP/1.1 503")
    assert "no TEE backend is configured" in json.loads(out.partition(b"\r\n\r\n")[2])["error"]
    out = respond(req("GET /acme-info HTTP/1.1"), info)
    assert out is not None and b"has not published it" in out
