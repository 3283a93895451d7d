"""TCB statuses and the gateway's own policy over them (no dcap-qvl import: config uses it).

dcap-qvl raises only for ``Revoked``; every other status comes back as a successful
verification. Which of them the gateway admits is our decision, made here after the
cryptographic verification: ``UpToDate`` by default, others only when named in the
configuration, ``Revoked`` never.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass


class TcbStatus(enum.StrEnum):
    """The TCB statuses Intel's TCB info and QE identity assign (dcap-qvl's spelling)."""

    UP_TO_DATE = "UpToDate"
    SW_HARDENING_NEEDED = "SWHardeningNeeded"
    CONFIGURATION_NEEDED = "ConfigurationNeeded"
    CONFIGURATION_AND_SW_HARDENING_NEEDED = "ConfigurationAndSWHardeningNeeded"
    OUT_OF_DATE = "OutOfDate"
    OUT_OF_DATE_CONFIGURATION_NEEDED = "OutOfDateConfigurationNeeded"
    REVOKED = "Revoked"


@dataclass(frozen=True, slots=True)
class TcbPolicy:
    """The TCB statuses the gateway admits. ``UpToDate`` is always admitted."""

    allowed: frozenset[TcbStatus] = frozenset({TcbStatus.UP_TO_DATE})

    def __post_init__(self) -> None:
        if TcbStatus.REVOKED in self.allowed:
            raise ValueError("the TCB status 'Revoked' can never be allowed")
        object.__setattr__(self, "allowed", frozenset(self.allowed) | {TcbStatus.UP_TO_DATE})

    @classmethod
    def from_names(cls, names: Iterable[str]) -> TcbPolicy:
        """Build from status names as written in config/CLI; raises ``ValueError`` naming
        the unknown one and listing the valid names."""
        allowed: set[TcbStatus] = set()
        for name in names:
            try:
                allowed.add(TcbStatus(name))
            except ValueError:
                valid = ", ".join(s.value for s in TcbStatus if s is not TcbStatus.REVOKED)
                raise ValueError(f"unknown TCB status {name!r}; valid: {valid}") from None
        return cls(frozenset(allowed))

    def admits(self, status: TcbStatus) -> bool:
        return status is not TcbStatus.REVOKED and status in self.allowed
