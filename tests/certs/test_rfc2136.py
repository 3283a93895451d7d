"""The RFC 2136 provider against a real knotd: exact-value TXT changes, CAA, errors."""

from __future__ import annotations

import time

import dns.query
import dns.rdatatype
import dns.tsig
import dns.update
import pytest

from gateway.certs.dns.base import CaaRecord, NameServer
from gateway.certs.dns.propagation import wait_for_txt
from gateway.certs.errors import DnsProviderError
from tests.certs.conftest import ZONE, rfc2136_provider
from tests.certs.localstack import LocalStack
from tests.certs.util import records_at, run
from tests.helpers.processes import free_port

pytestmark = pytest.mark.slow


def add_raw(stack: LocalStack, zone: str, rdtype: str, text: str, name: str = "@") -> None:
    """Add a record with a plain dnspython update (independent of the code under test)."""
    key = dns.tsig.Key(stack.tsig_name, stack.tsig_secret, dns.tsig.HMAC_SHA256)
    update = dns.update.UpdateMessage(zone, keyring=key)
    update.add(name, 60, rdtype, text)
    response = dns.query.tcp(update, "127.0.0.1", port=stack.dns_port, timeout=3)
    assert response.rcode() == 0


def test_two_values_share_a_name_and_are_removed_exactly(stack: LocalStack) -> None:
    p = rfc2136_provider(stack)
    name = f"_acme-challenge.pair.{ZONE}"
    run(p.add_txt(name, "value-one"))
    run(p.add_txt(name, "value-two"))
    assert records_at(stack.dns_port, name, "TXT") == ['"value-one"', '"value-two"']
    run(p.remove_txt(name, "value-one"))
    assert records_at(stack.dns_port, name, "TXT") == ['"value-two"']
    run(p.remove_txt(name, "value-one"))  # already gone: not an error
    run(p.remove_txt(name, "value-two"))
    assert records_at(stack.dns_port, name, "TXT") == []


def test_authoritative_servers_include_discovered_ns(stack: LocalStack) -> None:
    p = rfc2136_provider(stack)
    servers = run(p.authoritative_servers(f"_acme-challenge.{ZONE}"))
    # the primary and ns1.gwtest.test (A 127.0.0.1, queried on check_port) coincide here
    assert servers == (NameServer("127.0.0.1", stack.dns_port),)


def test_propagation_check_sees_values_and_reports_laggards(stack: LocalStack) -> None:
    p = rfc2136_provider(stack)
    name = f"_acme-challenge.prop.{ZONE}"
    live = NameServer("127.0.0.1", stack.dns_port)
    dead = NameServer("127.0.0.1", free_port())
    run(p.add_txt(name, "v1"))
    try:
        assert run(wait_for_txt(name, {"v1"}, [live], time.monotonic() + 3)) == []
        start = time.monotonic()
        lag = run(wait_for_txt(name, {"v1"}, [live, dead], time.monotonic() + 1, poll_interval=0.2))
        assert lag == [dead]
        assert time.monotonic() - start < 2.5
        lag = run(wait_for_txt(name, {"v1", "v2"}, [live], time.monotonic() + 0.5))
        assert lag == [live]
    finally:
        run(p.remove_txt(name, "v1"))


def test_caa_swap_keeps_other_tags(stack: LocalStack) -> None:
    p = rfc2136_provider(stack)
    name = f"caa.{ZONE}"
    add_raw(stack, ZONE, "CAA", '0 iodef "mailto:x@gwtest.test"', "caa")
    run(p.set_caa(name, [CaaRecord(0, "issue", "a.example"), CaaRecord(0, "issuewild", ";")]))
    assert records_at(stack.dns_port, name, "CAA") == [
        '0 iodef "mailto:x@gwtest.test"',
        '0 issue "a.example"',
        '0 issuewild ";"',
    ]
    run(p.set_caa(name, [CaaRecord(0, "issue", "b.example")]))
    assert records_at(stack.dns_port, name, "CAA") == [
        '0 iodef "mailto:x@gwtest.test"',
        '0 issue "b.example"',
    ]


def test_caa_on_a_name_that_does_not_exist_yet(stack: LocalStack) -> None:
    """A base domain's apex may have no records at all (NXDOMAIN) when CAA is first pinned;
    that is "no CAA records", not a failed update."""
    p = rfc2136_provider(stack)
    name = f"fresh-caa.{ZONE}"
    assert records_at(stack.dns_port, name, "CAA") == []
    run(p.set_caa(name, [CaaRecord(0, "issue", "a.example")]))
    assert records_at(stack.dns_port, name, "CAA") == ['0 issue "a.example"']


def test_wrong_key_unknown_key_outside_zone_and_dead_server(stack: LocalStack) -> None:
    bad = rfc2136_provider(stack, secret="AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
    with pytest.raises(DnsProviderError) as err:
        run(bad.add_txt(f"_acme-challenge.{ZONE}", "x"))
    assert (err.value.zone, err.value.rcode) == (ZONE, "BADSIG")

    from gateway.certs.dns.rfc2136 import Rfc2136Provider

    unknown = Rfc2136Provider(
        server="127.0.0.1",
        port=stack.dns_port,
        zone=ZONE,
        key_name="no-such-key",
        secret_b64=stack.tsig_secret,
    )
    with pytest.raises(DnsProviderError) as err:
        run(unknown.add_txt(f"_acme-challenge.{ZONE}", "x"))
    assert err.value.rcode in ("BADKEY", "NOTAUTH")

    # a zone this server is not authoritative for
    other = rfc2136_provider(stack, zone="not-served.test")
    with pytest.raises(DnsProviderError) as err:
        run(other.add_txt("_acme-challenge.not-served.test", "x"))
    assert err.value.zone == "not-served.test"
    assert err.value.rcode == "NOTAUTH"  # knot answers unsigned; reported, never trusted

    with pytest.raises(DnsProviderError, match="outside the zone"):
        run(rfc2136_provider(stack).add_txt("_acme-challenge.example.org", "x"))

    dead = Rfc2136Provider(
        server="127.0.0.1",
        port=free_port(),
        zone=ZONE,
        key_name=stack.tsig_name,
        secret_b64=stack.tsig_secret,
        timeout=0.5,
    )
    with pytest.raises(DnsProviderError) as err:
        run(dead.add_txt(f"_acme-challenge.{ZONE}", "x"))
    assert err.value.rcode is None
    assert records_at(stack.dns_port, f"_acme-challenge.{ZONE}", "TXT") == []
    assert "secret" not in repr(bad) and stack.tsig_secret not in repr(bad)
    _ = dns.rdatatype
