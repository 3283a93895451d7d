"""``gateway guest boot`` then ``gateway guest agent`` as real processes; the docker runner."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from dstack_sdk import DstackClient

from gateway.guest.identity import AppCompose
from gateway.guest.runner import DockerComposeRunner, RunnerError
from tests.helpers.processes import running


@pytest.mark.slow
def test_boot_then_agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    compose = {"manifest_version": 2, "name": "cli-app", "runner": "bash", "key_provider": "none"}
    (shared / "app-compose.json").write_text(json.dumps(compose))
    (shared / ".sys-config.json").write_text("{}")
    work = tmp_path / "work"
    base = [sys.executable, "-m", "gateway", "guest"]
    boot = subprocess.run(
        [*base, "boot", "--host-shared", str(shared), "--work-dir", str(work), "--runner", "none"],
        capture_output=True,
        timeout=60,
    )
    assert boot.returncode == 0, boot.stderr.decode()
    assert b"boot done" in boot.stderr
    sock = tmp_path / "dstack.sock"
    log = tmp_path / "agent.log"
    api = tmp_path / "guest-api.sock"
    cmd = [
        *base,
        "agent",
        "--work-dir",
        str(work),
        "--socket",
        str(sock),
        "--guest-api-socket",
        str(api),
        "--register",  # the gateway is not enabled in app-compose: the agent serves alone
    ]
    with running(cmd, log, ready=lambda: sock.exists() and api.exists(), timeout=20) as agent:
        monkeypatch.setenv("DSTACK_SIMULATOR_ENDPOINT", str(sock))
        client = DstackClient()
        client.__enter__()
        try:
            info = client.info()
        finally:
            client.__exit__(None, None, None)
        # the Guest API's Shutdown stops the agent cleanly
        transport = httpx.HTTPTransport(uds=str(api))
        with httpx.Client(transport=transport, base_url="http://localhost") as http:
            r = http.post("/api/Shutdown", json={})
            assert r.status_code == 200 and r.text == "null"
        assert agent.wait(timeout=15) == 0
    assert "gateway_enabled is false in app-compose: not registering" in log.read_text()
    assert not (work / "gateway").exists()
    assert info.app_name == "cli-app"
    assert (
        info.compose_hash == AppCompose.parse((shared / "app-compose.json").read_bytes()).hash.hex()
    )
    # a failing boot exits 1 with the reason
    (shared / ".sys-config.json").write_text("[")
    bad = subprocess.run(
        [*base, "boot", "--host-shared", str(shared), "--work-dir", str(tmp_path / "w2")],
        capture_output=True,
        timeout=60,
    )
    assert bad.returncode == 1 and b".sys-config.json: is not valid JSON" in bad.stderr


def test_docker_runner_command(tmp_path: Path) -> None:
    """No docker daemon here: a stand-in ``docker`` records how it is called."""
    fake = tmp_path / "docker"
    fake.write_text('#!/bin/sh\necho "$@" > docker-args.txt\necho "$API_KEY" > docker-env.txt\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    work = tmp_path / "work"
    work.mkdir()
    compose = AppCompose.parse(
        json.dumps(
            {
                "manifest_version": 2,
                "name": "d",
                "runner": "docker-compose",
                "docker_compose_file": "services: {}",
                "pre_launch_script": "echo pre >> pre.txt",
                "init_script": "echo init > pre.txt",
            }
        ).encode()
    )
    runner = DockerComposeRunner(docker=str(fake), timeout=10)
    asyncio.run(runner.pre_launch(compose, {"API_KEY": "k"}, work))
    asyncio.run(runner.start(compose, {"API_KEY": "k"}, work))
    assert (work / "pre.txt").read_text() == "init\npre\n"  # init scripts run first
    assert (work / "docker-args.txt").read_text() == (
        "compose -f docker-compose.yaml up --remove-orphans -d --build\n"
    )
    assert (work / "docker-env.txt").read_text() == "k\n"
    failing = AppCompose.parse(
        json.dumps({"manifest_version": 2, "name": "d", "runner": "docker-compose",
                    "docker_compose_file": "x", "pre_launch_script": "exit 3"}).encode()
    )  # fmt: skip
    with pytest.raises(RunnerError, match="exited with status 3"):
        asyncio.run(runner.pre_launch(failing, {}, work))
    assert os.path.exists(work / "pre-launch.log")
