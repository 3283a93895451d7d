"""DNS-01 providers behind one interface (:class:`DnsProvider`), and the propagation check."""

from gateway.certs.dns.base import CaaRecord, DnsProvider, NameServer, parse_server

__all__ = ["CaaRecord", "DnsProvider", "NameServer", "parse_server"]
