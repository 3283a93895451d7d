"""benchmarks.registration_bench: its bookkeeping, and a real run with each load generator.

The smoke runs register a handful of simulated CVMs against the real RPC server (full
verification) and check that every registration succeeded on a connection of its own, as
counted by the server, and that the reported figures are positive. No rate is asserted: the
machine is shared.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.registration_bench import (
    Cvm,
    LoadResult,
    curl_config,
    parse_write_out,
    read_status,
    verdict,
)
from tests.helpers.processes import stop_by_pid

ROOT = Path(__file__).resolve().parents[2]


def test_parse_write_out_counts_statuses_and_connects() -> None:
    statuses, connects = parse_write_out("200 1\n200 1\n000 0\n503 1\n")
    assert statuses == {200: 2, 0: 1, 503: 1}
    assert connects == 3


@pytest.mark.parametrize(
    ("reply", "status"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n", 200),  # body in a second write
        (b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n", 403),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc", 0),  # body cut short
        (b"HTTP/1.1 200 OK\r\n", 0),  # headers cut short
        (b"SSH-2.0-x\r\n\r\n", 0),
    ],
)
def test_read_status(reply: bytes, status: int) -> None:
    a, b = socket.socketpair()
    with a, b:
        b.sendall(reply)
        if status == 200:
            b.sendall(b"body")
        b.shutdown(socket.SHUT_WR)
        assert read_status(a) == status


@pytest.mark.parametrize(
    ("statuses", "connects", "tls", "ok"),
    [
        ({200: 4}, 4, {"established": 4}, True),
        ({200: 4}, None, {"established": 4}, True),  # python: connects not counted
        ({200: 3, 503: 1}, 4, {"established": 4}, False),  # a non-200 fails the run
        ({200: 3, 0: 1}, 3, {"established": 3, "refused": 1}, False),  # a refused handshake
        ({200: 4}, 2, {"established": 2}, False),  # connections reused
        ({200: 4}, 4, {"established": 3}, False),  # the server saw fewer
        ({200: 5}, 5, {"established": 5}, False),  # more than asked for
    ],
)
def test_verdict(
    statuses: dict[int, int], connects: int | None, tls: dict[str, int], ok: bool
) -> None:
    assert verdict(4, LoadResult(statuses, connects, 0.1), tls) is ok


def test_curl_config_verifies_the_server_and_quotes_bodies(tmp_path: Path) -> None:
    cvm = Cvm(tmp_path / "c.pem", tmp_path / "k.pem", '{"client_public_key": "a\\"b"}')
    text = curl_config("https://127.0.0.1:1/prpc/RegisterCvm", tmp_path / "ca.pem", [cvm], 2)
    blocks = text.split("\nnext\n")
    assert len(blocks) == 2
    assert f'cacert = "{tmp_path / "ca.pem"}"' in blocks[1]
    assert "insecure" not in text and "-k" not in text.split()
    assert 'data-binary = "{\\"client_public_key\\": \\"a\\\\\\"b\\"}"' in blocks[0]
    assert 'header = "Connection: close"' in blocks[1] and "no-sessionid" in blocks[1]


def _bench(tmp_path: Path, *args: str) -> dict[str, object]:
    out, err = tmp_path / "out.json", tmp_path / "err.txt"
    with out.open("wb") as fo, err.open("wb") as fe:
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.registration_bench", "--cvms", "4", *args],
            stdout=fo,
            stderr=fe,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=ROOT,
        )
        try:
            code = proc.wait(timeout=120)
        finally:
            stop_by_pid(proc)  # the server child too (same session)
    assert code == 0, err.read_text()[-3000:]
    result: dict[str, object] = json.loads(out.read_text())
    return result


@pytest.mark.slow
@pytest.mark.parametrize(
    "args",
    [
        pytest.param(("--client", "curl", "--parallel", "4"), id="curl"),
        pytest.param(("--client", "python", "--clients", "2"), id="python"),
    ],
)
def test_smoke_every_registration_succeeds(tmp_path: Path, args: tuple[str, ...]) -> None:
    if args[1] == "curl" and shutil.which("curl") is None:
        pytest.fail("curl is required (Debian package curl)")
    got = _bench(tmp_path, "--rounds", "3", *args)
    assert got["passed"] is True
    assert got["registrations"] == got["ok_200"] == 12
    assert got["statuses"] == {"200": 12}
    assert got["server_tls_connections"] == {"established": 12}
    if args[1] == "curl":
        assert got["client_connects"] == 12
    for key in (
        "wall_s",
        "per_second_wall",
        "server_cpu_ms_per_registration",
        "client_cpu_ms_per_registration",
    ):
        value = got[key]
        assert isinstance(value, float) and value > 0, (key, value)
    assert isinstance(got["loadavg_before"], list) and len(got["loadavg_before"]) == 3
