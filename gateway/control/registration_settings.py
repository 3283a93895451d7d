"""The ``[rpc]`` section: the main RPC listener CVMs register through (upstream top level)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RpcSettings"]


@dataclass(frozen=True, slots=True)
class RpcSettings:
    """Where ``/prpc/RegisterCvm`` and ``/prpc/Info`` are served, over TLS.

    ``cert_file``/``key_file``: the listener's certificate (PEM). ``client_ca_file``: the CA
    CVM client certificates must chain to at the TLS layer (dstack: the KMS CA); empty means
    no client certificates are requested and RegisterCvm answers 401. ``url`` is how CVMs
    and peers reach this listener, reported in ``gateways``.
    """

    address: str = "127.0.0.1"
    port: int = 8010
    cert_file: str = ""
    key_file: str = ""
    client_ca_file: str = ""
    url: str = "https://localhost:8010"

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"rpc.port {self.port} is not a port")
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("rpc.cert_file and rpc.key_file go together")
