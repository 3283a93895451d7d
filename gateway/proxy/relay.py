"""The byte relay between a client and a backend: readiness callbacks, no tasks, no copies.

Each side is a non-blocking socket, or for terminated TLS the C-level ``_ssl._SSLSocket``
over the client socket (OpenSSL reads and writes the file descriptor itself: "socket BIO").
A :class:`Side` holds that side's bound ``recv``/``send`` methods, so a chunk costs one
readiness callback, one ``recv`` and one ``send``: the received ``bytes`` object is handed to
the peer unchanged, and only a counter is bumped.

Backpressure: when a ``send`` does not take the whole chunk, the rest is kept as ``pending``,
reading from the other side stops, and a writer callback flushes; reading resumes when the
buffer is empty. So each direction holds at most one chunk in memory.

Half-close: EOF from one side (FIN, TLS close_notify, or a ragged TLS EOF, treated as clean as
upstream does) becomes ``shutdown(SHUT_WR)`` towards the other once its pending bytes are
flushed, and the other direction keeps flowing. A TLS side cannot be half-closed portably,
so a backend EOF on a terminated connection flushes, sends close_notify and closes. The relay
is finished when both directions are done, or on the first error.

Splice: between two plain sockets (passthrough), once a direction has moved
``splice_after`` bytes its reader switches to ``os.splice`` socket -> pipe -> socket, so the
bytes never enter user space; what the destination does not take stays in the pipe, and that
is the backpressure state (``in_pipe``) instead of ``pending``. Pipes come from a
:class:`PipePool` and go back to it empty.

The loop is any object with ``add_reader``/``remove_reader``/``add_writer``/``remove_writer``
(uvloop in production, a fake in the unit tests).
"""

from __future__ import annotations

import fcntl
import os
import socket
import ssl
import sys
import termios
from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["PipePool", "Relay", "Side"]

_WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
_CLEAN_EOF = (ssl.SSLZeroReturnError, ssl.SSLEOFError)
_NO_CLOSE_NOTIFY = frozenset({"reset", "tls_error"})  # the TLS stream is unusable after these
_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_TLS_RECORD = 16384
_F_SETPIPE_SZ = 1031


def _pipe_bytes(fd: int) -> int:
    """Bytes waiting in a pipe (``FIONREAD``); -1 if the kernel will not say."""
    try:
        buf = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return -1
    return int.from_bytes(buf, sys.byteorder, signed=True)


class PipePool:
    """Empty pipes for ``splice`` relays, reused across connections (one per direction).

    ``splice(2)`` moves bytes socket -> pipe -> socket inside the kernel: about half the CPU
    per MB of ``recv`` + ``send`` on this machine. A pipe costs two descriptors and a
    ``pipe2`` call, so pipes are kept (at most ``cap``) instead of being made per connection.
    """

    __slots__ = ("free", "cap", "size")

    def __init__(self, cap: int = 64, size: int = 1 << 20) -> None:
        self.free: list[tuple[int, int]] = []
        self.cap = cap
        self.size = size

    def take(self) -> tuple[int, int] | None:
        if self.free:
            return self.free.pop()
        try:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None  # out of descriptors: stay on recv/send
        try:
            fcntl.fcntl(w, _F_SETPIPE_SZ, self.size)
        except OSError:
            pass  # keep the default 64 KiB capacity (pipe-max-size or user limits)
        return r, w

    def give(self, pipe: tuple[int, int], empty: bool) -> None:
        """Pool ``pipe`` if it is really empty, else close it.

        A pipe that still holds bytes would hand them to the next connection (a corrupt
        stream) and keep its reader readable forever (a spinning worker), so the kernel's
        count is checked too, not only the relay's bookkeeping.
        """
        if empty and len(self.free) < self.cap and _pipe_bytes(pipe[0]) == 0:
            self.free.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])

    def close(self) -> None:
        for r, w in self.free:
            os.close(r)
            os.close(w)
        self.free.clear()


class ReadyLoop(Protocol):
    def add_reader(self, fd: int, callback: Callable[..., Any], *args: Any) -> None: ...
    def remove_reader(self, fd: int) -> bool: ...
    def add_writer(self, fd: int, callback: Callable[..., Any], *args: Any) -> None: ...
    def remove_writer(self, fd: int) -> bool: ...


class Side:
    """One end of the relay: its socket, bound I/O methods, and flow state."""

    __slots__ = (
        "sock",
        "fd",
        "tls",
        "recv",
        "send",
        "peer",
        "pending",
        "reading",
        "writing",
        "eof",
        "shut",
        "shut_after_flush",
        "nread",
        "pipe",
        "in_pipe",
        "rsize",
    )

    def __init__(self, sock: socket.socket, tls: Any = None) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.tls = tls  # the _ssl._SSLSocket for a terminated client, else None
        io: Any = tls if tls is not None else sock
        self.recv: Callable[[int], bytes] = io.read if tls is not None else io.recv
        self.send: Callable[[Any], int] = io.write if tls is not None else io.send
        self.peer: Side = self
        self.pending: bytes | memoryview | None = None
        self.reading = False
        self.writing = False
        self.eof = False  # we read EOF from this side
        self.shut = False  # we sent EOF to this side
        self.shut_after_flush = False
        self.nread = 0
        self.pipe: tuple[int, int] | None = None  # splice pipe for bytes read from this side
        self.in_pipe = 0  # bytes read from this side still in the pipe
        self.rsize = 65536  # bytes asked of recv (the relay sets it)


class Relay:
    """Moves bytes both ways until both directions end or one fails; then closes both sockets.

    ``on_done(reason)`` is called once, with ``"done"`` for a clean end, else the error
    reason (``"reset"``, ``"tls_error"``) or whatever :meth:`finish` was given.
    """

    __slots__ = (
        "loop",
        "client",
        "backend",
        "bufsize",
        "on_done",
        "done",
        "progress",
        "pipes",
        "splice_after",
        "splice_len",
    )

    def __init__(
        self,
        loop: ReadyLoop,
        client: Side,
        backend: Side,
        bufsize: int,
        on_done: Callable[[str], None],
        pipes: PipePool | None = None,
        splice_after: int = -1,
    ) -> None:
        self.loop = loop
        self.client = client
        self.backend = backend
        client.peer = backend
        backend.peer = client
        self.bufsize = bufsize
        for side in (client, backend):  # SSL_read returns at most one 16 KiB record
            side.rsize = min(bufsize, _TLS_RECORD) if side.tls is not None else bufsize
        self.on_done = on_done
        self.done = False
        self.progress = 0  # bytes flushed from pending buffers (the idle watchdog adds nread)
        # splice only between two plain sockets, once a direction has moved splice_after bytes
        tls = client.tls is not None or backend.tls is not None
        self.pipes = None if (pipes is None or splice_after < 0 or tls) else pipes
        self.splice_after = splice_after
        self.splice_len = pipes.size if pipes is not None else bufsize  # up to a pipeful per call

    # -- public ---------------------------------------------------------------------------

    def start(self, first_to_backend: bytes | None = None, client_registered: bool = False) -> None:
        """Begin relaying; ``first_to_backend`` (a PROXY header) goes out before any data.

        ``client_registered``: the client's fd is still registered for reading by the
        caller; the relay takes the registration over (swapping the callback) or drops it.
        """
        client, backend = self.client, self.backend
        if client_registered:
            client.reading = True  # so that a failure below (finish) unregisters it
        if first_to_backend:
            self._send(backend, first_to_backend)  # a short write pauses the client
            if self.done:
                return
        if backend.pending is None:  # add, or swap the caller's callback for ours
            self.loop.add_reader(client.fd, self._on_read, client)
            client.reading = True
        self.loop.add_reader(backend.fd, self._on_read, backend)  # likewise
        backend.reading = True

    def activity(self) -> int:
        """A number that grows whenever bytes move (compared by the idle watchdog)."""
        return self.client.nread + self.backend.nread + self.progress

    def finish(self, reason: str, notify: bool = True) -> None:
        """Stop both directions and close both sockets.

        A terminated client gets close_notify first unless the stream already failed, so a
        timeout or drain looks like a clean end to TLS clients rather than a truncation.
        """
        if self.done:
            return
        self.done = True
        loop = self.loop
        for side in (self.client, self.backend):
            if side.reading:
                loop.remove_reader(side.fd)
                side.reading = False
            if side.writing:
                loop.remove_writer(side.fd)
                side.writing = False
        tls = self.client.tls
        if tls is not None and reason not in _NO_CLOSE_NOTIFY:
            try:
                tls.shutdown()  # sends close_notify; the peer's reply is not awaited
            except (OSError, ValueError):
                pass
        self.client.sock.close()
        self.backend.sock.close()
        if self.pipes is not None:
            for side in (self.client, self.backend):
                if side.pipe is not None:
                    self.pipes.give(side.pipe, empty=side.in_pipe == 0)
                    side.pipe = None
        self.client.peer = self.backend.peer = None  # type: ignore[assignment]  # drop the cycle
        if notify:
            self.on_done(reason)

    # -- callbacks ------------------------------------------------------------------------

    def _on_read(self, src: Side) -> None:
        try:
            data = src.recv(src.rsize)
        except _WOULD_BLOCK:
            return
        except _CLEAN_EOF:
            data = b""
        except ssl.SSLError:
            self.finish("tls_error")
            return
        except OSError:
            self.finish("reset")
            return
        if data:
            src.nread += len(data)
            self._send(src.peer, data)
            if self.pipes is not None and src.nread >= self.splice_after and not self.done:
                self._to_splice(src)
        else:
            self._on_eof(src)

    def _to_splice(self, src: Side) -> None:
        """Move this direction to splice; the reader callback is swapped in place."""
        assert self.pipes is not None
        pipe = self.pipes.take()
        if pipe is None:
            self.splice_after = 1 << 62  # no pipes to be had: do not retry per chunk
            return
        src.pipe = pipe
        if src.reading:
            self.loop.add_reader(src.fd, self._on_splice, src)

    def _on_splice(self, src: Side) -> None:
        dst = src.peer
        r, w = src.pipe  # type: ignore[misc]
        try:
            n = os.splice(src.fd, w, self.splice_len, flags=_SPLICE_FLAGS)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.finish("reset")
            return
        if n == 0:
            self._on_eof(src)
            return
        src.nread += n
        try:
            m = os.splice(r, dst.fd, n, flags=_SPLICE_FLAGS)
        except (BlockingIOError, InterruptedError):
            m = 0
        except OSError:
            src.in_pipe = n  # still in the pipe: it must not go back to the pool
            self.finish("reset")
            return
        if m < n:  # the rest waits in the pipe: pause this side until it drains
            src.in_pipe = n - m
            if src.reading:
                self.loop.remove_reader(src.fd)
                src.reading = False
            self.loop.add_writer(dst.fd, self._on_pipe_writable, dst)
            dst.writing = True

    def _on_pipe_writable(self, dst: Side) -> None:
        src = dst.peer
        try:
            m = os.splice(src.pipe[0], dst.fd, src.in_pipe, flags=_SPLICE_FLAGS)  # type: ignore[index]
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.finish("reset")
            return
        self.progress += m
        src.in_pipe -= m
        if src.in_pipe:
            return
        self.loop.remove_writer(dst.fd)
        dst.writing = False
        if dst.shut_after_flush:
            self._shut(dst)
        else:
            self._want_read(src)

    def _on_writable(self, dst: Side) -> None:
        data = dst.pending
        assert data is not None
        try:
            n = dst.send(data)
        except _WOULD_BLOCK:
            return
        except ssl.SSLError:
            self.finish("tls_error")
            return
        except OSError:
            self.finish("reset")
            return
        self.progress += n
        if n < len(data):
            dst.pending = memoryview(data)[n:]
            return
        dst.pending = None
        self.loop.remove_writer(dst.fd)
        dst.writing = False
        if dst.shut_after_flush:
            self._shut(dst)
        else:
            self._want_read(dst.peer)

    # -- internals ------------------------------------------------------------------------

    def _want_read(self, side: Side) -> None:
        if not side.reading and not side.eof:
            cb = self._on_read if side.pipe is None else self._on_splice
            self.loop.add_reader(side.fd, cb, side)
            side.reading = True

    def _send(self, dst: Side, data: bytes) -> None:
        if dst.pending is not None:  # only reachable with a PROXY header still queued
            dst.pending = bytes(dst.pending) + data
            return
        try:
            n = dst.send(data)
        except _WOULD_BLOCK:
            n = 0
        except ssl.SSLError:
            self.finish("tls_error")
            return
        except OSError:
            self.finish("reset")
            return
        if n == len(data):
            return
        # TLS must retry the very same buffer; a plain socket continues after what it took
        dst.pending = data if (n == 0 or dst.tls is not None) else memoryview(data)[n:]
        src = dst.peer
        if src.reading:
            self.loop.remove_reader(src.fd)
            src.reading = False
        self.loop.add_writer(dst.fd, self._on_writable, dst)
        dst.writing = True

    def _on_eof(self, src: Side) -> None:
        src.eof = True
        if src.reading:
            self.loop.remove_reader(src.fd)
            src.reading = False
        dst = src.peer
        if dst.pending is not None or src.in_pipe:
            dst.shut_after_flush = True
        else:
            self._shut(dst)

    def _shut(self, dst: Side) -> None:
        if dst.tls is not None:
            self.finish("done")  # no TLS half-close: flushed, close_notify, close
            return
        try:
            dst.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.finish("reset")
            return
        dst.shut = True
        if dst.peer.shut:
            self.finish("done")
