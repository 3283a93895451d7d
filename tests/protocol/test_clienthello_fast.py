"""The ClientHello fast path against the full parser: same value or same error, always.

``HelloSniffer.feed`` first tries ``_fast_hello`` on a first, complete feed and falls back to
the general record-reassembling parser for anything else. These tests drive both on real
client vectors, generated hellos (unusual extension orders, duplicates, pre_shared_key,
odd server_name lists) and mutations of both, and require the same ClientHello, or the same
error type, alert and message, at every size limit.
"""

from __future__ import annotations

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.protocol.clienthello import (
    EXT_PRE_SHARED_KEY,
    ClientHello,
    HelloSniffer,
    _fast_hello,
    parse_client_hello,
)
from gateway.protocol.errors import ClientHelloError
from gateway.protocol.hello_builder import (
    alpn_extension,
    client_hello_message,
    extension,
    server_name_extension,
    supported_versions_extension,
    wrap_records,
)
from tests.protocol.test_clienthello import (
    ALPN,
    HOSTNAME,
    REAL,
    VECTORS,
    VERSIONS,
    generated_hellos,
    structural_offsets,
)

LIMITS = (65536, 2048, 517, 200, 64)
SINGLE_RECORD = sorted(name for name, spec in REAL.items() if spec[3] == 1)


def full_parser(data: bytes, limit: int) -> ClientHello | None:
    """The general parser alone: the reference the fast path must agree with."""
    sniffer = HelloSniffer(limit)
    sniffer._buf += data  # noqa: SLF001 - bypass feed()'s fast path on purpose
    return sniffer._advance()  # noqa: SLF001


def outcome(fn: object, data: bytes, limit: int) -> object:
    """A comparable outcome: the value, or (error type, alert, message)."""
    assert callable(fn)
    try:
        return fn(data, limit)
    except ClientHelloError as exc:
        return (type(exc), exc.alert, str(exc))


def check_same(data: bytes) -> ClientHello | None:
    """Assert fast path and full parser agree on ``data`` at every limit; return the fast
    path's value at the default limit (``None`` if it deferred)."""
    first: ClientHello | None = None
    for limit in LIMITS:
        full = outcome(full_parser, data, limit)
        fast = _fast_hello(data, limit)
        if fast is not None:  # when the fast path answers, it answers what the parser would
            assert isinstance(full, ClientHello)
            assert fast == full
            assert repr(fast) == repr(full)
        # and the public entry points (fast path included) give the reference outcome
        assert outcome(lambda d, n: parse_client_hello(d, limit=n), data, limit) == full
        assert outcome(lambda d, n: HelloSniffer(n).feed(d), data, limit) == full
        if limit == LIMITS[0]:
            first = fast
    return first


def test_fast_path_takes_every_single_record_real_vector() -> None:
    for name in SINGLE_RECORD:
        hello = check_same(VECTORS[name])
        assert hello is not None, name  # the fast path really runs on real clients
        sni, alpn, versions, _records = REAL[name]
        assert (hello.sni, hello.alpn, hello.supported_versions) == (sni, alpn, versions)


def test_fast_path_defers_fragmented_hellos() -> None:
    data = VECTORS["openssl_s_client_frag512"]
    assert _fast_hello(data, 65536) is None
    check_same(data)


def test_sniffer_after_fast_path_keeps_every_byte_and_stays_sticky() -> None:
    data = VECTORS["curl"]
    sniffer = HelloSniffer()
    hello = sniffer.feed(data + b"\x17\x03\x03")
    assert hello is not None and hello.hello_length == len(data)
    assert sniffer.feed(b"more") is hello
    assert sniffer.buffered == data + b"\x17\x03\x03more"
    assert sniffer.wanted == len(sniffer.buffered)
    assert sniffer.result is hello


# --- generated hellos -------------------------------------------------------------------

ODD_EXTENSIONS = st.sampled_from(
    [
        extension(EXT_PRE_SHARED_KEY, b"\x00\x01\x02"),
        extension(0, b""),  # empty server_name
        extension(0, b"\x00\x08\x01\x00\x05abcde"),  # unknown name type only
        extension(0, b"\x00\x10\x00\x00\x05abcde\x01\x00\x05fghij"),  # host_name + other
        extension(0, b"\x00\x10\x00\x00\x05abcde\x00\x00\x05fghij"),  # two host_names
        extension(0, b"\x00\x08\x00\x00\x05ab\xffde"),  # not ASCII
        extension(0, b"\x00\x08\x00\x00\x05AB.de"),  # upper case
        extension(0, b"\x00\x08\x00\x00\x05ab..e"),  # empty label
        extension(16, b""),
        extension(16, b"\x00\x00"),
        extension(16, b"\x00\x03\x00h2"),
        extension(16, b"\x00\x03\x02h2"),
        extension(43, b""),
        extension(43, b"\x03\x03\x04\x03"),
        extension(43, b"\x02\x03\x04\x03"),
        extension(0x0A0A, b""),  # GREASE
        extension(21, bytes(40)),  # padding
        b"\x00",  # a truncated extension header
    ]
)


@st.composite
def odd_hellos(draw: st.DrawFn) -> bytes:
    """Single- or multi-record hellos whose extension lists are shuffled, repeated and odd."""
    exts: list[bytes] = []
    sni = draw(st.one_of(st.none(), HOSTNAME))
    if sni is not None:
        exts.append(server_name_extension(sni))
    alpn = draw(ALPN)
    if alpn:
        exts.append(alpn_extension(alpn))
    versions = draw(VERSIONS)
    if versions is not None:
        exts.append(supported_versions_extension(versions))
    exts += draw(st.lists(ODD_EXTENSIONS, max_size=3))
    exts = draw(st.permutations(exts))
    if exts:
        duplicate: bool = draw(st.booleans())
        if duplicate:
            exts.append(draw(st.sampled_from(exts)))  # a duplicate
    message = client_hello_message(
        extensions=None if draw(st.integers(0, 9)) == 0 else exts,
        legacy_version=draw(st.sampled_from([0x0303, 0x0303, 0x0301, 0x0203])),
        session_id=draw(st.binary(max_size=33)),
        compression_methods=draw(st.sampled_from([b"\x00", b"\x00", b""])),
    )
    fragment = draw(st.sampled_from([1 << 14, 1 << 14, 1 << 14, 100]))
    data = wrap_records(message, fragment=fragment)
    return data + draw(st.sampled_from([b"", b"", b"\x17\x03\x03\x00\x01x", b"\x16"]))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=odd_hellos())
def test_fast_path_matches_full_parser_on_odd_hellos(data: bytes) -> None:
    check_same(data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=generated_hellos())
def test_fast_path_matches_full_parser_on_generated_hellos(
    case: tuple[bytes, str | None, list[bytes], list[int] | None],
) -> None:
    check_same(case[0])


PSK = extension(EXT_PRE_SHARED_KEY, b"\x00\x01\x02")
VALID_EXTS = [
    server_name_extension("app.example"),
    alpn_extension(["h2", "http/1.1"]),
    supported_versions_extension([0x0304, 0x0303]),
    extension(0x0A0A, b""),
]


@settings(max_examples=200, deadline=None)
@given(exts=st.permutations([*VALID_EXTS, PSK]), dup=st.sampled_from([None, *VALID_EXTS, PSK]))
def test_fast_path_matches_full_parser_wherever_pre_shared_key_is(
    exts: list[bytes], dup: bytes | None
) -> None:
    """pre_shared_key must be last and no type may repeat: the fast path checks both after
    its walk, the full parser per extension; same outcome either way."""
    listed = exts if dup is None else [*exts[:2], dup, *exts[2:]]
    data = wrap_records(client_hello_message(extensions=listed))
    hello = check_same(data)
    assert (hello is not None) == (dup is None and exts[-1] == PSK)


# --- mutations ----------------------------------------------------------------------------


def _mutations(v: bytes) -> st.SearchStrategy[bytes]:
    offsets = structural_offsets(v)
    return st.lists(
        st.tuples(
            st.one_of(st.integers(0, len(v) - 1), st.sampled_from(offsets)),
            st.one_of(st.integers(0, 255), st.sampled_from([0, 1, 2, 3, 0x7F, 0x80, 0xFF])),
        ),
        min_size=1,
        max_size=4,
    ).map(lambda muts: _apply(v, muts))


def _apply(data: bytes, muts: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for pos, value in muts:
        out[pos] = value
    return bytes(out)


@settings(max_examples=600, deadline=None)
@example(data=VECTORS["curl"][:4] + b"\x00" + VECTORS["curl"][5:])
@example(data=VECTORS["curl"][:-1])
@example(data=VECTORS["curl"] + b"\x00")
@given(data=st.sampled_from(sorted(VECTORS.values())).flatmap(_mutations))
def test_fast_path_matches_full_parser_on_mutated_real_vectors(data: bytes) -> None:
    check_same(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=odd_hellos().filter(lambda d: len(d) > 60).flatmap(_mutations))
def test_fast_path_matches_full_parser_on_mutated_generated_hellos(data: bytes) -> None:
    check_same(data)


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(SINGLE_RECORD),
    cut=st.integers(0, 600),
    tail=st.binary(max_size=40),
)
def test_fast_path_matches_full_parser_on_truncated_and_extended_vectors(
    name: str, cut: int, tail: bytes
) -> None:
    check_same(VECTORS[name][:cut] + tail)
