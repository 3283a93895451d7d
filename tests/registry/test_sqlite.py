"""SqliteStore: the Store contract plus what only a file-backed store has."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from dataclasses import replace
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from gateway.registry.records import HandshakeObservation
from gateway.registry.sqlite import SCHEMA_VERSION, SqliteStore
from gateway.registry.store import StoreError
from tests.registry.store_contract import StoreContract, rec


class TestSqliteStore(StoreContract):
    @pytest.fixture
    def store(self, tmp_path: Path) -> Iterator[SqliteStore]:
        with SqliteStore(tmp_path / "reg.sqlite3") as s:
            yield s


def test_change_feed_compaction_is_reported(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / "c.sqlite3", feed_keep=10) as s:
        for i in range(1000):
            s.kv_put("t", "k", i)
        with pytest.raises(StoreError, match="re-read"):
            s.changes_since(0)
        assert len(s.changes_since(995)) == 5


def test_reopen_restores_everything(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite3"
    with SqliteStore(path) as s:
        for n in range(1, 20):
            s.put_instance(rec(n), expect_revision=0)
        s.record_handshakes([HandshakeObservation("inst3", "n1", 1234.5, 1235.0, 1, 2)])
        s.kv_put("policies", "p", {"allow": ["app1"]})
        before = (s.list_instances(), s.allocations(), s.kv_list("policies"), s.revision())
    with SqliteStore(path) as s:
        after = (s.list_instances(), s.allocations(), s.kv_list("policies"), s.revision())
        assert s.handshakes("inst3")[0].handshake_at == 1234.5
    assert after == before


def test_uncommitted_transaction_leaves_no_trace(tmp_path: Path) -> None:
    path = tmp_path / "t.sqlite3"
    with SqliteStore(path) as s:
        s.put_instance(rec(1), expect_revision=0)
        with pytest.raises(RuntimeError), s._tx() as db:
            db.execute("DELETE FROM instances")
            raise RuntimeError("crash mid-write")
        assert s.get_instance("inst1") is not None


def test_schema_version_and_newer_db_refused(tmp_path: Path) -> None:
    path = tmp_path / "v.sqlite3"
    SqliteStore(path).close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StoreError, match="newer gateway"):
        SqliteStore(path)


def test_garbage_file_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "g.sqlite3"
    path.write_bytes(b"not a database" * 100)
    with pytest.raises(StoreError, match="cannot open"):
        SqliteStore(path)


def test_a_refresh_keeping_its_address_leaves_the_allocation_alone(tmp_path: Path) -> None:
    """The allocation row is rewritten only when the address moves: a refresh writes no
    allocation pages and the row keeps the time the address was first given out."""
    path = tmp_path / "a.sqlite3"

    def allocation() -> list[tuple[str, str, float]]:
        with sqlite3.connect(path) as db:
            return db.execute("SELECT ip, instance_id, allocated_at FROM allocations").fetchall()

    with SqliteStore(path) as s:
        first = s.put_instance(rec(1, last_seen=100.0), expect_revision=0)
        assert allocation() == [("10.0.0.2", "inst1", 100.0)]
        refreshed = s.put_instance(rec(1, last_seen=200.0), expect_revision=first.revision)
        assert allocation() == [("10.0.0.2", "inst1", 100.0)]
        s.put_instance(
            replace(refreshed, ip=IPv4Address("10.0.0.9"), last_seen=300.0),
            expect_revision=refreshed.revision,
        )
        assert allocation() == [("10.0.0.9", "inst1", 300.0)]
        assert s.ip_holder(IPv4Address("10.0.0.2")) is None


def test_processes_creating_one_new_file_at_once_all_succeed(tmp_path: Path) -> None:
    """The control plane and every proxy worker may open a new registry file at the same
    moment: only one creates the tables; none fails with "table already exists"."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    for attempt in range(5):
        path = tmp_path / f"race{attempt}.sqlite3"
        go = ctx.Event()
        procs = [ctx.Process(target=_open_when_told, args=(path, go)) for _ in range(8)]
        for proc in procs:
            proc.start()
        time.sleep(0.2)  # all waiting on the event
        go.set()
        for proc in procs:
            proc.join(30)
        assert [proc.exitcode for proc in procs] == [0] * 8, attempt
        with SqliteStore(path) as store:
            assert store.list_instances() == []


def _open_when_told(path: Path, go: Any) -> None:
    go.wait(10)
    with SqliteStore(path) as store:
        store.list_instances()
