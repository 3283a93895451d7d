"""The one interface every DNS-01 provider implements, and the values it passes around.

A provider changes records (``add_txt``/``remove_txt`` by exact value, because ``*.d`` and
``d`` share ``_acme-challenge.d`` and each needs its own value) and names the servers that
are authoritative for a name, so that the propagation check can ask each of them directly
instead of a caching resolver. CAA is optional: providers that cannot publish it keep the
default ``set_caa``, which raises.
"""

from __future__ import annotations

import abc
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.certs.errors import CertError

__all__ = ["CaaRecord", "DnsProvider", "NameServer", "parse_server"]


@dataclass(frozen=True, slots=True, order=True)
class NameServer:
    """An address (IP literal) and port to send DNS queries to."""

    host: str
    port: int = 53

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_server(text: str, default_port: int = 53) -> NameServer:
    """``"192.0.2.1"``, ``"192.0.2.1:5353"``, ``"[2001:db8::1]:53"`` or ``"2001:db8::1"``."""
    text = text.strip()
    try:
        if text.startswith("["):
            host, _, rest = text[1:].partition("]")
            port = int(rest[1:]) if rest.startswith(":") else default_port
        elif text.count(":") == 1:
            host, _, p = text.partition(":")
            port = int(p)
        else:
            host, port = text, default_port
    except ValueError:
        raise ValueError(f"bad name server {text!r} (expected ip or ip:port)") from None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"bad name server {text!r} (expected an IP address, ip:port)") from None
    if not 0 < port < 65536:
        raise ValueError(f"bad name server {text!r}: port out of range")
    return NameServer(host, port)


@dataclass(frozen=True, slots=True)
class CaaRecord:
    """One CAA record (RFC 8659): ``flags tag "value"``."""

    flags: int
    tag: str
    value: str

    def to_text(self) -> str:
        escaped = self.value.replace("\\", "\\\\").replace('"', '\\"')
        return f'{self.flags} {self.tag} "{escaped}"'


class DnsProvider(abc.ABC):
    """Publishes ACME challenge records (and optionally CAA) for names in its zone(s)."""

    #: a short label for logs and errors (the credential's name in the config)
    label: str = "dns"

    @abc.abstractmethod
    async def add_txt(self, name: str, value: str) -> None:
        """Add one TXT value at ``name`` (FQDN, no trailing dot needed); keep other values."""

    @abc.abstractmethod
    async def remove_txt(self, name: str, value: str) -> None:
        """Remove exactly that TXT value at ``name``; other values stay. Absent is not an error."""

    @abc.abstractmethod
    async def authoritative_servers(self, name: str) -> tuple[NameServer, ...]:
        """Every server that answers authoritatively for ``name`` (for the propagation check)."""

    async def set_caa(self, name: str, records: Sequence[CaaRecord]) -> None:
        """Make ``records`` the only ``issue``/``issuewild`` CAA records at ``name``.

        Records with other tags (``iodef`` ...) are kept. The default refuses: not every
        provider can publish CAA.
        """
        raise CertError(f"DNS provider {self.label!r} cannot publish CAA records")

    async def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release connections (HTTP sessions); the provider is unusable afterwards."""
