"""``gateway demo --lab``: booted CVMs register with ``gateway serve`` and its curl lines work.

This is the guest's full lab boot end to end: ``guest boot`` from a generated host-shared
folder, ``guest agent --register`` (the agent runs the registration client itself), the
gateway's RPC admits the CVM, and an HTTPS client reaches the app through the tunnel, for a
terminated and for a passed-through name. Ctrl-C must leave no namespace behind.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.commands.demo_lab import lab_available
from tests.helpers.processes import start, stop_by_pid, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.netns]


def test_lab_demo_boots_registers_and_serves_https(tmp_path: Path) -> None:
    why_not = lab_available()
    if why_not is not None:
        pytest.skip(why_not)
    log = tmp_path / "demo.log"
    argv = [sys.executable, "-m", "gateway", "demo", "--lab", "--lab-prefix", "gwk"]
    proc = start([*argv, "--data-dir", str(tmp_path / "d")], log)
    try:
        wait_until(lambda: "Lab up" in log.read_text(), proc, 90, "the lab demo", log)
        text = log.read_text()
        netns = re.search(r"gateway namespace (\S+),", text)
        assert netns is not None
        commands = [
            line.strip() for line in text.splitlines() if line.strip().startswith("ip netns exec")
        ]
        assert len(commands) == 2
        outputs = []
        for cmd in commands:
            out = subprocess.run(
                [*shlex.split(cmd), "-sS", "--fail"], capture_output=True, timeout=20
            )
            assert out.returncode == 0, out.stderr
            outputs.append(out.stdout)
        assert b'"instance": "gwk' in outputs[0]  # a CVM's origin, over the tunnel
        assert b"TLS" in outputs[1]  # the app's own TLS, passed through
        for i in (1, 2):  # the agents registered (their registrar status files)
            status = tmp_path / "d" / "lab" / f"cvm{i}" / "work" / "gateway"
            assert (status / "registrar-status.json").exists()
        # one control child serves the attested RPC; no admin credentials: the API is off
        serve_log = (tmp_path / "d" / "lab" / "serve.log").read_text()
        assert serve_log.count("control process started") == 1, serve_log[-3000:]
        assert "admin API is OFF" in serve_log and "admin API listening" not in serve_log
        os.kill(proc.pid, signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=60) == 0
        assert "tearing down" in log.read_text()
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert netns.group(1)[:-1] not in left  # every namespace of this lab is gone
    finally:
        stop_by_pid(proc, grace=30)
