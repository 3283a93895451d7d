"""``gateway lab up`` in the foreground: registered, connected, reachable, gone on SIGTERM."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.tunnel.commands import run
from tests.helpers.processes import start, stop_by_pid, wait_until

pytestmark = [pytest.mark.netns, pytest.mark.slow]


def test_lab_up_status_and_sigterm(lab_env: None, tmp_path: Path) -> None:
    log = tmp_path / "lab.log"
    cmd = [sys.executable, "-m", "gateway", "lab", "up", "--cvms", "2", "--prefix", "gwh"]
    proc = start([*cmd, "--workdir", str(tmp_path / "work")], log)
    try:
        wait_until(lambda: b"running;" in log.read_bytes(), proc, 30, "lab up", log)
        text = log.read_text()
        urls = re.findall(r"ip netns exec (\S+) curl (\S+)", text)
        assert len(urls) == 2
        for netns, url in urls:
            body = run(["ip", "netns", "exec", netns, "curl", "-sS", "-m", "3", url]).stdout
            assert json.loads(body)["instance"].startswith(netns[:-1])
        status = subprocess.run(
            [sys.executable, "-m", "gateway", "lab", "status", "--prefix", "gwh"],
            capture_output=True,
            text=True,
            check=True,
        )
        labs = json.loads(status.stdout)["labs"]
        assert {"base": urls[0][0][:-1], "owner_pid": proc.pid, "owner_alive": True} in labs
    finally:
        assert stop_by_pid(proc, grace=10) == 0
    namespaces = run(["ip", "netns", "list"]).stdout
    assert urls[0][0] not in namespaces
