"""DNS-01 through the Cloudflare v4 REST API (bearer token with Zone:Read + DNS:Edit).

Calls made (and nothing else), all under the configurable ``api_url``:

* ``GET /zones?name=<candidate>`` trying the longest suffix of the record name first; the
  zone id and its ``name_servers`` are cached;
* ``POST /zones/{id}/dns_records`` to create a TXT or CAA record;
* ``GET /zones/{id}/dns_records?type=&name=`` (paged) to find records to delete;
* ``DELETE /zones/{id}/dns_records/{record_id}``.

Every response is the ``{"success", "errors", "result", "result_info"}`` envelope; a failure
becomes :class:`DnsProviderError` with ``rcode="HTTP <status>"`` and Cloudflare's first error
message. The token is sent only in the ``Authorization`` header and never logged.
The propagation check queries ``check_servers`` if configured, else the zone's Cloudflare
name servers (resolved through the system resolver) on port 53.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import aiohttp

from gateway.certs.dns.base import CaaRecord, DnsProvider, NameServer
from gateway.certs.dns.propagation import resolve_addresses
from gateway.certs.errors import DnsProviderError

__all__ = ["CloudflareProvider"]

_CAA_POLICY_TAGS = ("issue", "issuewild")


class CloudflareProvider(DnsProvider):
    """Publishes records through the Cloudflare API at ``api_url``."""

    def __init__(
        self,
        *,
        api_url: str,
        token: str,
        ttl: int = 60,
        check_servers: Sequence[NameServer] = (),
        timeout: float = 15.0,
        label: str = "cloudflare",
    ) -> None:
        self.label = label
        self._base = api_url.rstrip("/")
        self._token = token
        # Cloudflare: 1 means "automatic"; otherwise the minimum is 60
        self._ttl = ttl if ttl == 1 or ttl >= 60 else 60
        self._check_servers = tuple(check_servers)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._zones: dict[str, tuple[str, str, tuple[str, ...]]] = {}  # name -> id, zone, ns

    def __repr__(self) -> str:  # never show the token
        return f"CloudflareProvider(api_url={self._base!r})"

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _call(
        self,
        zone: str,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        headers = {"Authorization": f"Bearer {self._token}"}
        try:
            async with self._session.request(
                method, self._base + path, params=params, json=body, headers=headers
            ) as resp:
                try:
                    doc = await resp.json(content_type=None)
                except ValueError:
                    doc = None
                status = resp.status
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise DnsProviderError(zone, None, f"Cloudflare API unreachable: {exc!r}") from None
        if not isinstance(doc, dict) or status >= 400 or not doc.get("success"):
            errors = doc.get("errors") if isinstance(doc, dict) else None
            first = errors[0] if isinstance(errors, list) and errors else {}
            msg = first.get("message", "") if isinstance(first, dict) else str(first)
            raise DnsProviderError(zone, f"HTTP {status}", msg or f"{method} {path} failed")
        return doc

    async def _zone(self, name: str) -> tuple[str, str, tuple[str, ...]]:
        """(zone id, zone name, name servers) for the longest zone suffix of ``name``."""
        labels = name.rstrip(".").lower().split(".")
        for i in range(len(labels) - 1):
            candidate = ".".join(labels[i:])
            if candidate in self._zones:
                return self._zones[candidate]
        for i in range(len(labels) - 1):
            candidate = ".".join(labels[i:])
            doc = await self._call(
                candidate, "GET", "/zones", params={"name": candidate, "status": "active"}
            )
            result = doc.get("result") or []
            if result:
                zone = result[0]
                entry = (str(zone["id"]), candidate, tuple(zone.get("name_servers") or ()))
                self._zones[candidate] = entry
                return entry
        raise DnsProviderError(name, None, "no Cloudflare zone of this token contains the name")

    async def _records(
        self, zone_id: str, zone: str, rtype: str, name: str
    ) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        page = 1
        while True:
            doc = await self._call(
                zone,
                "GET",
                f"/zones/{zone_id}/dns_records",
                params={"type": rtype, "name": name, "page": str(page), "per_page": "100"},
            )
            out.extend(r for r in doc.get("result") or [] if isinstance(r, dict))
            info = doc.get("result_info") or {}
            if page >= int(info.get("total_pages") or 1):
                return out
            page += 1

    async def add_txt(self, name: str, value: str) -> None:
        zone_id, zone, _ = await self._zone(name)
        body = {"type": "TXT", "name": name.rstrip("."), "content": value, "ttl": self._ttl}
        await self._call(zone, "POST", f"/zones/{zone_id}/dns_records", body=body)

    async def remove_txt(self, name: str, value: str) -> None:
        zone_id, zone, _ = await self._zone(name)
        for record in await self._records(zone_id, zone, "TXT", name.rstrip(".")):
            if str(record.get("content", "")).strip('"') == value:
                await self._call(zone, "DELETE", f"/zones/{zone_id}/dns_records/{record['id']}")

    async def set_caa(self, name: str, records: Sequence[CaaRecord]) -> None:
        zone_id, zone, _ = await self._zone(name)
        wanted = {(r.flags, r.tag, r.value) for r in records}
        have = set()
        for rec in await self._records(zone_id, zone, "CAA", name.rstrip(".")):
            data = rec.get("data") or {}
            key = (int(data.get("flags", 0)), str(data.get("tag", "")), str(data.get("value", "")))
            if key in wanted:
                have.add(key)
            elif key[1].lower() in _CAA_POLICY_TAGS:
                await self._call(zone, "DELETE", f"/zones/{zone_id}/dns_records/{rec['id']}")
        for flags, tag, value in sorted(wanted - have):
            body = {
                "type": "CAA",
                "name": name.rstrip("."),
                "ttl": self._ttl,
                "data": {"flags": flags, "tag": tag, "value": value},
            }
            await self._call(zone, "POST", f"/zones/{zone_id}/dns_records", body=body)

    async def authoritative_servers(self, name: str) -> tuple[NameServer, ...]:
        if self._check_servers:
            return self._check_servers
        _, zone, ns_names = await self._zone(name)
        servers: set[NameServer] = set()
        for ns in ns_names:
            servers.update(NameServer(a) for a in await resolve_addresses(ns, 5.0))
        if not servers:
            raise DnsProviderError(zone, None, "cannot resolve the zone's Cloudflare name servers")
        return tuple(sorted(servers))
