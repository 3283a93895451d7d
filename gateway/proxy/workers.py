"""The supervisor: fork N workers, keep them alive, forward reload and drain.

* Certificates are loaded **before** forking, so every worker starts with the same
  ``SSLContext`` objects and therefore the same TLS session-ticket keys: a client resuming on
  another worker still resumes. (After a SIGHUP each worker reloads on its own and ticket keys
  diverge until restart; resumption then works per worker only. Python has no API to set the
  keys.)
* Every worker binds its own ``SO_REUSEPORT`` listeners. When one closes (drain, crash), the
  connections still in its accept queue are reset unless ``net.ipv4.tcp_migrate_req=1``; we do
  not change that system-wide sysctl, and log a hint at start when it is off.
* Signal handlers only set flags or queue the signal; the supervisor's loop and the workers'
  event loops do the work. SIGTERM/SIGINT: forward SIGTERM, wait up to ``drain`` + 5 s, then
  SIGKILL stragglers. SIGHUP: forward to every worker (each reloads certificates and routes
  without dropping connections). A worker that dies unexpectedly is replaced (with back-off).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Protocol

from gateway.certs.settings import ResolverSettings
from gateway.certs.store import CertStore
from gateway.proxy.custom import make_resolver
from gateway.proxy.endpoints import GatewayInfo
from gateway.proxy.listeners import RouteFeed, Worker, probe_listeners
from gateway.proxy.routes import RouteTable, StaticRoutes
from gateway.proxy.settings import ProxySettings
from gateway.proxy.stats import WorkerState

__all__ = ["Sidecar", "Supervisor", "run_worker"]

logger = logging.getLogger(__name__)

_RESTART_BACKOFF = (0.1, 0.5, 1.0, 2.0, 5.0)


class Sidecar(Protocol):
    """A non-worker child the supervisor starts, reaps, restarts and stops (e.g. the control
    process of :mod:`gateway.commands.control_process`)."""

    def start(self) -> None: ...

    def owns(self, pid: int) -> bool: ...

    def reaped(self, status: int) -> None: ...

    def tick(self) -> None: ...

    def stop(self) -> None: ...


def run_worker(
    index: int,
    settings: ProxySettings,
    certs: CertStore,
    routes: RouteTable,
    stats_dir: Path | None,
    reload_routes: Callable[[], RouteTable] | None,
    info: GatewayInfo | None = None,
    resolver: ResolverSettings | None = None,
    registry_feed: Callable[[], RouteFeed] | None = None,
) -> int:
    """A worker process's main: its own uvloop loop until drained. Returns the exit code."""
    import uvloop

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor turns Ctrl-C into SIGTERM
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    # log records need neither thread nor process names here (saves a few us per line)
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    state = WorkerState(index, os.getpid())
    feed = registry_feed() if registry_feed is not None else None  # opened after the fork
    worker = Worker(loop, settings, certs, routes, state, stats_dir, info, reload_routes, feed)
    worker.resolver = make_resolver(settings, resolver)  # per worker: its own cache and loop

    async def main() -> None:
        worker.stopping = loop.create_future()
        # A connection's objects form no reference cycles (tests/proxy/test_gc.py), so they
        # are freed by refcount; the cyclic GC only needs to run rarely. Start-up objects are
        # frozen out of its scans.
        gc.freeze()
        gc.set_threshold(50_000, 50, 100)
        loop.add_signal_handler(signal.SIGTERM, worker.begin_drain)
        loop.add_signal_handler(signal.SIGHUP, worker.reload)
        worker.listen()
        worker.start_registry_polling()
        logger.info("worker %d (pid %d) listening", index, os.getpid())
        await worker.stopping

    try:
        loop.run_until_complete(main())
    except OSError as exc:
        logger.error("worker %d: %s", index, exc)
        return 1
    finally:
        loop.close()
    return 0


class Supervisor:
    """Forks and watches the workers. :meth:`run` blocks until shutdown; returns exit code."""

    def __init__(
        self,
        settings: ProxySettings,
        stats_dir: Path | None = None,
        reload_routes: Callable[[], RouteTable] | None = None,
        info: GatewayInfo | None = None,
        resolver: ResolverSettings | None = None,
        registry_feed: Callable[[], RouteFeed] | None = None,
        sidecars: Sequence[Sidecar] = (),
    ) -> None:
        self.settings = settings
        self.registry_feed = registry_feed
        self.sidecars = tuple(sidecars)
        self.stats_dir = stats_dir
        self.reload_routes = reload_routes
        self.info = info
        self.resolver = resolver  # [dns.resolver], for custom domains
        self.count = settings.worker_count()
        self.children: dict[int, int] = {}  # pid -> worker index
        self.failures: dict[int, int] = {}  # worker index -> consecutive quick deaths
        self.born: dict[int, float] = {}  # worker index -> monotonic start time
        self.signals: list[int] = []  # queued by the handler, consumed by run()
        self.certs: CertStore | None = None
        self.routes: RouteTable = StaticRoutes(settings.routes)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signals.append(signum)  # only queue it; run() acts on it

    def request_reload(self) -> None:
        """Reload certificates and routes in every worker, as SIGHUP does (for in-process
        callers such as a certificate writer; safe from another thread)."""
        self.signals.append(signal.SIGHUP)

    def request_stop(self) -> None:
        """Drain and stop, as SIGTERM does."""
        self.signals.append(signal.SIGTERM)

    def run(self) -> int:
        probe_listeners(self.settings.listen_specs(), self.settings.backlog)
        self.certs = CertStore(
            self.settings.certs_dir, self.settings.tls_versions, self.settings.session_tickets
        )
        loaded = len(self.certs.snapshot)
        logger.info("certificates: %d loaded from %s", loaded, self.settings.certs_dir)
        if not loaded and self.settings.base_domains:
            logger.warning(
                "no certificates in %s: terminated names will be refused until one is "
                "installed there and the gateway gets SIGHUP (passthrough works meanwhile)",
                self.settings.certs_dir,
            )
        _hint_migrate_req()
        _raise_nofile()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        for sidecar in self.sidecars:  # spawned (not forked): no loop or thread is copied
            sidecar.start()
        for index in range(self.count):
            self._spawn(index)
        logger.info("gateway proxy: %d workers on %s", self.count, ", ".join(self.settings.listen))
        while True:
            while self.signals:
                signum = self.signals.pop(0)
                if signum == signal.SIGHUP:
                    self._forward(signal.SIGHUP)
                    if self.certs is not None:
                        try:
                            self.certs.reload()  # future forks start from the new set
                        except OSError as exc:
                            logger.error("certificate reload failed: %s", exc)
                    logger.info(
                        "reload requested: forwarded SIGHUP to %d workers", len(self.children)
                    )
                else:
                    return self._shutdown()
            self._reap()
            for sidecar in self.sidecars:
                sidecar.tick()
            time.sleep(0.05)

    def _spawn(self, index: int) -> None:
        assert self.certs is not None
        pid = os.fork()
        if pid == 0:  # the child never returns from here
            code = 1
            try:
                code = run_worker(
                    index,
                    self.settings,
                    self.certs,
                    self.routes,
                    self.stats_dir,
                    self.reload_routes,
                    self.info,
                    self.resolver,
                    self.registry_feed,
                )
            except BaseException:  # noqa: BLE001 - last resort before os._exit
                logger.exception("worker %d crashed", index)
            finally:
                logging.shutdown()
                os._exit(code)
        self.children[pid] = index
        self.born[index] = time.monotonic()

    def _forward(self, sig: int) -> None:
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def _sidecar_reaped(self, pid: int, status: int) -> None:
        for sidecar in self.sidecars:
            if sidecar.owns(pid):
                sidecar.reaped(status)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            index = self.children.pop(pid, None)
            if index is None:
                self._sidecar_reaped(pid, status)
                continue
            fails = self.failures.get(index, 0)
            if time.monotonic() - self.born.get(index, 0.0) > 60.0:
                fails = 0  # it had been running fine: restart at once
            delay = _RESTART_BACKOFF[min(fails, len(_RESTART_BACKOFF) - 1)]
            logger.error(
                "worker %d (pid %d) exited (%s); restarting in %.1fs",
                index,
                pid,
                _describe(status),
                delay,
            )
            self.failures[index] = fails + 1
            time.sleep(delay)
            self._spawn(index)

    def _shutdown(self) -> int:
        logger.info("shutting down: draining %d workers", len(self.children))
        self._forward(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.timeouts.drain + 5.0
        while self.children and time.monotonic() < deadline:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                time.sleep(0.05)
                continue
            if self.children.pop(pid, None) is None:
                self._sidecar_reaped(pid, status)
        if self.children:
            logger.error("killing %d workers that did not drain in time", len(self.children))
            self._forward(signal.SIGKILL)
            for pid in list(self.children):
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
            self.children.clear()
        for sidecar in self.sidecars:  # after the drain: relays over the tunnel could finish
            sidecar.stop()
        logger.info("gateway proxy stopped")
        return 0


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"


def _raise_nofile() -> None:
    """Two descriptors per connection: lift the soft file limit to the hard one."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            logger.warning("cannot raise the open-file limit from %d: %s", soft, exc)


def _hint_migrate_req() -> None:
    try:
        value = Path("/proc/sys/net/ipv4/tcp_migrate_req").read_text().strip()
    except OSError:
        return
    if value != "1":
        logger.info(
            "net.ipv4.tcp_migrate_req=%s: connections queued on a worker that stops are reset; "
            "set it to 1 to migrate them to the other workers",
            value,
        )
