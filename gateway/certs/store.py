"""Certificates by name, as an immutable snapshot swapped whole at reload.

Layout of ``certs_dir`` (the ACME helper writes exactly this, each directory atomically by
rename, then asks for a reload)::

    certs_dir/
      <any-name>/fullchain.pem   leaf first, then intermediates (and, for the dev CA, the CA)
      <any-name>/privkey.pem

Names come from the leaf's subjectAltName DNS entries. Lookup is exact name first, then a
one-level wildcard (``a.b.example`` matches ``*.b.example``, never ``*.example``), lower-cased.
Each entry carries ready server contexts, one per ALPN offer, so the hot path does a dict
lookup and nothing else. A directory that fails to load is skipped with a warning naming it;
the rest still load, and the previous snapshot stays in use if nothing loads at all.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import MappingProxyType

from cryptography import x509

from gateway.certs.tls import ALPN_H1, ALPN_H2, server_context

__all__ = ["CertEntry", "CertSnapshot", "CertStore", "load_snapshot"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CertEntry:
    """One certificate: where it came from, what it covers, and its server contexts."""

    source: Path
    names: tuple[str, ...]
    not_after: datetime
    h1: ssl.SSLContext = field(repr=False, compare=False)
    h2: ssl.SSLContext = field(repr=False, compare=False)

    def context(self, alpn: tuple[str, ...]) -> ssl.SSLContext:
        return self.h2 if alpn == ALPN_H2 else self.h1


@dataclass(frozen=True, slots=True)
class CertSnapshot:
    """Exact names and wildcard parents mapped to entries. Never mutated after creation."""

    exact: Mapping[str, CertEntry] = field(default_factory=lambda: MappingProxyType({}))
    wildcard: Mapping[str, CertEntry] = field(default_factory=lambda: MappingProxyType({}))

    def lookup(self, sni: str) -> CertEntry | None:
        """The entry serving ``sni`` (already lower-case), or ``None``."""
        entry = self.exact.get(sni)
        if entry is not None:
            return entry
        _, dot, parent = sni.partition(".")
        return self.wildcard.get(parent) if dot else None

    def has_wildcard(self, parent: str) -> bool:
        return parent in self.wildcard

    def __len__(self) -> int:
        return len({id(e) for e in (*self.exact.values(), *self.wildcard.values())})


def _names(leaf: x509.Certificate) -> tuple[str, ...]:
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return ()
    return tuple(n.lower() for n in san.value.get_values_for_type(x509.DNSName))


def load_entry(directory: Path, versions: Iterable[str], tickets: int = 2) -> CertEntry:
    """Load one certificate directory; raises ``OSError``/``ValueError``/``ssl.SSLError``."""
    chain = directory / "fullchain.pem"
    key = directory / "privkey.pem"
    leaf = x509.load_pem_x509_certificate(chain.read_bytes())
    names = _names(leaf)
    if not names:
        raise ValueError(f"{chain}: the leaf certificate has no DNS subjectAltName")
    versions = tuple(versions)
    return CertEntry(
        source=directory,
        names=names,
        not_after=leaf.not_valid_after_utc,
        h1=server_context(chain, key, versions, ALPN_H1, tickets),
        h2=server_context(chain, key, versions, ALPN_H2, tickets),
    )


def load_snapshot(certs_dir: Path, versions: Iterable[str], tickets: int = 2) -> CertSnapshot:
    """Read every certificate directory under ``certs_dir`` into a new snapshot.

    A later ``not_after`` wins when two certificates cover the same name. Bad directories are
    logged and skipped; a missing ``certs_dir`` gives an empty snapshot.
    """
    versions = tuple(versions)
    exact: dict[str, CertEntry] = {}
    wildcard: dict[str, CertEntry] = {}
    if not certs_dir.is_dir():
        return CertSnapshot()
    for directory in sorted(p for p in certs_dir.iterdir() if p.is_dir()):
        if directory.name.startswith("."):
            continue  # a writer's temporary directory, not yet renamed into place
        try:
            entry = load_entry(directory, versions, tickets)
        except (OSError, ValueError, ssl.SSLError) as exc:
            logger.warning("skipping certificate directory %s: %s", directory, exc)
            continue
        for name in entry.names:
            table, key = (wildcard, name[2:]) if name.startswith("*.") else (exact, name)
            old = table.get(key)
            if old is None or entry.not_after > old.not_after:
                table[key] = entry
    return CertSnapshot(MappingProxyType(exact), MappingProxyType(wildcard))


class CertStore:
    """Holds the current :class:`CertSnapshot`; :meth:`reload` swaps in a new one whole."""

    __slots__ = ("certs_dir", "versions", "tickets", "snapshot")

    def __init__(self, certs_dir: Path, versions: Iterable[str], tickets: int = 2) -> None:
        self.certs_dir = certs_dir
        self.versions = tuple(versions)
        self.tickets = tickets
        self.snapshot = load_snapshot(certs_dir, self.versions, tickets)

    def reload(self) -> CertSnapshot:
        """Re-read ``certs_dir``. Keeps the old snapshot if the new one would be empty while
        the old one was not (a half-written directory must not take every name offline)."""
        new = load_snapshot(self.certs_dir, self.versions, self.tickets)
        if len(new) == 0 and len(self.snapshot) > 0:
            logger.error(
                "certificate reload found nothing in %s; keeping the old set", self.certs_dir
            )
            return self.snapshot
        self.snapshot = new
        logger.info("certificates loaded: %d from %s", len(new), self.certs_dir)
        return new
