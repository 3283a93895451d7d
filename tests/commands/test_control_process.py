"""The supervised control child: when serve starts it, restart after death, stop by PID."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.commands.control_process import ControlProcess, control_child

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]  # stands in for the node


def test_the_one_child_is_gateway_control(tmp_path: Path) -> None:
    child = control_child(tmp_path / "gateway.toml", 1234, tmp_path / "stats")
    assert child.command[1:] == [
        "-m", "gateway", "control", "--config", str((tmp_path / "gateway.toml").resolve()),
        "--notify-pid", "1234", "--stats-dir", str(tmp_path / "stats"),
    ]  # fmt: skip
    assert "--config" not in control_child(None, 1, tmp_path).command


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
    proc = ControlProcess(SLEEPER, stop_grace=2.0)
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


def test_the_child_goes_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG: a SIGKILLed supervisor leaves no control child behind."""
    script = (
        "import sys, time\n"
        "from gateway.commands.control_process import ControlProcess\n"
        "p = ControlProcess([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "p.start(); print(p.pid, flush=True); time.sleep(60)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, start_new_session=True
    )
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # wait for the exec: the child runs the command
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            if b"time.sleep" in cmdline and b"control_process" not in cmdline:
                break  # exec'd: the command itself (empty while an exec is under way)
            time.sleep(0.02)
        assert b"time.sleep" in cmdline and b"control_process" not in cmdline
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=5)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _alive(child):
            time.sleep(0.05)
        assert not _alive(child), "the control child outlived its supervisor"
    finally:
        if parent.poll() is None:
            os.kill(parent.pid, signal.SIGKILL)
            parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for init to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(errors="replace")
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
