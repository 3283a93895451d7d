"""The registry driving a real gateway device: register, observe, recycle, restart restore."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.lab.harness import Lab
from gateway.registry.service import Registration, Registry
from gateway.registry.sqlite import SqliteStore
from gateway.tunnel.ipalloc import AddressPlan
from gateway.tunnel.keys import generate_private_key, public_key
from gateway.tunnel.wg import WgDevice

pytestmark = [pytest.mark.netns, pytest.mark.slow]

MakeLab = Callable[..., Lab]


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def plan_of(lab: Lab) -> AddressPlan:
    net = lab.wg_address.network
    return AddressPlan(lab.wg_address, net, (net.__class__(f"{lab.wg_address.ip}/32"),))


def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> float:
    start = time.monotonic()
    while not pred():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - start


def test_register_observe_recycle_and_restart(make_lab: MakeLab, tmp_path: Path) -> None:
    lab = make_lab(cvms=2)
    assert lab.gateway is not None
    db = tmp_path / "registry.sqlite3"
    clock = Clock()
    store = SqliteStore(db)
    registry = Registry(store, plan_of(lab), device=lab.gateway, clock=clock, recycle_timeout=600)
    a, b = lab.nodes

    # registration adds the peer incrementally; the CVM applies the answer
    rec_a = registry.register(Registration(a.netns, "app-a", a.public_key, {"ports": []}))
    rec_b = registry.register(Registration(b.netns, "app-b", b.public_key))
    lab.connect(a, rec_a.ip)
    lab.connect(b, rec_b.ip)
    assert lab.fetch_instance(a) == a.netns and lab.fetch_instance(b) == b.netns

    # handshakes are read on a timer and land in the store
    assert registry.observe(lab.gateway.state()) == 2
    hs = store.get_instance(a.netns)
    assert hs is not None and hs.last_handshake is not None

    # re-registration with a rotated key keeps the address; the old key stops working
    new_private = generate_private_key()
    a.device.set_private_key(new_private)
    again = registry.register(Registration(a.netns, "app-a", public_key(new_private)))
    assert again.ip == rec_a.ip
    assert {p.public_key for p in lab.gateway.state().peers} == {
        public_key(new_private),
        b.public_key,
    }
    lab.connect(a, again.ip)  # the guest applies the answer: handshake with the new key
    wait_for(lambda: lab.fetch_instance(a, timeout=1) == a.netns, 15, "tunnel after rotation")

    # gateway restart: the device goes away, the store is reopened, peers are re-applied
    lab.gateway.close()
    assert lab.fetch_instance(b, timeout=1) is None
    store.close()
    store = SqliteStore(db)
    assert {r.instance_id: r.ip for r in store.list_instances()} == {
        a.netns: rec_a.ip,
        b.netns: rec_b.ip,
    }
    lab.gateway = WgDevice(lab.gateway_spec(), log_dir=lab.workdir).open()
    registry = Registry(store, plan_of(lab), device=lab.gateway, clock=clock, recycle_timeout=600)
    restored = registry.restore()
    assert set(restored.added) == {public_key(new_private), b.public_key}
    for peer in lab.gateway.state().peers:  # second pass: keepalive and endpoint hints
        assert peer.persistent_keepalive == 25
        assert peer.endpoint is not None and peer.endpoint.startswith("172.30.0.")
    took = wait_for(
        lambda: (
            lab.fetch_instance(a, timeout=1) == a.netns
            and lab.fetch_instance(b, timeout=1) == b.netns
        ),
        40,
        "traffic after restore without re-registration",
    )
    print(f"traffic resumed {took:.2f}s after restore")

    # recycling: b goes silent (no registration, no handshake) past the timeout
    registry.observe(lab.gateway.state())
    clock.now = time.time() + 601  # b's latest handshake is now older than the timeout
    registry.register(Registration(a.netns, "app-a", public_key(new_private)))  # a refreshes
    removed = registry.recycle()
    assert [r.instance_id for r in removed] == [b.netns]
    assert [p.public_key for p in lab.gateway.state().peers] == [public_key(new_private)]
    assert lab.fetch_instance(b, timeout=1) is None
    assert lab.fetch_instance(a) == a.netns
    assert rec_b.ip not in store.allocations()
    store.close()
