"""``gateway demo`` starts with no arguments beyond a data dir, and its curl commands work."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.processes import free_port, start, stop_by_pid, wait_until

pytestmark = pytest.mark.slow


def test_demo_prints_working_curl_commands(tmp_path: Path) -> None:
    log = tmp_path / "demo.log"
    port = free_port()
    proc = start(
        [
            sys.executable,
            "-m",
            "gateway",
            "demo",
            "--data-dir",
            str(tmp_path / "d"),
            "--port",
            str(port),
            "--loopback",
        ],
        log,
    )
    try:
        wait_until(lambda: "listening" in log.read_text(), proc, 20, "demo gateway", log)
        commands = [
            line.strip() for line in log.read_text().splitlines() if line.strip().startswith("curl")
        ]
        assert len(commands) == 4
        outputs = []
        for cmd in commands:
            out = subprocess.run(
                [*shlex.split(cmd), "-sS", "--fail"], capture_output=True, timeout=20, check=True
            )
            outputs.append(out.stdout)
        assert b"plain TCP" in outputs[0]  # terminated at the gateway
        assert b"TLS" in outputs[1]  # passed through: the app terminated TLS itself
        assert b"h2c" in outputs[2]
        assert b"dstack gateway" in outputs[3]
        os.kill(proc.pid, signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=15) == 0
        assert "gateway proxy stopped" in log.read_text()
    finally:
        stop_by_pid(proc)
