"""Operator observability against real processes: ``/metrics`` from live workers, JSON logs.

1. A real ``gateway serve`` (one worker and its ``gateway control`` child): real TLS clients
   complete, refuse (unknown CA) and stall handshakes, hold a connection open; ``/metrics``
   on the admin listener shows the handshake counters by reason and the app's open
   connection, and ``/ready`` answers 200 with its checks.
2. ``gateway control`` alone with ``core.log_format = "json"``: every line it writes is a
   JSON object, admin requests are logged with their request id (the caller's when it sent
   a plain one), auth failures too, and never the token.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.control.test_collectors import samples
from tests.helpers.gateway import (
    BASE,
    Origin,
    gateway_port,
    get,
    make_certs,
    run_origin,
    tls_connect,
    write_config,
)
from tests.helpers.processes import free_port, start, stop_by_pid, wait_listening, wait_until

pytestmark = pytest.mark.slow
TOKEN = "obs-e2e-token-" + "o" * 18


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("obs")


@pytest.fixture(scope="module")
def origin(root: Path) -> Iterator[Origin]:
    make_certs(root)
    with run_origin(root) as o:
        yield o


def test_live_handshake_and_connection_metrics(root: Path, origin: Origin) -> None:
    ca, _ = make_certs(root)
    admin_port = free_port()
    cfg = write_config(
        root,
        "obs",
        origin,
        workers=1,
        extra=f"[admin]\nlisten = '127.0.0.1:{admin_port}'\ntoken_env = 'GW_TEST_OBS_TOKEN'\n",
    )
    log = root / "obs.log"
    port = gateway_port(cfg)
    env = {**os.environ, "GW_TEST_OBS_TOKEN": TOKEN}
    proc = start([sys.executable, "-m", "gateway", "serve", "--config", str(cfg)], log, env=env)
    admin = httpx.Client(
        base_url=f"http://127.0.0.1:{admin_port}", headers={"X-Admin-Token": TOKEN}, timeout=10
    )
    name = f"app-{origin.http}.{BASE}"
    try:
        wait_listening(proc, "127.0.0.1", port, timeout=20, log=log)
        wait_listening(proc, "127.0.0.1", admin_port, timeout=20, log=log)
        ready = httpx.get(f"http://127.0.0.1:{admin_port}/ready", timeout=10)
        assert ready.status_code == 200 and ready.json()["checks"]["store"]["ready"], ready.text
        for _ in range(2):
            with tls_connect(port, name, ca) as s:
                assert get(s, "/health")[1] == b"ok"
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        with pytest.raises(ssl.SSLCertVerificationError):  # the dev CA is not trusted here
            ssl.create_default_context().wrap_socket(raw, server_hostname=name)
        raw.close()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as stall:
            out = ssl.MemoryBIO()
            client = ssl.create_default_context().wrap_bio(
                ssl.MemoryBIO(), out, server_hostname=name
            )
            with pytest.raises(ssl.SSLWantReadError):
                client.do_handshake()
            stall.sendall(out.read())  # a ClientHello, then silence: the 1 s timeout hits
            while stall.recv(65536):
                pass
        held = tls_connect(port, name, ca)
        assert get(held, "/health")[1] == b"ok"

        def scraped() -> str:
            return admin.get("/metrics").text

        def settled() -> bool:
            text = scraped()
            failures = samples(text, "gateway_tls_handshake_failures_total")
            return (
                samples(text, "gateway_tls_handshakes_total").get((), 0) >= 3
                and failures.get((("reason", "tlsv1_alert_unknown_ca"),), 0) >= 1
                and failures.get((("reason", "timeout"),), 0) >= 1
                and samples(text, "gateway_app_connections_open").get((("app_id", "app"),)) == 1
            )

        wait_until(settled, proc, 10, "handshake and connection metrics", log)
        status = admin.get("/api/v1/status").json()
        assert {"app_id": "app", "instances": 0, "online": 0, "connections": 1} in status["apps"]
        held.close()
        wait_until(
            lambda: not samples(scraped(), "gateway_app_connections_open"),
            proc,
            10,
            "the closed connection leaves the gauge",
            log,
        )
    finally:
        admin.close()
        stop_by_pid(proc, grace=10)
    assert TOKEN not in log.read_text()


def test_control_json_logs_carry_request_ids(root: Path) -> None:
    admin_port = free_port()
    cfg = root / "json.toml"
    cfg.write_text(
        "[core]\n"
        f"data_dir = '{root / 'json'}'\n"
        "log_format = 'json'\n"
        "log_level = 'info'\n"
        "[admin]\n"
        f"listen = '127.0.0.1:{admin_port}'\n"
        "token_env = 'GW_TEST_OBS_TOKEN'\n"
    )
    log = root / "json.log"
    env = {**os.environ, "GW_TEST_OBS_TOKEN": TOKEN}
    proc = start([sys.executable, "-m", "gateway", "control", "--config", str(cfg)], log, env=env)
    base = f"http://127.0.0.1:{admin_port}"
    try:
        wait_listening(proc, "127.0.0.1", admin_port, timeout=20, log=log)
        h = {"X-Admin-Token": TOKEN}
        r = httpx.get(base + "/api/v1/status", headers={**h, "X-Request-Id": "ops-req-42"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "ops-req-42"
        generated = httpx.get(base + "/metrics", headers=h).headers["x-request-id"]
        refused = httpx.get(base + "/api/v1/status", headers={"X-Admin-Token": "wrong" * 4})
        assert refused.status_code == 401
        bad_id = refused.headers["x-request-id"]

        def access_lines() -> list[dict[str, object]]:
            return [d for d in _json_lines(log) if d.get("logger") == "gateway.admin.access"]

        wait_until(lambda: len(access_lines()) >= 3, proc, 10, "access log lines", log)
    finally:
        stop_by_pid(proc, grace=10)
    lines = _json_lines(log)  # raises if any line is not JSON
    by_id = {d.get("request_id"): d for d in lines if d.get("logger") == "gateway.admin.access"}
    assert "GET /api/v1/status 200" in str(by_id["ops-req-42"]["msg"])
    assert by_id["ops-req-42"]["remote"] == "127.0.0.1"
    assert "GET /metrics 200" in str(by_id[generated]["msg"])
    assert "401" in str(by_id[bad_id]["msg"])
    auth = [d for d in lines if d.get("logger") == "gateway.control.auth"]
    assert auth and auth[0]["request_id"] == bad_id and auth[0]["level"] == "warning"
    assert all({"ts", "level", "logger", "msg"} <= set(d) for d in lines)
    text = log.read_text()
    assert TOKEN not in text and "wrongwrong" not in text


def _json_lines(log: Path) -> list[dict[str, object]]:
    out = []
    for line in log.read_text().splitlines():
        if line.strip():
            doc = json.loads(line)
            assert isinstance(doc, dict), line
            out.append(doc)
    return out
