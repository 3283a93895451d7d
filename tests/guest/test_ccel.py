"""The CCEL boot event log parser."""

from __future__ import annotations

import hashlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.attest.eventlog import replay_boot_rtmrs
from gateway.guest import ccel
from gateway.protocol.errors import CodecError
from gateway.tee.base import extend

ENTRIES = [
    (0, 0x80000001, b"mrtd-only"),  # MR index 0 (MRTD): dropped
    (1, 0x80000008, b"firmware"),
    (1, ccel.EV_NO_ACTION, b"StartupLocality"),  # not extended: skipped
    (2, 0x80000003, b"kernel"),
    (3, 0x0000000D, b"cmdline"),
    (1, 0x0000000A, b"acpi"),
]


def test_parse_and_replay() -> None:
    data = ccel.encode_ccel(ENTRIES) + b"\xff" * 64  # the table area is padded
    events = ccel.parse_ccel(data)
    assert [(e.imr, e.event_payload) for e in events] == [
        (0, b"firmware"),
        (1, b"kernel"),
        (2, b"cmdline"),
        (0, b"acpi"),
    ]
    rtmr0 = extend(
        extend(bytes(48), hashlib.sha384(b"firmware").digest()), hashlib.sha384(b"acpi").digest()
    )
    assert replay_boot_rtmrs(events)[0] == rtmr0
    assert all(e.event == "" and len(e.digest) == 48 for e in events)


def test_multi_algorithm_log_picks_sha384() -> None:
    spec = (
        ccel.SPEC_ID_SIGNATURE + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, 2)
        + struct.pack("<HHHH", 0x000B, 32, ccel.SHA384_ALG, 48) + b"\x00"
    )  # fmt: skip
    first = struct.pack("<II", 0, 3) + bytes(20) + struct.pack("<I", len(spec)) + spec
    ev = (
        struct.pack("<III", 2, 5, 2) + struct.pack("<H", 0x000B) + b"\x11" * 32
        + struct.pack("<H", ccel.SHA384_ALG) + b"\x22" * 48 + struct.pack("<I", 2) + b"hi"
    )  # fmt: skip
    (event,) = ccel.parse_ccel(first + ev)
    assert event.imr == 1 and event.digest == b"\x22" * 48 and event.event_payload == b"hi"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "needs"),
        (struct.pack("<II", 0, 3) + bytes(20) + struct.pack("<I", 16) + b"x" * 16, "Spec ID"),
        (ccel.encode_ccel([(9, 1, b"x")]), "MR index 9"),
        (ccel.encode_ccel([(1, 1, b"x")])[:-1], "needs"),
    ],
)
def test_bad_logs(data: bytes, reason: str) -> None:
    with pytest.raises(CodecError, match=reason):
        ccel.parse_ccel(data)


@settings(max_examples=150, deadline=None)
@given(cut=st.integers(0, 400), flip=st.integers(0, 400), tail=st.binary(max_size=30))
def test_mutations_only_raise_codec_error(cut: int, flip: int, tail: bytes) -> None:
    data = bytearray(ccel.encode_ccel(ENTRIES))
    if flip < len(data):
        data[flip] ^= 0xFF
    try:
        ccel.parse_ccel(bytes(data[: max(cut, 1)]) + tail)
    except CodecError:
        pass


def test_sim_firmware_log_is_deterministic() -> None:
    assert ccel.sim_firmware_log("a") == ccel.sim_firmware_log("a")
    assert replay_boot_rtmrs(ccel.sim_firmware_log("a")) != replay_boot_rtmrs(
        ccel.sim_firmware_log("b")
    )
