"""Connection timers and phase table, with a fake loop clock (no real waiting)."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.proxy.conn import TRANSITIONS, Conn, Phase
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


def test_round_robin_turns_rotate_per_app_and_start_per_worker() -> None:
    """Successive connections of one worker race the app's rotations in turn (first choice
    A, B, A, ...); another worker starts one further; another app keeps its own turn."""
    from gateway.proxy.decide import Target, Upstream

    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    port = lsock.getsockname()[1]
    # two "instances" on one listener: which was connected first is what this test observes
    a, b = Target("a", "127.0.0.1", False), Target("b", "127.0.0.1", False)
    try:

        def first_choices(index: int, turns: dict[str, int], app: str, n: int) -> list[str]:
            out = []
            for _ in range(n):
                c1, c2 = socket.socketpair()
                c1.setblocking(False)
                conn, _loop, _state = make(c1)
                conn.w.state.index = index
                conn.w.turns = turns
                conn.start()
                ups = Upstream(app, port, (a, b), ((a, b), (b, a)))
                conn.upstream = ups
                conn.phase = Phase.CONNECTING
                conn._start_connect()
                out.append(conn.connecting[0][1].instance_id)  # the first SYN sent
                assert [t for _, t in conn.connecting] in ([a, b], [b, a])  # still raced
                conn.close("done")
                c2.close()
            return out

        turns: dict[str, int] = {}
        assert first_choices(0, turns, "app", 5) == ["a", "b", "a", "b", "a"]
        assert first_choices(0, turns, "other", 2) == ["a", "b"]  # its own turn
        assert first_choices(0, turns, "app", 1) == ["b"]  # kept across other apps
        assert first_choices(1, {}, "app", 2) == ["b", "a"]  # worker 1 starts further on
    finally:
        lsock.close()
