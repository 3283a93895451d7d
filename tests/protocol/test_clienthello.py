"""ClientHello sniffing: real client vectors, error tables, limits and hypothesis properties."""

from __future__ import annotations

import re
import shutil
import ssl
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.protocol.clienthello import (
    DEFAULT_LIMIT,
    ClientHello,
    HelloSniffer,
    check_host_name,
    encode_alert,
    parse_client_hello,
)
from gateway.protocol.errors import ClientHelloError, TlsAlert
from gateway.protocol.hello_builder import (
    alpn_extension,
    build_client_hello,
    client_hello_message,
    extension,
    server_name_extension,
    supported_versions_extension,
    wrap_records,
)
from tests.protocol.capture import (
    LONG_ALPN,
    SNI,
    capture_command,
    curl_argv,
    openssl_argv,
    python_ssl_hello,
    read_hex,
)

H2_H1 = ("h2", "http/1.1")
V = ssl.TLSVersion
TLS13_DOWN = (0x0304, 0x0303, 0x0302, 0x0301)

# name in tests/protocol/data -> (sni, alpn, supported_versions, number of records)
REAL = {
    "curl": (SNI, H2_H1, TLS13_DOWN, 1),
    "curl_tls12": (SNI, H2_H1, (), 1),
    "openssl_s_client": (SNI, H2_H1, TLS13_DOWN, 1),
    "openssl_s_client_tls12": (SNI, H2_H1, (), 1),
    "openssl_s_client_frag512": (SNI, tuple(LONG_ALPN.split(",")), TLS13_DOWN, 3),
    "python_ssl": (SNI, H2_H1, (0x0304, 0x0303), 1),
    "python_ssl_no_sni_tls12": (None, (), (), 1),
}
VECTORS = {name: read_hex(name) for name in REAL}
HELLO_CURL = VECTORS["curl"]


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given sorted offsets."""
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def outcome(fn: Callable[..., object], *args: object, **kwargs: object) -> object:
    """A comparable outcome: the value, or (error type, alert)."""
    try:
        return fn(*args, **kwargs)
    except ClientHelloError as exc:
        return (type(exc), exc.alert)


def count_records(data: bytes) -> int:
    pos = n = 0
    while pos < len(data):
        pos += 5 + int.from_bytes(data[pos + 3 : pos + 5], "big")
        n += 1
    return n


# --- real clients -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(REAL))
def test_parse_client_hello_real_vectors(name: str) -> None:
    data = VECTORS[name]
    sni, alpn, versions, records = REAL[name]
    assert count_records(data) == records
    assert parse_client_hello(data) == ClientHello(sni, alpn, versions, 0x0303, len(data))


@pytest.mark.parametrize("name", sorted(REAL))
def test_parse_client_hello_every_proper_prefix_needs_more(name: str) -> None:
    data = VECTORS[name]
    assert all(parse_client_hello(data[:i]) is None for i in range(len(data)))


@pytest.mark.parametrize("name", sorted(REAL))
def test_sniffer_one_byte_at_a_time_matches_parse(name: str) -> None:
    data = VECTORS[name]
    sniffer = HelloSniffer()
    results = [sniffer.feed(data[i : i + 1]) for i in range(len(data))]
    assert results[:-1] == [None] * (len(data) - 1)
    assert results[-1] == parse_client_hello(data)
    assert sniffer.buffered == data
    assert sniffer.result == results[-1]


def test_sniffer_keeps_bytes_after_the_hello_for_replay() -> None:
    # a TLS 1.3 client may send ChangeCipherSpec or early data right behind the hello
    tail = bytes.fromhex("140303000101") + bytes.fromhex("1703030005") + b"early"
    sniffer = HelloSniffer()
    hello = sniffer.feed(HELLO_CURL + tail)
    assert hello is not None and hello.hello_length == len(HELLO_CURL)
    assert sniffer.feed(b"more") == hello
    assert sniffer.buffered == HELLO_CURL + tail + b"more"


@pytest.mark.parametrize(
    ("hostname", "alpn", "minimum", "versions"),
    [
        ("App.Example.COM", ("h2",), V.TLSv1_2, (0x0304, 0x0303)),
        (None, ("http/1.1",), V.TLSv1_2, (0x0304, 0x0303)),
        ("a" * 63 + "." + "b" * 63 + ".c", ("h2", "http/1.1"), V.TLSv1_3, (0x0304,)),
    ],
)
def test_parse_client_hello_python_ssl_now(
    hostname: str | None, alpn: tuple[str, ...], minimum: ssl.TLSVersion, versions: tuple[int, ...]
) -> None:
    maximum = V.MAXIMUM_SUPPORTED
    data = python_ssl_hello(hostname, alpn, maximum_version=maximum, minimum_version=minimum)
    hello = parse_client_hello(data)
    assert hello is not None
    assert hello.sni == (hostname.lower() if hostname else None)
    assert (hello.alpn, hello.supported_versions) == (alpn, versions)


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("openssl"), reason="openssl is in scripts/apt-packages.txt")
@pytest.mark.parametrize(
    ("extra", "alpn", "records"),
    [((), "h2,http/1.1", 1), (("-max_send_frag", "512"), LONG_ALPN, 3)],
)
def test_parse_client_hello_openssl_s_client_now(
    extra: tuple[str, ...], alpn: str, records: int
) -> None:
    data = capture_command(openssl_argv(*extra, alpn=alpn))
    assert count_records(data) == records
    hello = parse_client_hello(data)
    assert hello is not None and hello.sni == SNI and hello.alpn == tuple(alpn.split(","))
    assert hello.offers_tls13 and hello.hello_length == len(data)


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("curl"), reason="curl is in scripts/apt-packages.txt")
def test_parse_client_hello_curl_now() -> None:
    data = capture_command(curl_argv("--http2"))
    hello = parse_client_hello(data)
    assert hello is not None and hello.sni == SNI and hello.alpn == H2_H1


# --- sizes and limits ---------------------------------------------------------------------


def test_parse_client_hello_16k_hello_in_many_records() -> None:
    data = build_client_hello("big.example", ("h2",), padding=16 * 1024, fragment=1000)
    hello = parse_client_hello(data)
    assert hello is not None and hello.sni == "big.example" and hello.hello_length == len(data)
    assert count_records(data) == 17


def test_parse_client_hello_largest_legal_hello_with_raised_limit() -> None:
    # every variable field at its maximum: 131 KB, the most a u24 length can legally carry
    exts = [
        server_name_extension("max.example"),
        extension(21, bytes(0xFFFF - 4 - len(server_name_extension("max.example")))),
    ]
    message = client_hello_message(
        extensions=exts,
        session_id=bytes(32),
        cipher_suites=list(range(0x7FFF)),
        compression_methods=bytes(255),
    )
    data = wrap_records(message)
    with pytest.raises(ClientHelloError, match="limit") as info:
        parse_client_hello(data)
    assert info.value.alert is TlsAlert.HANDSHAKE_FAILURE
    hello = parse_client_hello(data, limit=256 * 1024)
    assert hello is not None and hello.sni == "max.example" and hello.hello_length == len(data)


def test_sniffer_refuses_a_hello_over_its_limit_as_soon_as_the_length_is_known() -> None:
    data = build_client_hello(padding=5000)
    sniffer = HelloSniffer(limit=4096)
    with pytest.raises(ClientHelloError, match="4096-byte ClientHello limit"):
        sniffer.feed(data[:9])  # record header + handshake header: the length says too big
    with pytest.raises(ClientHelloError):  # and it stays failed
        sniffer.feed(data[9:])


def test_sniffer_refuses_handshake_length_beyond_any_valid_hello() -> None:
    data = bytes.fromhex("1603010004") + b"\x01\xff\xff\xff"
    with pytest.raises(ClientHelloError, match="handshake offset 1") as info:
        HelloSniffer(limit=1 << 25).feed(data)
    assert info.value.alert is TlsAlert.DECODE_ERROR


def test_hello_sniffer_rejects_a_limit_too_small_for_any_hello() -> None:
    with pytest.raises(ValueError, match="limit"):
        HelloSniffer(limit=10)


# --- error table --------------------------------------------------------------------------


def _patch(data: bytes, at: int, new: bytes) -> bytes:
    return data[:at] + new + data[at + len(new) :]


def _hello(exts: list[bytes] | None, **kw: object) -> bytes:
    return wrap_records(client_hello_message(extensions=exts, **kw))  # type: ignore[arg-type]


DE, UN, IP = TlsAlert.DECODE_ERROR, TlsAlert.UNRECOGNIZED_NAME, TlsAlert.ILLEGAL_PARAMETER
UM, PV = TlsAlert.UNEXPECTED_MESSAGE, TlsAlert.PROTOCOL_VERSION
sn = server_name_extension
SNI_EXT = server_name_extension("a.example")
BAD: list[tuple[str, bytes, TlsAlert, str]] = [
    ("alert first", encode_alert(TlsAlert.HANDSHAKE_FAILURE), UM, "21"),
    ("plain http", b"GET / HTTP/1.1\r\n", UM, "plaintext HTTP"),
    ("sslv2", bytes.fromhex("802e0103010015"), PV, "SSLv2"),
    ("record major 2", bytes.fromhex("1602"), PV, "version major 2"),
    ("empty record", bytes.fromhex("1603010000"), UM, "empty"),
    ("record > 2^14", bytes.fromhex("1603014001"), TlsAlert.RECORD_OVERFLOW, "2^14"),
    (
        "server hello",
        wrap_records(b"\x02" + client_hello_message(extensions=[])[1:]),
        UM,
        "not ClientHello",
    ),
    (
        "ccs between fragments",
        wrap_records(client_hello_message(extensions=[SNI_EXT])[:10]) + bytes.fromhex("1403030001"),
        UM,
        "offset 15: content type 20",
    ),
    (
        "data after hello in its record",
        wrap_records(client_hello_message(extensions=[SNI_EXT]) + b"\x00"),
        UM,
        "record boundary",
    ),
    (
        "tiny length",
        wrap_records(b"\x01\x00\x00\x05" + bytes(5)),
        DE,
        "length 5",
    ),
    ("legacy 2.0", _hello([], legacy_version=0x0200), PV, "legacy_version"),
    ("session id 33", _hello([], session_id=bytes(33)), IP, "length 33"),
    ("odd cipher list", _hello([], cipher_suites=[]), DE, "cipher_suites"),
    ("no compression", _hello([], compression_methods=b""), DE, "compression"),
    (
        "extensions length short",
        wrap_records(_patch(client_hello_message(extensions=[SNI_EXT]), 53, b"\x00\x13")),
        DE,
        "does not match",
    ),
    (
        "extension overruns",
        _hello([extension(0x1234, b"xy")[:3] + b"\x09xy"]),
        DE,
        "overruns",
    ),
    ("truncated ext header", _hello([b"\x00\x01\x00"]), DE, "truncated"),
    ("duplicate extension", _hello([SNI_EXT, SNI_EXT]), IP, "duplicate"),
    (
        "psk not last",
        _hello([extension(41, b"x"), SNI_EXT]),
        IP,
        "after pre_shared_key",
    ),
    ("sni empty ext", _hello([extension(0, b"")]), DE, "server_name list"),
    ("sni empty list", _hello([extension(0, b"\x00\x00")]), DE, "list length 0"),
    (
        "sni list overlong",
        _hello([extension(0, b"\x00\x09\x00\x00\x01a")]),
        DE,
        "list length 9 does not fill the 4 bytes",
    ),
    (
        "sni entry overruns",
        _hello([extension(0, b"\x00\x04\x00\x00\x05a")]),
        DE,
        "entry length 5 overruns",
    ),
    ("sni empty name", _hello([sn(b"")]), DE, "empty"),
    (
        "two host_names",
        _hello([extension(0, b"\x00\x08" + b"\x00\x00\x01a" + b"\x00\x00\x01b")]),
        IP,
        "second host_name",
    ),
    (
        "sni trailing dot",
        _hello([sn("a.b.")]),
        UN,
        "dot",
    ),
    (
        "sni utf-8",
        _hello([sn("é.b".encode())]),
        UN,
        "ASCII",
    ),
    ("sni space", _hello([sn("a b.c")]), UN, "' '"),
    (
        "sni label 64",
        _hello([sn("a" * 64 + ".b")]),
        UN,
        "63",
    ),
    (
        "sni 254 bytes",
        _hello([sn(".".join(["a" * 50] * 5) + ".abc")]),
        UN,
        "253",
    ),
    (
        "sni empty label",
        _hello([sn("a..b")]),
        UN,
        "empty",
    ),
    (
        "sni hyphen label",
        _hello([sn("-a.b")]),
        UN,
        "'-'",
    ),
    ("alpn empty list", _hello([extension(16, b"\x00\x00")]), DE, "alpn list"),
    ("alpn list 1", _hello([extension(16, b"\x00\x01\x00")]), DE, "length 1"),
    (
        "alpn empty name",
        _hello([extension(16, b"\x00\x02\x00\x00")]),
        DE,
        "empty",
    ),
    ("alpn overruns", _hello([extension(16, b"\x00\x02\x05h")]), DE, "overruns"),
    ("versions odd", _hello([extension(43, b"\x03\x03\x04\x03")]), DE, "even"),
    ("versions empty", _hello([extension(43, b"\x00")]), DE, "even"),
    ("versions short", _hello([extension(43, b"\x04\x03\x04")]), DE, "filling"),
]


@pytest.mark.parametrize(("case", "data", "alert", "message"), BAD, ids=[b[0] for b in BAD])
def test_parse_client_hello_rejects(case: str, data: bytes, alert: TlsAlert, message: str) -> None:
    with pytest.raises(ClientHelloError, match=re.escape(message)) as info:
        parse_client_hello(data)
    assert info.value.alert is alert
    # and the sniffer fed one byte at a time fails the same way, never later than the end
    sniffer = HelloSniffer()
    with pytest.raises(ClientHelloError) as again:
        for i in range(len(data)):
            sniffer.feed(data[i : i + 1])
    assert (again.value.alert, str(again.value)) == (alert, str(info.value))


def test_error_messages_name_the_field_and_offset() -> None:
    with pytest.raises(ClientHelloError) as info:
        parse_client_hello(_hello([SNI_EXT, extension(16, b"\x00\x02\x05h")]))
    assert str(info.value) == (
        "ClientHello alpn protocol name length 5 overruns the list at handshake offset 79"
    )


def test_parse_client_hello_accepts_a_hello_without_extensions() -> None:
    hello = parse_client_hello(_hello(None))
    assert hello is not None and (hello.sni, hello.alpn, hello.supported_versions) == (None, (), ())


def test_parse_client_hello_ignores_unknown_name_types_and_grease() -> None:
    entries = b"\x07\x00\x01z" + b"\x00\x00\x05a.b.c"
    data = _hello(
        [extension(0x0A0A, b""), extension(0, len(entries).to_bytes(2, "big") + entries)]
        + [supported_versions_extension([0x3A3A, 0x0304]), alpn_extension([b"\xff\x00"])]
    )
    hello = parse_client_hello(data)
    assert hello is not None
    assert (hello.sni, hello.supported_versions, hello.alpn) == (
        "a.b.c",
        (0x3A3A, 0x0304),
        ("\xff\x00",),
    )


@pytest.mark.parametrize(
    ("name", "expected"),
    [("A.B", "a.b"), ("x_y.example", "x_y.example"), ("a" * 63, "a" * 63), ("1.2.3.4", "1.2.3.4")],
)
def test_check_host_name_accepts(name: str, expected: str) -> None:
    assert check_host_name(name) == expected


def test_client_hello_is_valid_from_birth() -> None:
    with pytest.raises(ClientHelloError, match="lower-case"):
        ClientHello("A.b", (), (), 0x0303, 100)
    with pytest.raises(ClientHelloError, match="alpn"):
        ClientHello("a.b", ("",), (), 0x0303, 100)
    with pytest.raises(ClientHelloError, match="uint16"):
        ClientHello("a.b", (), (0x10000,), 0x0303, 100)


@pytest.mark.parametrize(
    ("alert", "version", "wire"),
    [
        (TlsAlert.UNRECOGNIZED_NAME, 0x0303, "15030300020270"),
        (TlsAlert.DECODE_ERROR, 0x0301, "15030100020232"),
        (TlsAlert.CLOSE_NOTIFY, 0x0303, "15030300020100"),
    ],
)
def test_encode_alert(alert: TlsAlert, version: int, wire: str) -> None:
    assert encode_alert(alert, version).hex() == wire


def test_python_ssl_understands_our_alert() -> None:
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ctx.wrap_bio(incoming, outgoing, server_hostname="x.example")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    incoming.write(encode_alert(TlsAlert.UNRECOGNIZED_NAME))
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        client.do_handshake()


# --- properties ---------------------------------------------------------------------------

LABEL = st.from_regex(r"[a-zA-Z0-9_]([a-zA-Z0-9_-]{0,20}[a-zA-Z0-9_])?", fullmatch=True)
HOSTNAME = st.lists(LABEL, min_size=1, max_size=5).map(".".join)
ALPN = st.lists(st.binary(min_size=1, max_size=40), max_size=5)
VERSIONS = st.one_of(st.none(), st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=8))
FRAGMENT = st.one_of(st.integers(1, 1 << 14), st.lists(st.integers(1, 600), min_size=1, max_size=5))


@st.composite
def generated_hellos(draw: st.DrawFn) -> tuple[bytes, str | None, list[bytes], list[int] | None]:
    sni = draw(st.one_of(st.none(), HOSTNAME))
    alpn = draw(ALPN)
    versions = draw(VERSIONS)
    data = build_client_hello(
        sni,
        alpn,
        supported_versions=versions,
        padding=draw(st.sampled_from([0, 0, 100, 3000])),
        fragment=draw(FRAGMENT),
        session_id=draw(st.binary(max_size=32)),
    )
    return data, sni, alpn, versions


def cuts_for(data: bytes) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(1, max(1, len(data) - 1)), max_size=8).map(lambda c: sorted(set(c)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=generated_hellos())
def test_generated_hellos_round_trip(
    case: tuple[bytes, str | None, list[bytes], list[int] | None],
) -> None:
    data, sni, alpn, versions = case
    hello = parse_client_hello(data)
    assert hello is not None
    assert hello.sni == (sni.lower() if sni else None)
    assert hello.alpn == tuple(a.decode("latin-1") for a in alpn)
    assert hello.supported_versions == tuple(versions or ())
    assert hello.hello_length == len(data)


@settings(max_examples=150, deadline=None)
@given(data=st.data(), name=st.sampled_from(sorted(REAL)))
def test_sniffer_result_does_not_depend_on_splits(data: st.DataObject, name: str) -> None:
    hello = VECTORS[name]
    cuts = data.draw(cuts_for(hello))
    sniffer = HelloSniffer()
    results = [sniffer.feed(part) for part in split_at(hello, cuts)]
    assert all(r is None for r in results[:-1])
    assert results[-1] == parse_client_hello(hello)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=generated_hellos())
def test_sniffer_one_byte_at_a_time_on_generated_hellos(
    case: tuple[bytes, str | None, list[bytes], list[int] | None],
) -> None:
    data = case[0]
    sniffer = HelloSniffer()
    for i in range(len(data) - 1):
        assert sniffer.feed(data[i : i + 1]) is None
    assert sniffer.feed(data[-1:]) == parse_client_hello(data)


def _split_outcome(data: bytes, cuts: list[int]) -> object:
    sniffer = HelloSniffer(limit=2048)
    result: object = None
    for part in split_at(data, cuts):
        result = outcome(sniffer.feed, part)
        if result is not None:
            return result
    return result


@settings(max_examples=400, deadline=None)
@example(data=HELLO_CURL[:5] + b"\x02" + HELLO_CURL[6:], seed=0)
@example(data=HELLO_CURL[:9] + b"\x02" + HELLO_CURL[10:], seed=0)
@given(
    data=st.sampled_from(sorted(VECTORS.values())).flatmap(
        lambda v: st.lists(
            st.tuples(
                # half the mutations hit a length or type field, where parsers break
                st.one_of(st.integers(0, len(v) - 1), st.sampled_from(structural_offsets(v))),
                st.one_of(st.integers(0, 255), st.sampled_from([0, 1, 0x7F, 0x80, 0xFF])),
            ),
            min_size=1,
            max_size=4,
        ).map(lambda muts: _mutate(v, muts))
    ),
    seed=st.integers(0, 2**16),
)
def test_mutated_hellos_raise_only_client_hello_error_whatever_the_split(
    data: bytes, seed: int
) -> None:
    whole = outcome(parse_client_hello, data, limit=2048)
    assert whole is None or isinstance(whole, ClientHello | tuple)
    cuts = sorted({(seed * (i + 7)) % len(data) for i in range(seed % 5)} - {0})
    assert _split_outcome(data, cuts) == whole


def structural_offsets(data: bytes) -> list[int]:
    """Offsets of the record/handshake headers and of every length and type field up to and
    including each extension header (for the first record's handshake message)."""
    offsets = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    msg = data[5:]
    p = 4 + 2 + 32
    offsets.append(5 + p)
    p += 1 + msg[p]
    offsets += [5 + p, 5 + p + 1]
    p += 2 + int.from_bytes(msg[p : p + 2], "big")
    offsets.append(5 + p)
    p += 1 + msg[p]
    offsets += [5 + p, 5 + p + 1]
    p += 2
    end = min(len(msg), int.from_bytes(data[3:5], "big"))  # the first record's payload
    while p + 4 <= end:
        offsets += [5 + p + i for i in range(6)]  # type, length and first data bytes
        p += 4 + int.from_bytes(msg[p + 2 : p + 4], "big")
    return [o for o in offsets if o < len(data)]


def _mutate(data: bytes, muts: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for pos, value in muts:
        out[pos] = value
    return bytes(out)


@settings(max_examples=300, deadline=None)
@example(prefix_len=5, tail=b"\x01\x00\x00")
@given(
    prefix_len=st.integers(0, len(HELLO_CURL)),
    tail=st.binary(max_size=600),
)
def test_valid_prefix_with_random_tail_raises_only_our_error(prefix_len: int, tail: bytes) -> None:
    data = HELLO_CURL[:prefix_len] + tail
    result = outcome(parse_client_hello, data)
    assert result is None or isinstance(result, ClientHello | tuple)
    cuts = [c for c in (prefix_len, prefix_len + 1) if 0 < c < len(data)]
    assert _split_outcome(data, cuts) == outcome(parse_client_hello, data, limit=2048)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300))
def test_random_bytes_raise_only_our_error(data: bytes) -> None:
    result = outcome(parse_client_hello, data)
    assert result is None or isinstance(result, ClientHello | tuple)


def test_default_limit_is_64k() -> None:
    assert DEFAULT_LIMIT == 65536 and HelloSniffer().limit == DEFAULT_LIMIT


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=generated_hellos())
@example(case=(VECTORS["openssl_s_client_frag512"], SNI, [], None))
def test_feeding_exactly_what_is_wanted_takes_two_feeds_per_record(
    case: tuple[bytes, str | None, list[bytes], list[int] | None],
) -> None:
    """A peeking caller that waits for ``wanted`` bytes parses once per header and record."""
    data = case[0]
    sniffer = HelloSniffer()
    feeds, have, result = 0, 0, None
    while result is None:
        want = sniffer.wanted
        assert have < want <= len(data)
        result = sniffer.feed(data[have:want])
        have, feeds = want, feeds + 1
    assert result == parse_client_hello(data)
    assert feeds == 2 * count_records(data) and sniffer.wanted == len(data)
