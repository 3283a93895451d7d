"""Sans-IO parsers and codecs: bytes in, a value, ``None`` (need more) or a ProtocolError out.

``clienthello`` (TLS ClientHello sniffing), ``proxy_header`` (PROXY v1/v2), ``address`` (the
SNI subdomain grammar), ``hello_builder`` (ClientHellos for tests), ``errors`` (the one error
family, with TLS alerts). No module here imports asyncio, socket, ssl, os or time (ruff TID251,
see ``ruff.toml``). See docs/protocol.md.
"""
