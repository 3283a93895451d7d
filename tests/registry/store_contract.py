"""The Store contract: behaviour every store must have (SQLite today, etcd next).

A new store gets the whole suite by subclassing :class:`StoreContract` and providing a
``store`` fixture (see ``tests/registry/test_sqlite.py``).
"""

from __future__ import annotations

import dataclasses
from ipaddress import IPv4Address

import pytest

from gateway.registry.records import ChangeKind, HandshakeObservation, InstanceRecord
from gateway.registry.store import Conflict, Store
from gateway.tunnel.keys import generate_private_key, public_key


def rec(n: int, **kw: object) -> InstanceRecord:
    base = InstanceRecord(
        instance_id=f"inst{n}",
        app_id="app1",
        public_key=public_key(generate_private_key()),
        ip=IPv4Address(f"10.0.0.{n + 1}"),
        registered_at=1000.0,
        last_seen=1000.0,
        port_policy={"ports": [{"port": 443, "pp": False}]},
        evidence={"compose_hash": "ab" * 32},
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


class StoreContract:
    """Every test takes the ``store`` fixture of the subclass."""

    def test_put_get_and_lookups(self, store: Store) -> None:
        saved = store.put_instance(rec(1), expect_revision=0)
        assert saved.revision == 1
        assert store.get_instance("inst1") == saved
        assert store.find_instance_by_key(saved.public_key) == saved
        assert store.ip_holder(IPv4Address("10.0.0.2")) == "inst1"
        assert store.allocations() == {IPv4Address("10.0.0.2"): "inst1"}
        assert store.get_instance("nope") is None

    def test_compare_and_set(self, store: Store) -> None:
        saved = store.put_instance(rec(1), expect_revision=0)
        with pytest.raises(Conflict):
            store.put_instance(rec(1), expect_revision=0)  # exists already
        newer = store.put_instance(dataclasses.replace(saved, last_seen=2000.0), expect_revision=1)
        with pytest.raises(Conflict):
            store.put_instance(saved, expect_revision=saved.revision)  # stale writer
        with pytest.raises(Conflict):
            store.delete_instance("inst1", expect_revision=saved.revision)
        assert store.delete_instance("inst1", expect_revision=newer.revision)
        assert store.get_instance("inst1") is None
        assert store.allocations() == {}

    def test_address_and_key_are_exclusive(self, store: Store) -> None:
        first = store.put_instance(rec(1), expect_revision=0)
        with pytest.raises(Conflict, match="held by instance inst1"):
            store.put_instance(rec(2, ip=first.ip), expect_revision=0)
        with pytest.raises(Conflict, match="public key"):
            store.put_instance(rec(2, public_key=first.public_key), expect_revision=0)
        assert store.get_instance("inst2") is None  # nothing half-written

    def test_moving_address_frees_the_old_one(self, store: Store) -> None:
        saved = store.put_instance(rec(1), expect_revision=0)
        store.put_instance(
            dataclasses.replace(saved, ip=IPv4Address("10.0.0.9")), expect_revision=1
        )
        assert store.allocations() == {IPv4Address("10.0.0.9"): "inst1"}

    def test_handshakes_merge_by_max_without_bumping_revision(self, store: Store) -> None:
        store.put_instance(rec(1), expect_revision=0)
        rev = store.revision()
        obs = HandshakeObservation("inst1", "n1", 1500.0, 1501.0, 10, 20)
        assert store.record_handshakes([obs]) == 1
        assert store.record_handshakes([dataclasses.replace(obs, handshake_at=1400.0)]) == 0
        assert store.record_handshakes([HandshakeObservation("ghost", "n1", 1.0, 1.0)]) == 0
        assert store.handshakes("inst1") == [obs]
        got = store.get_instance("inst1")
        assert got is not None and got.last_handshake == 1500.0
        assert store.revision() == rev

    def test_a_write_from_an_earlier_read_keeps_a_newer_handshake(self, store: Store) -> None:
        """A refresh (or a port-policy fetch) read the record before the first handshake was
        recorded, then writes it back: the handshake stays; otherwise the instance would look
        never-handshaken and drop out of its app's routes until the next rekey (~2 min)."""
        first = store.put_instance(rec(1), expect_revision=0)
        assert first.last_handshake is None
        store.record_handshakes([HandshakeObservation("inst1", "n1", 1500.0, 1501.0)])
        store.put_instance(
            dataclasses.replace(first, last_seen=1600.0), expect_revision=first.revision
        )
        got = store.get_instance("inst1")
        assert got is not None and (got.last_seen, got.last_handshake) == (1600.0, 1500.0)
        newer = dataclasses.replace(got, last_handshake=1700.0)
        store.put_instance(newer, expect_revision=got.revision)
        again = store.get_instance("inst1")
        assert again is not None and again.last_handshake == 1700.0

    def test_kv_tables(self, store: Store) -> None:
        e = store.kv_put("routes", "a.example", {"app_id": "app1", "port": 443})
        assert store.kv_get("routes", "a.example") == e
        store.kv_put("routes", "b.example", [1, 2])
        store.kv_put("policies", "a.example", "x")
        assert [x.key for x in store.kv_list("routes")] == ["a.example", "b.example"]
        assert [x.key for x in store.kv_list("routes", "b.")] == ["b.example"]
        with pytest.raises(Conflict):
            store.kv_put("routes", "a.example", 1, expect_revision=0)
        store.kv_put("routes", "a.example", 2, expect_revision=e.revision)
        assert store.kv_delete("routes", "a.example")
        assert not store.kv_delete("routes", "a.example")
        with pytest.raises(TypeError):
            store.kv_put("routes", "x", object())
        assert store.kv_get("routes", "x") is None

    def test_change_feed(self, store: Store) -> None:
        start = store.revision()
        store.put_instance(rec(1), expect_revision=0)
        store.kv_put("routes", "r", 1)
        store.delete_instance("inst1")
        changes = store.changes_since(start)
        assert [(c.kind, c.key, c.deleted) for c in changes] == [
            (ChangeKind.INSTANCE, "inst1", False),
            (ChangeKind.KV, "r", False),
            (ChangeKind.INSTANCE, "inst1", True),
        ]
        assert store.changes_since(changes[-1].revision) == []

    def test_last_endpoints_per_node(self, store: Store) -> None:
        store.put_instance(rec(1), expect_revision=0)
        store.put_instance(rec(2), expect_revision=0)
        store.record_handshakes(
            [
                HandshakeObservation("inst1", "n1", 10.0, 10.0, endpoint="172.30.0.10:9182"),
                HandshakeObservation("inst1", "n2", 10.0, 10.0, endpoint="192.0.2.1:1"),
                HandshakeObservation("inst2", "n1", 10.0, 10.0),
            ]
        )
        # a newer handshake without an endpoint keeps the known one
        store.record_handshakes([HandshakeObservation("inst1", "n1", 20.0, 20.0)])
        assert store.last_endpoints("n1") == {"inst1": "172.30.0.10:9182"}
        assert store.last_endpoints("n2") == {"inst1": "192.0.2.1:1"}
        assert store.last_endpoints("n1", since=15.0) == {"inst1": "172.30.0.10:9182"}
        assert store.last_endpoints("n2", since=15.0) == {}  # too old to be a useful hint
