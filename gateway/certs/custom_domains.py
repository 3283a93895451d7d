"""Custom domains: which app a name outside our base domains belongs to, from DNS TXT records.

For ``shop.example.com`` the proxy asks, in parallel (dstack's order of preference):

1. ``_dstack-app-address.shop.example.com``  TXT ``"<app_id>:<port>"``
2. ``_tapp-address.shop.example.com``        the legacy name (if ``legacy_tapp_address``)

and, if neither exists, the wildcard fallback ``_dstack-app-address-wildcard.example.com``.
The first string of the first TXT record is parsed as ``<app_id>:<port>`` (split at the last
colon). The answer is a typed :class:`AppAddress` or :class:`AddressMiss`, never an exception.

Caching: a positive answer lives for its TTL (at most ``max_ttl``); a miss for at most
``negative_ttl`` (10 s: a new customer domain starts working quickly); timeouts and server
failures are not cached. The cache is an LRU bounded by ``cache_size``, and concurrent lookups
of one name share one query.
"""

from __future__ import annotations

import asyncio
import enum
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from gateway.certs.dns.base import parse_server
from gateway.certs.errors import CertError
from gateway.certs.settings import ResolverSettings

__all__ = ["AddressMiss", "AppAddress", "AppAddressResolver", "MissReason", "parse_app_address"]

PREFIX = "_dstack-app-address"
LEGACY_PREFIX = "_tapp-address"
WILDCARD_PREFIX = "_dstack-app-address-wildcard"
_HOSTNAME = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,62})(?:\.[a-z0-9_](?:[a-z0-9_-]{0,62}))*$")
_APP_ID = re.compile(r"^[0-9A-Za-z][0-9A-Za-z_-]{0,127}$")


@dataclass(frozen=True, slots=True)
class AppAddress:
    """The app (or instance) id and port a custom domain routes to, and the record it came from."""

    app_id: str
    port: int
    record: str


class MissReason(enum.StrEnum):
    NOT_FOUND = "not-found"  # no record at any of the names
    MALFORMED = "malformed"  # a record exists but is not "<app_id>:<port>" (or a bad name)
    TIMEOUT = "timeout"  # the name servers did not answer in time
    ERROR = "error"  # the name servers failed (SERVFAIL, REFUSED, network error)


@dataclass(frozen=True, slots=True)
class AddressMiss:
    """No route for ``domain``, and why (so the proxy can log it and close cleanly)."""

    domain: str
    reason: MissReason
    detail: str = ""


Lookup = AppAddress | AddressMiss


def parse_app_address(text: str, record: str) -> AppAddress | None:
    """``"<app_id>:<port>"`` -> AppAddress, or None if it is not that."""
    app_id, sep, port_text = text.strip().rpartition(":")
    if not sep or not _APP_ID.match(app_id) or not port_text.isdigit() or len(port_text) > 5:
        return None
    port = int(port_text)
    if not 0 < port < 65536:
        return None
    return AppAddress(app_id, port, record)


@dataclass(frozen=True, slots=True)
class _Answer:
    text: str | None  # first TXT string, or None for NXDOMAIN / no TXT
    ttl: float
    failure: MissReason | None = None
    detail: str = ""


class AppAddressResolver:
    """Resolves custom domains to apps; one per process, shared by all connections."""

    def __init__(
        self,
        settings: ResolverSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._clock = clock
        try:
            self._resolver = dns.asyncresolver.Resolver(configure=not settings.nameservers)
        except dns.resolver.NoResolverConfiguration:
            raise CertError(
                "no system resolver configuration (/etc/resolv.conf): set dns.resolver.nameservers"
            ) from None
        if settings.nameservers:
            self._resolver.nameservers = [
                dns.nameserver.Do53Nameserver(ns.host, ns.port)
                for ns in (parse_server(s) for s in settings.nameservers)
            ]
        self._resolver.cache = None  # our cache knows about negative caps and size
        self._resolver.timeout = settings.timeout
        self._resolver.lifetime = settings.timeout
        self._cache: OrderedDict[str, tuple[float, Lookup]] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[Lookup]] = {}

    def cache_size(self) -> int:
        return len(self._cache)

    def peek(self, name: str) -> Lookup | None:
        """The cached, unexpired answer for ``name`` (lower-case, no trailing dot), or None.

        Synchronous, so the proxy answers a warm custom domain without creating a task."""
        hit = self._cache.get(name)
        if hit is None or hit[0] <= self._clock():
            return None
        self._cache.move_to_end(name)
        return hit[1]

    async def resolve(self, domain: str) -> Lookup:
        """The app for ``domain`` (an SNI name), from cache or DNS; never raises for bad input."""
        name = domain.strip().lower().rstrip(".")
        if len(name) > 200 or not _HOSTNAME.match(name):  # room for the longest prefix
            return AddressMiss(domain[:255], MissReason.MALFORMED, "not a host name")
        now = self._clock()
        hit = self._cache.get(name)
        if hit is not None:
            if hit[0] > now:
                self._cache.move_to_end(name)
                return hit[1]
            del self._cache[name]
        pending = self._inflight.get(name)
        if pending is not None:
            try:
                return await asyncio.shield(pending)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not pending.cancelled() or (task is not None and task.cancelling()):
                    raise
                return AddressMiss(name, MissReason.ERROR, "the shared lookup was cancelled")
        future: asyncio.Future[Lookup] = asyncio.get_running_loop().create_future()
        self._inflight[name] = future
        try:
            result, ttl = await self._lookup(name)
            if ttl > 0:
                self._store(name, result, ttl)
            future.set_result(result)
            return result
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters get it via shield
            raise
        finally:
            del self._inflight[name]

    def _store(self, name: str, result: Lookup, ttl: float) -> None:
        self._cache[name] = (self._clock() + ttl, result)
        self._cache.move_to_end(name)
        while len(self._cache) > self._settings.cache_size:
            self._cache.popitem(last=False)

    async def _lookup(self, name: str) -> tuple[Lookup, float]:
        try:
            async with asyncio.timeout(self._settings.timeout):
                return await self._lookup_unbounded(name)
        except TimeoutError:
            return AddressMiss(
                name, MissReason.TIMEOUT, f"no answer in {self._settings.timeout}s"
            ), 0

    async def _lookup_unbounded(self, name: str) -> tuple[Lookup, float]:
        names = [f"{PREFIX}.{name}"]
        if self._settings.legacy_tapp_address:
            names.append(f"{LEGACY_PREFIX}.{name}")
        answers = list(await asyncio.gather(*(self._txt(n) for n in names)))
        found = next(
            ((n, a) for n, a in zip(names, answers, strict=True) if a.text is not None), None
        )
        if found is None and "." in name:
            parent = name.split(".", 1)[1]
            wildcard = f"{WILDCARD_PREFIX}.{parent}"
            answer = await self._txt(wildcard)
            names.append(wildcard)
            answers.append(answer)
            if answer.text is not None:
                found = (wildcard, answer)
        if found is not None:
            record, answer = found
            assert answer.text is not None
            parsed = parse_app_address(answer.text, record)
            if parsed is None:
                miss = AddressMiss(
                    name, MissReason.MALFORMED, f"{record} TXT is not <app_id>:<port>"
                )
                return miss, min(answer.ttl, self._settings.negative_ttl)
            return parsed, min(answer.ttl, self._settings.max_ttl)
        failures = [a for a in answers if a.failure is not None]
        if failures:  # not cached: a server hiccup must not blackhole a domain
            return AddressMiss(name, failures[0].failure or MissReason.ERROR, failures[0].detail), 0
        ttl = min([a.ttl for a in answers] + [self._settings.negative_ttl])
        return AddressMiss(name, MissReason.NOT_FOUND, f"no TXT at {', '.join(names)}"), ttl

    async def _txt(self, qname: str) -> _Answer:
        cap = self._settings.negative_ttl
        try:
            answer = await self._resolver.resolve(qname, dns.rdatatype.TXT)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer) as exc:
            return _Answer(None, _negative_ttl(exc, cap))
        except dns.resolver.LifetimeTimeout:
            return _Answer(None, 0, MissReason.TIMEOUT, f"{qname}: timed out")
        except dns.exception.DNSException as exc:
            return _Answer(None, 0, MissReason.ERROR, f"{qname}: {type(exc).__name__}")
        rrset = answer.rrset
        if rrset is None or len(rrset) == 0:
            return _Answer(None, cap)
        first = next(iter(rrset))
        text = b"".join(first.strings).decode("utf-8", "replace")
        return _Answer(text, float(rrset.ttl))


def _negative_ttl(exc: dns.exception.DNSException, cap: float) -> float:
    """RFC 2308: min(SOA TTL, SOA minimum) from the authority section, capped at ``cap``."""
    try:
        responses = exc.kwargs.get("responses") or {}
        if isinstance(exc, dns.resolver.NoAnswer):
            response = exc.kwargs.get("response")
            responses = {None: response} if response is not None else {}
        for response in responses.values():
            for rrset in response.authority:
                if rrset.rdtype == dns.rdatatype.SOA:
                    soa = next(iter(rrset))
                    return float(min(cap, rrset.ttl, soa.minimum))
    except (AttributeError, TypeError, StopIteration):
        pass
    return cap
