"""The ``[rpc_identity]`` section: the RPC listener's certificate made through our own TEE."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RpcIdentitySettings"]


@dataclass(frozen=True, slots=True)
class RpcIdentitySettings:
    """``tee`` = ``"tdx"`` (in a CVM) or ``"sim"`` (lab; state in ``sim_dir``: ``pki/`` and
    ``tee/``) makes the RPC certificate an RA-TLS certificate bound to this gateway's quote,
    which CVMs verify before registering; ``""`` uses ``[rpc] cert_file``/``key_file``.
    Files go to ``directory`` (default ``<data_dir>/rpc-identity``); a certificate lives
    ``validity_days`` and is re-issued ``renew_before_hours`` before it expires.
    """

    tee: str = ""
    sim_dir: str = ""
    directory: str = ""
    validity_days: int = 7
    renew_before_hours: int = 24
    alt_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.tee not in ("", "sim", "tdx"):
            raise ValueError(f"rpc_identity.tee must be '', 'sim' or 'tdx', not {self.tee!r}")
        if self.tee == "sim" and not self.sim_dir:
            raise ValueError("rpc_identity.tee = 'sim' needs rpc_identity.sim_dir")
        if self.validity_days < 1 or self.renew_before_hours < 1:
            raise ValueError("rpc_identity: validity_days and renew_before_hours must be >= 1")
        if self.renew_before_hours >= self.validity_days * 24:
            raise ValueError("rpc_identity.renew_before_hours must be shorter than the validity")
