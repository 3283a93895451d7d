"""The tunnel node as a child of ``gateway serve``: ``gateway rpc`` run by the supervisor.

``gateway serve`` runs the whole gateway in one command: the proxy supervisor with its
workers, plus (when the configuration gives the registration RPC an identity, i.e. exactly
when ``gateway rpc`` would start: ``[rpc_identity] tee`` or ``rpc.cert_file`` is set) one
control child running what ``gateway rpc`` runs: the registration RPC, the WireGuard device
and registry maintenance. The two halves share nothing but the registry database, which the
workers read (``proxy.registry_routes``) and the child writes.

Why a separate process rather than a thread or a task in the supervisor: the supervisor forks
workers, and forking with an event loop or threads alive is unsafe; the child is started with
``posix_spawn`` (a fresh interpreter) in its own session, so a terminal's Ctrl-C reaches only
the supervisor, which stops the child by PID after the workers drained. The supervisor reaps
it like a worker and restarts it with back-off if it dies.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from pathlib import Path

from gateway.config import Config

__all__ = ["ControlProcess", "wants_control"]

logger = logging.getLogger(__name__)

_BACKOFF = (0.5, 1.0, 2.0, 5.0, 10.0)


def wants_control(cfg: Config) -> bool:
    """Whether ``gateway serve`` should run the tunnel node too (same test as ``gateway rpc``)."""
    return bool(cfg.rpc_identity.tee or cfg.rpc.cert_file)


class ControlProcess:
    """One supervised ``python -m gateway rpc --config FILE`` child (see the module doc)."""

    def __init__(self, config: Path, *, stop_grace: float = 10.0) -> None:
        self.argv = [sys.executable, "-m", "gateway", "rpc", "--config", str(config)]
        self.stop_grace = stop_grace
        self.pid: int | None = None
        self.started_at = 0.0
        self.failures = 0
        self.restart_at: float | None = None
        self.stopping = False

    def start(self) -> None:
        self.pid = os.posix_spawn(self.argv[0], self.argv, dict(os.environ), setsid=True)
        self.started_at = time.monotonic()
        self.restart_at = None
        logger.info("control process (registration RPC + WireGuard) started, pid %d", self.pid)

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
            "control process (pid %s) exited (status %d); restarting in %.1fs", pid, status, delay
        )

    def tick(self) -> None:
        """Called from the supervisor's loop: restart when due."""
        if self.pid is None and self.restart_at is not None and not self.stopping:
            if time.monotonic() >= self.restart_at:
                try:
                    self.start()
                except OSError as exc:
                    logger.error("cannot restart the control process: %s", exc)
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
            logger.error("control process (pid %d) did not stop in time; killing it", pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.pid = None
        logger.info("control process stopped")
