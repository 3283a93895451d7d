"""Build TLS ClientHello bytes for tests and benchmarks (the inverse of ``clienthello``).

Real clients (curl, openssl, Python ssl) give the realistic vectors; this builder gives the
controllable ones: any SNI/ALPN/version list, any size (padding), any record fragmentation,
and -- through the lower-level pieces -- deliberately malformed hellos. It is pure and
deterministic (``random`` defaults to zeros), so a property test can shrink what it finds.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from gateway.protocol.clienthello import (
    CONTENT_HANDSHAKE,
    EXT_ALPN,
    EXT_SERVER_NAME,
    EXT_SUPPORTED_VERSIONS,
    HANDSHAKE_CLIENT_HELLO,
    MAX_RECORD_PAYLOAD,
)

__all__ = [
    "EXT_PADDING",
    "alpn_extension",
    "build_client_hello",
    "client_hello_message",
    "extension",
    "server_name_extension",
    "supported_versions_extension",
    "wrap_records",
]

EXT_PADDING = 21
_DEFAULT_SUITES = (0x1301, 0x1302, 0x1303, 0xC02B, 0xC02F)


def _u16(n: int) -> bytes:
    return n.to_bytes(2, "big")


def extension(kind: int, data: bytes) -> bytes:
    """One extension: type, length, data."""
    return _u16(kind) + _u16(len(data)) + data


def server_name_extension(name: str | bytes) -> bytes:
    """server_name with one host_name entry (bytes are sent as given)."""
    raw = name.encode("ascii") if isinstance(name, str) else name
    entry = b"\x00" + _u16(len(raw)) + raw
    return extension(EXT_SERVER_NAME, _u16(len(entry)) + entry)


def alpn_extension(protocols: Iterable[str | bytes]) -> bytes:
    """application_layer_protocol_negotiation; str names are encoded as latin-1."""
    names = b"".join(
        bytes((len(raw),)) + raw
        for raw in (p.encode("latin-1") if isinstance(p, str) else p for p in protocols)
    )
    return extension(EXT_ALPN, _u16(len(names)) + names)


def supported_versions_extension(versions: Iterable[int]) -> bytes:
    """supported_versions as a client sends it."""
    body = b"".join(_u16(v) for v in versions)
    return extension(EXT_SUPPORTED_VERSIONS, bytes((len(body),)) + body)


def client_hello_message(
    *,
    extensions: Sequence[bytes] | None,
    legacy_version: int = 0x0303,
    random: bytes = bytes(32),
    session_id: bytes = b"",
    cipher_suites: Sequence[int] = _DEFAULT_SUITES,
    compression_methods: bytes = b"\x00",
) -> bytes:
    """A ClientHello handshake message (4-byte header included) from encoded extensions.

    ``extensions=None`` omits the extensions block altogether (legal before TLS 1.3).
    """
    body = (
        _u16(legacy_version)
        + random
        + bytes((len(session_id),))
        + session_id
        + _u16(2 * len(cipher_suites))
        + b"".join(_u16(s) for s in cipher_suites)
        + bytes((len(compression_methods),))
        + compression_methods
    )
    if extensions is not None:
        block = b"".join(extensions)
        body += _u16(len(block)) + block
    return bytes((HANDSHAKE_CLIENT_HELLO,)) + len(body).to_bytes(3, "big") + body


def wrap_records(
    message: bytes,
    *,
    fragment: int | Sequence[int] = MAX_RECORD_PAYLOAD,
    record_version: int = 0x0301,
    content_type: int = CONTENT_HANDSHAKE,
) -> bytes:
    """Split ``message`` into TLS records.

    ``fragment`` is either the maximum payload per record or an explicit list of payload sizes
    (cycled if shorter than needed).
    """
    sizes = [fragment] if isinstance(fragment, int) else list(fragment)
    if not sizes or any(s < 1 for s in sizes):
        raise ValueError(f"fragment sizes must be >= 1, got {fragment!r}")
    out = bytearray()
    pos = i = 0
    while pos < len(message):
        size = sizes[i % len(sizes)]
        chunk = message[pos : pos + size]
        out += bytes((content_type,)) + _u16(record_version) + _u16(len(chunk)) + chunk
        pos += size
        i += 1
    return bytes(out)


def build_client_hello(
    sni: str | bytes | None = "example.com",
    alpn: Sequence[str | bytes] = (),
    *,
    supported_versions: Sequence[int] | None = (0x0304, 0x0303),
    legacy_version: int = 0x0303,
    extra_extensions: Sequence[bytes] = (),
    padding: int = 0,
    fragment: int | Sequence[int] = MAX_RECORD_PAYLOAD,
    record_version: int = 0x0301,
    session_id: bytes = b"",
    random: bytes = bytes(32),
) -> bytes:
    """A complete ClientHello as a client writes it to the socket (records included).

    ``padding`` adds a padding extension (RFC 7685) of that many zero bytes, to reach any size;
    ``extra_extensions`` are appended after SNI, ALPN and supported_versions, in order.
    """
    exts: list[bytes] = []
    if sni is not None:
        exts.append(server_name_extension(sni))
    if alpn:
        exts.append(alpn_extension(alpn))
    if supported_versions is not None:
        exts.append(supported_versions_extension(supported_versions))
    exts.extend(extra_extensions)
    if padding:
        exts.append(extension(EXT_PADDING, bytes(padding)))
    message = client_hello_message(
        extensions=exts, legacy_version=legacy_version, random=random, session_id=session_id
    )
    return wrap_records(message, fragment=fragment, record_version=record_version)
