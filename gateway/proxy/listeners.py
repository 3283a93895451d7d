"""One worker process's event-loop side: its listeners, live connections, reload and drain.

Each worker binds its own ``SO_REUSEPORT`` listener per (address, port), so the kernel spreads
new connections across workers without a shared accept queue. A :class:`Worker` is what every
connection gets (as uvicorn's ``ServerState``): settings, the current decision snapshot,
counters, the live-connection set. Nothing here is global.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from gateway.certs.custom_domains import AppAddressResolver
from gateway.certs.store import CertStore
from gateway.proxy.balance import Turns
from gateway.proxy.conn import Conn, Phase
from gateway.proxy.decide import Decision, Snapshot
from gateway.proxy.endpoints import GatewayInfo
from gateway.proxy.info_file import INFO_FILE, load_info
from gateway.proxy.relay import PipePool
from gateway.proxy.routes import RouteTable, combine
from gateway.proxy.settings import ListenSpec, ProxySettings, Timeouts
from gateway.proxy.stats import WorkerState, write_stats

__all__ = ["RouteFeed", "Worker", "bind_listener", "probe_listeners"]

logger = logging.getLogger(__name__)

_ACCEPT_BATCH = 64


class RouteFeed(Protocol):
    """Where a worker gets fresh registry tables (:class:`RegistryRouteFeed`)."""

    def poll(self) -> RouteTable | None:
        """A new table when something changed, else ``None`` (keep the current one)."""
        ...

    def close(self) -> None: ...


def bind_listener(host: str, port: int, backlog: int) -> socket.socket:
    """A non-blocking ``SO_REUSEPORT`` listener; raises ``OSError`` naming the address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # accepted sockets inherit it
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        where = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        raise OSError(exc.errno, f"cannot listen on {where}: {exc.strerror}") from None
    return sock


def probe_listeners(specs: tuple[ListenSpec, ...], backlog: int) -> None:
    """Bind (and release) every listener once, so a taken port fails before any fork."""
    for spec in specs:
        for port in spec.ports():
            bind_listener(spec.host, port, backlog).close()


class Worker:
    """Per-process data-plane state shared by every connection of this worker."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        settings: ProxySettings,
        certs: CertStore,
        routes: RouteTable,
        state: WorkerState,
        stats_dir: Path | None = None,
        info: GatewayInfo | None = None,
        reload_routes: Callable[[], RouteTable] | None = None,
        registry_feed: RouteFeed | None = None,
    ) -> None:
        self.loop = loop
        self.settings = settings
        self.timeouts: Timeouts = settings.timeouts
        self.certs = certs
        self.state = state
        self.stats_dir = stats_dir
        # /app-info, /acme-info: given, or published by the control plane in the stats dir
        self.info_file = stats_dir / INFO_FILE if info is None and stats_dir else None
        self.info = info or load_info(self.info_file)
        self.reload_routes = reload_routes
        self.static_routes = routes
        self.registry_feed = registry_feed
        self.registry_routes: RouteTable | None = None
        self._registry_handle: asyncio.TimerHandle | None = None
        self._registry_polling: asyncio.Future[RouteTable | None] | None = None
        self.snapshot = Snapshot(
            base_domains=self.base_domains(),
            certs=certs.snapshot,
            routes=routes,
            top_n=settings.connect_top_n,
            localhost_backend=settings.insecure_localhost_backend,
            balance=settings.balance,
        )
        workers = settings.worker_count()
        limit = settings.max_connections_per_app
        self.app_limit = math.ceil(limit / workers) if limit else 0
        self.decisions: dict[str | None, Decision] = {}  # per snapshot, by SNI
        self.turns = Turns(start=state.index)  # round-robin turns, kept across swaps
        self.conns: set[Conn] = set()
        self.pipes = PipePool()
        # custom domains' TXT lookups (gateway/proxy/custom.py); None = custom domains off
        self.resolver: AppAddressResolver | None = None
        self.listeners: list[tuple[socket.socket, int]] = []
        self.access_enabled = settings.access_log and logging.getLogger(
            "gateway.access"
        ).isEnabledFor(logging.INFO)
        self._stats_handle: asyncio.TimerHandle | None = None
        self._parent = os.getppid()
        self.stopping: asyncio.Future[None] | None = None

    # -- listening ------------------------------------------------------------------------

    def listen(self) -> None:
        for spec in self.settings.listen_specs():
            for port in spec.ports():
                sock = bind_listener(spec.host, port, self.settings.backlog)
                self.listeners.append((sock, port))
                self.loop.add_reader(sock.fileno(), self._on_accept, sock, port)
        self._schedule_stats()

    def _on_accept(self, lsock: socket.socket, port: int) -> None:
        state = self.state
        conns = self.conns
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, addr = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE, ENOBUFS...: back off instead of spinning
                state.error("accept_failed")
                logger.warning("accept failed on port %d: %s; pausing accepts 0.1s", port, exc)
                fd = lsock.fileno()
                self.loop.remove_reader(fd)
                self.loop.call_later(0.1, self._resume_accept, lsock, port)
                return
            sock.setblocking(False)
            state.accepted += 1
            state.open += 1
            conn = Conn(self, sock, addr, port)
            conns.add(conn)
            conn.start()

    def _resume_accept(self, lsock: socket.socket, port: int) -> None:
        if not self.state.draining and lsock.fileno() >= 0:
            self.loop.add_reader(lsock.fileno(), self._on_accept, lsock, port)

    # -- reload ---------------------------------------------------------------------------

    def swap_snapshot(self, snapshot: Snapshot) -> None:
        """Install a new routing snapshot (the control plane's entry point); new connections
        decide against it, live ones keep what they chose."""
        self.snapshot = snapshot
        self.decisions = {}

    def reload(self) -> None:
        """Swap in new certificates and routes; live connections keep what they have."""
        try:
            certs = self.certs.reload()
        except OSError as exc:  # e.g. certs_dir unreadable: keep serving what we have
            logger.error("certificate reload failed, keeping the old set: %s", exc)
            certs = self.snapshot.certs
        if self.reload_routes is not None:
            try:
                self.static_routes = self.reload_routes()
            except Exception as exc:  # a bad edit must not take the worker down
                logger.error("route reload failed, keeping the old routes: %s", exc)
        self.info = load_info(self.info_file, self.info)
        self.swap_snapshot(
            replace(
                self.snapshot,
                certs=certs,
                routes=self.combined_routes(),
                base_domains=self.base_domains(),
            )
        )
        logger.info("worker %d reloaded: %d certificates", self.state.index, len(certs))

    def base_domains(self) -> tuple[str, ...]:
        """The configured base domains plus those the route table adds (the operator's,
        published by the control plane in its routing overlay), configured ones first."""
        extra: tuple[str, ...] = getattr(self.static_routes, "base_domains", ())
        return tuple(dict.fromkeys((*self.settings.base_domains, *extra)))

    # -- registry routes ------------------------------------------------------------------

    def combined_routes(self) -> RouteTable:
        """Static routes first, then the registry's (when a registry table is installed),
        with the operator's overlay (drains) over both."""
        return combine(self.static_routes, self.registry_routes)

    def start_registry_polling(self) -> None:
        """Poll the registry now and then every ``registry_poll_interval`` seconds."""
        if self.registry_feed is not None:
            self._poll_registry()

    def _poll_registry(self) -> None:
        """Read the registry in a thread (a rebuild of a large table takes a while: 10 000
        instances ~120 ms here), swap the new table in on the loop, and space the next poll
        so that rebuilding never takes more than ~5 % of the worker."""
        feed = self.registry_feed
        if feed is None or self.state.draining or self._registry_polling is not None:
            return
        started = self.loop.time()
        fut = self.loop.run_in_executor(None, feed.poll)
        self._registry_polling = fut
        fut.add_done_callback(lambda done: self._registry_polled(done, started))

    def _registry_polled(self, fut: asyncio.Future[RouteTable | None], started: float) -> None:
        self._registry_polling = None
        if fut.cancelled() or self.state.draining:
            return
        exc = fut.exception()
        if exc is not None:  # a registry problem must never stop the worker
            logger.error("worker %d: registry poll failed: %r", self.state.index, exc)
        elif (table := fut.result()) is not None:
            self.registry_routes = table
            self.swap_snapshot(replace(self.snapshot, routes=self.combined_routes()))
        took = self.loop.time() - started
        delay = max(self.settings.registry_poll_interval, 20.0 * took)
        self._registry_handle = self.loop.call_later(delay, self._poll_registry)

    # -- stats ----------------------------------------------------------------------------

    def _schedule_stats(self) -> None:
        self._stats_handle = self.loop.call_later(self.settings.stats_interval, self._tick)

    def _tick(self) -> None:
        self.write_stats()
        if os.getppid() != self._parent and not self.state.draining:
            logger.error("worker %d: supervisor went away; draining", self.state.index)
            self.begin_drain()
            return
        self._schedule_stats()

    def write_stats(self) -> None:
        if self.stats_dir is None:
            return
        try:
            write_stats(self.stats_dir, self.state)
        except OSError as exc:
            logger.warning("cannot write stats to %s: %s", self.stats_dir, exc)

    # -- drain ----------------------------------------------------------------------------

    def begin_drain(self) -> None:
        """Start :meth:`drain` as a task (called from a signal handler via the loop)."""
        if self.state.draining:
            return
        self.state.draining = True
        from gateway.util.tasks import spawn

        spawn(self.drain(), name=f"drain-worker-{self.state.index}")

    async def drain(self) -> None:
        """The fixed order: stop listening, drop handshakes, let relays finish, close the rest."""
        self.state.draining = True
        for sock, _port in self.listeners:
            self.loop.remove_reader(sock.fileno())
            sock.close()
        self.listeners.clear()
        for conn in list(self.conns):
            conn.shutdown()
        deadline = self.loop.time() + self.timeouts.drain
        while self.conns and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        left = [c for c in self.conns if c.phase is not Phase.CLOSED]
        for conn in left:
            conn.close("drain_timeout")
        logger.info(
            "worker %d drained: %d connections closed at the deadline, %d handled in total",
            self.state.index,
            len(left),
            self.state.accepted,
        )
        if self._stats_handle is not None:
            self._stats_handle.cancel()
        if self._registry_handle is not None:
            self._registry_handle.cancel()
        if self._registry_polling is not None:  # let a read in flight finish before closing
            await asyncio.wait([self._registry_polling], timeout=5.0)
        if self.registry_feed is not None:
            self.registry_feed.close()
        self.write_stats()
        if self.stopping is not None and not self.stopping.done():
            self.stopping.set_result(None)
