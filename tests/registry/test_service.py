"""Registry rules on a real SQLite store (device interplay: tests/registry/test_restore.py)."""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

import pytest

from gateway.registry.service import (
    AppMismatch,
    InvalidRegistration,
    KeyInUse,
    PoolExhausted,
    Registration,
    Registry,
)
from gateway.registry.sqlite import SqliteStore
from gateway.tunnel.ipalloc import AddressPlan
from gateway.tunnel.keys import generate_private_key, public_key
from gateway.tunnel.uapi import DeviceState, PeerState

PLAN = AddressPlan(
    IPv4Interface("10.0.0.1/24"), IPv4Network("10.0.0.0/25"), (IPv4Network("10.0.0.1/32"),)
)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def key() -> str:
    return public_key(generate_private_key())


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    with SqliteStore(tmp_path / "r.sqlite3") as s:
        yield s


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def registry(store: SqliteStore, clock: Clock) -> Registry:
    return Registry(store, PLAN, clock=clock, recycle_timeout=3600.0)


def test_first_registration_allocates_lowest(registry: Registry) -> None:
    rec = registry.register(Registration("i1", "app", key(), {"ports": []}, {"tcb": "UpToDate"}))
    assert rec.ip == IPv4Address("10.0.0.2")
    assert rec.port_policy == {"ports": []}
    assert rec.evidence == {"tcb": "UpToDate"}


def test_reregistration_keeps_ip_and_port_policy(registry: Registry, clock: Clock) -> None:
    k = key()
    first = registry.register(Registration("i1", "app", k, {"ports": [1]}))
    registry.register(Registration("i2", "app", key()))
    clock.now += 60
    again = registry.register(Registration("i1", "app", k))
    assert again.ip == first.ip
    assert again.port_policy == {"ports": [1]}  # absent in the request: kept
    assert again.registered_at == first.registered_at and again.last_seen == clock.now


def test_key_held_by_another_instance_is_refused(registry: Registry) -> None:
    k = key()
    registry.register(Registration("i1", "app", k))
    with pytest.raises(KeyInUse):
        registry.register(Registration("i2", "app", k))
    assert registry.store.get_instance("i2") is None


def test_same_instance_may_rotate_its_key(registry: Registry) -> None:
    old, new = key(), key()
    first = registry.register(Registration("i1", "app", old))
    rotated = registry.register(Registration("i1", "app", new))
    assert rotated.ip == first.ip and rotated.public_key == new
    assert registry.store.find_instance_by_key(old) is None
    registry.register(Registration("i2", "app", old))  # the old key is free again


def test_instance_cannot_change_app(registry: Registry) -> None:
    registry.register(Registration("i1", "app", key()))
    with pytest.raises(AppMismatch):
        registry.register(Registration("i1", "other", key()))


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        (("i1", "app", "short"), "client_public_key"),
        (("i1", "app", "A" * 43 + "!"), "client_public_key"),
        (("", "app", None), "instance_id"),
        (("i1", "a/b", None), "app_id"),
    ],
)
def test_invalid_registrations(fields: tuple[str, str, str | None], match: str) -> None:
    iid, app, k = fields
    with pytest.raises(InvalidRegistration, match=match):
        Registration(iid, app, k if k is not None else key())


def test_pool_exhaustion(store: SqliteStore, clock: Clock) -> None:
    small = AddressPlan(IPv4Interface("10.0.0.1/29"), IPv4Network("10.0.0.0/29"))
    reg = Registry(store, small, clock=clock)
    ips = {reg.register(Registration(f"i{n}", "app", key())).ip for n in range(5)}
    assert len(ips) == 5
    with pytest.raises(PoolExhausted, match="IP pool exhausted"):
        reg.register(Registration("i9", "app", key()))


def test_address_plan_change_moves_instance(store: SqliteStore, clock: Clock) -> None:
    Registry(store, PLAN, clock=clock).register(Registration("i1", "app", k := key()))
    other = AddressPlan(IPv4Interface("10.0.0.1/24"), IPv4Network("10.0.0.128/25"))
    moved = Registry(store, other, clock=clock).register(Registration("i1", "app", k))
    assert moved.ip in other.client_range
    assert store.allocations() == {moved.ip: "i1"}


def test_recycle_removes_silent_instances_only(registry: Registry, clock: Clock) -> None:
    k_old, k_hs = key(), key()
    registry.register(Registration("old", "app", k_old))
    registry.register(Registration("hs", "app", k_hs))
    clock.now += 3000
    registry.register(Registration("fresh", "app", key()))
    # 'hs' shows a handshake at +3000: alive although it did not re-register
    registry.observe(DeviceState(None, 0, (PeerState(k_hs, (), None, clock.now, 1, 2, 25),)))
    clock.now += 1000  # old: silent 4000 s > 3600
    removed = registry.recycle()
    assert [r.instance_id for r in removed] == ["old"]
    assert {r.instance_id for r in registry.store.list_instances()} == {"fresh", "hs"}
    assert all(owner != "old" for owner in registry.store.allocations().values())


def test_observe_records_handshakes_per_node(registry: Registry, clock: Clock) -> None:
    k = key()
    registry.register(Registration("i1", "app", k))
    state = DeviceState(
        None,
        0,
        (
            PeerState(k, (), None, clock.now - 5, 10, 20, 25),
            PeerState(key(), (), None, clock.now, 0, 0, 0),  # unknown peer: ignored
            PeerState(key(), (), None, None, 0, 0, 0),  # never shook hands: ignored
        ),
    )
    assert registry.observe(state) == 1
    assert registry.observe(state) == 0  # nothing newer
    (obs,) = registry.store.handshakes("i1")
    assert obs.node_id == "local" and obs.handshake_at == clock.now - 5 and obs.tx_bytes == 20


def _race(regs: list[Registry], prefix: str, each: int) -> list[BaseException]:
    """Each registry registers ``each`` new instances in its own thread, all at once; the
    errors raised (none expected)."""
    errors: list[BaseException] = []

    def worker(reg: Registry, base: int) -> None:
        try:
            for n in range(each):
                reg.register(Registration(f"{prefix}{base}-{n}", "app", key()))
        except BaseException as exc:  # pragma: no cover - reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(r, i)) for i, r in enumerate(regs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_concurrent_registrations_never_share_an_address(store: SqliteStore) -> None:
    """Two registries (as two workers/nodes) on one database, racing: CAS keeps IPs unique."""
    regs = [
        Registry(store, PLAN, clock=Clock(), rng=random.Random(seed), attempts=50)
        for seed in (1, 1)  # same seed: they pick the same addresses and must collide
    ]
    assert _race(regs, "w", 30) == []
    ips = [r.ip for r in store.list_instances()]
    assert len(ips) == 60 == len(set(ips))


def test_desired_peers_route_every_instance(registry: Registry, clock: Clock) -> None:
    k1, k2 = key(), key()
    r1 = registry.register(Registration("i1", "app", k1))
    registry.register(Registration("i2", "app", k2))
    peers = registry.desired_peers()
    assert set(peers) == {k1, k2}
    assert peers[k1].allowed_ips == (IPv4Network(f"{r1.ip}/32"),)
    assert peers[k1].persistent_keepalive == 25 and peers[k1].endpoint is None
    assert registry.desired_peers(keepalive=False)[k1].persistent_keepalive is None


def test_port_policy_dropped_when_the_app_is_upgraded(registry: Registry) -> None:
    k = key()
    v1 = {"compose_hash": "aa" * 32}
    registry.register(Registration("i1", "app", k, {"ports": [{"port": 80}]}, v1))
    kept = registry.register(Registration("i1", "app", k, None, v1))
    assert kept.port_policy == {"ports": [{"port": 80}]}
    upgraded = registry.register(Registration("i1", "app", k, None, {"compose_hash": "bb" * 32}))
    assert upgraded.port_policy is None  # the new version has not declared its ports


def test_two_connections_racing_never_share_an_address(tmp_path: Path) -> None:
    """Separate connections to one file (as separate worker processes have): SQLite's write
    lock plus the CAS keep addresses unique."""
    path = tmp_path / "shared.sqlite3"
    stores = [SqliteStore(path) for _ in range(2)]
    regs = [Registry(s, PLAN, clock=Clock(), rng=random.Random(5), attempts=50) for s in stores]
    assert _race(regs, "c", 25) == []
    ips = [r.ip for r in stores[0].list_instances()]
    assert len(ips) == 50 == len(set(ips))
    for s in stores:
        s.close()


def test_refreshes_log_at_debug_changes_at_info(
    registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    """Every CVM refreshes every few minutes: only new instances, key rotations and moves
    are worth an info line."""
    caplog.set_level(logging.DEBUG, logger="gateway.registry.service")
    k = key()

    def levels() -> list[tuple[int, str]]:
        out = [(r.levelno, r.getMessage()) for r in caplog.records]
        caplog.clear()
        return out

    registry.register(Registration("i1", "app", k))
    assert [lvl for lvl, msg in levels() if "(new)" in msg] == [logging.INFO]
    registry.register(Registration("i1", "app", k))
    assert [lvl for lvl, msg in levels() if "(refresh)" in msg] == [logging.DEBUG]
    registry.register(Registration("i1", "app", key()))  # key rotation
    assert [lvl for lvl, msg in levels() if "registered instance i1" in msg] == [logging.INFO]


class CountingStore(SqliteStore):
    """The real store, counting the per-address lookups that allocation makes."""

    holder_queries = 0

    def ip_holder(self, ip: IPv4Address) -> str | None:
        self.holder_queries += 1
        return super().ip_holder(ip)


def test_lowest_order_does_not_rescan_the_taken_bottom(tmp_path: Path, clock: Clock) -> None:
    """Lowest-first allocation was one store query per held address for every new instance
    (12 ms each at 2,000 instances, quadratic in total); the registry now starts where its
    last scan ended. Addresses it frees are handed out again first; one freed by another
    writer is found once the scan wraps."""
    plan = AddressPlan(IPv4Interface("10.0.0.1/24"), IPv4Network("10.0.0.0/24"))
    store = CountingStore(tmp_path / "c.sqlite3")
    with store:
        reg = Registry(store, plan, clock=clock)
        ips = [reg.register(Registration(f"i{n}", "app", key())).ip for n in range(200)]
        assert ips == [IPv4Address(f"10.0.0.{n}") for n in range(2, 202)]  # still lowest-first
        assert store.holder_queries < 2 * 200 + 5  # not ~200*200/2
        assert reg.unregister("i9")
        assert reg.register(Registration("again", "app", key())).ip == ips[9]  # freed: reused
        other = Registry(store, plan, clock=clock)  # another writer frees one
        assert other.unregister("i3")
        later = [reg.register(Registration(f"j{n}", "app", key())).ip for n in range(54)]
        assert later[-1] == ips[3]  # 202..254 first, then the wrap finds it
