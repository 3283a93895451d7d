"""Per-worker balancing state: whose turn it is, and which instances did not answer lately.

``decide`` (pure, cached per SNI per snapshot) precomputes an app's candidate orders in
``Upstream.rotations`` (``proxy.balance = "round_robin"``); what changes from one connection
to the next lives here, in one object per worker (no globals, nothing shared across
processes):

* **turns**: app id -> the next rotation to use. A new app starts at the worker's index, so
  that workers do not all begin with the same instance. Kept across snapshot swaps (a
  registry table is rebuilt every couple of seconds; the rotations are sorted by instance id
  in ``decide`` so that they stay the same).
* **slow hosts**: a first choice that refused, or did not answer within the connect head
  start, is passed over as first choice for ``hold`` seconds (nginx's ``max_fails=1
  fail_timeout=10s``), so that a silently dead instance, which stays "fresh" until its
  handshake ages past the stale window, costs the head start once per ``hold`` and worker
  rather than on every N-th connection. It is still raced after the others' head start, and
  the first connection it wins clears it.

The per-connection path (``order``) is two dict operations, a modulo and an index when no
host is slow (one truthiness check more); nothing is allocated.
"""

from __future__ import annotations

from gateway.proxy.decide import Target, Upstream

__all__ = ["HEAD_START", "Turns"]

HEAD_START = 0.1
"""Seconds the first choice of a rotation has to accept before the next candidate joins the
race. A live instance answers a SYN within a round trip (WireGuard adds one more when it has
to re-key); RFC 8305 (Happy Eyeballs) uses 250 ms between address families over the
internet. A refusal moves on at once."""

_MAX_APPS = 4096  # remembered turns (cleared when full)
_MAX_SLOW = 4096  # remembered slow hosts (cleared when full)


class Turns:
    """One worker's round-robin turns and slow hosts (see the module docstring)."""

    __slots__ = ("_next", "_slow", "_start", "hold")

    def __init__(self, start: int = 0, hold: float = 10.0) -> None:
        self._next: dict[str, int] = {}
        self._slow: dict[str, float] = {}  # host -> loop time until which it is passed over
        self._start = start
        self.hold = hold

    def order(self, upstream: Upstream, now: float) -> tuple[Target, ...]:
        """The candidates to race for one new connection, first choice first."""
        rotations = upstream.rotations
        if not rotations:
            return upstream.targets
        app = upstream.app_id
        nxt = self._next
        turn = nxt.get(app)
        if turn is None:
            turn = self._start
            if len(nxt) >= _MAX_APPS:
                nxt.clear()
        nxt[app] = turn + 1
        order = rotations[turn % len(rotations)]
        if self._slow and order[0].host in self._slow:
            return self._avoid_slow(rotations, turn, now)
        return order

    def _avoid_slow(
        self, rotations: tuple[tuple[Target, ...], ...], turn: int, now: float
    ) -> tuple[Target, ...]:
        """The next rotation whose first choice is not held back (all are: the turn's own)."""
        slow = self._slow
        n = len(rotations)
        for k in range(n):
            order = rotations[(turn + k) % n]
            host = order[0].host
            until = slow.get(host)
            if until is None:
                return order
            if until <= now:  # held long enough: first choice again (a probe)
                del slow[host]
                return order
        return rotations[turn % n]

    def slow(self, host: str, now: float) -> None:
        """``host`` refused, or did not answer within the head start."""
        slow = self._slow
        if len(slow) >= _MAX_SLOW and host not in slow:
            slow.clear()
        slow[host] = now + self.hold

    def answered(self, host: str) -> None:
        """``host`` accepted a connection: no longer held back."""
        if self._slow:
            self._slow.pop(host, None)

    def is_slow(self, host: str) -> bool:
        """For tests and status: is ``host`` currently held back?"""
        return host in self._slow
