"""Whether a worker routes custom domains, and the resolver it does it with.

Each worker process builds its own :class:`AppAddressResolver` (its cache and in-flight
lookups live on that worker's loop; nothing is shared across processes). Custom domains are
routed only when ``proxy.custom_domains`` is on and ``dns.resolver.nameservers`` names the
servers to ask: a gateway must not start sending its customers' names to whatever resolver
the host happens to have, so without them every custom domain is refused with reason
``custom_domain`` (and a detail saying which keys to set).
"""

from __future__ import annotations

from gateway.certs.custom_domains import AppAddressResolver
from gateway.certs.settings import ResolverSettings
from gateway.proxy.settings import ProxySettings

__all__ = ["make_resolver"]


def make_resolver(
    proxy: ProxySettings, resolver: ResolverSettings | None
) -> AppAddressResolver | None:
    """The worker's resolver for custom domains, or ``None`` when they are off."""
    if not proxy.custom_domains or resolver is None or not resolver.nameservers:
        return None
    return AppAddressResolver(resolver)
