from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import msgpack  # type: ignore[import-untyped]
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.protocol.attestation import (
    RUNTIME_EVENT_TYPE,
    Attestation,
    AttestedEvent,
    TdxEvent,
    decode_attestation,
    decode_event_log_json,
    decode_legacy_event_log,
    encode_attestation_v0,
    encode_attestation_v1,
    encode_event_log_json,
    encode_legacy_event_log,
    runtime_event_digest,
    strip_attestation,
)
from gateway.protocol.errors import CodecError

FIXTURE = Path(__file__).parents[1] / "data" / "dstack-simulator" / "attestation.bin"


@pytest.fixture(scope="module")
def fixture_bytes() -> bytes:
    return FIXTURE.read_bytes()


def test_fixture_decodes_as_documented(fixture_bytes: bytes) -> None:
    att = decode_attestation(fixture_bytes)
    assert att.wire_version == 0
    assert len(att.quote) == 5010
    assert len(att.event_log) == 33
    assert [e.name for e in att.runtime_events] == [
        "system-preparing",
        "app-id",
        "compose-hash",
        "instance-id",
        "boot-mr-done",
        "os-image-hash",
        "key-provider",
        "storage-fs",
        "system-ready",
    ]
    assert att.report_data == bytes(64)
    assert '"os_image_hash\\":\\"e61be43d' in att.config
    # the imr-3 part of the TDX log is the runtime events with their true digests
    imr3 = [e for e in att.event_log if e.imr == 3]
    assert imr3 == [TdxEvent.runtime(e) for e in att.runtime_events]


def test_fixture_reencodes_byte_for_byte(fixture_bytes: bytes) -> None:
    assert encode_attestation_v0(decode_attestation(fixture_bytes)) == fixture_bytes


def test_v1_msgpack_shape_and_round_trip(fixture_bytes: bytes) -> None:
    att = decode_attestation(fixture_bytes)
    wire = encode_attestation_v1(att)
    assert 0x80 <= wire[0] <= 0x8F
    doc = msgpack.unpackb(wire, raw=False)
    assert doc["version"] == 1
    assert doc["platform"]["kind"] == "tdx" and doc["stack"]["kind"] == "dstack"
    assert doc["platform"]["data"]["quote"][:4] == [4, 0, 2, 0]  # Vec<u8> as an int array
    assert isinstance(doc["stack"]["data"]["report_data"], list)
    assert isinstance(doc["platform"]["data"]["event_log"][0]["event_payload"], bytes)
    back = decode_attestation(wire)
    assert back == replace(att, wire_version=1)


def test_v2_events_need_v1_and_use_jcs_digests() -> None:
    ev = AttestedEvent("compose-hash", b"\xab\xcd", version=2)
    import hashlib

    jcs = b'{"name":"compose-hash","payload":"abcd","type":134217729}'
    assert ev.digest() == hashlib.sha384(jcs).digest()
    att = Attestation(b"q", (TdxEvent.runtime(ev),), (ev,), bytes(64), "{}")
    with pytest.raises(ValueError, match="V1"):
        encode_attestation_v0(att)
    assert decode_attestation(encode_attestation_v1(att)) == replace(att, wire_version=1)


def test_stripped_form_keeps_runtime_events_only(fixture_bytes: bytes) -> None:
    att = decode_attestation(fixture_bytes)
    s = strip_attestation(att)
    assert [e.event for e in s.event_log] == [e.name for e in att.runtime_events]
    assert all(e.digest == b"" and e.imr == 3 for e in s.event_log)
    assert s.runtime_events == att.runtime_events
    assert len(encode_attestation_v0(s)) < len(fixture_bytes) - 2000


def test_event_log_json_keys_in_dstack_order(fixture_bytes: bytes) -> None:
    att = decode_attestation(fixture_bytes)
    text = encode_event_log_json(att.event_log)
    assert text.startswith('[{"imr":0,"event_type":2147483659,"digest":"cd2312a0')
    assert decode_event_log_json(text) == att.event_log
    for gz in (False, True):
        assert decode_legacy_event_log(encode_legacy_event_log(att.event_log, gzip=gz)) == (
            att.event_log
        )


@pytest.mark.parametrize(
    "text",
    [
        "{}",
        "[1]",
        '[{"imr":0}]',
        '[{"imr":-1,"event_type":1,"digest":"","event":"","event_payload":""}]',
        '[{"imr":0,"event_type":1,"digest":"zz","event":"","event_payload":""}]',
        '[{"imr":0,"event_type":1,"digest":"a b","event":"","event_payload":""}]',
        "[[[[",
    ],
)
def test_bad_event_log_json(text: str) -> None:
    with pytest.raises(CodecError):
        decode_event_log_json(text)


def test_gzip_bomb_is_bounded() -> None:
    import zlib

    c = zlib.compressobj(wbits=31)
    bomb = b"ELGZv1" + c.compress(b"[" + b" " * (8 * 1024 * 1024)) + c.flush()
    with pytest.raises(CodecError, match="inflates past"):
        decode_legacy_event_log(bomb)


@pytest.mark.parametrize(
    ("wire", "match"),
    [
        (b"", "empty"),
        (b"\x01", "unknown format"),
        (b"\x00\x01", "GcpTdx"),
        (b"\x00\x00\xfd", "only"),
        (msgpack.packb({"version": 2}), "version"),
        (msgpack.packb({"version": 1, "platform": {"kind": "sev-snp", "data": {}}}), "sev-snp"),
    ],
)
def test_malformed_headers(wire: bytes, match: str) -> None:
    with pytest.raises(CodecError, match=match):
        decode_attestation(wire)


def test_trailing_bytes_rejected(fixture_bytes: bytes) -> None:
    with pytest.raises(CodecError, match="trailing"):
        decode_attestation(fixture_bytes + b"\x00")


names = st.text(max_size=12)
blobs = st.binary(max_size=40)
v1_events = st.builds(AttestedEvent, names, blobs)
any_events = st.builds(AttestedEvent, names, blobs, st.sampled_from([1, 2]))
tdx_events = st.builds(
    TdxEvent,
    st.integers(0, 3),
    st.sampled_from([1, 10, RUNTIME_EVENT_TYPE, 2**32 - 1]),
    st.binary(max_size=48),
    names,
    blobs,
)
attestations = st.builds(
    Attestation,
    quote=st.binary(max_size=300),
    event_log=st.lists(tdx_events, max_size=4).map(tuple),
    runtime_events=st.lists(v1_events, max_size=4).map(tuple),
    report_data=st.binary(min_size=64, max_size=64),
    config=st.text(max_size=30),
)


@given(attestations)
def test_v0_round_trip(att: Attestation) -> None:
    assert decode_attestation(encode_attestation_v0(att)) == att


@given(attestations, st.lists(any_events, max_size=3).map(tuple))
def test_v1_round_trip(att: Attestation, extra: tuple[AttestedEvent, ...]) -> None:
    att = replace(att, runtime_events=att.runtime_events + extra, wire_version=1)
    assert decode_attestation(encode_attestation_v1(att)) == att


@settings(max_examples=300)
@given(attestations, st.data())
def test_mutations_raise_only_codec_error(att: Attestation, data: st.DataObject) -> None:
    encode = data.draw(st.sampled_from([encode_attestation_v0, encode_attestation_v1]))
    wire = bytearray(encode(att))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(wire) - 1))
        wire[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(wire)))
    try:
        decode_attestation(bytes(wire[:cut]))
    except CodecError:
        pass


def test_digest_versions() -> None:
    assert runtime_event_digest("system-preparing", b"").hex().startswith("f9974020ef507068")
    with pytest.raises(ValueError):
        runtime_event_digest("x", b"", 3)


@given(st.binary(max_size=200))
def test_legacy_event_log_random_bytes_raise_only_codec_error(data: bytes) -> None:
    for blob in (data, b"ELGZv1" + data):
        try:
            decode_legacy_event_log(blob)
        except CodecError:
            pass
