from __future__ import annotations

import base64
import json
import multiprocessing
import time
from pathlib import Path

import pytest

from gateway.attest.quote import verify_quote
from gateway.protocol.tdx_quote import parse_tdx_quote
from gateway.tee.base import RuntimeEvent, TeeBackend, TeeError, replay
from gateway.tee.sim import SimImage, SimTee, read_event_log
from gateway.tee.sim_pki import SimPki

NOW = int(time.time())


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    SimPki.load_or_create(d, not_before=NOW - 86400)
    return d


def test_sim_tee_is_a_tee_backend(pki_dir: Path, tmp_path: Path) -> None:
    tee = SimTee.open(pki_dir, tmp_path / "cvm")
    assert isinstance(tee, TeeBackend)
    assert tee.name == "sim"


def test_fresh_tee_has_image_registers_and_zero_rtmr3(pki_dir: Path, tmp_path: Path) -> None:
    image = SimImage.named("app-image")
    tee = SimTee.open(pki_dir, tmp_path / "cvm", image)
    assert tee.mrtd() == image.mr_td
    assert tee.rtmrs() == (image.rt_mr0, image.rt_mr1, image.rt_mr2, bytes(48))
    assert tee.runtime_events() == ()
    assert SimImage.named("app-image") == image != SimImage.named("other")


def test_emit_event_extends_rtmr3_and_logs_in_dstack_format(pki_dir: Path, tmp_path: Path) -> None:
    tee = SimTee.open(pki_dir, tmp_path / "cvm")
    events = [RuntimeEvent("system-preparing", b""), RuntimeEvent("app-id", b"\x5b" * 20)]
    for e in events:
        tee.emit_event(e)
    assert tee.runtime_events() == tuple(events)
    assert tee.rtmrs()[3] == replay(events)
    lines = (tmp_path / "cvm" / "runtime_events.log").read_text().splitlines()
    assert json.loads(lines[1]) == {"event": "app-id",
                                    "payload": base64.b64encode(b"\x5b" * 20).decode()}  # fmt: skip
    assert (tmp_path / "cvm" / "runtime_events.log").stat().st_mode & 0o777 == 0o600


def test_quote_carries_current_registers_and_verifies(pki_dir: Path, tmp_path: Path) -> None:
    tee = SimTee.open(pki_dir, tmp_path / "cvm")
    tee.emit_event(RuntimeEvent("compose-hash", b"\x01" * 32))
    rd = bytes(range(64))
    quote = tee.get_quote(rd)
    parsed = parse_tdx_quote(quote).report
    assert parsed.report_data == rd
    assert parsed.rtmrs == tee.rtmrs()
    assert parsed.mr_td == tee.mrtd()
    v = verify_quote(quote, tee.pki.collateral(NOW), root_ca_der=tee.pki.root_ca_der, now=NOW)
    assert v.rt_mr3 == replay(tee.runtime_events())


def test_bad_report_data_refused(pki_dir: Path, tmp_path: Path) -> None:
    tee = SimTee.open(pki_dir, tmp_path / "cvm")
    with pytest.raises(TeeError, match="64 bytes"):
        tee.get_quote(b"short")


def test_state_survives_a_new_instance(pki_dir: Path, tmp_path: Path) -> None:
    SimTee.open(pki_dir, tmp_path / "cvm").emit_event(RuntimeEvent("x", b"1"))
    again = SimTee.open(pki_dir, tmp_path / "cvm")
    assert again.runtime_events() == (RuntimeEvent("x", b"1"),)
    assert again.rtmrs()[3] == replay([RuntimeEvent("x", b"1")])


def _emit_many(pki_dir: str, state_dir: str, tag: str, n: int) -> None:
    tee = SimTee.open(Path(pki_dir), Path(state_dir))
    for i in range(n):
        tee.emit_event(RuntimeEvent(f"{tag}-{i}", tag.encode()))


def test_processes_of_one_cvm_agree(pki_dir: Path, tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_emit_many, args=(str(pki_dir), str(tmp_path / "cvm"), tag, 25))
        for tag in ("a", "b", "c")
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    tee = SimTee.open(pki_dir, tmp_path / "cvm")
    events = tee.runtime_events()
    assert len(events) == 75
    assert tee.rtmrs()[3] == replay(events)  # the log order is the extend order


def _load_root(pki_dir: str, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    out.put(SimPki.load_or_create(Path(pki_dir)).root_ca_der)


def test_concurrent_first_start_shares_one_root(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    q: multiprocessing.Queue[bytes] = ctx.Queue()
    procs = [ctx.Process(target=_load_root, args=(str(tmp_path / "pki"), q)) for _ in range(3)]
    for p in procs:
        p.start()
    roots = {q.get(timeout=60) for _ in procs}
    for p in procs:
        p.join(60)
    assert len(roots) == 1
    assert SimPki.load(tmp_path / "pki").root_ca_der in roots
    assert (tmp_path / "pki" / "root.key").stat().st_mode & 0o777 == 0o600


def test_corrupt_log_is_reported_with_its_line() -> None:
    with pytest.raises(TeeError, match="line 2"):
        read_event_log(b'{"event":"a","payload":""}\nnot json\n')
    assert read_event_log(b'{"event":"a","payload":"AQ=="}\n\n') == (RuntimeEvent("a", b"\x01"),)


def test_forge_quote_argument_errors_are_value_errors(pki_dir: Path) -> None:
    pki = SimPki.load(pki_dir)
    with pytest.raises(ValueError, match="report_data"):
        pki.forge_quote(b"x")
    with pytest.raises(ValueError, match="mr_td must be 48 bytes"):
        pki.forge_quote(bytes(64), mr_td=b"short")
    with pytest.raises(ValueError, match="RTMR0..RTMR3"):
        pki.forge_quote(bytes(64), rtmrs=[bytes(48)])
    quote = pki.forge_quote(bytearray(64), rtmrs=[bytearray(48)] * 4)  # type: ignore[arg-type, list-item]
    assert parse_tdx_quote(quote).report.rt_mr0 == bytes(48)
