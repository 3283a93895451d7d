"""The SNI subdomain grammar: upstream's vectors (proxy.rs tests, reference 3.3) and ours."""

from __future__ import annotations

import pytest

from gateway.protocol.address import Address, Mode, parse_address, split_sni
from gateway.protocol.errors import AddressError, TlsAlert

T, P, H = Mode.TERMINATE, Mode.PASSTHROUGH, Mode.H2

# upstream proxy.rs test_parse_destination, then the reference 3.3 table rows
UPSTREAM = [
    ("myapp", "myapp", 80, T),
    ("myapp-8080", "myapp", 8080, T),
    ("myapp-443s", "myapp", 443, P),
    ("myapp-8443s", "myapp", 8443, P),
    ("myapps", "myapps", 80, T),
    ("myapp-s", "myapp", 443, P),
    ("myapp-g", "myapp", 80, H),
    ("myapp-50051g", "myapp", 50051, H),
]


@pytest.mark.parametrize(("label", "ident", "port", "mode"), UPSTREAM)
def test_parse_address_upstream_vectors(label: str, ident: str, port: int, mode: Mode) -> None:
    assert parse_address(label) == Address(ident, port, mode)
