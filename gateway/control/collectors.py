"""Metric collectors for ``/metrics`` (see :mod:`gateway.control.metrics`).

Each collector reads its owner's state on every scrape; nothing is stored twice. Counters
the control plane must count itself live in small objects passed in (no globals):

* :class:`VerificationStats` via :func:`instrument_check`, which wraps the registration
  RPC's evidence check (``gateway.control.registration.EvidenceCheck``): verification
  latency as a histogram and outcomes by verdict reason. The registration module itself
  exposes no counters (only a private admitted count), so wrapping the check is how the
  numbers are taken without changing it.
* :class:`RegistrationStats` via :func:`count_registrations`: every ``RegisterCvm`` by its
  *final* outcome (accepted, or the refusal reason the CVM was told: a policy reason,
  ``key_in_use``, ``app_mismatch``, ``pool_exhausted``, ``collateral_unavailable``, ...),
  observed as a middleware on the RPC app, since refusals after the evidence check (the
  registry's) never pass through the check wrapper.
* :class:`AdminStats` via :func:`admin_stats_middleware`: admin authentication failures
  (401) and rate-limited clients (429), observed on the way out of the auth middleware.

The data plane's counters (connections, bytes, errors, TLS handshakes, per-app open
connections) come from the workers' stats files (:mod:`gateway.proxy.stats`).
"""

from __future__ import annotations

import bisect
import json
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from gateway.attest.verifier import EvidenceResult
from gateway.control.certmanager import CertManager
from gateway.control.metrics import Collector, Family, Histogram, Sample
from gateway.control.state import OperatorState
from gateway.registry.service import Registry

__all__ = [
    "AdminStats",
    "RegistrationStats",
    "VerificationStats",
    "admin_stats_middleware",
    "certificate_collector",
    "count_registrations",
    "instance_collector",
    "instrument_check",
    "proxy_collector",
]

ONLINE_WINDOW = 300.0
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def instance_collector(
    registry: Registry, state: OperatorState, clock: Callable[[], float] = time.time
) -> Collector:
    """Registered, online (handshake within 5 minutes) and draining instances."""

    def collect() -> Iterable[Family]:
        records = registry.store.list_instances()
        now = clock()
        online = sum(
            1
            for r in records
            if r.last_handshake is not None and now - r.last_handshake < ONLINE_WINDOW
        )
        ids = {r.instance_id for r in records}
        draining = sum(1 for k in state.drained() if k in ids)
        return [
            Family(
                "gateway_instances_registered",
                "gauge",
                "Registered CVM instances",
                [Sample({}, len(records))],
            ),
            Family(
                "gateway_instances_online",
                "gauge",
                "Instances with a WireGuard handshake in the last 5 minutes",
                [Sample({}, online)],
            ),
            Family(
                "gateway_instances_draining",
                "gauge",
                "Instances that get no new connections",
                [Sample({}, draining)],
            ),
        ]

    return collect


def certificate_collector(certs: CertManager) -> Collector:
    """Per base domain: expiry (unix time), renewal failures in a row, certificate present."""

    def collect() -> Iterable[Family]:
        expiry, failures, present = [], [], []
        for d in certs.state.domains():
            st = certs.status(d.domain)
            labels = {"domain": d.domain}
            present.append(Sample(labels, 1 if st["has_cert"] else 0))
            failures.append(Sample(labels, st["failures"]))
            if st["not_after"] is not None:
                expiry.append(Sample(labels, st["not_after"]))
        return [
            Family(
                "gateway_certificate_not_after_timestamp_seconds",
                "gauge",
                "When the served certificate expires (unix time)",
                expiry,
            ),
            Family(
                "gateway_certificate_present",
                "gauge",
                "1 if a certificate is served for the base domain",
                present,
            ),
            Family(
                "gateway_certificate_renewal_failures",
                "gauge",
                "Consecutive failed renewals (0 after a success)",
                failures,
            ),
        ]

    return collect


def proxy_collector(counters: Callable[[], Mapping[str, Any]]) -> Collector:
    """The data plane's summed worker counters (``gateway.proxy.stats.read_stats`` shape)."""

    def collect() -> Iterable[Family]:
        c = counters()
        out = [
            Family(
                "gateway_connections_open",
                "gauge",
                "Open client connections",
                [Sample({}, int(c.get("open", 0)))],
            ),
        ]
        for key, help_text in (
            ("accepted", "Accepted client connections"),
            ("closed", "Closed client connections"),
            ("bytes_up", "Bytes relayed client to backend"),
            ("bytes_down", "Bytes relayed backend to client"),
        ):
            out.append(
                Family(
                    f"gateway_connections_{key}_total",
                    "counter",
                    help_text,
                    [Sample({}, int(c.get(key, 0)))],
                )
            )
        errors = c.get("errors", {})
        out.append(
            Family(
                "gateway_connection_errors_total",
                "counter",
                "Connections closed for a reason other than done",
                [Sample({"reason": str(k)}, int(v)) for k, v in sorted(errors.items())],
            )
        )
        failures = c.get("tls_failures", {})
        out += [
            Family(
                "gateway_tls_handshakes_total",
                "counter",
                "TLS handshakes the gateway terminated and completed (resumed ones included)",
                [Sample({}, int(c.get("tls_handshakes", 0)))],
            ),
            Family(
                "gateway_tls_handshake_failures_total",
                "counter",
                "TLS handshakes that failed, by reason (OpenSSL's, eof, reset, timeout, ...)",
                [Sample({"reason": str(k)}, int(v)) for k, v in sorted(failures.items())],
            ),
            Family(
                "gateway_tls_resumed_handshakes_total",
                "counter",
                "Completed TLS handshakes that resumed a session",
                [Sample({}, int(c.get("tls_resumed", 0)))],
            ),
            Family(
                "gateway_app_connections_open",
                "gauge",
                "Open client connections per app (apps with none are not listed)",
                [
                    Sample({"app_id": str(k)}, int(v))
                    for k, v in sorted(c.get("app_open", {}).items())
                    if int(v) > 0
                ],
            ),
        ]
        return out

    return collect


# --- registration verification ------------------------------------------------------------


@dataclass
class VerificationStats:
    """Outcomes (``accepted`` or the verdict's reason) and latency of evidence checks."""

    outcomes: Counter[str] = field(default_factory=Counter)
    bucket_counts: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS))
    total_seconds: float = 0.0
    count: int = 0

    def observe(self, outcome: str, seconds: float) -> None:
        self.outcomes[outcome] += 1
        i = bisect.bisect_left(LATENCY_BUCKETS, seconds)
        if i < len(self.bucket_counts):
            self.bucket_counts[i] += 1
        self.total_seconds += seconds
        self.count += 1

    def collect(self) -> Iterable[Family]:
        cumulative, running = [], 0
        for bound, n in zip(LATENCY_BUCKETS, self.bucket_counts, strict=True):
            running += n
            cumulative.append((bound, running))
        return [
            Family(
                "gateway_registration_verifications_total",
                "counter",
                "Registration evidence checks by outcome",
                [Sample({"outcome": k}, v) for k, v in sorted(self.outcomes.items())],
            ),
            Family(
                "gateway_registration_verification_seconds",
                "histogram",
                "Time to verify a registration's evidence (quote, event log, policy)",
                [Histogram({}, cumulative, self.total_seconds, self.count)],
            ),
        ]


EvidenceCheck = Callable[[list[bytes]], Awaitable[EvidenceResult]]


def instrument_check(
    check: EvidenceCheck,
    stats: VerificationStats,
    monotonic: Callable[[], float] = time.monotonic,
) -> EvidenceCheck:
    """``check`` that also records its latency and outcome in ``stats`` (errors as ``error``)."""

    async def instrumented(chain: list[bytes]) -> EvidenceResult:
        start = monotonic()
        outcome = "error"
        try:
            result = await check(chain)
            v = result.verdict
            outcome = "accepted" if v.accepted else (v.reason.value if v.reason else "refused")
            return result
        finally:
            stats.observe(outcome, monotonic() - start)

    return instrumented


# --- registrations (final outcome) -------------------------------------------------------

REGISTER_PATHS = frozenset({"/prpc/RegisterCvm", "/prpc/Tproxy.RegisterCvm"})
_REASON = re.compile(r"^[a-z0-9_]{1,48}$")


@dataclass
class RegistrationStats:
    """RegisterCvm answers: ``accepted``, or ``rejected`` with the reason the CVM was told."""

    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)

    def observe(self, accepted: bool, reason: str) -> None:
        self.outcomes[("accepted" if accepted else "rejected", reason)] += 1

    def collect(self) -> Iterable[Family]:
        return [
            Family(
                "gateway_registrations_total",
                "counter",
                "RegisterCvm requests by final outcome (rejected ones by reason)",
                [
                    Sample({"outcome": outcome, "reason": reason}, n)
                    for (outcome, reason), n in sorted(self.outcomes.items())
                ],
            )
        ]


def _rejection_reason(response: web.StreamResponse) -> str:
    """The ``reason`` of an RPC error body (``{"error", "reason"}``), else ``http_<status>``."""
    body = response.body if isinstance(response, web.Response) else None
    if isinstance(body, bytes) and len(body) < 65536:
        try:
            reason = json.loads(body).get("reason")
        except (ValueError, AttributeError):
            reason = None
        if isinstance(reason, str) and _REASON.match(reason):
            return reason
    return f"http_{response.status}"


def count_registrations(app: web.Application, stats: RegistrationStats) -> web.Application:
    """``app`` (the RPC app, :func:`gateway.control.registration.create_rpc_app`) with a
    middleware counting every RegisterCvm answer in ``stats``; returns ``app``."""

    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path not in REGISTER_PATHS:
            return await handler(request)
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            stats.observe(exc.status < 300, f"http_{exc.status}")
            raise
        except Exception:
            stats.observe(False, "error")
            raise
        ok = response.status < 300
        stats.observe(ok, "ok" if ok else _rejection_reason(response))
        return response

    app.middlewares.append(middleware)
    return app


# --- admin API ------------------------------------------------------------------------------


@dataclass
class AdminStats:
    auth_failures: Counter[str] = field(default_factory=Counter)

    def collect(self) -> Iterable[Family]:
        return [
            Family(
                "gateway_admin_auth_failures_total",
                "counter",
                "Admin API requests refused: bad credentials (unauthorized) or over budget",
                [
                    Sample({"reason": r}, self.auth_failures[r])
                    for r in ("unauthorized", "rate_limited")
                ],
            ),
        ]


def admin_stats_middleware(stats: AdminStats) -> Middleware:
    """Counts 401/429 answers; install outermost (``app.middlewares.insert(0, ...)``)."""

    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        response = await handler(request)
        if response.status == 401:
            stats.auth_failures["unauthorized"] += 1
        elif response.status == 429:
            stats.auth_failures["rate_limited"] += 1
        return response

    return middleware
