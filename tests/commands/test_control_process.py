"""The supervised control child: when serve starts it, restart after death, stop by PID."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from gateway.commands.control_process import ControlProcess, wants_control
from gateway.config import parse_config


def test_serve_runs_the_control_child_only_when_the_rpc_has_an_identity() -> None:
    assert not wants_control(parse_config(""))
    assert wants_control(parse_config("[rpc_identity]\ntee = 'sim'\nsim_dir = '/s'\n"))
    assert wants_control(parse_config("[rpc]\ncert_file = '/x.pem'\nkey_file = '/x.key'\n"))


def _reap(proc: ControlProcess, timeout: float = 10.0) -> int:
    """What the supervisor's loop does: waitpid, then hand the status to the owner."""
    assert proc.pid is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid, status = os.waitpid(proc.pid, os.WNOHANG)
        if pid:
            assert proc.owns(pid)
            proc.reaped(status)
            return status
        time.sleep(0.02)
    raise TimeoutError("child did not exit")


def test_a_dead_child_is_restarted_with_backoff_and_stopped_by_pid(tmp_path: Path) -> None:
    proc = ControlProcess(tmp_path / "gateway.toml", stop_grace=2.0)
    proc.argv = [sys.executable, "-c", "import time; time.sleep(60)"]  # stands in for rpc
    proc.start()
    first = proc.pid
    try:
        assert first is not None and os.getsid(first) == first  # own session: no Ctrl-C
        os.kill(first, signal.SIGKILL)
        _reap(proc)
        assert proc.pid is None and proc.restart_at is not None
        proc.tick()
        assert proc.pid is None  # not before the back-off (0.5 s)
        time.sleep(0.6)
        proc.tick()
        assert proc.pid is not None and proc.pid != first
        second = proc.pid
        proc.stop()
        assert proc.pid is None
        with pytest.raises(ProcessLookupError):
            os.kill(second, 0)  # stopped and reaped
        proc.tick()
        assert proc.pid is None  # never restarted once stopping
    finally:
        if proc.pid is not None:
            os.kill(proc.pid, signal.SIGKILL)
            os.waitpid(proc.pid, 0)
