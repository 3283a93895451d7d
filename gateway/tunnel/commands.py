"""Run ``ip``/``wg`` commands, optionally inside a network namespace, and own child processes.

Everything that touches a device goes through :func:`run` so that the namespace handling is in
one place: ``ip netns exec NS ...`` for programs that must run inside the namespace
(``wg`` talks netlink to kernel devices there, ``wireguard-go`` creates its TUN there), and
plain ``ip -n NS`` for address and link changes. UAPI sockets are files in
``/var/run/wireguard`` shared by every namespace, so they are reached without entering one.

:class:`OwnedProcess` is a child we started (``wireguard-go``, the lab's HTTP origins); it is
stopped by its PID (and its own process group), never by name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from gateway.tunnel.errors import CommandError

logger = logging.getLogger(__name__)

__all__ = ["OwnedProcess", "in_netns", "run"]


def in_netns(netns: str | None, argv: Sequence[str]) -> list[str]:
    """``argv`` prefixed so that it runs inside ``netns`` (unchanged for ``None``)."""
    return ["ip", "netns", "exec", netns, *argv] if netns else list(argv)


def run(
    argv: Sequence[str],
    *,
    netns: str | None = None,
    input_text: str | None = None,
    timeout: float = 15.0,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a short command (in ``netns`` if given); raises :class:`CommandError` on failure."""
    full = in_netns(netns, argv)
    try:
        done = subprocess.run(
            full,
            input=input_text,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=None if input_text is not None else subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
        raise CommandError(full, None, err) from None
    except FileNotFoundError:
        raise CommandError(full, 127, f"{full[0]}: command not found (install it)") from None
    if check and done.returncode != 0:
        raise CommandError(full, done.returncode, done.stderr)
    return done


class OwnedProcess:
    """A long-running child in its own session, stopped by PID on :meth:`stop`."""

    __slots__ = ("argv", "log_path", "proc")

    def __init__(
        self,
        argv: Sequence[str],
        *,
        log_path: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        child_env = dict(os.environ)
        if env:
            child_env.update(env)
        if log_path is not None:
            with log_path.open("ab") as log:
                self.proc = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    env=child_env,
                )
        else:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                env=child_env,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, limit: int = 2000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-limit:]

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM our PID's group, wait ``grace`` s, then SIGKILL; returns the exit status."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                logger.warning("pid %d ignored SIGTERM for %.1fs, killing", self.proc.pid, grace)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers in the group we created
        return self.proc.returncode
