"""Reading an HTTP body whole, up to a limit, from an aiohttp stream.

``StreamReader.read(n)`` returns whatever has arrived so far (at least one byte), not ``n``
bytes: a body that comes in two TCP segments (a client that writes the headers and the body
separately, a slow link, a large answer) would be cut short and then fail as "invalid JSON".
"""

from __future__ import annotations

from aiohttp import StreamReader


async def read_upto(stream: StreamReader, limit: int) -> bytes:
    """The body until its end, or its first ``limit + 1`` bytes (so callers can tell "over
    the limit" from "exactly the limit" without reading an unbounded body)."""
    chunks: list[bytes] = []
    size = 0
    while size <= limit and (chunk := await stream.read(limit + 1 - size)):
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)
