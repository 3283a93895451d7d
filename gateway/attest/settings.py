"""The ``[attest]`` section: how the gateway verifies TDX quotes.

The trust anchor defaults to Intel's SGX Root CA. Accepting simulated quotes needs the
simulated PKI's root named here explicitly (a DER or PEM file); the gateway then logs a
WARNING at start-up that it trusts a non-Intel root. There is no switch that turns
verification off.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gateway.attest.tcb import TcbPolicy, TcbStatus


@dataclass(frozen=True, slots=True)
class AttestSettings:
    """Quote verification settings.

    ``root_ca``: ``"intel"`` or the path of a DER/PEM root certificate (a simulated PKI's
    ``root.der``). ``collateral_source``: ``pccs`` fetches from ``pccs_url`` (a PCCS, or
    Intel's PCS) and caches per FMSPC in ``cache_dir`` until the collateral's nextUpdate;
    ``file`` reads ``collateral_file`` (offline; dcap-qvl's collateral JSON).
    ``allowed_tcb_statuses``: statuses admitted besides ``UpToDate`` is implied; ``Revoked``
    is refused. ``verification_time``: 0 = the clock; a unix time re-verifies as of then
    (audits only).
    """

    root_ca: str = "intel"
    collateral_source: Literal["pccs", "file"] = "pccs"
    pccs_url: str = "https://api.trustedservices.intel.com"
    collateral_file: str = ""
    cache_dir: Path = Path("/var/lib/gateway/collateral")
    fetch_timeout: float = 30.0
    refresh_margin: int = 3600
    allowed_tcb_statuses: tuple[str, ...] = ("UpToDate",)
    verification_time: int = 0

    def __post_init__(self) -> None:
        if not self.root_ca:
            raise ValueError("root_ca must be 'intel' or the path of a root certificate")
        if self.collateral_source == "file" and not self.collateral_file:
            raise ValueError("collateral_source = 'file' needs collateral_file")
        if self.collateral_source == "pccs" and not self.pccs_url.startswith(
            ("https://", "http://")
        ):
            raise ValueError(f"pccs_url {self.pccs_url!r} is not an http(s) URL")
        if self.fetch_timeout <= 0:
            raise ValueError("fetch_timeout must be positive")
        if self.refresh_margin < 0 or self.verification_time < 0:
            raise ValueError("refresh_margin and verification_time are >= 0")
        if TcbStatus.REVOKED.value in self.allowed_tcb_statuses:
            raise ValueError("allowed_tcb_statuses: 'Revoked' can never be allowed")
        TcbPolicy.from_names(self.allowed_tcb_statuses)  # raises ValueError naming the bad one

    @property
    def uses_intel_root(self) -> bool:
        return self.root_ca == "intel"

    def tcb_policy(self) -> TcbPolicy:
        return TcbPolicy.from_names(self.allowed_tcb_statuses)
