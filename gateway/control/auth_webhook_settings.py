"""The ``[auth_webhook]`` section: upstream's ``[core.auth]`` registration webhook.

A top-level section rather than ``[admission.webhook]``: ``[admission]`` *is* the
:class:`~gateway.attest.policy_settings.AdmissionPolicy` value that the admin API replaces
whole (its JSON refuses unknown keys), and a webhook URL and token are not policy that an
API caller should swap. See :mod:`gateway.control.auth_webhook` for the contract.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["AuthWebhookSettings"]


@dataclass(frozen=True, slots=True)
class AuthWebhookSettings:
    """Ask an external service before admitting a CVM whose evidence passed.

    ``url`` (http or https, no user:password part) receives ``POST`` JSON ``AppInfo``; a
    2xx answer admits, anything else refuses, an unreachable or failing service refuses
    for now (the CVM retries). ``timeout`` bounds the whole exchange (seconds; upstream's
    5 s). The optional bearer token is read from the environment variable named by
    ``token_env`` or from ``token_file`` (not both), never stored here, never logged.
    ``ca_file`` (PEM) replaces the system trust store for an https ``url``.
    """

    enabled: bool = False
    url: str = ""
    timeout: float = 5.0
    token_env: str = ""
    token_file: str = ""
    ca_file: str = ""

    def __post_init__(self) -> None:
        if not 0 < self.timeout <= 300:
            raise ValueError("auth_webhook.timeout must be in (0, 300] seconds")
        if self.token_env and self.token_file:
            raise ValueError("auth_webhook: set token_env or token_file, not both")
        if self.enabled and not self.url:
            raise ValueError(
                "auth_webhook.url is required when enabled (e.g. http://127.0.0.1:9000/app-auth)"
            )
        if not self.url:
            return
        try:
            parts = urlsplit(self.url)
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError as exc:
            raise ValueError(f"auth_webhook.url {self.url!r}: {exc}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"auth_webhook.url {self.url!r}: expected http(s)://host[:port]/path")
        if parts.username is not None or parts.password is not None:
            raise ValueError(
                "auth_webhook.url must not carry user:password (it would be logged); "
                "use token_env or token_file for a bearer token"
            )
        if self.ca_file and parts.scheme != "https":
            raise ValueError("auth_webhook.ca_file applies to an https url only")
