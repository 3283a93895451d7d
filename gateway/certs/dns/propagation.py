"""Wait until every authoritative server shows the challenge TXT values.

A CA validates once: pebble (and Let's Encrypt) mark the authorization invalid at the first
lookup that misses the value, and the CA may ask any of the zone's servers. So before we ask
for validation, each authoritative server is queried directly (no recursive resolver, whose
negative cache would hide a fresh record) until all of them return every expected value, or
the one deadline handed down passes.

One exception, so that a dead secondary cannot block issuance for good: after ``skip_silent``
(``acme.propagation_wait``), servers that do not answer at all are dropped from the wait, with
a warning, as long as at least one authoritative server shows the values. A CA cannot get a
stale answer from a server that does not answer. A server that answers *without* the values
keeps blocking until the deadline: the CA could ask it, and a failed validation costs a CA
rate-limit slot. (Upstream proceeds after ``max_dns_wait`` whatever the servers say; we only
go ahead past silent ones.)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Iterable

import dns.asyncquery
import dns.asyncresolver
import dns.exception
import dns.message
import dns.rcode
import dns.rdatatype

from gateway.certs.dns.base import NameServer

__all__ = ["lagging_servers", "query_txt", "resolve_addresses", "wait_for_txt"]

logger = logging.getLogger(__name__)


async def query_txt(name: str, server: NameServer, timeout: float) -> set[str] | None:
    """The TXT values at ``name`` on ``server`` (empty if none); None if it did not answer."""
    query = dns.message.make_query(name, dns.rdatatype.TXT)
    try:
        response, _ = await dns.asyncquery.udp_with_fallback(
            query, server.host, timeout=timeout, port=server.port
        )
    except (dns.exception.DNSException, OSError):
        return None
    if response.rcode() not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
        return None
    values: set[str] = set()
    for rrset in response.answer:
        if rrset.rdtype == dns.rdatatype.TXT:
            for rdata in rrset:
                values.add(b"".join(rdata.strings).decode("utf-8", "replace"))
    return values


async def _answers(name: str, servers: list[NameServer], timeout: float) -> list[set[str] | None]:
    return await asyncio.gather(*(query_txt(name, s, timeout) for s in servers))


async def lagging_servers(
    name: str, expected: Collection[str], servers: Iterable[NameServer], timeout: float
) -> list[NameServer]:
    """The servers that do not (yet) return all of ``expected`` at ``name``."""
    servers = list(servers)
    answers = await _answers(name, servers, timeout)
    want = set(expected)
    return [s for s, got in zip(servers, answers, strict=True) if got is None or not want <= got]


async def wait_for_txt(
    name: str,
    expected: Collection[str],
    servers: Iterable[NameServer],
    deadline: float,
    *,
    poll_interval: float = 1.0,
    skip_silent: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> list[NameServer]:
    """Poll until all ``servers`` show ``expected``; return the laggards ([] = propagated).

    ``deadline`` is absolute on ``clock``. Polls start at 50 ms and double up to
    ``poll_interval`` because a primary usually answers at once while secondaries need a
    NOTIFY round trip. ``skip_silent`` (absolute on ``clock``): from then on, servers that did
    not answer the last poll are given up on, if another server already shows the values
    (see the module docstring).
    """
    pending = sorted(set(servers))
    want = set(expected)
    seen_somewhere = False
    delay = min(0.05, poll_interval)
    while True:
        remaining = deadline - clock()
        if remaining <= 0:
            return pending
        answers = await _answers(name, pending, min(2.0, max(remaining, 0.05)))
        seen_somewhere = seen_somewhere or any(got is not None and want <= got for got in answers)
        silent = [s for s, got in zip(pending, answers, strict=True) if got is None]
        pending = [
            s for s, got in zip(pending, answers, strict=True) if got is None or not want <= got
        ]
        if silent and seen_somewhere and skip_silent is not None and clock() >= skip_silent:
            logger.warning(
                "%s: going ahead without %s: no answer from them (the values are visible "
                "on the other authoritative servers); check that they are up",
                name,
                ", ".join(map(str, silent)),
            )
            pending = [s for s in pending if s not in silent]
        if not pending:
            return []
        await asyncio.sleep(max(0.0, min(delay, deadline - clock())))
        delay = min(delay * 2, poll_interval)


async def resolve_addresses(name: str, timeout: float) -> list[str]:
    """A (else AAAA) addresses of ``name`` through the system resolver; [] if none."""
    resolver = dns.asyncresolver.Resolver()
    for rdtype in ("A", "AAAA"):
        try:
            answer = await resolver.resolve(name, rdtype, lifetime=timeout)
        except dns.exception.DNSException:
            continue
        found = [rd.address for rd in answer]
        if found:
            return found
    return []
