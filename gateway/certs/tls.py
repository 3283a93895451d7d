"""Server ``SSLContext`` construction for terminated connections.

Choices follow the measured facts in ``docs/proxy.md`` (and the shared TLS performance note):

* TLS 1.2 and 1.3 by default; TLS 1.3 session tickets stay at OpenSSL's default (2), because
  returning clients that resume cost ~100 µs less per connection than full handshakes
  (``proxy.session_tickets`` changes the count; 1 measured no different from 2 under wrk
  here; 0 turns resumption off).
* The full chain is loaded from ``fullchain.pem`` and no CA locations are loaded, so OpenSSL
  never builds a chain per handshake.
* Key-share groups stay at the default (restricting them forces HelloRetryRequests).
* Client-initiated renegotiation is off (it also keeps ``send`` from ever wanting to read).
* One context per (certificate, ALPN offer): the SNI is already parsed from the sniffed
  ClientHello, so the context is chosen before the handshake, with no Python ``sni_callback``.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from pathlib import Path

__all__ = ["ALPN_H1", "ALPN_H2", "server_context"]

ALPN_H1: tuple[str, ...] = ("http/1.1",)
ALPN_H2: tuple[str, ...] = ("h2",)

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def server_context(
    chain: Path, key: Path, versions: Iterable[str], alpn: tuple[str, ...], tickets: int = 2
) -> ssl.SSLContext:
    """A server context for ``chain``/``key`` offering ``alpn``.

    Raises ``ssl.SSLError`` or ``OSError`` if the files do not load.
    """
    wanted = sorted(_VERSIONS[v] for v in versions)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = wanted[0]
    ctx.maximum_version = wanted[-1]
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    ctx.load_cert_chain(str(chain), str(key))
    if tickets != ctx.num_tickets:
        ctx.num_tickets = tickets  # TLS 1.3 tickets issued per handshake (resumption)
    if tickets == 0:
        ctx.options |= ssl.OP_NO_TICKET  # and no TLS 1.2 tickets either
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx
