"""The ``[acme]`` and ``[dns]`` configuration sections (certificates, DNS-01, custom domains).

Secrets never appear in the file: a DNS credential names an environment variable
(``*_env``) or a file (``*_file``) holding the TSIG secret or API token, and both are read
only when the provider is built (see ``gateway.certs.dns.build``). Durations are seconds.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gateway.certs.dns.base import parse_server

__all__ = [
    "AcmeDomain",
    "AcmeSettings",
    "DnsCredential",
    "DnsSettings",
    "ResolverSettings",
    "resolve_certs_dir",
]

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
CLOUDFLARE_API = "https://api.cloudflare.com/client/v4"


def resolve_certs_dir(setting: str | Path, data_dir: Path) -> Path:
    """The certificates directory: ``setting``, or ``<data_dir>/certs`` when it is empty.

    The one rule for both ``acme.certs_dir`` (where the certbot writes) and
    ``proxy.certs_dir`` (where the workers read), so that with their defaults they agree for
    every ``core.data_dir``. A TOML ``""`` decodes to ``Path("")``, which is ``Path(".")``:
    both mean "not set" (a relative certificates directory would follow the cwd anyway).
    """
    path = Path(setting)
    return data_dir / "certs" if path == Path("") else path


def normalize_domain(name: str) -> str:
    """Lower-case, strip a trailing dot and a leading ``*.``; raise ValueError if not a DNS name."""
    name = name.strip().lower().rstrip(".")
    if name.startswith("*."):
        name = name[2:]
    labels = name.split(".")
    if len(name) > 253 or len(labels) < 2 or not all(_LABEL.match(lb) for lb in labels):
        raise ValueError(f"{name!r} is not a valid DNS name (expected e.g. 'apps.example.com')")
    return name


@dataclass(frozen=True, slots=True)
class AcmeDomain:
    """One base domain: the gateway holds a ``*.<base_domain>`` + ``<base_domain>`` certificate.

    ``dns`` names an entry of ``[dns.credentials]`` that can publish TXT records for it.
    """

    base_domain: str
    dns: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "base_domain", normalize_domain(self.base_domain))


@dataclass(frozen=True, slots=True)
class AcmeSettings:
    """How certificates are obtained and renewed (see docs/certificates.md).

    ``certs_dir`` empty means ``<core.data_dir>/certs`` (shared with the proxy's cert store);
    the ACME account key lives in ``<core.data_dir>/acme``. ``caa_issuer`` is the CA's CAA
    domain (``letsencrypt.org`` for Let's Encrypt); it is required when ``caa`` is on.
    """

    enabled: bool = False
    directory_url: str = LETS_ENCRYPT
    contact_email: str = ""
    ca_bundle: str = ""
    certs_dir: str = ""
    renew_before: float = 30 * 86400.0
    check_interval: float = 3600.0
    jitter: float = 300.0
    backoff_initial: float = 60.0
    backoff_max: float = 6 * 3600.0
    issue_timeout: float = 300.0
    poll_interval: float = 1.0
    propagation_wait: float = 60.0
    caa: bool = False
    caa_issuer: str = ""
    quote_binding: bool = False
    domains: tuple[AcmeDomain, ...] = ()

    def __post_init__(self) -> None:
        if not self.directory_url.startswith(("https://", "http://")):
            raise ValueError(f"directory_url must be an http(s) URL, got {self.directory_url!r}")
        for name in ("renew_before", "check_interval", "issue_timeout", "poll_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.propagation_wait < 0:
            raise ValueError("propagation_wait must be >= 0")
        if self.jitter < 0 or self.backoff_initial <= 0 or self.backoff_max < self.backoff_initial:
            raise ValueError("need jitter >= 0 and 0 < backoff_initial <= backoff_max")
        if self.caa and not self.caa_issuer:
            raise ValueError(
                "caa = true needs caa_issuer (the CA's CAA domain, e.g. letsencrypt.org)"
            )
        seen = [d.base_domain for d in self.domains]
        if len(seen) != len(set(seen)):
            raise ValueError("a base_domain is listed twice in [[acme.domains]]")


@dataclass(frozen=True, slots=True)
class DnsCredential:
    """How to change DNS for one zone or account.

    ``kind = "rfc2136"``: dynamic updates signed with TSIG, sent to the primary ``server``:``port``
    for ``zone``. The challenge is checked on every authoritative server of the zone: the NS set
    (asked from the primary, addresses resolved there) queried on ``check_port``, plus
    ``check_servers`` (``"ip"`` or ``"ip:port"``).
    ``kind = "cloudflare"``: the v4 REST API at ``api_url`` with a bearer token; the check uses
    ``check_servers`` or, if empty, the zone's Cloudflare name servers on port 53.
    """

    kind: Literal["rfc2136", "cloudflare"]
    server: str = ""
    port: int = 53
    zone: str = ""
    tsig_key_name: str = ""
    tsig_algorithm: Literal["hmac-sha256", "hmac-sha384", "hmac-sha512"] = "hmac-sha256"
    tsig_secret_env: str = ""
    tsig_secret_file: str = ""
    api_url: str = CLOUDFLARE_API
    token_env: str = ""
    token_file: str = ""
    ttl: int = 60
    check_port: int = 53
    check_servers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind == "rfc2136":
            if not (self.server and self.zone and self.tsig_key_name):
                raise ValueError("an rfc2136 credential needs server, zone and tsig_key_name")
            try:
                ipaddress.ip_address(self.server)
            except ValueError:
                raise ValueError(
                    f"server must be the primary's IP address, got {self.server!r}"
                ) from None
            if bool(self.tsig_secret_env) == bool(self.tsig_secret_file):
                raise ValueError("set exactly one of tsig_secret_env or tsig_secret_file")
            object.__setattr__(self, "zone", normalize_domain(self.zone))
        elif bool(self.token_env) == bool(self.token_file):
            raise ValueError("a cloudflare credential needs exactly one of token_env or token_file")
        if not 0 < self.port < 65536 or not 0 < self.check_port < 65536:
            raise ValueError("ports must be in 1..65535")
        for server in self.check_servers:
            parse_server(server, self.check_port)  # raises ValueError naming the entry


@dataclass(frozen=True, slots=True)
class ResolverSettings:
    """The resolver for custom-domain TXT lookups (``_dstack-app-address.<domain>``).

    ``nameservers`` empty means the system resolver configuration; entries are ``"ip"`` or
    ``"ip:port"``. Positive answers are cached for their TTL (at most ``max_ttl``), misses for
    at most ``negative_ttl``; the cache holds at most ``cache_size`` names.
    """

    nameservers: tuple[str, ...] = ()
    timeout: float = 2.0
    cache_size: int = 256
    max_ttl: float = 300.0
    negative_ttl: float = 10.0
    legacy_tapp_address: bool = True

    def __post_init__(self) -> None:
        if self.timeout <= 0 or self.cache_size < 1 or self.negative_ttl < 0 or self.max_ttl < 0:
            raise ValueError("need timeout > 0, cache_size >= 1 and non-negative TTL caps")
        for server in self.nameservers:
            parse_server(server)


def _no_credentials() -> Mapping[str, DnsCredential]:
    return types.MappingProxyType({})


@dataclass(frozen=True, slots=True)
class DnsSettings:
    """``[dns.credentials.<name>]`` tables and the ``[dns.resolver]`` for custom domains."""

    credentials: Mapping[str, DnsCredential] = dataclasses.field(default_factory=_no_credentials)
    resolver: ResolverSettings = dataclasses.field(default_factory=ResolverSettings)
