"""PROXY protocol v1 and v2 headers (haproxy's ``proxy-protocol.txt``), sans-IO.

A load balancer in front of the gateway may prefix each connection with a PROXY header naming
the real client; the gateway may in turn prefix its upstream connections with one when an
app's port policy asks for it. Both directions go through this module.

Accepted on input (anything else raises :class:`ProxyHeaderError`):

- v1: ``"PROXY " ("TCP4" | "TCP6") " " src " " dst " " sport " " dport "\\r\\n"`` with
  exactly one space between fields, IP addresses of the named family (IPv4 dotted quads without
  leading zeros), ports 0..65535 without leading zeros; or ``"PROXY UNKNOWN" ... "\\r\\n"``
  (the rest of the line is ignored). The whole line, CRLF included, is at most 107 bytes.
- v2: the 12-byte signature, version nibble 2, command LOCAL (0) or PROXY (1), family and
  transport nibbles from the spec. The 16-byte fixed part is checked first, and the declared
  length must keep the header within 2048 bytes (as upstream). ``0x11`` (TCP/IPv4), ``0x21``
  (TCP/IPv6), ``0x31`` (UNIX stream) and ``0x00`` (UNSPEC) are decoded; other valid
  combinations (UDP, ...) fall back to UNSPEC as the spec allows, their block skipped. TLVs
  after the address block must be well-formed; they are returned raw, in order.

For v2 ``LOCAL`` the addresses, if any, are decoded but the spec says to ignore them: callers
use the real socket endpoints. v1 ``UNKNOWN`` decodes as command PROXY, family UNSPEC, no
addresses. UNIX paths are ``(path, 0)`` tuples; the path is the bytes up to the first NUL,
decoded as latin-1.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

from gateway.protocol.errors import ProxyHeaderError

__all__ = [
    "V1_MAX_LENGTH",
    "V2_MAX_LENGTH",
    "V2_SIGNATURE",
    "Command",
    "Family",
    "ProxyHeader",
    "encode_proxy_header",
    "parse_proxy_header",
]

V1_PREFIX = b"PROXY "
V1_MAX_LENGTH = 107
"""Longest v1 line a receiver must accept, CRLF included."""
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED_LENGTH = 16
V2_MAX_LENGTH = 2048
"""Longest v2 header (fixed part included) we parse, as upstream does."""
UNIX_PATH_LENGTH = 108


class Command(enum.IntEnum):
    """v2 command nibble; v1 headers are always PROXY."""

    LOCAL = 0
    PROXY = 1


class Family(enum.IntEnum):
    """v2 address family nibble; v1 TCP4/TCP6/UNKNOWN map to INET/INET6/UNSPEC."""

    UNSPEC = 0
    INET = 1
    INET6 = 2
    UNIX = 3


_ADDRESS_BLOCK = {Family.UNSPEC: 0, Family.INET: 12, Family.INET6: 36, Family.UNIX: 216}
_V1_PROTOCOLS = {b"TCP4": Family.INET, b"TCP6": Family.INET6}
_V1_NAMES = {Family.INET: "TCP4", Family.INET6: "TCP6"}
_STREAM = 1
_V2_DECODED = frozenset((0x00, 0x11, 0x21, 0x31))  # UNSPEC, TCP over IPv4/IPv6, UNIX stream


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """One PROXY header, valid from birth; addresses are normalised (``str(ip_address)``).

    Rules checked here, so that :func:`encode_proxy_header` cannot fail: INET/INET6 need both
    addresses of that family with ports 0..65535; UNIX needs both paths (no NUL, <= 108 bytes
    latin-1, port 0); UNSPEC has no addresses. v1 cannot carry LOCAL, UNIX or TLVs. TLV types
    are 0..255, values at most 65535 bytes, and a v2 header must fit in 2048 bytes.
    """

    version: int
    command: Command
    family: Family
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    tlvs: tuple[tuple[int, bytes], ...] = ()

    def __post_init__(self) -> None:
        if self.version not in (1, 2):
            raise ProxyHeaderError(f"PROXY header version {self.version} is not 1 or 2")
        try:
            if type(self.command) is not Command:
                object.__setattr__(self, "command", Command(self.command))
            if type(self.family) is not Family:
                object.__setattr__(self, "family", Family(self.family))
        except ValueError as exc:
            raise ProxyHeaderError(f"PROXY header: {exc}") from None
        if self.family is Family.UNSPEC:
            if self.source is not None or self.destination is not None:
                raise ProxyHeaderError("PROXY header family UNSPEC carries no addresses")
        else:
            object.__setattr__(self, "source", _check_endpoint(self.family, self.source, "src"))
            object.__setattr__(
                self, "destination", _check_endpoint(self.family, self.destination, "dst")
            )
        if self.version == 1:
            if self.command is not Command.PROXY:
                raise ProxyHeaderError("PROXY v1 cannot express the LOCAL command")
            if self.family is Family.UNIX:
                raise ProxyHeaderError("PROXY v1 cannot carry UNIX addresses")
            if self.tlvs:
                raise ProxyHeaderError("PROXY v1 cannot carry TLVs")
            return
        size = V2_FIXED_LENGTH + _ADDRESS_BLOCK[self.family]
        for kind, value in self.tlvs:
            if not 0 <= kind <= 0xFF or len(value) > 0xFFFF:
                raise ProxyHeaderError(f"PROXY v2 TLV type {kind} / length {len(value)} too big")
            size += 3 + len(value)
        if size > V2_MAX_LENGTH:
            raise ProxyHeaderError(f"PROXY v2 header would be {size} bytes, over {V2_MAX_LENGTH}")

    @classmethod
    def for_connection(
        cls, source: tuple[str, int], destination: tuple[str, int], version: int = 2
    ) -> ProxyHeader:
        """The PROXY header describing a TCP connection from ``source`` to ``destination``.

        Takes ``(host, port)`` as sockets report them. IPv6 scope ids are dropped (the format
        has no room for them); IPv4-mapped IPv6 addresses are unmapped when both ends are, so a
        dual-stack listener still produces TCP4. Mixed families give UNSPEC (v1: UNKNOWN).
        """
        if _is_canonical_ipv4(source[0]) and _is_canonical_ipv4(destination[0]):
            return cls(version, Command.PROXY, Family.INET, source, destination)
        try:
            src = ipaddress.ip_address(source[0].split("%", 1)[0])
            dst = ipaddress.ip_address(destination[0].split("%", 1)[0])
        except ValueError as exc:
            raise ProxyHeaderError(f"PROXY header for a connection: {exc}") from None
        if isinstance(src, ipaddress.IPv6Address) and isinstance(dst, ipaddress.IPv6Address):
            if src.ipv4_mapped is not None and dst.ipv4_mapped is not None:
                src, dst = src.ipv4_mapped, dst.ipv4_mapped
        if src.version != dst.version:
            return cls(version, Command.PROXY, Family.UNSPEC, None, None)
        family = Family.INET if src.version == 4 else Family.INET6
        return cls(
            version, Command.PROXY, family, (str(src), source[1]), (str(dst), destination[1])
        )


def _check_endpoint(
    family: Family, endpoint: tuple[str, int] | None, which: str
) -> tuple[str, int]:
    if endpoint is None:
        raise ProxyHeaderError(f"PROXY header family {family.name} needs a {which} address")
    host, port = endpoint
    if family is Family.UNIX:
        if port != 0 or "\x00" in host or len(host) > UNIX_PATH_LENGTH or _not_latin1(host):
            raise ProxyHeaderError(f"PROXY header {which} UNIX path {host!r} is not valid")
        return (host, 0)
    if not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise ProxyHeaderError(f"PROXY header {which} port {port!r} is not 0..65535")
    if family is Family.INET and _is_canonical_ipv4(host):
        return endpoint
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ProxyHeaderError(f"PROXY header {which} address {host!r} is not an IP") from None
    if ip.version != (4 if family is Family.INET else 6) or "%" in host:
        raise ProxyHeaderError(f"PROXY header {which} address {host!r} is not {family.name}")
    return (str(ip), port)


def _is_canonical_ipv4(text: str) -> bool:
    """Fast path for the common case: a dotted quad exactly as ``str(IPv4Address)`` writes it."""
    parts = text.split(".")
    if len(parts) != 4:
        return False
    for part in parts:
        if not (part.isascii() and part.isdigit()) or len(part) > 3:
            return False
        if part[0] == "0" and len(part) > 1 or int(part) > 255:
            return False
    return True


def _not_latin1(text: str) -> bool:
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return True
    return False


def parse_proxy_header(data: bytes) -> tuple[ProxyHeader, int] | None:
    """Parse a PROXY v1 or v2 header at the start of ``data``.

    Returns ``(header, consumed)`` where ``consumed`` is the header's length in bytes (the
    payload starts at ``data[consumed:]``), or ``None`` if ``data`` is a valid but incomplete
    prefix of a header. Raises :class:`ProxyHeaderError` for anything else, including data that
    is not a PROXY header at all: a listener configured for PROXY input accepts nothing else.
    Every error an incomplete prefix raises, any longer input raises too.
    """
    n = min(len(data), len(V1_PREFIX))
    if data[:n] == V1_PREFIX[:n]:
        return _parse_v1(data) if n == len(V1_PREFIX) else None
    n = min(len(data), len(V2_SIGNATURE))
    if data[:n] == V2_SIGNATURE[:n]:
        return _parse_v2(data) if n == len(V2_SIGNATURE) else None
    raise ProxyHeaderError(
        f"offset 0: {bytes(data[:8])!r} is neither a PROXY v1 line nor a v2 signature "
        "(is the load balancer configured to send the PROXY protocol?)"
    )


def _parse_v1(data: bytes) -> tuple[ProxyHeader, int] | None:
    end = data.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end < 0:  # a trailing CR may be half of the CRLF still to come
        rest = data[6:V1_MAX_LENGTH].removesuffix(b"\r")
    else:
        rest = data[6:end]
    proto = rest.split(b" ", 1)[0]
    if not any(p.startswith(proto) for p in (b"TCP4", b"TCP6", b"UNKNOWN")) or (
        len(rest) > len(proto) and proto not in (b"TCP4", b"TCP6", b"UNKNOWN")
    ):
        raise ProxyHeaderError(f"v1 offset 6: protocol {proto[:16]!r} is not TCP4, TCP6 or UNKNOWN")
    if end < 0:
        if len(data) >= V1_MAX_LENGTH:
            raise ProxyHeaderError(f"v1: no CRLF within the first {V1_MAX_LENGTH} bytes")
        return None
    if proto == b"UNKNOWN":
        return ProxyHeader(1, Command.PROXY, Family.UNSPEC, None, None), end + 2
    fields = rest.split(b" ")
    if len(fields) != 5:
        raise ProxyHeaderError(
            f"v1: {len(fields) - 1} fields after {proto.decode()}, expected exactly 4 separated "
            "by single spaces"
        )
    family = _V1_PROTOCOLS[proto]
    src = _v1_address(fields[1], family, "source address")
    dst = _v1_address(fields[2], family, "destination address")
    sport = _v1_port(fields[3], "source port")
    dport = _v1_port(fields[4], "destination port")
    return ProxyHeader(1, Command.PROXY, family, (src, sport), (dst, dport)), end + 2


def _v1_address(raw: bytes, family: Family, what: str) -> str:
    text = raw.decode("latin-1")
    if family is Family.INET and _is_canonical_ipv4(text):
        return text
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyHeaderError(f"v1 {what} {text[:45]!r} is not an IP address") from None
    if ip.version != (4 if family is Family.INET else 6) or "%" in text:
        raise ProxyHeaderError(f"v1 {what} {text!r} is not {_V1_NAMES[family]}")
    return str(ip)


def _v1_port(raw: bytes, what: str) -> int:
    if not raw.isdigit() or len(raw) > 5 or (len(raw) > 1 and raw[0] == 0x30):
        raise ProxyHeaderError(f"v1 {what} {raw[:8]!r} is not a decimal without leading zeros")
    port = int(raw)
    if port > 0xFFFF:
        raise ProxyHeaderError(f"v1 {what} {port} is over 65535")
    return port


def _parse_v2(data: bytes) -> tuple[ProxyHeader, int] | None:
    if len(data) > 12:
        ver_cmd = data[12]
        if ver_cmd >> 4 != 2:
            raise ProxyHeaderError(f"v2 offset 12: version {ver_cmd >> 4} is not 2")
        if ver_cmd & 0x0F > 1:
            raise ProxyHeaderError(f"v2 offset 12: command {ver_cmd & 0x0F} is not LOCAL/PROXY")
    if len(data) > 13 and (data[13] >> 4 > 3 or data[13] & 0x0F > 2):
        raise ProxyHeaderError(f"v2 offset 13: family/transport byte {data[13]:#04x} is invalid")
    if len(data) < V2_FIXED_LENGTH:
        return None
    command = Command(data[12] & 0x0F)
    fam = data[13]
    length = data[14] << 8 | data[15]
    total = V2_FIXED_LENGTH + length
    if total > V2_MAX_LENGTH:
        raise ProxyHeaderError(f"v2 offset 14: length {length} exceeds the {V2_MAX_LENGTH} cap")
    if fam not in _V2_DECODED:
        # A valid combination we do not route (UDP, ...): the spec says to fall back to UNSPEC,
        # i.e. use the real endpoints; the block's layout is unknown, so it is skipped whole.
        if len(data) < total:
            return None
        return ProxyHeader(2, command, Family.UNSPEC, None, None), total
    family = Family(fam >> 4)
    block = _ADDRESS_BLOCK[family]
    if length < block:
        raise ProxyHeaderError(
            f"v2 offset 14: length {length} is shorter than the {block}-byte {family.name} block"
        )
    if len(data) < total:
        return None
    body = bytes(data[V2_FIXED_LENGTH:total])
    src: tuple[str, int] | None = None
    dst: tuple[str, int] | None = None
    if family is Family.INET:
        src = (".".join(map(str, body[0:4])), body[8] << 8 | body[9])
        dst = (".".join(map(str, body[4:8])), body[10] << 8 | body[11])
    elif family is Family.INET6:
        src = (str(ipaddress.IPv6Address(body[0:16])), body[32] << 8 | body[33])
        dst = (str(ipaddress.IPv6Address(body[16:32])), body[34] << 8 | body[35])
    elif family is Family.UNIX:
        src = (body[0:108].split(b"\x00", 1)[0].decode("latin-1"), 0)
        dst = (body[108:216].split(b"\x00", 1)[0].decode("latin-1"), 0)
    tlvs = _parse_tlvs(body, block)
    return ProxyHeader(2, command, family, src, dst, tlvs), total


def _parse_tlvs(body: bytes, start: int) -> tuple[tuple[int, bytes], ...]:
    tlvs: list[tuple[int, bytes]] = []
    p = start
    end = len(body)
    while p < end:
        if p + 3 > end:
            raise ProxyHeaderError(f"v2 offset {V2_FIXED_LENGTH + p}: truncated TLV header")
        length = body[p + 1] << 8 | body[p + 2]
        if p + 3 + length > end:
            raise ProxyHeaderError(
                f"v2 offset {V2_FIXED_LENGTH + p}: TLV type {body[p]:#04x} length {length} "
                "overruns the header"
            )
        tlvs.append((body[p], body[p + 3 : p + 3 + length]))
        p += 3 + length
    return tuple(tlvs)


def encode_proxy_header(h: ProxyHeader) -> bytes:
    """The wire form of ``h``: a v1 line or a v2 binary header, per ``h.version``."""
    if h.version == 1:
        if h.family is Family.UNSPEC or h.source is None or h.destination is None:
            return b"PROXY UNKNOWN\r\n"
        line = (
            f"PROXY {_V1_NAMES[h.family]} {h.source[0]} {h.destination[0]} "
            f"{h.source[1]} {h.destination[1]}\r\n"
        )
        return line.encode("ascii")
    if h.family is Family.UNSPEC or h.source is None or h.destination is None:
        block = b""
        fam = 0x00
    else:
        fam = h.family << 4 | _STREAM
        if h.family is Family.UNIX:
            block = h.source[0].encode("latin-1").ljust(UNIX_PATH_LENGTH, b"\x00")
            block += h.destination[0].encode("latin-1").ljust(UNIX_PATH_LENGTH, b"\x00")
        else:
            block = (
                _packed(h.family, h.source[0])
                + _packed(h.family, h.destination[0])
                + h.source[1].to_bytes(2, "big")
                + h.destination[1].to_bytes(2, "big")
            )
    tlvs = b"".join(
        bytes((kind,)) + len(value).to_bytes(2, "big") + value for kind, value in h.tlvs
    )
    length = len(block) + len(tlvs)
    return V2_SIGNATURE + bytes((0x20 | h.command, fam)) + length.to_bytes(2, "big") + block + tlvs


def _packed(family: Family, host: str) -> bytes:
    if family is Family.INET:
        return bytes(map(int, host.split(".")))
    return ipaddress.IPv6Address(host).packed
