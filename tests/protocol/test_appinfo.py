from __future__ import annotations

import msgpack  # type: ignore[import-untyped]
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.protocol.appinfo import AppInfo, decode_app_info, encode_app_info
from gateway.protocol.errors import CodecError

INFO = AppInfo(
    app_id=bytes.fromhex("5bb4ff9a3837357f19dc176407a5709c62eb6c56"),
    compose_hash=bytes(range(32)),
    instance_id=b"\x16" * 20,
    device_id=b"\x01" * 32,
    mr_system=b"\x02" * 32,
    mr_aggregated=b"\x03" * 32,
    os_image_hash=b"\x04" * 32,
    key_provider_info=b'{"name":"kms","id":"00"}',
    init_script_hashes=None,
)


def test_positional_array_is_the_default_wire_form() -> None:
    wire = encode_app_info(INFO)
    assert wire[0] == 0x99  # fixarray of 9
    assert decode_app_info(wire) == INFO


def test_map_form_and_eight_field_array_and_int_arrays_are_accepted() -> None:
    assert decode_app_info(encode_app_info(INFO, named=True)) == INFO
    fields = [
        list(INFO.app_id),  # serde Vec<u8> as an array of ints
        INFO.compose_hash,
        INFO.instance_id,
        INFO.device_id,
        INFO.mr_system,
        INFO.mr_aggregated,
        INFO.os_image_hash,
        INFO.key_provider_info,
    ]
    assert decode_app_info(msgpack.packb(fields, use_bin_type=True)) == INFO


@pytest.mark.parametrize(
    "value",
    [[b"x"] * 3, {"app_id": b"x"}, "text", [b"x"] * 8 + [[1.5]], [b"x"] * 7 + [[256]]],
)
def test_malformed_app_info_is_a_codec_error(value: object) -> None:
    with pytest.raises(CodecError):
        decode_app_info(msgpack.packb(value, use_bin_type=True))


hashes = st.binary(min_size=0, max_size=40)


@given(
    st.tuples(*([hashes] * 8)),
    st.one_of(st.none(), st.lists(hashes, max_size=4).map(tuple)),
    st.booleans(),
)
def test_round_trip(
    fields: tuple[bytes, bytes, bytes, bytes, bytes, bytes, bytes, bytes],
    scripts: tuple[bytes, ...] | None,
    named: bool,
) -> None:
    info = AppInfo(*fields, init_script_hashes=scripts)
    assert decode_app_info(encode_app_info(info, named=named)) == info


@given(st.data())
def test_mutations_raise_only_codec_error(data: st.DataObject) -> None:
    wire = bytearray(encode_app_info(INFO))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(wire) - 1))
        wire[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(wire)))
    try:
        decode_app_info(bytes(wire[:cut]))
    except CodecError:
        pass
