from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from gateway.protocol.errors import CodecError
from gateway.protocol.scale import (
    Reader,
    encode_bytes,
    encode_compact,
    encode_option,
    encode_str,
    encode_u32,
    encode_vec,
)


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        (0, "00"),
        (1, "04"),
        (63, "fc"),
        (64, "0101"),
        (5010, "494e"),  # the fixture quote's length prefix
        (16383, "fdff"),
        (16384, "02000100"),
        ((1 << 30) - 1, "feffffff"),
        (1 << 30, "0300000040"),
        ((1 << 32) - 1, "03ffffffff"),
        (1 << 32, "070000000001"),
    ],
)
def test_compact_matches_parity_vectors(value: int, wire: str) -> None:
    assert encode_compact(value).hex() == wire
    r = Reader(bytes.fromhex(wire))
    assert r.read_compact("x") == value
    r.expect_end("x")


@pytest.mark.parametrize("wire", ["0100", "02000000", "0300000000", "07ffffffff00"])
def test_compact_rejects_non_canonical(wire: str) -> None:
    with pytest.raises(CodecError, match="non-canonical"):
        Reader(bytes.fromhex(wire)).read_compact("len")


@given(st.integers(min_value=0, max_value=2**128))
def test_compact_round_trip(value: int) -> None:
    assert Reader(encode_compact(value)).read_compact("v") == value


def test_length_prefix_is_bounded_before_reading() -> None:
    r = Reader(encode_compact(10**9) + b"\x00" * 4)
    with pytest.raises(CodecError, match="exceeds the limit"):
        r.read_bytes("payload", max_len=1024)
    with pytest.raises(CodecError, match="only 3 left"):
        Reader(encode_compact(10) + b"abc").read_bytes("payload")


def test_vec_count_cannot_exceed_remaining_bytes() -> None:
    r = Reader(encode_compact(1000) + b"\x00" * 10)
    with pytest.raises(CodecError, match="cannot fit"):
        r.read_vec(lambda rr, w: rr.read_u32(w), "items", max_items=10_000, min_item_size=4)


@given(st.lists(st.tuples(st.integers(0, 2**32 - 1), st.binary(max_size=80), st.text())))
def test_vec_of_structs_round_trip(items: list[tuple[int, bytes, str]]) -> None:
    wire = encode_vec(items, lambda t: encode_u32(t[0]) + encode_bytes(t[1]) + encode_str(t[2]))
    r = Reader(wire)
    got = r.read_vec(
        lambda rr, w: (rr.read_u32(w), rr.read_bytes(w), rr.read_str(w)), "v", max_items=10**6
    )
    r.expect_end("v")
    assert got == items


@given(st.one_of(st.none(), st.binary(max_size=20)))
def test_option_round_trip(value: bytes | None) -> None:
    wire = encode_option(value, encode_bytes)
    assert Reader(wire).read_option(lambda r, w: r.read_bytes(w), "opt") == value


def test_bad_tags_and_utf8_are_codec_errors() -> None:
    with pytest.raises(CodecError, match="Option tag"):
        Reader(b"\x02").read_option(lambda r, w: r.read_u8(w), "opt")
    with pytest.raises(CodecError, match="bool byte"):
        Reader(b"\x05").read_bool("flag")
    with pytest.raises(CodecError, match="UTF-8"):
        Reader(encode_bytes(b"\xff\xfe")).read_str("name")
    with pytest.raises(CodecError, match="unsupported variant 7"):
        Reader(b"\x07").read_variant("platform", known=5)


@given(st.binary(max_size=64))
@example(b"\x03")
@example(b"\xff" * 9)
def test_random_input_raises_only_codec_error(data: bytes) -> None:
    r = Reader(data)
    try:
        while r.remaining:
            r.read_str("s", max_len=1 << 20)
    except CodecError:
        pass
