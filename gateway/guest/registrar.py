"""The CVM's registration task: register, keep the tunnel fresh, fail over, never block boot.

Upstream splits this between ``dstack-util setup`` (first registration at boot) and the
``dstack-gateway-checker`` service (``gateway_checker.rs``). We run one task beside the
guest agent, with upstream's timings as defaults (all injectable, with the clock):

* ``poll_interval`` 10 s (``POLL_INTERVAL``): read the handshake, decide;
* ``refresh_interval`` 180 s (``REFRESH_INTERVAL``): periodic re-registration, not forced;
* ``handshake_timeout`` 180 s (``HANDSHAKE_TIMEOUT``): no handshake for this long means a
  forced refresh (interface bounced), at most once per period;
* ``retry_initial`` 30 s doubling to ``retry_max`` 120 s (``MISSING_CONFIG_RETRY_INTERVAL``,
  ``MAX_RETRY_INTERVAL``): after a failed registration.

:func:`decide` is the whole policy as a pure function of the state, the time and the
latest handshake (tested by tables); :class:`Registrar` carries it out. Failover: each
registration tries the URLs in order starting with the gateway that answered last; a forced
refresh (stale handshake with the current gateway) starts with the *next* one, so a gateway
whose RPC answers but whose tunnel is dead does not hold the CVM. The first attempt runs in
the background: :meth:`Registrar.start` returns at once, so boot and the agent go on while
gateways are unreachable. Cancelling the task stops it cleanly (the interface stays up
unless :meth:`Registrar.close` is called: the tunnel outlives a restart of the task).
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gateway.guest.files import write_atomic
from gateway.guest.gateway_cache import CacheError, CertIssuer, GatewayKeyStore
from gateway.guest.gateway_client import (
    GatewayClient,
    GatewayError,
    GatewayRejected,
    PortPolicy,
)
from gateway.guest.wgconfig import Tunnel
from gateway.tee.base import TeeError
from gateway.tunnel.errors import TunnelError
from gateway.util.tasks import spawn

logger = logging.getLogger(__name__)

__all__ = ["Action", "Registrar", "RegistrarSettings", "RegistrarState", "decide", "url_order"]

STATUS_FILE = "registrar-status.json"


@dataclass(frozen=True, slots=True)
class RegistrarSettings:
    poll_interval: float = 10.0
    refresh_interval: float = 180.0
    handshake_timeout: float = 180.0
    retry_initial: float = 30.0
    retry_max: float = 120.0

    def __post_init__(self) -> None:
        for name in ("poll_interval", "refresh_interval", "handshake_timeout", "retry_initial"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.retry_max < self.retry_initial:
            raise ValueError("retry_max must be at least retry_initial")


class Action(enum.StrEnum):
    WAIT = "wait"
    REGISTER = "register"  # no tunnel yet (boot, or every attempt so far failed)
    REFRESH = "refresh"  # periodic re-registration; the interface is bounced only on change
    FORCE = "force"  # stale handshake: re-register elsewhere first, bounce the interface


@dataclass
class RegistrarState:
    """What :func:`decide` needs; times are the injected clock's seconds."""

    configured: bool = False
    configured_at: float = -math.inf  # when the interface was last (re)started
    last_refresh: float = -math.inf  # last successful registration
    last_forced: float = -math.inf
    failures: int = 0
    retry_at: float = -math.inf
    current_url: str | None = None


def retry_delay(settings: RegistrarSettings, failures: int) -> float:
    """30, 60, 120, 120 ... (upstream's doubling, capped)."""
    if failures <= 0:
        return 0.0
    return float(min(settings.retry_initial * 2 ** min(failures - 1, 30), settings.retry_max))


def decide(
    settings: RegistrarSettings,
    state: RegistrarState,
    now: float,
    handshake: float | None,
) -> Action:
    """The next step. Pure: no I/O, no clock.

    ``handshake`` is the latest handshake with any gateway peer (None: none since the
    interface came up). Staleness counts from that handshake, or from when the interface
    came up; a forced refresh is at most once per ``handshake_timeout``.
    """
    if now < state.retry_at:
        return Action.WAIT
    if not state.configured:
        return Action.REGISTER
    since = handshake if handshake is not None else state.configured_at
    if (
        now - since >= settings.handshake_timeout
        and now - state.last_forced >= settings.handshake_timeout
    ):
        return Action.FORCE
    if now - state.last_refresh >= settings.refresh_interval:
        return Action.REFRESH
    return Action.WAIT


def url_order(urls: Sequence[str], current: str | None, *, skip_current: bool) -> list[str]:
    """``urls`` rotated to start at ``current`` (or after it when ``skip_current``)."""
    if current is None or current not in urls:
        return list(urls)
    i = list(urls).index(current) + (1 if skip_current else 0)
    return [*urls[i:], *urls[:i]]


@dataclass
class Counters:
    attempts: int = 0
    registrations: int = 0
    failures: int = 0
    forced: int = 0
    bounces: int = 0
    rejected: int = 0


@dataclass
class Registrar:
    """Registers with the first reachable, verified gateway and keeps the tunnel fresh."""

    urls: tuple[str, ...]
    client: GatewayClient
    keystore: GatewayKeyStore
    issuer: CertIssuer
    tunnel: Tunnel
    port_policy: PortPolicy | None = None
    settings: RegistrarSettings = field(default_factory=RegistrarSettings)
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    status_dir: Path | None = None
    state: RegistrarState = field(default_factory=RegistrarState)
    counters: Counters = field(default_factory=Counters)
    last_error: str = ""
    _task: asyncio.Task[None] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if not self.urls:
            raise ValueError("no gateway URLs (sys-config gateway_urls is empty)")

    # --- one registration ------------------------------------------------------------------

    async def refresh(self, *, force: bool, skip_current: bool = False) -> bool:
        """Register with the first gateway that verifies and answers; apply the answer.

        Returns True on success. Never raises for gateway, network or device failures:
        they are logged, counted and retried by :meth:`step` after a back-off.
        """
        self.counters.attempts += 1
        now = self.clock()
        try:
            keys = await self.keystore.get_or_create(self.issuer, int(now))
        except (CacheError, TeeError, OSError, RuntimeError) as exc:
            return self._failed(now, f"no client credentials: {exc}")
        errors: list[str] = []
        for url in url_order(self.urls, self.state.current_url, skip_current=skip_current):
            try:
                answer, verified = await self.client.register(url, keys, self.port_policy)
            except GatewayRejected as exc:
                self.counters.rejected += 1
                logger.warning("refusing gateway (fail closed): %s", exc)
                errors.append(str(exc))
                continue
            except GatewayError as exc:
                logger.info("gateway unavailable: %s", exc)
                errors.append(str(exc))
                continue
            try:
                bounced = await asyncio.to_thread(
                    self.tunnel.apply, keys.wg_sk, answer, force=force
                )
            except (TunnelError, OSError) as exc:
                return self._failed(now, f"tunnel setup failed: {exc}")
            now = self.clock()
            st = self.state
            st.configured, st.last_refresh, st.current_url = True, now, url
            st.failures, st.retry_at = 0, -math.inf
            if bounced:
                st.configured_at = now
                self.counters.bounces += 1
            self.counters.registrations += 1
            self.last_error = ""
            logger.info(
                "registered with %s (%s %s)%s",
                url,
                verified.method,
                verified.app_id.hex(),
                ", interface restarted" if bounced else "",
            )
            return True
        return self._failed(now, "; ".join(errors) or "no gateway answered")

    def _failed(self, now: float, message: str) -> bool:
        st = self.state
        st.failures += 1
        st.retry_at = now + retry_delay(self.settings, st.failures)
        self.counters.failures += 1
        self.last_error = message
        logger.warning(
            "gateway registration failed (attempt %d, retry in %.0fs): %s",
            st.failures,
            st.retry_at - now,
            message,
        )
        return False

    # --- the loop --------------------------------------------------------------------------

    async def step(self) -> Action:
        """One poll: read the handshake, decide, act."""
        now = self.clock()
        handshake = None
        if self.state.configured:
            try:
                handshake = await asyncio.to_thread(self.tunnel.last_handshake)
            except (TunnelError, OSError) as exc:
                logger.warning("cannot read the tunnel state: %s", exc)
        action = decide(self.settings, self.state, now, handshake)
        if action is Action.REGISTER:
            await self.refresh(force=True)
        elif action is Action.REFRESH:
            await self.refresh(force=False)
        elif action is Action.FORCE:
            logger.warning(
                "no handshake with the gateway for %.0fs: forced refresh",
                now - (handshake if handshake is not None else self.state.configured_at),
            )
            self.state.last_forced = now
            self.counters.forced += 1
            await self.refresh(force=True, skip_current=True)
        self.write_status(action)
        return action

    async def run(self) -> None:
        """Poll forever (cancel to stop)."""
        while True:
            await self.step()
            wait = self.settings.poll_interval
            if self.state.retry_at > self.clock():
                wait = min(wait, self.state.retry_at - self.clock())
            await self.sleep(max(wait, 0.0))

    def start(self) -> asyncio.Task[None]:
        """Run in the background; returns at once (boot never waits for a gateway)."""
        self._task = spawn(self.run(), name="gateway-registrar")
        return self._task

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def close(self) -> None:
        """Stop the task and take the interface down."""
        await self.stop()
        await asyncio.to_thread(self.tunnel.down)

    # --- observability -------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        applied = self.tunnel.applied
        return {
            "configured": self.state.configured,
            "gateway_url": self.state.current_url,
            "client_ip": str(applied.client_ip) if applied is not None else None,
            "counters": asdict(self.counters),
            "last_error": self.last_error,
            "time": self.clock(),
        }

    def write_status(self, action: Action) -> None:
        if self.status_dir is None:
            return
        doc = self.status() | {"last_action": action.value}
        try:
            write_atomic(self.status_dir / STATUS_FILE, json.dumps(doc).encode(), 0o644)
        except OSError as exc:
            logger.warning("cannot write %s: %s", STATUS_FILE, exc)
