from __future__ import annotations

from pathlib import Path

from gateway.proxy.stats import WorkerState, read_stats, write_stats


def test_worker_snapshots_are_summed(tmp_path: Path) -> None:
    a, b = WorkerState(0, 100), WorkerState(1, 101)
    a.accepted, a.bytes_up, b.accepted, b.bytes_down = 3, 10, 4, 20
    a.error("idle_timeout")
    b.error("idle_timeout")
    b.error("bad_hello")
    a.app_open["app"] += 2
    b.app_open["app"] += 1
    b.app_open["gone"] += 0
    write_stats(tmp_path, a)
    write_stats(tmp_path, b)
    (tmp_path / "worker-9.json").write_text("{torn")  # ignored, not fatal
    total = read_stats(tmp_path)
    assert total["accepted"] == 7 and total["bytes_up"] == 10 and total["bytes_down"] == 20
    assert total["errors"] == {"idle_timeout": 2, "bad_hello": 1}
    assert total["app_open"] == {"app": 3}
    assert [w["pid"] for w in total["workers"]] == [100, 101]
    assert not list(tmp_path.glob(".*.tmp"))
