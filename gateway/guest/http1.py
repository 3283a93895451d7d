"""A complete HTTP/1.1 reply read to EOF, as the guest's small RPC clients receive them.

The registration client and the KMS client each send one request per TLS connection with
``Connection: close`` and read until EOF; this is the one place that turns those bytes into
a status and a body (chunked or ``Content-Length``). Bytes in, values or ``ValueError`` out.
"""

from __future__ import annotations

__all__ = ["parse_http_reply"]


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            raise ValueError("bad chunked encoding") from None
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return bytes(out)


def parse_http_reply(raw: bytes) -> tuple[int, bytes]:
    """(status, body) of a complete HTTP/1.1 reply read to EOF; raises ValueError."""
    header, sep, payload = raw.partition(b"\r\n\r\n")
    if not sep:
        raise ValueError("incomplete HTTP reply")
    status_line, *lines = header.decode("latin-1").split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise ValueError("bad HTTP status line")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        payload = _dechunk(payload)
    elif headers.get("content-length", "").isdigit():
        payload = payload[: int(headers["content-length"])]
    return int(parts[1]), payload
