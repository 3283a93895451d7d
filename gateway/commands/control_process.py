"""The control process as a child of ``gateway serve``: ``gateway control``, supervised.

``gateway serve`` runs the whole gateway in one command: the proxy supervisor with its
workers and at most one control child, ``gateway control`` (:mod:`gateway.control.node`),
which runs whatever the configuration asks of the control node
(:func:`gateway.control.roles.node_roles`): the registration RPC with its attested RA-TLS
identity (``[rpc_identity] tee``) or certificate file, the WireGuard device and registry
maintenance, the certbot, and the admin API when it has credentials. The proxy and the
child share the registry database (the workers read it, ``proxy.registry_routes``), the
routing overlay file, and signals: the child sends SIGHUP to the supervisor after a change.

Why a separate process rather than a thread or a task in the supervisor: the supervisor forks
workers, and forking with an event loop or threads alive is unsafe; the child is started with
``posix_spawn`` (a fresh interpreter) in its own session, so a terminal's Ctrl-C reaches only
the supervisor, which stops the child by PID after the workers drained. The supervisor reaps
it like a worker and restarts it with back-off if it dies. The child first runs this module's
``main`` (``PR_SET_PDEATHSIG``: SIGTERM when the supervisor dies, even by SIGKILL), which then
execs ``gateway control`` in the same process, so the PID the supervisor tracks stays the same.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from pathlib import Path

__all__ = ["ControlProcess", "control_child"]

logger = logging.getLogger(__name__)

_BACKOFF = (0.5, 1.0, 2.0, 5.0, 10.0)


def control_child(config: Path | None, supervisor_pid: int, stats_dir: Path) -> ControlProcess:
    """``gateway control`` as ``gateway serve``'s supervised child: it signals the supervisor
    (``--notify-pid``) and reads the workers' counters (``--stats-dir``)."""
    cmd = [sys.executable, "-m", "gateway", "control"]
    if config is not None:
        cmd += ["--config", str(config.resolve())]
    cmd += ["--notify-pid", str(supervisor_pid), "--stats-dir", str(stats_dir)]
    return ControlProcess(cmd, label="control process", stop_grace=15.0)


class ControlProcess:
    """One supervised child of ``gateway serve`` (see the module doc) running ``command``."""

    def __init__(
        self, command: list[str], *, label: str = "control process", stop_grace: float = 10.0
    ) -> None:
        self.command = command
        self.label = label
        self.stop_grace = stop_grace
        self.pid: int | None = None
        self.started_at = 0.0
        self.failures = 0
        self.restart_at: float | None = None
        self.stopping = False

    def start(self) -> None:
        argv = [sys.executable, "-m", __name__, str(os.getpid()), "--", *self.command]
        self.pid = os.posix_spawn(argv[0], argv, dict(os.environ), setsid=True)
        self.started_at = time.monotonic()
        self.restart_at = None
        logger.info("%s started, pid %d", self.label, self.pid)

    def owns(self, pid: int) -> bool:
        return pid == self.pid

    def reaped(self, status: int) -> None:
        """The supervisor reaped our child: schedule a restart unless we are stopping."""
        pid, self.pid = self.pid, None
        if self.stopping:
            return
        if time.monotonic() - self.started_at > 60.0:
            self.failures = 0
        delay = _BACKOFF[min(self.failures, len(_BACKOFF) - 1)]
        self.failures += 1
        self.restart_at = time.monotonic() + delay
        logger.error(
            "%s (pid %s) exited (status %d); restarting in %.1fs", self.label, pid, status, delay
        )

    def tick(self) -> None:
        """Called from the supervisor's loop: restart when due."""
        if self.pid is None and self.restart_at is not None and not self.stopping:
            if time.monotonic() >= self.restart_at:
                try:
                    self.start()
                except OSError as exc:
                    logger.error("cannot restart the %s: %s", self.label, exc)
                    self.restart_at = time.monotonic() + _BACKOFF[-1]

    def stop(self) -> None:
        """SIGTERM by PID, wait up to ``stop_grace``, then SIGKILL; reaps the child."""
        self.stopping = True
        pid = self.pid
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                break
            if done:
                break
            time.sleep(0.05)
        else:
            logger.error("%s (pid %d) did not stop in time; killing it", self.label, pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.pid = None
        logger.info("%s stopped", self.label)


_PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> int:
    """``python -m gateway.commands.control_process PARENT_PID -- COMMAND...``: ask the kernel
    for SIGTERM when the parent dies, then exec COMMAND (never returns on success)."""
    import ctypes

    if len(argv) < 3 or argv[1] != "--":
        sys.stderr.write("usage: python -m gateway.commands.control_process PARENT_PID -- CMD\n")
        return 2
    parent = int(argv[0])
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        sys.stderr.write(f"warning: prctl(PR_SET_PDEATHSIG) failed: errno {ctypes.get_errno()}\n")
    if os.getppid() != parent:  # the supervisor died before the request took effect
        return 0
    command = argv[2:]
    os.execv(command[0], command)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
