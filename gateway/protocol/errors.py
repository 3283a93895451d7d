"""The one error family of the sans-IO layer.

Every parser in ``gateway.protocol`` has three outcomes: a value, ``None`` (need more bytes),
or a subclass of :class:`ProtocolError`. Anything else escaping (``IndexError``,
``struct.error``, ...) is a bug, and the fuzz tests check exactly that.
"""

from __future__ import annotations

import enum


class TlsAlert(enum.IntEnum):
    """TLS alert descriptions the edge may send before closing (RFC 8446 section 6)."""

    CLOSE_NOTIFY = 0
    UNEXPECTED_MESSAGE = 10
    RECORD_OVERFLOW = 22
    HANDSHAKE_FAILURE = 40
    ILLEGAL_PARAMETER = 47
    DECODE_ERROR = 50
    PROTOCOL_VERSION = 70
    INTERNAL_ERROR = 80
    UNRECOGNIZED_NAME = 112
    NO_APPLICATION_PROTOCOL = 120


class ProtocolError(Exception):
    """Base of every parse error; ``alert`` says what to answer before closing."""

    alert: TlsAlert = TlsAlert.DECODE_ERROR

    def __init__(self, message: str, *, alert: TlsAlert | None = None) -> None:
        super().__init__(message)
        if alert is not None:
            self.alert = alert


class ClientHelloError(ProtocolError):
    """The bytes are not a usable TLS ClientHello."""


class ProxyHeaderError(ProtocolError):
    """The bytes are not a valid PROXY protocol v1/v2 header."""


class AddressError(ProtocolError):
    """The SNI does not follow ``<id>[-<port>][s|g].<base_domain>``."""

    alert = TlsAlert.UNRECOGNIZED_NAME


class CodecError(ProtocolError):
    """A dstack/TDX binary format (SCALE, msgpack, quote, event log) is malformed."""
