"""The ``[rpc]`` section: the main RPC listener CVMs register through (upstream top level)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RpcSettings"]


@dataclass(frozen=True, slots=True)
class RpcSettings:
    """Where ``/prpc/RegisterCvm`` and ``/prpc/Info`` are served, over TLS.

    ``cert_file``/``key_file``: the listener's certificate (PEM). Client certificates are
    always requested and judged by their evidence: a self-signed RA-TLS certificate, or,
    when ``kms_root_file`` (PEM) is set, a chain to that KMS root carrying app info (dstack
    compatibility). ``client_ca_file``, optional, additionally requires client chains to
    verify to that CA at the TLS layer. ``handshake_timeout`` (seconds) bounds a TLS
    handshake. ``url`` is how CVMs and peers reach this listener, reported in ``gateways``.
    ``enabled = false`` runs no registration RPC and no tunnel on this node even when it has
    an identity (a proxy + operator-plane or certbot-only node); the TEE named in
    ``[rpc_identity]`` still backs ``/app-info`` and quote-bound certificate keys.
    """

    enabled: bool = True
    address: str = "127.0.0.1"
    port: int = 8010
    cert_file: str = ""
    key_file: str = ""
    client_ca_file: str = ""
    kms_root_file: str = ""
    handshake_timeout: float = 10.0
    url: str = "https://localhost:8010"

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"rpc.port {self.port} is not a port")
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("rpc.cert_file and rpc.key_file go together")
        if not 0 < self.handshake_timeout <= 300:
            raise ValueError("rpc.handshake_timeout must be in (0, 300] seconds")
