"""The real TDX backend against a fake filesystem root.

configfs-tsm's ``inblob``/``outblob`` are FIFOs served by a fake "kernel" thread: it reads
the 64 report-data bytes, advances ``generation`` and answers with a quote forged by the
simulated PKI over that report data. So the backend's real open/flock/write/read sequence
runs unchanged; only the kernel behind the files is ours.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.attest.quote import verify_quote
from gateway.protocol.tdx_quote import parse_tdx_quote
from gateway.tee.base import RuntimeEvent, TeeBackend, TeeError
from gateway.tee.sim_pki import SimPki
from gateway.tee.tdx import TDX_CMD_EXTEND_RTMR, TdxTee

NOW = int(time.time())
MRTD = hashlib.sha384(b"mrtd").digest()
RTMRS = [hashlib.sha384(b"rtmr%d" % i).digest() for i in range(4)]


@pytest.fixture(scope="module")
def pki() -> SimPki:
    return SimPki.create(not_before=NOW - 86400)


class FakeKernel:
    """Serves one configfs-tsm report entry; ``race_once`` simulates a concurrent writer."""

    def __init__(self, entry: Path, pki: SimPki) -> None:
        self.entry = entry
        self.pki = pki
        self.generation = 0
        self.requests: list[bytes] = []
        self.race_once = False
        self.stop = False
        entry.mkdir(parents=True)
        os.mkfifo(entry / "inblob")
        os.mkfifo(entry / "outblob")
        (entry / "provider").write_text("tdx_guest\n")
        (entry / "generation").write_text("0\n")
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            with open(self.entry / "inblob", "rb") as f:
                data = f.read(64)
            if self.stop:
                return
            if len(data) != 64:
                continue
            self.requests.append(data)
            self.generation += 2 if self.race_once else 1
            self.race_once = False
            (self.entry / "generation").write_text(f"{self.generation}\n")
            quote = self.pki.forge_quote(data, mr_td=MRTD, rtmrs=RTMRS)
            with open(self.entry / "outblob", "wb") as f:
                f.write(quote)

    def close(self) -> None:
        self.stop = True
        fd = os.open(self.entry / "inblob", os.O_WRONLY)  # wakes the reader with EOF
        os.close(fd)
        self.thread.join(5)


@pytest.fixture
def fake_root(tmp_path: Path, pki: SimPki) -> Iterator[tuple[Path, FakeKernel]]:
    kernel = FakeKernel(tmp_path / "sys/kernel/config/tsm/report/com.intel.dcap", pki)
    try:
        yield tmp_path, kernel
    finally:
        kernel.close()


def _measurements(root: Path) -> Path:
    d = root / "sys/devices/virtual/misc/tdx_guest/measurements"
    d.mkdir(parents=True)
    (d / "mrtd:sha384").write_bytes(MRTD)
    for i, value in enumerate(RTMRS):
        (d / f"rtmr{i}:sha384").write_bytes(value)
    return d


def test_tdx_tee_is_a_tee_backend(tmp_path: Path) -> None:
    tee = TdxTee(tmp_path)
    assert isinstance(tee, TeeBackend) and tee.name == "tdx"


def test_quote_through_configfs_tsm(fake_root: tuple[Path, FakeKernel], pki: SimPki) -> None:
    root, kernel = fake_root
    tee = TdxTee(root)
    rd = hashlib.sha512(b"bind me").digest()
    quote = tee.get_quote(rd)
    assert kernel.requests == [rd]
    assert parse_tdx_quote(quote).report.report_data == rd
    v = verify_quote(quote, pki.collateral(NOW), root_ca_der=pki.root_ca_der, now=NOW)
    assert v.mr_td == MRTD


def test_generation_race_is_retried(fake_root: tuple[Path, FakeKernel]) -> None:
    root, kernel = fake_root
    kernel.race_once = True
    quote = TdxTee(root).get_quote(bytes(64))
    assert len(kernel.requests) == 2  # the first answer was discarded
    assert parse_tdx_quote(quote).report.report_data == bytes(64)


def test_registers_fall_back_to_a_quote_without_sysfs(fake_root: tuple[Path, FakeKernel]) -> None:
    root, kernel = fake_root
    tee = TdxTee(root)
    assert tee.rtmrs() == tuple(RTMRS)
    assert tee.mrtd() == MRTD
    assert kernel.requests[-1] == bytes(64)


def test_registers_from_sysfs(tmp_path: Path) -> None:
    _measurements(tmp_path)
    tee = TdxTee(tmp_path)
    assert tee.rtmrs() == tuple(RTMRS)
    assert tee.mrtd() == MRTD


def test_emit_event_writes_digest_to_sysfs_and_appends_log(tmp_path: Path) -> None:
    d = _measurements(tmp_path)
    tee = TdxTee(tmp_path)
    events = [RuntimeEvent("system-preparing", b""), RuntimeEvent("app-id", b"\x01" * 20)]
    for e in events:
        tee.emit_event(e)
    # The fake sysfs file holds the last digest written (the kernel would extend with it).
    assert (d / "rtmr3:sha384").read_bytes() == events[-1].digest()
    assert tee.runtime_events() == tuple(events)
    log = tmp_path / "run/log/dstack/runtime_events.log"
    assert log.read_text().splitlines()[0] == '{"event":"system-preparing","payload":""}'
    assert log.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "run/log/dstack/runtime_event.lock").exists()


def test_emit_event_without_any_interface_fails_and_logs_nothing(tmp_path: Path) -> None:
    tee = TdxTee(tmp_path)
    with pytest.raises(TeeError, match="neither"):
        tee.emit_event(RuntimeEvent("x", b""))
    assert tee.runtime_events() == ()


def test_ioctl_fallback_on_a_non_tdx_device_fails_clearly(tmp_path: Path) -> None:
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev/tdx_guest").write_bytes(b"")
    with pytest.raises(TeeError, match="TDX_CMD_EXTEND_RTMR"):
        TdxTee(tmp_path).extend_rtmr(3, bytes(48))
    assert TDX_CMD_EXTEND_RTMR == 0x80315403


def test_only_rtmr2_and_3_are_extensible(tmp_path: Path) -> None:
    with pytest.raises(TeeError, match="only 2 and 3"):
        TdxTee(tmp_path).extend_rtmr(0, bytes(48))


def test_missing_configfs_is_explained(tmp_path: Path) -> None:
    with pytest.raises(TeeError, match="configfs-tsm is not available"):
        TdxTee(tmp_path).get_quote(bytes(64))


def test_wrong_provider_is_refused(tmp_path: Path) -> None:
    entry = tmp_path / "sys/kernel/config/tsm/report/com.intel.dcap"
    entry.mkdir(parents=True)
    (entry / "provider").write_text("sev_guest\n")
    with pytest.raises(TeeError, match="sev_guest"):
        TdxTee(tmp_path).get_quote(bytes(64))


def test_bad_report_data_and_entry_names(tmp_path: Path) -> None:
    with pytest.raises(TeeError, match="64 bytes"):
        TdxTee(tmp_path).get_quote(b"x")
    with pytest.raises(ValueError):
        TdxTee(tmp_path, report_entry="../x")
