"""Errors of the certificate plane, typed so callers branch on fields, never on message text.

``CertError`` is the root. ``IssuanceError`` says which base domain failed and what the CA (or
the path to it) reported: ``problem`` is the ACME problem type URN when the CA sent one
(``urn:ietf:params:acme:error:unauthorized`` ...) or one of the ``PROBLEM_*`` codes below when
the failure happened on our side. ``DnsProviderError`` names the zone and the DNS rcode (or
the provider's HTTP status) so an operator knows which credential or ACL to fix.
"""

from __future__ import annotations

__all__ = [
    "PROBLEM_CA_UNREACHABLE",
    "PROBLEM_DNS_PROPAGATION",
    "PROBLEM_INVALID_RESPONSE",
    "PROBLEM_TIMEOUT",
    "CertError",
    "DnsProviderError",
    "IssuanceError",
]

#: the ACME directory or one of its URLs could not be reached (connect/TLS/HTTP failure)
PROBLEM_CA_UNREACHABLE = "gateway:ca-unreachable"
#: the deadline passed before the order completed
PROBLEM_TIMEOUT = "gateway:timeout"
#: the authoritative servers did not all show the challenge TXT values before the deadline
PROBLEM_DNS_PROPAGATION = "gateway:dns-propagation"
#: the CA answered something we could not use (no DNS-01 challenge, bad certificate, ...)
PROBLEM_INVALID_RESPONSE = "gateway:invalid-response"


class CertError(Exception):
    """Root of every certificate-plane error."""


class IssuanceError(CertError):
    """Obtaining a certificate for ``domain`` failed; ``problem`` says why (see module doc)."""

    def __init__(self, domain: str, problem: str, detail: str = "") -> None:
        self.domain = domain
        self.problem = problem
        self.detail = detail
        text = f"issuing a certificate for {domain} failed: {problem}"
        if detail:
            text += f": {detail}"
        super().__init__(text)


class DnsProviderError(CertError):
    """A DNS provider refused or failed a change in ``zone``.

    ``rcode`` is the DNS rcode or TSIG error name (``REFUSED``, ``NOTAUTH``, ``BADSIG``,
    ``BADKEY``), ``HTTP <status>`` for REST providers, or ``None`` for transport failures.
    """

    def __init__(self, zone: str, rcode: str | None, detail: str = "") -> None:
        self.zone = zone
        self.rcode = rcode
        self.detail = detail
        text = f"DNS update in zone {zone} failed"
        if rcode:
            text += f" ({rcode})"
        if detail:
            text += f": {detail}"
        super().__init__(text)
