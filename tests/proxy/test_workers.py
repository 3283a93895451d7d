"""The supervisor loop, driven by queueing signals as its handlers would (uvicorn's way)."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from gateway.proxy.settings import ProxySettings, Timeouts
from gateway.proxy.stats import read_stats
from gateway.proxy.workers import Supervisor
from tests.helpers.processes import free_port, port_open


@pytest.fixture
def restore_signals():  # type: ignore[no-untyped-def]
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def test_queued_sigint_drains_workers_and_returns(tmp_path: Path, restore_signals: None) -> None:
    port = free_port()
    settings = ProxySettings(
        listen=(f"127.0.0.1:{port}",),
        workers=2,
        certs_dir=tmp_path / "certs",
        stats_interval=0.1,
        timeouts=Timeouts(drain=2.0),
    )
    sup = Supervisor(settings, stats_dir=tmp_path / "stats")
    seen: list[int] = []

    def later() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not port_open("127.0.0.1", port):
            time.sleep(0.05)
        while time.monotonic() < deadline and len(read_stats(tmp_path / "stats")["workers"]) < 2:
            time.sleep(0.05)
        seen.extend(w["pid"] for w in read_stats(tmp_path / "stats")["workers"])
        sup.signals.append(signal.SIGHUP)  # reload: must not stop anything
        time.sleep(0.3)
        sup.signals.append(signal.SIGINT)  # what the handler does on Ctrl-C

    t = threading.Thread(target=later)
    t.start()
    start = time.monotonic()
    assert sup.run() == 0
    t.join()
    assert time.monotonic() - start < 10
    assert len(seen) == 2 and not sup.children
    for pid in seen:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # reaped, not left behind
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_port_in_use_fails_before_forking(tmp_path: Path, restore_signals: None) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        sup = Supervisor(ProxySettings(listen=(f"127.0.0.1:{port}",), workers=1))
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            sup.run()
        assert not sup.children
