"""What round-robin balancing costs (not a test; numbers for docs/proxy.md).

Run: ``.venv/bin/python -m benchmarks.balance_bench``. Figures are the best of several repeats
(least disturbed by other work on a shared machine), in CPU microseconds (``process_time``:
user + system of this process).

* per connection: the real ``Conn._start_connect`` (socket, non-blocking connect to a
  loopback listener, one or two candidates) with ``proxy.balance = "round_robin"`` and
  ``"freshest"``, on a fake loop. The difference is the turn pick (two dict operations, a
  modulo and an index) and is within the syscalls' noise; the pick alone is measured too;
* per SNI and snapshot (cached between snapshot swaps): ``decide`` for apps of 2, 10 and 100
  fresh instances, both modes: round robin builds every rotation once.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from gateway.certs.store import CertSnapshot
from gateway.protocol.clienthello import ClientHello
from gateway.proxy.balance import Turns
from gateway.proxy.conn import Conn, Phase
from gateway.proxy.decide import ConnInfo, Snapshot, Target, Upstream, decide
from gateway.proxy.routes import Candidate, PortPolicy
from gateway.proxy.settings import Balance, ProxySettings
from gateway.proxy.stats import WorkerState


class _Handle:
    def cancel(self) -> None:
        pass


class _Loop:
    """Enough of a loop for ``_start_connect``: timers and watchers are no-ops."""

    def time(self) -> float:
        return 0.0

    def call_at(self, when: float, cb: Callable[[], None]) -> _Handle:
        return _Handle()

    def add_reader(self, fd: int, cb: Any, *args: Any) -> None:
        pass

    def remove_reader(self, fd: int) -> bool:
        return True

    def add_writer(self, fd: int, cb: Any, *args: Any) -> None:
        pass

    def remove_writer(self, fd: int) -> bool:
        return True


def cpu_us(fn: Callable[[], object], number: int, repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        for _ in range(number):
            fn()
        best = min(best, time.process_time() - t0)
    return best / number * 1e6


def start_connect_us(upstream: Upstream, number: int, repeat: int = 5) -> float:
    """CPU per ``_start_connect`` for ``upstream`` (sockets opened and closed each time)."""
    settings = ProxySettings()
    state = WorkerState()
    w = SimpleNamespace(
        loop=_Loop(), settings=settings, timeouts=settings.timeouts, state=state,
        conns=set(), access_enabled=False, app_limit=0, turns=Turns(),
    )  # fmt: skip
    client, peer = socket.socketpair()
    conn = Conn(w, client, ("192.0.2.1", 1), 443)  # type: ignore[arg-type]
    conn.timer = _Handle()
    conn.upstream = upstream

    def one() -> None:
        conn.phase = Phase.CONNECTING
        conn._start_connect()
        conn._abandon_others()  # closes the sockets (as a lost race does)

    try:
        return cpu_us(one, number, repeat)
    finally:
        client.close()
        peer.close()


def pick_us(number: int) -> float:
    """The turn pick alone, as ``_start_connect`` does it."""
    turns: dict[str, int] = {}
    rotations = ((1, 2), (2, 1))

    def one() -> object:
        turn = turns.get("app")
        if turn is None:
            turn = 0
        turns["app"] = turn + 1
        return rotations[turn % len(rotations)]

    return cpu_us(one, number)


def decide_us(n: int, balance: Balance) -> float:
    cands = tuple(
        Candidate(f"i{i:03d}", "app", f"10.0.{i // 250}.{i % 250 + 2}", PortPolicy(), float(i))
        for i in range(n)
    )

    class Table:
        def lookup(self, ident: str, top_n: int) -> tuple[Candidate, ...]:
            return cands[:top_n]

    snap = Snapshot(("gw.test",), CertSnapshot(), Table(), balance=balance)
    hello = ClientHello("app-s.gw.test", (), (0x0304,), 0x0303, 200)
    info = ConnInfo(("192.0.2.1", 1), 443)
    return cpu_us(lambda: decide(hello, info, snap), 200 if n >= 100 else 2000)


def main() -> int:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    port = listener.getsockname()[1]
    a, b = Target("a", "127.0.0.1", False), Target("b", "127.0.0.1", False)
    rows: list[tuple[str, float]] = []
    try:
        cases = (
            ("_start_connect, 2 candidates, freshest", Upstream("app", port, (a, b))),
            (
                "_start_connect, 2 candidates, round_robin",
                Upstream("app", port, (a, b), ((a, b), (b, a))),
            ),
            ("_start_connect, 1 candidate", Upstream("app", port, (a,))),
        )
        listener.setblocking(False)
        best = dict.fromkeys([label for label, _ in cases], float("inf"))
        for _ in range(3):  # interleaved, so that drift on the machine hits every case
            for label, ups in cases:
                best[label] = min(best[label], start_connect_us(ups, 500, repeat=1))
                while True:  # empty the accept queue between runs
                    try:
                        listener.accept()[0].close()
                    except BlockingIOError:
                        break
        rows.extend(best.items())
    finally:
        listener.close()
    rows.append(("turn pick alone (per connection, round_robin)", pick_us(200_000)))
    for n in (2, 10, 100):
        for balance in Balance:
            rows.append(
                (f"decide, {n} fresh instances, {balance.value} (per SNI)", decide_us(n, balance))
            )
    width = max(len(label) for label, _ in rows)
    for label, us in rows:
        print(f"{label:<{width}}  {us:9.3f} us CPU")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
