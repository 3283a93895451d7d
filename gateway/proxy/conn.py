"""One client connection, from accept to the access-log line.

Pipeline (phases and their legal moves are the table :data:`TRANSITIONS`)::

    AWAIT_PROXY -> AWAIT_HELLO -> HANDSHAKE -> [CONNECTING] -> RELAYING -> CLOSED   terminate
     (optional)    (peek the       `-> SERVING (gateway's own endpoints)
                    ClientHello)  -> CONNECTING -> RELAYING                      passthrough
                                  -> RESOLVING -> HANDSHAKE | CONNECTING       custom domain

A custom domain (a name outside the base domains) waits in RESOLVING for its DNS TXT record
(``AppAddressResolver``, one per worker; a warm cache answers without a task), under the
handshake deadline, with the client's fd unwatched and the hello still in the kernel; the
answer goes through the pure :func:`decide_custom` and the pipeline continues as for a base
domain name.

Balancing (``proxy.balance``; ``gateway/proxy/balance.py``). With ``"round_robin"`` the
decision carries rotations of the app's fresh instances; the worker's :class:`Turns` picks
the next one per connection (two dict operations and an index; the cached decision is not
rebuilt), and the race is staggered: the first choice alone for
:data:`~gateway.proxy.balance.HEAD_START`, then the next joins (at once if the first
refuses), as Happy Eyeballs does. Without the head start the nearest instance would win
every race and the rotation would not matter; it also spares the losers' sockets. A first
choice that refused or did not answer in time is passed over as first choice for a while.
``"freshest"`` races every candidate at once, as upstream does.

On the terminate path the backend connect (racing the top-N candidates) starts as soon as the
hello is routed and runs during the TLS handshake: the handshake's round trip hides the
connect's, and the client socket's poller registration is handed from the sniffer to the
handshake to the relay without being torn down (uvloop pays ~7 us per remove/re-add). Only
if the handshake finishes first does the connection wait in CONNECTING.

The ClientHello is read with ``MSG_PEEK``: it stays in the kernel, so OpenSSL (terminate) or
the relay (passthrough) reads it as if nobody had looked, and nothing is replayed. While a
hello is incomplete, ``SO_RCVLOWAT`` is raised to the end of the record in flight so that
the level-triggered poller wakes only when it is complete (no busy loop on a slow client).

Terminated TLS runs on the socket itself (``SSLContext._wrap_socket``, socket BIO) and
handshakes from readiness callbacks: measured 22-30 % cheaper per new connection than
uvloop's memory-BIO SSL transport (docs/proxy.md), and it lets the relay keep writing to a
client that has sent close_notify (half-close, as upstream's tests expect).

One timer per connection: it fires at the earliest deadline that applies (PROXY header,
handshake, connect, total), and once relaying it is the idle watchdog, which re-arms for a
full idle period only when bytes moved since the last check.
"""

from __future__ import annotations

import enum
import errno
import logging
import socket
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gateway.certs.custom_domains import AddressMiss, Lookup, MissReason
from gateway.protocol.clienthello import HelloSniffer, encode_alert
from gateway.protocol.errors import ClientHelloError, ProxyHeaderError, TlsAlert
from gateway.protocol.proxy_header import (
    Command,
    ProxyHeader,
    encode_proxy_header,
    parse_proxy_header,
)
from gateway.proxy.balance import HEAD_START
from gateway.proxy.decide import (
    ConnInfo,
    Gateway,
    Passthrough,
    Resolve,
    Target,
    Terminate,
    Upstream,
    decide,
    decide_custom,
)
from gateway.proxy.endpoints import MAX_HEAD, respond
from gateway.proxy.relay import Relay, Side
from gateway.util.tasks import spawn

if TYPE_CHECKING:
    from gateway.proxy.listeners import Worker

__all__ = ["Conn", "Phase", "TRANSITIONS"]

_ACCESS = "gateway.access"
access_log = logging.getLogger(_ACCESS)
_ACCESS_FMT = "client=%s:%s sni=%s mode=%s tls=%s upstream=%s up=%d down=%d ms=%.1f reason=%s%s"

_PEEK_EXTRA = 4096  # room for bytes after the hello (and a PROXY v1 line) in one peek
_PP_MAX = 2048 + 16
_STREAM_NONBLOCK = socket.SOCK_STREAM | socket.SOCK_NONBLOCK  # Python sets timeout 0 for it


class Phase(enum.Enum):
    AWAIT_PROXY = "await_proxy"
    AWAIT_HELLO = "await_hello"
    RESOLVING = "resolving"
    HANDSHAKE = "handshake"
    CONNECTING = "connecting"
    SERVING = "serving"
    RELAYING = "relaying"
    CLOSED = "closed"


# Every legal move in one place; CLOSED is reachable from anywhere.
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.AWAIT_PROXY: frozenset({Phase.AWAIT_HELLO}),
    Phase.AWAIT_HELLO: frozenset({Phase.HANDSHAKE, Phase.CONNECTING, Phase.RESOLVING}),
    Phase.RESOLVING: frozenset({Phase.HANDSHAKE, Phase.CONNECTING}),
    Phase.HANDSHAKE: frozenset({Phase.CONNECTING, Phase.SERVING, Phase.RELAYING}),
    Phase.CONNECTING: frozenset({Phase.RELAYING}),
    Phase.SERVING: frozenset(),
    Phase.RELAYING: frozenset(),
    Phase.CLOSED: frozenset(),
}

_TIMEOUT_REASON = {
    Phase.AWAIT_PROXY: "proxy_header_timeout",
    Phase.AWAIT_HELLO: "handshake_timeout",
    Phase.HANDSHAKE: "handshake_timeout",
    Phase.SERVING: "handshake_timeout",
}
_NEVER = float("inf")
_BROKEN = frozenset({"reset", "tls_error", "tls_handshake"})
_DECISION_CACHE = 4096  # distinct SNIs remembered per snapshot (cleared when full)


class Conn:
    """A client connection's whole life. Created by the listener, driven by callbacks."""

    __slots__ = (
        # set at accept, for the whole life
        "w",
        "loop",
        "sock",
        "fd",
        "client",
        "local",
        "t0",
        "total_deadline",
        # pipeline state
        "phase",
        "timer",
        "setup_deadline",
        "connect_deadline",
        "reader",
        "writer",
        "lowat",
        "pp_in",
        "sni",
        "mode",
        "upstream",
        "tls",
        "tls_info",
        "app",
        "connecting",
        "order",
        "later",
        "later_at",
        "bsock",
        "target",
        "relay",
        "last_activity",
        "buf",
        "legacy_health",
        "failed",
        "bsock_parked",
    )

    def __init__(
        self, w: Worker, sock: socket.socket, client: tuple[Any, ...], local_port: int
    ) -> None:
        self.w = w
        self.loop = w.loop
        self.sock = sock
        self.fd = sock.fileno()
        self.client = client
        self.local = local_port
        self.t0 = 0.0
        self.total_deadline = 0.0
        self.phase = Phase.AWAIT_HELLO
        self.timer: Any = None
        self.setup_deadline = _NEVER  # PROXY header, then hello + TLS handshake
        self.connect_deadline = _NEVER  # while candidates are connecting
        self.reader: Callable[[], None] | None = None
        self.writer: Callable[[], None] | None = None
        self.lowat = 1
        self.pp_in: ProxyHeader | None = None
        self.sni = ""
        self.mode = "-"
        self.upstream: Upstream | None = None
        self.tls: Any = None
        self.tls_info = "-"
        self.app = ""
        self.connecting: list[tuple[socket.socket, Target]] = []
        self.order: tuple[Target, ...] = ()  # this connection's candidates, first choice first
        self.later: tuple[Target, ...] | None = None  # staggered race: not started yet
        self.later_at = _NEVER  # when the next of them joins the race
        self.bsock: socket.socket | None = None
        self.target: Target | None = None
        self.relay: Relay | None = None
        self.last_activity = -1
        self.buf = b""
        self.legacy_health = False
        self.bsock_parked = False  # backend fd registered with _on_backend_early
        self.failed: tuple[str, str] | None = None  # backend failure held until the handshake ends

    # -- phase and timer ------------------------------------------------------------------

    def start(self) -> None:
        w = self.w
        now = self.loop.time()
        self.t0 = now
        self.total_deadline = now + w.timeouts.total
        if w.settings.inbound_proxy_protocol:
            self.phase = Phase.AWAIT_PROXY
            self.setup_deadline = now + w.timeouts.proxy_header
        else:
            self.setup_deadline = now + w.timeouts.handshake
        self.timer = self.loop.call_at(self.setup_deadline, self._on_timer)
        self._set_reader(self._on_sniff)

    def _enter(self, phase: Phase) -> None:
        if phase not in TRANSITIONS[self.phase]:
            raise RuntimeError(f"illegal connection transition {self.phase.name} -> {phase.name}")
        self.phase = phase

    def _arm(self, when: float) -> None:
        """Move the one timer to ``when`` (capped by the total deadline)."""
        self.timer.cancel()
        self.timer = self.loop.call_at(min(when, self.total_deadline), self._on_timer)

    def _rearm(self, delay: float) -> None:
        self._arm(self.loop.time() + delay)

    def _on_timer(self) -> None:
        phase = self.phase
        if phase is Phase.CLOSED:
            return
        now = self.loop.time()
        if now >= self.total_deadline:
            self.close("total_timeout")
            return
        if phase is Phase.RELAYING:
            assert self.relay is not None
            act = self.relay.activity()
            if act == self.last_activity:
                self.close("idle_timeout")
                return
            self.last_activity = act  # -1 at relay start: the first check always re-arms
            self.timer = self.loop.call_at(
                min(now + self.w.timeouts.idle, self.total_deadline), self._on_timer
            )
            return
        if self.later and now >= self.later_at and now < self.connect_deadline:
            # the candidates in flight did not answer within the head start: the next joins
            turns = self.w.turns
            for _, target in self.connecting:
                turns.slow(target.host, now)
            self._stagger(now)
            if self.phase is Phase.CLOSED:
                return
            if self.phase is Phase.RELAYING:  # connected at once: this was the only timer
                self.timer = self.loop.call_at(
                    min(now + self.w.timeouts.idle, self.total_deadline), self._on_timer
                )
                return
        if self.connecting and now >= self.connect_deadline:
            if phase is Phase.HANDSHAKE:  # report it once the handshake ends, as above
                self._abandon_others()
                self.failed = ("connect_timeout", self.upstream_text())
            else:
                self.close("connect_timeout", self.upstream_text())
                return
        if phase is not Phase.CONNECTING and now >= self.setup_deadline:
            if phase is Phase.RESOLVING:  # the client still waits for a ServerHello: alert
                self._reject(
                    TlsAlert.UNRECOGNIZED_NAME,
                    "custom_timeout",
                    f"{self.sni}: no TXT answer within the handshake timeout",
                    consume=-1,
                )
                return
            if phase is Phase.HANDSHAKE:
                self.w.state.tls_failed("timeout")
            self.close(_TIMEOUT_REASON[phase])
            return
        # woke for a deadline that no longer applies (e.g. the connect finished): next one
        nxt = self._connect_wake() if self.connecting else _NEVER
        if phase is not Phase.CONNECTING:
            nxt = min(nxt, self.setup_deadline)
        self.timer = self.loop.call_at(min(nxt, self.total_deadline), self._on_timer)

    def _set_reader(self, cb: Callable[[], None] | None) -> None:
        if cb == self.reader:
            return
        if cb is None:
            self.loop.remove_reader(self.fd)
        else:
            self.loop.add_reader(self.fd, cb)  # on a registered fd: swaps the callback
        self.reader = cb

    def _set_writer(self, cb: Callable[[], None] | None) -> None:
        if cb == self.writer:
            return
        if cb is None:
            self.loop.remove_writer(self.fd)
        else:
            self.loop.add_writer(self.fd, cb)
        self.writer = cb

    # -- AWAIT_PROXY / AWAIT_HELLO: peek -------------------------------------------------

    def _on_sniff(self) -> None:
        try:
            data = self.sock.recv(self.w.settings.hello_limit + _PEEK_EXTRA, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close("reset")
            return
        if not data:
            self.close("no_hello")
            return
        if self.phase is Phase.AWAIT_PROXY:
            try:
                parsed = parse_proxy_header(data)
            except ProxyHeaderError as exc:
                self.close("bad_proxy_header", str(exc))
                return
            if parsed is None:
                self._wait_more(len(data))
                return
            self.pp_in, used = parsed
            try:
                self.sock.recv(used)  # drop exactly the header: it was peeked, so it is there
            except OSError:
                self.close("reset")
                return
            self._enter(Phase.AWAIT_HELLO)
            self.setup_deadline = self.loop.time() + self.w.timeouts.handshake
            self._arm(self.setup_deadline)
            data = data[used:]
            if not data:
                self._wait_more(0)
                return
        sniffer = HelloSniffer(self.w.settings.hello_limit)
        try:
            hello = sniffer.feed(data)
        except ClientHelloError as exc:
            self._reject(exc.alert, "bad_hello", str(exc), consume=len(data))
            return
        if hello is None:  # sleep until the record in flight is complete, not per segment
            self._wait_more(max(len(data), sniffer.wanted - 1))
            return
        if self.lowat != 1:
            self._set_lowat(1)
        self.sni = hello.sni or ""
        cache = self.w.decisions  # keyed by SNI: see decide()'s docstring
        decision = cache.get(hello.sni)
        if decision is None:
            decision = decide(hello, ConnInfo(self.client[:2], self.local), self.w.snapshot)
            if len(cache) >= _DECISION_CACHE:
                cache.clear()
            cache[hello.sni] = decision
        if isinstance(decision, Terminate):
            self.mode = "terminate"
            if self._admit(decision.upstream):
                self._start_connect()
                self._handshake(decision.context)
        elif isinstance(decision, Passthrough):
            self.mode = "passthrough"
            if self._admit(decision.upstream):
                self._set_reader(None)  # the relay reads the (still queued) hello later
                self._enter(Phase.CONNECTING)
                self._start_connect()
        elif isinstance(decision, Gateway):
            self.mode = "gateway"
            self.w.state.gateway += 1
            self.legacy_health = decision.legacy_health
            self._handshake(decision.context)
        elif isinstance(decision, Resolve):
            self._resolve(decision.sni)
        else:
            self._reject(decision.alert, decision.reason, decision.detail, consume=len(data))

    # -- RESOLVING: custom domains ----------------------------------------------------------

    def _resolve(self, sni: str) -> None:
        """Route a custom domain by its TXT record: from the cache now, or from DNS later."""
        resolver = self.w.resolver
        if resolver is None:
            self._reject(
                TlsAlert.UNRECOGNIZED_NAME,
                "custom_domain",
                f"{sni} is not under a base domain and custom domains are off "
                "(set dns.resolver.nameservers and proxy.custom_domains = true)",
                consume=-1,
            )
            return
        answer = resolver.peek(sni)
        if answer is not None:
            self._on_resolved(answer)
            return
        self._set_reader(None)  # the hello waits in the kernel; the timer bounds the wait
        self._enter(Phase.RESOLVING)
        spawn(self._lookup(sni), name="custom-domain-lookup")

    async def _lookup(self, sni: str) -> None:
        resolver = self.w.resolver
        assert resolver is not None
        try:
            answer: Lookup = await resolver.resolve(sni)
        except Exception as exc:  # never let a resolver bug leave the client hanging
            answer = AddressMiss(sni, MissReason.ERROR, f"resolver failed: {exc!r}")
        if self.phase is Phase.RESOLVING:  # else closed meanwhile (timeout, drain)
            self._on_resolved(answer)

    def _on_resolved(self, answer: Lookup) -> None:
        decision = decide_custom(
            self.sni, answer, ConnInfo(self.client[:2], self.local), self.w.snapshot
        )
        if isinstance(decision, Terminate):
            self.mode = "terminate"
            if self._admit(decision.upstream):
                self._start_connect()
                self._handshake(decision.context)
        elif isinstance(decision, Passthrough):
            self.mode = "passthrough"
            if self._admit(decision.upstream):
                self._set_reader(None)
                self._enter(Phase.CONNECTING)
                self._start_connect()
        else:
            self._reject(decision.alert, decision.reason, decision.detail, consume=-1)

    def _wait_more(self, have: int) -> None:
        """Sleep until more than ``have`` bytes are buffered (level-triggered poll, no spin)."""
        want = have + 1
        if want != self.lowat:
            self._set_lowat(want)

    def _set_lowat(self, n: int) -> None:
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, n)
            self.lowat = n
        except OSError:
            self.close("reset")

    def _admit(self, upstream: Upstream) -> bool:
        """Apply the per-app connection limit; count the connection against its app."""
        state = self.w.state
        limit = self.w.app_limit
        if limit and state.app_open[upstream.app_id] >= limit:
            self._reject(TlsAlert.HANDSHAKE_FAILURE, "app_limit", upstream.app_id, consume=-1)
            return False
        self.upstream = upstream
        self.app = upstream.app_id
        state.app_open[self.app] += 1
        return True

    def _reject(self, alert: TlsAlert, reason: str, detail: str, consume: int) -> None:
        """Drain what was peeked (so close() sends FIN, not RST), send the alert, close."""
        try:
            if consume:
                self.sock.recv(
                    consume if consume > 0 else self.w.settings.hello_limit + _PEEK_EXTRA
                )
            self.sock.send(encode_alert(alert))
        except OSError:
            pass
        self.close(reason, detail)

    # -- HANDSHAKE ------------------------------------------------------------------------

    def _handshake(self, ctx: ssl.SSLContext) -> None:
        self._enter(Phase.HANDSHAKE)
        wrap: Callable[..., Any] = ctx._wrap_socket  # type: ignore[attr-defined]
        try:
            self.tls = wrap(self.sock, True, None)
        except (ssl.SSLError, OSError, ValueError) as exc:
            self.w.state.tls_failed(exc)
            self.close("tls_error", str(exc))
            return
        self._set_reader(self._on_handshake)
        self._on_handshake()

    def _on_handshake(self) -> None:
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            self._set_writer(None)
            self._set_reader(self._on_handshake)
            return
        except ssl.SSLWantWriteError:
            self._set_reader(None)
            self._set_writer(self._on_handshake)
            return
        except (ssl.SSLError, OSError) as exc:
            self.w.state.tls_failed(exc)
            self.close("tls_handshake", str(exc))
            return
        self._set_writer(None)
        tls = self.tls
        self.w.state.tls_done(tls.session_reused)
        self.tls_info = f"{tls.version()}{'+resumed' if tls.session_reused else ''}"
        if self.failed is not None:
            self.close(*self.failed)
        elif self.mode == "gateway":
            self._enter(Phase.SERVING)
            self._set_reader(self._on_gateway_read)
        elif self.bsock is not None:
            self._start_relay()  # the backend won the race against the handshake
        else:
            # client bytes wait in the kernel until the backend is up; the fd stays
            # registered (parked) so the relay swaps its callback in: tearing the poll handle
            # down and making a new one costs uvloop 7 syscalls (docs/performance.md)
            self._set_reader(self._on_client_early)
            self._enter(Phase.CONNECTING)
            self._arm(self._connect_wake())

    def _on_client_early(self) -> None:
        """The client spoke (or closed) before the backend is up: stop watching it (no busy
        loop); the relay reads what it sent once it starts."""
        self._set_reader(None)

    # -- SERVING: the gateway's own endpoints -------------------------------------------

    def _on_gateway_read(self) -> None:
        try:
            chunk = self.tls.read(MAX_HEAD)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except (ssl.SSLError, OSError):
            self.close("reset")
            return
        if not chunk:
            self.close("done")
            return
        self.buf += chunk
        response = respond(self.buf, self.w.info, legacy_health=self.legacy_health)
        if response is None:
            return
        self._set_reader(None)
        try:
            self.tls.write(response)
            self.tls.shutdown()
        except (ssl.SSLError, OSError, ValueError):
            pass
        self.close("done")

    # -- connecting: race the candidates --------------------------------------------------

    def _start_connect(self) -> None:
        upstream = self.upstream
        assert upstream is not None
        now = self.loop.time()
        self.connect_deadline = now + self.w.timeouts.connect
        self.order = targets = self.w.turns.order(upstream, now)
        if upstream.rotations and len(targets) > 1:  # round robin: staggered race
            self.later = targets
            if self._stagger(now):
                return
        else:  # every candidate at once (upstream's race)
            for target in targets:
                if self._try(target):
                    return
        if not self.connecting:
            self._connect_failed(f"{self.upstream_text()}: nothing accepted the connection")
            return
        self._arm_connect()

    def _try(self, target: Target) -> bool:
        """Start connecting to ``target``; True if it connected at once (the race is won)."""
        upstream = self.upstream
        assert upstream is not None
        family = socket.AF_INET6 if ":" in target.host else socket.AF_INET
        try:
            bsock = socket.socket(family, _STREAM_NONBLOCK)  # no extra ioctl
        except OSError:
            return False
        bsock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = bsock.connect_ex((target.host, upstream.port))
        if err == 0:
            self._abandon_others()
            self._won(bsock, target, registered=False)
            return True
        if err in (errno.EINPROGRESS, errno.EAGAIN):
            self.connecting.append((bsock, target))
            self.loop.add_writer(bsock.fileno(), self._on_connect, bsock, target)
        else:
            bsock.close()
            if self.later is not None:
                self.w.turns.slow(target.host, self.loop.time())
        return False

    def _stagger(self, now: float) -> bool:
        """Start the waiting candidates in order until one more is in flight (the next waits
        another head start); True if one connected at once."""
        later = self.later
        while later:
            target, later = later[0], later[1:]
            self.later = later
            before = len(self.connecting)
            if self._try(target):
                return True
            if len(self.connecting) > before:
                self.later_at = now + HEAD_START
                break
        return False

    def _connect_wake(self) -> float:
        """When the connect step next needs the timer: its deadline, or the next stagger."""
        if self.later:
            return min(self.later_at, self.connect_deadline)
        return self.connect_deadline

    def _arm_connect(self) -> None:
        when = self._connect_wake()
        if self.phase is Phase.CONNECTING or when < self.setup_deadline:
            self._arm(when)

    def _on_connect(self, bsock: socket.socket, target: Target) -> None:
        self.connecting.remove((bsock, target))
        err = bsock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.loop.remove_writer(bsock.fileno())
            bsock.close()
            if self.later is not None:  # staggered: held back a while, the next one now
                now = self.loop.time()
                self.w.turns.slow(target.host, now)
                if self.later and self._stagger(now):
                    return
                if self.connecting:
                    self._arm_connect()
                    return
            if not self.connecting:
                self._connect_failed(f"{self.upstream_text()}: {errno.errorcode.get(err, err)}")
            return
        self._abandon_others()
        self._won(bsock, target, registered=True)

    def _connect_failed(self, detail: str) -> None:
        """No candidate accepted. Mid-handshake, finish the handshake first so the client
        gets a clean close_notify rather than a torn TLS stream."""
        if self.mode == "terminate" and self.tls_info == "-":
            self.failed = ("connect_failed", detail)  # reported when the handshake ends
            return
        self.close("connect_failed", detail)

    def _abandon_others(self) -> None:
        for other, _ in self.connecting:
            self.loop.remove_writer(other.fileno())
            other.close()
        self.connecting.clear()
        self.later = None

    def _won(self, bsock: socket.socket, target: Target, registered: bool) -> None:
        """A backend accepted: relay now if the client side is ready, else park it."""
        self.bsock = bsock
        self.target = target
        self.w.state.upstream_open[target.host] += 1  # undone in close()
        self.w.turns.answered(target.host)
        if self.phase is Phase.CONNECTING:
            self._start_relay(writer_registered=registered)
        elif registered:
            # The handshake is still running. Park the backend as a reader (the poll handle
            # stays; the relay swaps in its callback) rather than tearing it down and making
            # a new one at relay start.
            fd = bsock.fileno()
            self.loop.add_reader(fd, self._on_backend_early)
            self.loop.remove_writer(fd)
            self.bsock_parked = True

    def _on_backend_early(self) -> None:
        """The backend spoke (or closed) before the relay exists: stop watching it until the
        relay starts (no busy loop); the relay reads whatever it sent."""
        assert self.bsock is not None
        self.loop.remove_reader(self.bsock.fileno())
        self.bsock_parked = False

    def _start_relay(self, writer_registered: bool = False) -> None:
        bsock = self.bsock
        target = self.target
        assert bsock is not None and target is not None
        header = None
        if target.pp:
            pp = self.pp_in
            if pp is None or pp.command is not Command.PROXY:
                pp = ProxyHeader.for_connection(self.client[:2], self.sock.getsockname()[:2])
            header = encode_proxy_header(pp)
        client_registered = self.reader is not None
        self._enter(Phase.RELAYING)
        self.reader = None  # the relay owns the client's registration from here
        state = self.w.state
        if self.tls is not None:
            state.terminated += 1
        else:
            state.passthrough += 1
        backend = Side(bsock)
        if self.bsock_parked:  # registered already: the relay swaps its callback in (or
            backend.reading = True  # removes it, should it fail before reading)
            self.bsock_parked = False
        backend.writing = writer_registered  # likewise for the connect's writer
        self.relay = relay = Relay(
            self.loop,
            Side(self.sock, self.tls),
            backend,
            self.w.settings.buffer_size,
            self._relay_done,
            self.w.pipes,
            self.w.settings.splice_after,
        )
        self.last_activity = -1  # the pending setup timer becomes the first idle check
        relay.start(header, client_registered=client_registered)
        if writer_registered and not relay.done and backend.pending is None:
            self.loop.remove_writer(backend.fd)  # after add_reader: the poll is reused
            backend.writing = False

    def _relay_done(self, reason: str) -> None:
        self.close(reason, from_relay=True)

    # -- CLOSED ---------------------------------------------------------------------------

    def upstream_text(self) -> str:
        up = self.upstream
        if up is None:
            return "-"
        if self.target:
            host = self.target.host
        else:  # the candidates in the order this connection tried them
            host = ",".join(t.host for t in self.order or up.targets)
        return f"{host}:{up.port}"

    def close(self, reason: str, detail: str = "", from_relay: bool = False) -> None:
        """Tear everything down once: timers, callbacks, sockets, counters, one log line."""
        if self.phase is Phase.CLOSED:
            return
        self.phase = Phase.CLOSED
        self.timer.cancel()
        w = self.w
        state = w.state
        relay = self.relay
        up = down = 0
        if relay is not None:
            if not from_relay:
                relay.finish(reason, notify=False)
            up, down = relay.client.nread, relay.backend.nread
            state.bytes_up += up
            state.bytes_down += down
        else:
            if self.reader is not None:
                self.loop.remove_reader(self.fd)
                self.reader = None  # a bound method of self: a reference cycle
            if self.writer is not None:
                self.loop.remove_writer(self.fd)
                self.writer = None
            self._abandon_others()
            if self.bsock is not None:
                if self.bsock_parked:
                    self.loop.remove_reader(self.bsock.fileno())
                self.bsock.close()
            if self.tls is None:
                try:  # unread (peeked) bytes would turn our FIN into an RST
                    self.sock.recv(self.w.settings.hello_limit + _PEEK_EXTRA)
                except OSError:
                    pass
            elif self.tls_info != "-" and reason not in _BROKEN:
                try:  # handshake done (e.g. the backend never answered): end TLS cleanly
                    self.tls.shutdown()
                except (OSError, ValueError):
                    pass
            self.sock.close()
        state.open -= 1
        state.closed += 1
        if reason != "done":
            state.errors[reason] += 1
        if self.app:
            state.app_open[self.app] -= 1
        if self.target is not None:
            state.upstream_open[self.target.host] -= 1
        w.conns.discard(self)
        self.relay = None  # break the conn <-> relay <-> side cycles: freed by refcount,
        self.tls = None  # not left for the cyclic GC
        if w.access_enabled:
            client = self.client
            if self.pp_in is not None and self.pp_in.source is not None:
                client = self.pp_in.source  # the address the load balancer saw
            # makeRecord + handle: the same record as .info(), without findCaller's stack
            # walk (half of the ~30 us a line costs)
            access_log.handle(
                access_log.makeRecord(
                    _ACCESS,
                    logging.INFO,
                    __file__,
                    0,
                    _ACCESS_FMT,
                    (
                        client[0],
                        client[1],
                        self.sni or "-",
                        self.mode,
                        self.tls_info,
                        self.upstream_text(),
                        up,
                        down,
                        (self.loop.time() - self.t0) * 1000.0,
                        reason,
                        f" detail={detail!r}" if detail else "",
                    ),
                    None,
                )
            )

    def shutdown(self) -> None:
        """Drain: connections not yet relaying are closed now; relays are left to finish."""
        if self.phase is not Phase.RELAYING:
            self.close("drain")
