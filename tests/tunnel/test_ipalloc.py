from __future__ import annotations

import random
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.tunnel.ipalloc import AddressPlan, AllocationError, PoolExhausted, choose

A = IPv4Address
UPSTREAM = AddressPlan(
    IPv4Interface("10.0.0.1/24"), IPv4Network("10.0.0.0/25"), (IPv4Network("10.0.0.1/32"),)
)


@pytest.mark.parametrize(
    ("ip", "ok", "why"),
    [
        ("10.0.0.0", False, "network address of the range"),
        ("10.0.0.1", False, "the gateway's own address (and reserved)"),
        ("10.0.0.2", True, "first client address, as upstream"),
        ("10.0.0.126", True, "last host of 10.0.0.0/25"),
        ("10.0.0.127", False, "broadcast of the client range"),
        ("10.0.0.128", False, "outside client_ip_range"),
        ("10.0.1.5", False, "outside the interface network"),
    ],
)
def test_assignable_table(ip: str, ok: bool, why: str) -> None:
    assert UPSTREAM.assignable(A(ip)) is ok, why


def test_interface_broadcast_and_reserved_nets_are_skipped() -> None:
    plan = AddressPlan(
        IPv4Interface("10.8.0.1/24"),
        IPv4Network("10.8.0.0/24"),
        (IPv4Network("10.8.0.1/32"), IPv4Network("10.8.0.16/28")),
    )
    assert not plan.assignable(A("10.8.0.255"))
    assert not plan.assignable(A("10.8.0.20"))
    assert plan.assignable(A("10.8.0.32"))
    assert plan.capacity() == 254 - 1 - 16


def test_first_allocation_is_upstreams() -> None:
    assert choose(UPSTREAM, set()) == A("10.0.0.2")
    assert choose(UPSTREAM, {A("10.0.0.2")}) == A("10.0.0.3")


def test_reregistration_keeps_address() -> None:
    taken = {A("10.0.0.2"), A("10.0.0.3")}
    assert choose(UPSTREAM, taken, current=A("10.0.0.50"), rng=random.Random(1)) == A("10.0.0.50")


def test_current_address_is_replaced_when_no_longer_valid() -> None:
    assert choose(UPSTREAM, set(), current=A("10.0.0.200")) == A("10.0.0.2")
    assert choose(UPSTREAM, {A("10.0.0.9")}, current=A("10.0.0.9")) == A("10.0.0.2")


def test_exhaustion_is_a_clear_error() -> None:
    plan = AddressPlan(IPv4Interface("10.1.0.1/29"), IPv4Network("10.1.0.0/29"))
    taken = {A(f"10.1.0.{i}") for i in range(2, 7)}
    with pytest.raises(PoolExhausted, match="client_ip_range 10.1.0.0/29") as err:
        choose(plan, taken)
    assert err.value.in_use == 5


@pytest.mark.parametrize(
    ("iface", "client", "reserved"),
    [
        ("10.0.0.1/24", "10.0.1.0/25", ()),
        ("10.0.0.1/24", "10.0.0.0/16", ()),
        ("10.0.0.1/24", "10.0.0.0/25", ("10.9.0.0/32",)),
    ],
)
def test_inconsistent_plans_are_refused(iface: str, client: str, reserved: tuple[str, ...]) -> None:
    with pytest.raises(AllocationError):
        AddressPlan(IPv4Interface(iface), IPv4Network(client), tuple(map(IPv4Network, reserved)))


plans = st.builds(
    lambda prefix, client_extra, gw_off, res: _plan(prefix, client_extra, gw_off, res),
    st.integers(24, 30),
    st.integers(0, 3),
    st.integers(0, 3),
    st.lists(st.tuples(st.integers(0, 63), st.integers(28, 32)), max_size=3),
)


def _plan(prefix: int, client_extra: int, gw_off: int, res: list[tuple[int, int]]) -> AddressPlan:
    net = IPv4Network(f"10.20.0.0/{prefix}")
    client = IPv4Network(f"10.20.0.0/{min(prefix + client_extra, 30)}")
    gateway = IPv4Interface(
        f"{net.network_address + 1 + gw_off % (net.num_addresses - 2)}/{prefix}"
    )
    reserved = []
    for off, plen in res:
        plen = max(plen, prefix)
        base = int(net.network_address) + (off % net.num_addresses)
        reserved.append(IPv4Network((base >> (32 - plen) << (32 - plen), plen)))
    return AddressPlan(gateway, client, tuple(reserved))


@settings(max_examples=60, deadline=None)
@given(plan=plans, seed=st.one_of(st.none(), st.integers(0, 2**32)))
def test_fill_pool_never_duplicates_nor_hands_out_reserved(
    plan: AddressPlan, seed: int | None
) -> None:
    rng = random.Random(seed) if seed is not None else None
    taken: set[IPv4Address] = set()
    while True:
        try:
            ip = choose(plan, taken, rng=rng)
        except PoolExhausted:
            break
        assert ip not in taken
        assert ip in plan.client_range and ip != plan.gateway_ip
        assert not any(ip in r for r in plan.reserved)
        assert ip not in (
            plan.interface.network.network_address,
            plan.interface.network.broadcast_address,
        )
        taken.add(ip)
    assert len(taken) == plan.capacity()


def test_lowest_scan_can_start_where_the_last_one_ended_and_wraps() -> None:
    """``scan_from`` skips the known-taken bottom of the range; the scan wraps, so a free
    address below the start is still found (and exhaustion still detected)."""
    assert choose(UPSTREAM, set(), scan_from=A("10.0.0.40")) == A("10.0.0.40")
    assert choose(UPSTREAM, {A("10.0.0.40")}, scan_from=A("10.0.0.40")) == A("10.0.0.41")
    top = {A(f"10.0.0.{n}") for n in range(40, 255)}
    assert choose(UPSTREAM, top, scan_from=A("10.0.0.40")) == A("10.0.0.2")  # wrapped
    assert choose(UPSTREAM, set(), scan_from=A("192.0.2.1")) == A("10.0.0.2")  # outside: ignored
    rng_pick = choose(UPSTREAM, set(), rng=random.Random(7), scan_from=A("10.0.0.40"))
    assert rng_pick == choose(UPSTREAM, set(), rng=random.Random(7))  # random order ignores it
    everything = {A(f"10.0.0.{n}") for n in range(2, 255)}
    with pytest.raises(PoolExhausted):
        choose(UPSTREAM, everything, scan_from=A("10.0.0.40"))
