"""The error family of ``gateway.tunnel``: callers catch :class:`TunnelError` and read why."""

from __future__ import annotations


class TunnelError(Exception):
    """A WireGuard device or command failed; the message says what to check next."""


class CommandError(TunnelError):
    """An external command (``ip``, ``wg``, ``wireguard-go``) failed."""

    def __init__(self, argv: list[str], returncode: int | None, stderr: str) -> None:
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr
        status = "timed out" if returncode is None else f"exited with {returncode}"
        super().__init__(f"{' '.join(argv)} {status}: {stderr.strip()[:500]}")
