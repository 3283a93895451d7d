"""Turns: a worker's round-robin state (pure; the race itself is in test_conn.py)."""

from __future__ import annotations

from collections import Counter

from gateway.proxy.balance import Turns
from gateway.proxy.decide import Target, Upstream

T = [Target(f"i{i}", f"10.0.0.{i}", False) for i in range(4)]


def rr(app: str, n: int, width: int = 2) -> Upstream:
    """An upstream with ``n`` fresh instances, as ``decide`` builds it for round robin."""
    rotations = tuple(tuple(T[(i + k) % n] for k in range(min(width, n))) for i in range(n))
    return Upstream(app, 80, rotations[0], rotations)


def firsts(turns: Turns, ups: Upstream, n: int, now: float = 0.0) -> list[str]:
    return [turns.order(ups, now)[0].instance_id for _ in range(n)]


def test_each_instance_is_first_in_turn_per_app() -> None:
    turns = Turns()
    three = rr("app", 3)
    assert firsts(turns, three, 7) == ["i0", "i1", "i2", "i0", "i1", "i2", "i0"]
    assert firsts(turns, rr("other", 2), 3) == ["i0", "i1", "i0"]  # its own counter
    assert firsts(turns, three, 1) == ["i1"]  # unaffected by the other app
    counts = Counter(firsts(turns, three, 300))
    assert set(counts.values()) == {100}


def test_workers_start_at_their_index() -> None:
    assert firsts(Turns(start=1), rr("app", 3), 3) == ["i1", "i2", "i0"]
    assert firsts(Turns(start=5), rr("app", 2), 2) == ["i1", "i0"]


def test_no_rotations_means_the_decision_order() -> None:
    ups = Upstream("app", 80, (T[2], T[1]))
    assert Turns().order(ups, 0.0) is ups.targets


def test_a_slow_host_is_passed_over_as_first_choice_until_its_hold_ends() -> None:
    turns = Turns(hold=10.0)
    ups = rr("app", 3)
    turns.slow("10.0.0.0", now=100.0)
    assert turns.is_slow("10.0.0.0")
    got = firsts(turns, ups, 6, now=105.0)
    assert "i0" not in got and set(got) == {"i1", "i2"}
    # the hold is over: i0 is first choice again at its turn (a probe), and forgotten
    got = firsts(turns, ups, 3, now=111.0)
    assert sorted(got) == ["i0", "i1", "i2"] and not turns.is_slow("10.0.0.0")


def test_a_slow_host_is_still_raced_behind_the_others() -> None:
    turns = Turns()
    ups = rr("app", 2)  # rotations (i0, i1), (i1, i0)
    turns.slow("10.0.0.0", now=0.0)
    assert [turns.order(ups, 1.0) for _ in range(2)] == [(T[1], T[0])] * 2


def test_answering_clears_and_all_slow_falls_back_to_the_turn() -> None:
    turns = Turns()
    ups = rr("app", 2)
    turns.slow("10.0.0.0", 0.0)
    turns.slow("10.0.0.1", 0.0)
    assert firsts(turns, ups, 2, now=1.0) == ["i0", "i1"]  # nobody better: plain turns
    turns.answered("10.0.0.0")
    assert not turns.is_slow("10.0.0.0") and turns.is_slow("10.0.0.1")
    assert firsts(turns, ups, 2, now=1.0) == ["i0", "i0"]


def test_memory_is_bounded() -> None:
    turns = Turns()
    for i in range(5000):
        turns.order(rr(f"app{i}", 2), 0.0)
        turns.slow(f"10.1.{i // 250}.{i % 250}", 0.0)
    assert len(turns._next) <= 4096 and len(turns._slow) <= 4096
