"""The subset of SCALE (Parity's Simple Concatenated Aggregate Little-Endian codec) dstack uses.

Grammar (every integer little-endian, no padding, no field names on the wire)::

    compact   = 1, 2 or 4 bytes whose low 2 bits pick the mode (00: v < 2^6,
                01: v < 2^14, 10: v < 2^30), or 0b11 + (n - 4) in the upper 6 bits
                followed by n value bytes (v >= 2^30); canonical = the shortest mode
    u8/u32/u64 = 1/4/8 bytes
    bool      = 0x00 | 0x01
    Vec<u8>   = compact(len) || bytes            String = Vec<u8> holding UTF-8
    Vec<T>    = compact(count) || T*count        [u8; N] = N bytes (no length)
    Option<T> = 0x00 | 0x01 || T                 enum    = u8 variant index || fields

Decoding is over a complete buffer (SCALE carries no framing of its own; the framing is the
enclosing certificate extension or RPC body), so the outcomes are a value or
:class:`CodecError` naming the field and the offset. Lengths are checked against the bytes
that remain before anything is allocated, and every reader takes an explicit upper bound,
so a hostile length prefix costs nothing. Non-canonical compact integers are rejected, as
parity-scale-codec does, so every value has exactly one encoding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from gateway.protocol.errors import CodecError

T = TypeVar("T")

__all__ = [
    "Reader",
    "encode_bool",
    "encode_bytes",
    "encode_compact",
    "encode_option",
    "encode_str",
    "encode_u8",
    "encode_u32",
    "encode_u64",
    "encode_vec",
]

#: Default upper bound on any one length prefix (bytes or items): 16 MiB.
DEFAULT_MAX_LEN = 16 * 1024 * 1024


class Reader:
    """A cursor over one complete SCALE buffer; each ``read_*`` consumes one value.

    ``what`` arguments name the field for error messages (``"quote.event_log[3].digest"``).
    """

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = bytes(data)
        self._pos = 0

    @property
    def offset(self) -> int:
        """Bytes consumed so far."""
        return self._pos

    @property
    def remaining(self) -> int:
        """Bytes left to read."""
        return len(self._data) - self._pos

    def _take(self, n: int, what: str) -> bytes:
        if n > self.remaining:
            raise CodecError(
                f"{what}: needs {n} bytes at offset {self._pos}, only {self.remaining} left"
            )
        out = self._data[self._pos : self._pos + n]
        self._pos += n
        return out

    def read_u8(self, what: str) -> int:
        return self._take(1, what)[0]

    def read_u32(self, what: str) -> int:
        return int.from_bytes(self._take(4, what), "little")

    def read_u64(self, what: str) -> int:
        return int.from_bytes(self._take(8, what), "little")

    def read_bool(self, what: str) -> bool:
        at = self._pos
        b = self.read_u8(what)
        if b > 1:
            raise CodecError(f"{what}: bool byte {b:#04x} at offset {at} is not 0 or 1")
        return b == 1

    def read_compact(self, what: str) -> int:
        """A canonical compact integer."""
        at = self._pos
        first = self.read_u8(what)
        mode = first & 0b11
        if mode == 0:
            return first >> 2
        if mode == 1:
            value = int.from_bytes(bytes([first]) + self._take(1, what), "little") >> 2
            if value < 1 << 6:
                raise CodecError(f"{what}: non-canonical compact integer at offset {at}")
            return value
        if mode == 2:
            value = int.from_bytes(bytes([first]) + self._take(3, what), "little") >> 2
            if value < 1 << 14:
                raise CodecError(f"{what}: non-canonical compact integer at offset {at}")
            return value
        n = (first >> 2) + 4
        raw = self._take(n, what)
        value = int.from_bytes(raw, "little")
        if value < 1 << 30 or raw[-1] == 0:
            raise CodecError(f"{what}: non-canonical compact integer at offset {at}")
        return value

    def read_length(self, what: str, max_len: int) -> int:
        """A compact length prefix, bounded by ``max_len``."""
        at = self._pos
        n = self.read_compact(what)
        if n > max_len:
            raise CodecError(f"{what}: length {n} at offset {at} exceeds the limit {max_len}")
        return n

    def read_bytes(self, what: str, max_len: int = DEFAULT_MAX_LEN) -> bytes:
        """``Vec<u8>``."""
        n = self.read_length(what, max_len)
        return self._take(n, what)

    def read_str(self, what: str, max_len: int = DEFAULT_MAX_LEN) -> str:
        """``String`` (UTF-8, strictly decoded)."""
        at = self._pos
        raw = self.read_bytes(what, max_len)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CodecError(f"{what}: invalid UTF-8 in the string at offset {at}: {exc}") from None

    def read_fixed(self, n: int, what: str) -> bytes:
        """``[u8; n]``."""
        return self._take(n, what)

    def read_vec(
        self,
        item: Callable[[Reader, str], T],
        what: str,
        max_items: int,
        min_item_size: int = 1,
    ) -> list[T]:
        """``Vec<T>``: ``item(reader, name)`` reads one element.

        The count is bounded by ``max_items`` and by the bytes left divided by
        ``min_item_size``, so a forged count cannot make us loop or allocate.
        """
        at = self._pos
        count = self.read_length(what, max_items)
        if count * min_item_size > self.remaining:
            raise CodecError(
                f"{what}: {count} items at offset {at} cannot fit in {self.remaining} bytes"
            )
        return [item(self, f"{what}[{i}]") for i in range(count)]

    def read_option(self, item: Callable[[Reader, str], T], what: str) -> T | None:
        """``Option<T>``."""
        at = self._pos
        tag = self.read_u8(what)
        if tag == 0:
            return None
        if tag == 1:
            return item(self, what)
        raise CodecError(f"{what}: Option tag {tag:#04x} at offset {at} is not 0 or 1")

    def read_variant(self, what: str, known: int) -> int:
        """An enum variant index; ``known`` is the number of variants we can decode."""
        at = self._pos
        index = self.read_u8(what)
        if index >= known:
            raise CodecError(f"{what}: unsupported variant {index} at offset {at}")
        return index

    def expect_end(self, what: str) -> None:
        """Raise if bytes are left over (SCALE values have exactly one encoding)."""
        if self.remaining:
            raise CodecError(f"{what}: {self.remaining} trailing bytes at offset {self._pos}")


def encode_compact(value: int) -> bytes:
    """The canonical compact encoding of a non-negative integer (< 2^536)."""
    if value < 0:
        raise ValueError("compact integers are unsigned")
    if value < 1 << 6:
        return bytes([value << 2])
    if value < 1 << 14:
        return ((value << 2) | 1).to_bytes(2, "little")
    if value < 1 << 30:
        return ((value << 2) | 2).to_bytes(4, "little")
    n = (value.bit_length() + 7) // 8
    if n > 67:
        raise ValueError("compact integer too large")
    return bytes([((n - 4) << 2) | 3]) + value.to_bytes(n, "little")


def encode_u8(value: int) -> bytes:
    return value.to_bytes(1, "little")


def encode_u32(value: int) -> bytes:
    return value.to_bytes(4, "little")


def encode_u64(value: int) -> bytes:
    return value.to_bytes(8, "little")


def encode_bool(value: bool) -> bytes:
    return b"\x01" if value else b"\x00"


def encode_bytes(value: bytes) -> bytes:
    """``Vec<u8>``."""
    return encode_compact(len(value)) + value


def encode_str(value: str) -> bytes:
    """``String``."""
    return encode_bytes(value.encode("utf-8"))


def encode_vec(items: list[T] | tuple[T, ...], item: Callable[[T], bytes]) -> bytes:
    """``Vec<T>``."""
    return encode_compact(len(items)) + b"".join(item(x) for x in items)


def encode_option(value: T | None, item: Callable[[T], bytes]) -> bytes:
    """``Option<T>``."""
    return b"\x00" if value is None else b"\x01" + item(value)
