"""A WireGuard lab on one machine: a gateway namespace and simulated CVM namespaces."""
