"""The ``[proxy]`` section: listeners, workers, TLS, timeouts and static routes.

Everything is checked here, before anything binds a port: listen specs parse, ranges do not
overlap, timeouts are positive, route ids are unique. Errors are ``ValueError``s whose text names
the offending entry; :func:`gateway.config.decode` turns them into ``ConfigError``s at the
section's key path.

Listen grammar (one string per entry)::

    listen   = host ":" ports
    host     = IPv4 | "[" IPv6 "]"
    ports    = PORT | PORT "-" PORT          ; inclusive range, e.g. "8443-8445"
"""

from __future__ import annotations

import enum
import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "Balance",
    "ListenSpec",
    "PortRule",
    "ProxySettings",
    "StaticRoute",
    "Timeouts",
    "parse_listen",
]

_ID_RE = re.compile(r"[a-z0-9_]{1,63}")


@dataclass(frozen=True, slots=True)
class ListenSpec:
    """One resolved listen entry: a host and an inclusive port range."""

    host: str
    first: int
    last: int

    def ports(self) -> range:
        return range(self.first, self.last + 1)

    @property
    def family_v6(self) -> bool:
        return ":" in self.host


def parse_listen(text: str) -> ListenSpec:
    """Parse ``host:port`` or ``host:a-b`` (IPv6 in brackets); raises ``ValueError``."""
    host, sep, ports = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"listen {text!r}: expected host:port, e.g. '0.0.0.0:8443' or '[::]:443'")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"listen {text!r}: {host!r} is not an IPv6 address") from None
    else:
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(
                f"listen {text!r}: {host!r} is not an IPv4 address (write IPv6 as [::1])"
            ) from None
    first_s, dash, last_s = ports.partition("-")
    try:
        first = int(first_s)
        last = int(last_s) if dash else first
    except ValueError:
        raise ValueError(
            f"listen {text!r}: port {ports!r} is not a number or a range a-b"
        ) from None
    if not (1 <= first <= 65535 and 1 <= last <= 65535):
        raise ValueError(f"listen {text!r}: ports must be within 1-65535")
    if last < first:
        raise ValueError(f"listen {text!r}: range {ports!r} is reversed")
    return ListenSpec(host, first, last)


class Balance(enum.StrEnum):
    """How new connections to an app id are spread over its fresh instances.

    ``round_robin`` (default): each worker rotates the first choice per app and gives it a
    short head start before the next candidate joins the race, so two healthy instances get
    the same share of new connections and a dead first choice still does not fail the
    connection. ``freshest``: upstream's order (most recent WireGuard handshake first) and its
    all-at-once race, which sends nearly everything to the nearest instance. Details in
    docs/proxy.md, "Balancing and drains".
    """

    ROUND_ROBIN = "round_robin"
    FRESHEST = "freshest"


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds. ``handshake`` bounds the ClientHello sniff and the TLS handshake together;
    ``idle`` closes a relay with no bytes either way; ``total`` caps any connection's life;
    ``drain`` is how long SIGTERM lets live relays finish."""

    connect: float = 5.0
    handshake: float = 5.0
    idle: float = 600.0
    total: float = 18000.0
    proxy_header: float = 5.0
    drain: float = 10.0

    def __post_init__(self) -> None:
        for name in ("connect", "handshake", "idle", "total", "proxy_header", "drain"):
            if getattr(self, name) <= 0:
                raise ValueError(f"timeouts.{name} must be > 0 seconds")


@dataclass(frozen=True, slots=True)
class PortRule:
    """A port an app declares: ``pp`` asks for an outbound PROXY v2 header before any data."""

    port: int
    pp: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is outside 1-65535")


@dataclass(frozen=True, slots=True)
class StaticRoute:
    """An app served by fixed backends (before, or without, the tunnel registry).

    ``backends`` are hosts (IPv4 or IPv6 literals); the port comes from the SNI
    (``<app_id>-<port>``). ``instance_ids``, if given, name each backend so that
    ``<instance_id>.<base>`` reaches exactly that one. With ``restrict_mode`` only the listed
    ``ports`` are reachable (an empty list denies all); without it every port is.
    """

    app_id: str
    backends: tuple[str, ...]
    instance_ids: tuple[str, ...] = ()
    restrict_mode: bool = False
    ports: tuple[PortRule, ...] = ()

    def __post_init__(self) -> None:
        for ident in (self.app_id, *self.instance_ids):
            if not _ID_RE.fullmatch(ident):
                raise ValueError(
                    f"route app_id/instance_id {ident!r} must be 1-63 of [a-z0-9_] "
                    "(the SNI label grammar)"
                )
        if not self.backends:
            raise ValueError(f"route {self.app_id!r}: backends must list at least one host")
        for host in self.backends:
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise ValueError(
                    f"route {self.app_id!r}: backend {host!r} is not an IP address literal"
                ) from None
        if self.instance_ids and len(self.instance_ids) != len(self.backends):
            raise ValueError(
                f"route {self.app_id!r}: instance_ids must have one id per backend "
                f"({len(self.backends)}), got {len(self.instance_ids)}"
            )
        seen: set[int] = set()
        for rule in self.ports:
            if rule.port in seen:
                raise ValueError(f"route {self.app_id!r}: port {rule.port} listed twice")
            seen.add(rule.port)


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """The data plane. ``workers = 0`` means one worker process per CPU.

    ``custom_domains``: route names outside ``base_domains`` by their DNS TXT record
    (``_dstack-app-address.<name>``); takes effect only when ``dns.resolver.nameservers`` is
    set (see ``gateway/proxy/custom.py``).

    ``certs_dir`` empty means ``<core.data_dir>/certs``, where the certbot writes by default;
    :class:`gateway.config.Config` resolves it (``gateway.certs.settings.resolve_certs_dir``),
    so a ``ProxySettings`` taken from a ``Config`` always holds the real directory."""

    listen: tuple[str, ...] = ("0.0.0.0:8443",)
    workers: int = 0
    base_domains: tuple[str, ...] = ()
    certs_dir: Path = Path("")
    tls_versions: tuple[str, ...] = ("1.2", "1.3")
    session_tickets: int = 2
    inbound_proxy_protocol: bool = False
    max_connections_per_app: int = 2000
    hello_limit: int = 16384
    connect_top_n: int = 3
    balance: Balance = Balance.ROUND_ROBIN
    backlog: int = 4096
    buffer_size: int = 65536
    splice_after: int = 65536
    insecure_localhost_backend: bool = False
    stats_interval: float = 2.0
    access_log: bool = True
    custom_domains: bool = True
    registry_routes: bool = True
    registry_poll_interval: float = 1.0
    registry_refresh_interval: float = 2.0
    registry_stale_after: float = 1800.0
    timeouts: Timeouts = field(default_factory=Timeouts)
    routes: tuple[StaticRoute, ...] = ()

    def __post_init__(self) -> None:
        if not self.listen:
            raise ValueError("listen must name at least one address")
        specs = [parse_listen(item) for item in self.listen]
        for i, a in enumerate(specs):
            for b in specs[i + 1 :]:
                if _same_bind(a.host, b.host) and a.first <= b.last and b.first <= a.last:
                    raise ValueError(
                        f"listen entries {self.listen[i]!r} and {self.listen[specs.index(b)]!r} "
                        "overlap; each port may be listed once per address"
                    )
        if self.workers < 0:
            raise ValueError("workers must be >= 0 (0 = one per CPU)")
        for base in self.base_domains:
            if not base or base != base.lower() or base.startswith(".") or base.endswith("."):
                raise ValueError(
                    f"base domain {base!r} must be lower-case without leading or trailing dot"
                )
        if not self.tls_versions or set(self.tls_versions) - {"1.2", "1.3"}:
            raise ValueError("tls_versions must be a non-empty list of '1.2' and/or '1.3'")
        if not 0 <= self.session_tickets <= 8:
            raise ValueError("session_tickets must be within 0-8 (0 = no resumption)")
        if self.max_connections_per_app < 0:
            raise ValueError("max_connections_per_app must be >= 0 (0 = unlimited)")
        if not 512 <= self.hello_limit <= 1 << 20:
            raise ValueError("hello_limit must be within 512-1048576 bytes")
        if not 1 <= self.connect_top_n <= 16:
            raise ValueError("connect_top_n must be within 1-16")
        if self.backlog < 1 or self.buffer_size < 4096:
            raise ValueError("backlog must be >= 1 and buffer_size >= 4096")
        if self.splice_after < -1:
            raise ValueError("splice_after must be >= 0 bytes, or -1 to never splice")
        if self.stats_interval <= 0:
            raise ValueError("stats_interval must be > 0 seconds")
        for name in ("registry_poll_interval", "registry_refresh_interval", "registry_stale_after"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0 seconds")
        ids: set[str] = set()
        for route in self.routes:
            for name in (route.app_id, *route.instance_ids):
                if name in ids:
                    raise ValueError(f"route id {name!r} is used twice")
                ids.add(name)

    def listen_specs(self) -> tuple[ListenSpec, ...]:
        return tuple(parse_listen(item) for item in self.listen)

    def worker_count(self) -> int:
        return self.workers or os.cpu_count() or 1


def _same_bind(a: str, b: str) -> bool:
    """Two hosts collide if equal or if either is the wildcard of the same family."""
    if a == b:
        return True
    wild = {"0.0.0.0", "::"}
    return (a in wild or b in wild) and (":" in a) == (":" in b)
