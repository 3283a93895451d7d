"""The ``[admin]`` section: where the admin API listens and how callers authenticate."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class AdminSettings:
    """Admin API listener and credentials.

    ``listen`` is ``host:port`` (``[::1]:port`` for IPv6) or ``unix:/path/to.sock``.
    Credentials, fail-closed: a token (read from the environment variable named by
    ``token_env``, or from ``token_file``) and/or a bcrypt htpasswd file. With neither, the
    admin API is never served open: a control node with other work (registration RPC,
    certbot) runs without the API and warns, unless ``required`` is set, which refuses to
    start instead; ``insecure_no_auth`` serves it open (development only). See
    :mod:`gateway.control.roles`.
    Failed attempts are limited to ``auth_failures_per_minute`` per client address.
    """

    enabled: bool = True
    listen: str = "127.0.0.1:8001"
    token_env: str = "GATEWAY_ADMIN_TOKEN"
    token_file: Path | None = None
    htpasswd_file: Path | None = None
    insecure_no_auth: bool = False
    required: bool = False
    auth_failures_per_minute: int = 10

    def __post_init__(self) -> None:
        if not self.listen.startswith("unix:"):
            host, sep, port = self.listen.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(
                    f"listen {self.listen!r} must be host:port or unix:/path (e.g. 127.0.0.1:8001)"
                )
        if self.auth_failures_per_minute < 1:
            raise ValueError("auth_failures_per_minute must be at least 1")
