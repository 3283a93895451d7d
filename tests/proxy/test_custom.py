"""When a worker routes custom domains: the switch and the name servers must both be set."""

from __future__ import annotations

import pytest

from gateway.certs.custom_domains import AppAddressResolver
from gateway.certs.settings import ResolverSettings
from gateway.proxy.custom import make_resolver
from gateway.proxy.settings import ProxySettings

NS = ResolverSettings(nameservers=("127.0.0.1:5353",))


@pytest.mark.parametrize(
    ("proxy", "resolver", "on"),
    [
        (ProxySettings(), NS, True),
        (ProxySettings(custom_domains=False), NS, False),
        (ProxySettings(), ResolverSettings(), False),  # no servers: never the host's resolver
        (ProxySettings(), None, False),
    ],
)
def test_make_resolver(proxy: ProxySettings, resolver: ResolverSettings | None, on: bool) -> None:
    made = make_resolver(proxy, resolver)
    assert isinstance(made, AppAddressResolver) if on else made is None
