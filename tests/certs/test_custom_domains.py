"""Custom-domain TXT routing against a real knotd, with the cache on an injected clock."""

from __future__ import annotations

import asyncio
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.certs.custom_domains import (
    AddressMiss,
    AppAddress,
    AppAddressResolver,
    MissReason,
    parse_app_address,
)
from gateway.certs.settings import ResolverSettings
from tests.certs.conftest import CUSTOMER_ZONE as Z
from tests.certs.localstack import LocalStack
from tests.certs.util import dns_update, run
from tests.helpers.processes import free_port

pytestmark = pytest.mark.slow
APP = "3327603e03f5bd1f830812ca4a789277fc31f577"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def resolver(stack: LocalStack, clock: Clock | None = None, **kw: object) -> AppAddressResolver:
    settings = ResolverSettings(nameservers=(f"127.0.0.1:{stack.dns_port}",), **kw)  # type: ignore[arg-type]
    return AppAddressResolver(settings, clock=clock or Clock())


def put(stack: LocalStack, name: str, value: str, ttl: int = 60) -> None:
    dns_update(
        stack.dns_port,
        (stack.tsig_name, stack.tsig_secret),
        Z,
        delete=[(name, "TXT")],
        add=[(name, ttl, "TXT", f'"{value}"')],
    )


def test_positive_legacy_and_preference(stack: LocalStack) -> None:
    put(stack, f"_dstack-app-address.shop.{Z}.", f"{APP}:443")
    put(stack, f"_tapp-address.old.{Z}.", "legacyapp:8080")
    put(stack, f"_dstack-app-address.both.{Z}.", "new:1")
    put(stack, f"_tapp-address.both.{Z}.", "old:2")
    r = resolver(stack)
    assert run(r.resolve(f"Shop.{Z}.")) == AppAddress(APP, 443, f"_dstack-app-address.shop.{Z}")
    assert run(r.resolve(f"old.{Z}")) == AppAddress("legacyapp", 8080, f"_tapp-address.old.{Z}")
    assert run(r.resolve(f"both.{Z}")) == AppAddress("new", 1, f"_dstack-app-address.both.{Z}")
    no_legacy = resolver(stack, legacy_tapp_address=False)
    miss = run(no_legacy.resolve(f"old.{Z}"))
    assert isinstance(miss, AddressMiss) and miss.reason == MissReason.NOT_FOUND


def test_wildcard_fallback(stack: LocalStack) -> None:
    put(stack, f"_dstack-app-address-wildcard.wild.{Z}.", "wildapp:8443")
    put(stack, f"_dstack-app-address.exact.wild.{Z}.", "exactapp:443")
    r = resolver(stack)
    hit = run(r.resolve(f"anything.wild.{Z}"))
    assert hit == AppAddress("wildapp", 8443, f"_dstack-app-address-wildcard.wild.{Z}")
    assert run(r.resolve(f"exact.wild.{Z}")) == AppAddress(
        "exactapp", 443, f"_dstack-app-address.exact.wild.{Z}"
    )
    # the wildcard covers one level only
    miss = run(r.resolve(f"a.b.wild.{Z}"))
    assert isinstance(miss, AddressMiss) and miss.reason == MissReason.NOT_FOUND


def test_negative_cache_is_capped(stack: LocalStack) -> None:
    clock = Clock()
    r = resolver(stack, clock, negative_ttl=5.0)
    name = f"late.neg.{Z}"
    first = run(r.resolve(name))
    assert isinstance(first, AddressMiss) and first.reason == MissReason.NOT_FOUND
    put(stack, f"_dstack-app-address.{name}.", "lateapp:443")
    # the zone's SOA minimum (1 s) is below the cap: the miss lives 1 s
    clock.now += 0.9
    assert run(r.resolve(name)) == first  # still the cached miss
    clock.now += 0.2
    assert run(r.resolve(name)) == AppAddress("lateapp", 443, f"_dstack-app-address.{name}")
    # a cap below the SOA minimum wins
    capped = resolver(stack, clock, negative_ttl=0.25)
    other = f"capped.neg.{Z}"
    assert isinstance(run(capped.resolve(other)), AddressMiss)
    put(stack, f"_dstack-app-address.{other}.", "cappedapp:80")
    clock.now += 0.2
    assert isinstance(run(capped.resolve(other)), AddressMiss)
    clock.now += 0.1
    assert isinstance(run(capped.resolve(other)), AppAddress)


def test_positive_ttl_expiry(stack: LocalStack) -> None:
    clock = Clock()
    r = resolver(stack, clock)
    name = f"ttl.{Z}"
    put(stack, f"_dstack-app-address.{name}.", "first:443", ttl=3)
    assert run(r.resolve(name)) == AppAddress("first", 443, f"_dstack-app-address.{name}")
    put(stack, f"_dstack-app-address.{name}.", "second:443", ttl=3)
    clock.now += 2.9
    assert run(r.resolve(name)).app_id == "first"  # type: ignore[union-attr]
    clock.now += 0.2
    assert run(r.resolve(name)).app_id == "second"  # type: ignore[union-attr]
    # max_ttl caps a long TTL
    capped = resolver(stack, clock, max_ttl=1.0)
    put(stack, f"_dstack-app-address.{name}.", "third:443", ttl=3600)
    assert run(capped.resolve(name)).app_id == "third"  # type: ignore[union-attr]
    put(stack, f"_dstack-app-address.{name}.", "fourth:443", ttl=3600)
    clock.now += 1.1
    assert run(capped.resolve(name)).app_id == "fourth"  # type: ignore[union-attr]


def test_peek_returns_only_unexpired_cached_answers(stack: LocalStack) -> None:
    clock = Clock()
    r = resolver(stack, clock)
    name = f"peek.{Z}"
    assert r.peek(name) is None  # never looked up
    put(stack, f"_dstack-app-address.{name}.", "peekapp:443", ttl=3)
    hit = run(r.resolve(name))
    assert r.peek(name) == hit == AppAddress("peekapp", 443, f"_dstack-app-address.{name}")
    clock.now += 3.1
    assert r.peek(name) is None  # expired: the proxy must ask DNS again
    miss = run(r.resolve(f"nothing.peek.{Z}"))
    assert isinstance(miss, AddressMiss) and r.peek(f"nothing.peek.{Z}") == miss


def test_timeout_against_a_silent_port_is_not_cached() -> None:
    settings = ResolverSettings(nameservers=(f"127.0.0.1:{free_port()}",), timeout=0.5)
    r = AppAddressResolver(settings)
    start = time.monotonic()
    miss = run(r.resolve(f"shop.{Z}"))
    elapsed = time.monotonic() - start
    assert isinstance(miss, AddressMiss) and miss.reason == MissReason.TIMEOUT
    assert 0.4 < elapsed < 1.5
    assert r.cache_size() == 0


def test_malformed_records_bad_names_and_bounded_cache(stack: LocalStack) -> None:
    put(stack, f"_dstack-app-address.bad.{Z}.", "no-port-here")
    put(stack, f"_dstack-app-address.badport.{Z}.", "app:70000")
    r = resolver(stack, cache_size=2)
    for name in (f"bad.{Z}", f"badport.{Z}"):
        miss = run(r.resolve(name))
        assert isinstance(miss, AddressMiss) and miss.reason == MissReason.MALFORMED
    for junk in ("", "a..b", "x" * 300, "a" * 64 + ".test", "\x00.test"):
        miss = run(r.resolve(junk))
        assert isinstance(miss, AddressMiss) and miss.reason == MissReason.MALFORMED
    run(r.resolve(f"shop.{Z}"))
    assert r.cache_size() == 2


def test_concurrent_lookups_share_one_answer(stack: LocalStack) -> None:
    put(stack, f"_dstack-app-address.busy.{Z}.", "busyapp:443")
    r = resolver(stack)

    async def many() -> list[object]:
        return list(await asyncio.gather(*(r.resolve(f"busy.{Z}") for _ in range(50))))

    results = run(many())
    assert all(x == AppAddress("busyapp", 443, f"_dstack-app-address.busy.{Z}") for x in results)


def test_parse_app_address() -> None:
    assert parse_app_address(f"{APP}:443", "r") == AppAddress(APP, 443, "r")
    assert parse_app_address("a:b:80", "r") is None  # ':' is not allowed in the id
    for bad in ("", ":443", "app:", "app:0", "app:65536", "app:-1", "app:1e3", "a pp:1"):
        assert parse_app_address(bad, "r") is None


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_parse_never_raises(text: str) -> None:
    got = parse_app_address(text, "r")
    assert got is None or (0 < got.port < 65536 and got.app_id)


def test_resolve_never_raises_on_arbitrary_names(stack: LocalStack) -> None:
    """SNI names are attacker-chosen: any text gives a typed result, never an exception."""
    r = resolver(stack, timeout=1.0)

    @settings(max_examples=40, deadline=None)
    @given(
        st.text(alphabet=st.characters(codec="utf-8"), max_size=70)
        | st.from_regex(r"[a-z.-]{1,40}", fullmatch=True)
    )
    def check(name: str) -> None:
        assert isinstance(run(r.resolve(name)), AppAddress | AddressMiss)

    check()
