"""The simulated TDX: a real :class:`~gateway.tee.base.TeeBackend` for machines without TDX.

It behaves like the guest side of a TD, with the hardware replaced by files and a test PKI:

- MRTD and RTMR0..2 are fixed by the simulated image (:class:`SimImage`), as firmware and
  kernel measurements are fixed by a real image;
- RTMR3 starts at zero and is extended by :meth:`SimTee.emit_event`, which also appends the
  event to the runtime event log, both under one exclusive ``flock`` so that the separate
  processes of one CVM (shim, agent, app) agree, exactly as dstack's
  ``/run/log/dstack/runtime_event.lock`` serialises extend + append;
- :meth:`SimTee.get_quote` returns a TDX v4 quote carrying the current registers, signed
  through :class:`~gateway.tee.sim_pki.SimPki`'s chain. dcap-qvl verifies it under that
  PKI's root and rejects it under Intel's.

State directory layout (one per simulated CVM)::

    rtmr3                 48 raw bytes, the current RTMR3
    runtime_events.log    JSON lines {"event": name, "payload": base64}, dstack's format
    runtime_event.lock    the lock file
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from gateway.tee.base import REPORT_DATA_SIZE, RTMR_SIZE, RuntimeEvent, TeeError, extend
from gateway.tee.eventlog import format_event_line, read_event_log
from gateway.tee.sim_pki import DEFAULT_TD_ATTRIBUTES, SimPki

__all__ = ["SimImage", "SimTee", "read_event_log", "format_event_line"]

RTMR3_FILE = "rtmr3"
EVENT_LOG_FILE = "runtime_events.log"
LOCK_FILE = "runtime_event.lock"


def _measure(image: str, register: str) -> bytes:
    return hashlib.sha384(f"gateway-sim-image:{image}:{register}".encode()).digest()


@dataclass(frozen=True, slots=True)
class SimImage:
    """Boot-time measurements of a simulated image (what the firmware would have measured).

    :meth:`named` derives them from the image name, so two CVMs of one image agree and a
    different image differs, which is what admission policies on MRTD/RTMR0..2 need.
    """

    name: str
    mr_td: bytes
    rt_mr0: bytes
    rt_mr1: bytes
    rt_mr2: bytes
    mr_config_id: bytes = bytes(48)
    mr_owner: bytes = bytes(48)
    mr_owner_config: bytes = bytes(48)
    td_attributes: bytes = DEFAULT_TD_ATTRIBUTES

    def __post_init__(self) -> None:
        for field in ("mr_td", "rt_mr0", "rt_mr1", "rt_mr2", "mr_config_id", "mr_owner"):
            if len(getattr(self, field)) != RTMR_SIZE:
                raise ValueError(f"SimImage.{field} must be {RTMR_SIZE} bytes")
        if len(self.mr_owner_config) != RTMR_SIZE or len(self.td_attributes) != 8:
            raise ValueError("SimImage.mr_owner_config is 48 bytes, td_attributes 8")

    @classmethod
    def named(cls, name: str = "dstack-sim", *, mr_config_id: bytes = bytes(48)) -> SimImage:
        return cls(
            name=name,
            mr_td=_measure(name, "mrtd"),
            rt_mr0=_measure(name, "rtmr0"),
            rt_mr1=_measure(name, "rtmr1"),
            rt_mr2=_measure(name, "rtmr2"),
            mr_config_id=mr_config_id,
        )


class SimTee:
    """The simulated TDX backend for one CVM (state in ``state_dir``). Thread-safe, and
    process-safe for processes sharing ``state_dir``."""

    def __init__(self, pki: SimPki, state_dir: Path, image: SimImage | None = None) -> None:
        self._pki = pki
        self._dir = state_dir
        self._image = image if image is not None else SimImage.named()
        self._lock = threading.Lock()
        state_dir.mkdir(parents=True, exist_ok=True)

    @classmethod
    def open(cls, pki_dir: Path, state_dir: Path, image: SimImage | None = None) -> SimTee:
        """Share the PKI in ``pki_dir`` (created on first use) with the gateway and peers."""
        return cls(SimPki.load_or_create(pki_dir), state_dir, image)

    @property
    def name(self) -> str:
        return "sim"

    @property
    def pki(self) -> SimPki:
        return self._pki

    @property
    def image(self) -> SimImage:
        return self._image

    @property
    def state_dir(self) -> Path:
        return self._dir

    @contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        with self._lock, open(self._dir / LOCK_FILE, "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read_rtmr3(self) -> bytes:
        try:
            value = (self._dir / RTMR3_FILE).read_bytes()
        except FileNotFoundError:
            return bytes(RTMR_SIZE)
        if len(value) != RTMR_SIZE:
            raise TeeError(f"{self._dir / RTMR3_FILE} is corrupt ({len(value)} bytes)")
        return value

    def emit_event(self, event: RuntimeEvent) -> None:
        """Extend RTMR3 with the event's digest, then append it to the log (dstack HEAD order),
        atomically with respect to every other emitter of this CVM."""
        digest = event.digest()
        with self._locked(exclusive=True):
            new = extend(self._read_rtmr3(), digest)
            tmp = self._dir / (RTMR3_FILE + ".tmp")
            tmp.write_bytes(new)
            os.replace(tmp, self._dir / RTMR3_FILE)
            fd = os.open(self._dir / EVENT_LOG_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, format_event_line(event))
            finally:
                os.close(fd)

    def runtime_events(self) -> tuple[RuntimeEvent, ...]:
        with self._locked(exclusive=False):
            try:
                data = (self._dir / EVENT_LOG_FILE).read_bytes()
            except FileNotFoundError:
                return ()
        return read_event_log(data)

    def rtmrs(self) -> tuple[bytes, bytes, bytes, bytes]:
        with self._locked(exclusive=False):
            rtmr3 = self._read_rtmr3()
        img = self._image
        return (img.rt_mr0, img.rt_mr1, img.rt_mr2, rtmr3)

    def mrtd(self) -> bytes:
        return self._image.mr_td

    def get_quote(self, report_data: bytes) -> bytes:
        """A quote over the current registers; ``report_data`` must be exactly 64 bytes."""
        if not isinstance(report_data, bytes | bytearray) or len(report_data) != REPORT_DATA_SIZE:
            raise TeeError(f"report_data must be {REPORT_DATA_SIZE} bytes")
        img = self._image
        return self._pki.forge_quote(
            bytes(report_data),
            mr_td=img.mr_td,
            rtmrs=self.rtmrs(),
            td_attributes=img.td_attributes,
            mr_config_id=img.mr_config_id,
            mr_owner=img.mr_owner,
            mr_owner_config=img.mr_owner_config,
        )
