"""``gateway control`` as a real process: serves the API, signals the proxy, stops on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from gateway.control.overlay import overlay_path, read_overlay
from tests.helpers.processes import free_port, start, stop_by_pid, wait_listening, wait_until

TOKEN = "cli-token-" + "c" * 22
# stands in for the proxy supervisor: counts the SIGHUPs it gets
LISTENER = """
import signal, sys, time
path = sys.argv[1]
def hup(*_):
    with open(path, "a") as f:
        f.write("hup\\n")
signal.signal(signal.SIGHUP, hup)
open(path, "a").close()
while True:
    time.sleep(0.05)
"""


@pytest.mark.slow
def test_control_process_serves_signals_and_stops(tmp_path: Path) -> None:
    port = free_port()
    stats = tmp_path / "stats"
    stats.mkdir()
    (stats / "worker-0.json").write_text(json.dumps({"open": 2, "accepted": 5, "errors": {"x": 1}}))
    (stats / "worker-1.json").write_text(json.dumps({"open": 1, "accepted": 7}))
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(
        f'[core]\ndata_dir = "{tmp_path / "data"}"\n'
        f'[admin]\nlisten = "127.0.0.1:{port}"\ntoken_env = "GW_TEST_CLI_TOKEN"\n'
    )
    hups = tmp_path / "hups"
    listener = start([sys.executable, "-c", LISTENER, str(hups)], tmp_path / "listener.log")
    log = tmp_path / "control.log"
    env = {**os.environ, "GW_TEST_CLI_TOKEN": TOKEN}
    cmd = [sys.executable, "-m", "gateway", "control", "--config", str(cfg)]
    proc = start([*cmd, "--notify-pid", str(listener.pid), "--stats-dir", str(stats)], log, env=env)
    try:
        wait_until(hups.exists, listener, 10, "the stand-in supervisor")
        wait_listening(proc, "127.0.0.1", port, timeout=20, log=log)
        # the first publication of /acme-info and /app-info reloads the workers once
        wait_until(lambda: hups.read_text().count("hup") == 1, listener, 5, "start SIGHUP")
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"X-Admin-Token": TOKEN}
        ) as client:
            status = client.get("/api/v1/status").json()
            assert status["connections"] == 3 and status["counters"]["accepted"] == 12
            assert 'gateway_connection_errors_total{reason="x"} 1' in client.get("/metrics").text
            r = client.post(
                "/api/v1/custom-domains",
                json={"domain": "shop.example.org", "app_id": "ab" * 20, "port": 443},
            )
            assert r.status_code == 201
        wait_until(lambda: hups.read_text().count("hup") == 2, listener, 5, "SIGHUP")
        overlay = read_overlay(overlay_path(tmp_path / "data"))  # what the workers re-read
        route = overlay.custom_route("shop.example.org")
        assert route is not None and route.port == 443
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, log.read_text()
        assert "control plane stopping" in log.read_text()
        assert TOKEN not in log.read_text()
    finally:
        stop_by_pid(proc)
        stop_by_pid(listener)


def test_control_refuses_bad_config(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[admin]\nlisten = "nowhere"\n')
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "control", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2 and "host:port" in out.stderr
