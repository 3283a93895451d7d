"""Fixtures for the certificate tests: one real pebble + knotd per test module.

A module may set ``PEBBLE_CERT_VALIDITY`` (seconds) to get short-lived certificates.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gateway.certs.dns.rfc2136 import Rfc2136Provider
from tests.certs.localstack import LocalStack, binaries_present, local_stack

ZONE = "gwtest.test"
CUSTOMER_ZONE = "customer.test"


@pytest.fixture(scope="module")
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalStack]:
    if not binaries_present():
        pytest.skip("pebble and knotd are not installed (apt-get install pebble knot)")
    validity = int(getattr(request.module, "PEBBLE_CERT_VALIDITY", 3600))
    with local_stack(
        tmp_path_factory.mktemp("acme"), [ZONE, CUSTOMER_ZONE], cert_validity=validity
    ) as s:
        yield s


def rfc2136_provider(
    stack: LocalStack, *, zone: str = ZONE, secret: str | None = None
) -> Rfc2136Provider:
    """Our RFC 2136 provider pointed at the stack's knotd (NS discovery on the same port)."""
    return Rfc2136Provider(
        server="127.0.0.1",
        port=stack.dns_port,
        zone=zone,
        key_name=stack.tsig_name,
        secret_b64=secret or stack.tsig_secret,
        ttl=10,
        check_port=stack.dns_port,
        timeout=2.0,
    )
