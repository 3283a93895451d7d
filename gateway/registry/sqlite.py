"""The embedded :class:`~gateway.registry.store.Store`: one SQLite database in WAL mode.

Why SQLite: one file under the data directory, transactions that survive a crash at any
point (WAL: a committed transaction is in the log before ``COMMIT`` returns; an interrupted
one is rolled back on the next open), and indexed lookups by instance id, public key and IP
without keeping everything in memory.

* Every write runs in ``BEGIN IMMEDIATE`` ... ``COMMIT`` (one writer at a time, no upgrade
  deadlocks) under a process-local lock, so the store can be shared by threads
  (``asyncio.to_thread``). ``synchronous=NORMAL`` (durable enough, and no fsync per
  registration): under WAL a transaction is in the log file, i.e. the OS's page cache, when
  ``COMMIT`` returns, so a crash of the gateway process loses nothing committed; only a power
  loss or kernel crash can lose the last commits (the WAL is fsynced at checkpoints), and it
  never corrupts the file. A CVM whose lost registration mattered re-registers at its next
  refresh. ``FULL`` would add an fsync (milliseconds on real disks) to every registration.
* The schema version is ``PRAGMA user_version``; :data:`MIGRATIONS` lists the steps, each
  applied once in its own transaction. A database newer than this code is refused.
* The change feed (``changes`` table) is compacted to the last :data:`FEED_KEEP` entries.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gateway.registry.records import (
    Change,
    ChangeKind,
    HandshakeObservation,
    InstanceRecord,
    KvEntry,
    check_id,
    dump_json,
)
from gateway.registry.store import Conflict, StoreError

__all__ = ["FEED_KEEP", "MIGRATIONS", "SCHEMA_VERSION", "SqliteStore"]

FEED_KEEP = 10_000

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # version 1
    (
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "INSERT INTO meta (key, value) VALUES ('revision', '0')",
        """CREATE TABLE instances (
            instance_id TEXT PRIMARY KEY,
            app_id TEXT NOT NULL,
            public_key TEXT NOT NULL UNIQUE,
            ip TEXT NOT NULL UNIQUE,
            registered_at REAL NOT NULL,
            last_seen REAL NOT NULL,
            last_handshake REAL,
            port_policy TEXT,
            evidence TEXT NOT NULL,
            revision INTEGER NOT NULL
        )""",
        "CREATE INDEX instances_app ON instances (app_id)",
        """CREATE TABLE allocations (
            ip TEXT PRIMARY KEY,
            instance_id TEXT NOT NULL UNIQUE
                REFERENCES instances (instance_id) ON DELETE CASCADE,
            allocated_at REAL NOT NULL
        )""",
        """CREATE TABLE handshakes (
            instance_id TEXT NOT NULL REFERENCES instances (instance_id) ON DELETE CASCADE,
            node_id TEXT NOT NULL,
            handshake_at REAL NOT NULL,
            observed_at REAL NOT NULL,
            rx_bytes INTEGER NOT NULL,
            tx_bytes INTEGER NOT NULL,
            endpoint TEXT,
            PRIMARY KEY (instance_id, node_id)
        )""",
        """CREATE TABLE kv (
            tbl TEXT NOT NULL,
            key TEXT NOT NULL,
            value TEXT NOT NULL,
            revision INTEGER NOT NULL,
            PRIMARY KEY (tbl, key)
        )""",
        """CREATE TABLE changes (
            revision INTEGER PRIMARY KEY,
            kind TEXT NOT NULL,
            tbl TEXT NOT NULL,
            key TEXT NOT NULL,
            deleted INTEGER NOT NULL
        )""",
        "INSERT INTO meta (key, value) VALUES ('feed_floor', '0')",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

_INSTANCE_COLUMNS = (
    "instance_id, app_id, public_key, ip, registered_at, last_seen, last_handshake, "
    "port_policy, evidence, revision"
)


def _row_to_instance(row: sqlite3.Row | tuple[Any, ...]) -> InstanceRecord:
    return InstanceRecord(
        instance_id=row[0],
        app_id=row[1],
        public_key=row[2],
        ip=ipaddress.IPv4Address(row[3]),
        registered_at=row[4],
        last_seen=row[5],
        last_handshake=row[6],
        port_policy=json.loads(row[7]) if row[7] is not None else None,
        evidence=json.loads(row[8]),
        revision=row[9],
    )


class SqliteStore:
    """SQLite-backed store; ``SqliteStore(path)`` creates or migrates the file."""

    def __init__(self, path: Path, *, feed_keep: int = FEED_KEEP) -> None:
        self.path = path
        self.feed_keep = feed_keep
        self._lock = threading.RLock()
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(
                str(path), isolation_level=None, check_same_thread=False, timeout=10.0
            )
            self._setup()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot open registry database {path}: {exc}") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> SqliteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing --------------------------------------------------------------------------

    def _setup(self, patience: float = 10.0) -> None:
        """WAL mode, pragmas, schema. Switching a new file to WAL takes an exclusive lock that
        SQLite's busy handler does not wait for, so "database is locked" while several
        processes open a new file at once is retried here (bounded) rather than fatal."""
        deadline = time.monotonic() + patience
        delay = 0.005
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.execute("PRAGMA foreign_keys=ON")
                self._migrate()
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.1)

    def _migrate(self) -> None:
        """Bring the file to :data:`SCHEMA_VERSION`, one migration per transaction.

        The version is read again inside each write transaction: several processes (the
        control plane and every proxy worker) may open a new file at the same moment, and
        only the first may create the tables; the others then find the work done.
        """
        if int(self._db.execute("PRAGMA user_version").fetchone()[0]) == SCHEMA_VERSION:
            return  # the usual case: no write lock needed to open
        while True:
            with self._tx() as db:
                version = int(db.execute("PRAGMA user_version").fetchone()[0])
                if version > SCHEMA_VERSION:
                    raise StoreError(
                        f"registry database {self.path} has schema {version}, this gateway "
                        f"knows up to {SCHEMA_VERSION}: run a newer gateway or restore a backup"
                    )
                if version == SCHEMA_VERSION:
                    return
                for statement in MIGRATIONS[version]:
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {version + 1}")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed on success, rolled back on any exception."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            else:
                self._db.execute("COMMIT")

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _bump(
        self, db: sqlite3.Connection, kind: ChangeKind, table: str, key: str, deleted: bool
    ) -> int:
        rev = int(db.execute("SELECT value FROM meta WHERE key = 'revision'").fetchone()[0]) + 1
        db.execute("UPDATE meta SET value = ? WHERE key = 'revision'", (str(rev),))
        db.execute(
            "INSERT INTO changes (revision, kind, tbl, key, deleted) VALUES (?, ?, ?, ?, ?)",
            (rev, kind.value, table, key, int(deleted)),
        )
        if rev % 1000 == 0:
            floor = rev - self.feed_keep
            if floor > 0:
                db.execute("DELETE FROM changes WHERE revision <= ?", (floor,))
                db.execute("UPDATE meta SET value = ? WHERE key = 'feed_floor'", (str(floor),))
        return rev

    # --- instances -------------------------------------------------------------------------

    def get_instance(self, instance_id: str) -> InstanceRecord | None:
        rows = self._read(
            f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE instance_id = ?", (instance_id,)
        )
        return _row_to_instance(rows[0]) if rows else None

    def find_instance_by_key(self, public_key: str) -> InstanceRecord | None:
        rows = self._read(
            f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE public_key = ?", (public_key,)
        )
        return _row_to_instance(rows[0]) if rows else None

    def list_instances(self) -> list[InstanceRecord]:
        rows = self._read(f"SELECT {_INSTANCE_COLUMNS} FROM instances ORDER BY instance_id")
        return [_row_to_instance(r) for r in rows]

    def instance_keys(self) -> dict[str, str]:
        return {k: i for k, i in self._read("SELECT public_key, instance_id FROM instances")}

    def put_instance(self, record: InstanceRecord, *, expect_revision: int) -> InstanceRecord:
        with self._tx() as db:
            row = db.execute(
                "SELECT revision FROM instances WHERE instance_id = ?", (record.instance_id,)
            ).fetchone()
            current = int(row[0]) if row else 0
            if current != expect_revision:
                raise Conflict(
                    f"instance {record.instance_id} is at revision {current}, "
                    f"expected {expect_revision}"
                )
            holder = db.execute(
                "SELECT instance_id FROM allocations WHERE ip = ?", (str(record.ip),)
            ).fetchone()
            if holder and holder[0] != record.instance_id:
                raise Conflict(f"address {record.ip} is held by instance {holder[0]}")
            owner = db.execute(
                "SELECT instance_id FROM instances WHERE public_key = ?", (record.public_key,)
            ).fetchone()
            if owner and owner[0] != record.instance_id:
                raise Conflict("public key is held by another instance")
            rev = self._bump(db, ChangeKind.INSTANCE, "instances", record.instance_id, False)
            values = (
                record.instance_id,
                record.app_id,
                record.public_key,
                str(record.ip),
                record.registered_at,
                record.last_seen,
                record.last_handshake,
                dump_json(record.port_policy) if record.port_policy is not None else None,
                dump_json(dict(record.evidence)),
                rev,
            )
            db.execute(
                f"INSERT INTO instances ({_INSTANCE_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT (instance_id) DO UPDATE SET app_id = excluded.app_id, "
                "public_key = excluded.public_key, ip = excluded.ip, "
                "registered_at = excluded.registered_at, last_seen = excluded.last_seen, "
                # health data merges by max: a writer that read the record before a
                # handshake was recorded (a refresh, a port-policy fetch) must not erase it
                "last_handshake = CASE WHEN instances.last_handshake IS NULL "
                "THEN excluded.last_handshake WHEN excluded.last_handshake IS NULL "
                "THEN instances.last_handshake "
                "ELSE MAX(instances.last_handshake, excluded.last_handshake) END, "
                "port_policy = excluded.port_policy, "
                "evidence = excluded.evidence, revision = excluded.revision",
                values,
            )
            # a refresh keeps its address: then nothing is written (no row or index pages)
            db.execute(
                "INSERT INTO allocations (ip, instance_id, allocated_at) VALUES (?, ?, ?) "
                "ON CONFLICT (instance_id) DO UPDATE SET ip = excluded.ip, "
                "allocated_at = excluded.allocated_at WHERE ip != excluded.ip",
                (str(record.ip), record.instance_id, record.last_seen),
            )
        return _replace_revision(record, rev)

    def delete_instance(self, instance_id: str, *, expect_revision: int | None = None) -> bool:
        with self._tx() as db:
            row = db.execute(
                "SELECT revision FROM instances WHERE instance_id = ?", (instance_id,)
            ).fetchone()
            if row is None:
                if expect_revision:
                    raise Conflict(f"instance {instance_id} is gone")
                return False
            if expect_revision is not None and int(row[0]) != expect_revision:
                raise Conflict(
                    f"instance {instance_id} is at revision {row[0]}, expected {expect_revision}"
                )
            db.execute("DELETE FROM instances WHERE instance_id = ?", (instance_id,))
            self._bump(db, ChangeKind.INSTANCE, "instances", instance_id, True)
        return True

    def ip_holder(self, ip: ipaddress.IPv4Address) -> str | None:
        rows = self._read("SELECT instance_id FROM allocations WHERE ip = ?", (str(ip),))
        return str(rows[0][0]) if rows else None

    def allocations(self) -> dict[ipaddress.IPv4Address, str]:
        rows = self._read("SELECT ip, instance_id FROM allocations")
        return {ipaddress.IPv4Address(ip): owner for ip, owner in rows}

    # --- health ----------------------------------------------------------------------------

    def record_handshakes(self, observations: Sequence[HandshakeObservation]) -> int:
        newer = 0
        with self._tx() as db:
            for o in observations:
                cur = db.execute(
                    "INSERT INTO handshakes (instance_id, node_id, handshake_at, observed_at, "
                    "rx_bytes, tx_bytes, endpoint) SELECT ?, ?, ?, ?, ?, ?, ? "
                    "WHERE EXISTS (SELECT 1 FROM instances WHERE instance_id = ?) "
                    "ON CONFLICT (instance_id, node_id) DO UPDATE SET "
                    "handshake_at = excluded.handshake_at, observed_at = excluded.observed_at, "
                    "rx_bytes = excluded.rx_bytes, tx_bytes = excluded.tx_bytes, "
                    "endpoint = coalesce(excluded.endpoint, handshakes.endpoint) "
                    "WHERE excluded.handshake_at > handshakes.handshake_at",
                    (
                        o.instance_id,
                        o.node_id,
                        o.handshake_at,
                        o.observed_at,
                        o.rx_bytes,
                        o.tx_bytes,
                        o.endpoint,
                        o.instance_id,
                    ),
                )
                if cur.rowcount:
                    newer += 1
                    db.execute(
                        "UPDATE instances SET last_handshake = ? WHERE instance_id = ? "
                        "AND (last_handshake IS NULL OR last_handshake < ?)",
                        (o.handshake_at, o.instance_id, o.handshake_at),
                    )
        return newer

    def handshakes(self, instance_id: str) -> list[HandshakeObservation]:
        rows = self._read(
            "SELECT instance_id, node_id, handshake_at, observed_at, rx_bytes, tx_bytes, "
            "endpoint FROM handshakes WHERE instance_id = ? ORDER BY node_id",
            (instance_id,),
        )
        return [HandshakeObservation(*r) for r in rows]

    def last_endpoints(self, node_id: str, since: float = 0.0) -> dict[str, str]:
        rows = self._read(
            "SELECT instance_id, endpoint FROM handshakes "
            "WHERE node_id = ? AND endpoint IS NOT NULL AND handshake_at >= ?",
            (node_id, since),
        )
        return {iid: ep for iid, ep in rows}

    # --- generic tables --------------------------------------------------------------------

    def kv_get(self, table: str, key: str) -> KvEntry | None:
        rows = self._read("SELECT value, revision FROM kv WHERE tbl = ? AND key = ?", (table, key))
        return KvEntry(table, key, json.loads(rows[0][0]), rows[0][1]) if rows else None

    def kv_put(
        self, table: str, key: str, value: Any, *, expect_revision: int | None = None
    ) -> KvEntry:
        check_id("table", table)
        text = dump_json(value)  # raises TypeError/ValueError before anything is written
        with self._tx() as db:
            row = db.execute(
                "SELECT revision FROM kv WHERE tbl = ? AND key = ?", (table, key)
            ).fetchone()
            current = int(row[0]) if row else 0
            if expect_revision is not None and current != expect_revision:
                raise Conflict(
                    f"{table}/{key} is at revision {current}, expected {expect_revision}"
                )
            rev = self._bump(db, ChangeKind.KV, table, key, False)
            db.execute(
                "INSERT INTO kv (tbl, key, value, revision) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (tbl, key) DO UPDATE SET value = excluded.value, "
                "revision = excluded.revision",
                (table, key, text, rev),
            )
        return KvEntry(table, key, json.loads(text), rev)

    def kv_delete(self, table: str, key: str, *, expect_revision: int | None = None) -> bool:
        with self._tx() as db:
            row = db.execute(
                "SELECT revision FROM kv WHERE tbl = ? AND key = ?", (table, key)
            ).fetchone()
            if row is None:
                if expect_revision:
                    raise Conflict(f"{table}/{key} is gone")
                return False
            if expect_revision is not None and int(row[0]) != expect_revision:
                raise Conflict(f"{table}/{key} is at revision {row[0]}, expected {expect_revision}")
            db.execute("DELETE FROM kv WHERE tbl = ? AND key = ?", (table, key))
            self._bump(db, ChangeKind.KV, table, key, True)
        return True

    def kv_list(self, table: str, prefix: str = "") -> list[KvEntry]:
        rows = self._read(
            "SELECT key, value, revision FROM kv WHERE tbl = ? AND substr(key, 1, ?) = ? "
            "ORDER BY key",
            (table, len(prefix), prefix),
        )
        return [KvEntry(table, k, json.loads(v), r) for k, v, r in rows]

    # --- watching --------------------------------------------------------------------------

    def revision(self) -> int:
        return int(self._read("SELECT value FROM meta WHERE key = 'revision'")[0][0])

    def changes_since(self, revision: int, limit: int = 1000) -> list[Change]:
        with self._lock:
            floor = int(
                self._db.execute("SELECT value FROM meta WHERE key = 'feed_floor'").fetchone()[0]
            )
            if revision < floor:
                raise StoreError(
                    f"change feed compacted past revision {revision} (oldest kept: {floor + 1}); "
                    "re-read the full state"
                )
            rows = self._db.execute(
                "SELECT revision, kind, tbl, key, deleted FROM changes WHERE revision > ? "
                "ORDER BY revision LIMIT ?",
                (revision, limit),
            ).fetchall()
        return [Change(r, ChangeKind(k), t, key, bool(d)) for r, k, t, key, d in rows]


def _replace_revision(record: InstanceRecord, revision: int) -> InstanceRecord:
    return dataclasses.replace(record, revision=revision)
