"""The TDX boot event log (ACPI CCEL table data), sans-IO.

On a TDX guest the firmware leaves its measurement log in
``/sys/firmware/acpi/tables/data/CCEL``: a TCG2 "crypto agile" log. The first entry is a
legacy ``TCG_PCR_EVENT`` (SHA-1 layout) carrying the ``Spec ID Event03`` header that lists
the digest algorithms and sizes; every further entry is a ``TCG_PCR_EVENT2``::

    mr_index u32 | event_type u32 | digest count u32 | (alg_id u16, digest)* |
    event_size u32 | event

dstack exposes these as ``TdxEvent`` objects with ``imr = mr_index - 1`` (index 0 is MRTD,
which no RTMR replays, so those are dropped), the SHA-384 digest and the raw event data.
``EV_NO_ACTION`` entries are not extended into any register, so they are skipped too (a
replay that included them would be wrong). The log ends at the first entry whose header is
all ``0xFF`` or all zero bytes, or at the end of the data.
"""

from __future__ import annotations

import hashlib
import struct

from gateway.protocol.attestation import TdxEvent
from gateway.protocol.errors import CodecError

__all__ = ["EV_NO_ACTION", "SHA384_ALG", "encode_ccel", "parse_ccel", "sim_firmware_log"]

EV_NO_ACTION = 0x00000003
SHA384_ALG = 0x000C
SPEC_ID_SIGNATURE = b"Spec ID Event03\x00"
MAX_EVENTS = 100_000
MAX_EVENT_SIZE = 16 * 1024 * 1024


class _Cursor:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise CodecError(f"CCEL: {what} needs {n} bytes at offset {self.pos}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u16(self, what: str) -> int:
        return int(struct.unpack("<H", self.take(2, what))[0])

    def u32(self, what: str) -> int:
        return int(struct.unpack("<I", self.take(4, what))[0])


def _digest_sizes(spec: bytes) -> dict[int, int]:
    c = _Cursor(spec)
    if c.take(16, "spec id signature") != SPEC_ID_SIGNATURE:
        raise CodecError("CCEL: the first event is not a 'Spec ID Event03' header")
    c.take(4 + 4, "spec id platform/version fields")  # class, minor, major, errata, uintn
    count = c.u32("spec id algorithm count")
    if count == 0 or count > 64:
        raise CodecError(f"CCEL: {count} digest algorithms in the header")
    sizes = {}
    for i in range(count):
        alg, size = c.u16(f"algorithm {i} id"), c.u16(f"algorithm {i} size")
        sizes[alg] = size
    if SHA384_ALG not in sizes:
        raise CodecError("CCEL: the log has no SHA-384 digests")
    return sizes


def parse_ccel(data: bytes) -> tuple[TdxEvent, ...]:
    """The RTMR0-2 events of a CCEL log; raises :class:`CodecError` naming the offset."""
    c = _Cursor(bytes(data))
    # legacy first entry: pcr u32, type u32, sha1[20], size u32, Spec ID event
    c.u32("first event index")
    c.u32("first event type")
    c.take(20, "first event digest")
    sizes = _digest_sizes(c.take(c.u32("first event size"), "first event data"))
    out: list[TdxEvent] = []
    for n in range(MAX_EVENTS):
        if len(c.data) - c.pos < 8:
            break
        head = c.data[c.pos : c.pos + 8]
        if head in (b"\xff" * 8, b"\x00" * 8):
            break
        at = c.pos
        mr_index = c.u32(f"event {n} index")
        event_type = c.u32(f"event {n} type")
        count = c.u32(f"event {n} digest count")
        if count > len(sizes):
            raise CodecError(f"CCEL: event {n} at offset {at} has {count} digests")
        digest = b""
        for j in range(count):
            alg = c.u16(f"event {n} digest {j} algorithm")
            if alg not in sizes:
                raise CodecError(f"CCEL: event {n} uses undeclared algorithm {alg:#06x}")
            value = c.take(sizes[alg], f"event {n} digest {j}")
            if alg == SHA384_ALG:
                digest = value
        size = c.u32(f"event {n} size")
        if size > MAX_EVENT_SIZE:
            raise CodecError(f"CCEL: event {n} at offset {at} claims {size} bytes")
        payload = c.take(size, f"event {n} data")
        if event_type == EV_NO_ACTION or mr_index == 0:
            continue
        if not 1 <= mr_index <= 3:
            raise CodecError(f"CCEL: event {n} at offset {at} targets MR index {mr_index}")
        if len(digest) != 48:
            raise CodecError(f"CCEL: event {n} at offset {at} has no SHA-384 digest")
        out.append(TdxEvent(mr_index - 1, event_type, digest, "", payload))
    else:
        raise CodecError(f"CCEL: more than {MAX_EVENTS} events")
    return tuple(out)


def encode_ccel(events: list[tuple[int, int, bytes]]) -> bytes:
    """A CCEL log (SHA-384 only) for ``(mr_index, event_type, event_data)`` entries, each
    digest being SHA-384 of the data; used for the simulator's firmware log and tests."""
    spec = (
        SPEC_ID_SIGNATURE
        + struct.pack("<IBBBB", 0, 0, 2, 0, 2)
        + struct.pack("<I", 1)
        + struct.pack("<HH", SHA384_ALG, 48)
        + b"\x00"
    )
    out = [struct.pack("<II", 0, EV_NO_ACTION) + bytes(20) + struct.pack("<I", len(spec)) + spec]
    for mr_index, event_type, data in events:
        digest = hashlib.sha384(data).digest()
        out.append(
            struct.pack("<IIIH", mr_index, event_type, 1, SHA384_ALG)
            + digest
            + struct.pack("<I", len(data))
            + data
        )
    return b"".join(out)


def sim_firmware_log(image: str) -> tuple[TdxEvent, ...]:
    """A small, deterministic boot log for a simulated image (firmware, kernel, cmdline),
    so that RTMR0-2 of a simulated TD replay from events like a real TD's do."""
    entries = [
        (1, 0x80000008, f"{image}: firmware volume".encode()),
        (1, 0x0000000A, f"{image}: ACPI tables".encode()),
        (2, 0x80000003, f"{image}: kernel".encode()),
        (3, 0x0000000D, f"{image}: kernel command line".encode()),
        (3, 0x0000000D, f"{image}: initrd".encode()),
    ]
    return parse_ccel(encode_ccel(entries))
