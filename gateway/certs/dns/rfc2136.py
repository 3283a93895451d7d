"""DNS-01 through RFC 2136 dynamic updates signed with TSIG (knot, BIND, PowerDNS ...).

Updates go to the zone's primary over TCP. Each change is one UPDATE message, which the
server applies atomically: ``add_txt`` adds one rdata, ``remove_txt`` deletes exactly that
rdata (never the whole RRset, because the wildcard and apex challenges share one name), and
``set_caa`` swaps the ``issue``/``issuewild`` records in a single message so that no moment
exists without a CAA policy.

Failures become :class:`DnsProviderError` with the rcode: ``NOTAUTH``/``REFUSED`` from the
server, or the TSIG error (``BADSIG``, ``BADKEY``, ``BADTIME``) that dnspython raises when
the server rejects the signature. Note that knot reports an update its ACL denies as BADKEY.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.tsig
import dns.update

from gateway.certs.dns.base import CaaRecord, DnsProvider, NameServer
from gateway.certs.dns.propagation import resolve_addresses
from gateway.certs.errors import DnsProviderError

__all__ = ["Rfc2136Provider"]

_TSIG_ERRORS: tuple[tuple[type[Exception], str], ...] = (
    (dns.tsig.PeerBadKey, "BADKEY"),
    (dns.tsig.PeerBadSignature, "BADSIG"),
    (dns.tsig.PeerBadTime, "BADTIME"),
    (dns.tsig.PeerBadTruncation, "BADTRUNC"),
)
_ALGORITHMS = {
    "hmac-sha256": dns.tsig.HMAC_SHA256,
    "hmac-sha384": dns.tsig.HMAC_SHA384,
    "hmac-sha512": dns.tsig.HMAC_SHA512,
}
_CAA_POLICY_TAGS = ("issue", "issuewild")


class Rfc2136Provider(DnsProvider):
    """Publishes records in ``zone`` on the primary at ``server``:``port``."""

    def __init__(
        self,
        *,
        server: str,
        port: int,
        zone: str,
        key_name: str,
        secret_b64: str,
        algorithm: str = "hmac-sha256",
        ttl: int = 60,
        check_port: int = 53,
        check_servers: Sequence[NameServer] = (),
        timeout: float = 5.0,
        label: str = "rfc2136",
    ) -> None:
        if algorithm not in _ALGORITHMS:
            raise ValueError(f"unsupported TSIG algorithm {algorithm!r}")
        self.label = label
        self._primary = NameServer(server, port)
        self._zone = dns.name.from_text(zone)
        self._zone_text = self._zone.to_text(omit_final_dot=True)
        # dns.tsig.Key validates the base64 at once, so a bad secret fails at start-up.
        self._key = dns.tsig.Key(key_name, secret_b64, _ALGORITHMS[algorithm])
        self._ttl = ttl
        self._check_port = check_port
        self._check_servers = tuple(check_servers)
        self._timeout = timeout

    def __repr__(self) -> str:  # never show the key
        return f"Rfc2136Provider(zone={self._zone_text!r}, primary={self._primary})"

    # --- record changes ------------------------------------------------------------------

    def _name(self, name: str) -> dns.name.Name:
        fqdn = dns.name.from_text(name)
        if not fqdn.is_subdomain(self._zone):
            raise DnsProviderError(self._zone_text, None, f"{name} is outside the zone")
        return fqdn

    def _update(self) -> dns.update.UpdateMessage:
        return dns.update.UpdateMessage(self._zone, keyring=self._key)

    async def _send(self, message: dns.message.Message) -> dns.message.Message:
        """Send one query or update to the primary over TCP; map every failure to our error.

        The answer must carry a valid TSIG. An unsigned error answer (a server that does not
        know the zone or the key answers so) is reported with its rcode, never trusted.
        """
        try:
            wire = await asyncio.wait_for(self._exchange(message.to_wire()), self._timeout)
        except TimeoutError:
            raise DnsProviderError(
                self._zone_text, None, f"no answer from {self._primary} within {self._timeout}s"
            ) from None
        except (OSError, asyncio.IncompleteReadError) as exc:
            raise DnsProviderError(
                self._zone_text, None, f"cannot reach {self._primary}: {exc!r}"
            ) from None
        try:
            response = dns.message.from_wire(wire, keyring=message.keyring, request_mac=message.mac)
        except dns.tsig.PeerError as exc:
            code = next((c for t, c in _TSIG_ERRORS if isinstance(exc, t)), "TSIG")
            raise DnsProviderError(
                self._zone_text,
                code,
                "the server rejected our TSIG key (wrong secret or key name, or the update "
                "ACL denies this record)",
            ) from None
        except dns.exception.DNSException as exc:
            try:
                unsigned = dns.message.from_wire(wire, keyring=False)
            except dns.exception.DNSException:
                raise DnsProviderError(
                    self._zone_text, None, f"unusable answer from {self._primary}: {exc}"
                ) from None
            raise DnsProviderError(
                self._zone_text,
                dns.rcode.to_text(unsigned.rcode()),
                f"unsigned answer from {self._primary}: it does not serve this zone "
                "or does not know the key",
            ) from None
        rcode = response.rcode()
        if rcode != dns.rcode.NOERROR:
            raise DnsProviderError(
                self._zone_text, dns.rcode.to_text(rcode), f"from {self._primary}"
            )
        return response

    async def _exchange(self, wire: bytes) -> bytes:
        """One DNS-over-TCP exchange (RFC 1035 4.2.2 length prefix); the raw answer."""
        reader, writer = await asyncio.open_connection(self._primary.host, self._primary.port)
        try:
            writer.write(len(wire).to_bytes(2, "big") + wire)
            await writer.drain()
            size = int.from_bytes(await reader.readexactly(2), "big")
            return await reader.readexactly(size)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def add_txt(self, name: str, value: str) -> None:
        update = self._update()
        update.add(self._name(name), self._ttl, _txt(value))
        await self._send(update)

    async def remove_txt(self, name: str, value: str) -> None:
        update = self._update()
        update.delete(self._name(name), _txt(value))
        await self._send(update)

    async def set_caa(self, name: str, records: Sequence[CaaRecord]) -> None:
        fqdn = self._name(name)
        wanted = {
            dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.CAA, r.to_text()) for r in records
        }
        current = await self._query(fqdn, dns.rdatatype.CAA)
        update = self._update()
        for rdata in current:
            tag = rdata.tag.decode("ascii", "replace").lower()  # type: ignore[attr-defined]
            if tag in _CAA_POLICY_TAGS and rdata not in wanted:
                update.delete(fqdn, rdata)
        for rdata in wanted:
            if rdata not in current:
                update.add(fqdn, self._ttl, rdata)
        if update.update:  # nothing to do when the records are already in place
            await self._send(update)

    # --- lookups on the primary ---------------------------------------------------------

    async def _query(
        self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType
    ) -> list[dns.rdata.Rdata]:
        try:
            response = await self._send(dns.message.make_query(name, rdtype))
        except DnsProviderError as exc:
            if exc.rcode == "NXDOMAIN":  # no such name (yet): it has no records of any type,
                return []  # e.g. a base domain's apex before anything points at the gateway
            raise
        return [rd for rrset in response.answer if rrset.rdtype == rdtype for rd in rrset]

    async def authoritative_servers(self, name: str) -> tuple[NameServer, ...]:
        """The primary, every NS of the zone (addresses on ``check_port``) and ``check_servers``.

        In-zone NS names are resolved on the primary itself; out-of-zone ones through the
        system resolver. A name server that cannot be resolved is an error, because skipping
        it could let the CA query a server that never got the record.
        """
        servers = {self._primary, *self._check_servers}
        for ns in await self._query(self._zone, dns.rdatatype.NS):
            target: dns.name.Name = ns.target  # type: ignore[attr-defined]
            addresses = await self._addresses(target)
            if not addresses:
                raise DnsProviderError(
                    self._zone_text, None, f"cannot resolve name server {target} to an address"
                )
            servers.update(NameServer(a, self._check_port) for a in addresses)
        return tuple(sorted(servers))

    async def _addresses(self, target: dns.name.Name) -> list[str]:
        """IPv4 addresses of a name server, or IPv6 only if it has no IPv4 one.

        One address family per server is enough to see what it serves, and hosts without
        IPv6 connectivity would otherwise wait for servers they cannot reach.
        """
        if target.is_subdomain(self._zone):
            v4, v6 = await asyncio.gather(
                self._query(target, dns.rdatatype.A), self._query(target, dns.rdatatype.AAAA)
            )
            return [rd.address for rd in (v4 or v6)]  # type: ignore[attr-defined]
        return await resolve_addresses(str(target), self._timeout)


def _txt(value: str) -> dns.rdata.Rdata:
    """One TXT rdata holding ``value`` as a single string (ACME values are 43 base64url chars)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.TXT, f'"{escaped}"')
