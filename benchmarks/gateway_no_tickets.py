"""Run ``gateway serve`` with TLS session tickets off (S2 "full" only).

The gateway has no setting for tickets (it keeps OpenSSL's default of 2, see
``gateway/certs/tls.py``), so for the full-handshake cell this wrapper sets
``num_tickets = 0`` on every server context it builds, then runs the normal command. The
supervisor loads certificates before forking its workers, so every worker inherits the
patched contexts. With TLS 1.3 and no tickets, wrk has nothing to resume: every connection
is a full handshake, as with nginx's ``ssl_session_tickets off`` and HAProxy's
``no-tls-tickets``.

Usage: ``python -m benchmarks.gateway_no_tickets serve --config FILE``.
"""

from __future__ import annotations

import ssl
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import gateway.certs.store as store
import gateway.certs.tls as tls
from gateway.cli import main


def without_tickets(
    build: Callable[[Path, Path, Iterable[str], tuple[str, ...]], ssl.SSLContext],
) -> Callable[[Path, Path, Iterable[str], tuple[str, ...]], ssl.SSLContext]:
    def server_context(
        chain: Path, key: Path, versions: Iterable[str], alpn: tuple[str, ...]
    ) -> ssl.SSLContext:
        ctx = build(chain, key, versions, alpn)
        ctx.num_tickets = 0
        ctx.options |= ssl.OP_NO_TICKET  # TLS 1.2 too
        return ctx

    return server_context


if __name__ == "__main__":
    patched = without_tickets(tls.server_context)
    tls.server_context = patched
    store.server_context = patched  # imported by name there
    sys.exit(main(sys.argv[1:]))
