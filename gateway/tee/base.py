"""The TEE backend interface: what a CVM can ask of its trusted execution environment.

Two implementations: ``gateway.tee.tdx`` (configfs-tsm quotes, RTMR sysfs/ioctl) and
``gateway.tee.sim`` (a simulated TDX with its own test PKI whose quotes verify through the
very same dcap-qvl path under an injected root). The guest shim, the guest agent and the
gateway's own RA-TLS server certificate all go through this interface, so nothing above it
knows which one runs.

RTMR semantics (both backends): ``RTMR[i] = SHA384(RTMR[i] || digest48)`` from 48 zero
bytes; only RTMR2 and RTMR3 are extensible from the guest. Runtime events are dstack's V1
events: ``digest = SHA384(u32_le(0x08000001) || b":" || name || b":" || payload)``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

DSTACK_RUNTIME_EVENT_TYPE = 0x08000001
REPORT_DATA_SIZE = 64
RTMR_SIZE = 48


class TeeError(Exception):
    """The TEE refused or failed an operation; the message says which interface and why."""


@dataclass(frozen=True, slots=True)
class RuntimeEvent:
    """One dstack runtime event (V1 digest), as logged and replayed into RTMR3."""

    name: str
    payload: bytes

    def digest(self) -> bytes:
        """The 48-byte V1 digest that extends RTMR3."""
        h = hashlib.sha384()
        h.update(DSTACK_RUNTIME_EVENT_TYPE.to_bytes(4, "little"))
        h.update(b":")
        h.update(self.name.encode("utf-8"))
        h.update(b":")
        h.update(self.payload)
        return h.digest()


def extend(rtmr: bytes, digest: bytes) -> bytes:
    """One RTMR extend step: ``SHA384(rtmr || digest)``."""
    if len(rtmr) != RTMR_SIZE or len(digest) != RTMR_SIZE:
        raise ValueError("RTMR values and digests are 48 bytes")
    return hashlib.sha384(rtmr + digest).digest()


def replay(events: list[RuntimeEvent] | tuple[RuntimeEvent, ...]) -> bytes:
    """RTMR3 after extending the V1 digests of ``events`` in order from zero."""
    mr = bytes(RTMR_SIZE)
    for event in events:
        mr = extend(mr, event.digest())
    return mr


@runtime_checkable
class TeeBackend(Protocol):
    """What the guest side needs from its TEE. Implementations are thread-safe."""

    @property
    def name(self) -> str:
        """``tdx`` or ``sim`` (shown in Info and logs)."""
        ...

    def get_quote(self, report_data: bytes) -> bytes:
        """A TDX v4 quote whose report_data is ``report_data`` (exactly 64 bytes)."""
        ...

    def emit_event(self, event: RuntimeEvent) -> None:
        """Extend RTMR3 with ``event.digest()`` and append it to the event log, atomically."""
        ...

    def runtime_events(self) -> tuple[RuntimeEvent, ...]:
        """The runtime events emitted so far (since boot), in order."""
        ...

    def rtmrs(self) -> tuple[bytes, bytes, bytes, bytes]:
        """Current RTMR0..RTMR3 (48 bytes each)."""
        ...

    def mrtd(self) -> bytes:
        """The TD's MRTD (48 bytes)."""
        ...
