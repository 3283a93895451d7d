"""The boot and the agent on the real TDX backend, against a fake kernel tree.

No TDX here: ``TdxTee`` runs against the configfs-tsm/sysfs fake from ``tests/tee`` (its
"kernel" answers quotes from the simulated PKI and does not extend RTMR3 itself).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.guest.boot import Boot, load_state
from gateway.guest.keys import NoneKeyProvider
from gateway.guest.service import AgentService
from gateway.tee.sim_pki import SimPki
from gateway.tee.tdx import TdxTee
from tests.tee.test_tdx import FakeKernel, _measurements


@pytest.fixture
def tdx_root(tmp_path: Path, sim_pki: SimPki) -> Iterator[Path]:
    root = tmp_path / "root"
    kernel = FakeKernel(root / "sys/kernel/config/tsm/report/com.intel.dcap", sim_pki)
    _measurements(root)
    try:
        yield root
    finally:
        kernel.close()


def test_boot_and_agent_on_tdx_tee(tmp_path: Path, tdx_root: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    compose = {"manifest_version": 2, "name": "tdx-app", "runner": "bash", "key_provider": "none"}
    (shared / "app-compose.json").write_text(json.dumps(compose))
    (shared / ".sys-config.json").write_text("{}")
    tee = TdxTee(tdx_root)
    work = tmp_path / "work"
    result = asyncio.run(Boot(shared, work, tee, key_provider=lambda c: NoneKeyProvider()).run())
    log = (tdx_root / "run/log/dstack/runtime_events.log").read_text().splitlines()
    assert [json.loads(line)["event"] for line in log] == [
        "system-preparing", "app-id", "compose-hash", "instance-id", "boot-mr-done",
        "key-provider", "storage-fs", "system-ready",
    ]  # fmt: skip
    # the last digest written to the RTMR3 sysfs file is system-ready's
    rtmr3_file = tdx_root / "sys/devices/virtual/misc/tdx_guest/measurements/rtmr3:sha384"
    assert rtmr3_file.read_bytes() == tee.runtime_events()[-1].digest()
    svc = AgentService(load_state(work), tee)
    info = svc.info()
    assert info["app_id"] == result.app_id.hex() and info["app_name"] == "tdx-app"
    quote = asyncio.run(svc.get_quote(b"hello"))
    assert quote["report_data"].startswith(b"hello".hex())
