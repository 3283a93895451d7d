"""Start child processes for tests and stop them by PID, never by name.

Each child runs in its own session (so a signal reaches its whole group), its output goes to
a log file that :func:`stop_by_pid` returns for attaching to a failing test, and readiness
checks fail at once if the child has already exited.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path


class ChildExited(RuntimeError):
    """The child process exited before it became ready."""


def start(
    cmd: Sequence[str], log: Path, *, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in a new session with stdout and stderr appended to ``log``."""
    with log.open("ab") as fh:
        return subprocess.Popen(
            list(cmd),
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
            cwd=cwd,
        )


def stop_by_pid(proc: subprocess.Popen[bytes], grace: float = 5.0) -> int | None:
    """SIGTERM the child's process group, wait ``grace`` seconds, then SIGKILL it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
    # reap stragglers left in the group (e.g. workers) by the group id we own
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode


def wait_until(
    pred: Callable[[], bool],
    proc: subprocess.Popen[bytes] | None,
    timeout: float,
    what: str,
    log: Path | None = None,
) -> None:
    """Poll ``pred`` until true; raise at once if ``proc`` exits, or after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
            raise ChildExited(f"process exited with {proc.returncode} before {what}\n{tail}")
        if pred():
            return
        time.sleep(0.05)
    tail = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}\n{tail}")


def port_open(host: str, port: int) -> bool:
    """True if a TCP connect to host:port succeeds now."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_listening(
    proc: subprocess.Popen[bytes] | None,
    host: str,
    port: int,
    timeout: float = 10.0,
    log: Path | None = None,
) -> None:
    wait_until(lambda: port_open(host, port), proc, timeout, f"{host}:{port} to listen", log)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host`` (the kernel picks it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running(
    cmd: Sequence[str],
    log: Path,
    *,
    ready: Callable[[], bool] | None = None,
    timeout: float = 10.0,
    env: dict[str, str] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """Context manager: start, wait for ``ready``, yield, always stop by PID."""
    proc = start(cmd, log, env=env)
    try:
        if ready is not None:
            wait_until(ready, proc, timeout, "readiness", log)
        yield proc
    finally:
        stop_by_pid(proc)
