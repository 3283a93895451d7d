from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.protocol.errors import CodecError
from gateway.protocol.tdx_quote import (
    QUOTE_OFFSETS,
    SIGNED_REGION_SIZE,
    QeCertificationData,
    QuoteHeader,
    QuoteSignatureData,
    TdReport,
    encode_header,
    encode_qe_certification_data,
    encode_td_report,
    encode_tdx_quote,
    parse_tdx_quote,
)

SAMPLE = (Path(__file__).parents[1] / "data" / "tdx-sample" / "tdx_quote").read_bytes()


def test_sample_quote_fields() -> None:
    q = parse_tdx_quote(SAMPLE)
    assert q.version == 4
    assert q.header.tee_type == 0x81
    assert q.report.mr_td.hex().startswith("91eb2b44d141d4ece09f0c75c2c53d24")
    assert q.report.td_attributes == bytes.fromhex("0000001000000000")
    assert q.report.rt_mr3 == bytes(48)
    assert q.report.report_data.hex().startswith("9a9d48e7f6799642")
    assert q.signed_region == SAMPLE[:SIGNED_REGION_SIZE]
    assert q.signature_data.qe is not None
    assert len(q.signature_data.qe.qe_auth_data) == 32
    chain = q.signature_data.qe.pck_chain_pem
    assert chain is not None and chain.count(b"BEGIN CERTIFICATE") == 3
    assert len(q.trailing) == 70 and q.trailing == bytes(70)
    assert not q.report.is_debug


def test_offsets_table_matches_parsed_fields() -> None:
    q = parse_tdx_quote(SAMPLE)
    for name in ("mr_td", "rt_mr0", "rt_mr3", "report_data", "td_attributes", "mr_seam"):
        off, size = QUOTE_OFFSETS[name]
        assert SAMPLE[off : off + size] == getattr(q.report, name)
    off, size = QUOTE_OFFSETS["qe_report"]
    assert q.signature_data.qe is not None
    assert SAMPLE[off : off + size] == q.signature_data.qe.qe_report


def test_encode_of_parse_is_identity() -> None:
    q = parse_tdx_quote(SAMPLE)
    assert encode_header(q.header) + encode_td_report(q.report) == q.signed_region
    assert encode_tdx_quote(q.signed_region, q.signature_data, q.trailing) == SAMPLE


_b = st.binary


@given(
    rd=_b(min_size=64, max_size=64),
    mrs=st.lists(_b(min_size=48, max_size=48), min_size=5, max_size=5),
    auth=_b(max_size=64),
    chain=_b(max_size=300),
    trailing=_b(max_size=16),
)
@settings(max_examples=60)
def test_decode_of_encode_is_identity(
    rd: bytes, mrs: list[bytes], auth: bytes, chain: bytes, trailing: bytes
) -> None:
    report = TdReport(mr_td=mrs[0], rt_mr0=mrs[1], rt_mr1=mrs[2], rt_mr2=mrs[3], rt_mr3=mrs[4],
                      report_data=rd)  # fmt: skip
    qe = QeCertificationData(bytes(384), bytes(64), auth, 5, chain)
    sig = QuoteSignatureData(bytes(64), bytes(64), 6, encode_qe_certification_data(qe), qe)
    blob = encode_tdx_quote(encode_header(QuoteHeader()) + encode_td_report(report), sig, trailing)
    parsed = parse_tdx_quote(blob)
    assert parsed.report == report
    assert parsed.signature_data == sig
    assert parsed.trailing == trailing
    assert parsed.header == QuoteHeader()


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ((0, struct.pack("<H", 5)), "version 5"),
        ((0, struct.pack("<H", 3)), "unsupported quote version 3"),
        ((4, struct.pack("<I", 0)), "SGX quote"),
        ((2, struct.pack("<H", 3)), "not ECDSA-P256"),
        ((764, struct.pack("<H", 5)), "cert_data_type 5"),
        ((632, struct.pack("<I", 10**6)), "exceeds"),
        ((1218, struct.pack("<H", 40000)), "truncated in qe_auth_data"),
    ],
)
def test_malformed_quotes_name_the_problem(patch: tuple[int, bytes], message: str) -> None:
    off, value = patch
    bad = SAMPLE[:off] + value + SAMPLE[off + len(value) :]
    with pytest.raises(CodecError, match=message):
        parse_tdx_quote(bad)


@pytest.mark.parametrize("cut", [0, 1, 47, 48, 631, 632, 635, 700, 770, 1200, 1258, 4935])
def test_truncations_raise_codec_error(cut: int) -> None:
    with pytest.raises(CodecError):
        parse_tdx_quote(SAMPLE[:cut])


@given(pos=st.integers(0, len(SAMPLE) - 1), value=st.integers(0, 255))
@example(pos=632, value=0xFF)
@example(pos=767, value=0x7F)
@settings(max_examples=300)
def test_byte_changes_never_raise_anything_but_codec_error(pos: int, value: int) -> None:
    mutated = SAMPLE[:pos] + bytes([value]) + SAMPLE[pos + 1 :]
    try:
        parse_tdx_quote(mutated)
    except CodecError:
        pass


@given(cut=st.integers(0, len(SAMPLE)), tail=st.binary(max_size=64))
@settings(max_examples=200)
def test_truncation_plus_random_tail_never_raises_anything_but_codec_error(
    cut: int, tail: bytes
) -> None:
    try:
        parse_tdx_quote(SAMPLE[:cut] + tail)
    except CodecError:
        pass


def test_non_bytes_input_is_codec_error() -> None:
    with pytest.raises(CodecError):
        parse_tdx_quote("not bytes")  # type: ignore[arg-type]


def test_dstack_simulator_quote_parses_with_documented_registers() -> None:
    # guest-formats.md 3.5: V0 SCALE container, compact length 5010 at offset 2, quote at 4.
    blob = (
        Path(__file__).parents[1] / "data" / "dstack-simulator" / "attestation.bin"
    ).read_bytes()
    assert blob[:4] == bytes.fromhex("0000494e")
    q = parse_tdx_quote(blob[4 : 4 + 5010])
    assert q.report.rt_mr3.hex() == (
        "f28a1490ee924e9396c2ccf2d93ad536b83cbe159a1d45024d1fd7acdcc10214"
        "5efcfcd0cfa209416446c70226affadf"
    )
    compose_hash = "c143116fef3940e7f776bfc0919c256232ae5338a6e948c96b711e0b2383483a"
    assert q.report.mr_config_id.hex() == "01" + compose_hash + "00" * 15
