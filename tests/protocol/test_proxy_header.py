"""PROXY protocol v1/v2: haproxy's own headers, spec examples, error tables and properties."""

from __future__ import annotations

import ipaddress
import re
import shutil

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.protocol.errors import ProxyHeaderError, TlsAlert
from gateway.protocol.proxy_header import (
    V2_SIGNATURE,
    Command,
    Family,
    ProxyHeader,
    encode_proxy_header,
    parse_proxy_header,
)
from tests.protocol.capture import DATA, HAPROXY_SEND, capture_haproxy

INET, INET6, UNIX, UNSPEC = Family.INET, Family.INET6, Family.UNIX, Family.UNSPEC
PROXY, LOCAL = Command.PROXY, Command.LOCAL
SIG = V2_SIGNATURE.hex()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), bitwise: the checksum haproxy puts in PP2_TYPE_CRC32C."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def check_crc32c(wire: bytes, header: ProxyHeader) -> bool:
    """True if the header's CRC32C TLV matches the header with that field zeroed."""
    value = dict(header.tlvs)[0x03]
    at = wire.index(b"\x03\x00\x04" + value) + 3
    return crc32c(wire[:at] + bytes(4) + wire[at + 4 :]) == int.from_bytes(value, "big")


def outcome(data: bytes) -> object:
    try:
        return parse_proxy_header(data)
    except ProxyHeaderError:
        return ProxyHeaderError


# --- real haproxy -------------------------------------------------------------------------


def read_haproxy_vector(name: str) -> tuple[bytes, tuple[str, int], tuple[str, int]]:
    text = (DATA / f"haproxy_{name}.hex").read_text()
    m = re.search(r"# client ([\d.]+):(\d+) -> ([\d.]+):(\d+)", text)
    assert m is not None
    wire = bytes.fromhex("".join(x for x in text.splitlines() if not x.startswith("#")))
    return wire, (m[1], int(m[2])), (m[3], int(m[4]))


@pytest.mark.parametrize("name", sorted(HAPROXY_SEND))
def test_parse_proxy_header_haproxy_vectors(name: str) -> None:
    wire, client, frontend = read_haproxy_vector(name)
    header, used = parse_proxy_header(wire + b"\x16\x03\x01") or pytest.fail("incomplete")
    assert used == len(wire)
    assert (header.version, header.command, header.family) == (int(name[1]), PROXY, INET)
    assert (header.source, header.destination) == (client, frontend)
    if name == "v2_tlvs":
        assert [kind for kind, _ in header.tlvs] == [0x03, 0x05]
        assert dict(header.tlvs)[0x05] == f"gwa-{client[0]}-{client[1]}".encode()
        assert check_crc32c(wire, header)
    assert encode_proxy_header(header) == wire or name == "v2_tlvs"  # haproxy's TLV order kept


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("haproxy"), reason="haproxy is in scripts/apt-packages.txt")
@pytest.mark.parametrize("name", sorted(HAPROXY_SEND))
def test_parse_proxy_header_haproxy_now(name: str) -> None:
    cap = capture_haproxy(name)
    header, used = parse_proxy_header(cap.data) or pytest.fail("incomplete")
    assert cap.data[used:] == cap.payload
    assert (header.source, header.destination) == (cap.client, cap.frontend)
    if name == "v2_tlvs":
        assert check_crc32c(cap.data[:used], header)


# --- tables -------------------------------------------------------------------------------

VALID = [
    # the spec's examples and worst cases (107 bytes is the longest v1 line)
    (
        b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
        ProxyHeader(1, PROXY, INET, ("255.255.255.255", 65535), ("255.255.255.255", 65535)),
    ),
    (
        b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
        b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
        ProxyHeader(
            1,
            PROXY,
            INET6,
            ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
            ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
        ),
    ),
    (b"PROXY UNKNOWN\r\n", ProxyHeader(1, PROXY, UNSPEC, None, None)),
    (
        b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:"
        b"ffff 65535 65535\r\n",
        ProxyHeader(1, PROXY, UNSPEC, None, None),
    ),
    (
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
        ProxyHeader(1, PROXY, INET, ("192.168.0.1", 56324), ("192.168.0.11", 443)),
    ),
    (
        b"PROXY TCP6 2001:DB8::1 ::ffff:10.0.0.1 0 80\r\n",
        ProxyHeader(1, PROXY, INET6, ("2001:db8::1", 0), ("::ffff:a00:1", 80)),
    ),
    # v2: upstream pp.rs shapes: IPv4, IPv6, LOCAL/UNSPEC, with TLVs
    (
        bytes.fromhex(SIG + "2111000c" + "7f000001" + "0a000002" + "1f90" + "01bb"),
        ProxyHeader(2, PROXY, INET, ("127.0.0.1", 8080), ("10.0.0.2", 443)),
    ),
    (
        bytes.fromhex(
            SIG + "21210024" + "20010db8" + "00" * 11 + "01" + "00" * 15 + "01" + "00500051"
        ),
        ProxyHeader(2, PROXY, INET6, ("2001:db8::1", 80), ("::1", 81)),
    ),
    (bytes.fromhex(SIG + "20000000"), ProxyHeader(2, LOCAL, UNSPEC, None, None)),
    (
        bytes.fromhex(SIG + "20000007" + "0400017a" + "010000"),
        ProxyHeader(2, LOCAL, UNSPEC, None, None, ((4, b"z"), (1, b""))),
    ),
    (
        bytes.fromhex(SIG + "2111000f" + "01020304" + "05060708" + "00010002" + "020000"),
        ProxyHeader(2, PROXY, INET, ("1.2.3.4", 1), ("5.6.7.8", 2), ((2, b""),)),
    ),
    (
        bytes.fromhex(SIG + "213100d8") + b"/a".ljust(108, b"\0") + b"/b/c".ljust(108, b"\0"),
        ProxyHeader(2, PROXY, UNIX, ("/a", 0), ("/b/c", 0)),
    ),
    # valid combinations we do not route fall back to UNSPEC, their block skipped (spec)
    (bytes.fromhex(SIG + "2112000c" + "00" * 12), ProxyHeader(2, PROXY, UNSPEC, None, None)),
    (bytes.fromhex(SIG + "21010003" + "abcdef"), ProxyHeader(2, PROXY, UNSPEC, None, None)),
    # LOCAL with addresses: decoded, and the caller ignores them
    (
        bytes.fromhex(SIG + "2011000c" + "01020304" + "05060708" + "00010002"),
        ProxyHeader(2, LOCAL, INET, ("1.2.3.4", 1), ("5.6.7.8", 2)),
    ),
]


@pytest.mark.parametrize(("wire", "expected"), VALID)
def test_parse_proxy_header_valid(wire: bytes, expected: ProxyHeader) -> None:
    assert parse_proxy_header(wire + b"\x16\x03\x01\x02\x00") == (expected, len(wire))
    assert all(parse_proxy_header(wire[:i]) is None for i in range(len(wire)))


def test_parse_proxy_header_v1_longest_line_is_107_bytes() -> None:
    assert len(VALID[3][0]) == 107
    line = b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n"  # 108 bytes: one too many
    assert parse_proxy_header(line[:106]) is None
    with pytest.raises(ProxyHeaderError, match="no CRLF within the first 107"):
        parse_proxy_header(line[:107])  # a CRLF could now only end at byte 108
    with pytest.raises(ProxyHeaderError, match="no CRLF within the first 107"):
        parse_proxy_header(line)


INVALID = [
    ("not proxy: TLS", b"\x16\x03\x01\x02\x00\x01", "neither a PROXY v1 line nor a v2"),
    ("not proxy: http", b"GET / HTTP/1.1\r\n", "neither"),
    ("lower-case proxy", b"proxy TCP4", "neither"),
    ("v1 bad protocol", b"PROXY TCP5 1.2.3.4", "protocol b'TCP5'"),
    ("v1 UDP4", b"PROXY UDP4 ", "protocol"),
    ("v1 no terminator", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2" + b" " * 80, "no CRLF"),
    ("v1 LF only", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n" + b" " * 80, "no CRLF"),
    ("v1 double space", b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "fields"),
    ("v1 trailing space", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "fields"),
    ("v1 missing port", b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "3 fields"),
    ("v1 family mismatch", b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "not TCP4"),
    ("v1 family mismatch 6", b"PROXY TCP6 ::1 5.6.7.8 1 2\r\n", "not TCP6"),
    ("v1 leading zero ip", b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "not an IP"),
    ("v1 leading zero port", b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "leading zeros"),
    ("v1 port 65536", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", "over 65535"),
    ("v1 port sign", b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "source port"),
    ("v1 scope id", b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "not TCP6"),
    ("v1 hostname", b"PROXY TCP4 localhost 5.6.7.8 1 2\r\n", "not an IP"),
    ("v1 empty", b"PROXY \r\n", "fields"),
    ("v2 version 1", bytes.fromhex(SIG + "11"), "version 1 is not 2"),
    ("v2 command 2", bytes.fromhex(SIG + "22"), "command 2"),
    ("v2 family 4", bytes.fromhex(SIG + "2141"), "family/transport byte 0x41"),
    ("v2 transport 3", bytes.fromhex(SIG + "2113"), "0x13"),
    ("v2 oversize", bytes.fromhex(SIG + "211107f1"), "exceeds the 2048 cap"),
    ("v2 short inet block", bytes.fromhex(SIG + "2111000b" + "00" * 11), "shorter than the 12"),
    ("v2 short inet6 block", bytes.fromhex(SIG + "21210023"), "36-byte INET6"),
    ("v2 short unix block", bytes.fromhex(SIG + "213100d7"), "216-byte UNIX"),
    ("v2 truncated tlv", bytes.fromhex(SIG + "21000002" + "0100"), "truncated TLV"),
    ("v2 tlv overrun", bytes.fromhex(SIG + "21000004" + "01000201"), "overruns"),
    ("v2 bad signature", V2_SIGNATURE[:11] + b"X", "neither"),
]


@pytest.mark.parametrize(("case", "wire", "message"), INVALID, ids=[c[0] for c in INVALID])
def test_parse_proxy_header_rejects(case: str, wire: bytes, message: str) -> None:
    with pytest.raises(ProxyHeaderError, match=re.escape(message)) as info:
        parse_proxy_header(wire)
    assert info.value.alert is TlsAlert.DECODE_ERROR
    # once an input is refused, no continuation of it is accepted
    with pytest.raises(ProxyHeaderError):
        parse_proxy_header(wire + b"\r\n" + bytes(2100))


def test_parse_proxy_header_v2_length_is_checked_before_the_body_arrives() -> None:
    with pytest.raises(ProxyHeaderError, match="2048"):
        parse_proxy_header(bytes.fromhex(SIG + "2111ffff"))


BAD_HEADERS = [
    ("version 3", dict(version=3), "version 3"),
    (
        "v1 LOCAL",
        dict(version=1, command=LOCAL, family=UNSPEC, source=None, destination=None),
        "LOCAL",
    ),
    ("v1 TLVs", dict(version=1, tlvs=((1, b"x"),)), "TLVs"),
    ("v1 UNIX", dict(version=1, family=UNIX, source=("/a", 0), destination=("/b", 0)), "UNIX"),
    ("unspec with address", dict(family=UNSPEC), "UNSPEC carries no addresses"),
    ("inet without address", dict(source=None), "needs a src address"),
    ("inet with ipv6", dict(source=("::1", 1)), "not INET"),
    ("inet with name", dict(destination=("localhost", 1)), "not an IP"),
    ("port too big", dict(source=("1.2.3.4", 65536)), "port 65536"),
    ("unix path too long", dict(family=UNIX, source=("/" * 109, 0), destination=("/", 0)), "path"),
    ("unix path NUL", dict(family=UNIX, source=("/a\0b", 0), destination=("/", 0)), "path"),
    ("tlv too big", dict(tlvs=((1, bytes(70000)),)), "too big"),
    ("header over 2048", dict(tlvs=((1, bytes(1000)), (2, bytes(1020)))), "over 2048"),
    ("bad command", dict(command=7), "PROXY header"),
]


@pytest.mark.parametrize(
    ("case", "changes", "message"), BAD_HEADERS, ids=[b[0] for b in BAD_HEADERS]
)
def test_proxy_header_is_valid_from_birth(
    case: str, changes: dict[str, object], message: str
) -> None:
    fields: dict[str, object] = dict(
        version=2, command=PROXY, family=INET, source=("1.2.3.4", 1), destination=("5.6.7.8", 2)
    )
    fields.update(changes)
    with pytest.raises(ProxyHeaderError, match=re.escape(message)):
        ProxyHeader(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("source", "destination", "version", "expected"),
    [
        (("10.0.0.1", 5000), ("10.0.0.2", 443), 2, (INET, ("10.0.0.1", 5000), ("10.0.0.2", 443))),
        (
            ("::ffff:10.0.0.1", 5),
            ("::ffff:10.0.0.2", 443),
            1,
            (INET, ("10.0.0.1", 5), ("10.0.0.2", 443)),
        ),
        (("fe80::1%eth0", 5), ("fe80::2%eth0", 443), 2, (INET6, ("fe80::1", 5), ("fe80::2", 443))),
        (("10.0.0.1", 5), ("::1", 443), 2, (UNSPEC, None, None)),  # upstream: synthesise unspec
        (("10.0.0.1", 5), ("::1", 443), 1, (UNSPEC, None, None)),
    ],
)
def test_proxy_header_for_connection(
    source: tuple[str, int],
    destination: tuple[str, int],
    version: int,
    expected: tuple[object, ...],
) -> None:
    header = ProxyHeader.for_connection(source, destination, version)
    assert (header.family, header.source, header.destination) == expected
    assert parse_proxy_header(encode_proxy_header(header)) == (
        header,
        len(encode_proxy_header(header)),
    )


def test_proxy_header_for_connection_rejects_non_ip() -> None:
    with pytest.raises(ProxyHeaderError, match="for a connection"):
        ProxyHeader.for_connection(("/run/x.sock", 0), ("1.2.3.4", 1))


def test_encode_proxy_header_v1_unknown() -> None:
    assert encode_proxy_header(ProxyHeader(1, PROXY, UNSPEC, None, None)) == b"PROXY UNKNOWN\r\n"


# --- properties ---------------------------------------------------------------------------

PORT = st.integers(0, 65535)
V4 = st.builds(lambda n: str(ipaddress.IPv4Address(n)), st.integers(0, 2**32 - 1))
V6 = st.builds(lambda n: str(ipaddress.IPv6Address(n)), st.integers(0, 2**128 - 1))
PATH = st.text(st.characters(min_codepoint=1, max_codepoint=255), max_size=108)
TLVS = (
    st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=300)), max_size=5)
    .filter(lambda t: sum(3 + len(v) for _, v in t) <= 2048 - 16 - 216)
    .map(tuple)
)


@st.composite
def headers(draw: st.DrawFn) -> ProxyHeader:
    version = draw(st.sampled_from([1, 2]))
    families = [UNSPEC, INET, INET6] + ([UNIX] if version == 2 else [])
    family = draw(st.sampled_from(families))
    command = draw(st.sampled_from([PROXY, LOCAL])) if version == 2 else PROXY
    host = {INET: V4, INET6: V6, UNIX: PATH}.get(family)
    port = st.just(0) if family is UNIX else PORT
    if host is None:
        src = dst = None
    else:
        src, dst = draw(st.tuples(host, port)), draw(st.tuples(host, port))
    tlvs = draw(TLVS) if version == 2 else ()
    return ProxyHeader(version, command, family, src, dst, tlvs)


@settings(max_examples=300, deadline=None)
@example(h=ProxyHeader(2, LOCAL, UNSPEC, None, None, ((0, b""),)))
@given(h=headers())
def test_decode_encode_round_trip(h: ProxyHeader) -> None:
    wire = encode_proxy_header(h)
    assert parse_proxy_header(wire) == (h, len(wire))
    assert parse_proxy_header(wire + b"\x16\x03\x01") == (h, len(wire))


@settings(max_examples=150, deadline=None)
@given(h=headers(), tail=st.binary(max_size=20))
def test_every_prefix_of_a_header_needs_more(h: ProxyHeader, tail: bytes) -> None:
    wire = encode_proxy_header(h)
    assert all(parse_proxy_header(wire[:i]) is None for i in range(len(wire)))
    assert parse_proxy_header(wire + tail) == (h, len(wire))


def _mutate(data: bytes, muts: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for pos, value in muts:
        out[pos % len(out)] = value
    return bytes(out)


@settings(max_examples=400, deadline=None)
@example(data=b"PROXY UNKNOWN\r")
@example(data=b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"[:-1] + b"\r")
@given(
    data=st.one_of(
        st.tuples(
            headers(), st.lists(st.tuples(st.integers(0, 300), st.integers(0, 255)), max_size=3)
        ).map(lambda hm: _mutate(encode_proxy_header(hm[0]), hm[1])),
        st.binary(max_size=120).map(lambda b: b"PROXY " + b),
        st.binary(max_size=60).map(lambda b: V2_SIGNATURE + b),
    )
)
def test_mutated_headers_raise_only_our_error_and_prefixes_agree(data: bytes) -> None:
    """Any input: a value, None or ProxyHeaderError; and growing the input never un-fails it."""
    results = [outcome(data[:i]) for i in range(len(data) + 1)]
    for earlier, later in zip(results, results[1:], strict=False):
        if earlier is ProxyHeaderError:
            assert later is ProxyHeaderError
        elif earlier is not None:
            assert later == earlier
