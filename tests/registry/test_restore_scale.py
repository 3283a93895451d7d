"""Restart restore of a few hundred stored instances into a real wireguard-go (``rs-`` labs).

The device must end up holding exactly the stored set (keys and allowed IPs), endpoint hints
only where this node saw a recent handshake, stale peers removed, moved peers updated, and a
second restore must change nothing. Also: the greeting pass loses to a concurrent key
rotation or unregister, and peers restored without a hint get their keepalive once they have
shaken hands (through the maintenance tick).
"""

from __future__ import annotations

import ipaddress
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.lab.harness import Lab, cleanup_leftovers
from gateway.registry.maintenance import Maintenance
from gateway.registry.records import InstanceRecord
from gateway.registry.service import Registration, Registry
from gateway.registry.sqlite import SqliteStore
from gateway.tunnel.ipalloc import AddressPlan
from gateway.tunnel.keys import generate_private_key, public_key
from gateway.tunnel.uapi import DeviceState, PeerConfig, PeerState
from tests.helpers.lab import require_lab

pytestmark = [pytest.mark.netns, pytest.mark.slow]

PREFIX = "rs-"
PLAN = AddressPlan(
    ipaddress.IPv4Interface("10.8.0.1/16"),
    ipaddress.IPv4Network("10.8.0.0/22"),
    (ipaddress.IPv4Network("10.8.0.1/32"),),
)
COUNT = 300
HINTED = 200  # instances 0..199 shook hands recently on this node
STALE_HINTS = range(200, 220)  # shook hands, but longer ago than hint_max_age


@pytest.fixture
def rs_lab(tmp_path: Path) -> Iterator[Callable[..., Lab]]:
    require_lab()
    cleanup_leftovers(PREFIX)
    labs: list[Lab] = []

    def build(cvms: int = 0, **kw: Any) -> Lab:
        lab = Lab(cvms=cvms, workdir=tmp_path / f"lab{len(labs)}", prefix=PREFIX, **kw)
        labs.append(lab)
        return lab.up()

    try:
        yield build
    finally:
        for lab in labs:
            lab.down()


def endpoint(n: int) -> str:
    """TEST-NET-1: no route in the lab namespace, so greeting it fails at once (no ARP wait)."""
    return f"192.0.2.{n % 250 + 1}:{9182 + n}"


def peer_set(state: DeviceState) -> dict[str, frozenset[str]]:
    return {p.public_key: frozenset(map(str, p.allowed_ips)) for p in state.peers}


def stored_set(registry: Registry) -> dict[str, frozenset[str]]:
    return {r.public_key: frozenset({f"{r.ip}/32"}) for r in registry.store.list_instances()}


def recency_order(records: list[InstanceRecord]) -> list[str]:
    ordered = sorted(records, key=lambda r: (-r.last_activity, r.instance_id))
    return [r.public_key for r in ordered]


def test_restore_yields_exactly_the_stored_set(rs_lab: Callable[..., Lab], tmp_path: Path) -> None:
    lab = rs_lab(wg_address=PLAN.interface)
    gw = lab.gateway
    assert gw is not None
    store = SqliteStore(tmp_path / "registry.sqlite3")
    registry = Registry(store, PLAN, clock=time.time, rng=random.Random(3))
    records = [
        registry.register(Registration(f"i{n:03d}", "app", public_key(generate_private_key())))
        for n in range(COUNT)
    ]
    now = time.time()
    seen = [(n, now - n) for n in range(HINTED)] + [(n, now - 3600) for n in STALE_HINTS]
    observed = DeviceState(
        None,
        0,
        tuple(PeerState(records[n].public_key, (), endpoint(n), t, 1, 1, 0) for n, t in seen),
    )
    assert registry.observe(observed) == len(seen)

    # what a device that outlived the gateway might hold: a peer nobody stores any more and
    # one stored peer at a wrong address
    stale = public_key(generate_private_key())
    wrong = ipaddress.IPv4Network("10.8.3.250/32")
    gw.apply(
        [
            PeerConfig(stale, (ipaddress.IPv4Network("10.8.3.251/32"),)),
            PeerConfig(records[0].public_key, (wrong,)),
        ]
    )

    registry.device = gw
    result = registry.restore(greet=False)
    assert result.removed == (stale,)
    assert result.updated == (records[0].public_key,)
    assert len(result.added) == COUNT - 1
    assert list(result.added) == [  # most recently alive first
        k for k in recency_order(store.list_instances()) if k != records[0].public_key
    ]
    state = gw.state()
    assert peer_set(state) == stored_set(registry)  # every peer present before any greeting
    assert all(p.endpoint is None and p.persistent_keepalive == 0 for p in state.peers)

    # meanwhile a CVM rotates its key and an admin unregisters another: the greeting must not
    # bring the old keys back
    rotated = public_key(generate_private_key())
    registry.device = gw
    assert registry.register(Registration("i005", "app", rotated)).ip == records[5].ip
    assert registry.unregister("i006")
    stop = threading.Event()
    stop.set()
    assert registry.greet(result.added, stop=stop) == 0  # shutdown: nothing sent
    greeted = registry.greet(result.added, batch=37)
    assert greeted == HINTED - 3  # i000 was updated, not added; i005 rotated; i006 gone

    state = gw.state()
    assert peer_set(state) == stored_set(registry)
    by_key = {p.public_key: p for p in state.peers}
    for n, rec in enumerate(records):
        if n in (5, 6):
            continue
        p = by_key[rec.public_key]
        if 0 < n < HINTED:
            assert (p.endpoint, p.persistent_keepalive) == (endpoint(n), 25), n
        elif n == 0:
            assert (p.endpoint, p.persistent_keepalive) == (None, 0)  # the periodic path
        else:  # no hint or a stale one: no endpoint, and no keepalive to greet nobody with
            assert (p.endpoint, p.persistent_keepalive) == (None, 0), n
    assert records[5].public_key not in by_key and records[6].public_key not in by_key
    assert by_key[rotated].persistent_keepalive == 25  # registered normally

    again = registry.restore()  # idempotent: the reconcile finds nothing to do
    assert (again.added, again.updated, again.removed) == ((), (), ())
    assert peer_set(gw.state()) == stored_set(registry)
    store.close()


def test_unhinted_peer_gets_keepalive_after_it_dials_in(
    rs_lab: Callable[..., Lab], tmp_path: Path
) -> None:
    lab = rs_lab(cvms=1)
    gw, (node,) = lab.gateway, lab.nodes
    assert gw is not None
    net = lab.wg_address.network
    plan = AddressPlan(lab.wg_address, net, (ipaddress.IPv4Network(f"{lab.wg_address.ip}/32"),))
    store = SqliteStore(tmp_path / "registry.sqlite3")
    registry = Registry(store, plan, device=gw, clock=time.time)
    rec = registry.register(Registration(node.netns, "app", node.public_key))

    gw.close()  # restart: a fresh device, no hint (this node never saw a handshake)
    lab.gateway = gw = type(gw)(lab.gateway_spec(), log_dir=lab.workdir).open()
    registry.device = gw
    assert registry.restore().added == (node.public_key,)
    (p,) = gw.state().peers
    assert (p.endpoint, p.persistent_keepalive) == (None, 0)

    lab.connect(node, rec.ip)  # the CVM dials in by itself
    deadline = time.monotonic() + 15
    while lab.fetch_instance(node, timeout=1) != node.netns:
        assert time.monotonic() < deadline, "no traffic after the CVM dialled in"
    ticks = Maintenance(registry, gw, poll_interval=1, recycle_interval=3600, recycle_now=False)
    ticks.tick()  # observes the handshake and hands out the keepalive
    (p,) = gw.state().peers
    assert p.persistent_keepalive == 25 and p.endpoint is not None
    assert registry.settle_keepalives(gw.state()) == 0  # nothing left to do
    assert lab.fetch_instance(node) == node.netns  # the session survived the change
    store.close()


class RacingDevice:
    """The real device; the first ``state()`` first lets a registration through (a race)."""

    def __init__(self, device: Any, race: Callable[[], object]) -> None:
        self.device = device
        self.race: Callable[[], object] | None = race

    def __getattr__(self, name: str) -> Any:
        return getattr(self.device, name)

    def state(self) -> DeviceState:
        race, self.race = self.race, None
        if race is not None:
            race()
        return self.device.state()  # type: ignore[no-any-return]


def test_reconcile_reads_outside_the_lock_but_never_loses_a_racing_registration(
    rs_lab: Callable[..., Lab], tmp_path: Path
) -> None:
    lab = rs_lab(wg_address=PLAN.interface)
    gw = lab.gateway
    assert gw is not None
    store = SqliteStore(tmp_path / "registry.sqlite3")
    registry = Registry(store, PLAN, device=gw, clock=time.time, rng=random.Random(5))
    for n in range(20):
        registry.register(Registration(f"i{n:03d}", "app", public_key(generate_private_key())))
    late = public_key(generate_private_key())
    rotated = public_key(generate_private_key())

    def race() -> None:  # while restore has read the store but not yet the device
        registry.register(Registration("late", "app", late))
        registry.register(Registration("i003", "app", rotated))
        registry.unregister("i004")

    registry.device = RacingDevice(gw, race)
    result = registry.restore()
    assert (result.added, result.updated, result.removed) == ((), (), ())
    assert peer_set(gw.state()) == stored_set(registry)
    assert late in peer_set(gw.state()) and rotated in peer_set(gw.state())
    store.close()
