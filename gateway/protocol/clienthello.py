"""Sniff the TLS ClientHello at the start of a TCP stream, without doing any I/O.

The proxy must route a connection (terminate, pass through, which backend) from the
ClientHello before any TLS library sees the bytes, and in passthrough mode it must replay those
bytes unchanged. So this module reads TLS records (RFC 8446 section 5.1), reassembles the
handshake message however it was fragmented across records and TCP segments, and decodes the
few fields routing needs: SNI (RFC 6066), ALPN (RFC 7301), supported_versions and
legacy_version.

Three outcomes, as everywhere in ``gateway.protocol``: a :class:`ClientHello`, ``None`` (need
more bytes), or :class:`~gateway.protocol.errors.ClientHelloError`, whose message names the
field and offset and whose ``alert`` is the TLS alert to send (see :func:`encode_alert`).

Offsets in messages are *stream* offsets for the record layer ("record at stream offset 517")
and *handshake* offsets for fields of the ClientHello (counted from the handshake header's
first byte), since fragmentation makes the latter non-contiguous in the stream.

Whatever the TCP split, the outcome is the same: every check depends only on bytes at or
before the position where it is made, and checks run in stream order. The size limit is part
of that: a record that would end past ``limit`` is refused as soon as its header is read.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from gateway.protocol.errors import ClientHelloError, TlsAlert

__all__ = [
    "DEFAULT_LIMIT",
    "MAX_RECORD_PAYLOAD",
    "ClientHello",
    "HelloSniffer",
    "check_host_name",
    "encode_alert",
    "parse_client_hello",
]

DEFAULT_LIMIT = 64 * 1024
"""Default cap on the bytes buffered before a ClientHello completes (hello_length <= limit)."""

MAX_RECORD_PAYLOAD = 1 << 14
"""TLSPlaintext.length must not exceed 2^14 (RFC 8446 section 5.1)."""

CONTENT_ALERT = 21
CONTENT_HANDSHAKE = 22
HANDSHAKE_CLIENT_HELLO = 1

EXT_SERVER_NAME = 0
EXT_ALPN = 16
EXT_PRE_SHARED_KEY = 41
EXT_SUPPORTED_VERSIONS = 43
NAME_TYPE_HOST_NAME = 0

# legacy_version(2) random(32) session_id<0..32>(1) cipher_suites<2..>(2+2) compression<1..>(1+1)
_MIN_BODY = 2 + 32 + 1 + 4 + 2
# ... up to session_id<..32>, cipher_suites<..2^16-2>, compression<..2^8-1>, extensions<..2^16-1>:
# the u24 handshake length can claim 16 MiB, but no valid ClientHello body exceeds this.
_MAX_BODY = 2 + 32 + 1 + 32 + 2 + 0xFFFE + 1 + 0xFF + 2 + 0xFFFF
_RECORD_HEADER = 5
_HANDSHAKE_HEADER = 4

# one label; names are checked label by label, which keeps the match linear in the name
_LABEL_RE = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_HTTP_METHOD_STARTS = frozenset(b"GPHDOCT")


@dataclass(frozen=True, slots=True)
class ClientHello:
    """The routing-relevant fields of one ClientHello; valid from birth.

    ``sni``: the host_name from server_name, lower-cased and checked by :func:`check_host_name`,
    or ``None`` if the client sent no server_name extension. ``alpn``: protocol names in the
    client's order (decoded as latin-1, so any byte string maps to a str and back); ``()`` when
    absent. ``supported_versions``: the extension's list as sent, GREASE values included; ``()``
    when absent (a TLS <= 1.2 client). ``legacy_version``: ClientHello.legacy_version.
    ``hello_length``: the stream bytes, record headers included, up to the end of the record
    that completed the ClientHello; bytes past it are the client's next records.
    """

    sni: str | None
    alpn: tuple[str, ...]
    supported_versions: tuple[int, ...]
    legacy_version: int
    hello_length: int

    def __post_init__(self) -> None:
        if self.sni is not None and check_host_name(self.sni) != self.sni:
            raise ClientHelloError(
                f"ClientHello sni {self.sni!r} is not lower-case",
                alert=TlsAlert.UNRECOGNIZED_NAME,
            )
        for name in self.alpn:
            if not 0 < len(name) < 256 or not name.isascii() and _not_latin1(name):
                raise ClientHelloError(f"ClientHello alpn entry {name!r} is not 1..255 bytes")
        for value in (*self.supported_versions, self.legacy_version):
            if not 0 <= value <= 0xFFFF:
                raise ClientHelloError(f"ClientHello version {value} is not a uint16")
        if self.hello_length < _RECORD_HEADER + _HANDSHAKE_HEADER + _MIN_BODY:
            raise ClientHelloError(f"ClientHello hello_length {self.hello_length} is too small")

    @property
    def offers_tls13(self) -> bool:
        """True if the client lists TLS 1.3 in supported_versions."""
        return 0x0304 in self.supported_versions


def _not_latin1(name: str) -> bool:
    try:
        name.encode("latin-1")
    except UnicodeEncodeError:
        return True
    return False


def check_host_name(name: str) -> str:
    """Return ``name`` lower-cased if it is an acceptable SNI host name; raise otherwise.

    Accepted: ASCII letters, digits, ``-`` and ``_`` in dot-separated labels of 1..63 bytes,
    no label starting or ending with ``-``, at most 253 bytes, no trailing dot (RFC 6066
    section 3 forbids it). ``_`` is tolerated because real names carry it. IPv4 literals pass
    this syntax check; they simply match no route.

    Raises :class:`ClientHelloError` with alert ``UNRECOGNIZED_NAME`` naming what is wrong.
    """
    lower = name.lower()
    if _is_host_name(lower):
        return lower
    raise ClientHelloError(
        f"server_name host_name {name[:80]!r}: {_explain_bad_host(lower)}",
        alert=TlsAlert.UNRECOGNIZED_NAME,
    )


def _is_host_name(lower: str) -> bool:
    """The acceptance test of :func:`check_host_name` on an already lower-cased name."""
    if len(lower) <= 253 and lower.isascii():
        match = _LABEL_RE.fullmatch
        for label in lower.split("."):
            if match(label) is None:
                return False
        return True
    return False


def _explain_bad_host(name: str) -> str:
    if not name.isascii():
        return "not ASCII (IDNs must be sent as A-labels, xn--...)"
    if len(name) > 253:
        return f"{len(name)} bytes long, more than 253"
    if name.endswith("."):
        return "has a trailing dot"
    for label in name.split("."):
        if not label:
            return "has an empty label"
        if len(label) > 63:
            return f"label {label[:20]!r}... is {len(label)} bytes long, more than 63"
        if label[0] == "-" or label[-1] == "-":
            return f"label {label!r} starts or ends with '-'"
        bad = next((c for c in label if not (c.isalnum() or c in "-_")), None)
        if bad is not None:
            return f"label {label!r} contains {bad!r}"
    return "is not a valid host name"


def encode_alert(alert: TlsAlert, version: int = 0x0303) -> bytes:
    """A plaintext TLS alert record (7 bytes) to send before closing on a bad ClientHello.

    The level is fatal (2), except for ``CLOSE_NOTIFY`` which is a warning (1) by definition.
    """
    if not 0 <= version <= 0xFFFF:
        raise ValueError(f"record version {version:#x} is not a uint16")
    level = 1 if alert is TlsAlert.CLOSE_NOTIFY else 2
    return bytes((CONTENT_ALERT, version >> 8, version & 0xFF, 0, 2, level, int(alert)))


def parse_client_hello(data: bytes, *, limit: int = DEFAULT_LIMIT) -> ClientHello | None:
    """Parse the ClientHello at the start of ``data`` (the raw start of a TCP stream).

    Returns the :class:`ClientHello`, or ``None`` if ``data`` is a valid but incomplete prefix.
    Raises :class:`ClientHelloError` if the bytes can never become a valid ClientHello, or if it
    would need more than ``limit`` bytes. Bytes after the hello's last record are ignored.
    """
    return HelloSniffer(limit).feed(data)


class HelloSniffer:
    """Incremental ClientHello parser for one connection; feed it what the socket delivers.

    It keeps every byte fed (:attr:`buffered`, for passthrough replay), the offset of the next
    unread record and the handshake bytes reassembled so far, so each byte is looked at a
    bounded number of times: one-byte feeds cost O(n) in total, not O(n^2).

    Once a result is reached it is sticky: after a ClientHello, further feeds only add to
    :attr:`buffered` and return the same hello; after an error, every feed re-raises it.
    """

    __slots__ = ("limit", "_buf", "_pos", "_handshake", "_need", "_result", "_error")

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        minimum = _RECORD_HEADER + _HANDSHAKE_HEADER + _MIN_BODY
        if limit < minimum:
            raise ValueError(f"limit {limit} is below the smallest ClientHello ({minimum} bytes)")
        self.limit = limit
        self._buf = bytearray()
        self._pos = 0  # stream offset of the next record header
        self._handshake = bytearray()  # handshake payload reassembled from complete records
        self._need = -1  # full handshake message length (header included), once known
        self._result: ClientHello | None = None
        self._error: ClientHelloError | None = None

    @property
    def buffered(self) -> bytes:
        """Every byte fed so far, unchanged (replay it to a passthrough upstream)."""
        return bytes(self._buf)

    @property
    def result(self) -> ClientHello | None:
        """The ClientHello once complete, else ``None``."""
        return self._result

    @property
    def wanted(self) -> int:
        """How many stream bytes must be buffered before :meth:`feed` can make progress.

        While incomplete: the end of the next record header, or of the record whose header is
        already in (never past ``limit``). A peeking caller can set ``SO_RCVLOWAT`` to this so
        that it re-parses once per record rather than once per segment. After a result (or an
        error): the bytes buffered so far.
        """
        size = len(self._buf)
        if self._result is not None or self._error is not None:
            return size
        pos = self._pos
        if size - pos < _RECORD_HEADER:
            return pos + _RECORD_HEADER
        return pos + _RECORD_HEADER + (self._buf[pos + 3] << 8 | self._buf[pos + 4])

    def feed(self, data: bytes) -> ClientHello | None:
        """Add ``data``; return the ClientHello once complete, ``None`` while incomplete.

        Raises :class:`ClientHelloError` (also on every later call) when the stream cannot
        start with a valid ClientHello or the hello would need more than ``limit`` bytes.
        """
        if not self._buf and type(data) is bytes:
            hello = _fast_hello(data, self.limit)
            if hello is not None:  # the common case; anything else takes the full parser
                self._buf += data
                self._pos = hello.hello_length
                self._result = hello
                return hello
        self._buf += data
        if self._result is not None:
            return self._result
        if self._error is not None:
            raise self._error
        try:
            self._result = self._advance()
        except ClientHelloError as exc:
            self._error = exc
            raise
        return self._result

    def _advance(self) -> ClientHello | None:
        buf = self._buf
        size = len(buf)
        while True:
            pos = self._pos
            avail = size - pos
            if pos + _RECORD_HEADER > self.limit:
                raise _too_large(self.limit, f"record at stream offset {pos}")
            if avail < _RECORD_HEADER:
                if avail:
                    _check_record_prefix(buf, pos, avail)
                return None
            _check_record_prefix(buf, pos, _RECORD_HEADER)
            length = buf[pos + 3] << 8 | buf[pos + 4]
            if length == 0:
                raise ClientHelloError(
                    f"record at stream offset {pos}: empty handshake record",
                    alert=TlsAlert.UNEXPECTED_MESSAGE,
                )
            if length > MAX_RECORD_PAYLOAD:
                raise ClientHelloError(
                    f"record at stream offset {pos}: length {length} exceeds 2^14",
                    alert=TlsAlert.RECORD_OVERFLOW,
                )
            end = pos + _RECORD_HEADER + length
            if end > self.limit:
                raise _too_large(self.limit, f"record at stream offset {pos} (ends at {end})")
            if end > size:
                return None
            handshake = self._handshake
            handshake += buf[pos + _RECORD_HEADER : end]
            self._pos = end
            if self._need < 0:
                self._check_handshake_header(end)
            if 0 <= self._need <= len(handshake):
                if len(handshake) > self._need:
                    raise ClientHelloError(
                        f"record ending at stream offset {end}: "
                        f"{len(handshake) - self._need} bytes follow the ClientHello in the "
                        "same record (it must end at a record boundary)",
                        alert=TlsAlert.UNEXPECTED_MESSAGE,
                    )
                return _parse_body(bytes(handshake), end)

    def _check_handshake_header(self, end: int) -> None:
        handshake = self._handshake
        if handshake[0] != HANDSHAKE_CLIENT_HELLO:
            raise ClientHelloError(
                f"handshake offset 0: message type {handshake[0]} is not ClientHello (1)",
                alert=TlsAlert.UNEXPECTED_MESSAGE,
            )
        if len(handshake) < _HANDSHAKE_HEADER:
            return
        length = handshake[1] << 16 | handshake[2] << 8 | handshake[3]
        if not _MIN_BODY <= length <= _MAX_BODY:
            raise ClientHelloError(
                f"handshake offset 1: ClientHello length {length} is outside the possible "
                f"{_MIN_BODY}..{_MAX_BODY}"
            )
        remaining = _HANDSHAKE_HEADER + length - len(handshake)
        if end + max(remaining, 0) > self.limit:
            raise _too_large(self.limit, f"ClientHello of {length} bytes")
        self._need = _HANDSHAKE_HEADER + length


def _too_large(limit: int, what: str) -> ClientHelloError:
    return ClientHelloError(
        f"{what} does not fit in the {limit}-byte ClientHello limit; "
        "raise the sniffing limit if such clients are legitimate",
        alert=TlsAlert.HANDSHAKE_FAILURE,
    )


def _check_record_prefix(buf: bytearray, pos: int, avail: int) -> None:
    """Checks on a record header's first ``avail`` (1..5) bytes, so junk fails early."""
    ctype = buf[pos]
    if ctype != CONTENT_HANDSHAKE:
        raise _bad_content_type(buf, pos, ctype)
    if avail >= 2 and buf[pos + 1] != 3:
        raise ClientHelloError(
            f"record at stream offset {pos}: version major {buf[pos + 1]} is not 3 (TLS)",
            alert=TlsAlert.PROTOCOL_VERSION,
        )


def _bad_content_type(buf: bytearray, pos: int, ctype: int) -> ClientHelloError:
    if pos > 0:
        return ClientHelloError(
            f"record at stream offset {pos}: content type {ctype} arrived before the "
            "ClientHello was complete (expected handshake, 22)",
            alert=TlsAlert.UNEXPECTED_MESSAGE,
        )
    if ctype & 0x80:
        return ClientHelloError(
            "stream offset 0: SSLv2-style ClientHello record; only TLS records are accepted",
            alert=TlsAlert.PROTOCOL_VERSION,
        )
    hint = ""
    if ctype in _HTTP_METHOD_STARTS:
        hint = f" (byte {bytes([ctype])!r}: plaintext HTTP? connect with TLS, https://)"
    return ClientHelloError(
        f"stream offset 0: content type {ctype} is not a TLS handshake record (22){hint}",
        alert=TlsAlert.UNEXPECTED_MESSAGE,
    )


def _fail(offset: int, what: str, alert: TlsAlert = TlsAlert.DECODE_ERROR) -> ClientHelloError:
    return ClientHelloError(f"ClientHello {what} at handshake offset {offset}", alert=alert)


def _parse_body(msg: bytes, hello_length: int) -> ClientHello:
    """Decode a complete handshake message (4-byte header included)."""
    end = len(msg)
    legacy_version = msg[4] << 8 | msg[5]
    if msg[4] != 3:
        raise _fail(
            4, f"legacy_version {legacy_version:#06x} is not TLS", TlsAlert.PROTOCOL_VERSION
        )
    p = 4 + 2 + 32
    sid_len = msg[p]
    if sid_len > 32:
        raise _fail(p, f"legacy_session_id length {sid_len} exceeds 32", TlsAlert.ILLEGAL_PARAMETER)
    p += 1 + sid_len
    if p + 2 > end:
        raise _fail(p, "cipher_suites length: truncated")
    cs_len = msg[p] << 8 | msg[p + 1]
    if cs_len < 2 or cs_len & 1:
        raise _fail(p, f"cipher_suites length {cs_len} is not an even number >= 2")
    p += 2 + cs_len
    if p + 1 > end:
        raise _fail(p - cs_len, f"cipher_suites length {cs_len} overruns the message")
    comp_len = msg[p]
    if comp_len < 1:
        raise _fail(p, "legacy_compression_methods is empty")
    p += 1 + comp_len
    if p > end:
        raise _fail(p - comp_len - 1, f"legacy_compression_methods length {comp_len} overruns")
    if p == end:  # no extensions block: a pre-TLS-1.2-style hello, legal
        return ClientHello(None, (), (), legacy_version, hello_length)
    if p + 2 > end:
        raise _fail(p, "extensions length: truncated")
    ext_total = msg[p] << 8 | msg[p + 1]
    if p + 2 + ext_total != end:
        raise _fail(p, f"extensions length {ext_total} does not match the {end - p - 2} bytes left")
    p += 2
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    versions: tuple[int, ...] = ()
    seen: set[int] = set()
    while p < end:
        if p + 4 > end:
            raise _fail(p, "extension header: truncated")
        etype = msg[p] << 8 | msg[p + 1]
        elen = msg[p + 2] << 8 | msg[p + 3]
        if EXT_PRE_SHARED_KEY in seen:
            raise _fail(
                p, f"extension {etype:#06x} after pre_shared_key", TlsAlert.ILLEGAL_PARAMETER
            )
        if etype in seen:
            raise _fail(p, f"duplicate extension {etype:#06x}", TlsAlert.ILLEGAL_PARAMETER)
        seen.add(etype)
        data_start = p + 4
        data_end = data_start + elen
        if data_end > end:
            raise _fail(p, f"extension {etype:#06x} length {elen} overruns the extensions block")
        if etype == EXT_SERVER_NAME:
            sni = _parse_server_name(msg, data_start, data_end)
        elif etype == EXT_ALPN:
            alpn = _parse_alpn(msg, data_start, data_end)
        elif etype == EXT_SUPPORTED_VERSIONS:
            versions = _parse_supported_versions(msg, data_start, data_end)
        p = data_end
    return ClientHello(sni, alpn, versions, legacy_version, hello_length)


def _parse_server_name(msg: bytes, start: int, end: int) -> str | None:
    """server_name (RFC 6066 section 3): a non-empty list; at most one host_name entry."""
    if end - start < 2:
        raise _fail(start, "server_name list length: truncated")
    list_len = msg[start] << 8 | msg[start + 1]
    if list_len == 0 or start + 2 + list_len != end:
        raise _fail(
            start, f"server_name list length {list_len} does not fill the {end - start - 2} bytes"
        )
    p = start + 2
    host: str | None = None
    while p < end:
        if p + 3 > end:
            raise _fail(p, "server_name entry header: truncated")
        name_type = msg[p]
        name_len = msg[p + 1] << 8 | msg[p + 2]
        if p + 3 + name_len > end:
            raise _fail(p, f"server_name entry length {name_len} overruns the list")
        if name_type == NAME_TYPE_HOST_NAME:
            if host is not None:
                raise _fail(p, "second host_name in server_name", TlsAlert.ILLEGAL_PARAMETER)
            if name_len == 0:
                raise _fail(p, "server_name host_name is empty")
            raw = msg[p + 3 : p + 3 + name_len]
            if not raw.isascii():
                raise _fail(
                    p + 3,
                    "server_name host_name is not ASCII (IDNs must be sent as A-labels)",
                    TlsAlert.UNRECOGNIZED_NAME,
                )
            try:
                host = check_host_name(raw.decode("ascii"))
            except ClientHelloError as exc:
                raise _fail(p + 3, str(exc), exc.alert) from None
        p += 3 + name_len
    return host


def _parse_alpn(msg: bytes, start: int, end: int) -> tuple[str, ...]:
    """application_layer_protocol_negotiation (RFC 7301): non-empty list of non-empty names."""
    if end - start < 2:
        raise _fail(start, "alpn list length: truncated")
    list_len = msg[start] << 8 | msg[start + 1]
    if list_len < 2 or start + 2 + list_len != end:
        raise _fail(start, f"alpn list length {list_len} does not fill the {end - start - 2} bytes")
    p = start + 2
    names: list[str] = []
    while p < end:
        name_len = msg[p]
        if name_len == 0:
            raise _fail(p, "alpn protocol name is empty")
        if p + 1 + name_len > end:
            raise _fail(p, f"alpn protocol name length {name_len} overruns the list")
        names.append(msg[p + 1 : p + 1 + name_len].decode("latin-1"))
        p += 1 + name_len
    return tuple(names)


def _parse_supported_versions(msg: bytes, start: int, end: int) -> tuple[int, ...]:
    """supported_versions in a ClientHello (RFC 8446 section 4.2.1): versions<2..254>."""
    if end - start < 1:
        raise _fail(start, "supported_versions length: truncated")
    list_len = msg[start]
    if list_len < 2 or list_len & 1 or start + 1 + list_len != end:
        raise _fail(
            start,
            f"supported_versions length {list_len} is not an even number >= 2 filling the "
            f"{end - start - 1} bytes",
        )
    return tuple(msg[i] << 8 | msg[i + 1] for i in range(start + 1, end, 2))


def _fast_hello(data: bytes, limit: int) -> ClientHello | None:
    """The common case in one pass: the whole ClientHello in the first record, well formed.

    Returns the same :class:`ClientHello` the full parser (:meth:`HelloSniffer._advance` and
    :func:`_parse_body`) would return for ``data``, or ``None`` when the fast path does not
    apply: fragmented or incomplete hellos, hellos without extensions, a server_name list
    other than one host_name, and anything the full parser would refuse. It never raises:
    every refusal, and so every error message and alert, stays with the full parser, which
    runs on whatever this returns ``None`` for. It makes exactly the full parser's checks, in
    a form that only has to decide "accept or defer": indices are stream offsets (the
    handshake header starts at 5), and duplicate extensions and extensions after
    pre_shared_key are checked once at the end instead of per extension.

    Saves the per-connection cost of the general machinery (buffer copies, record
    reassembly, per-extension set updates, the dataclass re-validating the host name): about
    a quarter of the full parser's time for a typical 517-byte hello (docs/performance.md).
    """
    size = len(data)
    if size < 9 or data[0] != CONTENT_HANDSHAKE or data[1] != 3:
        return None
    length = data[3] << 8 | data[4]
    end = _RECORD_HEADER + length
    if end > size or end > limit or length > MAX_RECORD_PAYLOAD or length < 4 + _MIN_BODY:
        return None
    # one handshake message filling the record exactly (its u24 length is then < 2^14)
    if data[5] != HANDSHAKE_CLIENT_HELLO or data[6] or (data[7] << 8 | data[8]) != length - 4:
        return None
    if data[9] != 3:
        return None
    p = 43  # 5 + 4 + legacy_version(2) + random(32): legacy_session_id
    sid_len = data[p]
    if sid_len > 32:
        return None
    p += 1 + sid_len
    if p + 2 > end:
        return None
    cs_len = data[p] << 8 | data[p + 1]
    if cs_len < 2 or cs_len & 1:
        return None
    p += 2 + cs_len
    if p + 1 > end:
        return None
    comp_len = data[p]
    p += 1 + comp_len
    if comp_len < 1 or p + 2 > end:  # also defers the legal no-extensions hello
        return None
    if p + 2 + (data[p] << 8 | data[p + 1]) != end:
        return None
    p += 2
    # the walk only records where each extension's header is; the three that routing
    # needs are decoded after it (most extensions cost just this loop)
    header = _EXT_HEADER
    at: dict[int, int] = {}  # extension type -> offset of its header
    count = 0
    try:
        while p < end:
            etype, elen = header(data, p)  # struct.error past the end of data
            at[etype] = p
            count += 1
            p += 4 + elen
            if p > end:  # also a header overrunning the block
                return None
    except struct.error:
        return None
    if count != len(at):  # a duplicate
        return None
    h = at.get(EXT_PRE_SHARED_KEY)
    if h is not None and h + 4 + (data[h + 2] << 8 | data[h + 3]) != end:  # not last
        return None
    sni: str | None = None
    h = at.get(EXT_SERVER_NAME)
    if h is not None:
        # exactly one entry, a host_name filling the list that fills the extension
        start = h + 4
        name_len = (data[h + 2] << 8 | data[h + 3]) - 5
        if (
            name_len < 1
            or (data[start] << 8 | data[start + 1]) != name_len + 3
            or data[start + 2] != NAME_TYPE_HOST_NAME
            or (data[start + 3] << 8 | data[start + 4]) != name_len
        ):
            return None
        raw = data[start + 5 : start + 5 + name_len]
        if not raw.isascii():
            return None
        sni = raw.decode("ascii").lower()
        if not _is_host_name(sni):
            return None
    alpn: tuple[str, ...] = ()
    h = at.get(EXT_ALPN)
    if h is not None:
        start = h + 4
        stop = start + (data[h + 2] << 8 | data[h + 3])
        if stop - start < 4 or (data[start] << 8 | data[start + 1]) != stop - start - 2:
            return None
        q = start + 2
        names: list[str] = []
        while q < stop:
            n = data[q]
            q += 1 + n
            if n == 0 or q > stop:
                return None
            names.append(data[q - n : q].decode("latin-1"))
        alpn = tuple(names)
    versions: tuple[int, ...] = ()
    h = at.get(EXT_SUPPORTED_VERSIONS)
    if h is not None:
        n = (data[h + 2] << 8 | data[h + 3]) - 1
        if n < 2 or n & 1 or data[h + 4] != n:
            return None
        versions = _U16_ARRAYS[n >> 1](data, h + 5)
    # every field passed __post_init__'s checks above (sni by _is_host_name, alpn names are
    # 1..255 latin-1 characters, versions are two bytes, end >= 5 + 4 + _MIN_BODY): build it
    # without running them again (they were a fifth of this function's time)
    hello = _new_hello(ClientHello)
    _set_field(hello, "sni", sni)
    _set_field(hello, "alpn", alpn)
    _set_field(hello, "supported_versions", versions)
    _set_field(hello, "legacy_version", 0x0300 | data[10])
    _set_field(hello, "hello_length", end)
    return hello


_new_hello = object.__new__
_set_field = object.__setattr__  # what the frozen dataclass's own __init__ uses
_EXT_HEADER = struct.Struct(">HH").unpack_from
_U16_ARRAYS = tuple(struct.Struct(f">{k}H").unpack_from for k in range(128))  # by count
