"""The host API client: boot progress, errors and ``instance.info`` to the VMM.

dstack: ``POST vsock://2:<port>/api/Notify?json {"event","payload"}`` (bodies at most 4 KiB,
30 s timeout). The lab uses ``http://`` or ``unix:/path`` URLs instead of vsock. Notifying
is best effort: the host is not trusted and its absence never fails a boot.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp

__all__ = ["HostApi", "HostApiError"]

logger = logging.getLogger(__name__)
MAX_NOTIFY = 4096


class HostApiError(RuntimeError):
    """The host API could not be reached or answered with an error."""


@dataclass(frozen=True, slots=True)
class HostApi:
    """A host API endpoint: ``vsock://CID:PORT/api``, ``http(s)://.../api`` or ``unix:PATH``."""

    url: str
    timeout: float = 30.0

    async def call(self, method: str, body: dict[str, str]) -> bytes:
        data = json.dumps(body, separators=(",", ":")).encode()
        if self.url.startswith("vsock://"):
            return await self._vsock(method, data)
        if self.url.startswith("unix:"):
            connector: aiohttp.BaseConnector = aiohttp.UnixConnector(path=self.url[5:])
            base = "http://localhost/api"
        else:
            connector = aiohttp.TCPConnector()
            base = self.url.rstrip("/")
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            try:
                async with session.post(
                    f"{base}/{method}?json",
                    data=data,
                    headers={"Content-Type": "application/json"},
                ) as resp:
                    text = await resp.read()
                    if resp.status != 200:
                        raise HostApiError(f"host API {method}: HTTP {resp.status}")
                    return text
            except aiohttp.ClientError as exc:
                raise HostApiError(f"host API {method}: {exc}") from None

    async def _vsock(self, method: str, data: bytes) -> bytes:
        parts = urlsplit(self.url)
        cid, port = parts.hostname, parts.port
        if cid is None or port is None or not hasattr(socket, "AF_VSOCK"):
            raise HostApiError(f"cannot use host API URL {self.url!r} here")
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)  # type: ignore[attr-defined,unused-ignore]
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (int(cid), port)), self.timeout)
            path = parts.path.rstrip("/") or "/api"
            head = (
                f"POST {path}/{method}?json HTTP/1.1\r\nHost: localhost\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                "Connection: close\r\n\r\n"
            ).encode()
            await loop.sock_sendall(sock, head + data)
            chunks = []
            while chunk := await asyncio.wait_for(loop.sock_recv(sock, 65536), self.timeout):
                chunks.append(chunk)
        except (OSError, TimeoutError) as exc:
            raise HostApiError(f"host API {method} over vsock: {exc}") from None
        finally:
            sock.close()
        raw = b"".join(chunks)
        status_line = raw.split(b"\r\n", 1)[0]
        if b" 200 " not in status_line + b" ":
            raise HostApiError(f"host API {method}: {status_line.decode(errors='replace')}")
        return raw.split(b"\r\n\r\n", 1)[-1]

    async def notify(self, event: str, payload: str) -> None:
        """Best effort: log and swallow failures (the host is not trusted anyway)."""
        body = payload.encode()[:MAX_NOTIFY].decode("utf-8", "ignore")
        try:
            await self.call("Notify", {"event": event, "payload": body})
        except HostApiError as exc:
            logger.warning("host notify %s failed: %s", event, exc)
