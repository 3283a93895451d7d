"""The real TDX backend: Linux guest interfaces only (configfs-tsm, sysfs measurements).

Interfaces (paths relative to ``root``, ``/`` in production, a fake tree in tests):

- Quotes: configfs-tsm ``/sys/kernel/config/tsm/report/<entry>/``. The entry directory is
  created if absent. Under an exclusive ``flock`` on ``inblob`` we read ``generation``,
  write the 64-byte report data to ``inblob``, read ``outblob`` and read ``generation``
  again; it must have advanced by exactly one, or another writer raced us and we retry.
  ``provider`` (when present) must say ``tdx_guest``.
- RTMR extension: write the 48-byte digest to
  ``/sys/devices/virtual/misc/tdx_guest/measurements/rtmr3:sha384``; when that file is
  missing (kernels before 6.16), the ``/dev/tdx_guest`` ``TDX_CMD_EXTEND_RTMR`` ioctl.
- Register reads: ``measurements/{mrtd,rtmr0..3}:sha384`` (raw 48 bytes); when missing,
  the registers are read from a fresh quote (the TD report inside it is the hardware's).
- Runtime events: extend RTMR3, then append the line to
  ``/run/log/dstack/runtime_events.log`` (mode 0600), both under an exclusive ``flock`` on
  ``/run/log/dstack/runtime_event.lock`` (dstack's HEAD order and lock).

There is no TDX on the development machines, so tests drive this module against a fake
root whose configfs files are FIFOs served by a fake "kernel" thread.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
import time
from pathlib import Path

from gateway.protocol.errors import CodecError
from gateway.protocol.tdx_quote import parse_tdx_quote
from gateway.tee.base import REPORT_DATA_SIZE, RTMR_SIZE, RuntimeEvent, TeeError
from gateway.tee.eventlog import format_event_line, read_event_log

__all__ = ["TdxTee", "TDX_CMD_EXTEND_RTMR"]

TSM_REPORT_DIR = Path("sys/kernel/config/tsm/report")
MEASUREMENTS_DIR = Path("sys/devices/virtual/misc/tdx_guest/measurements")
TDX_GUEST_DEVICE = Path("dev/tdx_guest")
EVENT_LOG = Path("run/log/dstack/runtime_events.log")
EVENT_LOCK = Path("run/log/dstack/runtime_event.lock")
DEFAULT_REPORT_ENTRY = "com.intel.dcap"


def _ioc(direction: int, kind: str, number: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (ord(kind) << 8) | number


# struct tdx_extend_rtmr_req { __u8 data[48]; __u8 index; }, _IOR('T', 3, ...) as dstack uses.
TDX_CMD_EXTEND_RTMR = _ioc(2, "T", 3, RTMR_SIZE + 1)
_QUOTE_RETRIES = 5


class TdxTee:
    """TDX through the kernel's guest interfaces. Thread-safe; process-safe via ``flock``."""

    def __init__(self, root: Path = Path("/"), *, report_entry: str = DEFAULT_REPORT_ENTRY) -> None:
        if "/" in report_entry or report_entry in ("", ".", ".."):
            raise ValueError(f"bad configfs-tsm entry name {report_entry!r}")
        self._root = root
        self._entry = report_entry
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return "tdx"

    def _path(self, rel: Path) -> Path:
        return self._root / rel

    # --- quotes ----------------------------------------------------------------------------

    def _report_dir(self) -> Path:
        base = self._path(TSM_REPORT_DIR)
        if not base.is_dir():
            raise TeeError(
                f"{base} is missing: configfs-tsm is not available (is configfs mounted at "
                "/sys/kernel/config and is this a TDX guest with kernel >= 6.7?)"
            )
        entry = base / self._entry
        try:
            entry.mkdir(exist_ok=True)
        except OSError as exc:
            raise TeeError(f"cannot create configfs-tsm entry {entry}: {exc.strerror}") from None
        provider = entry / "provider"
        if provider.exists():
            name = provider.read_text().strip()
            if name != "tdx_guest":
                raise TeeError(f"configfs-tsm provider is {name!r}, not tdx_guest")
        return entry

    @staticmethod
    def _generation(entry: Path) -> int:
        try:
            return int((entry / "generation").read_text().strip())
        except (OSError, ValueError) as exc:
            raise TeeError(f"cannot read {entry / 'generation'}: {exc}") from None

    def get_quote(self, report_data: bytes) -> bytes:
        """A TDX quote over ``report_data`` (exactly 64 bytes) from configfs-tsm."""
        if not isinstance(report_data, bytes | bytearray) or len(report_data) != REPORT_DATA_SIZE:
            raise TeeError(f"report_data must be {REPORT_DATA_SIZE} bytes")
        entry = self._report_dir()
        with self._lock:
            for _ in range(_QUOTE_RETRIES):
                try:
                    fd = os.open(entry / "inblob", os.O_WRONLY)
                except OSError as exc:
                    raise TeeError(f"cannot open {entry / 'inblob'}: {exc.strerror}") from None
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    before = self._generation(entry)
                    if os.write(fd, bytes(report_data)) != REPORT_DATA_SIZE:
                        raise TeeError("short write to configfs-tsm inblob")
                    try:
                        quote = (entry / "outblob").read_bytes()
                    except OSError as exc:
                        raise TeeError(
                            f"reading {entry / 'outblob'} failed: {exc.strerror} (is the "
                            "quote generation service (QGS) reachable from the host?)"
                        ) from None
                    after = self._generation(entry)
                finally:
                    os.close(fd)
                if after == before + 1 and quote:
                    return quote
                time.sleep(0.01)  # another writer raced us between inblob and outblob
            raise TeeError(
                f"configfs-tsm generation kept changing under us ({_QUOTE_RETRIES} tries); "
                "another process is writing the same report entry without flock"
            )

    # --- registers -------------------------------------------------------------------------

    def _read_measurement(self, name: str) -> bytes | None:
        path = self._path(MEASUREMENTS_DIR / f"{name}:sha384")
        try:
            value = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise TeeError(f"cannot read {path}: {exc.strerror}") from None
        if len(value) != RTMR_SIZE:
            raise TeeError(f"{path} gave {len(value)} bytes, expected {RTMR_SIZE}")
        return value

    def _registers_from_quote(self) -> tuple[bytes, tuple[bytes, bytes, bytes, bytes]]:
        try:
            report = parse_tdx_quote(self.get_quote(bytes(REPORT_DATA_SIZE))).report
        except CodecError as exc:
            raise TeeError(f"configfs-tsm returned an unreadable quote: {exc}") from None
        return report.mr_td, report.rtmrs

    def rtmrs(self) -> tuple[bytes, bytes, bytes, bytes]:
        values = [self._read_measurement(f"rtmr{i}") for i in range(4)]
        if all(v is not None for v in values):
            return (values[0], values[1], values[2], values[3])  # type: ignore[return-value]
        return self._registers_from_quote()[1]

    def mrtd(self) -> bytes:
        value = self._read_measurement("mrtd")
        return value if value is not None else self._registers_from_quote()[0]

    # --- runtime events --------------------------------------------------------------------

    def extend_rtmr(self, index: int, digest: bytes) -> None:
        """Extend RTMR ``index`` (2 or 3) with a 48-byte digest."""
        if index not in (2, 3):
            raise TeeError(f"RTMR{index} cannot be extended from the guest (only 2 and 3)")
        if len(digest) != RTMR_SIZE:
            raise TeeError(f"an RTMR digest is {RTMR_SIZE} bytes")
        sysfs = self._path(MEASUREMENTS_DIR / f"rtmr{index}:sha384")
        if sysfs.exists():
            try:
                fd = os.open(sysfs, os.O_WRONLY)
                try:
                    if os.write(fd, digest) != RTMR_SIZE:
                        raise TeeError(f"short write to {sysfs}")
                finally:
                    os.close(fd)
            except OSError as exc:
                raise TeeError(
                    f"extending RTMR{index} via {sysfs} failed: {exc.strerror}"
                ) from None
            return
        device = self._path(TDX_GUEST_DEVICE)
        request = bytearray(struct.pack("<48sB", digest, index))
        try:
            fd = os.open(device, os.O_RDWR)
        except OSError as exc:
            raise TeeError(
                f"cannot extend RTMR{index}: neither {sysfs} nor {device} is usable "
                f"({exc.strerror})"
            ) from None
        try:
            fcntl.ioctl(fd, TDX_CMD_EXTEND_RTMR, request)
        except OSError as exc:
            hint = " (not a TDX guest device)" if exc.errno == errno.ENOTTY else ""
            raise TeeError(
                f"TDX_CMD_EXTEND_RTMR on {device} failed: {exc.strerror}{hint}"
            ) from None
        finally:
            os.close(fd)

    def emit_event(self, event: RuntimeEvent) -> None:
        """Extend RTMR3, then append to the event log, under dstack's runtime-event lock."""
        log = self._path(EVENT_LOG)
        log.parent.mkdir(parents=True, exist_ok=True)
        with self._lock, open(self._path(EVENT_LOCK), "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self.extend_rtmr(3, event.digest())
                fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, format_event_line(event))
                finally:
                    os.close(fd)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def runtime_events(self) -> tuple[RuntimeEvent, ...]:
        """The logged runtime events, read under a shared lock (never a half-written line)."""
        log = self._path(EVENT_LOG)
        if not log.exists():
            return ()
        try:
            with open(self._path(EVENT_LOCK), "a+b") as lock:
                fcntl.flock(lock, fcntl.LOCK_SH)
                try:
                    data = log.read_bytes()
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
        except OSError as exc:
            raise TeeError(f"cannot read {log}: {exc.strerror}") from None
        return read_event_log(data)
