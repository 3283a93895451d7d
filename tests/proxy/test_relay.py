"""The relay driven through fake sockets and a fake loop: backpressure, half-close, errors."""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Callable
from typing import Any

import pytest

from gateway.proxy.relay import Relay, Side


class FakeLoop:
    """Records reader/writer registrations like uvloop's add_reader/add_writer."""

    def __init__(self) -> None:
        self.readers: dict[int, tuple[Callable[..., Any], tuple[Any, ...]]] = {}
        self.writers: dict[int, tuple[Callable[..., Any], tuple[Any, ...]]] = {}

    def add_reader(self, fd: int, cb: Callable[..., Any], *args: Any) -> None:
        self.readers[fd] = (cb, args)

    def remove_reader(self, fd: int) -> bool:
        return self.readers.pop(fd, None) is not None

    def add_writer(self, fd: int, cb: Callable[..., Any], *args: Any) -> None:
        self.writers[fd] = (cb, args)

    def remove_writer(self, fd: int) -> bool:
        return self.writers.pop(fd, None) is not None

    def readable(self, fd: int) -> None:
        cb, args = self.readers[fd]
        cb(*args)

    def writable(self, fd: int) -> None:
        cb, args = self.writers[fd]
        cb(*args)


class FakeSock:
    """A socket whose reads come from a script and whose writes accept ``capacity`` bytes."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self.incoming: list[bytes | BaseException] = []
        self.sent = bytearray()
        self.capacity = 1 << 30
        self.shut_wr = False
        self.closed = False

    def fileno(self) -> int:
        return self._fd

    def recv(self, n: int) -> bytes:
        if not self.incoming:
            raise BlockingIOError
        item = self.incoming.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    def send(self, data: Any) -> int:
        data = bytes(data)
        if self.capacity <= 0:
            raise BlockingIOError
        n = min(len(data), self.capacity)
        self.capacity -= n
        self.sent += data[:n]
        return n

    def shutdown(self, how: int) -> None:
        assert how == socket.SHUT_WR
        self.shut_wr = True

    def close(self) -> None:
        self.closed = True


class FakeTls:
    """Stands in for ``_ssl._SSLSocket``: read/write over a FakeSock, all-or-nothing writes."""

    def __init__(self, sock: FakeSock) -> None:
        self.sock = sock
        self.close_notify = False

    def read(self, n: int) -> bytes:
        return self.sock.recv(n)

    def write(self, data: Any) -> int:
        data = bytes(data)
        if self.sock.capacity < len(data):
            raise ssl.SSLWantWriteError
        return self.sock.send(data)

    def shutdown(self) -> None:
        self.close_notify = True


def make(tls: bool = False) -> tuple[FakeLoop, Relay, FakeSock, FakeSock, list[str], Any]:
    loop = FakeLoop()
    c, b = FakeSock(10), FakeSock(11)
    t = FakeTls(c) if tls else None
    done: list[str] = []
    relay = Relay(loop, Side(c, t), Side(b), 65536, done.append)  # type: ignore[arg-type]
    return loop, relay, c, b, done, t


def test_bytes_flow_both_ways_untouched() -> None:
    loop, relay, c, b, done, _ = make()
    relay.start()
    assert set(loop.readers) == {10, 11}
    c.incoming.append(b"request")
    loop.readable(10)
    b.incoming.append(b"response")
    loop.readable(11)
    assert bytes(b.sent) == b"request" and bytes(c.sent) == b"response"
    assert relay.activity() == len(b"request") + len(b"response")
    assert not done


def test_proxy_header_goes_first() -> None:
    loop, relay, c, b, _, _ = make()
    relay.start(b"PROXY TCP4 1.1.1.1 2.2.2.2 1 2\r\n")
    c.incoming.append(b"data")
    loop.readable(10)
    assert bytes(b.sent) == b"PROXY TCP4 1.1.1.1 2.2.2.2 1 2\r\ndata"


def test_backpressure_stops_reading_the_source_until_flushed() -> None:
    loop, relay, c, b, done, _ = make()
    relay.start()
    b.capacity = 3
    c.incoming.append(b"abcdefgh")
    loop.readable(10)
    assert bytes(b.sent) == b"abc"
    assert 10 not in loop.readers  # the client is paused ...
    assert 11 in loop.writers  # ... while the backend's buffer drains
    assert 11 in loop.readers  # the other direction keeps flowing
    b.capacity = 2
    loop.writable(11)
    assert bytes(b.sent) == b"abcde" and 10 not in loop.readers
    b.capacity = 100
    loop.writable(11)
    assert bytes(b.sent) == b"abcdefgh"
    assert 11 not in loop.writers and 10 in loop.readers  # resumed
    assert not done


def test_half_close_is_propagated_and_other_direction_continues() -> None:
    loop, relay, c, b, done, _ = make()
    relay.start()
    c.incoming.append(b"")  # client FIN
    loop.readable(10)
    assert b.shut_wr and 10 not in loop.readers
    b.incoming.append(b"late reply")
    loop.readable(11)
    assert bytes(c.sent) == b"late reply"
    assert not done
    b.incoming.append(b"")  # backend FIN: both directions done
    loop.readable(11)
    assert c.shut_wr
    assert done == ["done"] and c.closed and b.closed
    assert not loop.readers and not loop.writers


def test_eof_waits_for_pending_bytes_before_shutdown() -> None:
    loop, relay, c, b, done, _ = make()
    relay.start()
    c.capacity = 0
    b.incoming.append(b"tail")
    loop.readable(11)
    b.incoming.append(b"")
    # backend is paused by backpressure, so its EOF is only seen after the flush
    assert 11 not in loop.readers
    c.capacity = 10
    loop.writable(10)
    assert bytes(c.sent) == b"tail" and 11 in loop.readers
    loop.readable(11)
    assert c.shut_wr and not done


def test_tls_client_gets_close_notify_when_backend_ends() -> None:
    loop, relay, c, b, done, tls = make(tls=True)
    relay.start()
    b.incoming += [b"body", b""]
    loop.readable(11)
    loop.readable(11)
    assert bytes(c.sent) == b"body"
    assert tls.close_notify and done == ["done"] and c.closed and b.closed


def test_tls_client_close_notify_half_closes_backend() -> None:
    loop, relay, c, b, done, tls = make(tls=True)
    relay.start()
    c.incoming.append(ssl.SSLZeroReturnError())
    loop.readable(10)
    assert b.shut_wr and not done
    b.incoming.append(b"reply after client EOF")
    loop.readable(11)
    assert bytes(c.sent) == b"reply after client EOF"


def test_tls_write_retries_the_same_buffer() -> None:
    loop, relay, c, b, done, tls = make(tls=True)
    relay.start()
    c.capacity = 2
    b.incoming.append(b"0123456789")
    loop.readable(11)
    assert bytes(c.sent) == b"" and 10 in loop.writers and 11 not in loop.readers
    c.capacity = 100
    loop.writable(10)
    assert bytes(c.sent) == b"0123456789" and 11 in loop.readers


@pytest.mark.parametrize(
    ("error", "reason"),
    [(ConnectionResetError(), "reset"), (ssl.SSLError(1, "bad record mac"), "tls_error")],
)
def test_errors_finish_both_sides(error: BaseException, reason: str) -> None:
    loop, relay, c, b, done, tls = make(tls=True)
    relay.start()
    c.incoming.append(error)
    loop.readable(10)
    assert done == [reason] and c.closed and b.closed
    assert not tls.close_notify  # never close_notify on a broken stream
    assert not loop.readers and not loop.writers


def test_finish_without_notify_is_idempotent() -> None:
    loop, relay, c, b, done, tls = make(tls=True)
    relay.start()
    relay.finish("idle_timeout", notify=False)
    relay.finish("again")
    assert done == [] and c.closed and b.closed and tls.close_notify


# -- splice (real socket pairs: os.splice needs real descriptors) ----------------------------


def _pairs() -> tuple[socket.socket, socket.socket, socket.socket, socket.socket]:
    ca, cb = socket.socketpair()  # the relay holds ca (client side), the test is cb
    ba, bb = socket.socketpair()  # the relay holds ba (backend side), the test is bb
    for s in (ca, cb, ba, bb):
        s.setblocking(False)
    return ca, cb, ba, bb


def _drain(sock: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


def test_splice_takes_over_after_the_threshold_and_keeps_order() -> None:
    from gateway.proxy.relay import PipePool

    ca, cb, ba, bb = _pairs()
    loop, pool = FakeLoop(), PipePool(size=65536)
    done: list[str] = []
    relay = Relay(loop, Side(ca), Side(ba), 4096, done.append, pool, splice_after=10)
    try:
        relay.start()
        cb.send(b"0123456789ab")
        loop.readable(ca.fileno())  # recv path, then the direction switches to splice
        assert relay.client.pipe is not None
        assert loop.readers[ca.fileno()][0] == relay._on_splice
        payload = os.urandom(3 << 20)
        sent = 0
        got = bytearray()
        paused = 0
        for _ in range(100000):
            if sent < len(payload):
                try:
                    sent += cb.send(payload[sent : sent + 65536])
                except BlockingIOError:
                    pass
            if ca.fileno() in loop.readers:
                loop.readable(ca.fileno())
            if ba.fileno() in loop.writers:  # backend full: the rest waits in the pipe
                assert ca.fileno() not in loop.readers
                paused += 1
                loop.writable(ba.fileno())  # still full: nothing moves, nothing breaks
                got += _drain(bb)
                loop.writable(ba.fileno())
            elif sent >= len(payload):
                got += _drain(bb)
            if len(got) == 12 + len(payload):
                break
        assert bytes(got) == b"0123456789ab" + payload
        assert paused > 0
        cb.shutdown(socket.SHUT_WR)
        loop.readable(ca.fileno())  # splice returns 0: EOF is propagated
        assert bb.recv(10) == b""
        bb.shutdown(socket.SHUT_WR)
        loop.readable(ba.fileno())
        assert done == ["done"]
        assert len(pool.free) == 1  # the empty pipe went back to the pool
    finally:
        relay.finish("test", notify=False)
        pool.close()
        for s in (cb, bb):
            s.close()


def test_a_pipe_still_holding_bytes_is_never_pooled() -> None:
    """Found by the benchmark: a relay reset while bytes sat in its pipe returned the pipe
    to the pool, and the next connection sent those stale bytes first (and its worker spun
    on the always-readable pipe)."""
    from gateway.proxy.relay import PipePool

    pool = PipePool(size=65536)
    try:
        full = pool.take()
        empty = pool.take()
        assert full is not None and empty is not None
        os.write(full[1], b"stale")
        pool.give(full, empty=True)  # the bookkeeping claims empty: the kernel says not
        pool.give(empty, empty=True)
        assert pool.free == [empty]
        with pytest.raises(OSError):
            os.fstat(full[0])  # closed, not pooled
    finally:
        pool.close()


def test_reset_while_bytes_wait_in_the_pipe_closes_the_pipe() -> None:
    from gateway.proxy.relay import PipePool

    ca, cb, ba, bb = _pairs()
    loop, pool = FakeLoop(), PipePool(size=65536)
    relay = Relay(loop, Side(ca), Side(ba), 4096, lambda _: None, pool, splice_after=10)
    try:
        relay.start()
        cb.send(b"0123456789ab")
        loop.readable(ca.fileno())  # recv path, then the direction switches to splice
        assert relay.client.pipe is not None and _drain(bb) == b"0123456789ab"
        bb.close()  # the backend is gone: splicing the pipe into it fails
        cb.send(b"x" * 1000)
        loop.readable(ca.fileno())  # socket -> pipe works, pipe -> backend fails: reset
        assert relay.done
        assert pool.free == []  # whatever was spliced in was not handed to anyone else
    finally:
        relay.finish("test", notify=False)
        pool.close()
        cb.close()


def test_no_splice_with_tls_or_when_disabled() -> None:
    from gateway.proxy.relay import PipePool

    loop = FakeLoop()
    c, b = FakeSock(1), FakeSock(2)
    r = Relay(loop, Side(c, FakeTls(c)), Side(b), 10, print, PipePool(), 0)  # type: ignore[arg-type]
    assert r.pipes is None
    r2 = Relay(loop, Side(FakeSock(3)), Side(FakeSock(4)), 10, print, PipePool(), -1)  # type: ignore[arg-type]
    assert r2.pipes is None


def test_start_takes_over_or_drops_the_callers_registrations() -> None:
    loop, relay, c, b, done, _ = make()
    loop.add_reader(10, print)  # registered by the connection before the relay existed
    b.capacity = 3  # the PROXY header does not fit: the client must be paused
    relay.start(b"PROXY ...\r\n", client_registered=True)
    assert 10 not in loop.readers and 11 in loop.writers and 11 in loop.readers
    loop2, relay2, c2, b2, done2, _ = make()
    loop2.add_reader(10, print)
    relay2.backend.send = lambda data: (_ for _ in ()).throw(ConnectionResetError())
    relay2.start(b"PROXY ...\r\n", client_registered=True)
    assert done2 == ["reset"] and not loop2.readers and not loop2.writers  # nothing left behind
    loop3, relay3, *_ = make()
    loop3.add_reader(10, print)
    relay3.start(client_registered=True)
    assert loop3.readers[10][0] == relay3._on_read  # swapped, not duplicated
