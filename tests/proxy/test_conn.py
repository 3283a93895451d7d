"""Connection timers and phase table, with a fake loop clock (no real waiting)."""

from __future__ import annotations

import select
import socket
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.proxy.balance import HEAD_START, Turns
from gateway.proxy.conn import TRANSITIONS, Conn, Phase
from gateway.proxy.decide import Target, Upstream
from gateway.proxy.settings import ProxySettings, Timeouts
from gateway.proxy.stats import WorkerState


class Handle:
    def __init__(self, when: float, cb: Callable[[], None]) -> None:
        self.when, self.cb, self.cancelled = when, cb, False

    def cancel(self) -> None:
        self.cancelled = True


class ClockLoop:
    def __init__(self) -> None:
        self.now = 100.0
        self.handles: list[Handle] = []
        self.readers: dict[int, Any] = {}

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, cb: Callable[[], None]) -> Handle:
        h = Handle(when, cb)
        self.handles.append(h)
        return h

    def add_reader(self, fd: int, cb: Any, *args: Any) -> None:
        self.readers[fd] = cb

    def remove_reader(self, fd: int) -> bool:
        return self.readers.pop(fd, None) is not None

    def add_writer(self, fd: int, cb: Any, *args: Any) -> None:
        pass

    def remove_writer(self, fd: int) -> bool:
        return False

    def advance_to_next(self) -> float:
        live = [h for h in self.handles if not h.cancelled]
        h = min(live, key=lambda h: h.when)
        self.handles.remove(h)
        self.now = h.when
        h.cb()
        return h.when


class FakeRelay:
    def __init__(self) -> None:
        self.moved = 0
        self.finished: list[str] = []
        self.client = SimpleNamespace(nread=3)
        self.backend = SimpleNamespace(nread=4)

    def activity(self) -> int:
        return self.moved

    def finish(self, reason: str, notify: bool = True) -> None:
        self.finished.append(reason)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)  # as every accepted socket is
    yield a, b
    a.close()
    b.close()


def make(sock: socket.socket, **timeouts: float) -> tuple[Conn, ClockLoop, WorkerState]:
    loop = ClockLoop()
    settings = ProxySettings(timeouts=Timeouts(**timeouts))
    state = WorkerState()
    state.open = 1
    w = SimpleNamespace(
        loop=loop,
        settings=settings,
        timeouts=settings.timeouts,
        state=state,
        conns=set(),
        access_enabled=False,
        app_limit=0,
        turns=Turns(),
    )
    conn = Conn(w, sock, ("192.0.2.1", 1), 443)  # type: ignore[arg-type]
    w.conns.add(conn)
    return conn, loop, state


def test_hello_must_arrive_within_the_handshake_timeout(pair: Any) -> None:
    conn, loop, state = make(pair[0], handshake=2.0)
    conn.start()
    assert loop.advance_to_next() == 102.0
    assert conn.phase is Phase.CLOSED
    assert state.errors["handshake_timeout"] == 1 and state.open == 0 and state.closed == 1
    assert not loop.readers


def test_idle_watchdog_rearms_only_while_bytes_move(pair: Any) -> None:
    conn, loop, state = make(pair[0], idle=10.0)
    conn.start()
    conn.phase = Phase.RELAYING
    relay = FakeRelay()
    conn.relay = relay  # type: ignore[assignment]
    conn._rearm(10.0)
    relay.moved = 5
    assert loop.advance_to_next() == 110.0  # bytes moved since the start: re-arm
    assert conn.phase is Phase.RELAYING
    relay.moved = 9
    assert loop.advance_to_next() == 120.0  # moved again
    assert conn.phase is Phase.RELAYING
    assert loop.advance_to_next() == 130.0  # nothing for a whole window: reaped
    phase: Phase = conn.phase  # re-read: mypy keeps the RELAYING narrowing across the timer
    assert phase is Phase.CLOSED
    assert relay.finished == ["idle_timeout"]
    assert state.errors["idle_timeout"] == 1
    assert (state.bytes_up, state.bytes_down) == (3, 4)


def test_total_deadline_caps_a_busy_connection(pair: Any) -> None:
    conn, loop, state = make(pair[0], idle=10.0, total=25.0)
    conn.start()
    conn.phase = Phase.RELAYING
    relay = FakeRelay()
    conn.relay = relay  # type: ignore[assignment]
    conn._rearm(10.0)
    for _ in range(5):
        relay.moved += 1
        loop.advance_to_next()
        if conn.phase is Phase.CLOSED:
            break
    assert loop.now == 125.0
    assert relay.finished == ["total_timeout"]


def test_every_phase_can_only_move_forward() -> None:
    order = list(Phase)
    for src, targets in TRANSITIONS.items():
        for dst in targets:
            assert order.index(dst) > order.index(src), (src, dst)
    assert set(TRANSITIONS) == set(Phase)


def test_illegal_transition_names_both_phases(pair: Any) -> None:
    conn, _, _ = make(pair[0])
    with pytest.raises(RuntimeError, match="AWAIT_HELLO -> RELAYING"):
        conn._enter(Phase.RELAYING)


def test_drain_closes_connections_that_are_not_relaying(pair: Any) -> None:
    conn, _, state = make(pair[0])
    conn.start()
    conn.shutdown()
    assert conn.phase is Phase.CLOSED and state.errors["drain"] == 1


A, B = Target("a", "127.0.0.1", False), Target("b", "127.0.0.2", False)
DEAD = Target("dead", "127.0.0.3", False)  # nothing listens there: refused at once


@pytest.fixture
def listener() -> Iterator[int]:
    """A port on 127.0.0.1 and 127.0.0.2 that accepts (127.0.0.3 refuses it)."""
    socks = []
    port = 0
    for host in ("127.0.0.1", "127.0.0.2"):
        lsock = socket.socket()
        lsock.bind((host, port))
        lsock.listen(64)
        port = lsock.getsockname()[1]
        socks.append(lsock)
    yield port
    for lsock in socks:
        lsock.close()


def connecting(
    turns: Turns, ups: Upstream
) -> Iterator[tuple[Conn, ClockLoop, list[Target], tuple[Target, ...] | None]]:
    """A connection in CONNECTING that has just started its race for ``ups``."""
    c1, c2 = socket.socketpair()
    c1.setblocking(False)
    conn, loop, _state = make(c1)
    conn.w.turns = turns
    conn.start()
    conn.upstream = ups
    conn.phase = Phase.CONNECTING
    conn._start_connect()
    try:
        yield conn, loop, [t for _, t in conn.connecting], conn.later
    finally:
        conn.close("done")
        c2.close()


def test_round_robin_turns_rotate_per_app_and_start_per_worker(listener: int) -> None:
    """Successive connections of one worker start with the app's rotations in turn (A, B,
    A, ...); another app keeps its own turn; another worker starts one further on."""

    def first_choices(turns: Turns, app: str, n: int) -> list[str]:
        out = []
        for _ in range(n):
            ups = Upstream(app, listener, (A, B), ((A, B), (B, A)))
            for _conn, _loop, flying, later in connecting(turns, ups):
                assert len(flying) == 1 and later is not None and len(later) == 1  # staggered
                out.append(flying[0].instance_id)
        return out

    turns = Turns(start=0)
    assert first_choices(turns, "app", 5) == ["a", "b", "a", "b", "a"]
    assert first_choices(turns, "other", 2) == ["a", "b"]  # its own turn
    assert first_choices(turns, "app", 1) == ["b"]  # kept across other apps
    assert first_choices(Turns(start=1), "app", 2) == ["b", "a"]  # worker 1


def test_staggered_race_next_candidate_joins_after_the_head_start(listener: int) -> None:
    turns = Turns()
    ups = Upstream("app", listener, (A, B), ((A, B), (B, A)))
    for conn, loop, flying, later in connecting(turns, ups):
        assert flying == [A] and later == (B,)
        assert loop.advance_to_next() == pytest.approx(100.0 + HEAD_START)
        assert [t for _, t in conn.connecting] == [A, B]  # raced from now on
        assert conn.later == () and turns.is_slow(A.host)  # A is passed over a while
        assert conn.phase is Phase.CONNECTING
        assert loop.advance_to_next() == pytest.approx(100.0 + 5.0)  # then: connect timeout
        phase: Phase = conn.phase  # re-read (mypy keeps the narrowing across the timer)
        assert phase is Phase.CLOSED
    # the next connection's first choice is B (A's turn skipped while it is held back)
    for conn, _loop, flying, _later in connecting(turns, ups):
        assert flying == [B]
        assert conn.upstream_text() == f"127.0.0.2,127.0.0.1:{listener}"  # as tried


def test_staggered_race_moves_on_at_once_when_the_first_choice_refuses(listener: int) -> None:
    turns = Turns()
    ups = Upstream("app", listener, (DEAD, A), ((DEAD, A), (A, DEAD)))
    for conn, loop, flying, _later in connecting(turns, ups):
        assert flying == [DEAD]
        bsock, target = conn.connecting[0]
        assert select.select([], [bsock], [], 2.0)[1]  # the RST (SO_ERROR is read once)
        conn._on_connect(bsock, target)  # what the loop calls when the socket is writable
        assert [t for _, t in conn.connecting] == [A] and loop.now == 100.0  # no waiting
        assert turns.is_slow(DEAD.host) and conn.phase is Phase.CONNECTING


def test_freshest_races_every_candidate_at_once(listener: int) -> None:
    ups = Upstream("app", listener, (B, A))  # no rotations: upstream's race
    for conn, _loop, flying, later in connecting(Turns(), ups):
        assert flying == [B, A] and later is None
        assert conn.phase is Phase.CONNECTING
