"""Read an HTTP body to its end, up to a limit.

``aiohttp.StreamReader.read(n)`` returns what has arrived so far, not ``n`` bytes: a body
sent in several TCP segments or TLS records (a client writing headers and body apart, a
loaded machine) came back cut short and failed as "not JSON". Every server and client body
we parse goes through :func:`read_bounded` instead.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["BodyTooLarge", "read_bounded"]


class BodyTooLarge(Exception):
    """The body exceeded the limit (only ``limit + 1`` bytes were read)."""


class _Readable(Protocol):
    async def read(self, n: int = -1) -> bytes: ...


async def read_bounded(stream: _Readable, limit: int) -> bytes:
    """All of ``stream`` until EOF; :class:`BodyTooLarge` once more than ``limit`` bytes came."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await stream.read(limit + 1 - size):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"body over {limit} bytes")
    return b"".join(chunks)
