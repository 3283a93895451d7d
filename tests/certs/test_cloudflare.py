"""The Cloudflare provider against a local PROTOCOL FAKE of the API (see fake_cloudflare.py).

The real API is unreachable offline; the fake implements the few endpoints we call and
writes through to knotd, so pebble validates what the provider published.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.certs.acme import AcmeClient
from gateway.certs.dns.base import CaaRecord, NameServer
from gateway.certs.dns.cloudflare import CloudflareProvider
from gateway.certs.errors import DnsProviderError
from tests.certs.conftest import ZONE
from tests.certs.fake_cloudflare import FakeCloudflare
from tests.certs.localstack import LocalStack
from tests.certs.util import records_at, run, verify_chain

pytestmark = pytest.mark.slow
TOKEN = "cf-test-token-7f3a"


@pytest.fixture(scope="module")
def fake(stack: LocalStack) -> Iterator[FakeCloudflare]:
    cf = FakeCloudflare(
        TOKEN, {ZONE: "zone-gwtest"}, stack.dns_port, (stack.tsig_name, stack.tsig_secret)
    )
    cf.start()
    try:
        yield cf
    finally:
        cf.stop()


def provider(stack: LocalStack, fake: FakeCloudflare, token: str = TOKEN) -> CloudflareProvider:
    return CloudflareProvider(
        api_url=fake.url, token=token, check_servers=[NameServer("127.0.0.1", stack.dns_port)]
    )


def test_txt_values_added_and_removed_exactly_with_paging(
    stack: LocalStack, fake: FakeCloudflare
) -> None:
    p = provider(stack, fake)
    name = f"_acme-challenge.cf.{ZONE}"
    fake.calls.clear()

    async def scenario() -> None:
        try:
            for v in ("one", "two", "three"):
                await p.add_txt(name, v)
            assert records_at(stack.dns_port, name, "TXT") == ['"one"', '"three"', '"two"']
            await p.remove_txt(name, "three")  # on the second page (2 records per page)
            assert records_at(stack.dns_port, name, "TXT") == ['"one"', '"two"']
            await p.remove_txt(name, "one")
            await p.remove_txt(name, "two")
        finally:
            await p.close()

    run(scenario())
    assert records_at(stack.dns_port, name, "TXT") == []
    # the zone was looked up once (longest suffix first), then cached
    # three candidates tried once, longest first (_acme-challenge.cf.<zone>, cf.<zone>, <zone>),
    # then the zone id is cached for the other five calls
    zone_calls = [c for c in fake.calls if c == "GET /client/v4/zones"]
    assert len(zone_calls) == 3


def test_issuance_through_cloudflare_is_validated_by_pebble(
    stack: LocalStack, fake: FakeCloudflare, tmp_path: Path
) -> None:
    p = provider(stack, fake)
    acme = AcmeClient(
        directory_url=stack.directory_url,
        state_dir=tmp_path,
        ca_bundle=stack.listener_ca,
        poll_interval=0.2,
    )

    async def scenario() -> bytes:
        try:
            cert = await acme.issue(ZONE, p, time.monotonic() + 30)
            return cert.fullchain_pem
        finally:
            await p.close()

    fake.calls.clear()
    chain = run(scenario())
    verify_chain(chain, stack.pebble_root_pem(), [f"w.{ZONE}", ZONE])
    assert fake.calls.count("POST /client/v4/zones/zone-gwtest/dns_records") == 2
    assert len([c for c in fake.calls if c.startswith("DELETE")]) == 2
    assert records_at(stack.dns_port, f"_acme-challenge.{ZONE}", "TXT") == []
    assert fake.records == {}


def test_caa_through_cloudflare(stack: LocalStack, fake: FakeCloudflare) -> None:
    p = provider(stack, fake)
    name = f"cfcaa.{ZONE}"

    async def scenario() -> None:
        try:
            await p.set_caa(
                name, [CaaRecord(0, "issue", "a.example"), CaaRecord(0, "iodef", "mailto:x@y.test")]
            )
            await p.set_caa(
                name, [CaaRecord(0, "issue", "b.example"), CaaRecord(0, "issuewild", "b.example")]
            )
        finally:
            await p.close()

    run(scenario())
    # iodef is not an issue/issuewild tag, so the second call keeps it
    assert records_at(stack.dns_port, name, "CAA") == [
        '0 iodef "mailto:x@y.test"',
        '0 issue "b.example"',
        '0 issuewild "b.example"',
    ]


def test_wrong_token_and_unknown_zone(stack: LocalStack, fake: FakeCloudflare) -> None:
    bad = provider(stack, fake, token="wrong")

    async def attempt(p: CloudflareProvider, name: str) -> None:
        try:
            await p.add_txt(name, "x")
        finally:
            await p.close()

    with pytest.raises(DnsProviderError) as err:
        run(attempt(bad, f"_acme-challenge.{ZONE}"))
    assert err.value.rcode == "HTTP 403" and "Invalid access token" in err.value.detail
    assert "wrong" not in repr(bad)
    with pytest.raises(DnsProviderError, match="no Cloudflare zone"):
        run(attempt(provider(stack, fake), "_acme-challenge.example.org"))
    dead = CloudflareProvider(api_url="http://127.0.0.1:9/client/v4", token=TOKEN, timeout=2)
    with pytest.raises(DnsProviderError) as err:
        run(attempt(dead, f"_acme-challenge.{ZONE}"))
    assert err.value.rcode is None
