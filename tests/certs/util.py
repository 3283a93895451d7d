"""Helpers for the certificate tests: run coroutines on uvloop, read DNS, verify chains."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

import dns.message
import dns.query
import dns.rdatatype
import OpenSSL.crypto
import uvloop
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on uvloop, as the gateway does."""
    return uvloop.run(coro)


def records_at(port: int, name: str, rdtype: str) -> list[str]:
    """The rdata (text form) at ``name`` straight from knotd (authoritative, no cache)."""
    response = dns.query.tcp(
        dns.message.make_query(name, rdtype), "127.0.0.1", port=port, timeout=3
    )
    want = dns.rdatatype.from_text(rdtype)
    return sorted(rd.to_text() for rrset in response.answer if rrset.rdtype == want for rd in rrset)


def verify_chain(fullchain_pem: bytes, root_pem: bytes, hostnames: list[str]) -> None:
    """Verify leaf + intermediates against ``root_pem`` for each hostname, two ways."""
    chain = x509.load_pem_x509_certificates(fullchain_pem)
    root = x509.load_pem_x509_certificate(root_pem)
    for host in hostnames:
        verifier = PolicyBuilder().store(Store([root])).build_server_verifier(x509.DNSName(host))
        verifier.verify(chain[0], chain[1:])
    store = OpenSSL.crypto.X509Store()
    store.add_cert(OpenSSL.crypto.X509.from_cryptography(root))
    ctx = OpenSSL.crypto.X509StoreContext(
        store,
        OpenSSL.crypto.X509.from_cryptography(chain[0]),
        [OpenSSL.crypto.X509.from_cryptography(c) for c in chain[1:]],
    )
    ctx.verify_certificate()


def dns_update(
    port: int,
    key: tuple[str, str],
    zone: str,
    *,
    add: list[tuple[str, int, str, str]] | None = None,
    delete: list[tuple[str, str]] | None = None,
) -> None:
    """Change records in knotd with plain dnspython (independent of the code under test)."""
    import dns.tsig
    import dns.update

    update = dns.update.UpdateMessage(
        zone, keyring=dns.tsig.Key(key[0], key[1], dns.tsig.HMAC_SHA256)
    )
    for name, rdtype in delete or []:
        update.delete(name, rdtype)
    for name, ttl, rdtype, text in add or []:
        update.add(name, ttl, rdtype, text)
    response = dns.query.tcp(update, "127.0.0.1", port=port, timeout=3)
    assert response.rcode() == 0, response.rcode()
